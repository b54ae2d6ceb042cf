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

Supported optimizer sharding types: the model-space ones (``fully_sharded_model_space``,
``fully_reshardable``). Bucket-space types (``dp_reshardable``, ``dp_zero_gather_scatter``) store the
state in the *source* run's buckets; reading them needs that run's buffer layout at its own sizes,
which this module does not derive yet (refused, naming the workaround). MoE (expert parallelism) is
refused too.
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
from ckptmap.mapping import buckets
from ckptmap.mapping.layout import ParallelLayout
from ckptmap.mapping.megatron_source import planning
from ckptmap.mapping.plan import FileTask, Plan, Read, SourceSlice, StoragePiece, StorageTask, TensorTask
from ckptmap.mapping.reshard import _build_target_buffer, _chunk_keys, _ddp_name, _state_storage, resolve_sharding
from ckptmap.mapping.rules import LAYER, resolve_rules
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
    text = tracker.read_text().strip()
    it = src / ("release" if text == "release" else megatron_folders.iter_dir_name(int(text)) if text.isdigit() else "")
    if not text or not td.is_torch_dist_dir(it):
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


def shard_task(p: DistParam, state: str, tgt_tp: int, tp: int, name: str, iter_dir: str) -> TensorTask:
    """Target TP rank ``tp``'s shard of ``p``'s weight or optimizer ``state``."""
    where = f"{p.key} ({p.rule.loc})"
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
        if _arg(args, "num_experts"):
            raise CkptmapError(f"{md.path}: a mixture-of-experts model ({args.num_experts} experts); torch_dist -> torch "
                               f"handles dense models so far. Load it in Megatron with the same layout and save with "
                               f"--ckpt-format torch")
        st = md.sharding_type
        if not convert_param_only and st is not None and st.space != "model":
            raise CkptmapError(
                f"{md.path}: the optimizer state is stored as {st.name!r} ({st.space} space: per gradient-buffer bucket "
                f"of the saving run), which torch_dist -> torch does not read yet; it reads fully_sharded_model_space "
                f"and fully_reshardable. Use --convert-param-only for the weights alone, or load the checkpoint in "
                f"megatron-core with the same layout and save it again with --dist-ckpt-optim-fully-reshardable "
                f"(0.15+) or the 0.8 - 0.14 default. Nothing was written.")
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
        states = {(t.name, t.state): t for t in md.tensors() if t.state != "weight"}
        self.params: dict[str, DistParam] = {}
        unmatched = []
        for t in md.tensors("weight"):
            for item, where, box in M.unstack(t):
                name = M.legacy_item_name(item, self.impl)
                hits = [(i, r, b) for i, r in enumerate(rules.params) if (b := r.megatron.match(name)) is not None]
                if not hits:
                    unmatched.append(name)
                    continue
                if len(hits) > 1:
                    raise CkptmapError(f"{md.path}: {name} matches {len(hits)} rules of {rules.path}; make them disjoint")
                i, rule, b = hits[0]
                idx = tuple(box.offsets[:len(where)])
                layer = b.get(LAYER)
                section = 1 if layer is not None else (0 if i < first_layer else 2)
                sources = {"weight": (t, idx)}
                for state in STATES:
                    g = states.get((t.name, state))
                    if g is not None:
                        sources[state] = (g, idx)
                    elif not convert_param_only:
                        raise CkptmapError(f"{md.path}: no {state} optimizer state for {t.name!r}; the checkpoint is "
                                           f"incomplete (or pass --convert-param-only)")
                self.params[name] = DistParam(name, rule, b, resolve_sharding(rule, env, name),
                                              tuple(t.shape[len(where):]), t.dtype,
                                              (section, layer or 0, i, _choice_order(rule, b)), sources, layer)
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
            out[M.legacy_item_name(M.unstack_object(o.name if o.name else name, offsets), self.impl)] = key
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
        return DistParam(str(rule.megatron), rule, {}, emb.sharding, emb.shape, emb.dtype, (2, 0, i, ()),
                         emb.sources, None)


def _local_name(p: DistParam, local: int | None) -> str:
    return p.rule.megatron.format(dict(p.bindings, layer=local) if local is not None else p.bindings)


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


def _chunk(model: DistModel, tgt: ParallelLayout, pp: int, v: int, output_copy) -> list[tuple]:
    """[(legacy local name, DistParam, [(extra-state local name, leaf)])] of target chunk (pp, v), in
    registration order, grouped by layer / edge section."""
    first, last = (pp, v) == (0, 0), (pp, v) == (tgt.pp - 1, tgt.vpp - 1)
    by_section: dict = {}
    for p in model.params.values():
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
        names = [(_local_name(p, local), p) for p in params]
        extras = [(_extra_local(n, g, local), {"object": key}) for n, key in model.extra.items()
                  if (g is not None and re.search(rf"(^|\.)layers\.{g}\.", n)) or
                  (g is None and any(n.startswith(p.key.rsplit(".", 1)[0] + ".") for p in params))]
        if model.extra:   # Megatron drops these from torch_dist saves; empty in the legacy file
            extras += [(n, {"none": True}) for n in M.DROPPED_EXTRA_STATES if n not in model.extra
                       and any(name.startswith(n[:-len("_extra_state")]) for name, _ in names)]
        out.append((names, extras))
    return out


def _layout_values(args, tgt: ParallelLayout, pp: int, v: int) -> dict:
    values = {k: x for k, x in vars(args).items() if isinstance(x, (int, bool))}
    values.update(dp=tgt.dp, cp=tgt.cp, ep=tgt.ep, dp_group=tgt.dp * tgt.cp, pp=tgt.pp, pp_rank=pp, chunk=v,
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
    since = (0, 15) if isinstance(model.md.common.get("content_metadata"), dict) else (0, 8)
    return [b for b in model.rules.bucket_layouts("megatron") if b.storage == "coalesced" and
            (b.versions is None or _version(b.versions[1]) >= since)]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(text).split(".") if x.isdigit())


def _param_group_order(common_opt, names_shapes) -> tuple[list | None, str | None]:
    """Megatron builds one optimizer param group per (wd_mult, lr_mult, …) in the order its rank's
    parameters first need them (``_get_param_groups``: no weight decay for biases and 1-D params), and
    a legacy load applies the saved groups by position. ``common.pt`` holds rank 0's order; each target
    rank gets its own. Groups told apart by anything but wd_mult keep common.pt's order (noted)."""
    groups = (common_opt or {}).get("optimizer", {}).get("param_groups") if isinstance(common_opt, dict) else None
    if not groups:
        return None, None
    wds = [g.get("wd_mult") for g in groups]
    if len(set(wds)) != len(wds):
        return None, "optimizer param groups differ in more than wd_mult: kept in common.pt's (rank 0's) order"
    order = []
    for name, shape in names_shapes:
        wd = 0.0 if name.endswith(".bias") or len(shape) == 1 else 1.0
        if wd not in order:
            order.append(wd)
    if any(w not in wds for w in order):
        return None, "optimizer param groups of common.pt do not cover every rank's parameters: kept as saved"
    return [wds.index(w) for w in order], None


def _object_for(md: M.MegatronDist, name: str, tp: int, pp: int, src: ParallelLayout) -> str | None:
    """The ``rng_state`` / ``rerun_state_machine_state`` ShardedObject of source rank (tp, pp) mod the source sizes."""
    want = (pp % src.pp, tp % src.tp)
    for key in md.other_objects:
        base, _, shard = key.rpartition("/shard_")
        if base != name:
            continue
        offsets = tuple(int(x) for x in shard.split("_")[0].split("."))
        if offsets[:2] == want and not any(offsets[2:]):
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
    with M.MegatronDist(iter_dir, reader) as md:
        md.check_fully_reshardable()
        return _compile(md, rules, opt, str(iter_dir), iteration)


def _compile(md, rules, opt, iter_dir: str, iteration: str) -> Plan:
    model = DistModel(md, rules, opt.convert_param_only)
    s, args = model.layout, model.args
    pp = opt.target_pp_size or s.pp
    tgt = ParallelLayout(tp=opt.target_tp_size or s.tp, pp=pp, dp=opt.target_dp_size or s.dp, cp=s.cp, ep=1,
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
    it_name = "release" if iteration == "release" else megatron_folders.iter_dir_name(int(iteration))
    files, notes = [], []
    for p_rank in range(tgt.pp):
        for tp in range(tgt.tp):
            rank_dir = f"{it_name}/{megatron_folders.mp_rank_dir_name(tp, p_rank, tgt.pp)}"
            chunks = [_chunk(model, tgt, p_rank, v, output_copy) for v in range(tgt.vpp)]
            model_task, order_note = _model_task(md, model, tgt, rank_dir, tp, p_rank, chunks, iter_dir)
            if order_note and order_note not in notes:
                notes.append(order_note)
            files.append(model_task)
            if not opt.convert_param_only:
                task, maps = _optim_task(model, tgt, rank_dir, tp, p_rank, chunks, blocks, iter_dir, grad)
                files.append(task)
                files.extend(FileTask(f"{it_name}/{megatron_folders.PARAM_MAP_DIR}/"
                                      f"{param_map.param_map_file_name(b, d, tp, p_rank, v)}",
                                      "text", text=param_map.param_map_text(bl.slots))
                             for v, b, bl in maps for d in range(tgt.dp))
    files.append(FileTask(megatron_folders.TRACKER, "text", text=iteration))
    if (tgt.tp, tgt.pp) != (s.tp, s.pp):
        notes.append("RNG states: each target rank takes the source rank's at the same (tp, pp) modulo the source "
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
           # the files are legacy ones now: a resume must not look for a torch_dist checkpoint
           "ckpt_format": "torch", "use_dist_ckpt": False}
    return {k: v for k, v in out.items() if k in vars(args)}


def _model_task(md, model: DistModel, tgt, rank_dir, tp, pp, chunks, iter_dir):
    storages, entries, names_shapes = [], [], []
    for key, groups in zip(_chunk_keys(tgt.vpp), chunks):
        rows = []
        for names, extras in groups:
            part = []
            for name, p in names:
                w = shard_task(p, "weight", tgt.tp, tp, name, iter_dir)
                storage = f"w{len(storages)}"
                storages.append(StorageTask(storage, w.dtype, math.prod(w.shape), (StoragePiece(0, w),)))
                part.append({"path": [name], "tensor": storage, "dtype": w.dtype, "shape": list(w.shape)})
                names_shapes.append((name, w.shape))
            rows += _with_extra(model, part, extras)
        entries.append({"key": key, "leaves": rows})
    groups, note = _param_group_order(md.common.get("optimizer"), names_shapes)
    recipe = {"common": iter_dir, "args": _args_updates(model.args, tgt), "chunks": entries,
              "drop": list(M.DIST_ONLY_COMMON_KEYS), "optimizer_drop": list(M.DIST_ONLY_OPTIMIZER_KEYS),
              "param_groups": groups,
              "rng_state": _object_for(md, "rng_state", tp, pp, model.layout),
              "rerun_state": _object_for(md, "rerun_state_machine_state", tp, pp, model.layout)}
    return FileTask(f"{rank_dir}/{megatron_folders.MODEL_FILE}", "megatron_model_dist", storages=tuple(storages),
                    extra=recipe), note


def _optim_task(model: DistModel, tgt, rank_dir, tp, pp, chunks, blocks, iter_dir, grad):
    """distrib_optim.pt of target rank (tp, pp): per chunk and param dtype a DDP buffer laid out by the
    target version's ``buckets megatron`` block at the target sizes, each state assembled from the
    parameters' shards (zeros in alignment gaps)."""
    storages, bufs, maps = [], [], []
    for v, groups in enumerate(chunks):
        by_dtype: dict = {}
        for names, _ in groups:
            for name, p in names:
                shape = p.sharding.shard_shape(p.shape, tgt.tp)
                by_dtype.setdefault(p.dtype, []).append((_ddp_name(p.rule, [name]), p, shape, name))
        for dtype, params in by_dtype.items():
            entries = [buckets.ParamEntry(ddp, shape, dtype, p.rule.shared_embedding) for ddp, p, shape, _ in params]
            block, bl = _build_target_buffer(blocks, entries, _layout_values(model.args, tgt, pp, v),
                                             f"{rank_dir} chunk {v} {dtype} buffer")
            maps.append((v, sum(1 for m in maps if m[0] == v), bl))
            by_name = {ddp: (p, name) for ddp, p, _, name in params}
            tensors = {}
            for state in STATES:
                pieces = []
                for slot in bl.slots:
                    p, name = by_name[slot.name]
                    task = shard_task(p, state, tgt.tp, tp, f"{state} of {name}", iter_dir)
                    pieces.append((bl.coalesced_offset(slot), task))
                tensors[state] = [_state_storage(storages, pieces, bl.numel_unpadded)]
            bufs.append({"param_dtype": dtype, "grad_dtype": grad or dtype, "storage": block.storage,
                         "padded": bl.per_bucket_numel, "unpadded": bl.per_bucket_numel_unpadded,
                         "numel_unpadded": bl.numel_unpadded, "tensors": tensors})
    recipe = {"chained": False, "optimizers": [{"buffers": bufs}]}
    return FileTask(f"{rank_dir}/{megatron_folders.OPTIM_FILE}", "megatron_optim", storages=tuple(storages),
                    extra=recipe), maps
