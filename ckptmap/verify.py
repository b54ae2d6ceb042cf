"""`ckptmap verify`: compare checkpoints by value — every tensor's bytes and every other object.

* same framework (file vs file, or directory vs directory paired by relative path): every key of
  ``.pt`` (tensors and the pickled objects around them), ``.ckpt`` and ``.safetensors`` files;
* Megatron directory vs MindSpore directory: the pt2ms plan for the Megatron side is computed in
  memory, tensor by tensor, and compared with the MindSpore files (names paired by the rules);
* ``--md5``: whole-file md5 sums in the conversion guide's style.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import attrs
import numpy as np

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_folders, mindspeed, registry
from ckptmap.formats.safe_unpickler import StandIn
from ckptmap.formats.torch_zip_reader import TensorRef, TorchZipFile, read_objects
from ckptmap.mapping.ops import cast

TENSOR_SUFFIXES = (".pt", ".ckpt", ".safetensors")


@attrs.define
class FileReport:
    left: str
    right: str
    only_left: list = attrs.field(factory=list)
    only_right: list = attrs.field(factory=list)
    differing: list = attrs.field(factory=list)   # (key, description)
    compared: int = 0

    @property
    def identical(self) -> bool:
        return not (self.only_left or self.only_right or self.differing)


def describe_difference(a: np.ndarray, a_dtype: str, b: np.ndarray, b_dtype: str) -> str | None:
    """None if ``a`` and ``b`` (arrays of the named dtypes' storage types) have the same dtype, shape
    and bytes; else what differs."""
    if a_dtype != b_dtype or tuple(a.shape) != tuple(b.shape):
        return f"{a_dtype} {list(a.shape)} vs {b_dtype} {list(b.shape)}"
    fa, fb = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    if fa.view(np.uint8).tobytes() == fb.view(np.uint8).tobytes():
        return None
    differs = fa.view(np.uint8).reshape(fa.size, -1) != fb.view(np.uint8).reshape(fb.size, -1)
    differs = differs.any(axis=1)
    if dtypes.get(a_dtype).is_float:
        va, vb = cast(fa, a_dtype, "float64"), cast(fb, b_dtype, "float64")
    else:
        va, vb = fa.astype(np.float64), fb.astype(np.float64)
    diff = np.abs(va[differs] - vb[differs])
    max_diff = float(np.nan_to_num(diff, nan=math.inf).max())
    first = int(np.flatnonzero(differs)[0])
    index = [int(i) for i in np.unravel_index(first, a.shape)] if a.ndim else []
    return (f"{int(differs.sum())} of {a.size} elements differ, max abs diff {max_diff:g}, first at "
            f"{index} ({va[first].item()!r} vs {vb[first].item()!r})")


# -------------------------------------------------------------------------------------------------
# Same framework


def _compare_objects(a, b, path, report, tensors_a, tensors_b):
    """Walk two pickled object graphs; tensors (TensorRefs) are compared by value."""
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
    if type(a) is not type(b):
        report.differing.append((where, f"{type(a).__name__} vs {type(b).__name__}"))
        return
    if isinstance(a, dict):
        keys_a, keys_b = list(a), list(b)
        for k in keys_a:
            if k not in b:
                report.only_left.append("/".join(map(str, path + [k])))
        for k in keys_b:
            if k not in a:
                report.only_right.append("/".join(map(str, path + [k])))
        common = [k for k in keys_a if k in b]
        if common != [k for k in keys_b if k in a]:
            report.differing.append((where, "same keys in a different order"))
        for k in common:
            _compare_objects(a[k], b[k], path + [k], report, tensors_a, tensors_b)
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
# Across frameworks


def compare_across(megatron_dir: Path, ms_dir: Path, rules: str) -> list[FileReport]:
    """The pt2ms plan for ``megatron_dir``, evaluated in memory, against the files of ``ms_dir``."""
    from ckptmap.execute import _Sources, expected_array
    from ckptmap.mapping.compiler import Pt2MsOptions, compile_pt2ms

    files = sorted(p for p in ms_dir.rglob("*") if p.suffix in (".ckpt", ".safetensors"))
    if not files:
        raise CkptmapError(f"{ms_dir} holds no .ckpt or .safetensors files")
    fmt = files[0].suffix[1:]
    layout = mindspeed.detect_layout(ms_dir)
    prefix = files[0].stem if layout == "v1" else "network"
    probe = registry.open_reader(files[0])
    try:
        specs = [probe.spec(k) for k in probe.keys()]
    finally:
        probe.close()
    dtype = next((d for d, shape in specs if d in ("bfloat16", "float16", "float32") and len(shape) > 1),
                 "float32")
    meta_dir = ms_dir / mindspeed.PT_META_DIR
    meta_args = sorted(p for p in meta_dir.glob("*.pt") if mindspeed.parse_pt_meta_args_name(p.name))
    dp = None
    if layout == "v1" and meta_args:
        args = read_objects(meta_args[0]).get("args")
        dp = getattr(args, "data_parallel_size", None)

    def plan_for(param_only: bool):
        return compile_pt2ms(Pt2MsOptions(
            str(megatron_dir), str(ms_dir), convert_param_only=param_only, format=fmt, layout=layout,
            file_prefix=prefix, dtype=dtype, rules=rules, dp_size=dp))

    # Which conversion made these files? The optimizer one if its first file's names are all there.
    plan = None
    try:
        full = plan_for(False)
        first = next(f for f in full.files if f.format in ("ckpt", "safetensors"))
        if (ms_dir / first.path).is_file():
            reader = registry.open_reader(ms_dir / first.path)
            try:
                if {t.name for t in first.tensors} <= set(reader.keys()):
                    plan = full
            finally:
                reader.close()
    except CkptmapError:  # e.g. no distrib_optim.pt: only the weights can be compared
        pass
    plan = plan or plan_for(True)
    reports = []
    sources = _Sources()
    try:
        for f in plan.files:
            if f.format not in ("ckpt", "safetensors"):
                continue
            path = ms_dir / f.path
            report = FileReport(f"{megatron_dir} (as {f.path})", str(path))
            if not path.is_file():
                report.only_left.append(f"(whole file {f.path})")
                reports.append(report)
                continue
            reader = registry.open_reader(path)
            try:
                have = set(reader.keys())
                for t in f.tensors:
                    if t.name not in have:
                        report.only_left.append(t.name)
                        continue
                    report.compared += 1
                    problem = describe_difference(expected_array(t, sources), t.dtype, reader.array(t.name),
                                                  reader.spec(t.name).dtype)
                    if problem:
                        report.differing.append((t.name, problem))
                planned = {t.name for t in f.tensors}
                report.only_right = sorted(have - planned)
            finally:
                reader.close()
            reports.append(report)
    finally:
        sources.close()
    return reports


def verify(left, right, rules: str = "auto") -> list[FileReport]:
    left, right = Path(left), Path(right)
    for p in (left, right):
        if not p.exists():
            raise CkptmapError(f"{p} does not exist")
    if megatron_folders.looks_like_checkpoint(left) and not megatron_folders.looks_like_checkpoint(right) and right.is_dir():
        return compare_across(left, right, rules)
    if megatron_folders.looks_like_checkpoint(right) and not megatron_folders.looks_like_checkpoint(left) and left.is_dir():
        return compare_across(right, left, rules)
    pairs, only_left, only_right = pair_files(left, right)
    reports = [compare_files(a, b) for a, b in pairs]
    if only_left or only_right:
        missing = FileReport(str(left), str(right), [f"(file {p})" for p in only_left],
                             [f"(file {p})" for p in only_right])
        reports.append(missing)
    return reports


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
