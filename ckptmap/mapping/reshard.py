"""Resharding a Megatron checkpoint: the same model and training state at another TP / PP / VPP / DP /
EP layout, weights and the distributed optimizer's state (fp32 main params, both Adam moments).

How: every parameter is a *global* tensor (Megatron's own global layout, see ``sharding.py``); a
source rank holds a shard of it, described by the rules' ``tp:`` clause resolved against the model
config. A target shard is assembled from boxes of the source shards (``sharding.transfer``) —
one target tensor in memory at a time, never a whole unsharded tensor. Layers move between pipeline
stages by their global number (``layout.py``), experts between expert ranks by their global id. The
target's distributed-optimizer buffers are laid out by the rules' ``buckets megatron`` block of the
target version at the target sizes — the layout a run at that layout would build — and written in
that version's ``distrib_optim.pt`` form. The model file is written as Megatron saves it: its weights
views of those buffers' storages (``_model_task``), the state dicts' ``_metadata``, every non-tensor entry
of a source rank (args updated to the new sizes, scheduler, optimizer hyper-parameters with the param
groups in the order the target rank builds them: ``param_groups.py``); each layer's ``_extra_state``
comes from the rank that held the layer, and RNG states from the source rank at the same position
modulo the source sizes (RNG streams cannot be resharded; resume with ``--no-load-rng`` if the new
layout must draw fresh streams). Uneven stages (``--target-stage-list``) where the target versions
can build them (``_check_stage_list``).

Vocabulary padding: the padded vocabulary depends on TP (``make_vocab_size_divisible_by`` x TP).
Rows the target has beyond the source's are filled as Megatron's checkpoint converter does for
weights — copies of the last row — and the fp32 main param likewise; Adam moments of such rows are 0.
Rows the target drops must be padding (beyond the true vocabulary).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import attrs

from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_files, megatron_folders, param_map
from ckptmap.mapping import buckets, param_groups
from ckptmap.mapping.layout import ParallelLayout
from ckptmap.mapping.megatron_source import (AUTO_RULES, MegatronSource, SourceOptions, ddp_name, global_bindings,
                                             planning, state_slice)
from ckptmap.mapping.plan import FileTask, Plan, Read, SourceSlice, StoragePiece, StorageTask, TensorTask
from ckptmap.mapping.rules import EXPERT, LAYER, RuleSet
from ckptmap.mapping.sharding import Box, Sharding, padded_vocab_size, transfer

STATES = megatron_files.OPTIM_STATES


@attrs.frozen
class ReshardOptions:
    megatron_path: str
    output_path: str
    target_tp_size: int | None = None
    target_pp_size: int | None = None
    target_vpp_size: int | None = None
    target_dp_size: int | None = None
    target_ep_size: int | None = None
    target_stage_list: tuple[int, ...] | None = None
    target_noop: tuple[int, ...] | None = None   # None: the source's noop layers (global ids of the target)
    target_megatron_version: str | None = None
    vocab_size: int | None = None
    convert_param_only: bool = False
    # the source, as pt2ms reads it
    param_map_path: str | None = None
    rules: str = AUTO_RULES
    megatron_version: str | None = None
    main_param_check: bool = True
    parallel_init_order: str = "tp-cp-ep-dp-pp"
    noop: tuple[int, ...] = ()
    # the target is a step of a composition (pt2ms --target-*) that no Megatron loads
    intermediate: bool = False


# -------------------------------------------------------------------------------------------------
# Names: where the layer and the expert number sit in a state-dict name (learnt from the rules)


class IndexNames:
    """Finds and replaces the layer / local-expert number in a dotted state-dict name — tensors and
    the ``_extra_state`` entries next to them alike. The words before ``{layer}`` and ``{expert}``
    in the rules' Megatron patterns (``layers``, ``local_experts``) say where the numbers are."""

    def __init__(self, rules: RuleSet):
        words = {LAYER: set(), EXPERT: set()}
        for rule in rules.params:
            segs = rule.megatron.segments
            for i, seg in enumerate(segs):
                if seg.kind in words and i > 0 and segs[i - 1].kind == "literal":
                    words[seg.kind].add(segs[i - 1].text)
        self.res = {kind: re.compile(r"(?:^|\.)(?:" + "|".join(map(re.escape, sorted(ws))) + r")\.(\d+)(?=\.)")
                    for kind, ws in words.items() if ws}

    def find(self, kind: str, dotted: str) -> tuple[int, int, int] | None:
        """(number, start, end) of the ``kind`` number in ``dotted``, or None."""
        rx = self.res.get(kind)
        m = rx.search(dotted) if rx else None
        return (int(m.group(1)), m.start(1), m.end(1)) if m else None

    def renumber(self, path: list, kind: str, new: int) -> list:
        """``path`` (state-dict keys, joined by '.' they form the dotted name) with the ``kind``
        number replaced by ``new``."""
        dotted = ".".join(map(str, path))
        hit = self.find(kind, dotted)
        if hit is None:
            return list(path)
        _, a, b = hit
        out, pos = [], 0
        for part in path:
            part = str(part)
            start, end = pos, pos + len(part)
            if start <= a and b <= end:
                part = part[:a - start] + str(new) + part[b - start:]
            out.append(part)
            pos = end + 1
        return out


# -------------------------------------------------------------------------------------------------
# The source as global parameters


@attrs.define
class GlobalParam:
    """One parameter of the model with global layer / expert numbers: its rule, sharding, global
    shape, and its shards per source TP rank: (SourceRank, _Matched)."""

    key: str
    rule: object
    sharding: Sharding
    global_shape: tuple
    dtype: str
    shards: dict = attrs.field(factory=dict)


def resolve_sharding(rule, env: dict, where: str) -> Sharding:
    """The rule's ``tp:`` clause with the model config filled in."""
    sp = rule.tp
    if sp.replicated:
        return Sharding("replicated")
    halves = sp.halves or 1
    if sp.halves_when is not None:
        if sp.halves_when not in env:
            raise CkptmapError(f"{rule.loc}: `halves={halves} when {sp.halves_when}` needs args.{sp.halves_when}, which "
                               f"the checkpoint does not record ({where}); the rules cannot tell how the tensor is cut")
        if not env[sp.halves_when]:
            halves = 1
    groups = None
    if sp.groups is not None:
        groups = env.get(sp.groups)
        if groups is None and sp.groups == "num_query_groups":   # no GQA: one group per head
            groups = env.get("num_attention_heads")
        if groups is None:
            raise CkptmapError(f"{rule.loc}: split(groups={sp.groups}) needs args.{sp.groups}, which the checkpoint "
                               f"does not record ({where})")
    return Sharding("split", sp.dim, halves, groups, sp.vocab_padded)


@attrs.frozen
class Leaf:
    """One entry of a source state dict: its key path, value (TensorRef or e.g. ``_extra_state``),
    dotted name, the layer and expert numbers in it (as stored), and where it came from."""

    path: tuple
    value: object
    dotted: str
    layer: int | None
    expert: int | None
    gp: object            # the GlobalParam of a tensor leaf, else None
    rank: object          # SourceRank
    chunk_key: str
    stored_path: tuple = ()   # the path in its source file (``path`` may be renumbered for the target)

    def renamed(self, names: "IndexNames", kind: str, new: int) -> "Leaf":
        return attrs.evolve(self, path=tuple(names.renumber(list(self.path), kind, new)))


class SourceModel:
    """The source checkpoint seen as global parameters, plus the order and non-tensor entries of its
    state dicts, so that target state dicts can be assembled in Megatron's order."""

    def __init__(self, src: MegatronSource):
        self.src = src
        self.names = IndexNames(src.rules)
        env = dict(src.env)
        for flag in ("swiglu", "untie_embeddings_and_output_weights", "group_query_attention"):
            env[flag] = bool(getattr(src.args, flag, False))
        self.env = env
        self.num_experts = env.get("num_experts") or 0
        self.params: dict[str, GlobalParam] = {}
        for rank in src.sorted_ranks:
            for m in rank.matched:
                if EXPERT not in m.bindings and rank.ep != 0:
                    continue   # dense parameters are the same in every expert folder: take expert rank 0's
                gb = global_bindings(m, src.layout, rank.pp, rank.ep, env, rank.model.path)
                key = m.rule.megatron.format(gb)
                gp = self.params.get(key)
                if gp is None:
                    sh = resolve_sharding(m.rule, env, key)
                    gp = self.params[key] = GlobalParam(key, m.rule, sh, sh.global_shape(m.tensor.shape, src.layout.tp),
                                                        m.tensor.dtype)
                if rank.tp in gp.shards:
                    raise CkptmapError(f"{key} appears twice on tp rank {rank.tp} ({gp.shards[rank.tp][0].dir}, "
                                       f"{rank.dir}); the checkpoint's folders overlap")
                gp.shards[rank.tp] = (rank, m)
        for key, gp in self.params.items():
            if len(gp.shards) != src.layout.tp:
                raise CkptmapError(f"{key} has shards on tp ranks {sorted(gp.shards)} of {src.layout.tp}; the checkpoint "
                                   f"is incomplete")
        self._leaves: dict = {}

    # --- state-dict structure ---------------------------------------------------------------
    def leaves(self, rank, chunk: int) -> list[Leaf]:
        """The leaves of a source chunk, in state-dict order."""
        cache_key = (rank.key, chunk)
        if cache_key in self._leaves:
            return self._leaves[cache_key]
        chunk_key = dict((v, k) for k, v in rank.model.chunks())[chunk]
        by_name = {m.tensor.name: m for m in rank.matched if m.tensor.chunk == chunk}
        out = []
        for path, value in rank.model.chunk_leaves(chunk_key):
            dotted = ".".join(map(str, path))
            layer = self.names.find(LAYER, dotted)
            expert = self.names.find(EXPERT, dotted)
            m = by_name.get(dotted)
            gp = None
            if m is not None:
                gb = global_bindings(m, self.src.layout, rank.pp, rank.ep, self.env, rank.model.path)
                gp = self.params[m.rule.megatron.format(gb)]
            out.append(Leaf(tuple(path), value, dotted, layer[0] if layer else None, expert[0] if expert else None,
                            gp, rank, chunk_key, tuple(path)))
        self._leaves[cache_key] = out
        return out

    def edge_leaves(self, which: str) -> list[Leaf]:
        """The leaves before the first layer of the first chunk (``pre``: embeddings) or after the
        last layer of the last chunk (``post``: final norm, output layer), from expert rank 0. A
        one-chunk model has both in the same chunk."""
        layout = self.src.layout
        pp, v = (0, 0) if which == "pre" else (layout.pp - 1, layout.vpp - 1)
        leaves = self.leaves(self.src.ranks[(0, pp, 0)], v)
        layer_pos = [i for i, leaf in enumerate(leaves) if leaf.layer is not None]
        if which == "pre":
            return leaves[:layer_pos[0]] if layer_pos else leaves
        return leaves[layer_pos[-1] + 1:] if layer_pos else []

    def layer_leaves(self, global_layer: int, ep: int = 0) -> list[Leaf]:
        """Leaves of one global layer (tp rank 0, the given expert rank), numbers as stored."""
        pp, v, local = self.src.layout.locate_layer(global_layer)
        if local is None:
            return []
        return [leaf for leaf in self.leaves(self.src.ranks[(0, pp, ep)], v) if leaf.layer == local]


# -------------------------------------------------------------------------------------------------
# Target shards


def _source_view(rank, m, state: str, src: MegatronSource, keys: dict) -> SourceSlice:
    """Where the source shard of a parameter's weight (``state`` "weight") or optimizer state lies."""
    if state == "weight":
        return SourceSlice(str(rank.model.path), m.tensor.key, m.tensor.dtype, m.tensor.shape)
    slots = src.state_slots(rank)
    optim, g, bl, slot = slots[(m.tensor.chunk, ddp_name(m, src.memo))]
    return state_slice(optim, keys, g, bl, slot, state)


def target_tensor(gp: GlobalParam, state: str, tgt_global: tuple, tgt_tp: int, tgt_rank: int, name: str,
                  src: MegatronSource, keys: dict, dtype: str | None = None) -> TensorTask:
    """The target shard ``tgt_rank`` (of ``tgt_tp``) of ``gp``'s weight or optimizer ``state``,
    assembled from boxes of the source shards."""
    src_tp = src.layout.tp
    where = f"{gp.key} ({gp.rule.loc})"
    target_frags = gp.sharding.fragments(tgt_global, tgt_tp, tgt_rank, where)
    shard_shape = gp.sharding.shard_shape(tgt_global, tgt_tp, where)
    dtype = dtype or ("float32" if state != "weight" else gp.dtype)
    # a replicated tensor is read from one source rank; the others must hold the same bytes
    tps = list(range(src_tp))
    if gp.sharding.kind == "replicated":
        tps = [tgt_rank % src_tp]
    sources = [gp.sharding.fragments(gp.global_shape, src_tp, t, where) for t in tps]
    views = {}
    for t in tps:
        rank, m = gp.shards[t]
        views[t] = (_source_view(rank, m, state, src, keys), tuple(m.tensor.shape))
    pieces, missing = transfer(target_frags, sources)
    reads = []
    for p in pieces:
        t = tps[p.source]
        sl, view = views[t]
        reads.append(Read(sl, view, p.src_box.offsets, p.src_box.lengths, p.dst_offsets))
    if missing:
        if not gp.sharding.vocab_padded:
            raise CkptmapError(f"internal error: {where} target shard {tgt_rank} of {tgt_tp} is not covered by the "
                               f"source shards")
        if state in ("weight", "param"):   # Megatron's converter: new padding rows copy the last row
            reads.extend(_last_row_reads(gp, missing, tps, sources, views))
        # Adam moments of new rows: 0 (the assembly starts zeroed)
    replicas = ()
    if gp.sharding.kind == "replicated" and src_tp > 1:
        replicas = tuple(_source_view(*gp.shards[t], state, src, keys) for t in range(src_tp) if t != tps[0])
    note = f"{gp.key} · tp {tgt_rank}/{tgt_tp} from {len({r.source.file for r in reads})} file(s)"
    return TensorTask(name, dtype, shard_shape, (), dtype, shard_shape, (), note=note, reads=tuple(reads),
                      replicas=replicas)


def source_runs(r: Read) -> list[SourceSlice] | None:
    """A read of a legacy source whose box is consecutive elements of its source range: that run, as one
    SourceSlice (the executor finds its bytes with the reader's ``byte_range``), else None."""
    first = Box(r.offsets, r.lengths).run_start(r.view)
    if first is None:
        return None
    s = r.source
    n, start = math.prod(r.lengths), s.start + first
    whole = start == 0 and n == math.prod(s.shape)
    return [SourceSlice(s.file, s.key, s.dtype, s.shape, start, None if whole else n)]


def byte_copy_pieces(task: TensorTask, runs_of=source_runs) -> list[tuple[int, TensorTask]]:
    """``task`` as pieces ``(element offset, task)`` of the storage it fills: when every read of the task
    is runs of consecutive source elements (``runs_of(read)``: SourceSlices in order, or None) landing on a
    run of the target — a whole tensor moved to another PP stage, a TP shard of dim 0, a parameter's range
    of a bucket, each half of a SwiGLU shard — one piece per run with that one source and no reads, which
    the executor copies kernel-side (``copy_file_range``, as pt2ms copies ``distrib_optim.pt`` runs) and
    ``plan --dry-run`` counts as a byte copy. Otherwise ``[(0, task)]``, assembled from its reads."""
    if not task.reads or task.replicas or task.rounds_to is not None or task.ops:
        return [(0, task)]
    shape, pieces = tuple(task.shape), []
    for r in task.reads:
        start = None if r.dst_lengths is not None else Box(r.dst_offsets, r.lengths).run_start(shape)
        runs = None if start is None else runs_of(r)
        if runs is None or any(sl.dtype != task.dtype for sl in runs):
            return [(0, task)]
        for sl in runs:
            pieces.append((start, sl))
            start += sl.count
    pieces.sort(key=lambda p: p[0])
    pos = 0
    for start, sl in pieces:   # the runs must tile the target exactly
        if start != pos:
            return [(0, task)]
        pos += sl.count
    if pos != math.prod(shape):
        return [(0, task)]
    if len(pieces) == 1:
        return [(0, attrs.evolve(task, sources=(pieces[0][1],), reads=()))]
    return [(start, TensorTask(f"{task.name} [{start}:{start + sl.count}]", task.dtype, (sl.count,), (sl,), task.dtype,
                               (sl.count,), (), note=task.note)) for start, sl in pieces]


def _last_row_reads(gp, missing, tps, sources, views) -> list:
    dim = gp.sharding.dim
    last = gp.global_shape[dim] - 1
    row = [0] * len(gp.global_shape)
    row[dim] = last
    for i, frags in enumerate(sources):
        for f in frags:
            g0, gl = f.global_box.offsets[dim], f.global_box.lengths[dim]
            if g0 <= last < g0 + gl:
                sl, view = views[tps[i]]
                src_off = list(f.local_offsets)
                src_off[dim] += last - g0
                lengths = list(f.global_box.lengths)
                lengths[dim] = 1
                return [Read(sl, view, tuple(src_off), tuple(lengths), b.offsets, b.lengths) for b in missing]
    raise CkptmapError(f"internal error: no source shard holds the last vocabulary row of {gp.key}")


# -------------------------------------------------------------------------------------------------
# Planning


def target_layout(src: MegatronSource, opt: ReshardOptions) -> ParallelLayout:
    s = src.layout
    tp = opt.target_tp_size or s.tp
    pp = opt.target_pp_size or s.pp
    vpp = opt.target_vpp_size or (s.vpp if pp == s.pp else 1)
    ep = opt.target_ep_size or s.ep
    dp = opt.target_dp_size or s.dp
    noop = s.noop if opt.target_noop is None else frozenset(opt.target_noop)
    real = len(s.stored_layers())   # the model's layers with weights; noop layers are added around them
    try:
        return ParallelLayout(tp=tp, pp=pp, dp=dp, cp=s.cp, ep=ep, vpp=vpp, num_layers=real + len(noop),
                              stage_list=opt.target_stage_list, noop=noop, order=opt.parallel_init_order)
    except CkptmapError as e:   # the layout names its flags without "target": say which layout it is
        raise CkptmapError(f"the target layout (--target-* flags; {real} layers with weights"
                           f"{f' + {len(noop)} noop' if noop else ''}): {e}") from None


def target_vocab(src: MegatronSource, model: SourceModel, tgt: ParallelLayout, vocab_size: int | None) -> dict:
    """{global param key: target global shape} for vocabulary-padded parameters whose padded size
    changes with TP."""
    divisible = model.env.get("make_vocab_size_divisible_by", 128)
    out = {}
    for gp in model.params.values():
        if not gp.sharding.vocab_padded:
            continue
        rows = gp.global_shape[gp.sharding.dim]
        true = vocab_size or getattr(src.args, "vocab_size", None)
        if true is None:   # any true size the source padding allows, if they all pad to the same target size
            low = rows - divisible * src.layout.tp + 1
            choices = {padded_vocab_size(v, divisible, tgt.tp) for v in range(max(low, 1), rows + 1)}
            if len(choices) != 1:
                raise CkptmapError(
                    f"{gp.key}: the padded vocabulary ({rows} rows at TP {src.layout.tp}, make_vocab_size_divisible_by "
                    f"{divisible}) pads to {sorted(choices)[:4]}… rows at TP {tgt.tp} depending on the true vocabulary "
                    f"size, which the checkpoint's args do not record; pass --vocab-size")
            new_rows = choices.pop()
        else:
            if padded_vocab_size(true, divisible, src.layout.tp) != rows:
                raise CkptmapError(f"{gp.key}: {rows} rows, but vocabulary {true} padded for TP {src.layout.tp} gives "
                                   f"{padded_vocab_size(true, divisible, src.layout.tp)}; check --vocab-size")
            new_rows = padded_vocab_size(true, divisible, tgt.tp)
        shape = list(gp.global_shape)
        shape[gp.sharding.dim] = new_rows
        out[gp.key] = tuple(shape)
    return out


def check_target(model: SourceModel, tgt: ParallelLayout, shapes: dict) -> None:
    """Every target size must divide what it cuts: named dimension, never a silent guess. The model's
    counts (query groups, heads, experts) first — they say why — then every tensor's cut dimension."""
    env = model.env
    groups = env.get("num_query_groups") if env.get("group_query_attention") else None
    if groups and groups % tgt.tp:
        raise CkptmapError(f"--target-tp-size {tgt.tp} does not divide the {groups} query groups (args.num_query_groups); "
                           f"tensor parallelism splits attention by query group — choose a divisor of {groups}")
    heads = env.get("num_attention_heads")
    if heads and heads % tgt.tp:
        raise CkptmapError(f"--target-tp-size {tgt.tp} does not divide the {heads} attention heads "
                           f"(args.num_attention_heads); choose a divisor of {heads}")
    if model.num_experts and model.num_experts % tgt.ep:
        raise CkptmapError(f"--target-ep-size {tgt.ep} does not divide the {model.num_experts} experts "
                           f"(args.num_experts); choose a divisor of {model.num_experts}")
    for gp in model.params.values():
        gp.sharding.check(shapes.get(gp.key, gp.global_shape), tgt.tp, f"{gp.key} ({gp.rule.loc}), --target-tp-size")


@planning
def compile_reshard(opt: ReshardOptions) -> Plan:
    src = MegatronSource(SourceOptions(megatron_path=opt.megatron_path, param_map_path=opt.param_map_path,
                                       rules=opt.rules, megatron_version=opt.megatron_version,
                                       main_param_check=opt.main_param_check, noop=tuple(opt.noop),
                                       parallel_init_order=opt.parallel_init_order))
    if "msadapter" in src.dialects:
        raise CkptmapError(f"{src.ckdir.root}: the checkpoint is in MSAdapter's torch dialect (MindSpeed-Core-MS); reshard "
                           f"writes stock Megatron files — convert it first (ckptmap convert --from msadapter --to torch "
                           f"--src … --dst …), reshard that, and convert back with --to msadapter if needed")
    if not opt.convert_param_only:
        src.with_optimizer()
    model = SourceModel(src)
    tgt = target_layout(src, opt)
    shapes = target_vocab(src, model, tgt, opt.vocab_size)
    check_target(model, tgt, shapes)
    blocks = _target_blocks(src, opt)
    stage_note = _check_stage_list(src, opt, tgt, blocks)
    policies = _group_policies(src, opt, blocks)
    notes: list = []
    iteration = src.iteration
    iter_dir = megatron_folders.iter_dir_name(iteration)
    files: list[FileTask] = []
    keys: dict = {}
    ep_named = tgt.ep > 1
    for pp in range(tgt.pp):
        for ep in range(tgt.ep):
            for tp in range(tgt.tp):
                rank_dir = f"{iter_dir}/{megatron_folders.mp_rank_dir_name(tp, pp, tgt.pp, ep if ep_named else None)}"
                chunks = [_target_chunk(model, src, tgt, shapes, tp, pp, v, ep, keys) for v in range(tgt.vpp)]
                optim = None if opt.convert_param_only else \
                    _optim_task(src, model, tgt, shapes, rank_dir, tp, pp, ep, chunks, blocks, keys)
                files.append(_model_task(src, model, tgt, shapes, rank_dir, tp, pp, ep, chunks, policies, notes,
                                         optim[2] if optim else None))
                if optim is not None:
                    optim_task, maps, _ = optim
                    files.append(optim_task)
                    files.extend(FileTask(f"{iter_dir}/{megatron_folders.PARAM_MAP_DIR}/"
                                          f"{param_map.param_map_file_name(b, d, tp, pp, v, ep if ep_named else None)}",
                                          "text", text=param_map.param_map_text(bl.slots))
                                 for v, b, bl, expert in maps for d in range(tgt.expert_dp if expert else tgt.dp))
    files.append(FileTask(megatron_folders.TRACKER, "text", text=str(iteration)))
    info = src.info()
    if stage_note:
        info["target_stage_note"] = stage_note
    if notes:
        info["param_groups_note"] = "; ".join(notes)
    if tgt.noop != src.layout.noop and not (src.rules.layers and src.rules.layers.noop_arg):
        info["target_noop_note"] = (f"noop layers {sorted(tgt.noop)} are not recorded in the checkpoint (the rules "
                                    f"name no `noop =` args entry): pass --noop {' '.join(map(str, sorted(tgt.noop)))}"
                                    f" when reading it")
    changes = [f"{k} {getattr(src.layout, k)}->{getattr(tgt, k)}" for k in ("tp", "pp", "vpp", "dp", "ep")
               if getattr(src.layout, k) != getattr(tgt, k)]
    if tgt.noop != src.layout.noop:
        changes.append(f"noop {sorted(src.layout.noop)}->{sorted(tgt.noop)}")
    if tgt.stage_list != src.layout.stage_list:
        changes.append(f"stages {','.join(map(str, src.layout.stage_list or ())) or 'even'}->"
                       f"{','.join(map(str, tgt.stage_list or ())) or 'even'}")
    info.update(layout_change=", ".join(changes) or "none", target_noop=sorted(tgt.noop))
    info.update(target=tgt.describe(), target_layout=" / ".join(b.label for b in blocks) or "-",
                mode="weights only" if opt.convert_param_only else "weights + distributed optimizer")
    if shapes:
        info["vocabulary"] = ", ".join(f"{k} {list(model.params[k].global_shape)} -> {list(v)}"
                                       for k, v in shapes.items() if tuple(v) != model.params[k].global_shape) or "same"
    return Plan("reshard", str(Path(opt.output_path)), tuple(files), info)


def _check_stage_list(src: MegatronSource, opt: ReshardOptions, tgt: ParallelLayout, blocks: list) -> str | None:
    """--target-stage-list: where the Megatron versions that may load the target can build those
    stages (the rules' ``uneven_stages``), refused naming why where none can; the note says how to
    load and read the result (the layers per stage are not in the checkpoint's args)."""
    stages = opt.target_stage_list
    if not stages:
        return None
    listed = ",".join(map(str, stages))
    if tgt.vpp > 1:
        raise CkptmapError(f"--target-stage-list {listed} with --target-vpp-size {tgt.vpp}: ckptmap reshards uneven "
                           f"pipeline stages without interleaving only (Megatron 0.9 - 0.10 cannot interleave them, "
                           f"later versions split each stage's layers over its chunks in their own way); use "
                           f"--target-vpp-size 1")
    read = f"read it with ckptmap --stage-list {listed}"
    if opt.intermediate:   # MindSpeed's --num-layer-list takes any list
        return None
    if not blocks:   # --convert-param-only: the named version's block, else any version's
        blocks = [b for b in src.rules.bucket_layouts("megatron")
                  if not opt.target_megatron_version or b.covers(opt.target_megatron_version)]
    able = [b for b in blocks if b.uneven_stages == "first_last"]
    if not able:
        raise CkptmapError(f"--target-stage-list {listed}: the Megatron versions that may load it "
                           f"({', '.join(b.label for b in blocks)}) build num_layers / PP layers on every pipeline "
                           f"stage, so none of them loads the target; name a later --target-megatron-version "
                           f"(0.9+ let the first and last stage differ), or give --target-pp-size alone")
    middle = stages[1:-1]
    if len(set(middle)) > 1:
        raise CkptmapError(f"--target-stage-list {listed}: Megatron gives the first and the last pipeline stage their "
                           f"own number of layers (--decoder-first-pipeline-num-layers / "
                           f"--decoder-last-pipeline-num-layers) and splits the rest evenly, but the middle stages "
                           f"here hold {', '.join(map(str, middle))}; use equal middle stages (MindSpeed's "
                           f"--num-layer-list takes any list: pt2ms --target-stage-list)")
    note = (f"load with --decoder-first-pipeline-num-layers {stages[0]} --decoder-last-pipeline-num-layers "
            f"{stages[-1]} (the checkpoint's args do not record them); {read}")
    if len(able) < len(blocks):
        note += (f"; {', '.join(b.label for b in blocks if b not in able)} cannot build uneven stages (pass "
                 f"--target-megatron-version to say which loads it)")
    return note


def _target_blocks(src: MegatronSource, opt: ReshardOptions) -> list:
    """The bucket layouts the target may use: the given version's, else every version the source
    fits (they agree on the source's layout; the target's is checked to agree too)."""
    if opt.convert_param_only:
        return []
    if opt.target_megatron_version:
        return [src.rules.bucket_layout("megatron", opt.target_megatron_version)]
    if src.chosen.get("block") is None:   # per-bucket buffers read from param_map files: no version was matched
        raise CkptmapError(f"{src.ckdir.root}: the source's bucket layout comes from its param_map files, which do not "
                           f"say which Megatron version laid it out, and the target's buffers must be laid out by one; "
                           f"name the version that will load the target with --target-megatron-version (e.g. 0.6)")
    return src.fitting_blocks()


def _build_target_buffer(blocks: list, entries: list, values: dict, where: str):
    """The target buffer's layout; versions that lay it out differently (or cannot) must be told
    apart by --target-megatron-version."""
    built, failed = [], []
    for block in blocks:
        try:
            built.append((block, buckets.build_buffer(block, entries, buckets.layout_env(block, values))))
        except buckets.UnfaithfulLayout as e:
            failed.append((block, e))
    if failed and (not built or len(blocks) == 1):
        raise CkptmapError(f"{where}: {failed[0][1]}")
    first = built[0][1] if built else None
    if failed or any(not buckets.same_slots(first, bl) or bl.per_bucket_numel != first.per_bucket_numel
                     for _, bl in built[1:]):
        raise CkptmapError(
            f"{where}: the source checkpoint fits {', '.join(b.label for b in blocks)}, whose distributed optimizers "
            f"lay this target buffer out differently; say which version will load it with --target-megatron-version")
    return built[0][0], first


def _target_chunk(model, src, tgt, shapes, tp, pp, v, ep, keys) -> list[tuple]:
    """Leaves of target chunk (pp, v) of target rank (tp, ep), in Megatron's state-dict order:
    [(path, TensorTask of the weight shard, GlobalParam) | (path, None, Leaf to copy the value of)]."""
    s = src.layout
    out = []
    first, last = (pp, v) == (0, 0), (pp, v) == (tgt.pp - 1, tgt.vpp - 1)
    if first:
        out += _entries(model, src, tgt, shapes, tp, model.edge_leaves("pre"), keys)
    source_layer = dict(zip(tgt.stored_layers(), s.stored_layers()))   # the k-th real layer stays the k-th
    for local, g in enumerate(tgt.megatron_layers(pp, v)):
        leaves = [leaf.renamed(model.names, LAYER, local)
                  for leaf in _layer_leaves_for(model, source_layer[g], ep, tgt)]
        out += _entries(model, src, tgt, shapes, tp, leaves, keys)
    if last:
        post = model.edge_leaves("post")
        if _tied(model) and tgt.pp == 1 and s.pp > 1:   # one stage: the embedding is the output layer
            post = [leaf for leaf in post if not (leaf.gp and leaf.gp.rule.shared_embedding)]
        out += _entries(model, src, tgt, shapes, tp, post, keys)
        if _tied(model) and tgt.pp > 1 and s.pp == 1:
            out = _with_head_copy(model, src, tgt, shapes, tp, out, keys)
    return out


def _with_head_copy(model, src, tgt, shapes, tp, entries, keys) -> list[tuple]:
    """Tied embeddings on several stages: the last stage holds its own copy of the word embeddings
    (the rules' other ``shared_embedding`` parameter, e.g. ``output_layer.weight``), which Megatron
    keeps equal to the first stage's — weight, fp32 main param and Adam moments alike, as both see the
    same all-reduced gradient. A one-stage source has only the embedding; the copy is made from it and
    placed where Megatron's state dict has it (before its module's ``_extra_state``, else last)."""
    embedding = next(leaf.gp for leaf in model.edge_leaves("pre") if leaf.gp and leaf.gp.rule.shared_embedding)
    copies = [r for r in src.rules.params if r.shared_embedding and r is not embedding.rule]
    literal = [r for r in copies if all(seg.kind == "literal" for seg in r.megatron.segments)]
    if len(literal) != 1:
        raise CkptmapError(f"resharding tied embeddings onto {tgt.pp} pipeline stages needs the name of the last stage's "
                           f"copy of {embedding.key}: the rules ({src.rules.name}) must mark exactly one other plain "
                           f"parameter `shared_embedding`; they mark {[str(r.megatron) for r in copies] or 'none'}")
    rule = literal[0]
    name = str(rule.megatron)
    prefix, _, last = name.rpartition(".")
    extra = f"{prefix}._extra_state"
    at = next((i for i, (p, w, _) in enumerate(entries) if w is None and ".".join(map(str, p)) == extra), None)
    if at is not None:    # the module's other entry shows how the file nests its keys
        extra_path = tuple(entries[at][0])
        path = extra_path[:-1] + (extra_path[-1][:-len("_extra_state")] + last,)
    elif all(len(p) == 1 for p, _, _ in entries):   # a flat state dict (megatron.core)
        path, at = (name,), len(entries)
    else:                                           # nested by module (legacy: word_embeddings_for_head/weight)
        path, at = tuple(name.split(".")), len(entries)
    copy = attrs.evolve(embedding, rule=rule)   # the embedding's shards and sharding, the copy's rule (ddp name)
    weight = target_tensor(copy, "weight", shapes.get(embedding.key, embedding.global_shape), tgt.tp, tp, name, src,
                           keys)
    return entries[:at] + [(path, weight, copy)] + entries[at:]


def _tied(model) -> bool:
    return not model.env.get("untie_embeddings_and_output_weights") and any(
        gp.rule.shared_embedding for gp in model.params.values())


def _layer_leaves_for(model, g, ep, tgt) -> list[Leaf]:
    """The leaves of global layer g as target expert rank ``ep`` holds them: the dense leaves of
    expert rank 0 and, in place of its experts, this rank's experts (from whichever source expert
    rank holds them), numbered locally."""
    base = model.layer_leaves(g, 0)
    if not model.num_experts:
        return base
    firsts = [i for i, leaf in enumerate(base) if leaf.expert is not None]
    if not firsts:
        return base
    src_per = model.num_experts // model.src.layout.ep
    tgt_per = model.num_experts // tgt.ep
    template = [leaf for leaf in base if leaf.expert == 0]
    out = list(base[:firsts[0]])
    for j in range(tgt_per):
        e = ep * tgt_per + j
        src_ep, src_local = divmod(e, src_per)
        theirs = {leaf.dotted: leaf for leaf in model.layer_leaves(g, src_ep) if leaf.expert == src_local}
        for leaf in template:
            want = ".".join(model.names.renumber(list(leaf.path), EXPERT, src_local))
            found = theirs.get(want)
            if found is None:
                raise CkptmapError(f"layer {g}: expert {e} (local {src_local} of expert rank {src_ep}) has no {want}; "
                                   f"the experts of the checkpoint differ in structure")
            out.append(found.renamed(model.names, EXPERT, j))
    return out + [leaf for leaf in base[firsts[-1] + 1:] if leaf.expert is None]


def _entries(model, src, tgt, shapes, tp, leaves, keys) -> list[tuple]:
    out = []
    for leaf in leaves:
        if leaf.gp is None:   # _extra_state and other non-tensors: copied from the rank that held them
            out.append((leaf.path, None, leaf))
            continue
        gp = leaf.gp
        weight = target_tensor(gp, "weight", shapes.get(gp.key, gp.global_shape), tgt.tp, tp,
                               ".".join(map(str, leaf.path)), src, keys)
        out.append((leaf.path, weight, gp))
    return out


def _chunk_keys(vpp: int) -> list[str]:
    return ["model"] if vpp == 1 else [f"model{v}" for v in range(vpp)]


def _template_rank(src, tp, pp, ep):
    """The source rank whose non-model entries (args, scheduler, optimizer hyper-parameters, RNG
    states) a target rank takes: the one at the same position modulo the source sizes."""
    s = src.layout
    return src.ranks[(tp % s.tp, min(pp, s.pp - 1), ep % s.ep)]


def _args_updates(src, tgt, shapes, model) -> dict:
    per_chunk = tgt.num_layers // (tgt.pp * tgt.vpp)
    out = {"tensor_model_parallel_size": tgt.tp, "pipeline_model_parallel_size": tgt.pp,
           "transformer_pipeline_model_parallel_size": tgt.pp,
           "virtual_pipeline_model_parallel_size": tgt.vpp if tgt.vpp > 1 else None,
           "num_layers_per_virtual_pipeline_stage": per_chunk if tgt.vpp > 1 else None,
           "data_parallel_size": tgt.dp, "expert_model_parallel_size": tgt.ep,
           "world_size": tgt.tp * tgt.pp * tgt.dp * tgt.cp}
    for key, shape in shapes.items():
        gp = model.params[key]
        out["padded_vocab_size"] = shape[gp.sharding.dim]
    layers = src.rules.layers
    if layers and layers.noop_arg and tgt.noop != src.layout.noop:   # the rules say where args list noop layers
        old = getattr(src.args, layers.noop_arg, None)
        out[layers.noop_arg] = (type(old) if isinstance(old, (list, tuple, set)) else list)(sorted(tgt.noop))
    present = vars(src.args) if src.args is not None else {}
    return {k: v for k, v in out.items() if k in present}


def _model_task(src, model, tgt, shapes, rank_dir, tp, pp, ep, chunks, policies, notes, layouts=None) -> FileTask:
    """The target rank's model_optim_rng.pt. With the DDP buffer ``layouts`` of the rank (the
    distributed optimizer's), every weight is a view of its buffer's storage at the parameter's
    offset, padding zero — the storages Megatron's save writes (its params live in the DDP param
    buffer); without (--convert-param-only), one storage per weight."""
    template = _template_rank(src, tp, pp, ep)
    storages, entries = [], []
    views = {}          # (chunk, ddp name) -> (buffer storage key, offset, buffer numel)
    pieces: dict = {}   # buffer storage key -> (dtype, numel, [(offset, weight task)])
    for v, dtype, bl in layouts or ():
        key = f"b{len(pieces)}"
        numel = bl.buckets[-1].start + bl.buckets[-1].numel if bl.buckets else 0
        pieces[key] = (dtype, numel, [])
        for slot in bl.slots:
            views[(v, slot.name)] = (key, slot.start, numel)
    for v, (key, leaves) in enumerate(zip(_chunk_keys(tgt.vpp), chunks)):
        rows = []
        for path, weight, other in leaves:
            if weight is None:
                leaf = other
                rows.append({"path": list(path), "from": [str(leaf.rank.model.path), leaf.chunk_key,
                                                          list(leaf.stored_path)]})
                continue
            row = {"path": list(path), "dtype": weight.dtype, "shape": list(weight.shape)}
            view = views.get((v, _ddp_name(other.rule, path))) if layouts is not None else None
            if view is not None:
                storage, offset, numel = view
                pieces[storage][2].extend((offset + o, t) for o, t in byte_copy_pieces(weight))
                row.update(tensor=storage, offset=offset, storage_numel=numel)
            else:
                if layouts is not None:
                    raise CkptmapError(f"internal error: {rank_dir} chunk {v}: {'.'.join(map(str, path))} is in no "
                                       f"DDP buffer of the target layout")
                storage = f"w{len(storages)}"
                storages.append(StorageTask(storage, weight.dtype, math.prod(weight.shape),
                                            tuple(StoragePiece(o, t) for o, t in byte_copy_pieces(weight))))
                row.update(tensor=storage)
            rows.append(row)
        entry = {"key": key, "leaves": rows}
        metadata = _chunk_metadata(model, src, tgt, pp, v, ep)
        if metadata is not None:
            entry["metadata"] = metadata
        entries.append(entry)
    for key, (dtype, numel, parts) in pieces.items():
        _state_storage(storages, parts, numel, dtype, key)
    how = _optimizer_entry(src, model, tgt, pp)
    orders, note = _param_group_orders(src, model, tgt, pp, template, chunks, how, policies, rank_dir)
    if note and note not in notes:
        notes.append(note)
    recipe = {"template": str(template.model.path), "args": _args_updates(src, tgt, shapes, model),
              "chunks": entries, "optimizer_entry": how, "param_groups": orders}
    return FileTask(f"{rank_dir}/{megatron_folders.MODEL_FILE}", "megatron_model", storages=tuple(storages),
                    extra=recipe)


def _source_metadata(src, rank, chunk):
    """The ``_metadata`` (module prefix -> {"version": …}, in module order) torch's ``state_dict()``
    attaches to a source chunk's state dict, as [(prefix, value)], or None."""
    key = dict((c, k) for k, c in rank.model.chunks())[chunk]
    md = getattr(rank.model.root[key], "_metadata", None)
    return list(md.items()) if md is not None else None


def _renumbered(names, kind, key: str, new: int) -> str:
    hit = names.find(kind, key + ".")
    return key if hit is None else key[:hit[1]] + str(new) + key[hit[2]:]


def _chunk_metadata(model, src, tgt, pp, v, ep) -> list | None:
    """The state dict ``_metadata`` of target chunk (pp, v), so that the file is the one Megatron
    saves: the source's module prefixes before the layers (without the first stage's own modules,
    e.g. the embedding, on other chunks), each layer's modules renumbered (an expert layer's experts
    as many as the target expert rank holds), then the last chunk's modules after the layers."""
    s = src.layout
    first_md = _source_metadata(src, src.ranks[(0, 0, 0)], 0)
    last_md = _source_metadata(src, src.ranks[(0, s.pp - 1, 0)], s.vpp - 1)
    if first_md is None or last_md is None:
        return None
    names = model.names

    def layer(key):
        hit = names.find(LAYER, key + ".")
        return hit[0] if hit else None

    def split(md):
        at = [i for i, (k, _) in enumerate(md) if layer(k) is not None]
        return (md, []) if not at else (md[:at[0]], md[at[-1] + 1:])

    pre, _ = split(first_md)
    _, post = split(last_md)
    first, last = (pp, v) == (0, 0), (pp, v) == (tgt.pp - 1, tgt.vpp - 1)
    if not first:   # top-level modules that hold the first stage's edge parameters and no layer
        edge = {leaf.dotted.split(".")[0] for leaf in model.edge_leaves("pre")}
        layered = {leaf.dotted.split(".")[0] for r in src.ranks.values() for c in range(s.vpp)
                   for leaf in model.leaves(r, c) if leaf.layer is not None}
        pre = [(k, x) for k, x in pre if k.split(".")[0] not in edge - layered]
    out = list(pre)
    source_layer = dict(zip(tgt.stored_layers(), s.stored_layers()))
    for local, g in enumerate(tgt.megatron_layers(pp, v)):
        spp, sv, slocal = s.locate_layer(source_layer[g])
        md = _source_metadata(src, src.ranks[(0, spp, 0)], sv) or []
        rows = [(_renumbered(names, LAYER, k, local), x) for k, x in md if layer(k) == slocal]
        if model.num_experts and tgt.ep != s.ep:   # expert 0's modules, once per local expert of the target
            experts = [i for i, (k, _) in enumerate(rows) if names.find(EXPERT, k + ".") is not None]
            if experts:
                template = [(k, x) for k, x in rows if (names.find(EXPERT, k + ".") or (None,))[0] == 0]
                copies = [(_renumbered(names, EXPERT, k, j), x) for j in range(model.num_experts // tgt.ep)
                          for k, x in template]
                rows = rows[:experts[0]] + copies + rows[experts[-1] + 1:]
        out += rows
    if last:
        out += post
    return [[k, dict(x) if isinstance(x, dict) else x] for k, x in out]


def _param_group_orders(src, model, tgt, pp, template, chunks, how, policies, where):
    """Per optimizer of the target rank (dense[, expert]), the template's saved param groups in the
    order this rank's Megatron builds them (``param_groups.group_order``); None: keep them as saved."""
    entry = template.model.root.get("optimizer")
    if not isinstance(entry, (dict, list)) or not policies:
        return None, None
    entries = entry if isinstance(entry, list) else [entry]
    chained = how == "chain" or (how == "keep" and isinstance(entry, list))
    saved = [entries[0], entries[-1]] if chained else [entries[0]]
    params = [[] for _ in saved]
    for leaves in chunks:
        for path, weight, gp in leaves:
            if weight is None:
                continue
            expert = chained and any(seg.kind == EXPERT for seg in gp.rule.megatron.segments)
            params[int(expert)].append(param_groups.GroupParam(".".join(map(str, path)), tuple(weight.shape),
                                                               bool(gp.rule.shared_embedding)))
    orders, notes = [], []
    for i, (e, ps) in enumerate(zip(saved, params)):
        groups = ((e or {}).get("optimizer") or {}).get("param_groups") if isinstance(e, dict) else None
        order, note = param_groups.group_order(policies, groups, ps, f"{where} optimizer {i}")
        orders.append(order)
        if note:
            notes.append(note)
    return (orders if any(o is not None for o in orders) else None), "; ".join(notes) or None


def _group_policies(src, opt, blocks) -> list:
    """The ``param_groups`` blocks of the versions that may load the target."""
    if opt.target_megatron_version:
        return [p for p in src.rules.param_group_policies("megatron") if p.covers(opt.target_megatron_version)]
    if blocks:
        out = []
        for b in blocks:
            out += [p for p in src.rules.param_group_policies(b.name, b.versions) if p not in out]
        return out
    return src.rules.param_group_policies("megatron")


def _optimizer_entry(src, model, tgt, pp) -> str:
    """How the template's ``optimizer`` entry changes: a ChainedOptimizer's list where the target
    separates expert parameters and the source did not, or the other way round."""
    block = src.chosen.get("block")
    if block is None or not model.num_experts:
        return "keep"
    source_chained = any(r.optim is not None and r.optim.chained for r in src.ranks.values())
    target_chained = block.separate_experts(_layout_values(src, tgt, pp, 0, expert=False))
    if source_chained == target_chained:
        return "keep"
    return "chain" if target_chained else "dense_only"


def _optim_task(src, model, tgt, shapes, rank_dir, tp, pp, ep, chunks, blocks, keys):
    """The target rank's distrib_optim.pt: its DDP buffers laid out by ``blocks`` at the target sizes
    (dense buffers per chunk, then expert buffers; a ChainedOptimizer [dense, expert] list when the
    model has experts, dense state only in expert rank 0's folder), each state tensor assembled
    from the parameters' target shards."""
    block = blocks[0]   # the candidates agree on everything but buffer layouts, checked per buffer below
    expert_model = bool(model.num_experts) and block.separate_experts(_layout_values(src, tgt, pp, 0, expert=False))
    parts = {False: [], True: []}     # expert? -> [(chunk, dtype, [(ddp name, gp, shard shape, path)])]
    for v, leaves in enumerate(chunks):
        groups = {False: {}, True: {}}
        for path, weight, gp in leaves:
            if weight is None:
                continue
            is_expert = expert_model and any(seg.kind == EXPERT for seg in gp.rule.megatron.segments)
            ddp = _ddp_name(gp.rule, path)
            groups[is_expert].setdefault(gp.dtype, []).append((ddp, gp, weight.shape, path))
        for kind in (False, True):
            for dtype, params in groups[kind].items():
                parts[kind].append((v, dtype, params))
    buffers = []   # (optimizer index or None, [(chunk, dtype, params)], state written here)
    if expert_model:
        buffers.append((0, parts[False], ep == 0))   # the dense state is in expert rank 0's folder
        buffers.append((1, parts[True], True))
    else:
        buffers.append((None, parts[False], True))
    storages, optimizers, maps, layouts = [], [], [], []
    grad_key = _grad_dtype_key(src)
    for opt_index, groups, written in buffers:
        bufs = []
        for v, dtype, params in groups:
            values = _layout_values(src, tgt, pp, v, expert=opt_index == 1)
            entries = [buckets.ParamEntry(ddp, shape, dtype, gp.rule.shared_embedding) for ddp, gp, shape, _ in params]
            block, bl = _build_target_buffer(blocks, entries, values, f"{rank_dir} chunk {v} {dtype} buffer")
            layouts.append((v, dtype, bl))
            if not written:
                continue
            maps.append((v, sum(1 for m in maps if m[0] == v), bl, opt_index == 1))
            by_name = {ddp: (gp, path) for ddp, gp, _, path in params}
            tensors = {}
            for state in STATES:
                names = []
                if block.storage == megatron_files.COALESCED:
                    pieces = []
                    for slot in bl.slots:
                        gp, path = by_name[slot.name]
                        task = target_tensor(gp, state, shapes.get(gp.key, gp.global_shape), tgt.tp, tp,
                                             f"{state} of {'.'.join(map(str, path))}", src, keys, "float32")
                        pieces += [(bl.coalesced_offset(slot) + o, t) for o, t in byte_copy_pieces(task)]
                    names.append(_state_storage(storages, pieces, bl.numel_unpadded))
                else:
                    for j, bucket in enumerate(bl.buckets):
                        pieces = []
                        for slot in bl.slots:
                            if slot.bucket != j:
                                continue
                            gp, path = by_name[slot.name]
                            task = target_tensor(gp, state, shapes.get(gp.key, gp.global_shape), tgt.tp, tp,
                                                 f"{state} of {'.'.join(map(str, path))}", src, keys, "float32")
                            pieces += [(slot.start - bucket.start + o, t) for o, t in byte_copy_pieces(task)]
                        names.append(_state_storage(storages, pieces, bucket.numel))
                tensors[state] = names
            bufs.append({"param_dtype": dtype, "grad_dtype": grad_key, "storage": block.storage,
                         "padded": bl.per_bucket_numel, "unpadded": bl.per_bucket_numel_unpadded,
                         "numel_unpadded": bl.numel_unpadded, "tensors": tensors})
        optimizers.append({"buffers": bufs} if written else None)
    recipe = {"chained": expert_model, "optimizers": optimizers}
    task = FileTask(f"{rank_dir}/{megatron_folders.OPTIM_FILE}", "megatron_optim", storages=tuple(storages),
                    extra=recipe)
    return task, maps, layouts


def _ddp_name(rule, path) -> str:
    """The parameter's name in the DDP buffer / param_map: the rule's ``ddp:`` pattern, else the DDP
    wrapper's ``module.`` in front of the state-dict name."""
    dotted = ".".join(map(str, path))
    if rule.ddp is None:
        return "module." + dotted
    bindings = rule.megatron.match(dotted)
    if bindings is None:
        raise CkptmapError(f"internal error: {dotted} does not match its rule {rule.megatron} ({rule.loc})")
    return rule.ddp.format(bindings)


def _state_storage(storages: list, pieces: list, numel: int, dtype: str = "float32", key: str | None = None) -> str:
    """A storage of ``numel`` elements: the pieces at their offsets, zeros in between (Megatron's
    buffers are zero-initialised; padding and alignment gaps are never written)."""
    out, pos = [], 0
    for offset, task in sorted(pieces, key=lambda p: p[0]):
        if offset > pos:
            out.append(StoragePiece(pos, TensorTask("padding", dtype, (offset - pos,), value=0.0)))
        out.append(StoragePiece(offset, task))
        pos = offset + math.prod(task.shape)
    if pos < numel:
        out.append(StoragePiece(pos, TensorTask("padding", dtype, (numel - pos,), value=0.0)))
    key = key or f"s{len(storages)}"
    storages.append(StorageTask(key, dtype, numel, tuple(out)))
    return key


def _grad_dtype_key(src) -> str:
    """The grad dtype of the source's buffers (the second element of distrib_optim.pt's dtype key)."""
    for rank in src.ranks.values():
        if rank.optim is not None and rank.optim.buffers:
            from ckptmap.formats.safe_unpickler import dtype_name
            return dtype_name(rank.optim.buffers[0].dtype_key[1]) or "float32"
    return "float32"


def _layout_values(src, tgt, pp, v, expert: bool) -> dict:
    args = src.args
    values = {k: x for k, x in vars(args).items() if isinstance(x, (int, bool))} if args else {}
    dp_group = tgt.dp * tgt.cp // (tgt.ep if expert else 1)
    values.update(dp=tgt.dp, cp=tgt.cp, ep=tgt.ep, dp_group=dp_group, pp=tgt.pp, pp_rank=pp, chunk=v,
                  bucket_size=getattr(args, "ddp_bucket_size", None),
                  overlap_grad_reduce=bool(getattr(args, "overlap_grad_reduce", False)),
                  untie_embeddings_and_output_weights=bool(getattr(args, "untie_embeddings_and_output_weights", False)))
    return values
