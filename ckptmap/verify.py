"""`ckptmap verify`: compare checkpoints by value — every tensor's bytes and every other object.

* same framework (file vs file, or directory vs directory paired by relative path): every key of
  ``.pt`` (tensors and the pickled objects around them), ``.ckpt`` and ``.safetensors`` files; ``.pt``
  files of the two torch zip dialects (stock, MSAdapter) compare tensors by value and dtypes by name;
* Megatron directory vs MindSpore directory (:func:`compare_across`): an *independent* check of a
  conversion. It shares no conversion code with ``pt2ms`` / ``ms2pt`` (no plan, no executor, no
  ``mapping.ops``, no bucket engine); it uses only the format readers, ``mapping.layout`` (the one
  place for rank and layer arithmetic) and the rules' *name patterns*. Everything else — which
  MindSpore file belongs to which mp_rank, where a parameter's optimizer state lies in
  ``distrib_optim.pt``, how a value compares across dtypes — is derived here, from the two sides;
* ``--md5``: whole-file md5 sums in the conversion guide's style.

Across frameworks, per MindSpore file
-------------------------------------
Pairing. The sizes come from the Megatron ``args`` (TP, PP, DP, CP, VPP, layer count) and are
checked against the ``mp_rank_*`` folders. V1 (``rank_{g}/…``): every ``rank_{g}`` folder is
paired with the mp_rank of ``layout.coords(g)`` (so ``--generate-all-dp-cp`` copies are checked
too), and each (tp, pp) needs its dp = cp = 0 rank. V2 (``iter_*/mp_rank_*``): by the folder name.

Names. A Megatron tensor's name is matched against the rules' Megatron patterns; the layer number
is turned into MindSpeed's global one with ``layout.global_layer``; the MindSpore pattern and the
``optimizer_state`` patterns give the keys to look for.

Values. What a MindSpore parameter key holds depends on the file:

* no optimizer keys in the file (``--convert-param-only``): the weight, so the MindSpore value must
  be *exactly* the Megatron value — same dtype: same bytes; bf16 → fp32: the fp32 bit pattern is
  the bf16 pattern shifted by 16 (exactly representable in bf16 and equal); fp16/fp32 widened:
  bit-equal to numpy's exact widening; a narrower MindSpore dtype (``--dtype bfloat16``): the
  Megatron value rounded to nearest even. Report: ``weights``.
* optimizer keys and a param_map (the training run's ``iter_*/param_map`` or ``<save>/param_map``,
  else the MindSpore side's ``pt_meta/``): every parameter's range ``[start, end)`` and bucket are
  read from the JSON, the bucket's offset is the sum of the padded bucket sizes before it
  (``distrib_optim.pt``'s ``per_bucket_numel``; a 0.7+ file coalesces each buffer's buckets without
  their end padding and records only the total: see ``_coalesced_offsets``), and the fp32 main param / ``exp_avg`` /
  ``exp_avg_sq`` are cut from the bucket tensors and compared with the MindSpore keys bit for bit;
  the main param is also checked to round (to nearest even) to the Megatron bf16 weight. Report:
  ``weights + optimizer states (param_map: PATH)``. A param_map is used only if it fits the
  checkpoint (every entry names a tensor of that chunk with its dtype and shape, lies inside its
  bucket, and the entries fill each bucket's unpadded size); one in ``pt_meta/`` that pt2ms derived
  itself (no training-run param_map existed) is used but named as such in the report.
* optimizer keys but no usable param_map: the MindSpore main params are checked to round to the
  Megatron weights (catches swapped or misplaced parameters, unless their values agree to bf16
  precision — e.g. norm weights still close to 1); the optimizer states are listed as not compared.
  Report: ``weights + main-param rounding check``.

Rule ``ops`` (transpose, reshape, chunk_interleave) are applied to the Megatron side with verify's
own numpy lines and named in the report; a rule's ``parts`` (fused QKV -> q/k/v, fc1 -> gate/up) are
cut from the Megatron tensor (and its optimizer states) by viewing dim 0 as (blocks, rows per block)
and slicing each part's rows — numpy here, not the conversion's element ranges. Scalars are compared where the MindSpore name says which
Megatron value it is (``step_num``/``iteration``: the iteration; ``learning_rate_group_i``: group
``i``'s ``lr``; ``state_step``: ``step``; ``KEY_group_i``: group ``i``'s ``KEY``; scheduler keys of
the same name); the others are listed as not compared.

The Megatron side may be in either torch zip dialect (an MSAdapter checkpoint of MindSpeed-Core-MS
reads like a stock one: MindSpore dtype keys are dtypes); the report says which.

Expert parallelism (MoE): every ``mp_rank_TT[_PPP]_EEE`` folder is paired with the MindSpore file
of (tp, pp, ep); local expert ids become global ones (each expert rank holds a contiguous block);
param_map files carry ``ep{e}`` (as pt2ms and the Megatron hook name them), and the state of an
expert rank > 0's dense parameters is read from expert rank 0's ``distrib_optim.pt`` (a
ChainedOptimizer stores ``[dense, expert]`` there and ``[None, expert]`` elsewhere).

Limits: the rules are trusted for names (a rules file that swaps two names makes verify expect the
swap); noop layers are known only from the rules' ``layers: … noop = ARG`` in ``args``; the rank
order is Megatron's ``tp-cp-ep-dp-pp``; the MindSpore side must have Megatron's TP and PP.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import attrs
import numpy as np

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_folders, mindspeed, param_map, registry
from ckptmap.formats.megatron_files import ModelFile, OptimFile
from ckptmap.formats.safe_unpickler import GlobalMarker, StandIn, dtype_name
from ckptmap.formats.torch_zip_reader import TensorRef, TorchZipFile, read_objects
from ckptmap.mapping.layout import ParallelLayout
from ckptmap.mapping.rules import EXPERT, LAYER, RuleSet, bundled_rules, load_rules, resolve_rules

TENSOR_SUFFIXES = (".pt", ".ckpt", ".safetensors")
MS_SUFFIXES = (".ckpt", ".safetensors")

WEIGHTS = "weights"
WEIGHTS_AND_STATES = "weights + optimizer states"
ROUNDING_ONLY = "weights + main-param rounding check"


@attrs.define
class FileReport:
    left: str
    right: str
    only_left: list = attrs.field(factory=list)
    only_right: list = attrs.field(factory=list)
    differing: list = attrs.field(factory=list)   # (key, description)
    compared: int = 0                              # keys (tensors, scalars, objects) compared
    what: str = ""                                 # across frameworks: what was compared
    values: int = 0                                # across frameworks: elements compared
    not_compared: list = attrs.field(factory=list)  # (key or group, why)
    notes: list = attrs.field(factory=list)

    @property
    def identical(self) -> bool:
        return not (self.only_left or self.only_right or self.differing)


# -------------------------------------------------------------------------------------------------
# Values as float64 for messages (verify's own conversion; bfloat16 arrives as uint16 bit patterns)


def _to_float64(a: np.ndarray, dtype: str) -> np.ndarray:
    a = np.asarray(a)
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype in dtypes.TABLE:
        return a.astype(np.float64)
    return np.full(a.shape, np.nan)


def _mismatch_text(bad: np.ndarray, shape, expected64: np.ndarray, actual64: np.ndarray) -> str:
    """``N of M elements differ, max abs diff D, first at [i, j] (e vs a)`` for the flat mask ``bad``."""
    n = int(bad.sum())
    diff = np.abs(expected64[bad] - actual64[bad])
    max_diff = float(np.nan_to_num(diff, nan=math.inf).max()) if n else 0.0
    first = int(np.flatnonzero(bad)[0])
    index = [int(i) for i in np.unravel_index(first, shape)] if len(shape) else []
    return (f"{n} of {bad.size} elements differ, max abs diff {max_diff:g}, first at {index} "
            f"({expected64[first].item()!r} vs {actual64[first].item()!r})")


def describe_difference(a: np.ndarray, a_dtype: str, b: np.ndarray, b_dtype: str) -> str | None:
    """None if ``a`` and ``b`` (arrays of the named dtypes' storage types) have the same dtype, shape
    and bytes; else what differs."""
    if a_dtype != b_dtype or tuple(a.shape) != tuple(b.shape):
        return f"{a_dtype} {list(a.shape)} vs {b_dtype} {list(b.shape)}"
    fa, fb = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    if fa.view(np.uint8).tobytes() == fb.view(np.uint8).tobytes():
        return None
    bad = (fa.view(np.uint8).reshape(fa.size, -1) != fb.view(np.uint8).reshape(fb.size, -1)).any(axis=1)
    return _mismatch_text(bad, a.shape, _to_float64(fa, a_dtype), _to_float64(fb, b_dtype))


# -------------------------------------------------------------------------------------------------
# Same framework


class _Dtype(str):
    """A dtype value of either torch zip dialect (a torch dtype global, a MindSpore dtype object) by name,
    so that a file and its translation to the other dialect compare equal."""

    def __repr__(self):
        return f"dtype {str(self)}"


def _canonical(obj):
    """``obj`` with dtype values (also inside tuple keys such as distrib_optim's (param, grad) pair) as
    :class:`_Dtype` names; anything else as it is."""
    if type(obj) is tuple:
        items = tuple(_canonical(x) for x in obj)
        return items if any(type(x) is _Dtype for x in items) else obj
    name = dtype_name(obj) if isinstance(obj, (StandIn, GlobalMarker)) else None
    return obj if name is None else _Dtype(name)


def _compare_objects(a, b, path, report, tensors_a, tensors_b):
    """Walk two pickled object graphs; tensors (TensorRefs) are compared by value, dtypes by name
    (MindSpore dtype objects of the MSAdapter dialect equal the torch dtypes of the same name)."""
    where = "/".join(map(str, path)) or "(root)"
    if isinstance(a, TensorRef) or isinstance(b, TensorRef):
        if not (isinstance(a, TensorRef) and isinstance(b, TensorRef)):
            report.differing.append((where, f"{type(a).__name__} vs {type(b).__name__}"))
            return
        report.compared += 1
        problem = describe_difference(tensors_a(a), a.dtype, tensors_b(b), b.dtype)
        if problem:
            report.differing.append((where, problem))
        return
    a, b = _canonical(a), _canonical(b)
    if type(a) is not type(b):
        report.differing.append((where, f"{type(a).__name__} vs {type(b).__name__}"))
        return
    if isinstance(a, dict):
        keys_a, keys_b = {_canonical(k): k for k in a}, {_canonical(k): k for k in b}
        for k in keys_a:
            if k not in keys_b:
                report.only_left.append("/".join(map(str, path + [k])))
        for k in keys_b:
            if k not in keys_a:
                report.only_right.append("/".join(map(str, path + [k])))
        common = [k for k in keys_a if k in keys_b]
        if common != [k for k in keys_b if k in keys_a]:
            report.differing.append((where, "same keys in a different order"))
        for k in common:
            _compare_objects(a[keys_a[k]], b[keys_b[k]], path + [k], report, tensors_a, tensors_b)
        return
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            report.differing.append((where, f"length {len(a)} vs {len(b)}"))
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _compare_objects(x, y, path + [i], report, tensors_a, tensors_b)
        return
    if hasattr(a, "__dict__") and not isinstance(a, StandIn):
        _compare_objects(vars(a), vars(b), path, report, tensors_a, tensors_b)
        return
    report.compared += 1
    try:
        equal = bool(a == b) or (a != a and b != b)  # NaN equals NaN here
    except Exception:  # e.g. numpy arrays: compare their bytes
        equal = getattr(a, "tobytes", lambda: a)() == getattr(b, "tobytes", lambda: b)()
    if not equal:
        report.differing.append((where, f"{_short(a)} vs {_short(b)}"))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def compare_files(left: Path, right: Path) -> FileReport:
    report = FileReport(str(left), str(right))
    if left.suffix == ".pt" and right.suffix == ".pt":
        za, zb = TorchZipFile(left), TorchZipFile(right)
        if za.dialect != zb.dialect:
            report.notes.append(f"torch zip dialects {za.dialect} vs {zb.dialect}: tensors compared by value, dtypes "
                                f"by name; tensor classes, storage sharing and state-dict _metadata are the dialects' "
                                f"own and not compared")
        _compare_objects(za.root, zb.root, [], report, za.array, zb.array)
        return report
    ra, rb = registry.open_reader(left), registry.open_reader(right)
    try:
        ka, kb = ra.keys(), rb.keys()
        report.only_left = [k for k in ka if k not in set(kb)]
        report.only_right = [k for k in kb if k not in set(ka)]
        for k in ka:
            if k in set(kb):
                report.compared += 1
                problem = describe_difference(ra.array(k), ra.spec(k).dtype, rb.array(k), rb.spec(k).dtype)
                if problem:
                    report.differing.append((k, problem))
    finally:
        ra.close()
        rb.close()
    return report


def pair_files(left: Path, right: Path) -> tuple[list[tuple[Path, Path]], list[str], list[str]]:
    if left.is_file() and right.is_file():
        return [(left, right)], [], []
    if left.is_dir() and right.is_dir():
        fa = {p.relative_to(left) for p in left.rglob("*") if p.is_file() and p.suffix in TENSOR_SUFFIXES}
        fb = {p.relative_to(right) for p in right.rglob("*") if p.is_file() and p.suffix in TENSOR_SUFFIXES}
        return ([(left / p, right / p) for p in sorted(fa & fb)], sorted(map(str, fa - fb)),
                sorted(map(str, fb - fa)))
    raise CkptmapError(f"cannot compare {left} with {right}: give two files or two directories")


# -------------------------------------------------------------------------------------------------
# Across frameworks: value relations, written here (not ckptmap.mapping.ops) on purpose


def _round_to_bf16(f32: np.ndarray) -> np.ndarray:
    """float32 values → bfloat16 bit patterns, rounding to nearest, ties to even."""
    u = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_nan(bits: np.ndarray) -> np.ndarray:
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x007F) != 0)


def _bits_differ(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x.view(np.uint8).reshape(x.size, -1) != y.view(np.uint8).reshape(y.size, -1)).any(axis=1)


def _f32_exact(x: np.ndarray, dtype: str) -> np.ndarray:
    """bf16 / fp16 / fp32 values as fp32 (exact for all three)."""
    if dtype == "bfloat16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


_FLOAT_RANK = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}


def _widen_mask(x, xd, y, yd):
    """``y`` (wider float) must hold exactly ``x``'s values."""
    if (xd, yd) == ("bfloat16", "float32"):  # exactly representable in bf16 and equal: the 16-bit shift
        bits = y.view(np.uint32)
        return ((bits & 0xFFFF) != 0) | ((bits >> 16).astype(np.uint16) != x), "bf16 -> fp32 exact (bit check)"
    xv = (_f32_exact(x, xd) if xd == "bfloat16" else x).astype(dtypes.storage(yd))
    return _bits_differ(xv, y) & ~(np.isnan(xv) & np.isnan(y)), f"{xd} -> {yd} exact"


def _narrow_mask(x, xd, y, yd):
    """``y`` (narrower float) must be ``x`` rounded to nearest even."""
    x32 = x if xd == "float32" else x.astype(np.float32) if xd == "float64" else _f32_exact(x, xd)
    how = f"{xd} -> {yd} round-to-nearest-even" + (" (via fp32)" if xd == "float64" and yd != "float32" else "")
    if yd == "bfloat16":
        return (_round_to_bf16(x32) != y) & ~(np.isnan(x32) & _bf16_nan(y)), how
    yv = (x if xd == "float64" else x32).astype(dtypes.storage(yd))
    return _bits_differ(yv, y) & ~(np.isnan(yv) & np.isnan(y)), how


def _relation_mask(e: np.ndarray, e_dtype: str, a: np.ndarray, a_dtype: str, relation: str):
    """(flat mask of the elements that break the relation, how it was checked), or (None, why not).

    ``exact``: ``a`` holds exactly ``e``'s values — same dtype: same bytes; a wider float: the exact
    widening (bf16 -> fp32 is a 16-bit shift, so the fp32 value must be representable in bf16); a
    narrower float: ``e`` rounded to nearest even. ``rounds_to``: ``a`` (an fp32 main param) rounded
    to nearest even is ``e`` (the training-dtype weight); when ``a`` is not wider, as ``exact``."""
    e, a = e.reshape(-1), a.reshape(-1)
    if e_dtype == a_dtype:
        return _bits_differ(e, a), "same dtype, bytes"
    if e_dtype not in _FLOAT_RANK or a_dtype not in _FLOAT_RANK:
        return None, f"{e_dtype} vs {a_dtype} cannot be compared by value"
    if relation == "rounds_to" and _FLOAT_RANK[a_dtype] > _FLOAT_RANK[e_dtype]:
        return _narrow_mask(a, a_dtype, e, e_dtype)
    if _FLOAT_RANK[a_dtype] > _FLOAT_RANK[e_dtype]:
        return _widen_mask(e, e_dtype, a, a_dtype)
    return _narrow_mask(e, e_dtype, a, a_dtype)


def _compare_values(e: np.ndarray, e_dtype: str, a: np.ndarray, a_dtype: str, relation: str = "exact"):
    """None if ``a`` stands in ``relation`` to ``e``, else a description."""
    if tuple(e.shape) != tuple(a.shape):
        return f"shape {list(e.shape)} expected, found {list(a.shape)} ({a_dtype})"
    if e.size == 0:
        return None
    e, a = np.ascontiguousarray(e), np.ascontiguousarray(a)
    bad, how = _relation_mask(e, e_dtype, a, a_dtype, relation)
    if bad is None:
        return how
    if not bad.any():
        return None
    e64, a64 = _to_float64(e.reshape(-1), e_dtype), _to_float64(a.reshape(-1), a_dtype)
    return f"{how}: " + _mismatch_text(bad, e.shape, e64, a64)


def _apply_rule_ops(array: np.ndarray, ops, env: dict, where: str) -> np.ndarray:
    """A rule's ops on a Megatron-shaped array (cast is a dtype matter, handled by the relation)."""
    for op in ops:
        if op.name == "transpose":
            array = np.swapaxes(array, op.args[0], op.args[1])
        elif op.name == "reshape":
            dims = [env.get(d, d) if isinstance(d, str) else d for d in op.args]
            if any(isinstance(d, str) for d in dims):
                raise CkptmapError(f"{where}: reshape names {[d for d in dims if isinstance(d, str)][0]!r}, "
                                   f"which the checkpoint's args do not have")
            array = array.reshape(dims)
        elif op.name == "chunk_interleave":
            dim, n = op.args
            dim %= array.ndim
            shape = array.shape
            split = array.reshape(*shape[:dim], n, shape[dim] // n, *shape[dim + 1:])
            array = np.swapaxes(split, dim, dim + 1).reshape(shape)
        elif op.name != "cast":
            raise CkptmapError(f"{where}: verify does not know op {op.name}()")
    return array


# -------------------------------------------------------------------------------------------------
# Across frameworks: the two sides


@attrs.frozen
class _Param:
    tensor: object      # megatron_files.ModelTensor
    rule: object        # rules.ParamRule
    ms_name: str
    ddp_name: str
    part: str | None = None   # the part of a rule with parts: this MindSpore tensor is
    expert: bool = False   # names an expert ({expert} in the rule): its state is in the expert optimizer's buffers


def _take_part(array: np.ndarray, p: _Param, env: dict, tp_size: int, where: str) -> np.ndarray:
    """The rows of part ``p.part`` of every block of a TP-local Megatron tensor (rule ``parts``)."""
    if p.part is None:
        return array
    parts = p.rule.parts
    sizes = {name: e.evaluate(env) for name, e in parts.entries}
    blocks = parts.groups.evaluate(env) // (tp_size if p.rule.tp.dim == 0 else 1) if parts.groups else 1
    per_block = sum(sizes.values())
    if array.shape[0] != blocks * per_block:
        raise CkptmapError(f"{where}: parts cover {blocks} x {per_block} rows, the tensor has {array.shape[0]}")
    first = sum(sizes[n] for n in parts.names[:parts.names.index(p.part)])
    view = array.reshape(blocks, per_block, *array.shape[1:])
    return view[:, first:first + sizes[p.part]].reshape(-1, *array.shape[1:])


def _arg(args, name, default=None):
    value = getattr(args, name, None) if args is not None else None
    return default if value is None else value


def _pick_rules(option: str, tensors, path) -> RuleSet:
    if option != "auto":
        return resolve_rules(option)
    fits = []
    for rules_path in bundled_rules().values():
        rules = load_rules(rules_path)
        if all(any(r.megatron.match(t.name) is not None for r in rules.params) for t in tensors):
            fits.append(rules)
    if len(fits) != 1:
        raise CkptmapError(
            f"{'no' if not fits else 'several'} bundled rules name the tensors of {path}"
            f"{'' if not fits else ' (' + ', '.join(r.name for r in fits) + ')'}; pass --rules")
    return fits[0]


def _layout_from_args(args, ck, chunks: int, rules: RuleSet, where) -> tuple[ParallelLayout, list[str]]:
    notes = []
    tp, pp = ck.tp_size, ck.pp_size
    for flag, found in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        said = _arg(args, flag)
        if said is not None and said != found:
            raise CkptmapError(f"{where}: args say {flag} {said} but the checkpoint has mp_rank folders for {found}")
    vpp = _arg(args, "virtual_pipeline_model_parallel_size") or chunks
    if vpp != chunks:
        raise CkptmapError(f"{where}: args say virtual_pipeline_model_parallel_size {vpp} but the file holds "
                           f"{chunks} model chunk(s)")
    count_arg = rules.layers.count_arg if rules.layers else "num_layers"
    layers = _arg(args, count_arg)
    if layers is None:
        raise CkptmapError(f"{where}: args have no {count_arg}; verify needs the layer count")
    noop = ()
    if rules.layers and rules.layers.noop_arg:
        noop = tuple(_arg(args, rules.layers.noop_arg, ()) or ())
    dp, cp = _arg(args, "data_parallel_size", 1), _arg(args, "context_parallel_size", 1)
    if _arg(args, "data_parallel_size") is None:
        notes.append("args have no data_parallel_size; assumed 1")
    layout = ParallelLayout(tp=tp, pp=pp, dp=dp, cp=cp, vpp=vpp, ep=ck.ep_size, num_layers=layers + len(set(noop)),
                            noop=frozenset(noop))
    return layout, notes


def _ms_tensor_file(folder: Path, want_stem: str | None) -> tuple[Path | None, list[Path]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in MS_SUFFIXES)
    if len(files) == 1:
        return files[0], []
    named = [p for p in files if p.stem == (want_stem or mindspeed.DEFAULT_PREFIX)]
    if len(named) == 1:
        return named[0], [p for p in files if p != named[0]]
    return None, files


def _ms_files(ms_dir: Path, layout: ParallelLayout, pp_size: int):
    """({(tp, pp, ep): [MindSpore file, …]}, files no mp_rank owns, (tp, pp, ep) whose file is missing,
    layout name). ``ep`` is 0 without expert parallelism."""
    v1 = sorted(p for p in ms_dir.glob("rank_*") if p.is_dir())
    v2 = sorted(p for p in ms_dir.glob("iter_*/mp_rank_*") if p.is_dir())
    if v1 and v2:
        raise CkptmapError(f"{ms_dir} holds both rank_* (V1) and iter_*/mp_rank_* (V2) folders; verify one layout")
    pairs: dict = {}
    extra: list[str] = []
    keys = [(t, p, e) for p in range(layout.pp) for e in range(layout.ep) for t in range(layout.tp)]
    if v1:
        # the rank each (tp, pp, ep) needs: context-parallel rank 0 and the lowest data-parallel rank
        # of that expert rank (expert-data-parallel rank 0)
        primary = {}
        for g in range(layout.world_size):
            c = layout.coords(g)
            k = (c["tp"], c["pp"], c["ep"])
            if c["cp"] == 0 and (k not in primary or c["dp"] < primary[k][1]):
                primary[k] = (g, c["dp"])
        for folder in v1:
            suffix = folder.name[len("rank_"):]
            if not suffix.isdigit() or int(suffix) >= layout.world_size:
                extra.append(f"{folder.relative_to(ms_dir)} (no rank {suffix} in {layout.describe()})")
                continue
            coords = layout.coords(int(suffix))
            path, others = _ms_tensor_file(folder, None)
            extra.extend(f"{p.relative_to(ms_dir)} (another tensor file in {folder.name})" for p in others)
            if path is not None:
                pairs.setdefault((coords["tp"], coords["pp"], coords["ep"]), []).append((path, int(suffix)))
        missing = [(k, f"rank_{primary[k][0]}/*.ckpt|safetensors") for k in keys
                   if not any(g == primary[k][0] for _, g in pairs.get(k, []))]
        return {k: [p for p, _ in v] for k, v in pairs.items()}, extra, missing, "v1"
    if v2:
        iters = sorted({p.parent for p in v2})
        if len(iters) > 1:
            chosen = None
            tracker = ms_dir / megatron_folders.TRACKER
            if tracker.is_file():
                chosen = ms_dir / megatron_folders.iter_dir_name(megatron_folders.read_tracker(ms_dir))
            if chosen not in iters:
                raise CkptmapError(f"{ms_dir} holds {len(iters)} iter_* folders and no tracker naming one of them")
            v2 = [p for p in v2 if p.parent == chosen]
        # folder names as Megatron gives them (with EP, mp_rank_TT_EEE reads like mp_rank_TT_PPP: look up)
        named = {megatron_folders.mp_rank_dir_name(t, p, pp_size, e if layout.ep > 1 else None): (t, p, e)
                 for t, p, e in keys}
        for folder in v2:
            key = named.get(folder.name)
            if key is None:
                extra.append(f"{folder.relative_to(ms_dir)} (not an mp_rank folder of {layout.describe()})")
                continue
            path, others = _ms_tensor_file(folder, mindspeed.V2_FILE_STEM)
            extra.extend(f"{p.relative_to(ms_dir)} (another tensor file)" for p in others)
            if path is not None:
                pairs.setdefault(key, []).append(path)
        iter_dir = v2[0].parent.name if v2 else "iter_*"
        missing = [(k, f"{iter_dir}/{name}/model_optim_rng.*") for name, k in named.items() if k not in pairs]
        return pairs, extra, missing, "v2"
    raise CkptmapError(f"{ms_dir} has neither rank_*/ (V1) nor iter_*/mp_rank_*/ (V2) folders of MindSpore files")


def _param_map_dirs(ck, ms_dir: Path) -> list[Path]:
    out = [ck.root / megatron_folders.PARAM_MAP_DIR]
    if ck.save_root is not None:
        out.append(ck.save_root / megatron_folders.PARAM_MAP_DIR)
    out.append(ms_dir / mindspeed.PT_META_DIR)
    return [d for d in out if d.is_dir()]


def _is_expert_name(rules: RuleSet, ddp_name: str) -> bool:
    return any((b := r.ddp_pattern().match(ddp_name)) is not None and EXPERT in b for r in rules.params)


def _buffers_from_param_map(folder: Path, tp: int, pp: int, params: list[_Param], optim: OptimFile, vpp: int,
                            ep: int | None = None, rules: RuleSet | None = None, dense_only: bool = False):
    """Where each parameter's fp32 state lies in ``distrib_optim.pt``, from the param_map JSONs of
    ``folder``: {ddp name of chunk v: (global buffer, bucket or None if coalesced, offset, numel)} —
    or a string saying why the folder's maps do not describe this checkpoint.

    Files are numbered per chunk in the order the rank folder's file holds the buffers: dense ones,
    then expert ones (``ep`` in the name under expert parallelism). A ChainedOptimizer's file
    (MoE) lists the dense optimizer's buffers (chunk by chunk), then the expert optimizer's, so the
    files are matched to the buffers per kind; ``dense_only``: only the dense files are read (an
    expert rank > 0 keeps its dense state in expert rank 0's folder)."""
    files = [pm for pm in param_map.find_param_maps(folder) if (pm.tp, pm.pp, pm.dp, pm.ep) == (tp, pp, 0, ep)]
    by_chunk = {v: sorted((pm for pm in files if pm.vpp == v), key=lambda pm: pm.buffer) for v in range(vpp)}
    tag = "" if ep is None else f"ep{ep}"
    if not all(by_chunk.values()):
        return f"no param_map_buffer*_dp0tp{tp}pp{pp}{tag}vpp*.json for every model chunk"
    for v in range(vpp):
        if [pm.buffer for pm in by_chunk[v]] != list(range(len(by_chunk[v]))):
            return f"the param_map files of chunk {v} are not numbered buffer0, buffer1, …"
    kind_of = {}
    for v in range(vpp):
        for pm in by_chunk[v]:
            names = list(param_map.read_param_map(pm.path))
            kinds = {_is_expert_name(rules, n) for n in names} if rules is not None else {False}
            if len(kinds) > 1:
                return f"{pm.path.name} mixes expert and dense parameters"
            kind_of[pm.path] = kinds.pop() if kinds else False
    if optim.chained:
        order = [(v, pm) for expert in (False, True) for v in range(vpp) for pm in by_chunk[v]
                 if kind_of[pm.path] == expert and not (dense_only and expert)]
        buffers = [g for g, buf in enumerate(optim.buffers) if buf.optimizer == 0] + (
            [] if dense_only else [g for g, buf in enumerate(optim.buffers) if buf.optimizer == 1])
    else:
        order = [(v, pm) for v in range(vpp) for pm in by_chunk[v]]
        buffers = list(range(len(optim.buffers)))
    tensors = {(p.tensor.chunk, p.ddp_name): p.tensor for p in params}
    where: dict = {}
    if len(order) != len(buffers):
        return (f"the param_maps describe {len(order)} buffer(s), {optim.path.name} has {len(buffers)}"
                f"{' dense' if dense_only else ''}")
    for (v, pm), g in zip(order, buffers):
        buf = optim.buffers[g]
        entries = param_map.read_param_map(pm.path)
        for name, (dtype, shape, start, end, bucket) in entries.items():
            t = tensors.get((v, name))
            if t is None:
                return f"{pm.path.name} names {name}, which chunk {v} of the checkpoint does not hold"
            if (dtype, tuple(shape)) != (t.dtype, tuple(t.shape)):
                return (f"{pm.path.name}: {name} is {dtype} {list(shape)} there, {t.dtype} {list(t.shape)} "
                        f"in the checkpoint")
            if end - start != math.prod(shape):
                return f"{pm.path.name}: {name} [{start}, {end}) is not {math.prod(shape)} elements long"
        if buf.storage != "per_bucket":
            placed = _coalesced_offsets(entries, buf.numel_unpadded,
                                        {p.ddp_name for p in params if p.tensor.chunk == v and p.rule.shared_embedding})
            if isinstance(placed, str):
                return f"{pm.path.name} vs {optim.path.name} buffer {g}: {placed}"
            for name, offset in placed.items():
                where[(v, name)] = (g, None, offset, entries[name][3] - entries[name][2])
            continue
        padded, unpadded = list(buf.padded), list(buf.unpadded)
        bases = [sum(padded[:j]) for j in range(len(padded))]
        filled = [0] * len(padded)
        for name, (dtype, shape, start, end, bucket) in entries.items():
            if not 0 <= bucket < len(padded) or not (
                    bases[bucket] <= start and end <= bases[bucket] + unpadded[bucket]):
                return (f"{pm.path.name}: {name} [{start}, {end}) bucket {bucket} lies outside the buckets of "
                        f"{optim.path.name} (padded {padded}, unpadded {unpadded})")
            filled[bucket] += end - start
            where[(v, name)] = (g, bucket, start - bases[bucket], end - start)
        if filled != unpadded:
            return (f"{pm.path.name} fills its buckets with {filled} elements, {optim.path.name} says "
                    f"{unpadded}")
    lost = [p.tensor.name for p in params if (p.tensor.chunk, p.ddp_name) not in where]
    if lost:
        return f"no entry for {lost[0]}" + (f" and {len(lost) - 1} more" if len(lost) > 1 else "")
    return where


def _coalesced_offsets(entries: dict, numel_unpadded: int, shared: set):
    """{name: offset in the coalesced state tensor} for one buffer of a 0.7+ ``distrib_optim.pt``,
    which concatenates the buckets without their end padding (gaps between 64-aligned parameters
    kept) and records only the total. A bucket starts at its first parameter and its unpadded part
    ends at its last parameter's end — except the bucket closed by a tied embedding opening a bucket
    of its own (``shared``: such parameters' names): 0.8-0.12 count the alignment / padding before
    the embedding's start as that bucket's content. The recorded total says how much; anything
    else that does not add up is returned as a string (the param_map is then not used)."""
    buckets: dict[int, list[int]] = {}
    opened_by_shared = set()
    for name, (_dtype, _shape, start, end, bucket) in entries.items():
        lo_hi = buckets.setdefault(bucket, [start, end])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], start), max(lo_hi[1], end)
        if name in shared:
            opened_by_shared.add(bucket)
    order = sorted(buckets)
    if order != list(range(len(order))):
        return f"bucket ids {order} are not 0..{len(order) - 1}"
    sizes = [buckets[b][1] - buckets[b][0] for b in order]
    delta = numel_unpadded - sum(sizes)
    if delta:
        fits = [b for b in order[:-1] if b + 1 in opened_by_shared and buckets[b][1] + delta <= buckets[b + 1][0]]
        if delta < 0 or len(fits) != 1:
            return (f"the param_map's buckets hold {sum(sizes)} elements from their first to their last "
                    f"parameter, the file {numel_unpadded}, and no bucket closed by a tied embedding accounts for "
                    f"the difference")
        sizes[fits[0]] += delta
    bases = [sum(sizes[:b]) for b in order]
    return {name: bases[bucket] + start - buckets[bucket][0]
            for name, (_dtype, _shape, start, _end, bucket) in entries.items()}


def _derived_by_ckptmap(ms_dir: Path, tp: int, pp: int, ep: int | None = None) -> bool:
    """pt2ms records in pt_meta where its parameter order came from; ``state_dict_reversed`` means
    it found no param_map and wrote the JSONs in pt_meta from its own bucket derivation."""
    path = ms_dir / mindspeed.pt_meta_args_path(tp, pp, ep)
    try:
        root = read_objects(path)
    except Exception:
        return False
    return isinstance(root, dict) and root.get("param_name_list_source") == "state_dict_reversed"


def _param_groups(root) -> list:
    """The optimizer's param groups; a ChainedOptimizer (MoE: dense, expert) saves a list of
    optimizer states, whose groups MindSpeed numbers on, one after the other."""
    state = root.get("optimizer") if isinstance(root, dict) else None
    out = []
    for part in (state if isinstance(state, list) else [state]):
        try:
            groups = part["optimizer"]["param_groups"]
        except (KeyError, TypeError):
            continue
        if isinstance(groups, list):
            out.extend(groups)
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _megatron_scalar(key: str, root: dict):
    """(Megatron value, where) for a MindSpore scalar key whose name says which value it is, else None."""
    if key in ("step_num", "iteration") and _number(root.get("iteration")):
        return root["iteration"], "iteration"
    groups = _param_groups(root)
    if key == "state_step" and groups and _number(groups[0].get("step")):
        return groups[0]["step"], "optimizer param_groups[0] step"
    head, sep, index = key.rpartition("_group_")
    if sep and index.isdigit() and int(index) < len(groups):
        name = "lr" if head == "learning_rate" else head
        value = groups[int(index)].get(name)
        if isinstance(value, (bool, int, float)):
            return value, f"optimizer param_groups[{index}] {name}"
    sched = root.get("opt_param_scheduler")
    if isinstance(sched, dict) and _number(sched.get(key)):
        return sched[key], f"opt_param_scheduler {key}"
    return None


def _compare_scalar(value, dtype: str, ms: np.ndarray) -> str | None:
    if ms.size != 1:
        return f"{ms.size} values where Megatron has one ({value!r})"
    got = ms.reshape(-1)[0]
    if dtypes.get(dtype).kind in ("int", "uint"):
        ok = float(value) == float(int(value)) and int(got) == int(value)
    else:
        ok = np.array(float(value), dtype=ms.dtype).tobytes() == np.asarray(got).tobytes()
    return None if ok else f"Megatron {value!r}, MindSpore {got.item()!r} ({dtype})"


def _compare_rank(report: FileReport, key, mg_dir: Path, ms_path: Path, ms_dir: Path, rules: RuleSet,
                  layout: ParallelLayout, env: dict, map_dirs: list[Path], dense_dir: Path | None = None) -> None:
    tp, pp, ep = key
    model = ModelFile(mg_dir / megatron_folders.MODEL_FILE)
    reader = registry.open_reader(ms_path)
    optim = dense_optim = None
    try:
        params: list[_Param] = []
        seen: dict[str, str] = {}
        for t in model.tensors():
            hits = [(r, b) for r in rules.params if (b := r.megatron.match(t.name)) is not None]
            if len(hits) != 1:
                why = "no rule names it" if not hits else f"{len(hits)} rules name it"
                report.only_left.append(f"{t.name}{f' (chunk {t.chunk})' if layout.vpp > 1 else ''}: {why}")
                continue
            rule, bindings = hits[0]
            if rule.stack:   # not compared yet: said, never counted as equal
                what = f"{rule.mindspore} (rules {rule.loc}, stack: {rule.stack})"
                if not any(d[0] == what for d in report.differing):
                    report.differing.append((what, "verify does not compare stacked experts yet; read the MindSpore "
                                                   "file with mindspore.load_checkpoint and compare each row of axis 0"))
                continue
            ms_bindings = dict(bindings)
            if LAYER in bindings:
                try:
                    ms_bindings[LAYER] = layout.global_layer(pp, t.chunk, bindings[LAYER])
                except CkptmapError as e:
                    report.differing.append((t.name, str(e)))
                    continue
            if EXPERT in bindings:   # local expert of this expert rank -> MindSpeed's global expert id
                try:
                    ms_bindings[EXPERT] = layout.global_expert(ep, bindings[EXPERT], env.get("num_experts") or 0)
                except (CkptmapError, ZeroDivisionError) as e:
                    report.differing.append((t.name, f"{e} (args num_experts {env.get('num_experts')})"))
                    continue
            for part in rule.parts.names if rule.parts else (None,):
                name = rule.mindspore.format(dict(ms_bindings, part=part))
                if name in seen:
                    report.differing.append((name, f"both {seen[name]} and {t.name} are named {name} by the rules"))
                    continue
                seen[name] = t.name
                params.append(_Param(t, rule, name, rule.ddp_pattern().format(bindings), part, EXPERT in bindings))

        have = reader.keys()
        have_set = set(have)
        states = [s.state for s in rules.states if s.state != "param"]
        state_keys = {s: {p.ms_name: rules.state_pattern(s).format({"name": p.ms_name}) for p in params}
                      for s in states}
        present = [s for s in states if any(k in have_set for k in state_keys[s].values())]
        has_optimizer = bool(present) or "state_step" in have_set or any(
            k.startswith("learning_rate_group_") for k in have)
        weight_is_main_param = has_optimizer and "param" in {s.state for s in rules.states}
        # `--dist-opt-content exp_avg exp_avg_sq` writes the states without the parameters
        expect_weights = not present or any(p.ms_name in have_set for p in params)
        if not expect_weights:
            report.notes.append("the file holds optimizer states and no parameter values")

        locate, map_path = None, None
        if has_optimizer:
            optim_path = mg_dir / megatron_folders.OPTIM_FILE
            tried = []
            if not optim_path.is_file():
                tried.append(f"{optim_path} is missing")
            else:
                optim = OptimFile(optim_path)
                ep_tag = ep if layout.ep > 1 else None
                # an expert rank > 0 keeps only its experts' state; its dense state is in expert rank 0's
                # folder (ChainedOptimizer: [dense, expert] there, [None, expert] here)
                split = optim.chained and ep > 0 and not any(b.optimizer == 0 for b in optim.buffers)
                if split:
                    dense_optim = OptimFile(dense_dir / megatron_folders.OPTIM_FILE)
                own = [p for p in params if p.expert] if split else params
                for folder in map_dirs:
                    found = _buffers_from_param_map(folder, tp, pp, own, optim, layout.vpp, ep_tag, rules)
                    if isinstance(found, dict):
                        found = {k: (optim, "distrib_optim.pt") + v for k, v in found.items()}
                        if split:
                            dense = _buffers_from_param_map(folder, tp, pp, [p for p in params if not p.expert],
                                                            dense_optim, layout.vpp, 0, rules, dense_only=True)
                            if not isinstance(dense, dict):
                                tried.append(f"{folder} (dense state in {dense_optim.path}): {dense}")
                                continue
                            label = f"{dense_dir.name}/distrib_optim.pt (expert rank 0's)"
                            found.update({k: (dense_optim, label) + v for k, v in dense.items()})
                        locate, map_path = found, folder
                        break
                    tried.append(f"{folder}: {found}")
            if locate is None:
                report.what = ROUNDING_ONLY if expect_weights else "optimizer states, none comparable"
                report.notes.append("no usable param_map (" + ("; ".join(tried) or
                                    "looked in iter_*/param_map, <save>/param_map and pt_meta/: none") +
                                    "): optimizer states not compared")
            else:
                report.what = (f"{WEIGHTS_AND_STATES if expect_weights else 'optimizer states'} "
                               f"(param_map: {map_path})")
                if map_path == ms_dir / mindspeed.PT_META_DIR and _derived_by_ckptmap(ms_dir, tp, pp,
                                                                                      ep if layout.ep > 1 else None):
                    report.notes.append(f"the param_map in {map_path} was derived by ckptmap's pt2ms (the "
                                        f"training run's was not found); the rounding check is independent of it")
        else:
            report.what = WEIGHTS

        ops_used = sorted({str(op) for p in params for op in p.rule.ops if op.name != "cast"})
        if ops_used:
            report.notes.append(f"rule ops applied by verify before comparing: {', '.join(ops_used)}")

        def check(ms_key, expected, e_dtype, relation, label):
            a_dtype = reader.spec(ms_key).dtype
            problem = _compare_values(expected, e_dtype, reader.array(ms_key), a_dtype, relation)
            if problem:
                report.differing.append((ms_key, f"{label}: {problem}"))

        expected_keys = set()
        not_compared_states = 0
        for p in params:
            t = p.tensor
            where = f"{p.rule.loc} ({t.name})"
            try:
                weight = _apply_rule_ops(_take_part(model.array(t.key), p, env, layout.tp, where), p.rule.ops, env,
                                         where)
            except CkptmapError as e:
                report.differing.append((p.ms_name, str(e)))
                continue
            expected_keys.add(p.ms_name)
            if p.ms_name not in have_set:
                if expect_weights:
                    report.only_left.append(f"{p.ms_name} (from {t.name})")
            else:
                report.compared += 1
                report.values += weight.size
                if weight_is_main_param:
                    check(p.ms_name, weight, t.dtype, "rounds_to",
                          f"main param does not round to the Megatron weight {t.name}")
                    if locate is not None:
                        check(p.ms_name, _state_slice(locate, p, "param", env, where, layout.tp), "float32",
                              "exact",
                              f"vs {_slice_label(locate, p, 'param')}")
                else:
                    check(p.ms_name, weight, t.dtype, "exact", f"vs Megatron {t.name} ({t.dtype})")
            for s in present:
                k = state_keys[s][p.ms_name]
                expected_keys.add(k)
                if k not in have_set:
                    report.only_left.append(f"{k} (state of {t.name})")
                elif locate is None:
                    not_compared_states += 1
                else:
                    report.compared += 1
                    report.values += weight.size
                    check(k, _state_slice(locate, p, s, env, where, layout.tp), "float32", "exact",
                          f"vs {_slice_label(locate, p, s)}")
        if not_compared_states:
            report.not_compared.append((f"{not_compared_states} optimizer state tensors "
                                        f"({', '.join(s + '.*' for s in present)})", "no param_map"))

        for k in have:
            if k in expected_keys:
                continue
            dtype, shape = reader.spec(k)
            if math.prod(shape) > 1 or dtype == "str":
                report.only_right.append(k)
                continue
            found = _megatron_scalar(k, model.root)
            if found is None:
                report.not_compared.append((k, "no Megatron value of that name"))
                continue
            if dtype not in dtypes.TABLE or dtype == "bfloat16":
                report.not_compared.append((k, f"a {dtype} scalar"))
                continue
            value, origin = found
            report.compared += 1
            report.values += 1
            problem = _compare_scalar(value, dtype, reader.array(k))
            if problem:
                report.differing.append((k, f"vs Megatron {origin}: {problem}"))
    finally:
        reader.close()
        model.close()
        for f in (optim, dense_optim):
            if f is not None:
                f.close()


def _state_slice(locate: dict, p: _Param, state: str, env: dict, where: str, tp_size: int = 1) -> np.ndarray:
    optim, _label, g, bucket, offset, numel = locate[(p.tensor.chunk, p.ddp_name)]
    flat = optim.array(optim.buffers[g].key(state, bucket))[offset:offset + numel]
    return _apply_rule_ops(_take_part(flat.reshape(p.tensor.shape), p, env, tp_size, where), p.rule.ops, env, where)


def _slice_label(locate: dict, p: _Param, state: str) -> str:
    _optim, label, g, bucket, offset, numel = locate[(p.tensor.chunk, p.ddp_name)]
    part = "coalesced" if bucket is None else f"bucket {bucket}"
    return f"{label} buffer {g} {part} {state} [{offset}:{offset + numel}]"


def compare_across(megatron_dir: Path, ms_dir: Path, rules: str = "auto") -> list[FileReport]:
    """Every MindSpore file of ``ms_dir`` against the Megatron checkpoint ``megatron_dir``, derived
    independently of the conversion code (module docstring)."""
    megatron_dir, ms_dir = Path(megatron_dir), Path(ms_dir)
    ck = megatron_folders.open_checkpoint_dir(megatron_dir)
    ranks = dict(ck.ranks)   # {(tp, pp, ep): folder}
    first = ModelFile(ranks[(0, 0, 0)] / megatron_folders.MODEL_FILE)
    try:
        args, tensors, chunks, dialect = first.args, first.tensors(), len(first.chunks()), first.dialect
    finally:
        first.close()
    rule_set = _pick_rules(rules, tensors, first.path)
    layout, notes = _layout_from_args(args, ck, chunks, rule_set, first.path)
    env = {k: v for k, v in vars(args).items() if isinstance(v, int)} if args is not None and hasattr(
        args, "__dict__") else {}
    env = {**env, "tp": layout.tp}   # rules' parts sizes may be per TP shard (ffn_hidden_size / tp)
    pairs, extra, missing, ms_layout = _ms_files(ms_dir, layout, ck.pp_size)
    map_dirs = _param_map_dirs(ck, ms_dir)

    reports = []
    if dialect == "msadapter":
        notes.append("Megatron files in the MSAdapter dialect (MindSpeed-Core-MS): MindSpore dtype objects, one "
                     "storage per tensor")
    for key, mg_dir in sorted(ranks.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        for ms_path in pairs.get(key, []):
            report = FileReport(str(mg_dir), str(ms_path))
            report.notes.extend(notes)
            _compare_rank(report, key, mg_dir, ms_path, ms_dir, rule_set, layout, env, map_dirs,
                          dense_dir=ranks.get((key[0], key[1], 0)))
            reports.append(report)
    if missing or extra:
        report = FileReport(str(ck.root), str(ms_dir))
        report.only_left = [f"(MindSpore file for tp {t} pp {p}{f' ep {e}' if layout.ep > 1 else ''}: {where})"
                            for (t, p, e), where in missing]
        report.only_right = [f"(file {e})" for e in extra]
        reports.append(report)
    for r in reports:
        r.notes.insert(0, f"{ms_layout.upper()} layout, {layout.describe()}, rules {rule_set.name} (names only)")
    return reports


def _is_megatron_dir(path: Path) -> bool:
    """A Megatron save root or iteration folder: ``model_optim_rng.pt`` files in mp_rank folders."""
    return megatron_folders.looks_like_checkpoint(path) and any(
        p.is_file() for pattern in ("mp_rank_*/" + megatron_folders.MODEL_FILE,
                                    "iter_*/mp_rank_*/" + megatron_folders.MODEL_FILE) for p in path.glob(pattern))


def _is_mindspore_dir(path: Path) -> bool:
    """A MindSpeed checkpoint folder: ``.ckpt``/``.safetensors`` files in rank_* (V1) or
    iter_*/mp_rank_* (V2) folders."""
    return path.is_dir() and any(
        p.suffix in MS_SUFFIXES for pattern in ("rank_*/*", "iter_*/mp_rank_*/*") for p in path.glob(pattern))


def verify(left, right, rules: str = "auto") -> list[FileReport]:
    left, right = Path(left), Path(right)
    for p in (left, right):
        if not p.exists():
            raise CkptmapError(f"{p} does not exist")
    if _is_megatron_dir(left) and _is_mindspore_dir(right):
        return compare_across(left, right, rules)
    if _is_megatron_dir(right) and _is_mindspore_dir(left):
        return compare_across(right, left, rules)
    pairs, only_left, only_right = pair_files(left, right)
    reports = [compare_files(a, b) for a, b in pairs]
    if only_left or only_right:
        missing = FileReport(str(left), str(right), [f"(file {p})" for p in only_left],
                             [f"(file {p})" for p in only_right])
        reports.append(missing)
    return reports


def report_lines(reports, limit: int = 20) -> tuple[bool, list[str]]:
    """(all identical, the lines ``ckptmap verify`` prints)."""
    lines = []
    for r in reports:
        status = "identical" if r.identical else "DIFFERENT"
        if r.what:
            counted = f"{r.compared} keys, {r.values} values compared: {r.what}"
        else:
            counted = f"{r.compared} values compared"
        lines.append(f"{status:9s}  {r.left}  <->  {r.right}  ({counted})")
        lines += [f"    note: {n}" for n in r.notes]
        lines += [f"    only in the first:  {k}" for k in r.only_left[:limit]]
        lines += [f"    only in the second: {k}" for k in r.only_right[:limit]]
        lines += [f"    differs: {k}: {what}" for k, what in r.differing[:limit]]
        lines += [f"    not compared: {k} ({why})" for k, why in r.not_compared[:limit]]
        hidden = sum(max(0, len(x) - limit) for x in (r.only_left, r.only_right, r.differing, r.not_compared))
        if hidden:
            lines.append(f"    … and {hidden} more")
    n_bad = sum(not r.identical for r in reports)
    lines.append(f"\n{len(reports) - n_bad} of {len(reports)} file pairs identical")
    return n_bad == 0, lines


def md5_report(paths) -> tuple[bool, list[str]]:
    sums = []
    for p in paths:
        h = hashlib.md5()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(16 * 1024 * 1024), b""):
                h.update(block)
        sums.append((str(p), h.hexdigest()))
    lines = ["-------------Comparing MD5Sum-------------"]
    same = len({s for _, s in sums}) == 1
    if same:
        lines.append(f"All files have the same md5sum value: {sums[0][1]}")
    else:
        lines += [f"{s}  {p}" for p, s in sums]
        lines.append("The md5sum values differ.")
    return same, lines
