"""torch_dist -> legacy Megatron files (``ckptmap convert --from torch_dist --to torch``): a Megatron
``torch_dist`` checkpoint written as ``iter_*/mp_rank_*/model_optim_rng.pt`` + ``distrib_optim.pt`` (what
Megatron-LM's ``--ckpt-format torch``, MindSpeed-LLM and ``ckptmap pt2ms`` load), weights and the
distributed optimizer's state, at any TP / PP / VPP / DP layout (default: the saving run's, from the
args in ``common.pt``) and in any Megatron version's bucket layout (``--target-megatron-version``).

torch_dist already holds every parameter as a *global* tensor (``formats/megatron_dist.py``), so this is
resharding (``reshard.py``) with a simpler source: a target shard is boxes of one global tensor (a
stacked layer of it; fragments of an nd-flattened optimizer tensor), each a plan ``Read`` the executor
serves from the chunks under it. Legacy names come from the rules (``megatron_core_gpt``) after the
sharded-key renames of ``megatron_dist.SHARDED_KEY_MAPS``; the order of parameters in state dicts and
DDP buffers -- which torch_dist does not record -- is the rules' order (listed in Megatron's
registration order). ``common.pt`` gives every non-model entry of the model file; the rank's RNG and
rerun-machine ShardedObjects come from the source rank at the same (tp, pp) modulo the source sizes.

Supported optimizer sharding types: all four. Model space (``fully_sharded_model_space``,
``fully_reshardable``): each state is a global tensor, read like the weights. Bucket space
(``dp_reshardable``: one tensor per bucket; ``dp_zero_gather_scatter``: the legacy coalesced dict per DP
group, in a byte object): the saving run's DDP buffers are rebuilt at its own sizes (its args) with the
rules' ``buckets megatron`` blocks, kept only where they reproduce the bucket sizes the checkpoint records,
and each parameter's state is read as the ranges of its source TP shards (:class:`BucketState`).

MoE (expert parallelism; SequentialMLP experts, expert TP = TP), every sharding type, at the saving TP (PP /
VPP / DP / EP may change: DP a multiple of EP, EP a divisor of the experts; ``--target-tp-size`` is refused --
megatron-core needs sequence parallelism for TP > 1 with EP, which the real-library tests cannot run: reshard
the legacy result). Each expert rank's folder gets the dense parameters and its experts from the global
expert axis, renumbered local; the ChainedOptimizer ``[dense, expert]`` as Megatron's legacy save writes it
(dense buffers in expert rank 0's distrib_optim.pt only, expert buffers over the expert-data-parallel group
in each; the model file's ``optimizer`` a list). Where the target version keeps experts in the dense
optimizer (EP 1, per the rules' buckets blocks) both optimizers' state is written as one, with the dense
one's param groups. Bucket space: the expert optimizer's objects and tensors are ``chained_1.…dp_group_idx_N``,
N the rank's expert-model-parallel rank; the offline ``dp_reshardable`` upgrade writes them the same way.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import attrs
import numpy as np

from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_dist as M
from ckptmap.formats import megatron_folders, param_map
from ckptmap.formats import torch_dist as td
from ckptmap.mapping import buckets, param_groups
from ckptmap.mapping.layout import ParallelLayout
from ckptmap.mapping.megatron_source import planning
from ckptmap.mapping.plan import FileTask, Plan, Read, SourceSlice, StoragePiece, StorageTask, TensorTask
from ckptmap.mapping.reshard import (IndexNames, _build_target_buffer, _chunk_keys, _ddp_name, _state_storage,
                                     byte_copy_pieces, resolve_sharding)
from ckptmap.mapping.rules import EXPERT, LAYER, resolve_rules, version_key
from ckptmap.mapping.sharding import Box, Fragment, Sharding, padded_vocab_size, transfer, whole

STATES = ("param", "exp_avg", "exp_avg_sq")
DEFAULT_RULES = "megatron_core_gpt"


@attrs.frozen
class DistToLegacyOptions:
    src: str
    dst: str
    target_tp_size: int | None = None
    target_pp_size: int | None = None
    target_vpp_size: int | None = None
    target_dp_size: int | None = None
    target_ep_size: int | None = None
    target_megatron_version: str | None = None
    convert_param_only: bool = False
    rules: str = DEFAULT_RULES


@attrs.define
class DistParam:
    """One parameter: legacy name (global layer numbers), rule and bindings, sharding, global shape,
    dtype, registration-order key, and per state (``weight``, ``param``, ``exp_avg``, ``exp_avg_sq``)
    the global tensor holding it with the stacked index (layer[, expert]) of this parameter in it."""

    key: str
    rule: object
    bindings: dict
    sharding: Sharding
    shape: tuple
    dtype: str
    order: tuple
    sources: dict
    layer: int | None
    expert: int | None = None   # global expert id


def iteration_dir(src) -> tuple[Path, str]:
    """(torch_dist iter folder, its iteration as the tracker spells it) of an iter folder or a --save folder."""
    src = Path(src)
    if not src.exists():
        raise CkptmapError(f"--src {src} does not exist")
    if td.is_torch_dist_dir(src):
        m = re.fullmatch(r"iter_(\d+)", src.name)
        return src, (str(int(m.group(1))) if m else src.name)
    tracker = src / megatron_folders.TRACKER
    if not tracker.is_file():
        raise CkptmapError(f"--src {src} is neither a torch_dist checkpoint folder (no .metadata) nor a --save folder "
                           f"with {megatron_folders.TRACKER}")
    iteration = megatron_folders.read_tracker(src)   # damaged trackers are named there
    text = str(iteration)
    it = src / ("release" if iteration == "release" else megatron_folders.iter_dir_name(iteration))
    if not td.is_torch_dist_dir(it):
        raise CkptmapError(f"{tracker} names iteration {text!r}, but {it} is not a torch_dist checkpoint folder "
                           f"(no .metadata); point --src at the iter_* folder you mean")
    return it, text


def is_torch_dist_source(path) -> bool:
    """Whether ``path`` is a torch_dist iter folder or a --save folder whose tracker names one."""
    try:
        iteration_dir(path)
        return True
    except CkptmapError:
        return False


def _arg(args, name, default=None):
    value = getattr(args, name, None)
    return default if value is None else value


def _source_layout(args) -> ParallelLayout:
    return ParallelLayout(tp=_arg(args, "tensor_model_parallel_size", 1), pp=_arg(args, "pipeline_model_parallel_size", 1),
                          dp=_arg(args, "data_parallel_size", 1), cp=_arg(args, "context_parallel_size", 1),
                          ep=_arg(args, "expert_model_parallel_size", 1),
                          vpp=_arg(args, "virtual_pipeline_model_parallel_size", 1), num_layers=args.num_layers)


def _check_moe(md, args) -> None:
    """MoE layouts this conversion writes: SequentialMLP experts, expert TP = TP."""
    if getattr(args, "moe_grouped_gemm", False):
        raise CkptmapError(f"{md.path}: args.moe_grouped_gemm is set (GroupedMLP experts); torch_dist -> torch handles "
                           f"SequentialMLP experts (local_experts.N) only. Nothing was written.")
    tp, etp = _arg(args, "tensor_model_parallel_size", 1), _arg(args, "expert_tensor_parallel_size", None)
    if etp is not None and etp != tp:
        raise CkptmapError(f"{md.path}: args.expert_tensor_parallel_size is {etp} but tensor_model_parallel_size is "
                           f"{tp}; torch_dist -> torch handles MoE with expert TP = TP only. Nothing was written.")


def _choice_order(rule, bindings) -> tuple:
    return tuple(seg.choices.index(bindings[seg.name]) for seg in rule.megatron.segments if seg.kind == "choice")


def _stack_start(idx: tuple, stack_shape: tuple, n: int) -> int:
    return int(np.ravel_multi_index(idx, stack_shape)) * n if idx else 0


def _reads(iter_dir: str, gt: M.GlobalTensor, idx: tuple, box: Box, dst: tuple) -> list[Read]:
    """Reads of ``box`` of one stacked item (``idx``) of ``gt`` to ``dst`` of a target shard: one read of a
    plain tensor (the item viewed alone), one per fragment of an nd-flattened one."""
    k = len(idx)
    item = gt.shape[k:]
    if not gt.nd_flattened:
        n = math.prod(item)
        sl = SourceSlice(iter_dir, gt.key, gt.dtype, gt.stored_shape, _stack_start(idx, gt.shape[:k], n),
                         n if k else None)
        return [Read(sl, item, box.offsets, box.lengths, dst)]
    frags, numel = gt.stored_shape[:-1], gt.stored_shape[-1]
    block = tuple(g // f for g, f in zip(gt.shape, frags))
    if any(b != 1 for b in block[:k]):
        raise CkptmapError(f"{gt.key}: fragments {list(frags)} span several stacked items; not a layout megatron-core "
                           f"writes")
    want = Box(idx + tuple(box.offsets), (1,) * k + tuple(box.lengths))
    lo = [o // b for o, b in zip(want.offsets, block)]
    hi = [-(-(o + n) // b) for o, n, b in zip(want.offsets, want.lengths, block)]
    out = []
    for fi in itertools.product(*(range(a, b) for a, b in zip(lo, hi))):
        frag = Box(tuple(i * b for i, b in zip(fi, block)), block)
        hit = frag.intersect(want)
        if hit is None:
            continue
        sl = SourceSlice(iter_dir, gt.key, gt.dtype, gt.stored_shape, int(np.ravel_multi_index(fi, frags)) * numel, numel)
        src_off = tuple(h - f for h, f in zip(hit.offsets, frag.offsets))[k:]
        to = tuple(d + h - w for d, h, w in zip(dst, hit.offsets[k:], want.offsets[k:]))
        out.append(Read(sl, block[k:], src_off, hit.lengths[k:], to))
    return out


@attrs.frozen
class BucketState:
    """One optimizer state of a parameter in a bucket-space source (``dp_reshardable``,
    ``dp_zero_gather_scatter``): per source TP rank, its TP-local shard flattened -- a 1-D element range of
    a bucket tensor, or of a coalesced buffer inside a byte object -- where the saving run's buffer
    layout put it."""

    tp: int
    shards: tuple  # SourceSlice per source TP rank


def chunk_copies(task: TensorTask, reader) -> list[tuple[int, TensorTask]]:
    """``task`` as storage pieces: byte copies of saved chunks (``reshard.byte_copy_pieces``) where every
    read of the task is runs of consecutive elements of saved chunks (``TorchDistCheckpoint.chunk_runs``: a
    stacked layer's TP fragment, the DP ranges of an nd-flattened fragment, a parameter's range of a bucket,
    each half of a SwiGLU shard), served by the reader under chunk keys; otherwise ``[(0, task)]``."""
    if reader is None:
        return [(0, task)]

    def runs_of(r: Read):
        runs = reader.chunk_runs(r.source.key, r.source.start, r.source.numel, r.view, r.offsets, r.lengths)
        if runs is None:
            return None
        return [SourceSlice(r.source.file, key, r.source.dtype, shape, first,
                            None if first == 0 and count == math.prod(shape) else count)
                for key, shape, first, count in runs]

    return byte_copy_pieces(task, runs_of)


def _bucket_shard_task(p: DistParam, state: str, src: BucketState, tgt_tp: int, tp: int, name: str) -> TensorTask:
    where = f"{p.key} ({p.rule.loc})"
    shard_shape = p.sharding.shard_shape(p.shape, tgt_tp, where)
    dtype = src.shards[0].dtype
    if dtype != "float32":
        raise CkptmapError(f"{src.shards[0].key} is {dtype}; legacy distrib_optim.pt holds float32 optimizer state "
                           f"and ckptmap never casts silently")
    view = p.sharding.shard_shape(p.shape, src.tp, where)
    pieces, missing = transfer(p.sharding.fragments(p.shape, tgt_tp, tp, where),
                               [p.sharding.fragments(p.shape, src.tp, t, where) for t in range(src.tp)])
    if missing:
        raise CkptmapError(f"internal error: {where} tp {tp}/{tgt_tp} not covered by the source's TP shards")
    reads = tuple(Read(src.shards[pc.source], view, pc.src_box.offsets, pc.src_box.lengths, pc.dst_offsets)
                  for pc in pieces)
    return TensorTask(name, dtype, shard_shape, (), dtype, shard_shape, (),
                      note=f"{src.shards[0].key} · tp {tp}/{tgt_tp}", reads=reads)


def shard_task(p: DistParam, state: str, tgt_tp: int, tp: int, name: str, iter_dir: str) -> TensorTask:
    """Target TP rank ``tp``'s shard of ``p``'s weight or optimizer ``state``."""
    where = f"{p.key} ({p.rule.loc})"
    if isinstance(p.sources.get(state), BucketState):
        return _bucket_shard_task(p, state, p.sources[state], tgt_tp, tp, name)
    shard_shape = p.sharding.shard_shape(p.shape, tgt_tp, where)
    gt, idx = p.sources[state]
    if state != "weight" and gt.dtype != "float32":
        raise CkptmapError(f"{gt.key} is {gt.dtype}; legacy distrib_optim.pt holds float32 optimizer state and ckptmap "
                           f"never casts silently")
    pieces, missing = transfer(p.sharding.fragments(p.shape, tgt_tp, tp, where),
                               [[Fragment(whole(p.shape), (0,) * len(p.shape))]])
    if missing:
        raise CkptmapError(f"internal error: {where} tp {tp}/{tgt_tp} not covered by its global tensor")
    reads = [r for pc in pieces for r in _reads(iter_dir, gt, idx, pc.src_box, pc.dst_offsets)]
    return TensorTask(name, gt.dtype, shard_shape, (), gt.dtype, shard_shape, (),
                      note=f"{gt.key}{list(idx) if idx else ''} · tp {tp}/{tgt_tp}", reads=tuple(reads))


# -------------------------------------------------------------------------------------------------


class DistModel:
    """The torch_dist checkpoint seen as legacy parameters (global layer numbers) in registration order."""

    def __init__(self, md: M.MegatronDist, rules, convert_param_only: bool):
        self.md, self.rules = md, rules
        args = md.common.get("args")
        if args is None or not hasattr(args, "num_layers"):
            raise CkptmapError(f"{md.path}/common.pt has no Megatron args (num_layers, sizes); ckptmap needs them to "
                               f"lay the legacy files out")
        self.args = args
        self.num_experts = int(_arg(args, "num_experts", 0))
        if self.num_experts:
            _check_moe(md, args)
        common_opt = md.common.get("optimizer")
        # a ChainedOptimizer's state in common.pt: {0: dense, 1: expert}
        self.chained = isinstance(common_opt, dict) and any(isinstance(k, int) for k in common_opt)
        if md.sharding_type is not None and self.chained != bool(self.num_experts):
            found = f"a ChainedOptimizer (keys {list(common_opt)})" if self.chained else "a single optimizer"
            raise CkptmapError(
                f"{md.path}/common.pt: the optimizer is {found} but the model has {self.num_experts or 'no'} experts; "
                f"torch_dist -> torch handles a dense model with one optimizer and an MoE model with [dense, expert] "
                f"chained optimizers. Nothing was written.")
        if self.chained and sorted(common_opt, key=str) != [0, 1]:
            raise CkptmapError(f"{md.path}/common.pt: a ChainedOptimizer of {len(common_opt)} optimizers (keys "
                               f"{list(common_opt)}); torch_dist -> torch handles [dense, expert] (keys 0, 1). "
                               f"Nothing was written.")
        st = md.sharding_type
        if not convert_param_only and st is None:
            raise CkptmapError(f"{md.path} holds no optimizer state; pass --convert-param-only to convert the weights")
        self.impl = getattr(args, "transformer_impl", None)
        env = {k: v for k, v in vars(args).items() if isinstance(v, (int, bool))}
        for flag in ("swiglu", "untie_embeddings_and_output_weights", "group_query_attention"):
            env[flag] = bool(getattr(args, flag, False))
        self.env = env
        self.layout = _source_layout(args)
        first_layer = next((i for i, r in enumerate(rules.params)
                            if any(s.kind == LAYER for s in r.megatron.segments)), len(rules.params))
        # Megatron registers each local expert's modules together (expert 0's fc1, fc2, then expert 1's)
        first_expert = next((i for i, r in enumerate(rules.params)
                             if any(s.kind == EXPERT for s in r.megatron.segments)), len(rules.params))
        self.names = IndexNames(rules)
        states = {(t.name, t.state): t for t in md.tensors() if t.state != "weight"}
        self.params: dict[str, DistParam] = {}
        unmatched = []
        for t in md.tensors("weight"):
            for name, where, box in M.unstack(md.layout, t, self.impl):
                hits = [(i, r, b) for i, r in enumerate(rules.params) if (b := r.megatron.match(name)) is not None]
                if not hits:
                    unmatched.append(name)
                    continue
                if len(hits) > 1:
                    raise CkptmapError(f"{md.path}: {name} matches {len(hits)} rules of {rules.path}; make them disjoint")
                i, rule, b = hits[0]
                idx = tuple(box.offsets[:len(where)])
                layer, expert = b.get(LAYER), b.get(EXPERT)
                section = 1 if layer is not None else (0 if i < first_layer else 2)
                order = (i, 0) if expert is None else (first_expert, int(expert))
                sources = {"weight": (t, idx)}
                for state in STATES:
                    g = states.get((t.name, state))
                    if g is not None:
                        sources[state] = (g, idx)
                    elif not convert_param_only and st.space == "model":   # bucket space: _bucket_sources
                        raise CkptmapError(f"{md.path}: no {state} optimizer state for {t.name!r}; the checkpoint is "
                                           f"incomplete (or pass --convert-param-only)")
                self.params[name] = DistParam(name, rule, b, resolve_sharding(rule, env, name),
                                              tuple(t.shape[len(where):]), t.dtype,
                                              (section, layer or 0, *order, i, _choice_order(rule, b)), sources,
                                              layer, None if expert is None else int(expert))
        if unmatched:
            raise CkptmapError(f"{md.path}: no rule of {rules.path} describes {len(unmatched)} tensors (first: "
                               f"{', '.join(unmatched[:5])}); pass --rules with a .rules file for this model")
        self.tied = not env["untie_embeddings_and_output_weights"] and any(
            p.rule.shared_embedding for p in self.params.values())
        self.extra = self._extra_states()

    def _extra_states(self) -> dict[str, str]:
        """Legacy name (global layers) -> object key of every saved ``_extra_state``."""
        out = {}
        for key in self.md.other_objects:
            o = self.md.reader.meta.objects[key]
            name, _, shard = key.rpartition("/shard_")
            if not name.endswith("._extra_state"):
                continue
            offsets = tuple(int(x) for x in shard.split("_")[0].split(".") if x != "")
            out[M.unstack_object(self.md.layout, o.name if o.name else name, offsets, self.impl)] = key
        return out

    def output_copy(self) -> DistParam | None:
        """Tied embeddings: the last stage's copy of the word embeddings (the rules' other
        ``shared_embedding`` parameter), made from the embedding's global tensors."""
        emb = next(p for p in self.params.values() if p.rule.shared_embedding)
        rules = [r for r in self.rules.params if r.shared_embedding and r is not emb.rule
                 and all(s.kind == "literal" for s in r.megatron.segments)]
        if len(rules) != 1:
            raise CkptmapError(f"tied embeddings on several pipeline stages need the name of the last stage's copy: "
                               f"the rules ({self.rules.path}) must mark exactly one other plain parameter "
                               f"`shared_embedding`")
        rule = rules[0]
        i = self.rules.params.index(rule)
        return DistParam(str(rule.megatron), rule, {}, emb.sharding, emb.shape, emb.dtype, (2, 0, i, 0, i, ()),
                         emb.sources, None)


def _local_name(p: DistParam, local: int | None, local_expert: int | None = None) -> str:
    b = dict(p.bindings)
    if local is not None:
        b[LAYER] = local
    if local_expert is not None:
        b[EXPERT] = local_expert
    return p.rule.megatron.format(b)


def _extra_local(name: str, global_layer: int | None, local: int | None) -> str:
    if global_layer is None:
        return name
    return re.sub(rf"(^|\.)layers\.{global_layer}\.", lambda m: f"{m.group(1)}layers.{local}.", name, count=1)


def _with_extra(model: DistModel, rows: list, extras: list) -> list:
    """Insert ``_extra_state`` rows after the last parameter of their module (else at the end)."""
    for ename, leaf in extras:
        prefix = ename[:-len("_extra_state")]
        at = max((i for i, r in enumerate(rows) if r["path"][0].startswith(prefix)), default=len(rows) - 1) + 1
        rows.insert(at, dict(leaf, path=[ename]))
    return rows


def _chunk(model: DistModel, tgt: ParallelLayout, pp: int, v: int, output_copy, ep: int = 0) -> list[tuple]:
    """[(legacy local name, DistParam, [(extra-state local name, leaf)])] of target chunk (pp, v) of expert
    rank ``ep``, in registration order, grouped by layer / edge section (experts renumbered local)."""
    first, last = (pp, v) == (0, 0), (pp, v) == (tgt.pp - 1, tgt.vpp - 1)

    def local_expert(e):   # None: not this expert rank's
        where, local = tgt.locate_expert(e, model.num_experts)
        return local if where == ep else None

    by_section: dict = {}
    for p in model.params.values():
        if p.expert is not None and local_expert(p.expert) is None:
            continue
        by_section.setdefault((p.order[0], p.layer), []).append(p)
    groups = []
    if first:
        groups.append((sorted(by_section.get((0, None), []), key=lambda p: p.order), None, None))
    for local, g in enumerate(tgt.megatron_layers(pp, v)):
        groups.append((sorted(by_section.get((1, g), []), key=lambda p: p.order), g, local))
    if last:
        post = list(by_section.get((2, None), []))
        if output_copy is not None:
            post.append(output_copy)
        groups.append((sorted(post, key=lambda p: p.order), None, None))
    out = []
    for params, g, local in groups:
        names = [(_local_name(p, local, None if p.expert is None else local_expert(p.expert)), p) for p in params]
        extras = []
        for n, key in model.extra.items():
            if not ((g is not None and re.search(rf"(^|\.)layers\.{g}\.", n)) or
                    (g is None and any(n.startswith(p.key.rsplit(".", 1)[0] + ".") for p in params))):
                continue
            hit = model.names.find(EXPERT, n)
            if hit is not None:
                le = local_expert(hit[0])
                if le is None:
                    continue
                n = model.names.renumber([n], EXPERT, le)[0]
            extras.append((_extra_local(n, g, local), {"object": key}))
        if model.extra:   # Megatron drops these from torch_dist saves; empty in the legacy file
            extras += [(n, {"none": True}) for n in model.md.layout.dropped_extra_states if n not in model.extra
                       and any(name.startswith(n[:-len("_extra_state")]) for name, _ in names)]
        out.append((names, extras))
    return out


def _layout_values(args, tgt: ParallelLayout, pp: int, v: int, expert: bool = False) -> dict:
    values = {k: x for k, x in vars(args).items() if isinstance(x, (int, bool))}
    # expert buffers are sharded over the expert-data-parallel group (DP x CP / EP)
    dp_group = tgt.dp * tgt.cp // (tgt.ep if expert else 1)
    values.update(dp=tgt.dp, cp=tgt.cp, ep=tgt.ep, dp_group=dp_group, pp=tgt.pp, pp_rank=pp, chunk=v,
                  bucket_size=getattr(args, "ddp_bucket_size", None),
                  overlap_grad_reduce=bool(getattr(args, "overlap_grad_reduce", False)),
                  untie_embeddings_and_output_weights=bool(getattr(args, "untie_embeddings_and_output_weights", False)))
    return values


def _blocks(model: DistModel, version: str | None) -> list:
    if version:
        block = model.rules.bucket_layout("megatron", version)
        if block.storage != "coalesced":
            raise CkptmapError(f"--target-megatron-version {version}: its distrib_optim.pt stores buckets "
                               f"{block.storage.replace('_', ' ')}; torch_dist -> torch writes megatron-core 0.7+ files")
        return [block]
    # which megatron-core saved it: 0.15+ writes content_metadata, 0.8 - 0.14 does not; every version
    # from there on is a candidate (they must agree on the target's layout, else the version is asked for)
    since = version_key(M.CONTENT_METADATA_SINCE if isinstance(model.md.common.get("content_metadata"), dict)
                        else "0.8")
    return [b for b in model.rules.bucket_layouts("megatron") if b.storage == "coalesced" and
            (b.versions is None or version_key(b.versions[1]) >= since)]


def _merges_experts(model: DistModel, tgt: ParallelLayout, blocks: list) -> bool:
    """Whether the target keeps the experts in the dense optimizer (no ChainedOptimizer: megatron-core at EP 1,
    whose experts all-reduce like dense parameters), per the rules' buckets blocks of the target versions."""
    separate = {b.separate_experts(_layout_values(model.args, tgt, 0, 0)) for b in blocks}
    if len(separate) > 1:
        raise CkptmapError(f"{model.md.path}: at {tgt.describe()} the candidate megatron-core versions "
                           f"({' / '.join(b.label for b in blocks)}) differ in whether experts get an optimizer of "
                           f"their own; pass --target-megatron-version. Nothing was written.")
    return separate == {False}


def _param_group_order(common_opt, names_shapes, policies=()) -> tuple[list | None, str | None]:
    """common.pt holds rank 0's optimizer param groups; each target rank gets them in the order its
    Megatron builds them (``param_groups.group_order``, per the target versions' ``policies``)."""
    groups = (common_opt or {}).get("optimizer", {}).get("param_groups") if isinstance(common_opt, dict) else None
    params = [param_groups.GroupParam(n, tuple(shape), emb) for n, shape, emb in names_shapes]
    return param_groups.group_order(list(policies), groups, params, "common.pt")


def _object_for(md: M.MegatronDist, name: str, tp: int, pp: int, src: ParallelLayout, ep: int = 0) -> str | None:
    """The ``rng_state`` / ``rerun_state_machine_state`` ShardedObject of source rank (tp, pp[, ep]) mod the source
    sizes. Objects sharded over DP too (``shard_<pp>.<tp>.<dp>``, megatron-core with expert parallelism): the
    one of the rank that writes the legacy folder (expert-data-parallel rank 0 of that expert rank)."""
    want = (pp % src.pp, tp % src.tp)
    writer = src.mp_rank_ranks(want[1], want[0], all_dp_cp=False, ep=ep % src.ep)[0]
    dp = src.coords(writer)["dp"]
    for key in md.other_objects:
        base, _, shard = key.rpartition("/shard_")
        if base != name:
            continue
        offsets = tuple(int(x) for x in shard.split("_")[0].split("."))
        rest = offsets[2:]
        # not sharded over DP (0.12, or no EP): the (pp, tp) object, data-parallel rank 0's
        if offsets[:2] == want and (not any(rest) if dp == 0 or not rest else rest == (dp,) + (0,) * (len(rest) - 1)):
            return key
    return None


@planning
def compile_torch_dist_to_legacy(opt: DistToLegacyOptions) -> Plan:
    iter_dir, iteration = iteration_dir(opt.src)
    rules = resolve_rules(opt.rules)
    reader = td.TorchDistCheckpoint(iter_dir)
    try:
        reader.check_items()
    except BaseException:
        reader.close()
        raise
    with M.MegatronDist(iter_dir, reader, rules.torch_dist_layout()) as md:
        md.check_fully_reshardable()
        return _compile(md, rules, opt, str(iter_dir), iteration)


def _source_buffer(md: M.MegatronDist, blocks: list, entries: list, values: dict, where: str, group: int, gbuf: int,
                   pair: str, optimizer: int | None = None) -> buckets.BufferLayout:
    """The saving run's layout of one of its DDP buffers: the candidate versions' ``buckets megatron``
    blocks at the source sizes, kept when they reproduce what the checkpoint records (dp_reshardable: every
    bucket's padded and unpadded size; dp_zero_gather_scatter: the buffer's unpadded size)."""
    if md.sharding_type.name == "dp_reshardable":
        padded, unpadded = md.per_bucket_numel(optimizer, group)

        def sizes(per_gbuf):
            d = per_gbuf[gbuf] if isinstance(per_gbuf, (list, tuple)) and gbuf < len(per_gbuf) else {}
            hit = [v for k, v in d.items() if str(k) == pair] if isinstance(d, dict) else []
            return list(hit[0]) if len(hit) == 1 else None
        want = (sizes(padded), sizes(unpadded))
        got_of = lambda bl: (bl.per_bucket_numel, bl.per_bucket_numel_unpadded)   # noqa: E731
        what = "per-bucket sizes (padded, unpadded)"
    else:
        want = md.dp_zero_tensor(optimizer, group, gbuf, pair, "param")[1]
        got_of = lambda bl: bl.numel_unpadded   # noqa: E731
        what = "unpadded buffer size"
    fits, seen = [], []
    for block in blocks:
        try:
            bl = buckets.build_buffer(block, entries, buckets.layout_env(block, values))
        except buckets.UnfaithfulLayout as e:
            seen.append(f"{block.label}: {e}")
            continue
        if got_of(bl) == want:
            fits.append(bl)
        else:
            seen.append(f"{block.label}: {got_of(bl)}")
    if not fits:
        raise CkptmapError(
            f"{where}: the checkpoint records the {what} {want}, but laying out this buffer's {len(entries)} "
            f"parameters as the saving megatron-core would gives {'; '.join(seen)}; the args in common.pt "
            f"(sizes, ddp_bucket_size, model) do not describe the run that saved it, or the rules' buckets blocks "
            f"miss its version. Nothing was written.")
    if any(not buckets.same_slots(fits[0], bl) for bl in fits[1:]):
        raise CkptmapError(f"{where}: several megatron-core versions' bucket layouts fit the checkpoint's {what} but "
                           f"place the parameters differently; ckptmap cannot tell where each parameter's optimizer "
                           f"state is. Nothing was written.")
    return fits[0]


def _chunk_buffers(model, s: ParallelLayout, pp: int, v: int, output_copy, ep: int = 0, expert: bool | None = None):
    """The DDP buffers of one source stage's chunk ``v`` (of expert rank ``ep``; ``expert``: only the expert /
    only the dense parameters, None: all), one per dtype: (dtype, [(name, param)], their ParamEntry records in
    buffer order)."""
    by_dtype: dict = {}
    for names, _ in _chunk(model, s, pp, v, output_copy, ep):
        for name, p in names:
            if expert is None or (p.expert is not None) == expert:
                by_dtype.setdefault(p.dtype, []).append((name, p))
    for dtype, params in by_dtype.items():
        yield dtype, params, [buckets.ParamEntry(_ddp_name(p.rule, [name]), p.sharding.shard_shape(p.shape, s.tp),
                                                 dtype, p.rule.shared_embedding) for name, p in params]


def _spot_check(md: M.MegatronDist, model: DistModel, s: ParallelLayout, tp: int, found: dict, params: list,
                where: str) -> None:
    """The distributed optimizer writes its fp32 main params back into the weights, so the fp32 param read where
    the rebuilt layout says must round to the saved weight: checked for the buffer's last parameter (a layout
    that is off anywhere shifts everything after, the last one included)."""
    from ckptmap.mapping import ops

    for p in params:
        sl = found.get(p.key, {}).get("param", {}).get(tp)
        if sl is None or p.dtype not in ("bfloat16", "float16") or sl.dtype != "float32":
            continue
        shape = p.sharding.shard_shape(p.shape, s.tp)
        main = md.reader.read_range_box(sl.key, sl.start, sl.numel, shape, (0,) * len(shape), shape)
        gt, idx = p.sources["weight"]
        weight = np.empty(shape, dtype=np.uint16)   # bf16 / fp16 bits
        for f in p.sharding.fragments(p.shape, s.tp, tp, p.key):
            box = Box(idx + tuple(f.global_box.offsets), (1,) * len(idx) + tuple(f.global_box.lengths))
            weight[tuple(slice(o, o + n) for o, n in zip(f.local_offsets, f.global_box.lengths))] = \
                np.ascontiguousarray(md.read_box(gt, box)).view(np.uint16).reshape(f.global_box.lengths)
        got = np.ascontiguousarray(ops.cast(np.ascontiguousarray(main), "float32", p.dtype)).view(np.uint16)
        if not np.array_equal(got, weight):
            bad = int(np.count_nonzero(got != weight))
            raise CkptmapError(
                f"{where}: the fp32 param of {p.key} (TP rank {tp}) read from {sl.key} [{sl.start}:{sl.start + sl.numel}] "
                f"does not round to its saved weight ({bad} of {weight.size} elements differ): the buffer layout "
                f"rebuilt from common.pt's args puts another parameter's state there — the args do not describe the "
                f"run that saved it. Nothing was written.")


def _bucket_sources(md: M.MegatronDist, model: DistModel, blocks: list, iter_dir: str, grad: str | None) -> None:
    """Bucket-space optimizer state: rebuild every source rank's DDP buffers at the saving run's sizes
    (its args), check them against the sizes the checkpoint records, and point each parameter's states
    at its ranges (``BucketState``). dp_group_idx_N is the rank's model-parallel rank (a chained expert
    optimizer's: its expert-model-parallel rank); gbuf_idx_G counts its buffers over model chunks, as legacy
    distrib_optim.pt does."""
    s = model.layout
    dp_reshardable = md.sharding_type.name == "dp_reshardable"
    output_copy = model.output_copy() if model.tied and s.pp > 1 else None
    found: dict = {}
    # (optimizer index, expert rank, expert?) per source DP group: one optimizer, or a ChainedOptimizer's
    # dense one (the same on every expert rank) and its expert one per expert rank
    optimizers = [(0, 0, False)] + [(1, e, True) for e in range(s.ep)] if model.chained else [(None, 0, None)]
    for pp, tp, (opt_index, ep, expert) in itertools.product(range(s.pp), range(s.tp), optimizers):
        group = s.expert_model_parallel_rank(tp, pp, ep) if expert else s.model_parallel_rank(tp, pp)
        gbuf = 0
        chained = "" if opt_index is None else f"chained_{opt_index}, ep {ep}, "
        for v in range(s.vpp):
            for dtype, params, entries in _chunk_buffers(model, s, pp, v, output_copy, ep, expert):
                pair = M.dtype_pair(dtype, grad or dtype)
                where = (f"{md.path}: source rank tp {tp} pp {pp} chunk {v}, {dtype} buffer ({chained}"
                         f"dp_group_idx_{group}, gbuf_idx_{gbuf})")
                bl = _source_buffer(md, blocks, entries, _layout_values(model.args, s, pp, v, bool(expert)), where,
                                    group, gbuf, pair, opt_index)
                by_ddp = {e.name: p for e, (_, p) in zip(entries, params)}
                # dp_zero_gather_scatter: the buffer's coalesced tensors, looked up once per buffer
                coalesced = {} if dp_reshardable else {state: md.dp_zero_tensor(opt_index, group, gbuf, pair, state)
                                                       for state in STATES}
                specs: dict = {}
                for slot in bl.slots:
                    p = by_ddp[slot.name]
                    if p is output_copy:   # the last stage's tied head: its state is the embedding's
                        continue
                    n = slot.end - slot.start
                    for state in STATES:
                        if dp_reshardable:
                            b = md.bucket_tensor(opt_index, group, gbuf, pair, slot.bucket, state)
                            if b.numel != bl.buckets[slot.bucket].numel_unpadded:
                                raise CkptmapError(f"{where}: {b.key} has {b.numel} elements but the checkpoint's "
                                                   f"per_bucket_numel_unpadded says "
                                                   f"{bl.buckets[slot.bucket].numel_unpadded}; it is inconsistent")
                            key, total, start = b.key, b.numel, slot.start - bl.buckets[slot.bucket].start
                        else:
                            key, total = coalesced[state]
                            start = bl.coalesced_offset(slot)
                        spec = specs.get(key) or specs.setdefault(key, md.reader.spec(key))
                        if tuple(spec.shape) != (total,):
                            raise CkptmapError(f"{where}: {key} has shape {list(spec.shape)}, expected [{total}]")
                        sl = SourceSlice(iter_dir, key, spec.dtype, (total,), start, n)
                        found.setdefault(p.key, {}).setdefault(state, {})[tp] = sl
                _spot_check(md, model, s, tp, found, [by_ddp[sl.name] for sl in bl.slots[-1:]], where)
                gbuf += 1
    for p in model.params.values():
        for state in STATES:
            shards = found.get(p.key, {}).get(state, {})
            if sorted(shards) != list(range(s.tp)):
                raise CkptmapError(f"{md.path}: no buffer of the saving run holds {state} of {p.key} on every TP rank "
                                   f"(found TP ranks {sorted(shards)} of {s.tp}); the rules' order or the args do not "
                                   f"match the checkpoint")
            p.sources[state] = BucketState(s.tp, tuple(shards[t] for t in range(s.tp)))


def _compile(md, rules, opt, iter_dir: str, iteration: str) -> Plan:
    model = DistModel(md, rules, opt.convert_param_only)
    s, args = model.layout, model.args
    if model.num_experts:
        # TP changes of MoE stay refused: megatron-core needs sequence parallelism for TP > 1 with EP, which
        # the real-library tests cannot run, so ckptmap has no check of that layout
        if opt.target_tp_size is not None and opt.target_tp_size != s.tp:
            raise CkptmapError(
                f"{md.path}: a mixture-of-experts model ({model.num_experts} experts, saved at {s.describe()}); "
                f"torch_dist -> torch keeps the TP size of MoE checkpoints, not --target-tp-size "
                f"{opt.target_tp_size}. Convert at TP {s.tp} (PP / VPP / DP may change), then reshard the legacy "
                f"files with `ckptmap reshard --target-tp-size {opt.target_tp_size}`. Nothing was written.")
        dp, ep = opt.target_dp_size or s.dp, opt.target_ep_size or s.ep
        if model.num_experts % ep:
            raise CkptmapError(f"{md.path}: --target-ep-size {ep} does not divide the {model.num_experts} experts "
                               f"(args.num_experts); choose a divisor of {model.num_experts}. Nothing was written.")
        if dp % ep:
            raise CkptmapError(
                f"{md.path}: a mixture-of-experts model at expert-parallel size {ep}; --target-dp-size {dp} is "
                f"not a multiple of it (experts are spread over the data-parallel ranks). Choose a multiple of "
                f"{ep}. Nothing was written.")
    elif opt.target_ep_size not in (None, 1):
        raise CkptmapError(f"{md.path}: --target-ep-size {opt.target_ep_size} applies to mixture-of-experts models; "
                           f"this one has no experts (args.num_experts). Nothing was written.")
    if not opt.convert_param_only and md.sharding_type.space != "model":
        _bucket_sources(md, model, _blocks(model, None), iter_dir,
                        "float32" if getattr(args, "accumulate_allreduce_grads_in_fp32", True) else None)
    pp = opt.target_pp_size or s.pp
    tgt = ParallelLayout(tp=opt.target_tp_size or s.tp, pp=pp, dp=opt.target_dp_size or s.dp, cp=s.cp,
                         ep=opt.target_ep_size or s.ep,
                         vpp=opt.target_vpp_size or (s.vpp if pp == s.pp else 1), num_layers=s.num_layers)
    heads = model.env.get("num_attention_heads")
    if heads and heads % tgt.tp:
        raise CkptmapError(f"--target-tp-size {tgt.tp} does not divide the {heads} attention heads")
    for p in model.params.values():
        p.sharding.check(p.shape, tgt.tp, f"{p.key} ({p.rule.loc}), --target-tp-size")
        if p.sharding.vocab_padded and getattr(args, "vocab_size", None):
            rows = padded_vocab_size(args.vocab_size, _arg(args, "make_vocab_size_divisible_by", 128), tgt.tp)
            if rows != p.shape[p.sharding.dim]:
                raise CkptmapError(
                    f"{p.key}: the vocabulary ({args.vocab_size}) pads to {rows} rows at TP {tgt.tp} but the checkpoint "
                    f"has {p.shape[p.sharding.dim]} (padded for TP {s.tp}); convert at --target-tp-size {s.tp} and "
                    f"reshard the result with `ckptmap reshard --target-tp-size {tgt.tp}` (it pads the vocabulary)")
    output_copy = model.output_copy() if model.tied and tgt.pp > 1 else None
    blocks = [] if opt.convert_param_only else _blocks(model, opt.target_megatron_version)
    if not opt.convert_param_only and not blocks:
        raise CkptmapError(f"rules {rules.path} have no coalesced `buckets megatron` block for this checkpoint's "
                           f"megatron-core; pass --target-megatron-version")
    grad = "float32" if getattr(args, "accumulate_allreduce_grads_in_fp32", True) else None
    # the param-group order of the versions that may load the target (any of them without a version)
    policies = [p for p in rules.param_group_policies("megatron") if p.covers(opt.target_megatron_version)] \
        if opt.target_megatron_version else [p for b in blocks for p in rules.param_group_policies(b.name, b.versions)] \
        or rules.param_group_policies("megatron")
    it_name = "release" if iteration == "release" else megatron_folders.iter_dir_name(int(iteration))
    files, notes = [], []
    merge = model.chained and _merges_experts(model, tgt, blocks or _blocks(model, opt.target_megatron_version))
    ep_named = tgt.ep > 1
    for p_rank in range(tgt.pp):
        for ep in range(tgt.ep):
            for tp in range(tgt.tp):
                e = ep if ep_named else None
                rank_dir = f"{it_name}/{megatron_folders.mp_rank_dir_name(tp, p_rank, tgt.pp, e)}"
                chunks = [_chunk(model, tgt, p_rank, v, output_copy, ep) for v in range(tgt.vpp)]
                model_task, order_note = _model_task(md, model, tgt, rank_dir, tp, p_rank, chunks, iter_dir, policies,
                                                     ep, merge)
                if order_note and order_note not in notes:
                    notes.append(order_note)
                files.append(model_task)
                if not opt.convert_param_only:
                    task, maps = _optim_task(model, tgt, rank_dir, tp, p_rank, ep, chunks, blocks, iter_dir, grad,
                                             merge)
                    files.append(task)
                    files.extend(FileTask(f"{it_name}/{megatron_folders.PARAM_MAP_DIR}/"
                                          f"{param_map.param_map_file_name(b, d, tp, p_rank, v, e)}",
                                          "text", text=param_map.param_map_text(bl.slots))
                                 for v, b, bl, expert in maps for d in range(tgt.expert_dp if expert else tgt.dp))
    files.append(FileTask(megatron_folders.TRACKER, "text", text=iteration))
    over_dp = {o.name for o in md.layout.rank_objects if o.over_dp_versions}
    if tgt.ep > 1 and any(k.rpartition("/shard_")[0] in over_dp and k.rpartition("/shard_")[2].split("_")[0].count(".") < 2
                          for k in md.other_objects):
        notes.append("RNG states: this save keeps one per (pp, tp), data-parallel rank 0's; every expert rank's "
                     "folder gets it (resume with --no-load-rng for fresh ones)")
    if (tgt.tp, tgt.pp, tgt.ep) != (s.tp, s.pp, s.ep):
        notes.append("RNG states: each target rank takes the source rank's at the same (tp, pp, ep) modulo the source "
                     "sizes (RNG streams cannot be resharded; resume with --no-load-rng for fresh ones)")
    info = {"source": iter_dir, "format": f"torch_dist ({md.sharding_type.name if md.sharding_type else 'no optimizer'})"
            " -> torch (legacy)", "source_layout": s.describe(), "target": tgt.describe(),
            "target_layout": " / ".join(b.label for b in blocks) or "-",
            "mode": "weights only" if opt.convert_param_only else "weights + distributed optimizer",
            "rules": rules.name, "notes": "; ".join(notes) or "-"}
    return Plan("torch_dist-to-torch", str(Path(opt.dst)), tuple(files), info)


def _args_updates(args, tgt: ParallelLayout) -> dict:
    per_chunk = tgt.num_layers // (tgt.pp * tgt.vpp)
    out = {"tensor_model_parallel_size": tgt.tp, "pipeline_model_parallel_size": tgt.pp,
           "transformer_pipeline_model_parallel_size": tgt.pp,
           "virtual_pipeline_model_parallel_size": tgt.vpp if tgt.vpp > 1 else None,
           "num_layers_per_virtual_pipeline_stage": per_chunk if tgt.vpp > 1 else None,
           "data_parallel_size": tgt.dp, "world_size": tgt.tp * tgt.pp * tgt.dp * tgt.cp,
           "expert_model_parallel_size": tgt.ep,
           # the files are legacy ones now: a resume must not look for a torch_dist checkpoint
           "ckpt_format": "torch", "use_dist_ckpt": False}
    if getattr(args, "expert_tensor_parallel_size", None) == getattr(args, "tensor_model_parallel_size", None):
        out["expert_tensor_parallel_size"] = tgt.tp   # expert TP follows TP (checked in _check_moe)
    return {k: v for k, v in out.items() if k in vars(args)}


def _model_task(md, model: DistModel, tgt, rank_dir, tp, pp, chunks, iter_dir, policies=(), ep=0, merge=False):
    storages, entries, names_shapes = [], [], []
    for key, groups in zip(_chunk_keys(tgt.vpp), chunks):
        rows = []
        for names, extras in groups:
            part = []
            for name, p in names:
                w = shard_task(p, "weight", tgt.tp, tp, name, iter_dir)
                storage = f"w{len(storages)}"
                storages.append(StorageTask(storage, w.dtype, math.prod(w.shape),
                                            tuple(StoragePiece(o, t) for o, t in chunk_copies(w, md.reader))))
                part.append({"path": [name], "tensor": storage, "dtype": w.dtype, "shape": list(w.shape)})
                names_shapes.append((name, w.shape, bool(p.rule.shared_embedding), p.expert is not None))
            rows += _with_extra(model, part, extras)
        entries.append({"key": key, "leaves": rows})
    st, s = md.sharding_type, model.layout
    specs, notes = [], []
    # ChainedOptimizer (MoE): [dense, expert], each with its own param groups and DP groups; merged (a target
    # that keeps experts in the dense optimizer, EP 1): the dense one's groups for every parameter
    for opt_index in ((0,) if merge else (0, 1) if model.chained else (None,)):
        common_opt, opt_object = md.common.get("optimizer"), None
        if opt_index is not None and isinstance(common_opt, dict):
            common_opt = common_opt.get(opt_index)
        if st is not None and not st.param_groups_in_common:   # bucket space: in the source DP group's object
            group = s.expert_model_parallel_rank(tp % s.tp, pp % s.pp, ep % s.ep) if opt_index == 1 else \
                s.model_parallel_rank(tp % s.tp, pp % s.pp)
            opt_object = md.optimizer_objects.get((opt_index, group, "optimizer"))
            if opt_object is None:
                raise CkptmapError(f"{md.path} has no optimizer object (param groups) for source rank tp {tp % s.tp} "
                                   f"pp {pp % s.pp}" + ("" if opt_index is None else f" ep {ep % s.ep}, chained "
                                                        f"optimizer {opt_index} (dp_group_idx_{group})")
                                   + "; the checkpoint is incomplete")
            common_opt = {"optimizer": md.optimizer_object(opt_index, group, "optimizer")[1]}
        mine = [(n, shape, emb) for n, shape, emb, is_expert in names_shapes
                if opt_index is None or merge or is_expert == (opt_index == 1)]
        # each target rank's order as its Megatron builds them (param_groups.group_order, per target version)
        groups, note = _param_group_order(common_opt, mine, policies)
        specs.append({"param_groups": groups, "optimizer_object": opt_object})
        if note and note not in notes:
            notes.append(note)
    note = "; ".join(notes) or None
    recipe = {"common": iter_dir, "args": _args_updates(model.args, tgt), "chunks": entries,
              "drop": list(md.layout.dist_only_keys("common")),
              "optimizer_drop": list(md.layout.dist_only_keys("optimizer")),
              **(specs[0] if not model.chained else {"chained": specs, "chained_merge": merge}),
              "rank_objects": {".".join(o.path): _object_for(md, o.name, tp, pp, model.layout, ep)
                               for o in md.layout.rank_objects}}
    return FileTask(f"{rank_dir}/{megatron_folders.MODEL_FILE}", "megatron_model_dist", storages=tuple(storages),
                    extra=recipe), note


def _optim_task(model: DistModel, tgt, rank_dir, tp, pp, ep, chunks, blocks, iter_dir, grad, merge=False):
    """distrib_optim.pt of target rank (tp, pp, ep): per chunk and param dtype a DDP buffer laid out by the
    target version's ``buckets megatron`` block at the target sizes, each state assembled from the
    parameters' shards (zeros in alignment gaps). MoE: a ChainedOptimizer [dense, expert], dense buffers
    (only in expert rank 0's folder, as Megatron saves them) then expert buffers over the expert-data-parallel
    group. ``merge``: one optimizer over every parameter (a target that keeps experts in the dense buffers)."""
    storages, maps, optimizers = [], [], []
    chained = model.chained and not merge
    for opt_index in ((0, 1) if chained else (None,)):
        expert = (opt_index == 1) if chained else None
        if opt_index == 0 and ep != 0:
            optimizers.append(None)
            continue
        bufs = _optim_buffers(model, tgt, rank_dir, tp, pp, chunks, blocks, iter_dir, grad, expert, storages, maps)
        optimizers.append({"buffers": bufs})
    recipe = {"chained": chained, "optimizers": optimizers}
    return FileTask(f"{rank_dir}/{megatron_folders.OPTIM_FILE}", "megatron_optim", storages=tuple(storages),
                    extra=recipe), maps


def _optim_buffers(model, tgt, rank_dir, tp, pp, chunks, blocks, iter_dir, grad, expert, storages, maps) -> list:
    bufs = []
    for v, groups in enumerate(chunks):
        by_dtype: dict = {}
        for names, _ in groups:
            for name, p in names:
                if expert is not None and (p.expert is not None) != expert:
                    continue
                shape = p.sharding.shard_shape(p.shape, tgt.tp)
                by_dtype.setdefault(p.dtype, []).append((_ddp_name(p.rule, [name]), p, shape, name))
        for dtype, params in by_dtype.items():
            entries = [buckets.ParamEntry(ddp, shape, dtype, p.rule.shared_embedding) for ddp, p, shape, _ in params]
            block, bl = _build_target_buffer(blocks, entries, _layout_values(model.args, tgt, pp, v, bool(expert)),
                                             f"{rank_dir} chunk {v} {dtype} {'expert ' if expert else ''}buffer")
            maps.append((v, sum(1 for m in maps if m[0] == v), bl, bool(expert)))
            by_name = {ddp: (p, name) for ddp, p, _, name in params}
            tensors = {}
            for state in STATES:
                pieces = []
                for slot in bl.slots:
                    p, name = by_name[slot.name]
                    task = shard_task(p, state, tgt.tp, tp, f"{state} of {name}", iter_dir)
                    pieces += [(bl.coalesced_offset(slot) + o, t) for o, t in chunk_copies(task, model.md.reader)]
                tensors[state] = [_state_storage(storages, pieces, bl.numel_unpadded)]
            bufs.append({"param_dtype": dtype, "grad_dtype": grad or dtype, "storage": block.storage,
                         "padded": bl.per_bucket_numel, "unpadded": bl.per_bucket_numel_unpadded,
                         "numel_unpadded": bl.numel_unpadded, "tensors": tensors})
    return bufs


# -------------------------------------------------------------------------------------------------
# fully_sharded_model_space -> dp_reshardable (convert --from torch_dist --to torch_dist --sharding-type dp_reshardable)


def _object_bytes(value) -> bytes:
    """``torch.save([value])`` as Megatron stores a ShardedObject in a .distcp item."""
    import tempfile

    from ckptmap.formats import torch_zip_writer as tzw
    with tempfile.TemporaryDirectory(prefix=".ckptmap-obj-") as tmp:
        f = Path(tmp) / "archive"   # torch.save to a buffer names the archive's records archive/...
        tzw.save([value], f)
        return f.read_bytes()


def _rank_objects_over_dp(md: M.MegatronDist, s: ParallelLayout, objects: list, new_objects: dict) -> set:
    """megatron-core 0.15+ with expert parallelism shards the RNG state over DP as well
    (the rules' ``rank_object … over_dp``): a save that keeps one per (pp, tp) (0.8 - 0.14) gets it copied to every
    DP rank of that (pp, tp) -- the only one it has. Appends to ``objects`` / ``new_objects``; returns the
    keys replaced."""
    replaced = set()
    for o in md.reader.meta.objects.values():
        keys = M.rank_object_over_dp(md.layout, o.key, s.dp, md.layout.sharding("dp_reshardable").versions[0])
        if keys is None:
            continue
        data = bytes(md.reader.object_bytes(o.key))
        for key in keys:
            objects.append(td.OutObject(key, o.file))
            new_objects[key] = data
        replaced.add(o.key)
    return replaced


def plan_dp_reshardable(md: M.MegatronDist, dst, rules_name: str = DEFAULT_RULES) -> M.RewritePlan:
    """The offline upgrade of a ``fully_sharded_model_space`` save (0.8 - 0.14) to ``dp_reshardable`` (the 0.15+
    default): the same weights; per model-parallel rank (``dp_group_idx_N``), DDP buffer and bucket, the fp32
    param and Adam moments of the bucket's parameters laid out where the loading megatron-core (0.15+) puts
    them at the saving run's sizes (the rules' ``buckets megatron`` blocks of 0.15+; zeros in alignment
    gaps), plus the ``per_bucket_numel[_unpadded]`` and param-group objects that version's load reads."""
    from ckptmap.formats.safe_unpickler import GlobalMarker

    rules = resolve_rules(rules_name)
    model = DistModel(md, rules, convert_param_only=False)
    target_type = md.layout.sharding("dp_reshardable")
    s, args, meta = model.layout, model.args, md.reader.meta
    blocks = [b for b in rules.bucket_layouts("megatron") if b.storage == "coalesced" and
              (b.versions is None or version_key(b.versions[1]) >= version_key(target_type.versions[0]))]
    if not blocks:
        raise CkptmapError(f"rules {rules.path} have no `buckets megatron` block for megatron-core 0.15+, whose "
                           f"dp_reshardable layout this needs")
    grad = "float32" if getattr(args, "accumulate_allreduce_grads_in_fp32", True) else None
    common_opt = md.common.get("optimizer")
    # one optimizer, or a ChainedOptimizer's (MoE): dense (index 0) and expert (index 1), each with its groups
    per_opt = {i: common_opt.get(i) for i in (0, 1)} if model.chained else {None: common_opt}
    for i, o in per_opt.items():
        if not isinstance(o, dict) or not isinstance(o.get("optimizer"), dict):
            raise CkptmapError(f"{md.path}/common.pt has no optimizer param groups (optimizer"
                               f"{'' if i is None else f'[{i}]'}.optimizer); a fully_sharded_model_space save of a "
                               f"distributed optimizer keeps them there")
    output_copy = model.output_copy() if model.tied and s.pp > 1 else None
    files = sorted({c.file for t in meta.tensors.values() for c in t.chunks})
    tensors, sources, objects, new_objects = [], [], [], {}
    for t in md.tensors("weight"):   # the model weights, item for item
        mt = meta.tensors[t.key]
        tensors.append(td.OutTensor(t.key, t.dtype, t.shape, tuple(td.OutChunk(c.box, c.file) for c in mt.chunks)))
        sources.append(M.TensorSource(t.key))
    # per DP group: (optimizer index, expert rank, expert?) as megatron-core numbers them (dp_group_idx_N: the
    # model-parallel rank; an expert optimizer's: the expert-model-parallel rank)
    optimizers = [(0, 0, False)] + [(1, e, True) for e in range(s.ep)] if model.chained else [(None, 0, None)]
    for pp, tp, (opt_index, ep, expert) in itertools.product(range(s.pp), range(s.tp), optimizers):
        group = s.expert_model_parallel_rank(tp, pp, ep) if expert else s.model_parallel_rank(tp, pp)
        file = f"__{s.global_rank(tp=tp, pp=pp)}_0.distcp"
        file = file if file in files else files[0]
        padded, unpadded, gbuf = [], [], 0
        for v in range(s.vpp):
            for dtype, params, entries in _chunk_buffers(model, s, pp, v, output_copy, ep, expert):
                where = (f"{md.path}: rank tp {tp} pp {pp} chunk {v}, {dtype} buffer"
                         + ("" if opt_index is None else f" (chained optimizer {opt_index}, ep {ep})"))
                _, bl = _build_target_buffer(blocks, entries, _layout_values(args, s, pp, v, bool(expert)), where)
                by_ddp = {e.name: p for e, (_, p) in zip(entries, params)}
                pair = M.dtype_pair(dtype, grad or dtype)
                for b_idx, bucket in enumerate(bl.buckets):
                    slots = [sl for sl in bl.slots if sl.bucket == b_idx]
                    for state in STATES:
                        key = md.layout.chained_prefix(opt_index) + target_type.tensor_key(
                            group=group, gbuf=gbuf, dtypes=pair, bucket=b_idx, state=state)
                        pieces = []
                        for sl in slots:
                            p = by_ddp[sl.name]
                            gt, idx = p.sources[state]
                            frags = p.sharding.fragments(p.shape, s.tp, tp, p.key)
                            boxes = tuple((gt, Box(idx + tuple(f.global_box.offsets),
                                                   (1,) * len(idx) + tuple(f.global_box.lengths)),
                                           tuple(f.local_offsets)) for f in frags)
                            pieces.append(M.ShardPiece(sl.start - bucket.start, tuple(sl.shape), boxes))
                        n = bucket.numel_unpadded
                        tensors.append(td.OutTensor(key, "float32", (n,), (td.OutChunk(Box((0,), (n,)), file),)))
                        sources.append(M.TensorSource("", pieces=tuple(pieces)))
                markers = (GlobalMarker("torch", dtype, dtype), GlobalMarker("torch", grad or dtype, grad or dtype))
                padded.append({markers: bl.per_bucket_numel})
                unpadded.append({markers: bl.per_bucket_numel_unpadded})
                gbuf += 1
        for what, value in (("optimizer", per_opt[opt_index]["optimizer"]), ("per_bucket_numel", padded),
                            ("per_bucket_numel_unpadded", unpadded)):
            key = M.group_object_key(md.layout, target_type, opt_index, group, what)
            objects.append(td.OutObject(key, file))
            new_objects[key] = _object_bytes(value)
    replaced = _rank_objects_over_dp(md, s, objects, new_objects) if s.ep > 1 else set()
    dropped = {t.key for t in md.tensors() if t.state != "weight"}
    order = [k for k in meta.order if k not in dropped and k not in replaced] + \
        [t.key for t in tensors if t.key not in meta.tensors] + [o.key for o in objects]
    objects = [td.OutObject(o.key, o.file) for o in meta.objects.values() if o.key not in replaced] + objects
    mcore = {k: v for k, v in (meta.mcore_data or {}).items() if k not in dropped}
    content = md.common.get("content_metadata")
    content = dict(content if isinstance(content, dict) else M.CONTENT_METADATA_0_16,
                   distrib_optim_sharding_type="dp_reshardable")
    state_type = {"param_state_sharding_type": "dp_reshardable"}
    edits = ((("content_metadata",), content), (("optimizer",), {0: state_type, 1: dict(state_type)} if model.chained
                                                 else state_type))
    notes = ("optimizer state laid out in the DDP buckets megatron-core 0.15+ builds at the saving sizes "
             f"({' / '.join(b.label for b in blocks)}); param groups from common.pt in every DP group's object",)
    return M.RewritePlan(md.path, Path(dst), "fully_sharded_model_space", "dp_reshardable", tuple(tensors),
                         tuple(sources), tuple(objects), tuple(order), mcore, edits, md.reader.backend, notes,
                         M._positions(md, tensors, objects, {}), new_objects)
