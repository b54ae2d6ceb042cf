"""Reading a Megatron legacy checkpoint for a conversion: its folders, every rank's model tensors
matched to the rules, the run's parallel layout, and where every parameter's distributed-optimizer
state lies (the bucket layout of the checkpoint's Megatron version, from a param_map or derived from
the rules' `buckets megatron` blocks). Every check that can fail on bad input runs here, before
anything is written. ``pt2ms`` (compiler.py), ``reshard`` and ``verify`` build on it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from collections import defaultdict
from pathlib import Path

import attrs
import numpy as np

from ckptmap.errors import CkptmapError
from ckptmap.formats import dialect_translate, megatron_files, megatron_folders, param_map, torch_zip_reader
from ckptmap.mapping import buckets
from ckptmap.mapping import ops as tensor_ops
from ckptmap.mapping.layout import ParallelLayout, stage_major
from ckptmap.mapping.plan import INPUT_PREFIX, FileTask, SourceSlice, concat_range
from ckptmap.mapping.rules import EXPERT, LAYER, ParamRule, RuleSet, bundled_rules, load_rules, resolve_rules


AUTO_RULES = "auto"


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


MAX_LISTED = 12


def listing(names, limit=MAX_LISTED) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


@attrs.frozen
class _Matched:
    tensor: megatron_files.ModelTensor
    rule: ParamRule
    bindings: dict


class RankMemo:
    """What is the same on every rank, worked out once per compile: the rules a tensor name
    matches (and their bindings), and a matched tensor's DDP name. Both depend on the tensor name
    alone (for one rule set), and the same names recur on every rank -- layer numbers are local
    to a pipeline chunk -- so with thousands of ranks this turns ranks x tensors x rules pattern
    matches into (distinct names) x rules."""

    def __init__(self):
        self.hits: dict[str, list] = {}
        self.ddp: dict[str, str] = {}
        self.state_names: dict[tuple, str] = {}   # (optimizer state, MindSpore name) -> the state's key
        self.state_keys: dict[tuple, tuple] = {}  # (id(OptimBuffer), state, bucket) -> (buffer, its flat key)
        self.weight_parts: dict[tuple, list] = {}  # see compiler._weight_parts


def match_rules(rules: RuleSet, tensors, path, memo: RankMemo | None = None) -> tuple[list[_Matched], list[str]]:
    matched, unmatched = [], []
    for t in tensors:
        hits = memo.hits.get(t.name) if memo is not None else None
        if hits is None:
            hits = [(r, b) for r in rules.params if (b := r.megatron.match(t.name)) is not None]
            if memo is not None:
                memo.hits[t.name] = hits   # bindings are shared between ranks: read them, never change them
        if not hits:
            unmatched.append(t.name)
            continue
        if len(hits) > 1:
            raise CkptmapError(
                f"{path}: tensor {t.name} matches {len(hits)} rules in {rules.path} "
                f"({'; '.join(f'{r.loc}: {r.megatron}' for r, _ in hits)}); make the patterns disjoint")
        matched.append(_Matched(t, hits[0][0], hits[0][1]))
    return matched, unmatched


def ddp_name(m: _Matched, memo: RankMemo | None = None) -> str:
    """The matched tensor's name in Megatron's DDP buffer / param_map."""
    if memo is None:
        return m.rule.ddp_pattern().format(m.bindings)
    name = memo.ddp.get(m.tensor.name)
    if name is None:
        name = memo.ddp[m.tensor.name] = m.rule.ddp_pattern().format(m.bindings)
    return name


def choose_rules(option: str, tensors, path) -> RuleSet:
    if option != AUTO_RULES:
        return resolve_rules(option)
    fits = []
    for name, rules_path in bundled_rules().items():
        rules = load_rules(rules_path)
        _, unmatched = match_rules(rules, tensors, path)
        if not unmatched:
            fits.append(rules)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise CkptmapError(
            f"no bundled rules describe the model in {path} (first tensors: "
            f"{listing([t.name for t in tensors], 5)}); write a .rules file for it and pass --rules PATH "
            f"(`ckptmap rules list` shows the bundled ones)")
    raise CkptmapError(f"several bundled rules fit {path} ({', '.join(r.name for r in fits)}); choose one "
                       f"with --rules")


def check_size(flag: str, given, found, what: str):
    if given is not None and given != found:
        raise CkptmapError(f"{flag} {given} disagrees with the checkpoint: {what} {found}; pass {flag} "
                           f"{found} or point --megatron-path at the checkpoint you meant")


def _arg(args, name, default=None):
    value = getattr(args, name, None) if args is not None else None
    return default if value is None else value


@contextlib.contextmanager
def _no_collections():
    """Planning allocates a few hundred thousand small records per thousand ranks and frees almost
    none of them, so every collection of the cyclic GC rescans the growing plan: even with full
    collections made rare, the young-generation passes over the survivors and the one full pass cost
    1.8 of the 14.5 CPU s of a 16,384-rank dry run. Planning leaves (almost) no cycles behind — the
    records are plain attrs data and the files it reads are closed — so the cyclic GC is off while
    planning (reference counting still frees everything else) and on again after; the peak RSS of
    the 16,384-rank dry run is the same with and without it (bench/RESULTS.md)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def planning(compile_fn):
    """Decorator for a plan compiler: see _no_collections."""
    @functools.wraps(compile_fn)
    def wrapper(*args, **kwargs):
        with _no_collections():
            return compile_fn(*args, **kwargs)
    return wrapper


_TREES_KEPT = 64   # distinct model pickles kept for sharing while reading (a stage's TP x EP ranks, in order)
_SIZE_ARGS = (("tp", "tensor_model_parallel_size", "--tp-size"), ("pp", "pipeline_model_parallel_size", "--pp-size"),
              ("ep", "expert_model_parallel_size", "--ep-size"))


def check_sizes_agree(ckdir, files: dict, opt) -> None:
    """The mp_rank folders, every rank's args and the flags given must tell the same TP / PP / EP
    sizes; a disagreement is named with all three (a checkpoint whose folders were renamed or mixed
    from two runs would otherwise convert into nonsense)."""
    found = {"tp": ckdir.tp_size, "pp": ckdir.pp_size, "ep": ckdir.ep_size}
    for short, name, flag in _SIZE_ARGS:
        given = getattr(opt, f"{short}_size", None)
        said = {}
        for key, f in files.items():
            value = getattr(f.args, name, None) if f.args is not None else None
            said.setdefault(1 if value is None and short == "ep" else value, []).append(key)
        said.pop(None, None)
        values = set(said) | ({given} if given is not None else set())
        if values and values != {found[short]}:
            args_text = "; ".join(f"args of {len(keys)} rank(s) say {v}" for v, keys in sorted(said.items()))
            missing = ""
            if len(said) == 1 and next(iter(said)) > found[short]:
                want = dict(found, **{short: next(iter(said))})
                names = [megatron_folders.mp_rank_dir_name(t, p, want["pp"], e if want["ep"] > 1 else None)
                         for t in range(want["tp"]) for p in range(want["pp"]) for e in range(want["ep"])
                         if (t, p, e) not in ckdir.ranks]
                missing = f" Missing: {listing(names)}."
            raise CkptmapError(
                f"the {short.upper()} size disagrees: {ckdir.root} has mp_rank folders for {short.upper()} "
                f"{found[short]}, {args_text or 'args do not say'}"
                f"{f', and {flag} {given} was given' if given is not None else ''}.{missing} A folder may be missing "
                f"or come from another run; make them agree (the conversion needs every rank of one checkpoint)")


def _buffer_kinds(optim, has_experts: bool) -> tuple[list | None, list]:
    """Indices into ``optim.buffers`` of the dense and of the expert-parallel buffers. A
    ChainedOptimizer (MoE) lists the dense optimizer first and the expert one second; the dense one
    is absent (None) in the folders of expert ranks > 0, whose dense state the expert-rank-0 folder holds."""
    if not optim.chained:
        if has_experts:
            raise CkptmapError(f"{optim.path} holds one optimizer, but the model has expert parameters; Megatron "
                               f"writes a list (dense, expert) for MoE models — is this the right distrib_optim.pt?")
        return list(range(len(optim.buffers))), []
    by_opt: dict = {}
    for i, buf in enumerate(optim.buffers):
        by_opt.setdefault(buf.optimizer, []).append(i)
    if has_experts and set(by_opt) - {0, 1}:
        raise CkptmapError(f"{optim.path} chains {len(optim.buffers)} optimizers; ckptmap knows (dense, expert)")
    return by_opt.get(0), by_opt.get(1 if has_experts else 0, []) if has_experts else []


def _numbered(own_layouts):
    """(chunk, buffer number within the chunk, global index, layout): param_map files number a
    chunk's buffers from 0."""
    count: dict = {}
    for v, g, bl in own_layouts:
        b = count[v] = count.get(v, -1) + 1
        yield v, b, g, bl


def check_layers(layout: ParallelLayout, matched, path, tp, pp) -> None:
    found = defaultdict(set)
    for m in matched:
        if LAYER in m.bindings:
            found[m.tensor.chunk].add(m.bindings[LAYER])
    for v in range(layout.vpp):
        expected = len(layout.megatron_layers(pp, v))
        have = sorted(found.get(v, ()))
        if have != list(range(expected)):
            where = f"model chunk {v} of {path}" if layout.vpp > 1 else str(path)
            got = f"local layers {have[0]}..{have[-1]} ({len(have)} layers)" if have else "no layers"
            raise CkptmapError(
                f"{where} holds {got}, but the layout (--num-layers {layout.num_layers}, PP "
                f"{layout.pp}{f', VPP {layout.vpp}' if layout.vpp > 1 else ''}"
                f"{', --stage-list ' + ' '.join(map(str, layout.stage_list)) if layout.stage_list else ''}"
                f"{', --noop ' + ' '.join(map(str, sorted(layout.noop))) if layout.noop else ''}) expects "
                f"{expected} layers on pp stage {pp}{f' chunk {v}' if layout.vpp > 1 else ''}; fix "
                f"--num-layers / --stage-list / --noop to match the checkpoint")


def global_bindings(m: _Matched, layout, pp: int, ep: int, env: dict, where) -> dict:
    """The rule's bindings with the layer (chunk-local on the Megatron side) and the expert
    (local to the expert rank) turned into the global ids the MindSpore side uses."""
    bindings = dict(m.bindings)
    if LAYER in bindings:
        bindings[LAYER] = layout.global_layer(pp, m.tensor.chunk, bindings[LAYER])
    if EXPERT in bindings:
        num_experts = env.get("num_experts")
        if not num_experts:
            raise CkptmapError(f"{where}: {m.tensor.name} matches {m.rule.loc}, which names {{expert}}, but the "
                               f"checkpoint's args give no num_experts; cannot number the experts globally")
        bindings[EXPERT] = layout.global_expert(ep, bindings[EXPERT], num_experts)
    return bindings


def maps_by_chunk(param_maps) -> dict[tuple, list]:
    """{(tp, pp, vpp, ep or None): the dp-0 param_map files of that model chunk, by buffer}: one pass
    over the list, so that looking up a rank's maps does not scan every rank's."""
    out: dict[tuple, list] = {}
    for pm in param_maps:
        if pm.dp == 0:
            out.setdefault((pm.tp, pm.pp, pm.vpp, pm.ep), []).append(pm)
    for maps in out.values():
        maps.sort(key=lambda pm: pm.buffer)
    return out


def _read_map(pm, cache: dict | None) -> dict:
    if cache is None:
        return param_map.read_param_map(pm.path)
    entries = cache.get(pm.path)
    if entries is None:
        entries = cache[pm.path] = param_map.read_param_map(pm.path)
    return entries


def bucket_blocks(rules: RuleSet, optim, megatron_version: str | None) -> list:
    """The rules' ``buckets megatron`` blocks that may describe ``optim``: those storing buckets the way
    the file does (per bucket: core_r0.6; coalesced: 0.7+), narrowed to ``--megatron-version``."""
    every = rules.bucket_layouts("megatron")
    blocks = [b for b in every if b.storage == optim.storage]
    if megatron_version is not None:
        blocks = [b for b in blocks if b.covers(megatron_version)]
        if not blocks:
            raise CkptmapError(
                f"--megatron-version {megatron_version}: {optim.path} stores its buckets {optim.storage.replace('_', ' ')}"
                f", and no `buckets megatron` block of {rules.path} for that version does "
                f"({', '.join(f'{b.label}: {b.storage}' for b in every)}); check the version")
    if not blocks:
        raise CkptmapError(f"{optim.path} stores its buckets {optim.storage.replace('_', ' ')}, which no `buckets "
                           f"megatron` block of {rules.path} describes; add a block for that Megatron version")
    return blocks


def _layout_values(args, layout, pp, v, expert: bool) -> dict:
    """What a bucket block may refer to, for model chunk ``v`` of pipeline stage ``pp``."""
    values = {k: x for k, x in vars(args).items() if isinstance(x, (int, bool))} if args else {}
    dp_size, cp_size = _arg(args, "data_parallel_size", 1), _arg(args, "context_parallel_size", 1)
    ep_size = _arg(args, "expert_model_parallel_size", 1)
    values.update(dp=dp_size, cp=cp_size, ep=ep_size,
                  dp_group=dp_size * cp_size // ep_size if expert else dp_size * cp_size,
                  pp=layout.pp, pp_rank=pp, chunk=v, bucket_size=_arg(args, "ddp_bucket_size"),
                  overlap_grad_reduce=bool(_arg(args, "overlap_grad_reduce", False)),
                  untie_embeddings_and_output_weights=bool(_arg(args, "untie_embeddings_and_output_weights", False)))
    return values


def _fit(blocks, group, values, buf, chosen: dict):
    """The first block (the chosen one, once there is one) whose layout reproduces what ``buf``
    records; None if none does."""
    if chosen.get("candidates"):
        blocks = chosen["candidates"]
    # a pure function of the blocks, the parameters, the values and what the file records: TP and EP
    # ranks of one stage ask it the same question, so it is answered once per compile (layouts are frozen)
    memo = chosen.setdefault("fit_memo", {})
    key = (tuple(map(id, blocks)), tuple(group), tuple(sorted(values.items())), buf.storage, buf.numel_unpadded,
           buf.padded, buf.unpadded)
    found = memo.get(key)
    if found is None:
        fits, unfaithful = [], []
        for block in blocks:
            env = buckets.layout_env(block, values)
            try:
                if buf.storage == megatron_files.COALESCED:
                    laid = buckets.fit_coalesced(block, group, env, buf.numel_unpadded)
                else:
                    laid = buckets.fit_buffer(block, group, env, list(buf.padded), list(buf.unpadded))
            except buckets.UnfaithfulLayout as e:   # that version cannot have written it faithfully
                unfaithful.append(e)
                continue
            if laid is not None:
                fits.append((block, laid))
        found = memo[key] = (blocks, fits, unfaithful)   # blocks kept: their ids stay theirs
    _, fits, unfaithful = found
    if not fits:
        if unfaithful and len(unfaithful) == len(blocks):
            raise CkptmapError(f"{buf.describe}: {unfaithful[0]}")
        return None
    block, laid = fits[0]
    if len(fits) > 1 and not all(buckets.same_slots(laid, other) for _, other in fits[1:]):
        raise CkptmapError(
            f"{buf.describe}: the bucket layouts of {', '.join(b.label for b, _ in fits)} all fit it but place "
            f"parameters differently; say which Megatron version wrote the checkpoint with --megatron-version")
    # every version that fits all buffers so far stays a candidate (a reshard target may need to tell them apart)
    chosen["candidates"] = [b for b, _ in fits]
    chosen["block"] = block
    return block, laid


def _buffer_layouts(rules: RuleSet, args, matched, optim, maps_of, tp, pp, layout, explicit_maps, memo=None,
                    map_entries=None, notes=None, blocks=None, chosen=None, indices=None, expert=False):
    """[(chunk, global buffer index, BufferLayout)] for one (tp, pp) rank: from its param_map files
    when there are some, else derived from the model and the rules' `buckets megatron` block of the
    checkpoint's Megatron version — and accepted only if it reproduces what distrib_optim.pt records
    (per-bucket files: every bucket's padded and unpadded size; coalesced files: the buffer's unpadded
    total, backed by the main-param rounding check of every parameter)."""
    out = []
    indices = list(range(len(optim.buffers))) if indices is None else list(indices)
    at = 0   # next position in indices
    blocks = blocks or bucket_blocks(rules, optim, None)
    chosen = {} if chosen is None else chosen
    what = "expert-parallel " if expert else ""
    for v in range(layout.vpp):
        params: dict[str, list[buckets.ParamEntry]] = {}
        for m in matched:
            if m.tensor.chunk == v:
                params.setdefault(m.tensor.dtype, []).append(buckets.ParamEntry(
                    ddp_name(m, memo), m.tensor.shape, m.tensor.dtype, m.rule.shared_embedding))
        maps = maps_of.get((tp, pp, v, None), [])
        if explicit_maps and not maps:
            raise CkptmapError(
                f"--param-map-path has no param_map_buffer*_dp0tp{tp}pp{pp}vpp{v}.json for tp rank {tp}, pp rank "
                f"{pp}, chunk {v}; pass the folder with every rank's files, or leave --param-map-path out to "
                f"derive the layout from the checkpoint")
        stale = None
        if maps:
            try:
                chunk_layouts = []
                for i, pm in enumerate(maps):
                    if at + i >= len(indices):
                        raise CkptmapError(f"{pm.path}: describes one buffer more than {optim.path} has "
                                           f"({len(optim.buffers)}); the param_map belongs to a different run")
                    buf = optim.buffers[indices[at + i]]
                    entries = _read_map(pm, map_entries)
                    if buf.storage == megatron_files.COALESCED:
                        laid = _coalesced_from_param_map(entries, buf, blocks, params, args, layout, pp, v, chosen,
                                                         str(pm.path))
                    else:
                        laid = buckets.buffer_from_param_map(entries, list(buf.padded), list(buf.unpadded),
                                                             str(pm.path))
                    chunk_layouts.append((v, indices[at + i], laid))
            except CkptmapError as e:
                if explicit_maps:
                    raise
                stale = str(e)  # a param_map found lying around may be stale: derive instead
                if notes is not None:
                    notes.append(f"param_map for tp {tp} pp {pp} chunk {v} ignored as stale: {stale}")
            else:
                out.extend(chunk_layouts)
                at += len(chunk_layouts)
                continue
        for dtype, group in params.items():
            if at >= len(indices):
                raise CkptmapError(f"{optim.path} has {len(indices)} {what}buffer(s), but the model needs more "
                                   f"(chunk {v}, {dtype} {what}parameters); pass the training run's param_map")
            g = indices[at]
            buf = optim.buffers[g]
            values = _layout_values(args, layout, pp, v, expert=expert)
            found = _fit(blocks, group, values, buf, chosen)
            if found is None:
                tried = "; ".join(_tried(b, group, values) for b in blocks)
                raise CkptmapError(
                    f"cannot derive the bucket layout of {optim.path} {buf.describe} (chunk {v}): with this "
                    f"checkpoint's args (dp {values['dp']}, cp {values['cp']}, overlap_grad_reduce "
                    f"{values['overlap_grad_reduce']}, ddp_bucket_size {values['bucket_size']}) {tried}. A param_map "
                    f"is required: pass --param-map-path with the param_map folder written by the training run"
                    + (f" (the one found next to the checkpoint does not fit it either: {stale})" if stale else ""))
            out.append((v, g, found[1]))
            at += 1
    if at != len(indices):
        raise CkptmapError(f"{optim.path} has {len(indices)} {what}buffer(s) but the model chunks account for {at}; "
                           f"the checkpoint and its distrib_optim.pt disagree")
    return out


def _tried(block, group, values) -> str:
    try:
        t = buckets.build_buffer(block, group, buckets.layout_env(block, values))
    except buckets.UnfaithfulLayout:
        return f"{block.label} cannot lay it out"
    return f"{block.label} gives buckets {t.per_bucket_numel} (unpadded {t.per_bucket_numel_unpadded})"


def _coalesced_from_param_map(entries, buf, blocks, params, args, layout, pp, v, chosen, origin):
    """A coalesced distrib_optim.pt records only a buffer's unpadded total, so a param_map alone does
    not say where every bucket's unpadded part ends; the rules' layout supplies the bucket sizes and
    must place every parameter exactly where the param_map says."""
    group = params.get(buf.param_dtype, [])
    found = _fit(blocks, group, _layout_values(args, layout, pp, v, expert=False), buf, chosen)
    if found is None:
        raise CkptmapError(f"{origin}: no `buckets megatron` block reproduces {buf.describe}; cannot tell the "
                           f"bucket sizes the param_map's offsets refer to")
    laid = found[1]
    recorded = [(name, start, end, bucket) for name, (_, _, start, end, bucket) in entries.items()]
    derived = [(s.name, s.start, s.end, s.bucket) for s in laid.slots]
    if recorded != derived:
        first = next(i for i, (a, b) in enumerate(zip(recorded + [None], derived + [None])) if a != b)
        raise CkptmapError(f"{origin}: parameter #{first} is {recorded[first] if first < len(recorded) else 'missing'} "
                           f"there but the checkpoint's layout ({found[0].label}) puts "
                           f"{derived[first] if first < len(derived) else 'nothing'} there; the param_map belongs "
                           f"to a different run")
    return attrs.evolve(laid, origin=origin)


SPOT_CHECK = 64


def spot_check_main_params(tasks, files: dict | None = None, cache: dict | None = None) -> None:
    """Before anything is written: the first and last elements of every fp32 main param must round
    to its model weight (the executor then checks every element). Cheap — a few hundred bytes per
    parameter — and catches a layout that puts one parameter's state under another's name.
    ``files``: {a slice's file — a path or an ``@input`` name: the PtFile planning read}, so the files
    are not parsed again; ``cache``: one compile's (ranks of one structure share where to read)."""
    files = files or {}
    if _spot_check_in_one_pass(tasks, files, cache):
        return
    from ckptmap.execute import _Sources   # the executor's reading of plan slices, on a few elements

    readable = {name: f for name, f in files.items() if f is not None}
    named = FileTask("spot check", "ckpt", tasks, inputs={n: str(f.path) for n, f in readable.items()
                                                          if n.startswith(INPUT_PREFIX)})
    sources = _Sources({str(f.path): f for f in readable.values()})
    try:
        for t in named.bound().tensors:   # errors name the files, not the inputs
            if t.rounds_to is None:
                continue
            weights = t.rounds_to_slices   # the weight, and the main param, may be several runs
            n = sum(w.count for w in weights)
            for lo in sorted({0, max(0, n - SPOT_CHECK)}):
                k = min(SPOT_CHECK, n - lo)
                main, weight = concat_range(t.sources, lo, k), concat_range(weights, lo, k)
                part = attrs.evolve(t, name=t.name, sources=main, rounds_to=weight[0] if len(weight) == 1 else weight,
                                    src_shape=(k,), ops=())
                sources._check_rounding(part, sources.slice(main[0]) if len(main) == 1 else None)
    finally:
        sources.close()


def _flat_part(s: SourceSlice, lo: int, k: int) -> SourceSlice:
    return attrs.evolve(s, start=s.start + lo, numel=k)


def state_slice(optim, keys: dict, g: int, bl, slot, state: str, file: str | None = None) -> SourceSlice:
    """Where a parameter's fp32 ``state`` lies in distrib_optim.pt: its range of its bucket's tensor
    (per-bucket files) or of the buffer's coalesced tensor. ``keys`` caches the flat keys. ``file``:
    how the slice names the file (default: its path; an ``@input`` name in plans shared by ranks)."""
    buf = optim.buffers[g]
    coalesced = buf.storage == megatron_files.COALESCED
    file = str(optim.path) if file is None else file
    # the key depends on the buffer record alone (shared by files of one structure); the buffer is kept
    # in the cache, so its id stays its own
    cache_key = (id(buf), state, None if coalesced else slot.bucket)
    hit = keys.get(cache_key)
    if hit is None or hit[0] is not buf:
        hit = keys[cache_key] = (buf, buf.key(state, slot.bucket))
    key = hit[1]
    if coalesced:
        return SourceSlice(file, key, "float32", (buf.numel_unpadded,), start=bl.coalesced_offset(slot),
                           numel=slot.end - slot.start)
    bucket = bl.buckets[slot.bucket]
    return SourceSlice(file, key, "float32", (bucket.numel,), start=slot.start - bucket.start,
                       numel=slot.end - slot.start)


def _param_maps(opt, ckdir, notes: list) -> list:
    if opt.param_map_path:
        found = param_map.find_param_maps(opt.param_map_path)
        if not found:
            raise CkptmapError(f"--param-map-path {opt.param_map_path} holds no "
                               f"param_map_buffer*_dp*tp*pp*vpp*.json files")
        return found
    for candidate in (ckdir.root / megatron_folders.PARAM_MAP_DIR,
                      (ckdir.save_root / megatron_folders.PARAM_MAP_DIR) if ckdir.save_root else None):
        if candidate is not None and candidate.is_dir():
            found = param_map.find_param_maps(candidate)
            for pm in found:   # a map found lying around that cannot be read is stale, like one that does not fit
                if pm.dp != 0:     # only DP rank 0's maps are read (the others are copies of them)
                    continue
                try:
                    param_map.read_param_map(pm.path)
                except CkptmapError as e:
                    notes.append(f"{candidate} ignored: {pm.path} is unreadable ({e}); the layout is derived")
                    found = []
                    break
            if found:
                return found
    return []


# -------------------------------------------------------------------------------------------------
# The checkpoint as a conversion sees it


@attrs.frozen
class SourceOptions:
    """What a conversion reading a Megatron checkpoint may say about it (flags of pt2ms / reshard)."""

    megatron_path: str
    param_map_path: str | None = None
    tp_size: int | None = None
    pp_size: int | None = None
    ep_size: int | None = None
    dp_size: int | None = None
    cp_size: int | None = None
    parallel_init_order: str = "tp-cp-ep-dp-pp"
    vpp_size: int | None = None
    stage_list: tuple[int, ...] | None = None
    num_layers: int | None = None
    noop: tuple[int, ...] = ()
    rules: str = AUTO_RULES
    megatron_version: str | None = None
    main_param_check: bool = True
    # False: planning keeps of ranks other than the first only what it reads (pt2ms: the executor reads
    # each rank's RNG states and args from its file again); thousands of ranks' RNG states add up
    rank_state: bool = True
    # (first, end): read the ranks of these pipeline stages only, besides rank (0, 0, 0) whose args and
    # tensors say what the checkpoint is (planning split over processes, compiler.compile_pt2ms); the
    # checks over all ranks that one part cannot make are made on the parts' facts (PartFacts)
    pp_part: tuple[int, int] | None = None


@attrs.frozen
class PartFacts:
    """What the planner of some pipeline stages found (MegatronSource.facts) that checks over all ranks and
    the plan's info need: the rules that matched, the files' torch dialects, where bucket layouts came from,
    the Megatron bucket layouts (labels) that fit every buffer read, the notes on its ranks."""

    rules_used: frozenset
    dialects: frozenset
    origins: frozenset
    candidates: tuple
    notes: tuple


@attrs.define
class SourceRank:
    """One mp_rank folder (tp, pp, ep): its model file's matched tensors and, once ``with_optimizer``
    ran, where their optimizer states lie. ``own_layouts``: the buffers of this folder's own
    distrib_optim.pt; ``dense``: (OptimFile, layouts) holding this rank's dense parameters' state
    (under expert parallelism, the expert-rank-0 folder's file)."""

    key: tuple
    dir: Path
    model: object
    matched: list
    optim: object = None
    own_layouts: list | None = None
    dense: tuple | None = None
    map_entries: dict = attrs.field(factory=dict)

    @property
    def tp(self):
        return self.key[0]

    @property
    def pp(self):
        return self.key[1]

    @property
    def ep(self):
        return self.key[2]

    @property
    def expert_layouts(self) -> list:
        dense = self.dense[1] if self.dense else []
        return [x for x in (self.own_layouts or ()) if x not in dense]


class MegatronSource:
    """A Megatron legacy checkpoint read for a conversion: ``ranks`` {(tp, pp, ep): SourceRank}, the
    run's ``layout``, ``args``, ``env`` (its integer args), ``rules``, ``iteration``. Raises on every
    inconsistency before anything is written. :meth:`with_optimizer` adds the optimizer layouts."""

    def __init__(self, opt: SourceOptions, ckdir=None):
        self.opt = opt
        ckdir = self.ckdir = ckdir or megatron_folders.open_checkpoint_dir(opt.megatron_path)
        if ckdir.pp_size > 1 and not ckdir.has_pp_suffix:
            raise CkptmapError(f"{ckdir.root}: mp_rank directories without a PP suffix but PP {ckdir.pp_size}")
        self.ep_name = (lambda ep: ep) if ckdir.has_ep_suffix else (lambda ep: None)   # ep in file names?
        read = {}
        # ranks with byte-identical pickles share one (read-only) tree, and a rank whose pickle differs from
        # its stage's first in plain numbers only is read from that one's (torch_zip_reader.shared_trees);
        # read stage by stage, so that the trees a later file may use are the last few read
        trees: dict = {}
        size_args = [name for _, name, _ in _SIZE_ARGS]
        with torch_zip_reader.shared_trees(trees):
            for key in sorted(ckdir.ranks, key=stage_major):
                d = ckdir.ranks[key]
                if not self.planned(key) and key != (0, 0, 0):
                    continue
                f = read[key] = megatron_files.ModelFile(d / megatron_folders.MODEL_FILE)
                f.close()  # only the object tree is needed here; a map per rank would exhaust file handles
                dialect_translate.check_rank_files(f, d / megatron_folders.OPTIM_FILE)   # MSAdapter's refusals
                if not opt.rank_state and key != (0, 0, 0):
                    f.slim(size_args)
                torch_zip_reader.trim_trees(trees, _TREES_KEPT)
        files = {key: read[key] for key in sorted(read)}
        self.dialects = {f.dialect for f in files.values()}   # torch zip dialects of the files (pt_meta records each)
        first = self.first = files[(0, 0, 0)]
        args = self.args = first.args
        check_sizes_agree(ckdir, files, opt)
        by_tree: dict = {}   # id(root) -> (root, tensors): files sharing a tree share its (frozen) inventory
        inventory = {}
        for key, f in files.items():
            hit = by_tree.get(id(f.root))
            if hit is None:
                hit = by_tree[id(f.root)] = (f.root, f.tensors())
            inventory[key] = hit[1]
        chunk_counts = {key: len(f.chunks()) for key, f in files.items()}
        if len(set(chunk_counts.values())) != 1:
            raise CkptmapError(f"the mp_rank files disagree on the number of model chunks: "
                               f"{dict((f'tp{t} pp{p} ep{e}', n) for (t, p, e), n in chunk_counts.items())}")
        chunks_found = chunk_counts[(0, 0, 0)]
        vpp = opt.vpp_size or _arg(args, "virtual_pipeline_model_parallel_size") or chunks_found
        check_size("--vpp-size", vpp, chunks_found, f"{first.path} holds model chunks:")
        rules = self.rules = choose_rules(opt.rules, inventory[(0, 0, 0)], first.path)
        count_arg = rules.layers.count_arg if rules.layers else "num_layers"
        noop = tuple(opt.noop) or self._noop_from_args(rules)
        num_layers = opt.num_layers
        if num_layers is None:
            megatron_layers = _arg(args, count_arg)
            if megatron_layers is None:
                raise CkptmapError(f"{first.path}: args has no {count_arg}; pass --num-layers")
            num_layers = megatron_layers + len(set(noop))
        self.layout = ParallelLayout(
            tp=ckdir.tp_size, pp=ckdir.pp_size, ep=ckdir.ep_size,
            dp=opt.dp_size or _arg(args, "data_parallel_size", 1),
            cp=opt.cp_size or _arg(args, "context_parallel_size", 1),
            vpp=vpp, num_layers=num_layers,
            stage_list=tuple(opt.stage_list) if opt.stage_list else None,
            noop=frozenset(noop), order=opt.parallel_init_order)
        self.iteration = ckdir.iteration
        self.env = {k: v for k, v in vars(args).items() if isinstance(v, int)} if args is not None else {}
        self.memo = RankMemo()
        rules_used: set = set()
        unmatched_all: dict[str, list[str]] = {}
        self.ranks: dict[tuple, SourceRank] = {}
        matched_of: dict = {}   # id(inventory) -> (inventory, matched, unmatched): shared inventories match alike
        for key, model_file in files.items():
            if not self.planned(key):   # rank (0, 0, 0), read by a planner of other stages for what it says
                continue
            hit = matched_of.get(id(inventory[key]))
            if hit is None:
                hit = matched_of[id(inventory[key])] = (inventory[key],) + match_rules(
                    rules, inventory[key], model_file.path, self.memo)
                rules_used.update(m.rule.loc for m in hit[1])
            _, matched, unmatched = hit
            if unmatched:
                unmatched_all[str(model_file.path)] = unmatched
                continue
            check_layers(self.layout, matched, model_file.path, key[0], key[1])
            self.ranks[key] = SourceRank(key, ckdir.ranks[key], model_file, matched)
        if unmatched_all:
            path, names = next(iter(unmatched_all.items()))
            raise CkptmapError(
                f"no rule in {rules.path} matches {len(names)} tensor(s) of {path}: {listing(names)}"
                f"{f' (and {len(unmatched_all) - 1} more files)' if len(unmatched_all) > 1 else ''}. "
                f"Add rules for them (or pick other rules with --rules); nothing was written")
        self.rules_used = frozenset(rules_used)
        if opt.pp_part is None:
            self.check_rules_used(self.rules_used)
        self.notes: list[str] = []   # param_maps found next to the checkpoint and ignored, and why
        if ckdir.ep_size == 1:
            self.param_maps = _param_maps(opt, ckdir, self.notes)
        else:
            # expert-parallel param_maps (the hook's ep{e} files) are not read yet: the layout is derived and
            # every main param is still checked to round to its weight
            if opt.param_map_path:
                raise CkptmapError(f"--param-map-path {opt.param_map_path}: param_map files of an expert-parallel "
                                   f"checkpoint (EP {ckdir.ep_size}) are not read yet; drop the flag — ckptmap derives "
                                   f"the bucket layout and checks every fp32 main param against its weight")
            if _param_maps(opt, ckdir, []):
                self.notes.append(f"param_map files next to {ckdir.root} are not read under EP {ckdir.ep_size}; the "
                                  f"bucket layout is derived (and checked against every weight)")
            self.param_maps = []
        self.maps_of = maps_by_chunk(self.param_maps)
        self._global_notes = len(self.notes)   # the notes of every part alike; the later ones are its ranks'
        self.more_origins: set = set()   # bucket layout origins of ranks other processes planned (absorb)
        self.blocks = None
        self.chosen: dict = {}       # the bucket block that fits the file
        self.has_optimizer = False

    def planned(self, key) -> bool:
        """Whether rank ``key`` (tp, pp, ep) is one this source plans (all, unless ``pp_part``)."""
        part = self.opt.pp_part
        return part is None or part[0] <= key[1] < part[1]

    def check_rules_used(self, rules_used) -> None:
        """Every rule not marked optional matched a tensor of some rank (``rules_used``: their locations)."""
        rules = self.rules
        unused = [r for r in rules.params if not r.optional and r.loc not in rules_used]
        if unused:
            raise CkptmapError(
                f"rule(s) of {rules.path} matched no tensor in {self.ckdir.root}: "
                f"{listing(f'{r.loc}: {r.megatron}' for r in unused)}; the checkpoint is not the model these "
                f"rules describe (choose other --rules, or mark the rule `optional`)")

    def facts(self) -> "PartFacts":
        """What this source found that a plan of all ranks needs when other processes planned the rest."""
        return PartFacts(self.rules_used, frozenset(self.dialects), frozenset(self._origins()),
                         tuple(b.label for b in self.fitting_blocks()), tuple(self.notes[self._global_notes:]))

    def absorb(self, facts: "PartFacts", stages: str) -> None:
        """Take in the facts of the planner of ``stages`` (other pipeline stages, planned in another process):
        as if this source had read those ranks too (checks over all ranks, the plan's info)."""
        self.rules_used = self.rules_used | facts.rules_used
        self.dialects |= facts.dialects
        self.more_origins |= facts.origins
        self.notes.extend(facts.notes)
        kept = self.fitting_blocks()
        if facts.candidates:   # the versions that fit every buffer: those that fit here and there
            both = [b for b in kept or self.blocks or () if b.label in facts.candidates]
            if not both:
                raise CkptmapError(
                    f"the optimizer buckets of {self.ckdir.root} fit the layouts of "
                    f"{', '.join(b.label for b in kept) or 'no known version'} in some pipeline stages and of "
                    f"{', '.join(facts.candidates)} in {stages}: no Megatron version "
                    f"wrote them all; the checkpoint mixes runs, or say which version wrote it with --megatron-version")
            self.chosen["candidates"], self.chosen["block"] = both, both[0]

    def fitting_blocks(self) -> list:
        """The `buckets megatron` blocks whose layout fits every buffer read (empty when the layouts came from
        param_map files, or no optimizer was read)."""
        if self.chosen.get("block") is None:
            return []
        return list(self.chosen.get("candidates") or [self.chosen["block"]])

    def _origins(self) -> set:
        return {"param_map" if bl.origin != "derived" else "derived"
                for r in self.ranks.values() for _, _, bl in (r.own_layouts or ())} | self.more_origins

    def _noop_from_args(self, rules) -> tuple:
        """``layers: count = N, noop = NAME``: the args attribute NAME lists the noop layer ids."""
        if not (rules.layers and rules.layers.noop_arg):
            return ()
        value = getattr(self.args, rules.layers.noop_arg, None) if self.args is not None else None
        if value is None:
            return ()
        try:
            return tuple(int(x) for x in value)
        except (TypeError, ValueError):
            raise CkptmapError(f"{self.first.path}: args.{rules.layers.noop_arg} = {value!r} is not a list of layer "
                               f"ids ({rules.path} names it as the noop layers); pass --noop") from None

    @property
    def sorted_ranks(self) -> list[SourceRank]:
        """Stage by stage, expert rank 0 of a (tp, pp) before its others (its folder holds the dense optimizer
        state they share). A stage's ranks write pickles that differ in their rank numbers alone: read one
        after another, each reuses the last one's tree (pickle_delta), which a worker keeping a few trees
        loses when a stage's ranks lie a pipeline's length apart (tp-major: 512 stages at 4,096 ranks)."""
        return [self.ranks[k] for k in sorted(self.ranks, key=stage_major)]

    def with_optimizer(self) -> "MegatronSource":
        """Read every rank's distrib_optim.pt and work out its bucket layouts (see _buffer_layouts)."""
        if self.has_optimizer:
            return self
        opt, layout, args = self.opt, self.layout, self.args
        dense_layouts: dict = {}
        with torch_zip_reader.shared_trees():   # see MegatronSource.__init__
            for rank in self.sorted_ranks:
                tp, pp, ep = rank.key
                optim = megatron_files.OptimFile(rank.dir / megatron_folders.OPTIM_FILE)
                optim.close()
                self.dialects.add(optim.dialect)
                if self.blocks is None:
                    self.blocks = bucket_blocks(self.rules, optim, opt.megatron_version)
                separate = optim.chained   # expert parameters in optimizer and buffers of their own
                dense = [m for m in rank.matched if not (separate and EXPERT in m.bindings)]
                expert = [m for m in rank.matched if separate and EXPERT in m.bindings]
                dense_idx, expert_idx = _buffer_kinds(optim, bool(expert))
                own = []
                if dense_idx is not None:
                    laid = _buffer_layouts(self.rules, args, dense, optim, self.maps_of, tp, pp, layout,
                                           explicit_maps=bool(opt.param_map_path), memo=self.memo,
                                           map_entries=rank.map_entries, notes=self.notes, blocks=self.blocks,
                                           chosen=self.chosen, indices=dense_idx)
                    dense_layouts[(tp, pp)] = (optim, laid)
                    own += laid
                if expert:
                    own += _buffer_layouts(self.rules, args, expert, optim, {}, tp, pp, layout, explicit_maps=False,
                                           memo=self.memo, notes=self.notes, blocks=self.blocks, chosen=self.chosen,
                                           indices=expert_idx, expert=True)
                if (tp, pp) not in dense_layouts:
                    raise CkptmapError(f"{optim.path} holds no dense optimizer state and neither does the expert rank 0 "
                                       f"folder of tp rank {tp}, pp rank {pp}; the checkpoint is incomplete")
                rank.optim, rank.own_layouts, rank.dense = optim, own, dense_layouts[(tp, pp)]
        self.has_optimizer = True
        return self

    def state_slots(self, rank: SourceRank) -> dict:
        """{(chunk, ddp name): (OptimFile, buffer index, BufferLayout, ParamSlot)} for the rank's
        parameters: dense ones in ``rank.dense``'s file, expert ones in the rank's own."""
        out = {}
        for optim, layouts in ((rank.dense[0], rank.dense[1]), (rank.optim, rank.expert_layouts)):
            for v, g, bl in layouts:
                for slot in bl.slots:
                    out[(v, slot.name)] = (optim, g, bl, slot)
        return out

    def info(self) -> dict:
        layout = self.layout
        out = {"source": str(self.ckdir.root), "iteration": self.iteration, "rules": self.rules.name,
               "rules_path": self.rules.path, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "cp": layout.cp,
               "vpp": layout.vpp, "num_layers": layout.num_layers, "noop": sorted(layout.noop),
               "param_maps": len(self.param_maps), "dialect": " + ".join(sorted(self.dialects))}
        if layout.ep > 1 or self.env.get("num_experts"):
            out.update(ep=layout.ep, experts=self.env.get("num_experts"))
        if self.has_optimizer:
            out["bucket_layout"] = " + ".join(sorted(self._origins()))
            if self.chosen.get("block") is not None:
                out["megatron_layout"] = " / ".join(b.label for b in self.fitting_blocks())
                out["main_param_check"] = "on" if self.opt.main_param_check else "off (--no-main-param-check)"
        if self.notes:
            out["param_map_ignored"] = self.notes
        return out


_SPAN_READ = 1 << 22   # bytes: a file's spot-checked elements within this span are read with one pread


def _spot_check_ranges(tasks, files: dict, cache: dict | None):
    """Where a rank's spot check reads: ({file name: [(byte offset, nbytes)]}, {file name: (first byte,
    nbytes) of one pread of all its pieces, or None: a pread each}, [(main piece, weight piece)], weight
    dtype), or None when a range was not kept. The same for ranks whose tasks are one tuple and whose
    files have one placement (shared trees), so worked out once per structure."""
    key = None
    if cache is not None:
        placements = tuple((name, f.placement) for name, f in sorted(files.items()) if f is not None)
        key = ("spot check", id(tasks), tuple((name, tuple(map(id, p))) for name, p in placements))
        hit = cache.get(key)
        if hit is not None and hit[0] is tasks and all(a is b for (_, p), (_, q) in zip(hit[1], placements)
                                                       for a, b in zip(p, q)):
            return hit[2]
    pieces: dict[str, list] = {}   # file name -> [(byte offset, nbytes)]
    order = []                     # (main piece, weight piece): indices into pieces[file]
    weight_dtype = None
    found_all = True
    for t in tasks:
        if t.rounds_to is None:
            continue
        src, weight = t.sources[0], t.rounds_to
        if not isinstance(weight, SourceSlice):   # a weight of several runs: checked by the general path
            found_all = False
            break
        n = src.count
        if src.dtype != "float32" or weight.count != n or weight.dtype not in ("bfloat16", "float16") \
                or weight_dtype not in (None, weight.dtype):
            found_all = False
            break
        weight_dtype = weight.dtype
        found = []
        for s in (src, weight):
            f = files.get(s.file)
            kept = f.kept_range(s.key) if f is not None else None
            ref = f.entry(s.key) if kept is not None else None
            size = 4 if s.dtype == "float32" else 2
            if ref is None or ref.shape != tuple(s.shape) or ref.dtype != s.dtype or (s.start + n) * size > kept[1]:
                found_all = False
                break
            found.append((s.file, kept[0] + s.start * size, size))
        if not found_all:
            break
        for lo in sorted({0, max(0, n - SPOT_CHECK)}):
            k = min(SPOT_CHECK, n - lo)
            pair = []
            for name, base, size in found:
                lst = pieces.setdefault(name, [])
                lst.append((base + lo * size, k * size))
                pair.append((name, len(lst) - 1))
            order.append(pair)
    result = None
    if found_all:
        reads = {}   # file name -> (first byte, nbytes) of one pread of all its pieces, or None: one pread each
        for name, lst in pieces.items():
            lo, hi = min(o for o, _ in lst), max(o + n for o, n in lst)
            reads[name] = (lo, hi - lo) if hi - lo <= _SPAN_READ else None
        result = (pieces, reads, order, weight_dtype)
    if key is not None:
        cache[key] = (tasks, placements, result)   # kept: their ids stay theirs
    return result


def _spot_check_in_one_pass(tasks, files: dict, cache: dict | None = None) -> bool:
    """The spot check of a rank's tasks in one cast and compare (the per-task check costs ~150 us a
    task; a 4,096-rank plan has 41,000): every element range read with ``pread`` at the byte ranges
    planning kept. True when all of them round to their weights; False when a range was not kept or
    anything differs -- the caller then checks task by task, which names the task, file and tensor."""
    read = _spot_check_read(tasks, files, cache)
    return read is not None and _round_to(*read)


def _spot_check_read(tasks, files: dict, cache: dict | None):
    """(fp32 main bytes, weight bytes, weight dtype) of a rank's spot check, or None when it cannot be
    read so (a range not kept, a file shorter than planned)."""
    where = _spot_check_ranges(tasks, files, cache)
    if where is None:
        return None
    pieces, reads, order, weight_dtype = where
    if not order:
        return b"", b"", None
    data: dict = {}
    for name, lst in pieces.items():
        fd = os.open(files[name].path, os.O_RDONLY)
        try:
            span = reads[name]
            if span is not None:
                lo, size = span
                got = os.pread(fd, size, lo)
                if len(got) != size:
                    return None
                got = [got[o - lo: o - lo + n] for o, n in lst]
            else:
                got = [os.pread(fd, n, o) for o, n in lst]
                if any(len(b) != n for b, (_, n) in zip(got, lst)):
                    return None
        finally:
            os.close(fd)
        data[name] = got
    return (b"".join(data[p][i] for (p, i), _ in order), b"".join(data[p][i] for _, (p, i) in order), weight_dtype)


def _round_to(mains: bytes, weights: bytes, weight_dtype) -> bool:
    """Whether the fp32 values ``mains`` round to the ``weight_dtype`` bit patterns ``weights``."""
    if not mains:
        return not weights
    main = np.frombuffer(mains, dtype=np.float32)
    weight = np.frombuffer(weights, dtype=np.uint16)
    rounded = tensor_ops.cast(main, "float32", weight_dtype).view(np.uint16)   # bit patterns: NaN == NaN
    return main.size == weight.size and bool(np.array_equal(rounded, weight))


class SpotChecks:
    """spot_check_main_params of many ranks, compared in batches: each rank's few hundred bytes are
    read as it is planned, and one cast and compare covers ``BATCH`` ranks (per rank, numpy's call
    overhead was most of the check's cost at 16,384 ranks). A batch that differs is checked again rank
    by rank, which raises for the first bad one with its task, file and tensor; ``finish()`` checks
    the last batch: call it before the plan is used."""

    BATCH = 512

    def __init__(self, cache: dict):
        self.cache = cache
        self.pending: list = []   # (tasks, files, main bytes, weight bytes)
        self.dtype = None

    def add(self, tasks, files: dict) -> None:
        read = _spot_check_read(tasks, files, self.cache)
        if read is None or (read[2] is not None and self.dtype not in (None, read[2])):
            spot_check_main_params(tasks, files, self.cache)   # checked on its own (raises if it differs)
            return
        if read[2] is not None:
            self.dtype = read[2]
        self.pending.append((tasks, files) + read[:2])
        if len(self.pending) >= self.BATCH:
            self.finish()

    def finish(self) -> None:
        pending, self.pending = self.pending, []
        if pending and not _round_to(b"".join(p[2] for p in pending), b"".join(p[3] for p in pending), self.dtype):
            for tasks, files, _, _ in pending:
                spot_check_main_params(tasks, files, self.cache)
