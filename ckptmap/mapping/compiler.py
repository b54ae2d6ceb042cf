"""``pt2ms``: a Megatron checkpoint (read by ``megatron_source``) → a Plan of MindSpore files.

The inventory is read from file metadata only (the pickled object tree of each
``model_optim_rng.pt``, never its tensor bytes). Every check that can fail on bad input runs
before anything is written, so a refused conversion leaves the output untouched.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import attrs

from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_files, megatron_folders, mindspeed, param_map, torch_zip_reader
from ckptmap.mapping import ops as tensor_ops
from ckptmap.mapping import planning_split
from ckptmap.mapping.plan import FileTask, Plan, SourceSlice, TensorTask
from ckptmap.mapping.rules import STACK_COUNT
from ckptmap.mapping.megatron_source import (AUTO_RULES, FLOAT_DTYPES, MegatronSource, SourceOptions,
                                             _flat_part, _numbered, _read_map, ddp_name, global_bindings, planning,
                                             SpotChecks, state_slice)


@attrs.frozen
class Pt2MsOptions:
    megatron_path: str
    ms_path: str
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
    generate_all_dp_cp: bool = False
    convert_param_only: bool = False
    file_prefix: str = mindspeed.DEFAULT_PREFIX
    format: str = "ckpt"
    dist_opt_content: tuple[str, ...] = ("param", "exp_avg", "exp_avg_sq")
    rules: str = AUTO_RULES
    layout: str = "v1"
    dtype: str = "float32"
    crc: bool = False
    megatron_version: str | None = None
    main_param_check: bool = True
    # the caller spot-checks the main params of the plan it makes of this one (pt2ms of torch_dist: the files
    # planned from are intermediates whose byte copies are holes, see mapping/torch_dist_pt2ms.py)
    defer_spot_check: bool = False
    # processes reading the ranks (planning_split): None decides by the number of ranks and CPUs, at most
    # planning_limit (the run's --process-limit; 1 under --multiprocess-off)
    planning_processes: int | None = None
    planning_limit: int | None = None


def source_options(opt) -> SourceOptions:
    """The SourceOptions fields of a command's options object (same names)."""
    return SourceOptions(**{f.name: getattr(opt, f.name) for f in attrs.fields(SourceOptions) if hasattr(opt, f.name)})


@planning
def compile_pt2ms(opt: Pt2MsOptions) -> Plan:
    if opt.format not in ("ckpt", "safetensors"):
        raise CkptmapError(f"--format {opt.format}: use ckpt or safetensors")
    if opt.layout not in mindspeed.LAYOUTS:
        raise CkptmapError(f"--layout {opt.layout}: use v1 or v2")
    if opt.dtype != "keep" and opt.dtype not in FLOAT_DTYPES:
        raise CkptmapError(f"--dtype {opt.dtype}: use keep or one of {', '.join(FLOAT_DTYPES)}")
    ckdir = megatron_folders.open_checkpoint_dir(opt.megatron_path)
    parts = planning_split.stage_parts(ckdir.pp_size, len(ckdir.ranks), opt.planning_processes, opt.planning_limit)
    done = planning_split.in_parts(parts, functools.partial(_plan_part, opt, ckdir),
                                   functools.partial(_handed_back, opt, ckdir))
    return _assemble(opt, done[0], list(zip(parts[1:], done[1:])))


@attrs.frozen
class _Part:
    """The plan of the ranks of some pipeline stages (all: ``stages`` None): each rank's files in rank
    order, the param_map texts derived, the param_maps relied on; ``src`` (its process's source) or,
    handed back by another process, ``facts`` and the zip ``directories`` it read."""

    stages: tuple[int, int] | None
    rank_files: list
    derived_maps: list
    used_maps: set
    src: MegatronSource | None = None
    facts: object = None
    directories: dict = attrs.field(factory=dict)


def _handed_back(opt: Pt2MsOptions, ckdir, stages) -> _Part:
    """A forked planning process's part: what its MegatronSource found instead of the source itself."""
    inherited = set(torch_zip_reader.remembered_directories())
    part = _plan_part(opt, ckdir, stages)
    return attrs.evolve(part, src=None, facts=part.src.facts(),
                        directories=torch_zip_reader.remembered_directories(skip=inherited))


def _plan_part(opt: Pt2MsOptions, ckdir, stages) -> _Part:
    """Plan the ranks of pipeline stages ``stages`` ([first, end); None: all)."""
    src = MegatronSource(attrs.evolve(source_options(opt), rank_state=False, pp_part=stages), ckdir)
    # the states are the rules' (optimizer_state { … }); the Megatron file format says which it holds
    declared = [s.state for s in src.rules.states]
    bad_states = [x for x in opt.dist_opt_content if x not in declared]
    if bad_states and not opt.convert_param_only:
        raise CkptmapError(f"--dist-opt-content {' '.join(bad_states)}: the rules {src.rules.path} name the optimizer "
                           f"states {' '.join(declared) or '(none)'}; choose from those, or add the state to their "
                           f"optimizer_state block")
    foreign = [s for s in src.rules.states if s.state in opt.dist_opt_content and s.state not in megatron_files.OPTIM_STATES]
    if foreign and not opt.convert_param_only:
        raise CkptmapError(f"{foreign[0].loc}: optimizer state {foreign[0].state!r} is not one Megatron's "
                           f"distrib_optim.pt holds ({', '.join(megatron_files.OPTIM_STATES)}); leave it out with "
                           f"--dist-opt-content, or fix the rules")
    config = rules_config(src.rules, rule_env(src.env, src.layout))
    if not opt.convert_param_only:
        src.with_optimizer()
    layout, env, memo, ep_name, iteration = src.layout, src.env, src.memo, src.ep_name, src.iteration
    step = 0 if iteration == "release" else int(iteration)
    metadata = {"format": "ms"} if opt.format == "safetensors" else {}
    out_files: list[FileTask] = []
    used_maps: set[tuple[int, int, int]] = set()
    derived_maps: list[FileTask] = []
    scalar_tasks: dict = {}
    shared: dict = {}   # what ranks of one structure share (_shared_optimizer_tasks, _joined, the spot check)
    spot_checks = SpotChecks(shared)
    for rank in src.sorted_ranks:
        (tp, pp, ep), matched, model_file = rank.key, rank.matched, rank.model
        seen: dict[str, str] = {}
        inputs: dict = {}
        if opt.convert_param_only:
            tasks = [t for u in stack_units(matched, layout, env, model_file.path)
                     for t in _weight_task(u, layout, pp, model_file.path, opt.dtype, env, seen, ep)]
            scalar_rows = mindspeed.step_scalars(step, opt.layout)
        else:
            for v, g, bl in rank.own_layouts:
                if bl.origin != "derived":
                    used_maps.add((tp, pp, v))
            experts = {id(x[2]) for x in rank.expert_layouts}
            for v, b, g, bl in _numbered(rank.own_layouts):   # one file per DP rank, as the training run writes
                if bl.origin == "derived":
                    text = _map_text(bl, shared)
                    # an expert buffer's DP group is the expert-data-parallel group
                    derived_maps.extend(
                        FileTask(mindspeed.pt_meta_path(param_map.param_map_file_name(b, d, tp, pp, v, ep_name(ep))),
                                 "text", text=text)
                        for d in range(layout.expert_dp if id(bl) in experts else layout.dp))
            inputs, read = _rank_inputs(rank)
            tasks = _shared_optimizer_tasks(rank, src, opt, shared)
            if not opt.defer_spot_check:
                spot_checks.add(tasks, read)
            scalar_rows = None
        scalars = _rank_scalars(model_file, scalar_rows, step, opt.layout, scalar_tasks)
        tensors = _joined(tasks, scalars, shared)
        primary = None
        targets = (layout.mp_rank_ranks(tp, pp, all_dp_cp=opt.generate_all_dp_cp, ep=ep) if opt.layout == "v1"
                   else [None])
        for g in targets:
            rel = (mindspeed.v1_path(g, opt.file_prefix, opt.format) if opt.layout == "v1"
                   else mindspeed.v2_path(iteration, tp, pp, layout.pp, opt.format, ep_name(ep)))
            if primary is None:
                primary = rel
                out_files.append(FileTask(rel, opt.format, tensors, metadata, crc=opt.crc and opt.format == "ckpt",
                                          inputs=inputs))
            else:
                out_files.append(FileTask(rel, "copy", source=primary, source_is_output=True))
        out_files.append(_pt_meta_task(model_file, tp, pp, layout, src.maps_of, matched, memo, rank.map_entries,
                                       rank.own_layouts, rank.optim, ep_name(ep), config))
    spot_checks.finish()
    return _Part(stages, out_files, derived_maps, used_maps, src)


def _assemble(opt: Pt2MsOptions, mine: _Part, handed: list) -> Plan:
    """The plan of all ranks from the part this process planned (the first stages) and those other processes
    handed back (``handed``: [(stages, _Part)], in stage order)."""
    src, out_files, derived_maps, used_maps = mine.src, list(mine.rank_files), list(mine.derived_maps), set(mine.used_maps)
    for stages, part in handed:
        src.absorb(part.facts, planning_split.stages_text(stages))
        torch_zip_reader.remember_directories(part.directories)
        out_files.extend(part.rank_files)
        derived_maps.extend(part.derived_maps)
        used_maps |= part.used_maps
    if handed:
        src.check_rules_used(src.rules_used)
    iteration = src.iteration
    config = rules_config(src.rules, rule_env(src.env, src.layout))
    for pm in src.param_maps:  # the way back reads pt_meta: keep only the maps this conversion relied on
        if opt.convert_param_only or (pm.tp, pm.pp, pm.vpp) in used_maps:
            out_files.append(FileTask(mindspeed.pt_meta_path(pm.path.name), "copy", source=str(pm.path)))
    out_files.extend(derived_maps)
    if opt.layout == "v2":
        out_files.append(FileTask(mindspeed.v2_tracker_path(), "text", text=str(iteration)))
    info = src.info()
    info.update(layout=opt.layout, format=opt.format, dtype=opt.dtype, all_dp_cp=opt.generate_all_dp_cp,
                mode="weights only" if opt.convert_param_only else f"optimizer ({' '.join(opt.dist_opt_content)})")
    if config:
        info["config"] = config
    return Plan("pt2ms", str(Path(opt.ms_path)), tuple(out_files), info)


_PLAIN = (int, float, bool, str)


def _rank_scalars(model_file, rows, step, layout_version, cache: dict) -> list[TensorTask]:
    """The scalar tasks of one rank: ``rows`` as given, else the step scalars plus the rank's optimizer
    and scheduler scalars. Ranks whose files share one object tree (torch_zip_reader.shared_trees: equal
    pickles) share the list, worked out once from those (read-only) objects; the file is named only in
    an error, which the first rank with those objects raises. Ranks with equal scalars share it too."""
    if rows is not None:
        return [_scalar_task(row, cache) for row in rows]
    optimizer, scheduler = model_file.root.get("optimizer"), model_file.root.get("opt_param_scheduler")
    key = ("rank scalars", id(optimizer), id(scheduler))
    hit = cache.get(key)
    if hit is not None and hit[0] is optimizer and hit[1] is scheduler:
        return hit[2]
    try:   # equal objects of another rank's file (each rank's own pickle): their pickled bytes are equal
        value_key = ("rank scalars of", step, layout_version, pickle.dumps((optimizer, scheduler), protocol=4))
    except Exception:   # an object that does not pickle here: worked out for this rank alone
        value_key = None
    hit = cache.get(value_key) if value_key is not None else None
    if hit is not None:
        cache[key] = (optimizer, scheduler, hit)
        return hit
    rows = mindspeed.step_scalars(step, layout_version) + mindspeed.optimizer_scalars(
        optimizer, scheduler, str(model_file.path))
    tasks = [_scalar_task(row, cache) for row in rows]
    # ranks whose pickles differ (each rank's args name it) but whose scalars are equal: one list
    tasks = cache.setdefault(("rank scalar list",) + tuple(map(id, tasks)), tasks)
    cache[key] = (optimizer, scheduler, tasks)   # the objects are kept: their ids stay theirs
    if value_key is not None:
        cache[value_key] = tasks
    return tasks


def _scalar_task(row, cache: dict) -> TensorTask:
    """The constant task of a scalar row; every rank has the same step and optimizer scalars, so equal
    rows share one (immutable) task. Keyed by the value's repr: 1, 1.0 and True stay apart."""
    name, dtype, shape, value = row
    plain = type(value) in _PLAIN or (type(value) is list and all(type(x) in _PLAIN for x in value))
    if not plain:
        return TensorTask(name, dtype, shape, value=value)
    key = (name, dtype, tuple(shape), repr(value))
    task = cache.get(key)
    if task is None:
        task = cache[key] = TensorTask(name, dtype, shape, value=value)
    return task


@attrs.frozen
class _Out:
    """One MindSpore tensor made of a matched Megatron tensor: the whole of it, or (rules with
    ``parts:``) the flat element ``ranges`` of its TP-local tensor that form one part."""

    name: str
    dtype: str
    shape: tuple
    ops: tuple
    src_shape: tuple                 # the Megatron elements viewed so, before ops
    ranges: tuple | None = None      # ((start, numel), ...); None: the whole tensor
    part: str | None = None


def _ranged(source: SourceSlice, ranges) -> tuple[SourceSlice, ...]:
    """The source's elements at ``ranges`` (relative to the source's own start), one slice each."""
    if ranges is None:
        return (source,)
    return tuple(_flat_part(source, lo, n) for lo, n in ranges)


def rule_env(env: dict, layout) -> dict:
    """The values rule ops and parts are resolved with: the checkpoint's integer args and the TP size."""
    return {**env, "tp": layout.tp}


def rules_config(rules, env: dict) -> dict:
    """{symbol: value} of every config value the rules' ops and parts use that ``env`` holds: stored
    in pt_meta and the plan, so that ms2pt resolves the same sizes (whatever its own args say)."""
    used = set().union(*(r.config_symbols() for r in rules.params)) if rules.params else set()
    return {k: int(env[k]) for k in sorted(used) if k in env}


@attrs.frozen
class _Stack:
    """The tensors of one ``stack: expert`` rule that become one MindSpore tensor: a rank's local experts
    of one layer, ``members[i]`` being local expert i (the MindSpore tensor's row i on axis 0)."""

    members: tuple

    @property
    def rule(self):
        return self.members[0].rule

    @property
    def tensor(self):
        return self.members[0].tensor

    @property
    def label(self) -> str:
        first, last = self.members[0].tensor.name, self.members[-1].tensor.name
        return f"{first} … {last} (stacked)" if len(self.members) > 1 else f"{first} (stacked)"


def stacked_count(rule, layout, env, where) -> int:
    """How many experts a stacked tensor holds: the local experts of one expert-parallel rank."""
    total = env.get(STACK_COUNT)
    if not total:
        raise CkptmapError(f"{where}: rules {rule.stack_loc or rule.loc} stack the experts, but the checkpoint's args "
                           f"give no {STACK_COUNT}; cannot tell how many experts each stacked tensor holds")
    if total % layout.ep:
        raise CkptmapError(f"{where}: {STACK_COUNT} = {total} is not divisible by the expert-parallel size {layout.ep}")
    return total // layout.ep


def stack_units(matched, layout, env, path) -> list:
    """``matched`` with the tensors of every ``stack:`` rule gathered into _Stack units (one per stacked
    MindSpore tensor, in the position of its first member), each checked to hold exactly local experts
    0 .. num_experts/ep - 1 of one shape and dtype."""
    groups: dict[tuple, list] = {}
    units: list = []
    for m in matched:
        if m.rule.stack is None:
            units.append(m)
            continue
        key = (m.tensor.chunk, m.rule.loc, tuple(sorted((k, v) for k, v in m.bindings.items() if k != m.rule.stack)))
        if key not in groups:
            groups[key] = []
            units.append(key)
        groups[key].append(m)
    out = []
    for u in units:
        if not isinstance(u, tuple):
            out.append(u)
            continue
        members = sorted(groups[u], key=lambda m: m.bindings[m.rule.stack])
        rule = members[0].rule
        want = stacked_count(rule, layout, env, path)
        found = [m.bindings[rule.stack] for m in members]
        if found != list(range(want)):
            raise CkptmapError(
                f"{path}: rules {rule.stack_loc or rule.loc} stack {rule.megatron} over the {want} local experts "
                f"0 … {want - 1} ({STACK_COUNT} / ep), but the checkpoint holds experts {found} of "
                f"{members[0].tensor.name}'s layer; check --ep-size and the model's {STACK_COUNT}, or drop stack: to "
                f"convert the experts one by one")
        odd = [m for m in members if (m.tensor.shape, m.tensor.dtype) != (members[0].tensor.shape, members[0].tensor.dtype)]
        if odd:
            raise CkptmapError(
                f"{path}: rules {rule.stack_loc or rule.loc} stack {odd[0].tensor.name} ({odd[0].tensor.dtype} "
                f"{list(odd[0].tensor.shape)}) with {members[0].tensor.name} ({members[0].tensor.dtype} "
                f"{list(members[0].tensor.shape)}); stacked experts must have one shape and dtype — drop stack: for it")
        out.append(_Stack(tuple(members)))
    return out


def _weight_task(m, layout, pp, path, dtype_option, env, seen, ep: int = 0) -> list[TensorTask]:
    members = m.members if isinstance(m, _Stack) else (m,)
    sources = tuple(SourceSlice(str(path), x.tensor.key, x.tensor.dtype, x.tensor.shape) for x in members)
    label = m.label if isinstance(m, _Stack) else m.tensor.name
    return [TensorTask(o.name, o.dtype, o.shape, sources if isinstance(m, _Stack) else _ranged(sources[0], o.ranges),
                       m.tensor.dtype, o.src_shape, o.ops,
                       note=label if o.ranges is None else f"{label} · part {o.part}")
            for o in _weight_parts(m, layout, pp, path, dtype_option, env, seen, ep)]


def _weight_parts(m, layout, pp, path, dtype_option, env, seen, ep: int = 0, cache: dict | None = None) -> list[_Out]:
    """The MindSpore tensors (name, dtype, shape, ops, ranges) of a matched Megatron weight: one, or one
    per part of a rule with ``parts:``; or of a _Stack: one, its members on a new leading axis.
    ``cache``: one compile's; the parts depend on the rule, the tensor(s), the stage and the expert rank
    (TP ranks repeat them), not on the file."""
    label = m.label if isinstance(m, _Stack) else m.tensor.name
    key = None
    if cache is not None:
        key = (id(m.rule), tuple(x.tensor for x in m.members) if isinstance(m, _Stack) else m.tensor, pp, ep,
               dtype_option)
        hit = cache.get(key)
        if hit is not None and hit[0] is m.rule:
            for o in hit[1]:
                if o.name in seen:
                    raise CkptmapError(f"{path}: tensors {seen[o.name]} and {label} would both become {o.name} "
                                       f"(rules {m.rule.loc}); fix the rules")
                seen[o.name] = label
            return hit[1]
    out = _weight_parts_of(m, layout, pp, path, dtype_option, env, seen, ep, label)
    if key is not None:
        cache[key] = (m.rule, out)   # the rule is kept: its id stays its own
    return out


def _weight_parts_of(m, layout, pp, path, dtype_option, env, seen, ep, label) -> list[_Out]:
    first = m.members[0] if isinstance(m, _Stack) else m
    bindings = global_bindings(first, layout, pp, ep, env, path)
    where = f"{m.rule.loc} ({label})"
    renv = rule_env(env, layout)
    if isinstance(m, _Stack):
        pieces = [(None, (len(m.members),) + tuple(m.tensor.shape), None)]   # the rule's ops see the stacked shape
    elif m.rule.parts is None:
        pieces = [(None, m.tensor.shape, None)]
    else:
        divisor = layout.tp if m.rule.tp.dim == 0 else 1
        pieces = tensor_ops.resolve_parts(m.rule.parts, m.tensor.shape, renv, divisor, where)
    out = []
    for part, shape, ranges in pieces:
        name = m.rule.mindspore.format(dict(bindings, part=part) if part else bindings)
        if name in seen:
            raise CkptmapError(f"{path}: tensors {seen[name]} and {label} would both become {name} "
                               f"(rules {m.rule.loc}); fix the rules")
        seen[name] = label
        src_shape, dtype, concrete = tuple(shape), m.tensor.dtype, []
        for spec in m.rule.ops:
            op, shape, dtype = tensor_ops.resolve(spec.name, spec.args, shape, dtype, renv, where)
            concrete.append(op)
        if dtype_option != "keep" and dtype in FLOAT_DTYPES and dtype != dtype_option:
            op, shape, dtype = tensor_ops.resolve("cast", (dtype_option,), shape, dtype, renv, where)
            concrete.append(op)
        out.append(_Out(name, dtype, tuple(shape), tuple(concrete), src_shape, ranges, part))
    return out


MODEL_INPUT, OPTIM_INPUT, DENSE_INPUT = "@model", "@optim", "@dense"


def _rank_inputs(rank) -> tuple[dict, dict]:
    """The rank's files as its tasks name them: {input: path} for the FileTask, {input: PtFile} for the
    spot check. ``@dense``: the distrib_optim.pt holding the dense parameters' state (under expert
    parallelism the expert-rank-0 folder's; else the rank's own, like ``@optim``)."""
    read = {MODEL_INPUT: rank.model, OPTIM_INPUT: rank.optim}
    if rank.dense:
        read[DENSE_INPUT] = rank.dense[0]
    return {k: str(f.path) for k, f in read.items()}, read


def _map_text(bl, shared: dict) -> str:
    """The param_map text of a derived bucket layout: once per BufferLayout (TP ranks share one)."""
    hit = shared.get(("map text", id(bl)))
    if hit is None or hit[0] is not bl:
        hit = shared[("map text", id(bl))] = (bl, param_map.param_map_text(bl.slots))
    return hit[1]


def _joined(tasks, scalars, shared: dict) -> tuple:
    """``tasks + scalars`` as one tuple, the same tuple object for ranks that share both (so a plan of
    thousands of ranks holds each distinct tensor list once, and the printer tallies it once)."""
    key = ("joined", id(tasks), id(scalars))
    hit = shared.get(key)
    if hit is not None and hit[0] is tasks and hit[1] is scalars:
        return hit[2]
    joined = tuple(tasks) + tuple(scalars)
    shared[key] = (tasks, scalars, joined)   # kept: their ids stay theirs
    return joined


def _shared_optimizer_tasks(rank, src, opt, shared: dict) -> tuple[TensorTask, ...]:
    """_optimizer_tasks of the rank, naming its files by input (``@model`` …), so that ranks of one
    structure get one tuple: a TP group's ranks read equal pickles (one object tree, one match list:
    torch_zip_reader.shared_trees) with equal bucket layouts (one fitted BufferLayout) and differ only in
    their files. The key is everything the tasks are made of besides the files — the matched tensors,
    each (chunk, buffer, BufferLayout, OptimBuffer) the states are read through, the stage and the
    expert rank (global names) — by identity, with the objects kept so that an id is never reused; then
    with the BufferLayouts by value."""
    dense_optim, dense_layouts = rank.dense if rank.dense else (None, [])
    used = [(DENSE_INPUT, dense_optim, v, g, bl) for v, g, bl in dense_layouts] + \
           [(OPTIM_INPUT, rank.optim, v, g, bl) for v, g, bl in rank.expert_layouts]
    objects = (rank.matched,) + tuple(x for _, optim, _, g, bl in used for x in (bl, optim.buffers[g]))
    key = ("optimizer tasks", rank.pp, rank.ep, dense_optim is rank.optim,
           tuple((name, v, g) for name, _, v, g, _ in used), tuple(map(id, objects)))
    hit = shared.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], objects)):
        return hit[1]
    # equal layouts fitted apart (another object, the same slots and buckets) make the same tasks: looked
    # up by value only when the identities miss, so the hash of a layout is paid by few ranks
    same = (rank.matched,) + tuple(optim.buffers[g] for _, optim, _, g, _ in used)
    by_value = ("by value",) + key[1:5] + (tuple(map(id, same)), tuple(bl for *_, bl in used))
    hit = shared.get(by_value)
    if hit is not None and all(a is b for a, b in zip(hit[0], same)):
        tasks = hit[1]
    else:
        tasks = tuple(_optimizer_tasks(rank, src, opt, {}, {id(rank.optim): OPTIM_INPUT,
                                                            id(dense_optim): DENSE_INPUT}))
        shared[by_value] = (same, tasks)
    shared[key] = (objects, tasks)
    return tasks


def _optimizer_tasks(rank, src, opt, seen, inputs: dict) -> list[TensorTask]:
    """The MindSpore tensors of the rank's optimizer states: each a range of its buffer's state tensor
    (fp32), shaped and named like the parameter; the ``param`` state checked to round to the weight.
    ``inputs``: {id(OptimFile): input name} — the slices name the rank's files by input (FileTask.inputs)."""
    layout, env, memo = src.layout, src.env, src.memo
    slots = src.state_slots(rank)
    keys = memo.state_keys   # (buffer, state, bucket) -> flat key in distrib_optim.pt; equal on every rank
    tasks = []
    patterns = {state: src.rules.state_pattern(state) for state in opt.dist_opt_content}
    state_names = memo.state_names   # TP ranks repeat the names
    folders = {}
    for unit in stack_units(rank.matched, layout, env, rank.model.path):
        members = unit.members if isinstance(unit, _Stack) else (unit,)
        found_slots = []
        for m in members:
            ddp = ddp_name(m, memo)
            found = slots.get((m.tensor.chunk, ddp))
            if found is None:
                raise CkptmapError(
                    f"the bucket layout of {rank.dir} has no parameter {ddp} (tensor {m.tensor.name} of model chunk "
                    f"{m.tensor.chunk}); the param_map describes a different model — use the one written with this "
                    f"checkpoint, or leave --param-map-path out")
            optim, g, bl, slot = found
            if tuple(slot.shape) != tuple(m.tensor.shape) or slot.dtype != m.tensor.dtype:
                raise CkptmapError(
                    f"{bl.origin}: parameter {ddp} is {slot.dtype} {list(slot.shape)} there but "
                    f"{m.tensor.dtype} {list(m.tensor.shape)} in the checkpoint's model; the param_map belongs to a "
                    f"different run — use the one written with this checkpoint, or leave --param-map-path out")
            found_slots.append(found)
        notes = []
        for m, (_, g, bl, slot) in zip(members, found_slots):
            bucket = bl.buckets[slot.bucket]
            notes.append(f"{m.tensor.name} · buffer {g} bucket {slot.bucket} [{slot.start - bucket.start}:"
                         f"{slot.end - bucket.start}]")
        note = notes[0] if len(notes) == 1 else f"{notes[0]} + {len(notes) - 1} more expert(s), stacked"
        m, optim = members[0], found_slots[0][0]
        weight = SourceSlice(MODEL_INPUT, m.tensor.key, m.tensor.dtype, m.tensor.shape)
        folder = folders.get(optim)
        if folder is None:
            folder = folders[optim] = optim.path.parent
        # the fp32 states are laid out like the parameter, so a part is the same ranges of each state
        for out in _weight_parts(unit, layout, rank.pp, folder, "keep", env, seen, rank.ep, memo.weight_parts):
            for state in opt.dist_opt_content:
                concrete, shape, dtype = list(out.ops), out.shape, "float32"
                if state == "param" and opt.dtype not in ("keep", "float32"):
                    op, shape, dtype = tensor_ops.resolve("cast", (opt.dtype,), shape, dtype, env, str(m.rule.loc))
                    concrete.append(op)
                if isinstance(unit, _Stack):   # each expert's state from its own buffer range, in expert order
                    sources = tuple(state_slice(o, keys, g, bl, slot, state, inputs[id(o)])
                                    for o, g, bl, slot in found_slots)
                else:
                    _, g, bl, slot = found_slots[0]
                    sources = _ranged(state_slice(optim, keys, g, bl, slot, state, inputs[id(optim)]), out.ranges)
                rounds_to = None
                if state == "param" and opt.main_param_check and m.tensor.dtype != "float32":
                    # checked against the first source slice: the weight's elements at the same range
                    rounds_to = _ranged(weight, out.ranges)[0]
                    if out.ranges is None:
                        rounds_to = weight
                state_name = state_names.get((state, out.name))
                if state_name is None:
                    state_name = state_names[(state, out.name)] = patterns[state].format({"name": out.name})
                tasks.append(TensorTask(state_name, dtype, shape,
                                        sources, "float32", out.src_shape, tuple(concrete),
                                        note=note if out.ranges is None else f"{note} · part {out.part}",
                                        rounds_to=rounds_to))
    used = {(m.tensor.chunk, ddp_name(m, memo)) for m in rank.matched}
    for (v, name), (_, g, bl, _) in slots.items():
        if (v, name) not in used:
            raise CkptmapError(
                f"{bl.origin}: parameter {name} (buffer {g}) has no tensor in the checkpoint's model "
                f"chunk {v}; the param_map describes a different model — use the one written with this "
                f"checkpoint, or leave --param-map-path out")
    return tasks


def _pt_meta_task(model_file, tp, pp, layout, maps_of, matched, memo=None, map_entries=None,
                  buffer_layouts=None, optim=None, ep=None, config=None) -> FileTask:
    """pt_meta/args_tpTT_ppPPP.pt: every non-model entry as read, plus the per-chunk parameter
    names in buffer order (from the param_map when there is one); the executor adds the skeletons
    of the Megatron files (formats.megatron.build_pt_meta)."""
    names: list[list[str]] = []
    source = "param_map"
    for v in range(layout.vpp):
        maps = maps_of.get((tp, pp, v, None))
        if maps:
            chunk_names = []
            for pm in maps:
                chunk_names.extend(_read_map(pm, map_entries))
            names.append(chunk_names)
        else:
            source = "state_dict_reversed"
            names.append([ddp_name(m, memo) for m in reversed(matched) if m.tensor.chunk == v])
    extra = {
        "param_name_list": names,
        "param_name_list_source": source,
    }
    if config:
        extra["rules_config"] = dict(config)   # the values the rules' ops and parts were resolved with
    if buffer_layouts:
        # the bucket sizes (a coalesced distrib_optim.pt records only a total) and where the states lie
        extra["bucket_layouts"] = [
            {"chunk": v, "buffer": g, "padded": bl.per_bucket_numel, "unpadded": bl.per_bucket_numel_unpadded}
            for v, g, bl in buffer_layouts]
        coalesced = optim.storage == megatron_files.COALESCED
        extra["optim_ranges"] = [   # lists, not tuples: the plan is JSON
            [g, None, bl.coalesced_offset(sl), bl.coalesced_offset(sl) + sl.end - sl.start] if coalesced else
            [g, sl.bucket, sl.start - bl.buckets[sl.bucket].start, sl.end - bl.buckets[sl.bucket].start]
            for v, g, bl in buffer_layouts for sl in bl.slots]
    optim_path = model_file.path.with_name(megatron_folders.OPTIM_FILE)
    # an optimizer file planning read is there (one stat per rank fewer); otherwise look
    has_optim = optim is not None and str(optim.path) == str(optim_path) or optim_path.is_file()
    return FileTask(mindspeed.pt_meta_args_path(tp, pp, ep), "torch_meta", source=str(model_file.path),
                    aux_source=str(optim_path) if has_optim else None,
                    keys=tuple(model_file.meta_keys()), extra=extra)
