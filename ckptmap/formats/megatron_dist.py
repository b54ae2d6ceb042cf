"""What Megatron's ``torch_dist`` checkpoints mean: sharding types, global tensors, optimizer state.

Every key spelling below is declared in the rules' ``torch_dist megatron`` block
(``rules/common/megatron_layouts.rules``, parsed by ``mapping/torch_dist_rules.py``); this module reads
and writes keys only through that :class:`TorchDistLayout`, and holds what the keys mean.

``formats/torch_dist.py`` reads the DCP container (keys, global shapes, chunks, byte objects).
This module interprets it as megatron-core 0.8 - 0.16 writes it (``dist_checkpointing`` +
``DistributedOptimizer.sharded_state_dict``), as data:

* **Model weights** are global tensors under their sharded keys. Layers of a ``TransformerBlock``
  are stacked on a leading axis (``decoder.layers.mlp.linear_fc2.weight``: ``[L, …]``, L = all
  layers of all pipeline stages and virtual chunks, global layer order); MoE experts add a global
  expert axis (``decoder.layers.mlp.experts.experts.linear_fc1.weight``: ``[L, E, …]``); see
  the rules' ``stacked`` lines. TP-sharded tensors are global (a SwiGLU ``linear_fc1`` is
  ``[gate of every TP rank; up of every TP rank]``, QKV grouped per query group). The
  TransformerEngine-style names hold the norms (``linear_qkv.layer_norm_weight`` is the input
  norm, ``linear_fc1.layer_norm_weight`` the pre-MLP norm) also with the local spec.

* **Optimizer state**, by the distributed optimizer's *sharding type* (the rules' ``sharding`` blocks; the
  type is declared in ``common.pt`` -- ``content_metadata['distrib_optim_sharding_type']`` since
  0.15, ``optimizer['param_state_sharding_type']`` always -- and the keys must agree with it).
  A ``ChainedOptimizer`` (MoE: dense + expert optimizers) prefixes its optimizers' keys with
  ``chained_<i>.`` except for the fully reshardable types when ``chained_optim_avoid_prefix`` (0.15+).

  ``fully_sharded_model_space`` (0.8 - 0.14 default; *model space, nd-flattened*): per parameter
  ``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<key>``, each stored with shape
  ``(*fragments, fragment numel)`` -- the global tensor cut into a regular grid of fragments (one
  per TP shard and stacked layer / expert: ``fragments[i] = global[i] // local[i]``), fragment
  ``idx`` being the C-order flattening of the global box ``idx * local`` (DP ranks write ranges of
  that last axis). The global shape is ``.metadata``'s ``mcore_data[key]
  ['nd_reformulated_orig_global_shape']``; 0.8 writes 1-D tensors that need no fragments plain.
  ``fully_reshardable`` (0.15+; *model space*): ``optimizer.state.{param,exp_avg,exp_avg_sq}.<key>``
  at the parameter's global shape. Both keep the optimizer's param groups in ``common.pt``.
  ``dp_reshardable`` (0.15+ default; *bucket space*): per DP group ``N`` (the model-parallel rank of
  the optimizer), gradient buffer ``G`` and bucket ``B`` a 1-D tensor
  ``optimizer.distributed.dp_group_idx_N.gbuf_idx_G.dtype_(param dtype, grad dtype).bucket_idx_B.
  {param,exp_avg,exp_avg_sq}`` of the bucket's unpadded size (the 64-element alignment gaps
  between parameters inside, uninitialised), plus byte objects ``…dp_group_idx_N.per_bucket_numel``
  / ``per_bucket_numel_unpadded`` and ``…optimizer`` (param groups).
  ``dp_zero_gather_scatter`` (all versions; *coalesced*): per DP group a byte object
  ``…dp_group_idx_N.param_state`` holding the legacy ``distrib_optim.pt`` dict
  (``{"buckets_coalesced": True, G: {(param dtype, grad dtype): {"param", "exp_avg",
  "exp_avg_sq": 1-D fp32 of the buffer's unpadded size, "numel_unpadded"}}}``) and ``…optimizer``.

  Where a parameter sits inside a bucket (bucket and coalesced spaces) is the buffer layout of the
  training run (``mapping/buckets.py``, the rules' ``buckets megatron`` block); it is not in the
  checkpoint, so this module exposes those tensors as they are (:meth:`MegatronDist.buckets`,
  :meth:`MegatronDist.dp_zero_state`) and leaves the mapping to parameters to the compiler.

* **Known bug** (megatron-core 0.15 / 0.16 before Megatron-LM PR 5077): a ``fully_reshardable``
  save slices the bucket-coalesced, bucket-padding-free optimizer tensors with the *padded* buffer
  offsets, so in every gradient buffer with more than one (padded) bucket each parameter after the
  first bucket end gets another parameter's (shifted) fp32 param and moments. The model weights are
  right, and the distributed optimizer always writes its fp32 main params back into the model
  weights, so in a sound checkpoint every saved weight equals its fp32 param rounded to the
  weight's dtype; :meth:`MegatronDist.check_fully_reshardable` compares them and refuses a shifted
  checkpoint.

:meth:`MegatronDist.tensors` gives the compiler every global tensor (model weight or model-space
optimizer state) as :class:`GlobalTensor`: name, state, dtype, global shape and the boxes that tile
it; :meth:`MegatronDist.read_box` reads one box (un-flattening nd-flattened storage), never the whole
tensor. :func:`plan_rewrite` / :func:`write_rewrite` rewrite a checkpoint (the same sharding type,
item for item -- byte-identical ``.distcp`` files -- or ``fully_sharded_model_space`` ->
``fully_reshardable``, the upgrade megatron-core itself can only do by loading on GPUs with <= 0.14
and saving with >= 0.15), streaming one chunk at a time.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import re
from importlib import resources
from pathlib import Path

import attrs
import numpy as np

from ckptmap import atomic, dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import torch_dist as td
from ckptmap.mapping import ops
from ckptmap.mapping.sharding import Box
from ckptmap.mapping.torch_dist_rules import ShardingSpec, TorchDistLayout

__all__ = ["ShardingType", "default_layout", "GlobalTensor", "BucketTensor", "MegatronDist",
           "RewritePlan", "plan_rewrite", "write_rewrite", "plan_folder", "FULLY_RESHARDABLE_BUG"]

# -------------------------------------------------------------------------------------------------
# Declared data: the key spelling is the rules' ``torch_dist megatron`` block (mapping/torch_dist_rules.py)

ShardingType = ShardingSpec
# ``.metadata``'s mcore_data entry of an nd-flattened tensor: its global shape (dist_checkpointing's own field)
ND_SHAPE = "nd_reformulated_orig_global_shape"


@functools.cache
def default_layout() -> TorchDistLayout:
    """The bundled rules' ``torch_dist megatron`` block (common/megatron_layouts.rules)."""
    from ckptmap.mapping.rules import parse_rules

    path = resources.files("ckptmap.rules").joinpath("common", "megatron_layouts.rules")
    return parse_rules(path.read_text(), str(path)).torch_dist_layout("megatron")


def object_key(name: str, offsets=(0,), global_shape=(1,)) -> str:
    """dist_checkpointing's key of one shard of ShardedObject ``name`` (``ShardedObject.unique_key``)."""
    return f"{name}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, global_shape))}"


def group_object_key(layout: TorchDistLayout, st: ShardingSpec, optimizer: int | None, group: int, what: str) -> str:
    """Bucket-space types: the key of DP group ``group``'s object ``what`` (``optimizer``, ``per_bucket_numel``…)."""
    return object_key(layout.chained_prefix(optimizer) + st.object_name(group=group, what=what))


def rank_object_over_dp(layout: TorchDistLayout, key: str, dp: int, version: str) -> list[str] | None:
    """The keys of object ``key`` (``<name>/shard_<pp>.<tp>_<PP>.<TP>``, a rank object the rules say megatron-core
    ``version`` shards over DP) when sharded over ``dp`` data-parallel ranks as well; None for any other object."""
    name, _, shard = key.partition("/shard_")
    m = re.fullmatch(r"(\d+)\.(\d+)_(\d+)\.(\d+)", shard)
    if m is None or name not in layout.rank_objects_over_dp(version):
        return None
    pp, tp, n_pp, n_tp = map(int, m.groups())
    return [object_key(name, (pp, tp, d), (n_pp, n_tp, dp)) for d in range(dp)]


# Where a dp_zero_gather_scatter ``param_state`` object (``torch.save([state])``) keeps buffer ``gbuf``'s
# coalesced state tensor: the legacy distrib_optim.pt dict, ``{gbuf: {(param dtype, grad dtype): {state: …}}}``.
def DP_ZERO_STATE_PATH(gbuf, dtype_pair, state):
    return (0, gbuf, dtype_pair, state)


# The (param dtype, grad dtype) pair as bucket-space keys spell it (``str`` of the torch dtype tuple).
def dtype_pair(param_dtype: str, grad_dtype: str) -> str:
    return f"(torch.{param_dtype}, torch.{grad_dtype})"


def unstack_object(layout: TorchDistLayout, name: str, offsets: tuple[int, ...], transformer_impl: str | None) -> str:
    """The legacy name of the item of a stacked ``ShardedObject`` (``…_extra_state/shard_<offsets>_…``)."""
    s = layout.stacked_key(name)
    if s is None:
        return name
    if len(offsets) < len(s.axes):
        raise CkptmapError(f"object {name!r} has {len(offsets)} shard offsets, fewer than its stacked axes {s.axes}")
    return layout.item_name(name, dict(zip(s.axes, offsets)), transformer_impl)


FULLY_RESHARDABLE_BUG = (
    "megatron-core 0.15 / 0.16 (before Megatron-LM PR 5077, 'Fix bugs in re-sharding DistributedOptimizer "
    "state in torch_dist checkpoint') saves fully_reshardable optimizer state from the wrong offsets when a "
    "gradient buffer has more than one bucket: every parameter after the first bucket end gets another "
    "parameter's fp32 param and Adam moments (shifted by the bucket padding, partly zeros)")

# -------------------------------------------------------------------------------------------------
# Records the compiler uses


@attrs.frozen
class GlobalTensor:
    """A global tensor as Megatron means it: model weight (``state == "weight"``) or a model-space
    optimizer state (``param`` = fp32 main param, ``exp_avg``, ``exp_avg_sq``) of the parameter
    ``name`` (its sharded key), of chained optimizer ``optimizer`` (None: not chained). ``key`` is
    the tensor's key in the file, ``shape`` the global shape (un-flattened), ``boxes`` tile it: the
    saved chunks, or the fragments of an nd-flattened tensor (each a TP shard of one stacked
    layer / expert)."""

    name: str
    state: str
    optimizer: int | None
    key: str
    dtype: str
    shape: tuple[int, ...]
    boxes: tuple[Box, ...]
    stored_shape: tuple[int, ...]

    @property
    def nd_flattened(self) -> bool:
        return self.stored_shape != self.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


@attrs.frozen
class BucketTensor:
    """A ``dp_reshardable`` bucket tensor: state ``state`` of bucket ``bucket`` of gradient buffer
    ``gbuf`` (dtype pair ``dtypes`` as spelled in the key) of the optimizer of DP group ``group``
    (of chained optimizer ``optimizer``), 1-D, the bucket's unpadded size."""

    optimizer: int | None
    group: int
    gbuf: int
    dtypes: str
    bucket: int
    state: str
    key: str
    numel: int


# -------------------------------------------------------------------------------------------------
# Interpretation


def _declared_types(common) -> list[str]:
    out = []
    cm = common.get("content_metadata") if isinstance(common, dict) else None
    if isinstance(cm, dict) and isinstance(cm.get("distrib_optim_sharding_type"), str):
        out.append(cm["distrib_optim_sharding_type"])
    opt = common.get("optimizer") if isinstance(common, dict) else None
    entries = []
    if isinstance(opt, dict) and "param_state_sharding_type" in opt:
        entries = [opt]
    elif isinstance(opt, dict):
        entries = [v for _, v in sorted(opt.items(), key=lambda kv: str(kv[0]))]
    elif isinstance(opt, list):
        entries = opt
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("param_state_sharding_type"), str):
            out.append(e["param_state_sharding_type"])
    return out


class MegatronDist:
    """A Megatron torch_dist checkpoint folder, interpreted (see the module docstring). Opening reads
    metadata and ``common.pt`` only; :attr:`sharding_type` is None for a checkpoint without
    optimizer state."""

    def __init__(self, path, reader: td.TorchDistCheckpoint | None = None, layout: TorchDistLayout | None = None):
        self.layout = layout or default_layout()
        self.reader = reader or td.TorchDistCheckpoint(path)
        self.path = self.reader.path
        try:
            self.common = self.reader.common().root
            if not isinstance(self.common, dict):
                raise CkptmapError(f"{self.path / td.COMMON_PT} holds a {type(self.common).__name__}, not the dict "
                                   f"Megatron saves; this is not a Megatron torch_dist checkpoint")
            self.sharding_type = self._detect()
            self._classify()
        except BaseException:
            self.reader.close()
            raise

    # --- sharding type ---
    def _detect(self) -> ShardingType | None:
        meta = self.reader.meta
        lay = self.layout
        known = lay.sharding_types
        optim_keys = [k for k in meta.order if lay.is_optimizer_key(k)]
        declared = sorted(set(_declared_types(self.common)))
        where = f"{self.path}"
        if len(declared) > 1:
            raise CkptmapError(f"{where}: common.pt declares several optimizer sharding types {declared}; a checkpoint "
                               f"has one — it is corrupt or assembled from several saves")
        if declared:
            name = declared[0]
            unsupported = dict(lay.unsupported)
            if name in unsupported:
                raise CkptmapError(f"{where}: the distributed optimizer state is stored with sharding type {name!r} "
                                   f"({unsupported[name]}); ckptmap reads {', '.join(known)} — "
                                   f"re-save with one of those (megatron-core --dist-ckpt-optim-fully-reshardable, or "
                                   f"the default)")
            st = known.get(name)
            if st is None:
                raise CkptmapError(f"{where}: common.pt declares the unknown optimizer sharding type {name!r}; ckptmap "
                                   f"reads {', '.join(known)} (the torch_dist rules, {lay.loc}) — nothing was converted")
            bad = [k for k in optim_keys if not self._matches(st, k)]
            if bad:
                raise CkptmapError(f"{where}: common.pt says the optimizer state is {name!r} but {len(bad)} optimizer "
                                   f"keys do not have that type's form (first: {bad[0]!r}); the checkpoint is "
                                   f"inconsistent — save it again")
            if not optim_keys and st.space != "model":
                raise CkptmapError(f"{where}: common.pt says the optimizer state is {name!r} but the checkpoint holds "
                                   f"none of its keys; it is incomplete — save it again")
            return st
        if not optim_keys:
            return None
        fits = [st for st in known.values() if all(self._matches(st, k) for k in optim_keys)]
        if len(fits) != 1:
            raise CkptmapError(f"{where}: common.pt does not say how the optimizer state is sharded and its keys "
                               f"(e.g. {optim_keys[0]!r}) fit {'no' if not fits else 'more than one'} sharding type "
                               f"ckptmap knows ({', '.join(known)}); nothing was converted")
        return fits[0]

    def _matches(self, st: ShardingType, key: str) -> bool:
        _, rest = self.layout.split_chained(key)
        if key in self.reader.meta.tensors:
            return st.tensors is not None and st.tensors.match(rest) is not None
        name = self.reader.meta.objects[key].name
        return st.objects is not None and st.objects.match(self.layout.split_chained(name)[1]) is not None

    # --- keys ---
    def _classify(self) -> None:
        meta = self.reader.meta
        st = self.sharding_type
        self._tensors: list[GlobalTensor] = []
        self._buckets: list[BucketTensor] = []
        self.optimizer_objects: dict = {}   # (optimizer, group, what) -> object key
        self.other_objects: list[str] = []
        mcore = meta.mcore_data or {}
        for key, t in meta.tensors.items():
            if not self.layout.is_optimizer_key(key):
                self._tensors.append(GlobalTensor(key, "weight", None, key, t.dtype, t.shape,
                                                  tuple(c.box for c in t.chunks), t.shape))
                continue
            opt, rest = self.layout.split_chained(key)
            m = st.tensors.match(rest)
            if st.space == "model":
                state = st.state(m["state"])
                shape = t.shape
                nd = mcore.get(key, {}).get(ND_SHAPE) if isinstance(mcore.get(key), dict) else None
                if nd is not None and st.nd_flattened:
                    shape = self._nd_shape(key, t, nd)
                    boxes = _fragments(shape, t.shape)
                else:
                    boxes = tuple(c.box for c in t.chunks)
                self._tensors.append(GlobalTensor(m["name"], state, opt, key, t.dtype, shape, boxes, t.shape))
            else:  # bucket space
                if len(t.shape) != 1:
                    raise CkptmapError(f"{self.path}: bucket tensor {key!r} has shape {list(t.shape)}, not 1-D")
                self._buckets.append(BucketTensor(opt, m["group"], m["gbuf"], m["dtypes"], m["bucket"],
                                                  st.state(m["state"]), key, t.shape[0]))
        for key, o in meta.objects.items():
            if self.layout.is_optimizer_key(key):
                opt, rest = self.layout.split_chained(o.name)
                m = st.objects.match(rest)
                self.optimizer_objects[(opt, m["group"], m["what"])] = key
            else:
                self.other_objects.append(key)
        model = {t.name: t for t in self._tensors if t.state == "weight"}
        missing = sorted({t.name for t in self._tensors if t.state != "weight"} - set(model))
        if missing:
            raise CkptmapError(f"{self.path}: optimizer state for {len(missing)} parameters without a model weight "
                               f"(first: {missing[0]!r}); the checkpoint is inconsistent")
        for t in self._tensors:
            if t.state != "weight" and t.shape != model[t.name].shape:
                raise CkptmapError(f"{self.path}: {t.key!r} has global shape {list(t.shape)} but its parameter "
                                   f"{t.name!r} has {list(model[t.name].shape)}; the checkpoint is inconsistent")

    def _nd_shape(self, key, t: td.TensorMeta, nd) -> tuple[int, ...]:
        shape = td._ints(nd)
        frags, frag_numel = t.shape[:-1], t.shape[-1] if t.shape else 0
        ok = shape is not None and len(shape) == len(frags) and all(f and g % f == 0 for g, f in zip(shape, frags)) \
            and math.prod(g // f for g, f in zip(shape, frags)) == frag_numel
        if not ok:
            raise CkptmapError(f"{self.path}: {key!r} is stored with shape {list(t.shape)} but mcore_data says its "
                               f"global shape is {nd!r}; the two do not describe an nd-flattened tensor (fragments "
                               f"x fragment size) — the checkpoint is corrupt")
        return shape

    def tensors(self, state: str | None = None) -> list[GlobalTensor]:
        """Every global tensor (``state``: only ``weight`` / ``param`` / ``exp_avg`` / ``exp_avg_sq``)."""
        return [t for t in self._tensors if state is None or t.state == state]

    def tensor(self, name: str, state: str = "weight") -> GlobalTensor:
        for t in self._tensors:
            if t.name == name and t.state == state:
                return t
        raise CkptmapError(f"{self.path} has no {state} tensor for {name!r}")

    def buckets(self) -> list[BucketTensor]:
        """``dp_reshardable``: every bucket tensor (empty for other sharding types)."""
        return list(self._buckets)

    def optimizer_object(self, optimizer, group, what):
        key = self.optimizer_objects.get((optimizer, group, what))
        if key is None:
            raise CkptmapError(f"{self.path} has no object {what!r} for DP group {group}"
                               + ("" if optimizer is None else f" of chained optimizer {optimizer}"))
        item = self.reader.read_object(key)
        root = item.root
        if not isinstance(root, list) or len(root) != 1:
            raise CkptmapError(f"{self.path}: object {key!r} holds {type(root).__name__}, not Megatron's one-item list")
        return item, root[0]

    def per_bucket_numel(self, optimizer, group) -> tuple:
        """``dp_reshardable``: (per_bucket_numel, per_bucket_numel_unpadded) of a DP group's optimizer:
        ``{gbuf: {dtype pair: [numel per bucket]}}``."""
        return (self.optimizer_object(optimizer, group, "per_bucket_numel")[1],
                self.optimizer_object(optimizer, group, "per_bucket_numel_unpadded")[1])

    def dp_zero_state(self, optimizer, group):
        """``dp_zero_gather_scatter``: ``(item, state)`` -- the legacy coalesced dict of a DP group's
        optimizer (``TensorRef`` values; ``item.array(ref)`` reads one)."""
        item, state = self.optimizer_object(optimizer, group, "param_state")
        if not isinstance(state, dict) or state.get("buckets_coalesced") is not True:
            raise CkptmapError(f"{self.path}: param_state of DP group {group} is not the coalesced distributed-optimizer "
                               f"dict (buckets_coalesced) megatron-core 0.7+ writes")
        return item, state

    def bucket_tensor(self, optimizer, group, gbuf, dtype_pair: str, bucket, state) -> BucketTensor:
        """``dp_reshardable``: the tensor of one bucket's state (refused, named, when missing)."""
        if not hasattr(self, "_bucket_index"):
            self._bucket_index = {(b.optimizer, b.group, b.gbuf, b.dtypes, b.bucket, b.state): b for b in self._buckets}
        b = self._bucket_index.get((optimizer, group, gbuf, dtype_pair, bucket, state))
        if b is None:
            key = self.layout.chained_prefix(optimizer) + self.sharding_type.tensor_key(
                group=group, gbuf=gbuf, dtypes=dtype_pair, bucket=bucket, state=state)
            raise CkptmapError(f"{self.path} has no tensor {key!r}"
                               "; the checkpoint is incomplete or was saved by another layout than its args say")
        return b

    def dp_zero_tensor(self, optimizer, group, gbuf, dtype_pair: str, state) -> tuple[str, int]:
        """``dp_zero_gather_scatter``: (reader key of the coalesced state tensor inside the DP group's
        ``param_state`` object, its ``numel_unpadded``) of buffer ``gbuf``."""
        _, st = self.dp_zero_state(optimizer, group)
        where = f"{self.path}: param_state of DP group {group}"
        buf = st.get(gbuf)
        entry = [v for k, v in buf.items() if str(k) == dtype_pair] if isinstance(buf, dict) else []
        if len(entry) != 1 or not isinstance(entry[0], dict) or state not in entry[0]:
            raise CkptmapError(f"{where} has no {state!r} for buffer {gbuf} {dtype_pair} (it has buffers "
                               f"{[k for k in st if k != 'buckets_coalesced']}); the checkpoint was saved by another "
                               f"layout than its args say, or is incomplete")
        key = td.object_tensor_key(self.optimizer_objects[(optimizer, group, "param_state")],
                                   DP_ZERO_STATE_PATH(gbuf, dtype_pair, state))
        return key, int(entry[0].get("numel_unpadded", -1))

    # --- data ---
    def read_box(self, t: GlobalTensor, box: Box, out: np.ndarray | None = None) -> np.ndarray:
        """The elements of ``box`` of the global tensor (memory: the box, plus one fragment of an
        nd-flattened tensor), in a new array or written into ``out`` (shape ``box.lengths``)."""
        if not t.nd_flattened:
            return self.reader.read_box(t.key, box, out=out)
        if len(box.offsets) != len(t.shape) or any(o < 0 or o + n > s for o, n, s in
                                                   zip(box.offsets, box.lengths, t.shape)):
            raise CkptmapError(f"box {box} is not inside {t.key!r} of global shape {list(t.shape)}")
        frags = t.stored_shape[:-1]
        block = tuple(g // f for g, f in zip(t.shape, frags))
        if out is None:
            out = np.empty(box.lengths, dtype=dtypes.storage(t.dtype))
        lo = [o // b for o, b in zip(box.offsets, block)]
        hi = [-(-(o + n) // b) for o, n, b in zip(box.offsets, box.lengths, block)]
        for idx in itertools.product(*(range(a, b) for a, b in zip(lo, hi))):
            frag = Box(tuple(i * b for i, b in zip(idx, block)), block)
            hit = frag.intersect(box)
            if hit is None:
                continue
            stored = Box(idx + (0,), (1,) * len(idx) + (t.stored_shape[-1],))
            dst = out[tuple(slice(h - o, h - o + n) for h, o, n in zip(hit.offsets, box.offsets, hit.lengths))]
            if hit == frag and dst.flags.c_contiguous:   # the whole fragment: its bytes straight into place
                self.reader.read_box(t.key, stored, out=dst.reshape(stored.lengths))
                continue
            data = self.reader.read_box(t.key, stored).reshape(block)
            dst[...] = data[tuple(slice(h - f, h - f + n) for h, f, n in zip(hit.offsets, frag.offsets, hit.lengths))]
        return out

    def array(self, t: GlobalTensor) -> np.ndarray:
        return self.read_box(t, Box((0,) * len(t.shape), t.shape))

    # --- checks ---
    def shifted_parameters(self) -> tuple[list[GlobalTensor], int]:
        """``fully_reshardable``: the fp32 params that do not round to their saved weights (and how many
        were compared). Weights of other dtypes (fp8) or params of other dtypes (precision-aware
        optimizer) cannot be compared and are skipped."""
        if self.sharding_type is None or self.sharding_type.name != "fully_reshardable":
            return [], 0
        weights = {t.name: t for t in self.tensors("weight")}
        checked, wrong = 0, []
        for p in self.tensors("param"):
            w = weights[p.name]
            if w.dtype not in ("bfloat16", "float16", "float32") or p.dtype != "float32" or w.shape != p.shape:
                continue
            checked += 1
            for box in p.boxes:
                got = ops.cast(self.read_box(p, box), "float32", w.dtype)
                if not np.array_equal(got.view(np.uint8), np.ascontiguousarray(self.read_box(w, box)).view(np.uint8)):
                    wrong.append(p)
                    break
        return wrong, checked

    def check_fully_reshardable(self) -> None:
        """Refuse a ``fully_reshardable`` checkpoint whose optimizer state is shifted (module docstring):
        every fp32 param, rounded to its weight's dtype, must equal the saved weight."""
        wrong, checked = self.shifted_parameters()
        if wrong:
            names = [p.name if p.optimizer is None else f"{p.name} (chained optimizer {p.optimizer})" for p in wrong]
            raise CkptmapError(
                f"{self.path}: refusing this fully_reshardable checkpoint: its optimizer state is shifted. "
                f"{FULLY_RESHARDABLE_BUG}. Here the fp32 params of {len(wrong)} of {checked} parameters do not round "
                f"to their saved weights (first: {', '.join(names[:3])}); Megatron's own load would silently load "
                f"the wrong optimizer state. The state cannot be recovered from this checkpoint: use a save of the "
                f"same run in dp_reshardable (the 0.15+ default) or fully_sharded_model_space, or save again with a "
                f"megatron-core that includes PR 5077. Nothing was converted.")

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fragments(shape, stored_shape) -> tuple[Box, ...]:
    frags = stored_shape[:-1]
    block = tuple(g // f for g, f in zip(shape, frags))
    return tuple(Box(tuple(i * b for i, b in zip(idx, block)), block)
                 for idx in itertools.product(*(range(f) for f in frags)))


def unstack(layout: TorchDistLayout, t: GlobalTensor, transformer_impl: str | None) -> list[tuple[str, dict, Box]]:
    """One ``(item name, {axis: index}, box)`` per stacked item of ``t`` (one per layer, or per layer and
    expert), the box covering that item in the global tensor; ``[(name, {}, whole)]`` if unstacked."""
    s = layout.stacked_key(t.name)
    if s is None:
        return [(t.name, {}, Box((0,) * len(t.shape), t.shape))]
    axes = s.axes
    if len(t.shape) < len(axes):
        raise CkptmapError(f"{t.name}: shape {list(t.shape)} has fewer dimensions than its stacked axes {axes}")
    out = []
    for idx in itertools.product(*(range(n) for n in t.shape[:len(axes)])):
        where = dict(zip(axes, idx))
        box = Box(idx + (0,) * (len(t.shape) - len(axes)), (1,) * len(axes) + t.shape[len(axes):])
        out.append((layout.item_name(t.name, where, transformer_impl), where, box))
    return out


# -------------------------------------------------------------------------------------------------
# Rewrite / upgrade: torch_dist -> torch_dist


@attrs.frozen
class TensorSource:
    """Where an output tensor's chunks come from: the source key read as stored (``global_tensor``
    None), or a global tensor of the source read through :meth:`MegatronDist.read_box`."""

    key: str
    global_tensor: GlobalTensor | None = None
    pieces: tuple = ()   # ShardPiece: a bucket tensor assembled from parameters' TP shards (zeros between)


@attrs.frozen
class ShardPiece:
    """One parameter's TP shard laid into a 1-D bucket tensor: flattened (C order) at ``offset``; the
    shard (``shape``) is assembled from ``boxes`` = ``(GlobalTensor, box of it, offsets in the shard)``."""

    offset: int
    shape: tuple[int, ...]
    boxes: tuple


def assemble_pieces(md: "MegatronDist", pieces, box: Box, dtype: str) -> np.ndarray:
    """Elements ``box`` of a 1-D tensor made of :class:`ShardPiece` (memory: the box and one shard)."""
    lo, n = box.offsets[0], box.lengths[0]
    out = np.zeros(n, dtype=dtypes.storage(dtype))
    for pc in pieces:
        numel = math.prod(pc.shape)
        a, b = max(lo, pc.offset), min(lo + n, pc.offset + numel)
        if a >= b:
            continue
        whole = a == pc.offset and b == pc.offset + numel    # assembled in place, not copied in after
        shard = out[a - lo:b - lo].reshape(pc.shape) if whole else np.zeros(pc.shape, dtype=out.dtype)
        for gt, gbox, local in pc.boxes:
            k = len(gbox.offsets) - len(pc.shape)
            dst = shard[tuple(slice(o, o + m) for o, m in zip(local, gbox.lengths[k:]))]
            if all(m == 1 for m in gbox.lengths[:k]):
                md.read_box(gt, gbox, out=dst[(np.newaxis,) * k])
            else:
                dst[...] = md.read_box(gt, gbox).reshape(gbox.lengths[k:])
        if not whole:
            out[a - lo:b - lo] = shard.reshape(-1)[a - pc.offset:b - pc.offset]
    return out


@attrs.frozen
class RewritePlan:
    """Everything a rewrite writes, decided and checked before anything is written."""

    src: Path
    dst: Path
    source_type: str | None
    target_type: str | None
    tensors: tuple[td.OutTensor, ...]
    sources: tuple[TensorSource, ...]          # one per output tensor
    objects: tuple[td.OutObject, ...]
    order: tuple[str, ...]
    mcore_data: dict | None   # None: the source has no mcore_data attribute (0.15+ saves without one)
    common_edits: tuple[tuple[tuple, object], ...]  # (path in common.pt, new value)
    backend: dict | None
    notes: tuple[str, ...] = ()
    positions: dict = attrs.field(factory=dict)     # (key, chunk offsets | None) -> order within its file
    new_objects: dict = attrs.field(factory=dict)   # object key -> the bytes of an object the source has not

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def files(self) -> dict[str, list]:
        """Output file -> [(kind "tensor" | "object", key, tensor bytes)]."""
        out: dict = {}
        for t in self.tensors:
            for c in t.chunks:
                out.setdefault(c.file, []).append(("tensor", t.key, c.box.numel * dtypes.itemsize(t.dtype)))
        for o in self.objects:
            out.setdefault(o.file, []).append(("object", o.key, 0))
        return out


CONTENT_METADATA_SINCE = "0.15"   # the first megatron-core to write common.pt's content_metadata (and need it)
CONTENT_METADATA_0_16 = {  # what megatron-core 0.16's save writes (checkpointing._build_sharded_state_dict_metadata)
    "distrib_optim_sharding_type": None,
    "distrib_optim_fully_reshardable_mem_efficient": False,
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def plan_rewrite(src, dst, sharding_type: str | None = None, *, check: bool = True) -> RewritePlan:
    """Plan writing the checkpoint folder ``src`` as ``dst``: with ``sharding_type`` None or the
    source's own, the same checkpoint (every item, byte for byte; ``.metadata`` / ``common.pt``
    re-pickled); with ``fully_reshardable`` from ``fully_sharded_model_space``, the upgrade
    (module docstring). Everything is read and checked here; nothing is written."""
    src, dst = Path(src), Path(dst)
    reader = td.TorchDistCheckpoint(src)
    try:
        reader.check_items()
    except BaseException:
        reader.close()
        raise
    with MegatronDist(src, reader) as md:
        source = md.sharding_type.name if md.sharding_type else None
        target = source if sharding_type is None else sharding_type
        known = md.layout.sharding_types
        if target not in known and target is not None:
            raise CkptmapError(f"unknown target sharding type {target!r}; choose one of {', '.join(known)}")
        if check:
            md.check_fully_reshardable()
        if target == source:
            return _plan_same(md, dst)
        if source is None:
            raise CkptmapError(f"{src} holds no optimizer state, so there is nothing to store as {target!r}; leave "
                               f"--sharding-type out to rewrite it")
        if (source, target) == ("fully_sharded_model_space", "fully_reshardable"):
            return _plan_upgrade(md, dst)
        if (source, target) == ("fully_sharded_model_space", "dp_reshardable"):
            # bucket space needs the buffer layout (rules, mapping/buckets.py): planned by the mapping layer
            from ckptmap.mapping.torch_dist_legacy import plan_dp_reshardable
            return plan_dp_reshardable(md, dst)
        why = ("the optimizer state is stored per gradient-buffer bucket; mapping it to parameters needs the "
               "training run's buffer layout (mapping/buckets.py), which this conversion does not derive yet"
               if known[source].space != "model" else
               "ckptmap converts fully_sharded_model_space to fully_reshardable or dp_reshardable (and any type "
               "to itself)")
        raise CkptmapError(f"{src}: cannot convert optimizer sharding type {source!r} to {target!r}: {why}. Nothing "
                           f"was written.")


def _item_order(md: MegatronDist) -> dict:
    """(file, offset) of every item of the source: the order the rewrite keeps within each file."""
    pos = {}
    for t in md.reader.meta.tensors.values():
        for c in t.chunks:
            pos[(t.key, tuple(c.box.offsets))] = (c.file, c.offset)
    for o in md.reader.meta.objects.values():
        pos[(o.key, None)] = (o.file, o.offset)
    return pos


def _plan_same(md: MegatronDist, dst: Path) -> RewritePlan:
    meta = md.reader.meta
    tensors, sources = [], []
    for key, t in meta.tensors.items():
        chunks = t.chunks
        tensors.append(td.OutTensor(key, t.dtype, t.shape, tuple(td.OutChunk(c.box, c.file) for c in chunks)))
        sources.append(TensorSource(key))
    objects = [td.OutObject(o.key, o.file) for o in meta.objects.values()]
    return RewritePlan(md.path, dst, _name(md), _name(md), tuple(tensors), tuple(sources), tuple(objects), meta.order,
                       None if meta.mcore_data is None else dict(meta.mcore_data), (), md.reader.backend,
                       ("same sharding type: every item copied as it is",), _positions(md, tensors, objects, {}))


def _name(md):
    return md.sharding_type.name if md.sharding_type else None


def _positions(md, tensors, objects, origin) -> dict:
    """Where each output item goes within its file: where the source item it comes from was
    (``origin``: (out key, box offsets) -> (source key, offsets) for chunks that are not source
    items themselves), so a rewrite keeps every file's item order."""
    pos = _item_order(md)
    out = {}
    for t in tensors:
        for c in t.chunks:
            item = (t.key, tuple(c.box.offsets))
            out[item] = (0, pos.get(origin.get(item, item), ("", 0))[1], len(out))
    for o in objects:
        out[(o.key, None)] = (0, pos.get((o.key, None), ("", 0))[1], len(out))
    return out


def _plan_upgrade(md: MegatronDist, dst: Path) -> RewritePlan:
    meta = md.reader.meta
    target = md.layout.sharding("fully_reshardable")
    tensors, sources, origin, notes = [], [], {}, []
    new_keys = {}
    for t in md.tensors():
        if t.state == "weight":
            mt = meta.tensors[t.key]
            tensors.append(td.OutTensor(t.key, t.dtype, t.shape, tuple(td.OutChunk(c.box, c.file) for c in mt.chunks)))
            sources.append(TensorSource(t.key))
            continue
        key = target.tensor_key(state=t.state, name=t.name)
        if key in new_keys:
            raise CkptmapError(f"{md.path}: two optimizer tensors ({new_keys[key]!r}, {t.key!r}) become {key!r}")
        new_keys[key] = t.key
        chunks = []
        for box, first in _fragment_sources(t, meta.tensors[t.key].chunks):
            # each fragment goes to the file that held its first piece, where that piece was
            chunks.append(td.OutChunk(box, first.file))
            origin[(key, tuple(box.offsets))] = (first.key, tuple(first.box.offsets))
        tensors.append(td.OutTensor(key, t.dtype, t.shape, tuple(chunks)))
        sources.append(TensorSource(t.key, t))
    renamed = {gt.key: target.tensor_key(state=gt.state, name=gt.name) for gt in md.tensors() if gt.state != "weight"}
    order = [renamed.get(key, key) for key in meta.order]
    objects = [td.OutObject(o.key, o.file) for o in meta.objects.values()]
    mcore = {k: v for k, v in (meta.mcore_data or {}).items() if k not in renamed}
    content = md.common.get("content_metadata")
    if isinstance(content, dict):  # a 0.15+ save: keep what it says, change the type (prefixes are dropped)
        content = dict(content, distrib_optim_sharding_type=target.name, chained_optim_avoid_prefix=True)
        content.setdefault("distrib_optim_fully_reshardable_mem_efficient", False)
    else:
        content = dict(CONTENT_METADATA_0_16, distrib_optim_sharding_type=target.name)
    edits = [(("content_metadata",), content)]
    opt = md.common.get("optimizer")
    if isinstance(opt, dict) and "param_state_sharding_type" in opt:
        edits.append((("optimizer", "param_state_sharding_type"), target.name))
    elif isinstance(opt, dict):
        edits += [(("optimizer", k, "param_state_sharding_type"), target.name) for k in opt]
    elif isinstance(opt, list):
        edits += [(("optimizer", i, "param_state_sharding_type"), target.name) for i in range(len(opt))]
    chained = sorted({gt.optimizer for gt in md.tensors() if gt.optimizer is not None})
    if chained:
        notes.append(f"chained optimizer prefixes {', '.join(md.layout.chained_prefix(i) for i in chained)} dropped "
                     f"(content_metadata chained_optim_avoid_prefix, as megatron-core 0.15+ saves fully_reshardable)")
    notes.append("fp32_param -> param, nd-flattened optimizer tensors stored at their parameters' global shapes "
                 "(one chunk per fragment)")
    return RewritePlan(md.path, dst, "fully_sharded_model_space", target.name, tuple(tensors), tuple(sources),
                       tuple(objects), tuple(order), mcore, tuple(edits), md.reader.backend, tuple(notes),
                       _positions(md, tensors, objects, origin))


def _fragment_sources(t: GlobalTensor, stored) -> list:
    """``(box, first stored chunk of it)`` for every box of ``t``: a plain tensor's boxes are its chunks;
    an nd-flattened tensor's fragment ``idx`` is stored as the chunks at ``idx + (start,)``."""
    if not t.nd_flattened:
        return [(c.box, c) for c in stored]
    first: dict = {}
    for c in stored:
        idx = tuple(c.box.offsets[:-1])
        if idx not in first or c.box.offsets[-1] < first[idx].box.offsets[-1]:
            first[idx] = c
    block = tuple(g // f for g, f in zip(t.shape, t.stored_shape[:-1]))
    return [(box, first[tuple(o // b for o, b in zip(box.offsets, block))]) for box in t.boxes]


def _apply_edits(common, edits):
    for path, value in edits:
        node = common
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = copy.deepcopy(value)
    return common


def write_rewrite(plan: RewritePlan, *, fsync: bool = False, progress=None) -> None:
    """Write a :class:`RewritePlan` (streaming: one chunk in memory at a time)."""
    with MegatronDist(plan.src) as md:
        if (md.sharding_type.name if md.sharding_type else None) != plan.source_type:
            raise CkptmapError(f"{plan.src} changed since it was planned; plan again")
        by_key = {t.key: s for t, s in zip(plan.tensors, plan.sources)}
        dtype_of = {t.key: t.dtype for t in plan.tensors}

        def read_box(key, box):
            s = by_key[key]
            if s.pieces:
                return assemble_pieces(md, s.pieces, box, dtype_of[key])
            if s.global_tensor is None:
                return md.reader.read_box(s.key, box)
            return md.read_box(s.global_tensor, box)

        def read_object(key):
            if key in plan.new_objects:
                return plan.new_objects[key]
            return md.reader.object_bytes(key)

        common_file = md.reader.common()
        common = _apply_edits(td.tzr.read_objects(common_file.path), plan.common_edits)

        def common_fill(storage_key):
            yield common_file.storage_bytes(storage_key)

        td.write_checkpoint(plan.dst, list(plan.tensors), list(plan.objects), read_box=read_box,
                            read_object=read_object, common=common, common_fill=common_fill, order=plan.order,
                            mcore_data=plan.mcore_data, backend=plan.backend, positions=plan.positions or None,
                            fsync=fsync, progress=progress)


# -------------------------------------------------------------------------------------------------
# Folders: a training run's --save folder or one iter_* folder


TRACKER = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"iter_\d{7}|release")


@attrs.frozen
class FolderPlan:
    src: Path
    dst: Path
    iterations: tuple[RewritePlan, ...]
    tracker: str | None       # the tracker file's text, copied last (a run folder)
    skipped: tuple[str, ...]


def plan_folder(src, dst, sharding_type: str | None = None) -> FolderPlan:
    """Plan :func:`plan_rewrite` for one ``iter_*`` folder, or for every ``iter_*`` / ``release`` folder
    of a run's ``--save`` folder (its tracker copied). All iterations are read and checked first."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CkptmapError(f"--src {src} does not exist")
    if td.is_torch_dist_dir(src):
        if dst.exists():
            raise CkptmapError(f"--dst {dst} already exists; ckptmap never writes into an existing checkpoint folder")
        return FolderPlan(src, dst, (plan_rewrite(src, dst, sharding_type),), None, ())
    if not src.is_dir():
        raise CkptmapError(f"--src {src} is a file; give a torch_dist iter_* folder or the run's --save folder")
    iters = sorted(p for p in src.iterdir() if p.is_dir() and _ITER.fullmatch(p.name))
    if not iters:
        raise CkptmapError(f"--src {src} is neither a torch_dist checkpoint folder (no .metadata) nor a --save folder "
                           f"with iter_* folders")
    not_dist = [p.name for p in iters if not td.is_torch_dist_dir(p)]
    if not_dist:
        raise CkptmapError(f"{src}: {', '.join(not_dist)} {'is' if len(not_dist) == 1 else 'are'} not torch_dist "
                           f"checkpoints (no .metadata; legacy mp_rank_* folders?); convert torch_dist runs only")
    plans = []
    for p in iters:
        out = dst / p.name
        if out.exists():
            raise CkptmapError(f"{out} already exists; ckptmap never writes into an existing checkpoint folder")
        plans.append(plan_rewrite(p, out, sharding_type))
    tracker = (src / TRACKER).read_text() if (src / TRACKER).is_file() else None
    skipped = tuple(sorted(p.name for p in src.iterdir() if p not in iters and p.name != TRACKER))
    return FolderPlan(src, dst, tuple(plans), tracker, skipped)


def write_folder(plan: FolderPlan, *, fsync: bool = False, progress=None) -> None:
    for it in plan.iterations:
        write_rewrite(it, fsync=fsync, progress=progress)
    if plan.tracker is not None:
        plan.dst.mkdir(parents=True, exist_ok=True)
        atomic.write_text(plan.dst / TRACKER, plan.tracker, fsync=fsync)

