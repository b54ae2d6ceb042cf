"""MindSpore → Megatron: compile `ckptmap ms2pt` into a Plan.

The way back is pt2ms read backwards: the Megatron files' structure comes from the skeletons that
pt2ms kept in ``pt_meta`` (every object exactly as Megatron pickled it, tensors replaced by
placeholders, bucket padding bytes kept), the values from the MindSpore files, the names from the
same rules (inverse ops, MindSpore global layers → Megatron chunk-local layers), and the
distributed-optimizer buckets from the param_map files in ``pt_meta``. Each Megatron file is a
``torch_stream`` FileTask whose storages are tiled by pieces: tensors read from MindSpore (cast
back to the storage dtype; bf16 by round-to-nearest-even) and padding bytes from pt_meta.

Each Megatron file is written in the torch zip dialect it was read in (stock ``torch.save``, or
MindSpeed-Core-MS's MSAdapter shim: ``formats/msadapter.py``), as pt_meta recorded, unless
``--dialect torch`` asks for stock PyTorch files from an MSAdapter checkpoint: then the files are
translated on the way (``dialect_translate``, with ``ckptmap convert``'s RNG policy).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import attrs
import numpy as np

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_files, megatron_folders, mindspeed, param_map, pt_meta, registry, torch_zip_reader
from ckptmap.mapping import buckets, planning_split
from ckptmap.mapping.compiler import rules_config, stacked_count
from ckptmap.mapping import ops as tensor_ops
from ckptmap.mapping.megatron_source import (RankMemo, global_bindings, check_layers, check_size, choose_rules, ddp_name, listing,
                                      maps_by_chunk, match_rules, planning)
from ckptmap.mapping.layout import ParallelLayout, stage_major
from ckptmap.mapping.plan import FileTask, Op, Plan, SourceSlice, StoragePiece, StorageTask, TensorTask
from ckptmap.mapping.rules import EXPERT


SOURCE_DIALECT = "source"
DIALECT_CHOICES = (SOURCE_DIALECT, "torch", "msadapter")


@attrs.frozen
class Ms2PtOptions:
    ms_path: str
    megatron_path: str
    param_map_path: str | None = None   # the pt_meta folder (default: <ms-path>/pt_meta)
    num_layers: int | None = None
    dp_size: int | None = None
    cp_size: int | None = None
    tp_size: int | None = None
    pp_size: int | None = None
    vpp_size: int | None = None
    src_model_format: str | None = None  # ckpt | safetensors (default: whatever is there)
    noop: tuple[int, ...] = ()
    stage_list: tuple[int, ...] | None = None
    parallel_init_order: str = "tp-cp-ep-dp-pp"
    convert_param_only: bool = False
    rules: str = "auto"
    layout: str = "auto"                 # v1 | v2 | auto
    file_prefix: str = mindspeed.DEFAULT_PREFIX
    dialect: str = SOURCE_DIALECT        # source (as pt_meta recorded) | torch | msadapter
    rng: str = "refuse"                  # when translating: refuse | drop | keep (dialect_translate.RNG_POLICIES)
    cast_exact: bool = False             # other dtypes than expected: cast if every value survives it
    allow_extra: bool = False            # MindSpore tensors no rule reads: listed in the plan and left out
    planning_processes: int | None = None   # processes reading the ranks (mapping/planning_split.py)
    planning_limit: int | None = None       # at most this many when deciding (--process-limit)


_TREES_KEPT = 8   # pt_meta trees kept while planning: the last stages read


@attrs.frozen
class _MetaRank:
    path: Path
    root: dict          # the pt_meta object graph (TensorRefs for its own tensors)
    meta: dict          # root["ckptmap"]
    tensors: list       # Megatron model tensors from the skeleton, as megatron_files.ModelTensor


def _read_meta(meta_dir: Path, tp: int, pp: int, ep: int | None = None, walked: list | None = None) -> _MetaRank:
    """``walked``: [the objects the last model tensors list was made from, that list] — a stage's files read
    from one tree share their skeleton's model chunks (torch_zip_reader.shared_trees), and so the list."""
    path = meta_dir / os.path.basename(mindspeed.pt_meta_args_path(tp, pp, ep))
    if not os.path.isfile(path):
        raise CkptmapError(
            f"{path} is missing: converting back to Megatron needs the pt_meta folder that `ckptmap pt2ms` "
            f"wrote next to the MindSpore checkpoint (args, optimizer, RNG state and layout of every mp_rank); "
            f"pass it with --param-map-path")
    root = torch_zip_reader.read_objects(path)
    meta = root.get(pt_meta.META_KEY) if isinstance(root, dict) else None
    if not isinstance(meta, dict) or meta.get("version") != pt_meta.META_VERSION:
        raise CkptmapError(
            f"{path} was not written by this version of ckptmap pt2ms (no '{pt_meta.META_KEY}' entry of "
            f"version {pt_meta.META_VERSION}); re-run `ckptmap pt2ms` on the original Megatron checkpoint")
    skeleton = meta["model_optim_rng"]
    chunks = megatron_files.model_chunk_keys(skeleton, path)
    made_of = (meta["model_tensors"],) + tuple(skeleton[chunk_key] for chunk_key, _ in chunks)
    if walked and len(walked[0]) == len(made_of) and all(a is b for a, b in zip(walked[0], made_of)):
        return _MetaRank(path, root, meta, walked[1])
    tensors = []
    for chunk_key, v in chunks:
        _walk_placeholders(skeleton[chunk_key], [], v, chunk_key, meta["model_tensors"], tensors)
    if walked is not None:
        walked[:] = [made_of, tensors]   # held: their ids stay theirs
    return _MetaRank(path, root, meta, tensors)


def _walk_placeholders(node, names, chunk, chunk_key, refs, out):
    for k, v in node.items():
        if isinstance(v, dict):
            _walk_placeholders(v, names + [k], chunk, chunk_key, refs, out)
        elif isinstance(v, tuple) and len(v) == 2 and v[0] == pt_meta.PLACEHOLDER:
            ref = pt_meta.ref_from_fields(refs[v[1]])
            name = ".".join(names + [k])
            out.append(megatron_files.ModelTensor(chunk, name, f"{chunk_key}{megatron_files.KEY_SEP}{v[1]}", ref.dtype,
                                            tuple(ref.shape)))


def _find_ms_root(opt: Ms2PtOptions) -> tuple[Path, str]:
    root = Path(opt.ms_path)
    if not root.is_dir():
        raise CkptmapError(f"--ms-path {root} does not exist or is not a directory; pass the MindSpore checkpoint "
                           f"folder (rank_*/ or iter_*/ inside)")
    return root, mindspeed.detect_layout(root) if opt.layout == "auto" else opt.layout


def _ms_file(root: Path, layout: str, iteration, tp: int, pp: int, pp_size: int, rank: int, opt,
             ep: int | None = None) -> str:
    # str paths: pathlib's parsing of each candidate was a third of this, at 16,384 ranks
    base = os.fspath(root)
    fmts = [opt.src_model_format] if opt.src_model_format else ["ckpt", "safetensors"]
    if layout == "v2":
        candidates = [os.path.join(base, mindspeed.v2_path(iteration, tp, pp, pp_size, f, ep)) for f in fmts]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise CkptmapError(f"no MindSpore file for tp rank {tp}, pp rank {pp}: expected {candidates[0]}")
        return found[0]
    folder = os.path.join(base, os.path.dirname(mindspeed.v1_path(rank, opt.file_prefix, "x")))
    if not os.path.isdir(folder):
        raise CkptmapError(
            f"{folder} is missing: the MindSpore rank of tp {tp}, pp {pp} (dp 0, cp 0) is global rank {rank} "
            f"for these sizes; check --tp-size/--pp-size/--dp-size/--cp-size")
    for f in fmts:
        named = os.path.join(base, mindspeed.v1_path(rank, opt.file_prefix, f))
        if os.path.isfile(named):
            return named
    merged = sorted(str(p) for f in fmts for p in Path(folder).glob(f"*_dp_merged.{f}"))
    if len(merged) == 1:
        return merged[0]
    files = sorted(p.name for f in fmts for p in Path(folder).glob(f"*.{f}"))
    raise CkptmapError(
        f"{folder}: cannot tell which file holds rank {rank}: expected {opt.file_prefix}.{fmts[0]} or one "
        f"*_dp_merged file, found {', '.join(files) or 'no checkpoint files'}; pass --file-prefix, or merge "
        f"distributed-optimizer shards first with `ckptmap combine`")


def _scalar(reader, name, specs: dict):
    """The one value of a scalar key as a 0-d numpy array of the dtype it is stored in (bfloat16 as its
    exact float32); None when the file has no such key, or holds a string under it. ``specs``: the
    reader's {key: spec}."""
    spec = specs.get(name)
    if spec is None or spec.dtype == "str":
        return None
    dtype = spec.dtype
    value = reader.array(name).reshape(-1)[0:1]
    if dtype == "bfloat16":  # numpy has no bfloat16: its float32 value is exact
        value = tensor_ops.cast(value, dtype, "float32")
    return value.reshape(()).copy()


@planning
def compile_ms2pt(opt: Ms2PtOptions) -> Plan:
    ms_root, layout_name = _find_ms_root(opt)
    meta_dir = Path(opt.param_map_path) if opt.param_map_path else ms_root / mindspeed.PT_META_DIR
    if not meta_dir.is_dir():
        raise CkptmapError(
            f"pt_meta folder {meta_dir} does not exist: converting back to Megatron needs the pt_meta folder that "
            f"`ckptmap pt2ms` wrote next to the MindSpore checkpoint; pass it with --param-map-path")
    metas = [r for name in os.listdir(meta_dir) if (r := mindspeed.parse_pt_meta_args_name(name))]
    if not metas:
        raise CkptmapError(f"{meta_dir} holds no args_tpTT_ppPPP.pt files; it is not a pt_meta folder written by "
                           f"`ckptmap pt2ms`")
    tp_found = 1 + max(m[0] for m in metas)
    pp_found = 1 + max(m[1] for m in metas)
    named_ep = {m[2] is not None for m in metas}
    if len(named_ep) > 1:
        raise CkptmapError(f"{meta_dir} mixes args files with and without an expert rank (_epEEE); remove the stale "
                           f"ones and re-run `ckptmap pt2ms`")
    has_ep = named_ep == {True}
    ep_found = 1 + max(m[2] for m in metas) if has_ep else 1
    check_size("--tp-size", opt.tp_size, tp_found, f"{meta_dir} has args files for TP size")
    check_size("--pp-size", opt.pp_size, pp_found, f"{meta_dir} has args files for PP size")
    ep_name = (lambda ep: ep) if has_ep else (lambda ep: None)
    first = _read_meta(meta_dir, 0, 0, ep_name(0))
    args = first.root.get("args")
    chunks = len(megatron_files.model_chunk_keys(first.meta["model_optim_rng"], first.path))
    check_size("--vpp-size", opt.vpp_size if opt.vpp_size and opt.vpp_size > 1 else (1 if opt.vpp_size else None),
                chunks, f"{first.path} describes model chunks:")
    rules = choose_rules(opt.rules, first.tensors, first.path)
    count_arg = rules.layers.count_arg if rules.layers else "num_layers"
    num_layers = opt.num_layers
    if num_layers is None:
        n = getattr(args, count_arg, None)
        if n is None:
            raise CkptmapError(f"{first.path}: args has no {count_arg}; pass --num-layers")
        num_layers = n + len(set(opt.noop))
    layout = ParallelLayout(tp=tp_found, pp=pp_found, ep=ep_found,
                            dp=opt.dp_size or getattr(args, "data_parallel_size", None) or 1,
                            cp=opt.cp_size or getattr(args, "context_parallel_size", None) or 1,
                            vpp=chunks, num_layers=num_layers,
                            stage_list=tuple(opt.stage_list) if opt.stage_list else None,
                            noop=frozenset(opt.noop), order=opt.parallel_init_order)
    param_maps = param_map.find_param_maps(meta_dir)
    maps_of = maps_by_chunk(param_maps)
    env = {k: v for k, v in vars(args).items() if isinstance(v, int)} if args is not None else {}
    # the values pt2ms resolved the rules' ops and parts with win over the args (pt_meta of an older
    # ckptmap has none: then the args, as pt2ms read them)
    env = {**env, "tp": tp_found, **(first.root.get("rules_config") or {})}
    config_used = rules_config(rules, env)
    setup = _Setup(ms_root, layout_name, meta_dir, first, rules, layout, env, maps_of, tp_found, pp_found, ep_found,
                   ep_name)
    parts = planning_split.stage_parts(pp_found, tp_found * pp_found * ep_found, opt.planning_processes,
                                       opt.planning_limit)
    done = planning_split.in_parts(parts, functools.partial(_plan_part, opt, setup))
    out_iteration = _one_iteration(set().union(*(d.iterations for d in done)))
    dialects = _DialectChoice(opt)
    for d in done:
        dialects.pairs |= d.dialect_pairs
    dialects.check()
    files_of = {key: files for d in done for key, files in d.files.items()}
    left_of = {key: note for d in done for key, note in d.left_out.items()}
    # stage by stage: a worker taking consecutive small files meets a stage's ranks together, whose files are
    # alike (the .ckpt layout of the last one read, mindspore_ckpt._ScanShape)
    plan_files = [f for key in sorted(files_of, key=stage_major) for f in files_of[key]]
    left_out = [left_of[key] for key in sorted(left_of)]
    if not opt.convert_param_only:
        # the checkpoint describes its own bucket layout, as with ckptmap.hooks.megatron
        iter_maps = f"{megatron_folders.iter_dir_name(out_iteration)}/{megatron_folders.PARAM_MAP_DIR}"
        plan_files.extend(FileTask(f"{iter_maps}/{pm.path.name}", "copy", source=str(pm.path)) for pm in param_maps)
    plan_files.append(FileTask(megatron_folders.TRACKER, "text", text=str(out_iteration)))
    info = {"source": str(ms_root), "layout": layout_name, "pt_meta": str(meta_dir), "iteration": out_iteration,
            "rules": rules.name, "tp": tp_found, "pp": pp_found, "vpp": chunks, "num_layers": num_layers,
            "noop": sorted(opt.noop), **({"config": config_used} if config_used else {}),
            "mode": "weights only" if opt.convert_param_only else "weights + distributed optimizer",
            "dialect": dialects.describe()}
    if left_out:
        info["left_out"] = left_out
    return Plan("ms2pt", str(Path(opt.megatron_path)), tuple(plan_files), info)


@attrs.frozen
class _Setup:
    """What every planner of ms2pt's ranks starts from: the folders, rank (0, 0, 0)'s pt_meta, rules and layout."""

    ms_root: Path
    layout_name: str
    meta_dir: Path
    first: "_MetaRank"
    rules: object
    layout: ParallelLayout
    env: dict
    maps_of: dict
    tp_found: int
    pp_found: int
    ep_found: int
    ep_name: object


@attrs.frozen
class _Part:
    """The plan of the ranks of some pipeline stages: {(tp, pp, ep): [its files]}, the iterations its MindSpore
    files are at, the (read, written) dialect pairs, {(tp, pp, ep): note} of tensors left out (--allow-extra)."""

    files: dict
    iterations: set
    dialect_pairs: set
    left_out: dict


def _one_iteration(iterations: set):
    """The iteration every MindSpore file read is at (a part's, or all parts')."""
    if len(iterations) != 1:
        raise CkptmapError(f"the MindSpore files are at different iterations ({sorted(map(str, iterations))}); "
                           f"convert one consistent checkpoint")
    return next(iter(iterations))


# A rank's Megatron files read MindSpore tensors from ``@ms`` and padding bytes from ``@meta`` (FileTask.inputs):
# the TP ranks of a stage and expert rank plan the same storages from other files, so they share one tuple
MS_INPUT, META_INPUT = "@ms", "@meta"


@attrs.frozen(eq=False)
class _Built:
    """What ranks of one structure share: the storages of model_optim_rng.pt and distrib_optim.pt (None:
    weights only), the MindSpore tensors no rule reads, and the numbers read from pt_meta's kept bytes."""

    model: tuple
    optim: tuple | None
    unread: tuple
    kept: tuple


def _structure(meta: _MetaRank, specs: dict, fields, map_texts: tuple, param_only: bool) -> tuple:
    """Everything a rank's _Built is made of besides its pipeline stage and expert rank (which name its
    tensors) and the paths of its files: its MindSpore tensors, the pt_meta layouts of both files, its
    param_map files' bytes and the scalar keys pt2ms wrote — compared by value with a neighbour's."""
    m = meta.meta
    optim = None if param_only else (m.get("distrib_optim"), m.get("distrib_optim_tensors"),
                                      m.get("distrib_optim_padding"), meta.root.get("bucket_layouts"), map_texts)
    return (specs, meta.tensors, m.get("model_tensors"), m.get("model_padding"), optim,
            tuple(key for _, key, _ in fields))


class _Structures:
    """The last rank's structure and what was built from it (ranks come stage by stage, TP rank last, so a
    TP group's ranks are neighbours), the scalar fields of the last optimizer and scheduler state, and the
    last updates of a model file's fields."""

    def __init__(self):
        self._last = None      # (pp, ep, structure, _Built)
        self._fields = None    # ((optimizer state, scheduler state), their scalar fields)
        self._updates = None   # (what _follow_iteration read, its result)

    def find(self, pp, ep, structure, meta: _MetaRank) -> _Built | None:
        last = self._last
        if last is None or last[:2] != (pp, ep) or not _equal(last[2], structure):
            return None
        built = last[3]
        for ref, value in built.kept:
            if int(pt_meta.kept_array(meta.path, meta.meta, "distrib_optim", ref)) != value:
                return None
        return built

    def keep(self, pp, ep, structure, built: _Built) -> _Built:
        self._last = (pp, ep, structure, built)
        return built

    def scalar_fields(self, root: dict) -> list:
        """mindspeed.scalar_fields(root), once per optimizer/scheduler state object (the ranks of a stage
        read from one tree share them: torch_zip_reader.shared_trees); they are held, so ids stay theirs."""
        states = (root.get("optimizer"), root.get("opt_param_scheduler"))
        if self._fields is not None and all(a is b for a, b in zip(self._fields[0], states)):
            return self._fields[1]
        fields = mindspeed.scalar_fields(root)
        self._fields = (states, fields)
        return fields


    def updates(self, root: dict, iteration, scalars, origin, fields) -> list:
        """_follow_iteration(root, …), once for ranks that read it from the same optimizer and scheduler state
        objects, the same scalars (_ScalarValues) and an equal top-level iteration (the result is shared and
        never changed)."""
        old = root.get("iteration")
        read = (root.get("optimizer"), root.get("opt_param_scheduler"), scalars, fields, iteration)
        last = self._updates
        if last is not None and all(a is b for a, b in zip(last[0], read)) and type(last[1]) is type(old) \
                and _equal(last[1], old):
            return last[2]
        updates = _follow_iteration(root, iteration, scalars, origin, fields)
        self._updates = (read, old, updates)
        return updates


class _ScalarValues:
    """The one-value tensors of the MindSpore files as _scalar reads them, decoded once for files of one
    layout (the same specs dict: CkptReader.specs) whose contents under those names are the same bytes —
    the ranks of a stage hold the same step, learning rates and scheduler values."""

    def __init__(self):
        self._last = None   # (specs, names, their content bytes, {name: value})

    def read(self, reader, specs: dict) -> dict:
        last = self._last
        if last is not None and last[0] is specs and reader.content_bytes(last[1]) == last[2]:
            return last[3]
        names = [k for k, spec in specs.items() if spec.shape in ((), (1,))]
        values = {k: _scalar(reader, k, specs) for k in names}
        if hasattr(reader, "content_bytes") and hasattr(reader, "specs"):
            self._last = (specs, names, reader.content_bytes(names), values)
        return values


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except ValueError:   # an array somewhere in a skeleton: no truth value, so not known to be equal
        return False


def _map_texts(maps_of: dict, tp, pp, vpp, ep_name) -> tuple[tuple[int, bytes], ...]:
    """(model chunk, bytes) of the rank's param_map files, in buffer order (its optimizer storages are made
    from them)."""
    out = []
    for v in range(vpp):
        for pm in maps_of.get((tp, pp, v, ep_name), ()):
            try:
                with open(pm.path, "rb") as f:
                    out.append((v, f.read()))
            except OSError as e:
                raise CkptmapError(f"cannot read param_map {pm.path}: {e}") from None
    return tuple(out)


def _build(opt: Ms2PtOptions, setup: _Setup, meta: _MetaRank, matched, ms_file, specs, fields, tp, pp, ep, memo,
           iteration) -> _Built:
    layout, env, rules = setup.layout, setup.env, setup.rules
    weights = {(m.tensor.chunk, m.tensor.name): _reverse_task(m, layout, pp, ep, env) for m in matched}
    model = _model_storages(meta, weights, ms_file, specs, opt.cast_exact)
    kept: list = []
    optim = None if opt.convert_param_only else _optim_storages(
        meta, matched, weights, layout, pp, tp, rules, ms_file, specs, setup.maps_of, memo, ep, setup.ep_name(ep),
        opt.cast_exact, kept)
    unread = _unread_tensors(specs, weights, rules, fields, iteration, setup.layout_name)
    return _Built(model, optim, tuple(unread), tuple(kept))


def _plan_part(opt: Ms2PtOptions, setup: _Setup, stages) -> _Part:
    """Plan the ranks of pipeline stages ``stages`` ([first, end); None: all), stage by stage (a stage's ranks'
    files are alike: each is read from the last one's layout)."""
    rules, layout, ep_name = setup.rules, setup.layout, setup.ep_name
    memo = RankMemo()
    first_stage, end_stage = stages or (0, setup.pp_found)
    stage_order = sorted(((tp, pp, ep) for tp in range(setup.tp_found) for pp in range(first_stage, end_stage)
                          for ep in range(setup.ep_found)), key=stage_major)
    ranks = []
    trees: dict = {}
    walked: list = []
    last_match = None   # (tensors list, its matches): ranks sharing one list match alike
    for tp, pp, ep in stage_order:
        if (tp, pp, ep) == (0, 0, 0):
            meta = setup.first
        else:
            # a stage's pt_meta files differ in args.rank / local_rank: read from the stage's first one's
            # tree (torch_zip_reader.shared_trees; planning only reads them)
            with torch_zip_reader.shared_trees(trees):
                meta = _read_meta(setup.meta_dir, tp, pp, ep_name(ep), walked)
            torch_zip_reader.trim_trees(trees, _TREES_KEPT)
        if last_match is not None and last_match[0] is meta.tensors:
            matched, unmatched = last_match[1]
        else:
            matched, unmatched = match_rules(rules, meta.tensors, meta.path, memo)
            last_match = (meta.tensors, (matched, unmatched))
        if unmatched:
            raise CkptmapError(f"no rule in {rules.path} matches {listing(unmatched)} of {meta.path}; add "
                               f"rules for them or pick other rules with --rules")
        check_layers(layout, matched, meta.path, tp, pp)
        ranks.append((tp, pp, ep, meta, matched))
    # the MindSpore files, and the iteration they are at
    sources = {}
    scalar_values = _ScalarValues()
    iterations = set()
    for tp, pp, ep, meta, matched in ranks:
        it_hint = meta.root.get("iteration")
        ms_file = _ms_file(setup.ms_root, setup.layout_name,
                           megatron_folders.latest_iteration(setup.ms_root) if setup.layout_name == "v2" else it_hint,
                           tp, pp, setup.pp_found, layout.mp_rank_ranks(tp, pp, all_dp_cp=False, ep=ep)[0], opt,
                           ep_name(ep))
        reader = registry.open_reader(ms_file)
        try:
            specs = reader.specs() if hasattr(reader, "specs") else {k: reader.spec(k) for k in reader.keys()}
            scalars = scalar_values.read(reader, specs)
            it = scalars["iteration"] if "iteration" in scalars else _scalar(reader, "iteration", specs)
            if it is None:
                it = scalars["step_num"] if "step_num" in scalars else _scalar(reader, "step_num", specs)
        finally:
            reader.close()
        iterations.add(int(it) if it is not None else it_hint)
        sources[(tp, pp, ep)] = (ms_file, specs, scalars)
    out_iteration = _one_iteration(iterations)
    dialects = _DialectChoice(opt)
    files: dict = {}
    left_out: dict = {}
    structures = _Structures()
    for tp, pp, ep, meta, matched in ranks:
        ms_file, specs, scalars = sources[(tp, pp, ep)]
        rank_dir = (f"{megatron_folders.iter_dir_name(out_iteration)}/"
                    f"{megatron_folders.mp_rank_dir_name(tp, pp, setup.pp_found, ep_name(ep))}")
        fields = structures.scalar_fields(meta.root)
        map_texts = () if opt.convert_param_only else _map_texts(setup.maps_of, tp, pp, layout.vpp, ep_name(ep))
        structure = _structure(meta, specs, fields, map_texts, opt.convert_param_only)
        built = structures.find(pp, ep, structure, meta)
        if built is None:
            built = structures.keep(pp, ep, structure, _build(opt, setup, meta, matched, ms_file, specs, fields, tp, pp,
                                                              ep, memo, out_iteration))
        inputs = {MS_INPUT: str(ms_file), META_INPUT: str(meta.path)}
        updates = structures.updates(meta.root, out_iteration, None if opt.convert_param_only else scalars, ms_file,
                                     fields)
        mine = files[(tp, pp, ep)] = [dialects.add(FileTask(
            f"{rank_dir}/{megatron_folders.MODEL_FILE}", "torch_stream", source=str(meta.path), storages=built.model,
            extra={"skeleton": "model_optim_rng", "set": updates}, inputs=inputs), meta)]
        if built.optim is not None:
            mine.append(dialects.add(FileTask(
                f"{rank_dir}/{megatron_folders.OPTIM_FILE}", "torch_stream", source=str(meta.path),
                storages=built.optim, extra={"skeleton": "distrib_optim", "set": []}, inputs=inputs), meta))
        extra = built.unread
        if extra and not opt.allow_extra:
            raise CkptmapError(f"{ms_file} holds {len(extra)} tensor(s) no rule reads back into Megatron: "
                               f"{listing(extra)}; they would be lost. Add rules for them (--rules), or pass "
                               f"--allow-extra to leave them out (the plan lists them)")
        if extra:
            left_out[(tp, pp, ep)] = f"{ms_file}: {len(extra)} tensor(s) left out (--allow-extra): {listing(extra)}"
    return _Part(files, iterations, dialects.pairs, left_out)


class _DialectChoice:
    """Which torch zip dialect each Megatron file is written in (``--dialect``): the one pt_meta recorded
    for it, or the one asked for. Checked while planning — a translation's refusals (RNG states
    without --drop-rng / --keep-foreign-rng, storage kinds, …) come before anything is written."""

    def __init__(self, opt: Ms2PtOptions):
        if opt.dialect not in DIALECT_CHOICES:
            raise CkptmapError(f"--dialect {opt.dialect}: use one of {', '.join(DIALECT_CHOICES)}")
        self.wanted, self.rng = opt.dialect, opt.rng
        self.pairs: set[tuple[str, str]] = set()

    def add(self, task: FileTask, meta: _MetaRank) -> FileTask:
        which = task.extra["skeleton"]
        source = pt_meta.source_dialect(meta.meta, which)
        target = source if self.wanted == SOURCE_DIALECT else self.wanted
        if target != source:
            pt_meta.check_write(meta.path, which, target, self.rng, f"{task.path} (from {meta.path})")
        self.pairs.add((source, target))
        return attrs.evolve(task, extra={**task.extra, "dialect": target, "rng": self.rng})

    def check(self) -> None:
        if self.rng != "refuse" and all(s == t for s, t in self.pairs):
            flag = "--drop-rng" if self.rng == "drop" else "--keep-foreign-rng"
            raise CkptmapError(f"{flag} applies when ms2pt writes another dialect than the Megatron files were read "
                               f"in (--dialect torch for an MSAdapter checkpoint); these files are written back as "
                               f"{' and '.join(sorted({t for _, t in self.pairs}))}, RNG states unchanged — leave "
                               f"{flag} out")

    def describe(self) -> str:
        parts = []
        for source, target in sorted(self.pairs):
            if source == target:
                parts.append(f"{target} (as read)")
            else:
                rng = {"drop": "RNG states dropped", "keep": "RNG states kept unchanged (foreign)",
                       "refuse": "no RNG states"}[self.rng]
                parts.append(f"{target} (from {source}; {rng})")
        return " + ".join(parts)


@attrs.frozen
class _Back:
    """Where a MindSpore tensor goes in a Megatron tensor: all of it, or (a part of a rule with ``parts:``)
    at the flat element ``ranges`` of the TP-local Megatron tensor that pt2ms read it from."""

    ms_name: str
    ms_shape: tuple
    inverse: tuple
    ranges: tuple | None = None
    stacked: tuple | None = None     # (index, count): row ``index`` of axis 0 of a stacked tensor of ``count``


def _reverse_task(m, layout, pp, ep, env) -> list[_Back]:
    """The MindSpore tensors a Megatron tensor is made of, with the inverse of the rule's ops; ``env``
    holds the config values pt2ms resolved the rules with (pt_meta's ``rules_config``), so a size such
    as ``reshape(num_query_groups, -1)`` or a part's rows resolve to what they were on the way there."""
    bindings = global_bindings(m, layout, pp, ep, env, m.tensor.name)
    where = f"{m.rule.loc} ({m.tensor.name})"
    stacked = None
    if m.rule.stack is not None:
        # the expert's row of the stacked tensor; ops keep axis 0 (rules check), so each is undone on the
        # row alone with its dims one lower: transpose(1, 2) of the stack is transpose(0, 1) of a row
        stacked = (m.bindings[m.rule.stack], stacked_count(m.rule, layout, env, m.tensor.name))
    if m.rule.parts is None:
        pieces = [(None, m.tensor.shape, None)]
    else:
        pieces = tensor_ops.resolve_parts(m.rule.parts, m.tensor.shape, env, layout.tp if m.rule.tp.dim == 0 else 1,
                                          where)
    out = []
    for part, shape, ranges in pieces:
        ms_name = m.rule.mindspore.format(dict(bindings, part=part) if part else bindings)
        dtype, chain, shapes = m.tensor.dtype, [], []
        for spec in m.rule.ops:
            args = tuple(a - 1 for a in spec.args) if stacked and spec.name == "transpose" else spec.args
            op, shape, dtype = tensor_ops.resolve(spec.name, args, shape, dtype, env, where)
            chain.append(op)
            shapes.append(shape)
        out.append(_Back(ms_name, tuple(shape), tuple(tensor_ops.invert_all(chain, shapes)), ranges, stacked))
    return out


def _source_pieces(name, ms_file, specs, backs, out_dtype, megatron_shape,
                   cast_exact: bool = False) -> list[tuple[int, TensorTask]]:
    """[(element offset in the Megatron tensor, task)]: the whole tensor from one MindSpore tensor, or
    each part's rows of every block put back where pt2ms took them from (the parts' inverse)."""
    pieces = []
    for b in backs:
        task = _source_task(name, ms_file, specs, b.ms_name, b.ms_shape, b.inverse, out_dtype,
                            megatron_shape if b.ranges is None else b.ms_shape, cast_exact, b.stacked)
        if b.ranges is None:
            pieces.append((0, task))
            continue
        # the part's tensor is its ranges concatenated; only elementwise ops (rules check) so its
        # elements stay in that order and each range is a contiguous slice of it
        src, at = task.sources[0], 0
        for start, n in b.ranges:
            pieces.append((start, attrs.evolve(task, shape=(n,), src_shape=(n,),
                                               sources=(attrs.evolve(src, start=at, numel=n),))))
            at += n
    return pieces


# Casts ms2pt makes without being asked: float32 -> the training dtype undoes pt2ms's default float32
# output (MindSpeed also trains in float32 master weights; rounded to nearest even, as Megatron does),
# and widening a float loses nothing.
_EXPECTED_CASTS = frozenset({("float32", "bfloat16"), ("float32", "float16"), ("bfloat16", "float32"),
                             ("float16", "float32"), ("bfloat16", "float64"), ("float16", "float64"),
                             ("float32", "float64")})


def _source_task(name, ms_file, specs, ms_name, ms_shape, inverse, out_dtype, megatron_shape,
                 cast_exact: bool = False, stacked: tuple | None = None) -> TensorTask:
    spec = specs.get(ms_name)
    if spec is None:
        raise CkptmapError(f"{ms_file} has no tensor {ms_name} (needed for Megatron's {name}); the MindSpore "
                           f"checkpoint does not match pt_meta — convert the matching checkpoint, or check --rules")
    src_dtype, src_shape = spec
    whole = tuple(ms_shape) if stacked is None else (stacked[1],) + tuple(ms_shape)
    if tuple(src_shape) != whole:
        what = "" if stacked is None else f" (its {stacked[1]} stacked experts, row {stacked[0]} for this one)"
        raise CkptmapError(f"{ms_file}: tensor {ms_name} has shape {list(src_shape)}, but Megatron's {name} needs "
                           f"{list(whole)}{what}; the MindSpore checkpoint was saved with a different model or "
                           f"parallel layout than pt_meta describes")
    source = SourceSlice(MS_INPUT, ms_name, src_dtype, tuple(src_shape))
    if stacked is not None:   # the expert's row of axis 0: a contiguous range of the stacked tensor
        row = math.prod(ms_shape)
        source = attrs.evolve(source, start=stacked[0] * row, numel=row)
        src_shape = tuple(ms_shape)
    ops = list(inverse)
    if src_dtype != out_dtype:
        if (src_dtype, out_dtype) in _EXPECTED_CASTS:
            kind = "cast"
        elif cast_exact:
            kind = "cast_exact"
        else:
            raise CkptmapError(
                f"{ms_file}: tensor {ms_name} is {src_dtype}, but Megatron's {name} is {out_dtype}; ckptmap expects "
                f"{out_dtype} or float32 there (what pt2ms writes) and does not cast other dtypes silently. If every "
                f"value is representable in {out_dtype}, pass --cast-exact (each element is checked while "
                f"converting; the run fails on the first that would change); otherwise convert the checkpoint "
                f"MindSpore saved in the expected dtype")
        ops.append(Op(kind, (src_dtype, out_dtype)))
    return TensorTask(name, out_dtype, tuple(megatron_shape), (source,),
                      src_dtype, tuple(src_shape), tuple(ops),
                      note=ms_name if stacked is None else f"{ms_name}[{stacked[0]}]")


def _unread_tensors(specs, weights, rules, fields, iteration, layout_name) -> list[str]:
    """Tensors of a MindSpore file that ms2pt reads back in neither mode: not a weight a rule maps, not
    that weight's optimizer state, not a step / optimizer / scheduler scalar pt2ms writes."""
    known = {b.ms_name for backs in weights.values() for b in backs}
    known |= {rules.state_pattern(state).format({"name": name})
              for name in list(known) for state in megatron_files.OPTIM_STATES}
    known |= {key for _, key, _ in fields}
    known |= {row[0] for row in mindspeed.step_scalars(int(iteration or 0), "v2")}
    return sorted(k for k, (dtype, _) in specs.items() if k not in known and dtype != "str")  # strings: not tensors


def _tiled(key, dtype, numel, pieces, padding, meta_path, which) -> StorageTask:
    """A storage from its tensor pieces plus the padding kept in pt_meta; they must tile
    ``[0, numel)`` exactly."""
    size = dtypes.itemsize(dtype)
    pieces = list(pieces) + [
        StoragePiece(a, padding=SourceSlice(META_INPUT, pt_meta.padding_key(which, key, j), "uint8",
                                            ((b - a) * size,)))
        for j, (a, b, _) in enumerate(padding.get(key, []))]
    pieces.sort(key=lambda p: p.offset)
    pos = 0
    for p in pieces:
        if p.offset != pos:
            raise CkptmapError(f"{meta_path}: storage {key} of {which} is not tiled by its tensors and padding (gap "
                               f"or overlap at element {pos}); pt_meta is damaged — re-run `ckptmap pt2ms`")
        pos += math.prod(p.tensor.shape) if p.tensor else p.padding.shape[0] // size
    if pos != numel:
        raise CkptmapError(f"{meta_path}: storage {key} of {which} holds {numel} elements but its tensors and "
                           f"padding cover {pos}; pt_meta is damaged — re-run `ckptmap pt2ms`")
    return StorageTask(key, dtype, numel, tuple(pieces))


def _model_storages(meta: _MetaRank, weights, ms_file, specs, cast_exact: bool = False) -> tuple[StorageTask, ...]:
    by_ref = {}
    for t in meta.tensors:
        index = int(t.key.split(megatron_files.KEY_SEP)[-1])
        by_ref[index] = _source_pieces(t.name, ms_file, specs, weights[(t.chunk, t.name)], t.dtype, t.shape,
                                       cast_exact)
    per_storage: dict[str, tuple] = {}
    for i, fields in enumerate(meta.meta["model_tensors"]):
        ref = pt_meta.ref_from_fields(fields)
        entry = per_storage.setdefault(ref.storage, (ref.dtype, ref.storage_numel, []))
        entry[2].extend(StoragePiece(ref.storage_offset + off, tensor=task) for off, task in by_ref.get(i, ()))
    return tuple(_tiled(key, dtype, numel, pieces, meta.meta["model_padding"], meta.path, "model_optim_rng")
                 for key, (dtype, numel, pieces) in per_storage.items())


def _follow_iteration(root: dict, iteration, scalars, origin, fields) -> list:
    """[(path, value)] of the fields that follow the MindSpore checkpoint's training progress: the
    iteration, and (``scalars``: {key: 0-d numpy array}) every optimizer and scheduler value pt2ms wrote
    (``fields``: ``mindspeed.scalar_fields(root)``). Values keep the type Megatron had — a flag comes back as a bool,
    a count as an int, a style index as the style's name — and a value that still equals the original
    in the precision it was stored in (Float32, Int32, Int64, …) is left alone, so that an unchanged
    value leaves the bytes unchanged."""
    sets = []

    def put(path, old, new, key, styles=None):
        if new is None or old is None:
            return
        value = _megatron_value(old, new, styles, f"{origin}: {key}")
        if value is not old and not (type(value) is type(old) and value == old):
            sets.append((path, value))
    # args.iteration is what Megatron had when it saved (it re-reads the top-level entry on load)
    put(["iteration"], root.get("iteration"), np.array(iteration, dtype=np.int64), "iteration")
    for path, key, styles in fields if scalars else ():
        old = root
        for part in path:
            old = old[part]
        put(path, old, scalars.get(key), key, styles)
    return sets


def _megatron_value(old, new, styles, what):
    """Megatron's value for a field that was ``old`` in Megatron and is ``new`` (0-d numpy array) in MindSpore;
    ``old`` itself when ``new`` is ``old`` as stored."""
    if styles is not None:
        index = _whole(new, what)
        if not 0 <= index < len(styles):
            raise CkptmapError(f"{what} is {index}, which is no style index; MindSpeed numbers them "
                               f"{', '.join(f'{i} = {s}' for i, s in enumerate(styles))}")
        return styles[index]
    if isinstance(old, bool):
        if new.item() not in (0, 1):
            raise CkptmapError(f"{what} is {new.item()}, but Megatron's value is a flag (1 = True, 0 = False)")
        return bool(new.item())
    if not isinstance(old, (int, float)):
        return old
    if new.dtype.kind == "f":  # stored rounded (a count as Float32 too): unchanged if it still rounds the same
        if new.dtype.type(float(old)) == new[()]:
            return old
    elif new.dtype != np.bool_ and old == new.item():
        return old
    return float(new.item()) if isinstance(old, float) else _whole(new, what)


def _whole(new, what) -> int:
    value = new.item()
    if isinstance(value, float) and not value.is_integer():
        raise CkptmapError(f"{what} is {value}, but Megatron's value is a whole number")
    return int(value)


def _bind_placeholders(node, refs):
    if type(node) is tuple and len(node) == 2 and node[0] == pt_meta.PLACEHOLDER:
        return pt_meta.ref_from_fields(refs[node[1]])
    if isinstance(node, dict):
        return {k: _bind_placeholders(v, refs) for k, v in node.items()}
    if type(node) in (list, tuple):
        return type(node)(_bind_placeholders(v, refs) for v in node)
    return node


def _optim_storages(meta: _MetaRank, matched, weights, layout, pp, tp, rules, ms_file, specs, maps_of, memo, ep,
                    ep_name, cast_exact: bool, kept: list) -> tuple[StorageTask, ...]:
    """The storages of the rank's distrib_optim.pt; ``kept`` gets (TensorRef, value) of each number read
    from pt_meta's kept bytes (a rank sharing these storages must hold the same: _Structures.find)."""
    m_meta = meta.meta
    if "distrib_optim" not in m_meta:
        raise CkptmapError(f"{meta.path} has no distributed-optimizer layout (the Megatron checkpoint had no "
                           f"distrib_optim.pt); convert the weights alone with --convert-param-only")
    skeleton = m_meta["distrib_optim"]
    refs = m_meta["distrib_optim_tensors"]
    # the skeleton with its placeholders bound to the TensorRefs they stand for, so that the
    # distrib_optim.pt parser reads it like the file it came from
    bound = _bind_placeholders(skeleton, refs)
    def kept_int(ref):   # numel_unpadded as a 0-d tensor: kept bytes
        value = int(pt_meta.kept_array(meta.path, m_meta, "distrib_optim", ref))
        kept.append((ref, value))
        return value
    _, _, storage, buffers_meta = megatron_files.parse_optim_state(
        bound, f"{meta.path} (distrib_optim skeleton)", kept_int)
    recorded = meta.root.get("bucket_layouts")
    if recorded is None:   # pt_meta of an earlier ckptmap: every buffer of every chunk, in order
        recorded = []
        for v in range(layout.vpp):
            recorded += [{"chunk": v, "buffer": len(recorded) + i, "padded": None, "unpadded": None}
                         for i in range(len(maps_of.get((tp, pp, v, ep_name), [])))]
    if len(recorded) != len(buffers_meta):
        raise CkptmapError(f"{meta.path} describes {len(recorded)} optimizer buffer(s) but its distrib_optim skeleton "
                           f"holds {len(buffers_meta)}; pt_meta is damaged — re-run `ckptmap pt2ms`")
    layouts = []
    number: dict = {}
    for g, (rec, buf) in enumerate(zip(recorded, buffers_meta)):
        v = rec["chunk"]
        b = number[v] = number.get(v, -1) + 1       # param_map files number a chunk's buffers from 0
        maps = maps_of.get((tp, pp, v, ep_name), [])
        if b >= len(maps):
            raise CkptmapError(f"{meta.path.parent} has no param_map_buffer{b}_dp0tp{tp}pp{pp}"
                               f"{'' if ep_name is None else f'ep{ep_name}'}vpp{v}.json; the pt_meta folder is "
                               f"incomplete — re-run `ckptmap pt2ms`")
        pm = maps[b]
        if buf.storage == megatron_files.COALESCED:
            if rec["padded"] is None:
                raise CkptmapError(f"{meta.path} lacks the bucket sizes of buffer {g} (a coalesced distrib_optim.pt "
                                   f"does not record them); re-run `ckptmap pt2ms` with this ckptmap")
            padded, unpadded = list(rec["padded"]), list(rec["unpadded"])
        else:
            padded, unpadded = list(buf.padded), list(buf.unpadded)
        layouts.append((v, g, buckets.buffer_from_param_map(param_map.read_param_map(pm.path), padded, unpadded,
                                                             str(pm.path),
                                                             contiguous=buf.storage != megatron_files.COALESCED)))
    slot_of = {(v, s.name): (gi, bl, s) for v, gi, bl in layouts for s in bl.slots}
    placeholder_of = {}
    for gi, buf in enumerate(buffers_meta):
        for state in megatron_files.OPTIM_STATES:
            for j, ph in enumerate(megatron_files.state_refs(skeleton, buf, state)):
                placeholder_of[(gi, state, None if buf.storage == megatron_files.COALESCED else j)] = ph[1]
    pieces_by_ref: dict[int, list] = {}
    kinds = {buf.optimizer for buf in buffers_meta}
    for m in matched:
        ddp = ddp_name(m, memo)
        found = slot_of.get((m.tensor.chunk, ddp))
        if found is None:
            # an expert rank > 0 keeps no dense optimizer state (the expert-rank-0 folder does)
            if EXPERT not in m.bindings and kinds and None not in kinds and 0 not in kinds:
                continue
            maps = [pm.path.name for pm in maps_of.get((tp, pp, m.tensor.chunk, ep_name), [])]
            raise CkptmapError(f"{meta.path.parent}: the param_map of chunk {m.tensor.chunk} "
                               f"({', '.join(maps) or 'none'}) has no {ddp} (a tensor of {meta.path.name}); pt_meta "
                               f"is inconsistent — re-run `ckptmap pt2ms`")
        gi, bl, slot = found
        backs = weights[(m.tensor.chunk, m.tensor.name)]
        for state in megatron_files.OPTIM_STATES:   # what Megatron's distrib_optim.pt holds; named by the rules
            named = [attrs.evolve(b, ms_name=rules.state_pattern(state).format({"name": b.ms_name})) for b in backs]
            if buffers_meta[gi].storage == megatron_files.COALESCED:
                ref_index, offset = placeholder_of[(gi, state, None)], bl.coalesced_offset(slot)
            else:
                ref_index, offset = placeholder_of[(gi, state, slot.bucket)], slot.start - bl.buckets[slot.bucket].start
            pieces_by_ref.setdefault(ref_index, []).extend(
                (offset + off, task) for off, task in
                _source_pieces(f"{state} of {m.tensor.name}", ms_file, specs, named, "float32", m.tensor.shape,
                               cast_exact))
    storages = []
    for i, fields in enumerate(refs):
        ref = pt_meta.ref_from_fields(fields)
        pieces = [StoragePiece(ref.storage_offset + off, tensor=t) for off, t in pieces_by_ref.get(i, [])]
        storages.append(_tiled(ref.storage, ref.dtype, ref.storage_numel, pieces, m_meta["distrib_optim_padding"],
                               meta.path, "distrib_optim"))
    return tuple(storages)
