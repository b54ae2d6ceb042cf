"""`ckptmap combine`: MindSpeed distributed-optimizer shards -> named full tensors (formats.md §3.4).

For every DP group (one ``opt_shard_info`` JSON) the plan has one output file whose tensors are:

* for every parameter of ``param_info`` and every state found in the shards (``""`` = the fp32
  parameter, ``exp_avg``, ``exp_avg_sq``, …): the elements ``[start, end)`` of the parameter's
  bucket, i.e. the pieces of the DP ranks' shards ``{state.}buffer_{i}_bucket_{j}`` that overlap
  the range (rank ``k`` holds ``[k·n/dp, (k+1)·n/dp)`` of the bucket), concatenated in
  ``dp_rank_list`` order and viewed with the parameter's shape. Alignment and bucket padding are
  never read. The values keep the shards' dtype (fp32: the main parameters and moments);
* for every ZeRO-3 parameter (``zero3_params``) and state: the ranks' dim-0 slices, stored under
  the parameter's own name, concatenated along dim 0 in DP order (a name also listed in
  ``param_info`` is taken from these slices; its ``shape`` there must match);
* every other key of the lowest rank's file (step counters, learning rates, RNG states, scheduler
  keys, …), unchanged. With ``save_optim=False`` the optimizer keys
  (``mindspeed.is_optimizer_key``) are left out.

Everything is checked here, from the JSON and the files' headers only, before anything is written:
the JSON itself (``opt_shard_info.read_opt_shard_info``), that every rank of every group has its
folder and a checkpoint of the chosen step, that every shard key exists on every rank with
``padded / dp`` elements and one dtype, and that no shard holds a buffer or bucket the JSON does
not describe.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import attrs

from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_folders, mindspeed, registry
from ckptmap.formats import opt_shard_info as osi
from ckptmap.mapping.plan import FileTask, Plan, SourceSlice, TensorTask

LAYOUTS = ("auto", "v1", "v2")
MAX_LISTED = 8


@attrs.frozen
class CombineOptions:
    strategy_dir: str = "output/opt_shard_info"
    checkpoint_dir: str = "output"
    output_dir: str = "output"
    src_format: str = "ckpt"
    dst_format: str = "ckpt"
    copy_to_all_dp_ranks: bool = False
    rank_section: tuple[int, int] | None = attrs.field(
        default=None, converter=lambda v: None if v is None or all(x is None for x in v) else tuple(v))
    save_optim: bool = True
    iteration: int | None = None
    epoch: int | None = None
    layout: str = "auto"
    crc: bool = False


@attrs.frozen
class _Group:
    label: str                  # V1: "rank_0"; V2: the mp_rank folder name
    info: osi.ShardInfo


def _listing(items, limit=MAX_LISTED) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:limit]) + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def _in_section(rank: int, section) -> bool:
    return section is None or section[0] <= rank < section[1]


# -------------------------------------------------------------------------------------------------
# Options and groups


def _check_options(opt: CombineOptions) -> None:
    for flag, value in (("--src-format", opt.src_format), ("--dst-format", opt.dst_format)):
        if value not in osi.FORMATS:
            raise CkptmapError(f"{flag} {value}: use one of {', '.join(osi.FORMATS)}")
    if opt.layout not in LAYOUTS:
        raise CkptmapError(f"--layout {opt.layout}: use one of {', '.join(LAYOUTS)}")
    if opt.rank_section is not None:
        a, b = opt.rank_section
        if a is None or b is None or a < 0 or b <= a:
            raise CkptmapError(f"--rank-section {a} {b}: give two global ranks A < B (ranks A <= r < B are "
                               f"processed), e.g. --rank-section 0 8")
    if opt.iteration is not None and opt.iteration < 0:
        raise CkptmapError(f"--iteration {opt.iteration}: a step number is not negative")


def _detect_layout(option: str, strategy: Path) -> str:
    v1 = osi.find_v1_shard_infos(strategy)
    v2 = osi.find_v2_shard_infos(strategy)
    if option == "v1" or (option == "auto" and v1 and not v2):
        if not v1:
            raise CkptmapError(
                f"--strategy-dir {strategy} holds no rank_*/dist_opt_shard_info_rank_*-0_0.json (layout V1); point "
                f"--strategy-dir at the run's opt_shard_info folder"
                f"{' (it looks like layout V2: try --layout v2)' if v2 else ''}")
        return "v1"
    if option == "v2" or (option == "auto" and v2 and not v1):
        if not v2:
            raise CkptmapError(
                f"--strategy-dir {strategy} holds no mp_rank_*/{osi.V2_SHARD_INFO_NAME} (layout V2); point "
                f"--strategy-dir at the run's opt_shard_info folder"
                f"{' (it looks like layout V1: try --layout v1)' if v1 else ''}")
        return "v2"
    if v1 and v2:
        raise CkptmapError(f"--strategy-dir {strategy} holds shard-info files of both layouts (rank_*/ and "
                           f"mp_rank_*/); choose one with --layout v1 or --layout v2")
    raise CkptmapError(
        f"--strategy-dir {strategy} holds no shard-info JSON: expected rank_{{r}}/dist_opt_shard_info_rank_"
        f"{{r}}-0_0.json (V1) or mp_rank_*/{osi.V2_SHARD_INFO_NAME} (V2), written by a MindSpeed run with the "
        f"distributed optimizer; point --strategy-dir at that run's opt_shard_info folder")


def _read_groups(layout: str, strategy: Path) -> list[_Group]:
    groups = []
    if layout == "v1":
        for rank, path in sorted(osi.find_v1_shard_infos(strategy).items()):
            info = osi.read_opt_shard_info(path)
            if info.dp_ranks[0] != rank:
                raise CkptmapError(
                    f"{path}: found in the folder of rank {rank}, but its dp_rank_list {list(info.dp_ranks)} starts "
                    f"at rank {info.dp_ranks[0]}; only the lowest rank of a DP group writes the file — the folder "
                    f"was renamed or mixed with another run; restore the training run's opt_shard_info folder")
            groups.append(_Group(osi.rank_dir_name(rank), info))
    else:
        for mp_dir, path in sorted(osi.find_v2_shard_infos(strategy).items()):
            groups.append(_Group(mp_dir, osi.read_opt_shard_info(path)))
    owner: dict[int, _Group] = {}
    for g in groups:
        for r in g.info.dp_ranks:
            if r in owner:
                raise CkptmapError(
                    f"rank {r} is in two DP groups: {owner[r].info.path} (dp_rank_list "
                    f"{list(owner[r].info.dp_ranks)}) and {g.info.path} (dp_rank_list {list(g.info.dp_ranks)}); the "
                    f"opt_shard_info folder mixes files of different runs — use the one of a single run")
            owner[r] = g
    return groups


def _select(groups: list[_Group], opt: CombineOptions, layout: str) -> list[_Group]:
    if opt.rank_section is None:
        return groups
    if opt.copy_to_all_dp_ranks and layout == "v1":
        chosen = [g for g in groups if any(_in_section(r, opt.rank_section) for r in g.info.dp_ranks)]
    else:
        chosen = [g for g in groups if _in_section(g.info.dp_ranks[0], opt.rank_section)]
    if not chosen:
        a, b = opt.rank_section
        raise CkptmapError(
            f"--rank-section {a} {b} selects no DP group: the groups' lowest ranks are "
            f"{_listing(g.info.dp_ranks[0] for g in groups)}; choose a section that contains some of them")
    return chosen


# -------------------------------------------------------------------------------------------------
# Step selection: by step number, never by modification time


def _step_text(step_id) -> str:
    return f"{step_id[0]}_{step_id[1]}" if isinstance(step_id, tuple) else str(step_id)


def _choose_step(available: dict[str, set], opt: CombineOptions, what: str, naming: str):
    """The step every source has: the one asked for (``--iteration``/``--epoch``) or the latest
    common one. Returns (step id, {label: newer steps ignored})."""
    def shown(steps):
        return _listing(_step_text(s) for s in sorted(steps)) or "none"

    def matches(s):
        if isinstance(s, tuple):
            return ((opt.iteration is None or s[1] == opt.iteration)
                    and (opt.epoch is None or s[0] == opt.epoch))
        return opt.iteration is None or s == opt.iteration

    asked = opt.iteration is not None or opt.epoch is not None
    if asked:
        lacking = {label: steps for label, steps in available.items() if not any(matches(s) for s in steps)}
        if lacking:
            label, steps = next(iter(lacking.items()))
            want = " ".join(x for x in (f"--iteration {opt.iteration}" if opt.iteration is not None else "",
                                        f"--epoch {opt.epoch}" if opt.epoch is not None else "") if x)
            raise CkptmapError(
                f"{label} has no {what} for {want} (it has steps {shown(steps)}; {len(lacking)} of "
                f"{len(available)} sources lack it); choose a step every rank saved, or copy the missing "
                f"files — steps are read from the names {naming}")
        candidates = set.intersection(*({s for s in steps if matches(s)} for steps in available.values()))
    else:
        candidates = set.intersection(*available.values())
    if not candidates:
        rows = "; ".join(f"{label}: {shown(steps)}" for label, steps in list(available.items())[:MAX_LISTED])
        raise CkptmapError(
            f"the ranks disagree on the available steps and no step is present on every rank ({rows}); copy the "
            f"missing checkpoint files into place, or pass --rank-section to combine only the ranks that agree "
            f"— steps are read from the names {naming}")
    if asked and len(candidates) > 1:
        raise CkptmapError(f"--iteration {opt.iteration} matches steps {shown(candidates)} (several epochs); add "
                           f"--epoch E to choose one")
    chosen = max(candidates)
    newer = {label: sorted(s for s in steps if s > chosen) for label, steps in available.items()}
    return chosen, {label: s for label, s in newer.items() if s}


def _v1_sources(groups, ckdir: Path, opt: CombineOptions):
    """{rank: V1Checkpoint} of the chosen step, the step, and the ranks' ignored newer steps."""
    naming = f"rank_{{r}}/<prefix>-<epoch>_<step>.{opt.src_format}"
    found: dict[int, dict] = {}
    for g in groups:
        for r in g.info.dp_ranks:
            d = ckdir / osi.rank_dir_name(r)
            if not d.is_dir():
                raise CkptmapError(
                    f"rank folder {d} is missing: rank {r} belongs to the DP group {list(g.info.dp_ranks)} of "
                    f"{g.info.path}, and its shards are needed to merge that group; copy the folder into "
                    f"--checkpoint-dir {ckdir} (or point --checkpoint-dir at the folder holding every rank_*)")
            by_step = defaultdict(list)
            for ck in osi.list_v1_checkpoints(d, opt.src_format):
                by_step[ck.step_id].append(ck)
            if not by_step:
                raise CkptmapError(
                    f"{d} holds no {opt.src_format} checkpoint named <prefix>-<epoch>_<step>.{opt.src_format}; "
                    f"check --checkpoint-dir and --src-format (ckpt or safetensors)")
            found[r] = by_step
    chosen, newer = _choose_step({str(ckdir / osi.rank_dir_name(r)): set(s) for r, s in found.items()}, opt,
                                 "checkpoint", naming)
    picked = {}
    for r, by_step in found.items():
        cks = by_step[chosen]
        if len(cks) > 1:
            raise CkptmapError(
                f"{ckdir / osi.rank_dir_name(r)} has several checkpoints of step {_step_text(chosen)} "
                f"({', '.join(c.path.name for c in cks)}); move the ones that are not the training run's shards away")
        picked[r] = cks[0]
    return picked, chosen, newer


def _v2_sources(groups, ckdir: Path, opt: CombineOptions):
    """{(mp_dir, dp): path} of the chosen iteration, the iteration, and the ignored newer ones."""
    if opt.epoch is not None:
        raise CkptmapError("--epoch applies to layout V1 names (<prefix>-<epoch>_<step>); layout V2 has iter_* "
                           "folders — use --iteration")
    naming = f"iter_<iteration:07d>/mp_rank_*/model_optim_rng_<dp:03d>.{opt.src_format}"
    iterations = osi.list_v2_iterations(ckdir)
    if not iterations:
        raise CkptmapError(f"--checkpoint-dir {ckdir} holds no iter_* folder (layout V2: {naming}); point it at the "
                           f"run's checkpoint folder")
    available = {}
    for g in groups:
        if not any((ckdir / megatron_folders.iter_dir_name(it) / g.label).is_dir() for it in iterations):
            raise CkptmapError(
                f"rank folder {g.label} is missing from every iter_* folder of {ckdir}: its DP group "
                f"{list(g.info.dp_ranks)} ({g.info.path}) cannot be merged; copy the folder into place or point "
                f"--checkpoint-dir at the checkpoint holding every mp_rank_* folder")
        for k, r in enumerate(g.info.dp_ranks):
            available[f"{ckdir}/iter_*/{g.label} dp {k} (rank {r})"] = {
                it for it in iterations if (ckdir / osi.v2_shard_path(it, g.label, k, opt.src_format)).is_file()}
    chosen, newer = _choose_step(available, opt, "shard file", naming)
    paths = {}
    for g in groups:
        d = ckdir / megatron_folders.iter_dir_name(chosen) / g.label
        extra = sorted(p.name for p in d.iterdir()
                       if (parsed := osi.parse_v2_shard_name(p.name)) and parsed[1] == opt.src_format
                       and parsed[0] >= g.info.dp)
        if extra:
            raise CkptmapError(
                f"{d} holds {', '.join(extra)} but {g.info.path} describes a DP group of {g.info.dp} rank(s) "
                f"{list(g.info.dp_ranks)}; the checkpoint and the opt_shard_info come from runs with different "
                f"DP sizes — use the matching opt_shard_info folder")
        for k in range(g.info.dp):
            paths[(g.label, k)] = ckdir / osi.v2_shard_path(chosen, g.label, k, opt.src_format)
    return paths, chosen, newer


# -------------------------------------------------------------------------------------------------
# One DP group -> tensor tasks


def _inventory(path: Path) -> dict:
    reader = registry.open_reader(path)
    try:
        return {k: reader.spec(k) for k in reader.keys()}
    finally:
        reader.close()


STEP_KEYS = ("state_step", "iteration", "step_num")


def _check_same_step(info: osi.ShardInfo, files: list[Path], inv: list[dict]) -> None:
    """Every rank of a DP group holds the shard of one optimizer step: their ``state_step``,
    ``iteration`` and ``step_num`` agree (a file copied in from another save has the right name but
    another step; merging it would mix two optimizer states)."""
    for key in STEP_KEYS:
        values = []
        for k, (path, keys) in enumerate(zip(files, inv)):
            spec = keys.get(key)
            if spec is None or math.prod(spec[1]) != 1 or spec[0] == "str":
                continue
            reader = registry.open_reader(path)
            try:
                value = reader.array(key).reshape(-1)[0].item()
            finally:
                reader.close()
            values.append((info.dp_ranks[k], path, value))
        if len({v for _, _, v in values}) > 1:
            shown = "; ".join(f"rank {r} has {v:g} ({path})" for r, path, v in values)
            raise CkptmapError(
                f"the ranks of DP group {list(info.dp_ranks)} ({info.path}) hold different steps in {key}: {shown}. "
                f"Their shards belong to different saves and cannot be merged into one optimizer state; put back "
                f"each rank's file of the same save (or pick a step every rank saved with --iteration)")


def _group_tasks(group: _Group, files: list[Path], opt: CombineOptions) -> list[TensorTask]:
    info = group.info
    dp = info.dp
    inv = [_inventory(p) for p in files]
    _check_same_step(info, files, inv)
    fix = ("the checkpoint files and the opt_shard_info folder come from different runs (or DP sizes); use the "
           "shard-info JSON written by the run that saved these checkpoints")

    # the states: "" (fp32 parameters) and every prefix of a buffer key or a ZeRO-3 key on the lowest rank
    states = [""]
    for key in inv[0]:
        parsed = osi.parse_buffer_key(key)
        state = parsed[0] if parsed else next(
            (key[:-len(z) - 1] for z in info.zero3_params if key.endswith("." + z)), None)
        if state and state not in states:
            states.append(state)
    out_states = states if opt.save_optim else [""]

    # every shard key on every rank, dp-th of the padded bucket, one dtype
    expected = {}
    for i, layout in info.buffers.items():
        for j, b in enumerate(layout.buckets):
            if b.numel % dp:
                raise CkptmapError(
                    f"{info.path}: bucket {j} of buffer {i} has {b.numel} padded elements, which the {dp} ranks of "
                    f"dp_rank_list {list(info.dp_ranks)} cannot share equally; the JSON is inconsistent — {fix}")
            for s in states:
                expected[osi.buffer_key(i, j, s)] = (i, j, s, b.numel // dp)
    shard_dtype: dict[str, str] = {}
    for k, (path, keys) in enumerate(zip(files, inv)):
        for key, (i, j, s, length) in expected.items():
            if key not in keys:
                raise CkptmapError(
                    f"{path}: no tensor {key} (bucket {j} of buffer {i}{f', state {s}' if s else ''}), which "
                    f"{info.path} describes and {'the lowest rank has' if k else 'every rank needs'}; the file is "
                    f"incomplete or not a distributed-optimizer shard — {fix}")
            dtype, shape = keys[key]
            if tuple(shape) != (length,):
                raise CkptmapError(
                    f"{path}: shard {key} has shape {list(shape)}, expected [{length}] = the "
                    f"{info.buffers[i].buckets[j].numel} padded elements of bucket {j} of buffer {i} "
                    f"({info.path}) / DP size {dp}; {fix}")
            if shard_dtype.setdefault(key, dtype) != dtype:
                raise CkptmapError(f"{path}: shard {key} is {dtype} but {files[0]} holds it as {shard_dtype[key]}; "
                                   f"the ranks' files come from different runs — {fix}")
        strays = [key for key in keys if osi.parse_buffer_key(key) and key not in expected]
        if strays:
            raise CkptmapError(
                f"{path}: holds shard(s) {_listing(strays)} that {info.path} does not describe (it has buffers "
                f"{sorted(info.buffers)} with bucket counts {[len(b.buckets) for b in info.buffers.values()]}); {fix}")

    zero3 = set(info.zero3_params)
    tasks: list[TensorTask] = []
    for i, layout in sorted(info.buffers.items()):
        for slot in layout.slots:
            if slot.name in zero3:
                continue
            bucket = layout.buckets[slot.bucket]
            length = bucket.numel // dp
            lo, hi = slot.start - bucket.start, slot.end - bucket.start
            for s in out_states:
                key = osi.buffer_key(i, slot.bucket, s)
                sources, pieces = [], []
                for k in range(lo // length if length else 0, dp):
                    a, b = max(lo, k * length), min(hi, (k + 1) * length)
                    if a >= b:
                        break
                    sources.append(SourceSlice(str(files[k]), key, shard_dtype[key], (length,),
                                               start=a - k * length, numel=b - a))
                    pieces.append(f"dp{k}[{a - k * length}:{b - k * length}]")
                if not sources:  # an empty parameter: zero elements, still one (empty) slice
                    sources.append(SourceSlice(str(files[0]), key, shard_dtype[key], (length,), start=0, numel=0))
                tasks.append(TensorTask(osi.state_name(s, slot.name), shard_dtype[key], slot.shape, tuple(sources),
                                        shard_dtype[key], slot.shape,
                                        note=f"{key}[{lo}:{hi}] = {' + '.join(pieces) or 'empty'}"))

    zero3_keys = set()
    for name in info.zero3_params:
        for s in states:
            key = osi.state_name(s, name)
            zero3_keys.add(key)
            have = [key in keys for keys in inv]
            if not any(have) and s:
                continue
            if not all(have):
                k = have.index(False)
                raise CkptmapError(
                    f"{files[k]}: no tensor {key}, the dp-rank-{k} slice of ZeRO-3 parameter {name} "
                    f"({info.path} lists it in zero3_params){'; other ranks have it' if any(have) else ''}; {fix}")
            if s not in out_states:
                continue
            specs = [keys[key] for keys in inv]
            dtype, first = specs[0]
            for k, (d, shape) in enumerate(specs):
                if d != dtype or len(shape) < 1 or tuple(shape[1:]) != tuple(first[1:]):
                    raise CkptmapError(
                        f"{files[k]}: ZeRO-3 slice {key} is {d} {list(shape)} but the lowest rank's is {dtype} "
                        f"{list(first)}; dim-0 slices must share the dtype and the other dims — {fix}")
            shape = (sum(sh[0] for _, sh in specs), *first[1:])
            declared = info.declared.get(name)
            if declared is not None and tuple(declared[0]) != shape:
                raise CkptmapError(
                    f"{info.path}: ZeRO-3 parameter {name} has shape {list(declared[0])} in param_info but its "
                    f"slices on the {dp} ranks add up to {list(shape)} along dim 0; {fix}")
            sources = tuple(SourceSlice(str(files[k]), key, dtype, sh) for k, (_, sh) in enumerate(specs))
            tasks.append(TensorTask(key, dtype, shape, sources, dtype, shape,
                                    note=f"{key}: dim 0 of dp0..dp{dp - 1} " +
                                         "+".join(str(sh[0]) for _, sh in specs)))

    for key, (dtype, shape) in inv[0].items():
        if osi.parse_buffer_key(key) or key in zero3_keys:
            continue
        if not opt.save_optim and mindspeed.is_optimizer_key(key, states):
            continue
        if dtype == "str":
            raise CkptmapError(
                f"{files[0]}: key {key} holds a string; ckptmap's executor cannot copy string values yet, so "
                f"combine refuses before writing anything — report this (with the key name) to the ckptmap "
                f"maintainers")
        tasks.append(TensorTask(key, dtype, shape, (SourceSlice(str(files[0]), key, dtype, shape),), dtype, shape,
                                note=f"{key} of dp0"))

    seen = set()
    for t in tasks:
        if t.name in seen:
            raise CkptmapError(f"{info.path}: the merged file would hold {t.name} twice (a parameter name that is "
                               f"also a key of {files[0]}); {fix}")
        seen.add(t.name)
    for t in tasks:
        assert t.sources and sum(s.count for s in t.sources) == math.prod(t.shape), t.name
    return tasks


# -------------------------------------------------------------------------------------------------
# The plan


def compile_combine(opt: CombineOptions) -> Plan:
    _check_options(opt)
    strategy, ckdir = Path(opt.strategy_dir), Path(opt.checkpoint_dir)
    if not strategy.is_dir():
        raise CkptmapError(f"--strategy-dir {strategy} is not a folder; point it at the training run's "
                           f"opt_shard_info folder (default output/opt_shard_info)")
    if not ckdir.is_dir():
        raise CkptmapError(f"--checkpoint-dir {ckdir} is not a folder; point it at the folder holding the "
                           f"run's rank_* (or iter_*) folders (default output)")
    layout = _detect_layout(opt.layout, strategy)
    groups = _select(_read_groups(layout, strategy), opt, layout)
    metadata = {"format": "ms"} if opt.dst_format == "safetensors" else {}
    crc = opt.crc and opt.dst_format == "ckpt"
    out_files: list[FileTask] = []
    copies: list[FileTask] = []
    notes = []

    if layout == "v1":
        picked, step, newer = _v1_sources(groups, ckdir, opt)
        for g in groups:
            ranks = g.info.dp_ranks
            tasks = _group_tasks(g, [picked[r].path for r in ranks], opt)
            targets = ([r for r in ranks if _in_section(r, opt.rank_section)] if opt.copy_to_all_dp_ranks
                       else [ranks[0]])
            primary = osi.v1_merged_path(targets[0], picked[targets[0]].stem, opt.dst_format)
            out_files.append(FileTask(primary, opt.dst_format, tuple(tasks), metadata, crc=crc))
            for r in targets[1:]:
                copies.append(FileTask(osi.v1_merged_path(r, picked[r].stem, opt.dst_format), "copy",
                                       source=primary, source_is_output=True))
    else:
        paths, step, newer = _v2_sources(groups, ckdir, opt)
        for g in groups:
            tasks = _group_tasks(g, [paths[(g.label, k)] for k in range(g.info.dp)], opt)
            out_files.append(FileTask(osi.v2_merged_path(step, g.label, opt.dst_format), opt.dst_format,
                                      tuple(tasks), metadata, crc=crc))
        out_files.append(FileTask(mindspeed.v2_tracker_path(), "text", text=str(step)))
        if opt.copy_to_all_dp_ranks:
            notes.append("--copy-to-all-dp-ranks has no effect in layout V2 (one merged file per mp_rank folder "
                         "serves every DP rank)")

    dps = sorted({g.info.dp for g in groups})
    info = {
        "source": str(ckdir), "strategy": str(strategy), "layout": layout, "groups": len(groups),
        "dp": dps[0] if len(dps) == 1 else dps,
        "step": _step_text(step),
        "step_choice": ("as asked (--iteration/--epoch)" if opt.iteration is not None or opt.epoch is not None
                        else "the latest step present on every rank"),
        "format": f"{opt.src_format} -> {opt.dst_format}",
        "mode": "weights and optimizer" if opt.save_optim else "weights only (--no-save-optim)",
    }
    if opt.rank_section is not None:
        info["rank_section"] = f"{opt.rank_section[0]} <= rank < {opt.rank_section[1]}"
    if opt.copy_to_all_dp_ranks and layout == "v1":
        info["copies"] = len(copies)
    if newer:
        info["newer_steps_ignored"] = "; ".join(
            f"{label}: {', '.join(_step_text(s) for s in steps)}" for label, steps in list(newer.items())[:MAX_LISTED])
    if notes:
        info["note"] = " ".join(notes)
    # Writing into the folder of the shards (the reference's default --output-dir = --checkpoint-dir):
    # that folder holds data combine reads but does not own, so only the merged files count as
    # overwrites and nothing else is ever removed. A separate output folder belongs to the merge.
    out = Path(opt.output_dir)
    shared = any(_within(d, out) for d in (ckdir, strategy))
    if shared:
        info["output"] = "shared with the shards (only the merged files are this run's)"
    return Plan("combine", str(out), tuple(out_files + copies), info, output_shared=shared)


def _within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or inside it (symbolic links resolved)."""
    p, f = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return p == f or f in p.parents
