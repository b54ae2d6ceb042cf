"""Writing Megatron legacy checkpoint files for a layout no source file has (resharding): the object
graph is built from a *recipe* (plain data in the plan) and a template file, and written with the
streaming torch writer, each storage's bytes coming from the plan.

``model_optim_rng.pt`` recipe::

    {"template": <a source model_optim_rng.pt: its non-model entries are kept, tensors copied>,
     "args": {attribute: new value},                      # the new parallel sizes
     "chunks": [{"key": "model" | "model0", …, "leaves": [
         {"path": [keys], "tensor": <storage>, "dtype": …, "shape": […]         # a new tensor,
          [, "offset": n, "storage_numel": m]},                                # or a view of one
         {"path": [keys], "from": [<file>, <chunk key>, [keys]]}],        # e.g. _extra_state, as it was
       "metadata": [[module prefix, {"version": …}], …]}],               # optional: the state dict's _metadata
     "optimizer_entry": "keep" | "chain" | "dense_only",
     "param_groups": None | [per optimizer: None | [indices into its saved param_groups, in the new order]]}

``distrib_optim.pt`` recipe (the form ``DistributedOptimizer.save_parameter_state`` writes)::

    {"chained": bool, "optimizers": [None | {"buffers": [
        {"param_dtype", "grad_dtype", "storage": "per_bucket" | "coalesced", "padded": […],
         "unpadded": […], "numel_unpadded": n, "tensors": {state: [storage per bucket] | [storage]}}]}]}
"""

from __future__ import annotations

import collections
import copy
import sys

import attrs

from ckptmap.errors import CkptmapError
from ckptmap.formats import torch_zip_writer
from ckptmap.formats.megatron_files import COALESCED, LEGACY_RANK_STATE_PATHS, OPTIM_STATES, model_chunk_keys
from ckptmap.formats.safe_unpickler import STORAGE_TYPE_OF, torch_global
from ckptmap.formats.torch_zip_reader import TensorRef, TorchZipFile
from ckptmap.formats.torch_zip_reader import contiguous_stride as _contiguous

OUT, TEMPLATE, COPIED = "out/", "tpl/", "src"


def _new_tensor(storage: str, dtype: str, shape, offset: int = 0, storage_numel: int | None = None) -> TensorRef:
    """A contiguous tensor of storage ``storage``: the whole storage, or a view at ``offset`` of one of
    ``storage_numel`` elements (Megatron's weights: views of their DDP buffer)."""
    shape = tuple(shape)
    numel = 1
    for n in shape:
        numel *= n
    if dtype not in STORAGE_TYPE_OF:
        raise CkptmapError(f"cannot write a {dtype} tensor into a Megatron checkpoint")
    return TensorRef(OUT + storage, dtype, offset, shape, _contiguous(shape),
                     numel if storage_numel is None else storage_numel)


def _prefixed(node, prefix: str, memo: dict | None = None):
    """``node`` with every TensorRef's storage key prefixed (so that ``fill`` knows its file). An
    object met twice (e.g. the ``betas`` tuple every optimizer param group shares) gives one copy:
    the pickle then refers back to it, as torch.save of the live objects does."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)][1]
    if isinstance(node, TensorRef):
        out = attrs.evolve(node, storage=prefix + node.storage)
    elif isinstance(node, dict):
        out = type(node)()
        if hasattr(node, "__dict__"):
            out.__dict__.update(node.__dict__)
        for k, v in node.items():
            out[k] = _prefixed(v, prefix, memo)
    elif type(node) in (list, tuple):
        out = type(node)(_prefixed(v, prefix, memo) for v in node)
    else:
        return node
    memo[id(node)] = (node, out)   # the node is kept alive, so its id is not reused
    return out


def _put(root: dict, path, value, cls) -> None:
    node = root
    for part in path[:-1]:
        node = node.setdefault(part, cls())
    if path[-1] in node:
        raise CkptmapError(f"internal error: two entries at {'.'.join(map(str, path))}")
    node[path[-1]] = value


def write_model(path, recipe: dict, fill, *, fsync: bool = False, records: dict | None = None) -> None:
    template = TorchZipFile(recipe["template"])
    root = template.root
    sources = {recipe["template"]: (template, TEMPLATE)}

    def source(file):
        if file not in sources:
            sources[file] = (TorchZipFile(file), f"{COPIED}{len(sources)}/")
        return sources[file]

    chunk_keys = {k for k, _ in model_chunk_keys(root, recipe["template"])}
    cls = type(root[next(iter(chunk_keys))])
    out = type(root)()
    for key, value in root.items():
        if key in chunk_keys:
            if not any(k in out for k in (c["key"] for c in recipe["chunks"])):
                for chunk in recipe["chunks"]:
                    out[chunk["key"]] = _chunk(chunk, cls, source)
            continue
        if key == "args" and recipe.get("args"):
            value = copy.copy(value)
            for name, new in recipe["args"].items():
                setattr(value, name, new)
        if key == "optimizer":
            value = _optimizer_entry(value, recipe.get("optimizer_entry", "keep"))
            value = _reordered_groups(value, recipe.get("param_groups"))
        out[key] = _prefixed(value, TEMPLATE)
    by_prefix = {prefix: zf for zf, prefix in sources.values()}
    _save(out, path, _storage_stream(fill, by_prefix), fsync, records)


def _save(obj, path, stream, fsync: bool, records: dict | None) -> None:
    """save_streaming; ``records`` (a dict) gets {plan storage key: the file's record key} of the
    plan's storages (what a reader of the file sees as a tensor's storage)."""
    written: dict | None = None if records is None else {}
    torch_zip_writer.save_streaming(obj, path, stream, fsync=fsync, records=written)
    if records is not None:
        records.update({key[len(OUT):]: record for key, record in written.items() if key.startswith(OUT)})


def _storage_stream(fill, sources_by_prefix: dict):
    """Storage bytes for save_streaming: the plan's new storages (OUT…) from ``fill``, every other
    storage copied from the source file its prefix names."""
    def stream(key):
        if key.startswith(OUT):
            yield from fill(key[len(OUT):])
            return
        prefix, _, original = key.partition("/")
        yield sources_by_prefix[prefix + "/"].storage_bytes(original)
    return stream


def _optimizer_entry(value, how: str):
    """The ``optimizer`` entry (hyper-parameters and param groups; the states are in
    distrib_optim.pt) for a target whose optimizer is chained differently: a ChainedOptimizer
    ([dense, expert], MoE under expert parallelism) saves a list, a single optimizer a dict."""
    if how == "keep":
        return value
    if how == "dense_only":
        if not isinstance(value, list):
            raise CkptmapError("internal error: expected a ChainedOptimizer's list of optimizer states")
        return value[0]
    if how == "chain":
        expert = copy.deepcopy(value)
        for group in ((expert.get("optimizer") or {}).get("param_groups") or []):
            if "is_expert_parallel" in group:
                group["is_expert_parallel"] = True
        return [value, expert]
    raise CkptmapError(f"internal error: optimizer entry {how!r}")


def _reordered_groups(value, orders):
    """The ``optimizer`` entry with each optimizer's ``param_groups`` picked / reordered by ``orders``
    (per optimizer: indices into its saved groups, or None to keep them)."""
    if orders is None:
        return value
    entries = value if isinstance(value, list) else [value]
    if len(entries) != len(orders):
        raise CkptmapError(f"internal error: {len(orders)} param-group orders for {len(entries)} optimizers")
    out = []
    for entry, order in zip(entries, orders):
        if order is not None:
            entry = copy.copy(entry)
            entry["optimizer"] = copy.copy(entry["optimizer"])
            groups = entry["optimizer"]["param_groups"]
            entry["optimizer"]["param_groups"] = [groups[i] for i in order]
        out.append(entry)
    return out if isinstance(value, list) else out[0]


# The pickle memoizes objects by identity, so equal bytes need the identities a live torch save has:
# a module prefix is built per module (a new string each), the "version" key is one interned literal.
def _fresh(text: str) -> str:
    return text.encode().decode() if text else text


def _canonical(value):
    return {sys.intern(k) if isinstance(k, str) else k: v for k, v in value.items()} if isinstance(value, dict) \
        else value


def _chunk(chunk: dict, cls, source) -> dict:
    out = cls()
    if chunk.get("metadata") is not None:   # torch's state_dict() attaches the modules' versions
        out._metadata = collections.OrderedDict((_fresh(k), _canonical(v)) for k, v in chunk["metadata"])
    for leaf in chunk["leaves"]:
        if "tensor" in leaf:
            value = _new_tensor(leaf["tensor"], leaf["dtype"], leaf["shape"], leaf.get("offset", 0),
                                leaf.get("storage_numel"))
        else:
            file, chunk_key, keys = leaf["from"]
            zf, prefix = source(file)
            node = zf.root[chunk_key]
            for part in keys:
                node = node[part]
            value = _prefixed(node, prefix)
        _put(out, leaf["path"], value, cls)
    return out


def _dtype_key(buf: dict) -> tuple:
    return (torch_global("torch", buf["param_dtype"]), torch_global("torch", buf["grad_dtype"]))


def _optimizer_state(opt: dict) -> dict:
    bufs = opt["buffers"]
    coalesced = {b["storage"] for b in bufs} == {COALESCED}
    if coalesced:
        state: dict = {"buckets_coalesced": True}
    else:
        state = {"per_bucket_numel": [{_dtype_key(b): list(b["padded"])} for b in bufs],
                 "per_bucket_numel_unpadded": [{_dtype_key(b): list(b["unpadded"])} for b in bufs]}
    for g, b in enumerate(bufs):
        entry = {}
        for st in OPTIM_STATES:
            names = b["tensors"][st]
            if coalesced:
                entry[st] = _new_tensor(names[0], "float32", (b["numel_unpadded"],))
            else:
                entry[st] = [_new_tensor(n, "float32", (size,)) for n, size in zip(names, b["padded"])]
        if coalesced:
            entry["numel_unpadded"] = b["numel_unpadded"]
        state[g] = {_dtype_key(b): entry}
    return state


def write_optim(path, recipe: dict, fill, *, fsync: bool = False, records: dict | None = None) -> None:
    states = [None if o is None else _optimizer_state(o) for o in recipe["optimizers"]]
    obj = states if recipe["chained"] else states[0]

    def stream(key):
        yield from fill(key[len(OUT):])

    _save(obj, path, stream, fsync, records)


# -------------------------------------------------------------------------------------------------
# A legacy model_optim_rng.pt from a torch_dist checkpoint (no legacy file to take as a template)
#
# recipe::
#
#     {"common": <torch_dist iter dir>,        # common.pt: args, iteration, optimizer groups, scheduler, …
#      "args": {attribute: new value}, "drop": [top-level keys of common.pt a legacy file has not],
#      "optimizer_drop": [keys of common.pt's optimizer entry a legacy file has not],
#      "param_groups": [indices into common.pt's optimizer param_groups, in the target rank's order] | None,
#      "rank_objects": {dotted path in the legacy file: <object key> | None},   # ShardedObjects of the rank
#                 (LEGACY_RANK_STATE_PATHS: rng_state, rerun_state_machine.sharded)
#      "optimizer_object": <object key> | None,  # the optimizer's param groups, when not in common.pt
#      "chained": None | [per optimizer i: {"optimizer_object": …, "param_groups": …}],   # ChainedOptimizer
#                 (MoE): common.pt's optimizer {i: state} becomes the legacy list [state 0, state 1, …]
#      "chained_merge": bool,   # instead: optimizer 0's state alone (a target without the expert optimizer)
#      "chunks": [{"key": "model" | "model0", …, "leaves": [
#          {"path": [keys], "tensor": <storage>, "dtype": …, "shape": […]},
#          {"path": [keys], "object": <object key>},      # e.g. a layer's _extra_state
#          {"path": [keys], "none": true}]}]}             # an _extra_state torch_dist left out (empty)


def _dist_object(ckpt, key, items: dict):
    """A ShardedObject's value (Megatron saves ``torch.save([value])`` per object); its tensors (RNG
    states) stream from the object's item, registered in ``items`` under a storage prefix."""
    item = ckpt.read_object(key)
    root = item.root
    if not isinstance(root, list) or len(root) != 1:
        raise CkptmapError(f"{ckpt.path}: object {key!r} holds {type(root).__name__}, not Megatron's one-item list")
    if not has_tensor(root[0]):
        return root[0]
    prefix = f"obj{len(items)}/"
    items[prefix] = item
    return _prefixed(root[0], prefix)


def has_tensor(node) -> bool:
    """Whether an object tree holds a tensor anywhere."""
    if isinstance(node, TensorRef):
        return True
    if isinstance(node, dict):
        return any(has_tensor(v) for v in node.values())
    if type(node) in (list, tuple):
        return any(has_tensor(v) for v in node)
    return False


def _optimizer_from_dist(ckpt, value, recipe: dict, items: dict):
    """One optimizer's legacy ``optimizer`` entry from common.pt's: torch_dist-only keys dropped, the param
    groups from the DP group's object (bucket-space types), reordered as the target rank builds them."""
    if isinstance(value, dict):   # torch_dist's own entries are not a legacy file's
        value = {k: v for k, v in value.items() if k not in recipe.get("optimizer_drop", ())}
    if recipe.get("optimizer_object"):   # bucket-space types: per DP group
        value = dict(value, optimizer=_dist_object(ckpt, recipe["optimizer_object"], items))
    if recipe.get("param_groups") is not None:
        value = copy.deepcopy(value)
        groups = value["optimizer"]["param_groups"]
        value["optimizer"]["param_groups"] = [groups[i] for i in recipe["param_groups"]]
    return value


def write_model_from_dist(path, recipe: dict, fill, *, fsync: bool = False, records: dict | None = None) -> None:
    import collections

    from ckptmap.formats.torch_dist import TorchDistCheckpoint

    with TorchDistCheckpoint(recipe["common"]) as ckpt:
        common = ckpt.common()
        root = common.root
        if has_tensor({k: v for k, v in root.items() if k not in recipe.get("drop", ())}):
            raise CkptmapError(f"{common.path} holds tensors outside the model; ckptmap does not copy them")
        chunks, items = {}, {}
        for chunk in recipe["chunks"]:
            out = collections.OrderedDict()
            for leaf in chunk["leaves"]:
                if "tensor" in leaf:
                    value = _new_tensor(leaf["tensor"], leaf["dtype"], leaf["shape"])
                elif "object" in leaf:
                    value = _dist_object(ckpt, leaf["object"], items)
                else:
                    value = None
                _put(out, leaf["path"], value, collections.OrderedDict)
            chunks[chunk["key"]] = out
        objs = recipe.get("rank_objects", {})
        unknown = sorted(set(objs) - set(LEGACY_RANK_STATE_PATHS))
        if unknown:
            raise CkptmapError(f"a rank object at {unknown[0]!r}: a legacy model file keeps per-rank state at "
                               f"{', '.join(LEGACY_RANK_STATE_PATHS)} only")
        rng, rerun = (_dist_object(ckpt, objs[p], items) if objs.get(p) else None for p in LEGACY_RANK_STATE_PATHS)
        legacy: dict = {}

        def put_rng():
            if rng is not None and "rng_state" not in legacy:
                legacy["rng_state"] = rng

        # Megatron's generate_state_dict order: args, checkpoint_version, iteration, model chunks,
        # optimizer, opt_param_scheduler, rerun_state_machine, rng_state, then the FLOPs counter
        for key, value in root.items():
            if key in recipe.get("drop", ()):
                continue
            if key == "optimizer" or (key in ("opt_param_scheduler", "rerun_state_machine", "rng_state",
                                               "num_floating_point_operations_so_far") and not
                                      any(k in legacy for k in chunks)):
                for k, v in chunks.items():
                    legacy.setdefault(k, v)
            if key == "num_floating_point_operations_so_far":
                put_rng()
            if key == "args" and recipe.get("args"):
                value = copy.copy(value)
                for name, new in recipe["args"].items():
                    setattr(value, name, new)
            if key == "optimizer" and recipe.get("chained") is not None:
                n = 2 if recipe.get("chained_merge") else len(recipe["chained"])
                if not isinstance(value, dict) or sorted(value, key=str) != list(range(n)):
                    raise CkptmapError(f"{common.path}: optimizer is not a ChainedOptimizer's {{0: …, "
                                       f"{n - 1}: …}} state (keys {list(value)[:5]})")
                value = [_optimizer_from_dist(ckpt, value[i], dict(recipe, **spec), items)
                         for i, spec in enumerate(recipe["chained"])]
                if recipe.get("chained_merge"):
                    value = value[0]
            elif key == "optimizer":
                value = _optimizer_from_dist(ckpt, value, recipe, items)
            if key == "rerun_state_machine" and rerun is not None and isinstance(value, dict):
                value = dict(value, sharded=rerun)
            legacy[key] = value
            if key == "rerun_state_machine":
                put_rng()
        for k, v in chunks.items():
            legacy.setdefault(k, v)
        put_rng()

        _save(legacy, path, _storage_stream(fill, items), fsync, records)
