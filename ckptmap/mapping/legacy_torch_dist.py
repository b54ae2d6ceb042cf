"""Legacy Megatron files -> torch_dist (``ckptmap convert --from torch --to torch_dist``): a ``--ckpt-format
torch`` checkpoint (``iter_*/mp_rank_*/model_optim_rng.pt`` + ``distrib_optim.pt``) written as the
``torch_dist`` folder megatron-core 0.15+ loads with ``dist_checkpointing.load``, the distributed optimizer's
state stored ``fully_reshardable`` (model space: one global tensor per parameter and state).

The legacy checkpoint is read as for ``reshard`` (``megatron_source.MegatronSource``: every rank's tensors
matched to the rules, the bucket layout of every distrib_optim.pt). Each parameter becomes the global tensor
under its sharded key (``megatron_dist.sharded_item``: layers stacked on a leading axis, the local spec's
norm renames), saved as the chunks Megatron's own save writes: one per stacked layer and TP fragment (a
SwiGLU ``linear_fc1`` shard is two), each in the ``__R_0.distcp`` file of the rank that held it; replicated
tensors (norms) once, from TP rank 0 (the other TP ranks' copies must be the same bytes, checked). The
optimizer states ``optimizer.state.{param,exp_avg,exp_avg_sq}.<key>`` have the same chunks. Layer
``_extra_state`` and the RNG / rerun-machine states become ShardedObjects (``…/shard_<layer>_<layers>``,
``rng_state/shard_<pp>.<tp>_<PP>.<TP>``); ``common.pt`` is rank 0's model file without the model chunks and
those states, with ``optimizer.param_state_sharding_type`` (and 0.15+'s ``content_metadata``).
``--sharding-type fully_sharded_model_space`` writes the 0.8 - 0.14 default instead (``fp32_param``,
nd-flattened: one fragment per chunk above, ``mcore_data`` with the global shapes). One chunk (one TP shard) in memory
at a time. The tied output layer of the last stage is not saved (Megatron stores one copy, the embedding's).
``--sharding-type dp_zero_gather_scatter`` (dense): no optimizer tensors; per DP group (model-parallel rank) the
objects ``param_state`` (the folder's distrib_optim.pt dict, re-saved streaming) and ``optimizer`` (its param
groups), in the 0.8 - 0.14 or the 0.15+ form (``target_version``: content_metadata, mcore_data, args).

MoE (expert parallelism, ``mp_rank_TT_PPP_EEE`` folders; SequentialMLP experts, expert TP = TP, the optimizer a
``[dense, expert]`` ChainedOptimizer): dense parameters from expert rank 0's folders, each expert rank's local
experts on the global expert axis (``decoder.layers.mlp.experts.experts.…``: ``[L, E, …]``), their extra states
``…/shard_<layer>.<expert>_<L>.<E>``; the optimizers' states ``chained_<i>.optimizer.state.…`` in
``fully_sharded_model_space`` (as 0.8 - 0.14 save them) and unprefixed in ``fully_reshardable`` (0.15+'s
``chained_optim_avoid_prefix``), whose RNG objects are sharded over DP as 0.16 saves them under EP
(``rng_state/shard_<pp>.<tp>.<dp>_…``: each DP rank gets the one its expert rank's folder holds); ``common.pt``'s
``optimizer`` is ``{0: dense, 1: expert}``; at EP 1 (one optimizer, the experts in the dense buffers) the states
are unprefixed and ``optimizer`` is that optimizer's. GroupedMLP experts and expert TP != TP are refused before
anything is written.
"""

from __future__ import annotations

import copy
import itertools
import math
import tempfile
import time
from pathlib import Path

import attrs
import numpy as np

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_dist as M
from ckptmap.formats import megatron_folders
from ckptmap.formats import torch_dist as td
from ckptmap.formats import torch_zip_reader as tzr
from ckptmap.formats import torch_zip_writer as tzw
from ckptmap.formats.megatron_write import has_tensor
from ckptmap.mapping.megatron_source import MegatronSource, SourceOptions
from ckptmap.mapping.reshard import SourceModel, byte_copy_pieces, target_tensor
from ckptmap.mapping.rules import EXPERT, version_key
from ckptmap.mapping.sharding import Box
from ckptmap.mapping.torch_dist_legacy import DEFAULT_RULES, STATES

TARGET_TYPES = ("fully_reshardable", "fully_sharded_model_space", "dp_zero_gather_scatter")


@attrs.frozen
class LegacyToDistPlan:
    src: str
    dst: Path
    iteration: str
    sharding_type: str
    tensors: tuple          # td.OutTensor
    chunk_sources: dict     # (key, chunk offsets) -> (TensorTask of a TP shard, offsets of the chunk in it)
    objects: tuple          # td.OutObject
    object_bytes: dict      # object key -> bytes
    common: dict
    common_file: str
    notes: tuple = ()
    mcore_data: dict = attrs.field(factory=dict)
    num_experts: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _saved(value) -> bytes:
    """``torch.save([value])``, as Megatron stores a ShardedObject's data in a .distcp item."""
    with tempfile.TemporaryDirectory(prefix=".ckptmap-obj-") as tmp:
        f = Path(tmp) / "archive"   # torch.save into a buffer names the records archive/...
        tzw.save([value], f)
        return f.read_bytes()


def _saved_streaming(value, zf: tzr.TorchZipFile) -> bytes:
    """The same for a value holding tensors of the legacy file ``zf`` (RNG states)."""
    with tempfile.TemporaryDirectory(prefix=".ckptmap-obj-") as tmp:
        f = Path(tmp) / "archive"
        tzw.save_streaming([value], f, lambda key: [zf.storage_bytes(key)])
        return f.read_bytes()


def plan_legacy_to_dist(src, dst, sharding_type: str = "fully_reshardable", rules: str = DEFAULT_RULES,
                        megatron_version: str | None = None, rank_objects_as: str | None = None,
                        target_version: str | None = None) -> LegacyToDistPlan:
    """``rank_objects_as``: lay the per-rank objects (RNG) out as that sharding type's version saves them (the
    first step of a composed conversion to it); default: ``sharding_type``. ``target_version``: the megatron-core
    that will load it, for the types two version ranges save differently (dp_zero_gather_scatter)."""
    if sharding_type not in TARGET_TYPES:
        raise CkptmapError(f"--sharding-type {sharding_type}: torch -> torch_dist writes {', '.join(TARGET_TYPES)} "
                           f"(megatron-core 0.15+ / 0.8 - 0.14 / 0.8+), and dp_reshardable through the first (the "
                           f"command line composes it). Nothing was written.")
    dst = Path(dst)
    if dst.exists():
        raise CkptmapError(f"--dst {dst} already exists; ckptmap never writes into an existing checkpoint folder")
    source = MegatronSource(SourceOptions(str(src), rules=rules, megatron_version=megatron_version)).with_optimizer()
    lay, args = source.layout, source.args
    names = source.rules.torch_dist_layout()
    st = names.sharding(sharding_type)
    num_experts = int(source.env.get("num_experts") or 0)
    # MoE: a [dense, expert] ChainedOptimizer, or at EP 1 one optimizer with the experts in the dense buffers
    chained = _check_moe(source, num_experts) if lay.ep > 1 or num_experts else False
    coalesced = st.space == "coalesced"   # dp_zero_gather_scatter: per DP group, the legacy distrib_optim dict
    version = _target_version(st, target_version)
    # 0.15+ say what a torch_dist save holds (common.pt content_metadata, which their load needs to read
    # dp_zero_gather_scatter) and record no empty mcore_data entries; 0.8 - 0.14 the reverse
    modern = version_key(version) >= version_key(M.CONTENT_METADATA_SINCE)
    # the per-rank objects as the version the (composed) conversion ends at saves them
    objects_version = version if rank_objects_as is None else names.sharding(rank_objects_as).versions[0]
    if lay.cp > 1:
        raise CkptmapError(f"{src}: context parallelism {lay.cp}; torch -> torch_dist handles CP 1 so far")
    impl = getattr(args, "transformer_impl", None)
    model = SourceModel(source)
    tied = not getattr(args, "untie_embeddings_and_output_weights", False)
    files = {}

    def file_of(rank) -> str:
        writer = lay.mp_rank_ranks(rank.tp, rank.pp, all_dp_cp=False, ep=rank.ep)[0]
        return files.setdefault(rank.key, f"__{writer}_0.distcp")

    def state_key(state, key, expert) -> str:
        # a ChainedOptimizer [dense, expert]: 0.8 - 0.14 prefix its keys; 0.15+ fully_reshardable does not
        # (content_metadata chained_optim_avoid_prefix)
        prefix = names.chained_prefix(int(expert) if chained and st.nd_flattened else None)
        return prefix + st.tensor_key(state=state, name=key)

    # group the global parameters by sharded key (layers stacked)
    stacked: dict = {}
    for name, gp in model.params.items():
        if tied and gp.rule.shared_embedding and gp.shards[0][0].pp != 0:
            continue   # the last stage's copy of the tied embedding: Megatron saves the embedding's only
        key, idx = names.sharded_item(name, impl)
        stacked.setdefault(key, {})[idx] = gp
    tensors, chunk_sources, keys_cache, mcore = [], {}, {}, {}
    for key, items in stacked.items():
        idxs = sorted(items)
        first = items[idxs[0]]
        k = len(idxs[0])
        stack = (lay.num_layers, num_experts)[:k]
        if k and idxs != sorted(itertools.product(*map(range, stack))):
            raise CkptmapError(f"{src}: {key} is stored for (layer[, expert]) {idxs}, not every one of the "
                               f"{' x '.join(map(str, stack))} (layers[ x experts]); the checkpoint is incomplete")
        expert = any(seg.kind == EXPERT for seg in first.rule.megatron.segments)
        shape = stack + tuple(first.global_shape)
        for state in ("weight",) if coalesced else ("weight", *STATES):
            out_key = key if state == "weight" else state_key(state, key, expert)
            dtype = first.dtype if state == "weight" else "float32"
            chunks = []
            for idx in idxs:
                gp = items[idx]
                if gp.global_shape != first.global_shape or gp.dtype != first.dtype:
                    raise CkptmapError(f"{src}: {gp.key} is {gp.dtype} {list(gp.global_shape)} but layer "
                                       f"{idxs[0]} of {key} is {first.dtype} {list(first.global_shape)}")
                tps = [0] if gp.sharding.kind == "replicated" else range(lay.tp)
                for t in tps:
                    task = target_tensor(gp, state, gp.global_shape, lay.tp, t, f"{state} of {gp.key}", source,
                                         keys_cache)
                    for f in gp.sharding.fragments(gp.global_shape, lay.tp, t, gp.key):
                        box = Box(tuple(idx) + tuple(f.global_box.offsets), (1,) * k + tuple(f.global_box.lengths))
                        chunks.append(td.OutChunk(box, file_of(gp.shards[t][0])))
                        chunk_sources[(out_key, box.offsets)] = (task, tuple(f.local_offsets),
                                                                 tuple(f.global_box.lengths))
            if state != "weight" and st.nd_flattened:
                tensors.append(_nd_flattened(out_key, dtype, shape, chunks, chunk_sources))
                mcore[out_key] = {M.ND_SHAPE: shape}
                continue
            tensors.append(td.OutTensor(out_key, dtype, shape, tuple(chunks)))
            if st.nd_flattened or coalesced and not modern:   # 0.8 - 0.14 record an empty entry for every other tensor
                mcore[out_key] = {}
    # ShardedObjects: layer _extra_state (from TP rank 0), RNG states per (pp, tp)
    objects, object_bytes = [], {}
    for rank in source.sorted_ranks:
        if rank.tp != 0:
            continue
        for chunk_key, v in rank.model.chunks():
            for leaf in model.leaves(rank, v):
                if not leaf.dotted.endswith("._extra_state"):
                    continue
                if leaf.layer is None:
                    if leaf.dotted in names.dropped_extra_states:
                        continue   # Megatron's torch_dist save drops it (it holds nothing)
                    raise CkptmapError(f"{rank.model.path}: {leaf.dotted} is an _extra_state outside the layers; "
                                       f"ckptmap does not know its torch_dist object name")
                if has_tensor(leaf.value) or leaf.value is not None and not isinstance(leaf.value, (bytes, str)):
                    raise CkptmapError(f"{rank.model.path}: {leaf.dotted} holds {type(leaf.value).__name__} (e.g. "
                                       f"TransformerEngine fp8 metadata); torch -> torch_dist copies empty extra states "
                                       f"only")
                if leaf.expert is None and rank.ep != 0:
                    continue   # dense modules are the same in every expert folder: expert rank 0's
                g = lay.global_layer(rank.pp, v, leaf.layer)
                global_name = leaf.dotted.replace(f"layers.{leaf.layer}.", f"layers.{g}.", 1)
                stack = (lay.num_layers,)
                if leaf.expert is not None:
                    e = lay.global_expert(rank.ep, leaf.expert, num_experts)
                    global_name = ".".join(model.names.renumber(global_name.split("."), EXPERT, e))
                    stack += (num_experts,)
                name, idx = names.sharded_item(global_name, impl)
                if len(idx) != len(stack):
                    raise CkptmapError(f"{rank.model.path}: {leaf.dotted} ({global_name}) has no torch_dist object "
                                       f"name in the rules' torch_dist block ({names.loc}): add a `stacked` line")
                okey = M.object_key(name, idx, stack)
                objects.append(td.OutObject(okey, file_of(rank)))
                object_bytes[okey] = _saved(leaf.value)
    # per-rank state (RNG, rerun machine) as ShardedObjects over (pp, tp), replicated over DP; 0.16+ with expert
    # parallelism shards the RNG over DP too: DP rank d takes the folder of its expert rank (that folder holds its
    # expert-data-parallel rank 0's, as the legacy save keeps no other)
    over_dp = names.rank_objects_over_dp(objects_version) if lay.ep > 1 else set()
    for rank in source.sorted_ranks:
        zf = tzr.TorchZipFile(rank.dir / megatron_folders.MODEL_FILE)
        for obj in names.rank_objects:
            name, path = obj.name, obj.path
            value = zf.root
            for k in path:
                value = value.get(k) if isinstance(value, dict) else None
            if value is None:
                continue
            if name not in over_dp:
                shards = [((rank.pp, rank.tp), (lay.pp, lay.tp))] if rank.ep == 0 else []
            else:
                shards = [((rank.pp, rank.tp, d), (lay.pp, lay.tp, lay.dp)) for d in range(lay.dp)
                          if lay.coords(lay.global_rank(tp=rank.tp, pp=rank.pp, dp=d))["ep"] == rank.ep]
            for at, of in shards:
                okey = M.object_key(name, at, of)
                objects.append(td.OutObject(okey, file_of(rank)))
                object_bytes[okey] = _saved_streaming(value, zf)
        zf.close()
    if coalesced:
        _dp_group_objects(source, names, st, file_of, objects, object_bytes, chained)
    common, common_file = _common(source, sharding_type, names, modern)
    notes = ("optimizer param groups in common.pt: rank 0's, as Megatron's own torch_dist save keeps them"
             if st.param_groups_in_common else "optimizer param groups in each DP group's optimizer object",
             f"saved as megatron-core {version} saves {sharding_type}")
    return LegacyToDistPlan(str(source.ckdir.root), dst, str(source.iteration), sharding_type, tuple(tensors),
                            chunk_sources, tuple(objects), object_bytes, common, common_file, notes, mcore, num_experts)


def _check_moe(source: MegatronSource, num_experts: int) -> bool:
    """MoE layouts this conversion writes (SequentialMLP experts, expert TP = TP; the optimizer a [dense, expert]
    ChainedOptimizer, or one optimizer at EP 1); refused before anything is written otherwise. Returns whether
    the optimizer is chained."""
    args, lay = source.args, source.layout
    path = source.ranks[(0, 0, 0)].dir / megatron_folders.MODEL_FILE
    what = f"a mixture-of-experts model ({num_experts or '?'} experts, expert-parallel size {lay.ep})"
    if getattr(args, "moe_grouped_gemm", False):
        raise CkptmapError(f"{path}: {what} with args.moe_grouped_gemm set (GroupedMLP experts); torch -> torch_dist "
                           f"handles SequentialMLP experts (local_experts.N) only. Load these files in Megatron "
                           f"(--ckpt-format torch) and save with --ckpt-format torch_dist. Nothing was written.")
    etp = getattr(args, "expert_tensor_parallel_size", None)
    if etp is not None and etp != lay.tp:
        raise CkptmapError(f"{path}: {what} with args.expert_tensor_parallel_size {etp} but "
                           f"tensor_model_parallel_size {lay.tp}; torch -> torch_dist handles MoE with expert TP = TP "
                           f"only. Load these files in Megatron (--ckpt-format torch) and save with --ckpt-format "
                           f"torch_dist. Nothing was written.")
    if not num_experts:
        raise CkptmapError(f"{path}: expert-parallel folders (EP {lay.ep}) but args.num_experts is not set; the "
                           f"checkpoint's args do not describe its model. Nothing was written.")
    chained = {rank.key: bool(rank.optim.chained) for rank in source.sorted_ranks}
    if lay.ep == 1 and not any(chained.values()):
        return False   # experts in the dense buffers, one optimizer: megatron-core's layout at EP 1
    if not all(chained.values()):
        flat = sorted(k for k, c in chained.items() if not c)
        raise CkptmapError(f"{path}: {what} whose optimizer is a [dense, expert] ChainedOptimizer in some folders and "
                           f"one optimizer in others (folders (tp, pp, ep) {flat}); the checkpoint is inconsistent. "
                           f"Nothing was written.")
    return True


def _nd_flattened(key, dtype, shape, chunks, chunk_sources) -> td.OutTensor:
    """fully_sharded_model_space: the tensor stored as ``(*fragments, fragment numel)``, fragment ``idx`` = the
    C-order flattening of chunk ``idx`` of the regular grid its chunks form (megatron_dist module docstring)."""
    block = tuple(chunks[0].box.lengths)
    if any(tuple(c.box.lengths) != block for c in chunks):
        raise CkptmapError(f"internal error: the chunks of {key} are not a regular grid")
    frags = tuple(g // b for g, b in zip(shape, block))
    numel = int(np.prod(block))
    out = []
    for c in chunks:
        idx = tuple(o // b for o, b in zip(c.box.offsets, block))
        box = Box(idx + (0,), (1,) * len(idx) + (numel,))
        out.append(td.OutChunk(box, c.file))
        chunk_sources[(key, box.offsets)] = chunk_sources.pop((key, c.box.offsets))
    return td.OutTensor(key, dtype, frags + (numel,), tuple(out))


def _target_version(st, given: str | None) -> str:
    """The megatron-core version whose form of sharding type ``st`` to write: ``given``
    (--target-megatron-version), else the first the rules declare for the type -- refused when the type's
    versions save it in two forms (both sides of content_metadata) and none was given."""
    lo, hi = st.versions
    since = M.CONTENT_METADATA_SINCE
    if given is None:
        if version_key(lo) < version_key(since) <= version_key(hi):
            raise CkptmapError(f"--sharding-type {st.name}: megatron-core {lo} - {hi} save it, and {since}+ differently "
                               f"(their load needs common.pt's content_metadata, which earlier versions do not write); "
                               f"say which will load it with --target-megatron-version (e.g. 0.12.1 or 0.16.1). Nothing "
                               f"was written.")
        return lo
    try:
        version_key(given)
    except ValueError:
        raise CkptmapError(f"--target-megatron-version {given!r} is not a version number like 0.12.1") from None
    if not st.covers(given):
        raise CkptmapError(f"--target-megatron-version {given} with --sharding-type {st.name}: ckptmap writes that type "
                           f"as megatron-core {lo} - {hi} save it (the rules' torch_dist block, {st.loc}); choose another "
                           f"--sharding-type for {given}. Nothing was written.")
    return given


def _common(source: MegatronSource, sharding_type: str, names, modern: bool) -> tuple[dict, str]:
    path = source.ranks[(0, 0, 0)].dir / megatron_folders.MODEL_FILE
    root = tzr.read_objects(path)
    out = {}
    per_rank = {o.path[0] for o in names.rank_objects if len(o.path) == 1}   # saved as ShardedObjects instead
    for key, value in root.items():
        if key in per_rank or (isinstance(key, str) and key.startswith("model") and
                                     (key == "model" or key[5:].isdigit())):
            continue
        if key == "args":
            value = copy.copy(value)
            for name, new in (("ckpt_format", "torch_dist"), ("use_dist_ckpt", True),
                              ("dist_ckpt_optim_fully_reshardable", sharding_type == "fully_reshardable")):
                if hasattr(value, name):
                    setattr(value, name, new)
            if sharding_type == "dp_zero_gather_scatter" and not modern and hasattr(value, "ckpt_fully_parallel_save"):
                value.ckpt_fully_parallel_save = False   # how 0.8 - 0.14 choose it (--no-ckpt-fully-parallel-save)
        if key == "rerun_state_machine" and isinstance(value, dict):   # its 'sharded' part is a per-rank object
            value = {k: v for k, v in value.items() if k != "sharded"}
        if key == "optimizer":
            in_common = names.sharding(sharding_type).param_groups_in_common
            value = {i: _common_optimizer(path, v, sharding_type, in_common) for i, v in enumerate(value)} \
                if isinstance(value, list) else _common_optimizer(path, value, sharding_type, in_common)
        out[key] = value
    if has_tensor(out):
        raise CkptmapError(f"{path} holds tensors outside the model and RNG state; ckptmap does not copy them")
    if modern:   # 0.15+ saves say what they hold; 0.8 - 0.14 ones do not
        out["content_metadata"] = dict(M.CONTENT_METADATA_0_16, distrib_optim_sharding_type=sharding_type)
        if sharding_type != "fully_reshardable":   # as 0.16 writes it: the flag of that type only with it
            del out["content_metadata"]["distrib_optim_fully_reshardable_mem_efficient"]
    return out, str(path)


def _common_optimizer(path, value, sharding_type: str, in_common: bool = True) -> dict:
    inner = value.get("optimizer") if isinstance(value, dict) else None
    if not isinstance(inner, dict) or "param_groups" not in inner:
        raise CkptmapError(f"{path}: 'optimizer' holds no param groups (optimizer.param_groups); torch -> "
                           f"torch_dist needs a distributed optimizer's checkpoint")
    if not in_common:   # the param groups are in each DP group's `optimizer` object
        return {"param_state_sharding_type": sharding_type}
    return {"optimizer": inner, "param_state_sharding_type": sharding_type}


def _dp_group_objects(source: MegatronSource, names, st, file_of, objects: list, object_bytes: dict,
                      chained: bool) -> None:
    """dp_zero_gather_scatter: per DP group the objects Megatron's ``sharded_param_state_dp_zero`` saves --
    ``param_state``, the legacy distrib_optim.pt dict (whole buffers, ``buckets_coalesced``, gathered on DP
    rank 0: what the folder's distrib_optim.pt holds), and ``optimizer``, the param groups of the folder's
    model file. A single optimizer's group N is the model-parallel rank; a [dense, expert] ChainedOptimizer's
    (MoE) are ``chained_0.…`` per model-parallel rank (from expert rank 0's folder: the dense state is the
    same in every expert folder) and ``chained_1.…`` per expert-model-parallel rank. Streamed from the
    legacy files' storages."""
    lay = source.layout
    for rank in source.sorted_ranks:
        optim_path, model_path = rank.dir / megatron_folders.OPTIM_FILE, rank.dir / megatron_folders.MODEL_FILE
        model_opt = tzr.read_objects(model_path).get("optimizer")
        # (optimizer index or None, DP group, index into the files' lists or None)
        if chained:
            groups = [(1, lay.expert_model_parallel_rank(rank.tp, rank.pp, rank.ep), 1)]
            if rank.ep == 0:
                groups.insert(0, (0, lay.model_parallel_rank(rank.tp, rank.pp), 0))
        else:
            groups = [(None, lay.model_parallel_rank(rank.tp, rank.pp), None)]
        optim = tzr.TorchZipFile(optim_path)
        try:
            for opt_index, group, i in groups:
                state = optim.root if i is None else _item(optim.root, i, optim_path, "distrib_optim.pt")
                if not isinstance(state, dict) or state.get("buckets_coalesced") is not True:
                    raise CkptmapError(f"{optim_path}: not the coalesced distributed-optimizer state (buckets_coalesced) "
                                       f"megatron-core 0.7+ saves, which a dp_zero_gather_scatter param_state holds; "
                                       f"reshard it with --target-megatron-version 0.8 (or newer) first. Nothing was "
                                       f"written.")
                inner = _item(model_opt, i, model_path, "optimizer") if i is not None else model_opt
                inner = inner.get("optimizer") if isinstance(inner, dict) else None
                if not isinstance(inner, dict) or "param_groups" not in inner:
                    raise CkptmapError(f"{model_path}: 'optimizer' holds no param groups (optimizer"
                                       f"{'' if i is None else f'[{i}]'}.optimizer.param_groups); a "
                                       f"dp_zero_gather_scatter save needs them")
                for what, data in (("param_state", lambda: _saved_streaming(state, optim)),
                                   ("optimizer", lambda: _saved(inner))):
                    key = M.group_object_key(names, st, opt_index, group, what)
                    objects.append(td.OutObject(key, file_of(rank)))
                    object_bytes[key] = data()
        finally:
            optim.close()


def _item(value, i: int, path, what: str):
    """Item ``i`` of a ChainedOptimizer's list (legacy MoE files keep [dense, expert])."""
    if not isinstance(value, list) or len(value) <= i:
        raise CkptmapError(f"{path}: {what} is not a ChainedOptimizer's [dense, expert] list; the folder does not hold "
                           f"the MoE optimizer state its args describe")
    return value[i]


def write_legacy_to_dist(plan: LegacyToDistPlan, *, fsync: bool = False, progress=None) -> None:
    """Write the plan: ``dst/iter_*`` (the torch_dist folder) and the tracker, streaming one TP shard at a time."""
    from ckptmap.execute import _Sources

    sources = _Sources()
    last: dict = {}
    dtype_of = {t.key: t.dtype for t in plan.tensors}

    def read_box(key, box):
        task, local, lengths = plan.chunk_sources[(key, box.offsets)]
        if last.get("task") is not task:   # a SwiGLU shard's two chunks come from the same TP shard
            last.update(task=task, runs=_byte_runs(task, sources), array=None)
        runs = last["runs"]
        first = Box(local, lengths).run_start(task.shape) if runs is not None and task.dtype == dtype_of[key] else None
        if first is not None:
            # the chunk is consecutive elements of the shard, which are runs of source bytes (a whole shard, a
            # SwiGLU half, parameters' ranges of a DP-sharded bucket): copied as bytes, never held in memory
            return _sub_ranges(runs, first, math.prod(lengths), dtypes.itemsize(task.dtype))
        if last["array"] is None:
            last["array"] = sources.array(task)
        part = last["array"][tuple(slice(o, o + n) for o, n in zip(local, lengths))]
        return np.ascontiguousarray(part).reshape(box.lengths)

    it = "release" if plan.iteration == "release" else megatron_folders.iter_dir_name(int(plan.iteration))
    if plan.dst.exists():
        raise CkptmapError(f"--dst {plan.dst} already exists; ckptmap never writes into an existing checkpoint folder")
    try:
        td.write_checkpoint(plan.dst / it, list(plan.tensors), list(plan.objects), read_box=read_box,
                            read_object=plan.object_bytes.__getitem__, common=plan.common,
                            common_fill=lambda key: iter(()), mcore_data=plan.mcore_data or None,
                            backend=dict(td.BACKEND_JSON), fsync=fsync,
                            progress=progress)
    except BaseException:
        # the iter folder is assembled under a temporary name (removed on failure); leave no empty --dst behind
        if plan.dst.is_dir() and not any(plan.dst.iterdir()):
            plan.dst.rmdir()
        raise
    finally:
        sources.close()
    from ckptmap import atomic
    atomic.write_text(plan.dst / M.TRACKER, plan.iteration, fsync=fsync)


def _byte_runs(task, sources) -> list | None:
    """``[(first element, count, FileRange)]`` tiling the TP shard ``task`` when its elements are runs of source
    bytes (reshard.byte_copy_pieces, each run's checks done here), else None."""
    from ckptmap.execute import streamed

    runs = []
    for start, piece in byte_copy_pieces(task):
        if piece.reads:
            return None
        how = streamed(piece, sources)
        if how is None or how[0] != "range":   # one run per piece ("ranges": several)
            return None
        runs.append((start, math.prod(piece.shape), how[1]))
    return runs


def _sub_ranges(runs, first: int, count: int, itemsize: int) -> tuple:
    """The FileRanges holding elements ``[first, first + count)`` of a shard tiled, in order, by ``runs``."""
    from ckptmap.formats import byte_io

    out = tuple(byte_io.sliced((rng for _, _, rng in runs), first * itemsize, count * itemsize))
    if sum(r.nbytes for r in out) != count * itemsize:
        raise CkptmapError(f"internal error: elements {first} + {count} are not covered by the shard's byte runs")
    return out


def print_plan(plan: LegacyToDistPlan, out) -> None:
    from ckptmap.cli.printing import human_bytes

    print(f"plan convert: {plan.src} (torch, legacy) -> {plan.dst} (torch_dist, {plan.sharding_type})", file=out)
    print(f"  {len(plan.tensors)} global tensors ({human_bytes(plan.nbytes)}), {len(plan.objects)} objects, "
          f"iteration {plan.iteration}", file=out)
    for n in plan.notes:
        print(f"  note: {n}", file=out)


def run(plan: LegacyToDistPlan, *, fsync=False, no_progress=False) -> float:
    started = time.perf_counter()

    def progress(name, nbytes):
        if not no_progress:
            print(f"  wrote {name}", flush=True)

    write_legacy_to_dist(plan, fsync=fsync, progress=progress)
    return time.perf_counter() - started
