"""Run a Plan: stream every output file to a temporary name, rename it into place when complete.

Workers are long-lived forked processes pulling file tasks from a queue; each holds one output
tensor in memory at a time (source tensors are zero-copy views of mmap'd files). A task that
exceeds ``timeout`` seconds has its worker killed and replaced, and is reported as failed.
Copies of finished outputs (extra DP/CP ranks) run after their originals.

Before the first byte: temporary files of killed runs are removed (``atomic.remove_stale_temps``)
and the output folder is checked (``ckptmap.target``: a non-empty one is refused unless
``overwrite``). On SIGINT/SIGTERM (``ckptmap.signals``) workers are stopped and every unfinished
file removed; workers exit by themselves when the main process is killed. Several machines:
``ckptmap.coordinate``.
"""

from __future__ import annotations

import heapq
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import attrs
import numpy as np

from ckptmap import atomic, coordinate, dtypes, signals, target
from ckptmap.errors import CkptmapError
from ckptmap.formats import byte_io, megatron_write, mindspore_ckpt, pt_meta, registry, torch_zip_reader
from ckptmap.formats.base import FileRange, Hole
from ckptmap.mapping import ops as tensor_ops
from ckptmap.mapping.plan import FileTask, Op, Plan, SourceSlice, TensorTask, concat_range



@attrs.frozen
class FileResult:
    path: str
    ok: bool
    nbytes: int = 0
    seconds: float = 0.0
    error: str = ""


@attrs.define
class RunReport:
    results: list[FileResult]
    seconds: float
    removed: list[str] = attrs.field(factory=list)   # stale temporary files and --overwrite removals

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if not r.ok]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.results if r.ok)


class _Mapped:
    """A source file that planning already read and closed (``megatron_files.PtFile``): specs from its
    object tree, element ranges read at the byte ranges it kept — no second parse of the file."""

    def __init__(self, pt_file):
        self.file = pt_file
        self._reopened = None
        self._fd = None

    def spec(self, key):
        return self.file.spec(key)

    def read_range(self, key, start: int, count: int):
        """Elements [start, start + count) of a contiguous tensor, or None if its place was not kept."""
        where = self.file.kept_range(key)
        if where is None:
            return None
        dtype = np.dtype(dtypes.storage(self.file.spec(key).dtype))
        if self._fd is None:
            self._fd = os.open(self.file.path, os.O_RDONLY)
        data = os.pread(self._fd, count * dtype.itemsize, where[0] + start * dtype.itemsize)
        return np.frombuffer(data, dtype=dtype) if len(data) == count * dtype.itemsize else None

    def array(self, key):
        if self._reopened is None:
            self._reopened = registry.open_reader(self.file.path)
        return self._reopened.array(key)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._reopened is not None:
            self._reopened.close()


# Object trees of source files read by this process's _Sources (torch_zip_reader.shared_trees): a
# worker writing the files of thousands of ranks unpickles each distinct pickle once (TP ranks, and
# pipeline ranks in the middle, save byte-identical ones), keeping the last few.
_READ_TREES: dict = {}
_READ_TREES_KEPT = 16


def _trim_read_trees() -> None:
    torch_zip_reader.trim_trees(_READ_TREES, _READ_TREES_KEPT)


class _Sources:
    """Source files opened lazily and kept open for the life of one worker task. ``closed_files``:
    {path: PtFile} already read (and closed) by planning, used instead of opening them again.
    ``inputs``: the FileTask's {``@name``: path} — its slices may name their files so (ranks of one
    structure share their tasks); resolved here, per read, instead of copying the tasks per file."""

    def __init__(self, closed_files=None, inputs=None):
        self._open = {}
        self._closed = closed_files or {}
        self._inputs = inputs or {}
        self._whole_ranges = {}   # (file, key, dtype, shape) -> where the tensor lies, its spec checked
        self._deferred = None     # small rounding checks read, compared at finish_checks (defer_checks)

    def defer_checks(self) -> None:
        """Compare small main-param roundings together at :meth:`finish_checks` (one cast for a file's
        tensors instead of one per tensor); the caller must call it before the file gets its name."""
        self._deferred = []

    def finish_checks(self) -> None:
        """The deferred rounding checks, compared in one pass per weight dtype; a mismatch is checked
        again tensor by tensor, which raises the error naming it."""
        deferred, self._deferred = self._deferred, None
        by_dtype: dict = {}
        for task, main, weight, wdtype in deferred or ():
            by_dtype.setdefault(wdtype, []).append((task, main, weight))
        for wdtype, checks in by_dtype.items():
            got = tensor_ops.cast(np.frombuffer(b"".join(c[1] for c in checks), dtype=np.float32), "float32", wdtype)
            bits = f"u{got.itemsize}"   # bit patterns: a NaN weight equals its NaN rounding
            if np.array_equal(got.view(bits), np.frombuffer(b"".join(c[2] for c in checks), dtype=bits)):
                continue
            for task, _, _ in checks:
                self._check_rounding(task, None)
            raise CkptmapError(f"internal error: the main-param check of {len(checks)} tensors found a difference "
                               f"that none of them shows alone")

    def defer_rounding(self, task: TensorTask, content) -> bool:
        """Queue the main-param check of a float32 byte-copy ``task`` whose bytes are in hand (``content``:
        the main param is their first elements), reading only the weight; False (nothing queued) when it
        cannot be: checks not deferred, or the weight is not runs of one dtype."""
        found = self.weight_runs(task, len(content)) if self._deferred is not None else None
        if found is None:
            return False
        ranges, main_nbytes, weight_dtype = found
        weight = byte_io.read_small(ranges[0]) if len(ranges) == 1 else b"".join(map(byte_io.read_small, ranges))
        self._deferred.append((task, content[:main_nbytes], weight, weight_dtype))
        return True

    def weight_runs(self, task: TensorTask, nbytes: int):
        """For the main-param check of a float32 ``task`` of ``nbytes`` bytes: (the weight's byte ranges, the
        bytes of the main param, the weight's dtype), or None when the weight is not contiguous runs of one
        dtype within those bytes' elements."""
        weights = task.rounds_to_slices
        if task.dtype != "float32" or any(w.dtype != weights[0].dtype for w in weights):
            return None
        count = sum(w.count for w in weights)
        ranges = [self.byte_range(w) for w in weights]
        if None in ranges or count * 4 > nbytes:
            return None
        return ranges, count * 4, weights[0].dtype

    def path(self, file: str) -> str:
        """The path a slice's ``file`` names."""
        return self._inputs.get(file, file)

    def reader(self, path):
        path = self._inputs.get(path, path)
        reader = self._open.get(path)
        if reader is None:
            known = self._closed.get(path)
            if known is not None:
                reader = _Mapped(known)
            else:   # only read here (specs, byte ranges), so ranks with byte-identical pickles share a tree
                with torch_zip_reader.shared_trees(_READ_TREES):
                    reader = registry.open_reader(path)
                _trim_read_trees()
            self._open[path] = reader
        return reader

    def _check_spec(self, reader, s) -> None:
        spec = reader.spec(s.key)
        if tuple(spec.shape) != tuple(s.shape) or spec.dtype != s.dtype:
            raise CkptmapError(
                f"{self.path(s.file)}: tensor {s.key} is {spec.dtype} {list(spec.shape)} but the plan expects "
                f"{s.dtype} {list(s.shape)}; the source changed since the plan was made — re-create the plan")

    def slice(self, s) -> np.ndarray:
        """The elements of a SourceSlice (flat when it is a range, else in the tensor's shape)."""
        reader = self.reader(s.file)
        self._check_spec(reader, s)
        if (s.start or s.numel is not None) and hasattr(reader, "read_range"):
            part = reader.read_range(s.key, s.start, s.count)
            if part is not None:
                return part
        t = reader.array(s.key)
        if s.start or s.numel is not None:
            t = t.reshape(-1)[s.start:s.start + s.count]
        return t

    def array(self, task: TensorTask) -> np.ndarray:
        """The task's sources concatenated (or its reads assembled) and viewed as ``src_shape``
        (storage dtype of ``src_dtype``)."""
        if task.reads:
            return self._assemble(task)
        parts = [self.slice(s) for s in task.sources]
        if task.replicas:
            self._check_replicas(task, parts[0])
        if task.rounds_to is not None:
            self._check_rounding(task, parts[0] if len(parts) == 1 else None)
        first = task.sources[0]
        if len(parts) == 1 and first.start == 0 and first.numel is None:
            out = parts[0]  # whole tensor: stay a zero-copy view
            return out if tuple(out.shape) == tuple(task.src_shape) else out.reshape(task.src_shape)
        return np.concatenate([p.reshape(-1) for p in parts]).reshape(task.src_shape)

    def _assemble(self, task: TensorTask) -> np.ndarray:
        out = np.zeros(task.src_shape, dtype=dtypes.storage(task.src_dtype))
        for r in task.reads:
            reader = self.reader(r.source.file)
            lengths = r.dst_lengths or r.lengths
            dst = out[tuple(slice(o, o + n) for o, n in zip(r.dst_offsets, lengths))]
            if hasattr(reader, "read_range_box"):   # torch_dist: read the chunks under the box, not the global tensor
                self._check_spec(reader, r.source)
                if tuple(lengths) == tuple(r.lengths):   # straight into place, no intermediate array
                    reader.read_range_box(r.source.key, r.source.start, r.source.numel, r.view, r.offsets, r.lengths,
                                          out=dst)
                    continue
                box = reader.read_range_box(r.source.key, r.source.start, r.source.numel, r.view, r.offsets, r.lengths)
            else:
                src = self.slice(r.source).reshape(r.view)
                box = src[tuple(slice(o, o + n) for o, n in zip(r.offsets, r.lengths))]
            dst[...] = box
        if task.replicas:
            self._check_replicas(task, self.slice(task.reads[0].source))
        return out

    def _check_replicas(self, task: TensorTask, first: np.ndarray) -> None:
        """A replicated tensor is read from one rank; every other rank's copy must be the same bytes
        (picking one silently would hide a stale or corrupt rank)."""
        used = task.reads[0].source if task.reads else task.sources[0]
        view = tuple(task.reads[0].view) if task.reads else tuple(used.shape)
        want = np.ascontiguousarray(first).reshape(-1)
        for other in task.replicas:
            got = np.ascontiguousarray(self.slice(other)).reshape(-1)
            if got.shape == want.shape and np.array_equal(got.view(np.uint8), want.view(np.uint8)):
                continue
            if got.shape != want.shape:
                detail = f"{got.size} elements instead of {want.size}"
            else:
                bytes_got = got.view(np.uint8).reshape(got.size, -1)
                differ = np.flatnonzero((bytes_got != want.view(np.uint8).reshape(want.size, -1)).any(axis=1))
                i = int(differ[0])
                at = list(np.unravel_index(i, view)) if math.prod(view) == want.size else [i]
                a, b = (tensor_ops.cast(x[i:i + 1], used.dtype, "float32")[0] if used.dtype in ("bfloat16", "float16")
                        else x[i] for x in (want, got))
                detail = (f"first difference at element {[int(j) for j in at]}: {float(a)!r} in the copy used, {float(b)!r} here; "
                          f"{differ.size} of {want.size} elements differ")
            raise CkptmapError(
                f"{task.name}: the tensor is replicated across tensor-parallel ranks, but the copies differ — "
                f"{_rank_dir(self.path(other.file))} ({self.path(other.file)}, {other.key}) against "
                f"{_rank_dir(self.path(used.file))} ({self.path(used.file)}, "
                f"{used.key}): {detail}. The source ranks disagree (one may be stale or corrupt); check the checkpoint "
                f"before resharding it — nothing silently picks one copy")

    def _rounding_mismatches(self, task: TensorTask, main: np.ndarray | None):
        """Elements of the fp32 main param that do not round to the model weight ("all" when the
        sizes differ). Both are read in chunks — into reused buffers when they lie contiguous in
        their files, the usual case — so the check costs a few passes over a chunk in the CPU cache,
        not arrays the size of the parameter. The main param: the first elements of the task's
        sources, as many as the weight (``rounds_to``) has, possibly in several runs; so the weight."""
        weights = task.rounds_to_slices
        count = sum(w.count for w in weights)
        srcs = concat_range(task.sources, 0, count)
        wdtype = weights[0].dtype
        if main is None:
            ranges = [self.byte_range(x) for x in srcs + weights]
            if None not in ranges and sum(x.count for x in srcs) == count and all(x.dtype == "float32" for x in srcs) \
                    and all(w.dtype == wdtype for w in weights):
                n = 1 << 18   # elements per chunk
                if count * 4 <= byte_io.SMALL_RUN and len(ranges) == 2 and self._deferred is not None:
                    self._deferred.append((task, byte_io.read_small(ranges[0]), byte_io.read_small(ranges[1]), wdtype))
                    return 0   # compared at finish_checks
                mains = byte_io.read_windows(ranges[:len(srcs)], n * 4)
                weights_bytes = byte_io.read_windows(ranges[len(srcs):], n * dtypes.itemsize(wdtype))
                bad = 0
                for m, w in zip(mains, weights_bytes):
                    got = tensor_ops.cast(np.frombuffer(m, dtype=np.float32), "float32", wdtype)
                    bits = f"u{got.itemsize}"   # bit patterns: a NaN weight equals its NaN rounding
                    bad += int(np.count_nonzero(got.view(bits) != np.frombuffer(w, dtype=bits)))
                return bad
            main = np.concatenate([self.slice(x).reshape(-1) for x in srcs]) if len(srcs) != 1 else self.slice(srcs[0])
        want = np.concatenate([self.slice(w).reshape(-1) for w in weights]) if len(weights) > 1 else \
            self.slice(weights[0]).reshape(-1)
        main = main.reshape(-1)
        if main.size != want.size:
            return "all"
        bad = 0
        for lo in range(0, main.size, 1 << 18):
            got = tensor_ops.cast(np.ascontiguousarray(main[lo:lo + (1 << 18)]), "float32", wdtype)
            bits = f"u{got.itemsize}"
            bad += int(np.count_nonzero(got.view(bits) != np.ascontiguousarray(want[lo:lo + (1 << 18)]).view(bits)))
        return bad

    def _check_rounding(self, task: TensorTask, main: np.ndarray | None) -> None:
        """The fp32 main param, rounded to the model weight's dtype, must be that weight (``main``:
        its values when already in hand, else read here)."""
        weights = task.rounds_to_slices
        bad = self._rounding_mismatches(task, main)
        if bad:
            weight, runs = weights[0], "" if len(weights) == 1 else f" + {len(weights) - 1} more runs"
            count = sum(w.count for w in weights)
            raise CkptmapError(
                f"{task.name}: the fp32 main param read from {self.path(task.sources[0].file)} ({task.sources[0].key} "
                f"[{task.sources[0].start}:{task.sources[0].start + task.sources[0].count}]"
                f"{'' if len(task.sources) == 1 else f' + {len(task.sources) - 1} more runs'}) does not round to the "
                f"model weight {weight.key}{runs} of {self.path(weight.file)} ({bad} of {count} elements differ): the "
                f"bucket layout puts "
                f"another parameter's optimizer state here. Pass the training run's param_map (--param-map-path), or "
                f"the right --megatron-version; --no-main-param-check skips this check")

    def byte_range(self, s) -> FileRange | None:
        """Where the elements of SourceSlice ``s`` lie contiguous in its file (C order), else None."""
        known = (s.file, s.key, s.dtype, s.shape)   # a file's tensors slice a few optimizer buffers many times
        whole = self._whole_ranges.get(known, known)
        if whole is known:
            reader = self.reader(s.file)
            spec = reader.spec(s.key)
            if tuple(spec.shape) != tuple(s.shape) or spec.dtype != s.dtype:
                self.slice(s)   # raises the changed-source error
            whole = self._whole_ranges[known] = reader.byte_range(s.key)
        if whole is None:
            return None
        size = dtypes.itemsize(s.dtype)
        if s.start == 0 and s.count * size == whole.nbytes:
            return whole   # with its record's CRC-32, if the reader knows it
        return FileRange(whole.path, whole.offset + s.start * size, s.count * size)

    def raw(self, s) -> np.ndarray:
        return self.reader(s.file).array(s.key)

    def close(self):
        for r in self._open.values():
            r.close()
        self._open.clear()
        self._whole_ranges.clear()


def _rank_dir(file: str) -> str:
    """The rank folder a source file sits in (``mp_rank_01_000``), which names its ranks."""
    return Path(file).parent.name


# Constant tensors (optimizer scalars, ...) by task: ranks of one structure share their tasks, so each
# value is made once per worker, not once per file (read-only: every file gets the same array).
_CONSTANTS: dict = {}
_CONSTANTS_KEPT = 1 << 12


def _constant(task: TensorTask) -> np.ndarray:
    kept = _CONSTANTS.get(id(task))
    if kept is not None and kept[0] is task:
        return kept[1]
    value = np.array(task.value, dtype=dtypes.storage(task.dtype))
    value = np.full(task.shape, value) if value.ndim == 0 else value.reshape(task.shape)
    value.flags.writeable = False
    _CONSTANTS[id(task)] = (task, value)   # the task is kept with it: its id cannot be reused meanwhile
    if len(_CONSTANTS) > _CONSTANTS_KEPT:
        del _CONSTANTS[next(iter(_CONSTANTS))]
    return value


def expected_array(task: TensorTask, sources: _Sources) -> np.ndarray:
    """The value a TensorTask describes, as an array of ``task.dtype``'s storage type: its sources
    through its ops, or its constant."""
    if not task.sources and not task.reads:
        return _constant(task)
    try:
        value = tensor_ops.apply_all(task.ops, sources.array(task))
    except tensor_ops.InexactCast as e:
        where = task.sources[0] if task.sources else task.reads[0].source
        raise CkptmapError(f"{task.name} (from {sources.path(where.file)}, {where.key}): {e}; the values cannot be "
                           f"kept in the dtype the target needs — convert them on the MindSpore side first") from None
    if tuple(value.shape) != tuple(task.shape) or value.dtype != dtypes.storage(task.dtype):
        raise CkptmapError(f"internal error: {task.name} came out {value.dtype} {list(value.shape)}, "
                           f"plan says {task.dtype} {list(task.shape)}")
    return value


def _elementwise(task: TensorTask):
    """(source dtype, target dtype) when the task's value is its sources' elements in file order,
    concatenated, through at most a cast (reshapes do not move C-order bytes), else None."""
    if task.reads or not task.sources or task.value is not None:
        return None
    src = task.src_dtype or task.sources[0].dtype
    if any(s.dtype != src for s in task.sources):
        return None
    return _cast_only(task, src)


def _cast_only(task: TensorTask, src: str):
    """(src, target dtype) when the task's ops are reshapes and casts from ``src`` only, else None."""
    dst = src
    for op in task.ops:
        if op.kind == "cast" and op.args[0] == dst:
            dst = op.args[1]
        elif op.kind != "reshape":
            return None
    return (src, dst) if dst == task.dtype else None


def byte_copy(task: TensorTask) -> bool:
    """The task's bytes are runs of its sources' bytes: the executor copies them kernel-side
    (when the sources' format stores them contiguously)."""
    kinds = _elementwise(task)
    return kinds is not None and kinds[0] == kinds[1]


def _checks(task: TensorTask, sources: "_Sources") -> None:
    if task.replicas:
        sources._check_replicas(task, sources.slice(task.reads[0].source if task.reads else task.sources[0]))
    if task.rounds_to is not None:
        sources._check_rounding(task, None)


def _cast_chunks(rng, src: str, dst: str):
    """The bytes of ``rng`` (elements of ``src``) cast to ``dst`` (``ops.cast``, the one definition
    of every cast), chunk by chunk: the source read into one reused buffer, a chunk-sized result."""
    if (src, dst) == ("float32", "bfloat16"):
        yield from _f32_to_bf16_chunks(rng)
        return
    size = dtypes.itemsize(src)
    chunk = byte_io.CHUNK // 2 // size * size
    for raw in (c for r in byte_io.ranges_of(rng) for c in byte_io.read_chunks(r, chunk)):
        values = np.frombuffer(raw, dtype=dtypes.storage(src))
        yield np.ascontiguousarray(tensor_ops.cast(values, src, dst)).view(np.uint8)


_BF16_CHUNK = 1 << 17   # elements: source, scratch and result (1.25 MiB) stay in the L2 cache


def _f32_to_bf16_chunks(rng):
    """``ops.f32_to_bf16`` of the float32 bytes of ``rng`` (ms2pt's fp32 -> bf16 weights), chunk by
    chunk into reused buffers that stay in the CPU cache (about half the time of the general cast),
    yielding views of one result buffer (each valid until the next is asked for)."""
    scratch = np.empty(_BF16_CHUNK, dtype=np.uint32)
    result = np.empty(_BF16_CHUNK, dtype=np.uint16)
    for raw in (c for r in byte_io.ranges_of(rng) for c in byte_io.read_chunks(r, _BF16_CHUNK * 4)):
        values = np.frombuffer(raw, dtype=np.float32)
        n = values.size
        yield tensor_ops.f32_to_bf16(values, out=result[:n], scratch=scratch[:n]).view(np.uint8)


def streamed(task: TensorTask, sources: "_Sources"):
    """("range", FileRange) when the task's bytes are a contiguous run of its source file,
    ("ranges", (FileRange, ...)) when they are several such runs in order (a parameter merged from
    DP shards, ZeRO-3 dim-0 slices), ("chunks", iterator) when they are such runs cast element by
    element or a task assembled from reads (``_slabs``), else None (the task needs its whole array:
    expected_array). The task's checks run first."""
    if task.reads:
        return _slabs(task, sources)
    kinds = _elementwise(task)
    if kinds is None:
        return _rowwise(task, sources)
    runs = _source_runs(task, sources)
    if runs is None:
        return None
    _checks(task, sources)
    if kinds[0] != kinds[1]:
        return "chunks", (chunk for rng in runs for chunk in _cast_chunks(rng, *kinds))
    if len(runs) == 1:
        return "range", runs[0]
    return "ranges", tuple(r for r in runs if r.nbytes)


def _source_runs(task: TensorTask, sources: "_Sources") -> list[FileRange] | None:
    """Where each of the task's sources lies contiguous in its file, in order, or None if one does not."""
    runs = []
    for s in task.sources:
        rng = sources.byte_range(s)
        if rng is None:
            return None
        runs.append(rng)
    return runs


def _rows_kept(task: TensorTask) -> bool:
    """Whether every op of the task acts within each index of the leading dimension (casts, transposes and
    chunk-interleaves of later dimensions, reshapes that keep the leading one): then each leading row of
    the result comes from the same row of the source (stacked experts transposed one by one)."""
    shape = tuple(task.src_shape or ())
    if not shape:
        return False
    for op in task.ops:
        if op.kind in ("cast", "cast_exact"):
            continue
        if op.kind == "transpose":
            dims = [d % len(shape) for d in op.args]
            if 0 in dims:
                return False
            order = list(range(len(shape)))
            order[dims[0]], order[dims[1]] = order[dims[1]], order[dims[0]]
            shape = tuple(shape[i] for i in order)
        elif op.kind == "chunk_interleave":
            if op.args[0] % len(shape) == 0:
                return False
        elif op.kind == "reshape":
            to = tuple(op.args[1])
            if not to or to[0] != shape[0]:
                return False
            shape = to
        else:
            return False
    return shape == tuple(task.shape)


def _rowwise(task: TensorTask, sources: "_Sources"):
    """("chunks", iterator) of a task whose ops keep the leading dimension (``_rows_kept``) and whose sources
    are runs of one dtype: its result computed a slab of leading rows (about byte_io.CHUNK bytes) at a time —
    the sources' bytes under the slab read, the ops applied to them — instead of as a whole array. Else None."""
    if task.value is not None or not task.sources or not _rows_kept(task):
        return None
    src = task.src_dtype or task.sources[0].dtype
    if any(s.dtype != src for s in task.sources):
        return None
    runs = _source_runs(task, sources)
    if runs is None:
        return None
    shape = tuple(task.src_shape)
    row_bytes = math.prod(shape[1:]) * dtypes.itemsize(src)
    if not row_bytes or sum(r.nbytes for r in runs) != shape[0] * row_bytes:
        return None
    _checks(task, sources)
    rows = max(1, byte_io.CHUNK // row_bytes)

    def chunks():
        for a, raw in zip(range(0, shape[0], rows), byte_io.read_windows(runs, rows * row_bytes)):
            n = min(rows, shape[0] - a)
            slab = np.frombuffer(raw, dtype=dtypes.storage(src)).reshape((n,) + shape[1:])
            ops = [Op("reshape", ((n,) + tuple(op.args[0])[1:], (n,) + tuple(op.args[1])[1:]))
                   if op.kind == "reshape" else op for op in task.ops]
            try:
                value = tensor_ops.apply_all(ops, slab)
            except tensor_ops.InexactCast as e:
                where = task.sources[0]
                raise CkptmapError(f"{task.name} (from {sources.path(where.file)}, {where.key}): {e} (in rows "
                                   f"{a} - {a + n - 1}); the values cannot be kept in the dtype the target needs — "
                                   f"convert them on the MindSpore side first") from None
            yield np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    return "chunks", chunks()


def _slabs(task: TensorTask, sources: "_Sources"):
    """("chunks", iterator) of a task assembled from reads (a TP merge along dim 1, …) whose ops are at
    most a cast: its ``src_shape`` assembled a slab of leading rows at a time (about byte_io.CHUNK bytes)
    into one reused buffer, as ``_Sources._assemble`` assembles the whole — or None when its sources are
    not plain views of mapped files (torch_dist reads whole chunks per box: per slab it would re-read them)."""
    shape = tuple(task.src_shape)
    kinds = _cast_only(task, task.src_dtype or task.dtype)
    if kinds is None or not shape or task.value is not None:
        return None
    views = []
    for r in task.reads:
        reader = sources.reader(r.source.file)
        if hasattr(reader, "read_range_box") or hasattr(reader, "read_range"):
            return None
        views.append(sources.slice(r.source).reshape(r.view))
    _checks(task, sources)
    chunks = _slab_chunks(task, views)
    if kinds[0] != kinds[1]:
        chunks = (np.ascontiguousarray(tensor_ops.cast(c.view(dtypes.storage(kinds[0])), *kinds)).view(np.uint8)
                  for c in chunks)
    return "chunks", chunks


def _slab_chunks(task: TensorTask, views):
    """The bytes of ``task``'s assembly from ``views`` (its reads' sources, viewed), slab by slab: views
    of one reused buffer, each valid until the next is asked for. Places no read covers are zeros."""
    shape = tuple(task.src_shape)
    dtype = np.dtype(dtypes.storage(task.src_dtype or task.dtype))
    rows = max(1, byte_io.CHUNK // max(1, math.prod(shape[1:]) * dtype.itemsize))
    buf = np.empty((min(rows, shape[0]),) + shape[1:], dtype=dtype)
    for a in range(0, shape[0], rows):
        b = min(a + rows, shape[0])
        slab, boxes = buf[:b - a], []
        for r, src in zip(task.reads, views):
            lengths = r.dst_lengths or r.lengths
            lo, hi = max(a, r.dst_offsets[0]), min(b, r.dst_offsets[0] + lengths[0])
            if lo >= hi:
                continue
            # a read repeating its one row (dst_lengths > lengths) keeps that row; else the rows under the slab
            if r.lengths[0] != lengths[0]:
                first, n = r.offsets[0], 1
            else:
                first, n = r.offsets[0] + lo - r.dst_offsets[0], hi - lo
            box = src[(slice(first, first + n),) + tuple(slice(o, o + k) for o, k in zip(r.offsets[1:], r.lengths[1:]))]
            place = (slice(lo - a, hi - a),) + tuple(slice(o, o + k) for o, k in zip(r.dst_offsets[1:], lengths[1:]))
            boxes.append((place, box))
        if sum(math.prod(slab[p].shape) for p, _ in boxes) != slab.size:
            slab[...] = 0   # some places are not read (reads never overlap: covering all is summing to all)
        for place, box in boxes:
            slab[place] = box
        yield slab.reshape(-1).view(np.uint8)


def hole_source(task: TensorTask) -> SourceSlice | None:
    """The one slice a storage piece is a byte copy of (``reshard.byte_copy_pieces``), else None; a piece
    with checks (replicas, main param) is none: its bytes are read and checked."""
    if len(task.sources) != 1 or task.replicas or task.rounds_to is not None:
        return None
    return task.sources[0] if byte_copy(task) else None


def zero_constant(task: TensorTask) -> bool:
    """A constant piece whose bytes are all zero (buffer padding and alignment gaps)."""
    if task.sources or task.reads or task.value is None or np.ndim(task.value):
        return False
    return not np.array(task.value, dtype=dtypes.storage(task.dtype)).reshape(1).view(np.uint8).any()


def _storage_bytes(storages, sources: "_Sources", progress, holes: bool = False):
    """fill(key) for a streamed torch file: each storage's pieces in order, as raw bytes. ``holes``
    (an intermediate file whose byte copies are read from their sources instead): every tensor piece
    becomes a Hole, neither read nor written (zeros read back as such; an assembled piece is written
    later if something reads it: ``fill_hole``)."""
    by_key = {s.key: s for s in storages}

    def fill(key):
        st = by_key.get(key)
        if st is None:
            raise CkptmapError(f"internal error: the plan has no storage {key!r}")
        for piece in st.pieces:
            if piece.tensor is not None:
                t = piece.tensor
                if t.dtype != st.dtype:
                    raise CkptmapError(f"internal error: {t.name} is {t.dtype}, storage {key} holds {st.dtype}")
                if holes:
                    yield Hole(t.nbytes)
                    continue
                how = streamed(t, sources)
                if how is None:
                    value = expected_array(t, sources)
                    yield np.ascontiguousarray(value).reshape(-1).view(np.uint8)
                elif how[0] == "range":   # copied by the kernel (or through a small buffer for the CRC)
                    yield how[1]
                else:                     # runs of files ("ranges"), likewise; or chunks
                    yield from how[1]
                if progress:
                    progress(t.nbytes)
            else:
                yield sources.raw(piece.padding)
    return fill


_MEGATRON_WRITERS = {"megatron_model": "write_model", "megatron_optim": "write_optim",
                     "megatron_model_dist": "write_model_from_dist"}


def write_intermediate(task: FileTask, root: Path) -> dict:
    """Write a Megatron file of a plan as an intermediate: its tensor pieces left as holes
    (``_storage_bytes``). Returns {plan storage key: the file's record key}, which tells a reader of the
    file's tensors which plan storage (and so which pieces) each one views."""
    final = root / task.path
    final.parent.mkdir(parents=True, exist_ok=True)
    records: dict = {}
    sources = _Sources()
    try:
        write = getattr(megatron_write, _MEGATRON_WRITERS[task.format])
        write(final, task.extra, _storage_bytes(task.storages, sources, None, holes=True), records=records)
    finally:
        sources.close()
    return records


def fill_hole(path, offset: int, task: TensorTask) -> None:
    """Write the bytes of ``task`` (a storage piece an intermediate left as a hole) at byte ``offset`` of
    the intermediate file ``path``; one piece in memory."""
    sources = _Sources()
    try:
        data = np.ascontiguousarray(expected_array(task, sources)).reshape(-1).view(np.uint8)
    finally:
        sources.close()
    fd = os.open(path, os.O_WRONLY)
    try:
        byte_io.pwrite_all(fd, data, offset)
    finally:
        os.close(fd)


# A .ckpt of at most this many bytes whose tensors are all byte copies and constants is assembled in
# memory from a per-structure image (``mindspore_ckpt.image_layout``: headers and constants in place) and
# written at once: at thousands of ranks of small files, the writer's per-tensor work cost more than the
# bytes. 0 turns it off (every file through CkptWriter).
CKPT_IMAGE_BYTES = 4 << 20

# Images by the FileTask's tensors tuple (ranks of one structure share it; kept with it, so its id cannot
# be reused meanwhile): (file size, [(offset, bytes)] of its headers and constants, [(offset, task)] to
# copy), or None when such a file cannot be assembled so. Small (no contents): one per pipeline stage.
_CKPT_IMAGES: dict = {}
_CKPT_IMAGES_KEPT = 1 << 12


def _ckpt_image(tensors: tuple):
    kept = _CKPT_IMAGES.get(id(tensors))
    if kept is not None and kept[0] is tensors:
        return kept[1]
    image = None
    if sum(t.nbytes for t in tensors) <= CKPT_IMAGE_BYTES and \
            all(byte_copy(t) or (t.value is not None and not t.sources and not t.reads) for t in tensors):
        layout = mindspore_ckpt.image_layout([(t.name, t.dtype, t.shape) for t in tensors])
        if layout is not None:
            data, offsets = layout
            fixed, copies, pos = [], [], 0   # the image's bytes but the copies' contents, in runs
            for t, at in zip(tensors, offsets):
                if t.sources:
                    fixed.append((pos, data[pos:at]))
                    copies.append((at, t))
                else:
                    fixed.append((pos, data[pos:at] + np.ascontiguousarray(_constant(t)).tobytes()))
                pos = at + t.nbytes
            fixed = [(at, piece) for at, piece in fixed if piece]
            image = (len(data), fixed, copies)
    _CKPT_IMAGES[id(tensors)] = (tensors, image)
    if len(_CKPT_IMAGES) > _CKPT_IMAGES_KEPT:
        del _CKPT_IMAGES[next(iter(_CKPT_IMAGES))]
    return image


def _write_ckpt_image(task: FileTask, tmp: Path, sources: "_Sources", progress) -> bool:
    """Write a small .ckpt of byte copies and constants (``CKPT_IMAGE_BYTES``) from its image, its copies
    read straight into place and checked as the writer's path checks them; False (nothing written) when
    the file is not one, or a source is not stored contiguously."""
    image = _ckpt_image(task.tensors)
    if image is None:
        return False
    size, fixed, copies = image
    buffer = bytearray(size)
    view = memoryview(buffer)
    for at, piece in fixed:
        view[at:at + len(piece)] = piece
    if not _run_image_program(task, view, sources):
        runs = []
        for at, t in copies:
            found = _source_runs(t, sources)
            if found is None:
                return False
            if sum(r.nbytes for r in found) != t.nbytes:
                raise CkptmapError(f"{task.path}: tensor {t.name!r} ({t.dtype} {list(t.shape)}) needs {t.nbytes} "
                                   f"bytes but its source runs in {sources.path(t.sources[0].file)} hold "
                                   f"{sum(r.nbytes for r in found)}")
            runs.append(found)
        for (at, t), found in zip(copies, runs):
            start = at
            for r in found:
                byte_io.read_into(r, view[at:at + r.nbytes])
                at += r.nbytes
            if t.replicas:
                sources._check_replicas(t, sources.slice(t.sources[0]))
            if t.rounds_to is not None and not sources.defer_rounding(t, view[start:at]):
                sources._check_rounding(t, None)
        _remember_image_program(task, copies, runs, sources)
    sources.finish_checks()
    with open(tmp, "wb") as f:
        f.write(buffer)
        if task.crc:
            f.write(mindspore_ckpt.crc_trailer(byte_io.crc32(buffer)))
    if progress:
        progress(sum(t.nbytes for t in task.tensors))
    return True


# The reads of a small .ckpt, worked out once for the ranks of one stage: files of one placement (the
# same tensors at the same offsets: TP ranks of a stage, whose pickles differ in their args' rank; kept by
# planning, torch_zip_reader.remembered_placement, for files unchanged since) hold every tensor at the same
# offset, so a rank whose task shares the tensors tuple reads the same ranges of its own files — no
# reader opened, no spec or byte range looked up per tensor (~0.45 of ~0.75 ms a file at 4,096 ranks).
# id(tensors) -> (tensors, [_ImageProgram]).
_IMAGE_PROGRAMS: dict = {}


@attrs.define(eq=False)
class _ImageProgram:
    files: tuple        # the source files as the slices name them (``@name`` or a path)
    placements: tuple   # their placements (kept alive; compared by identity)
    reads: tuple        # (index in files, file offset, size, offset in the image)
    checks: tuple       # (task, image offset of the main param, its bytes, ((index, offset, size), ...), weight dtype)


def _remember_image_program(task: FileTask, copies, runs, sources: "_Sources") -> None:
    """Keep the reads just made for the next file of these tensors and source structures, when every
    tensor is a plain read whose main-param check (if any) can be deferred."""
    files: dict = {}
    reads, checks = [], []
    for (at, t), found in zip(copies, runs):
        if t.replicas:
            return
        pos = at
        for s, r in zip(t.sources, found):
            reads.append((files.setdefault(s.file, len(files)), r.offset, r.nbytes, pos))
            pos += r.nbytes
        if t.rounds_to is None:
            continue
        found = sources.weight_runs(t, t.nbytes)
        if found is None:
            return
        ranges, main_nbytes, weight_dtype = found
        checks.append((t, at, main_nbytes, tuple((files.setdefault(w.file, len(files)), r.offset, r.nbytes)
                                                 for w, r in zip(t.rounds_to_slices, ranges)), weight_dtype))
    names = tuple(files)
    placements = []
    with byte_io.source_fds():
        for name in names:
            path = sources.path(name)
            placement = torch_zip_reader.remembered_placement(path, byte_io.source_fd(path))
            if placement is None:
                return
            placements.append(placement)
    kept = _IMAGE_PROGRAMS.get(id(task.tensors))
    if kept is None or kept[0] is not task.tensors:
        kept = _IMAGE_PROGRAMS[id(task.tensors)] = (task.tensors, [])
        if len(_IMAGE_PROGRAMS) > _CKPT_IMAGES_KEPT:
            del _IMAGE_PROGRAMS[next(iter(_IMAGE_PROGRAMS))]
    kept[1].append(_ImageProgram(names, tuple(placements), tuple(reads), tuple(checks)))
    del kept[1][:-4]   # a few structures per tensors tuple at most (the first and last pipeline stages)


def _run_image_program(task: FileTask, view, sources: "_Sources") -> bool:
    """Read this file's copies into ``view`` by a program of its tensors and its sources' structures;
    False (nothing read) when there is none."""
    kept = _IMAGE_PROGRAMS.get(id(task.tensors))
    if kept is None or kept[0] is not task.tensors:
        return False
    for program in kept[1]:
        paths = [sources.path(name) for name in program.files]
        fds = [byte_io.source_fd(p) for p in paths]
        if all(torch_zip_reader.remembered_placement(p, fd) is placement
               for p, fd, placement in zip(paths, fds, program.placements)):
            break
    else:
        return False
    for i, offset, nbytes, at in program.reads:
        byte_io.preadv_exactly(fds[i], paths[i], offset, view[at:at + nbytes])
    for t, at, nbytes, weight_reads, weight_dtype in program.checks:
        weight = b"".join(byte_io.pread_exactly(fds[i], paths[i], offset, n) for i, offset, n in weight_reads)
        sources._deferred.append((t, view[at:at + nbytes], weight, weight_dtype))
    return True


def write_file(task: FileTask, root: Path, progress=None, fsync: bool = False) -> int:
    """Write one FileTask atomically; returns the size of the file written (what the per-file listing and the
    summary report: a pickle, a param map or a copy is not 0 bytes because it holds no tensor data)."""
    with byte_io.source_fds():   # each source file opened once while this file is written, not per tensor
        _write_file(task, root, progress, fsync)
    return os.stat(os.path.join(root, task.path)).st_size


def _write_file(task: FileTask, root, progress, fsync: bool) -> None:
    final_path = os.path.join(root, task.path)   # str paths: pathlib's parsing was half of writing a small text file
    parent = os.path.dirname(final_path)
    if not os.path.isdir(parent):   # one stat; mkdir of an existing folder raises and catches, per file
        os.makedirs(parent, exist_ok=True)
    if task.format == "torch_stream":
        sources = _Sources(inputs=task.inputs)
        try:
            # the ranks of a stage have pt_meta files that differ in args.rank alone, and a rank's two files
            # read one: each is read from the last one's tree (write_from_skeleton binds a copy to write)
            with torch_zip_reader.shared_trees(_READ_TREES):
                pt_meta.write_from_skeleton(task.source, task.extra["skeleton"], task.extra.get("set", []), final_path,
                                            _storage_bytes(task.storages, sources, progress), fsync=fsync,
                                            dialect=task.extra.get("dialect"), rng=task.extra.get("rng", "refuse"))
        finally:
            sources.close()
        _trim_read_trees()
        return
    if task.format in _MEGATRON_WRITERS:   # a Megatron file of a new layout (reshard, torch_dist -> torch)
        sources = _Sources(inputs=task.inputs)
        try:
            write = getattr(megatron_write, _MEGATRON_WRITERS[task.format])
            write(Path(final_path), task.extra, _storage_bytes(task.storages, sources, progress), fsync=fsync)
        finally:
            sources.close()
        return
    if task.format == "torch_meta":
        # pt_meta copies the containers of both files' trees and pickles them with their leaves, never
        # changing them: a shared tree (the objects a fresh read of the same pickle bytes makes) gives
        # the same memo, so the same bytes (diff -r of full conversions, tests/test_pickler_c.py)
        with torch_zip_reader.shared_trees(_READ_TREES):
            pt_meta.write_pt_meta(task.source, task.aux_source, task.keys, task.extra, final_path, fsync=fsync)
        _trim_read_trees()
        return
    with atomic.atomic_output(final_path, fsync=fsync) as tmp:
        if task.format in registry.TENSOR_FORMATS:
            sources = _Sources(inputs=task.inputs)
            sources.defer_checks()
            try:
                if task.format == "ckpt" and _write_ckpt_image(task, tmp, sources, progress):
                    return
                entries = [(t.name, t.dtype, t.shape) for t in task.tensors]
                with registry.open_writer(task.format, tmp, entries, task.metadata, crc=task.crc) as writer:
                    for t in task.tensors:
                        how = streamed(t, sources) if hasattr(writer, "write_range") else None
                        if how is None:
                            writer.write(t.name, expected_array(t, sources), t.dtype)
                        elif how[0] in ("range", "ranges"):
                            writer.write_range(t.name, t.dtype, t.shape, how[1])
                        else:
                            writer.write_chunks(t.name, t.dtype, t.shape, how[1])
                        if progress:
                            progress(t.nbytes)
                    sources.finish_checks()   # before the writer closes and the file gets its name
            finally:
                sources.close()
        elif task.format == "copy":
            source = os.path.join(root, task.source) if task.source_is_output else task.source
            shutil.copyfile(source, tmp)
        elif task.format == "text":
            with open(tmp, "wb") as f:
                f.write(task.text.encode("utf-8"))
        else:
            raise CkptmapError(f"plan has a file of unknown format {task.format!r} ({task.path})")



def _describe(exc: BaseException) -> str:
    if isinstance(exc, CkptmapError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


class _Claims:
    """The files of one pool phase in the order they are handed out (largest first), claimed one at a time
    by the workers through a counter in shared memory; each worker's slot says which file it claimed last
    and when. The parent's timeouts and crash reports read the slots: a file is never handed out without
    its slot saying so (both change under one lock), so a worker that dies at any moment fails exactly the
    file it had (a start message still in a dead worker's queue buffer once left the run waiting forever),
    and starting a file costs no message.

    Finishing one costs none either: a worker claiming its next file records, under the same lock, the
    one it just wrote (index, size, seconds) in a shared list the parent reads as it pleases, and adds the
    bytes it writes to its slot's counter (the progress bar). Only failures travel through the queue, with
    their message. A message per file cost ~5 context switches and a pickle on each side: at thousands of
    small files, more CPU than writing some of them.

    ``runs``: [(start, end)] positions of ``order`` a worker takes together — still claiming, and being
    accounted for, one file at a time: its slot holds the rest of its run, which a worker respawned in the
    slot continues (``unclaimed`` counts them). Small files next to each other in the order (a pipeline
    stage's ranks) so go to one worker, whose reading of the stage's first files serves the others (pt_meta
    from a kept pickle); dealt out one by one, each of two workers got every other rank. Default: one file
    each."""

    def __init__(self, ctx, order: list[int], slots: int, runs: list[tuple[int, int]] | None = None):
        self.order = order
        self.runs = runs if runs is not None else [(i, i + 1) for i in range(len(order))]
        self.lock = ctx.Lock()
        self.next = ctx.RawValue("q", 0)   # the next run
        self.run_next = ctx.RawArray("q", max(slots, 1))   # each slot's next position in its run ...
        self.run_end = ctx.RawArray("q", max(slots, 1))    # ... and where its run ends
        self.current = ctx.RawArray("q", [-1] * max(slots, 1))
        self.since = ctx.RawArray("d", max(slots, 1))
        self.written = ctx.RawArray("q", max(slots, 1))   # bytes written by the slot's workers, ever
        self.finished = ctx.RawValue("q", 0)
        self.finished_index = ctx.RawArray("q", max(len(order), 1))
        self.finished_bytes = ctx.RawArray("q", max(len(order), 1))
        self.finished_seconds = ctx.RawArray("d", max(len(order), 1))
        self.harvested = 0   # the parent's: entries of the finished list already read

    def claim(self, slot: int, wrote: tuple[int, int, float] | None = None) -> int | None:
        """The next file for the worker in ``slot``, or None when every file is handed out. ``wrote``: the
        file this worker completed since its last claim (index, size, seconds), recorded first."""
        with self.lock:
            if wrote is not None:
                k = self.finished.value
                self.finished_index[k], self.finished_bytes[k], self.finished_seconds[k] = wrote
                self.finished.value = k + 1
            pos = self.run_next[slot]
            if pos >= self.run_end[slot]:
                run = self.next.value
                if run >= len(self.runs):
                    self.current[slot] = -1
                    return None
                self.next.value = run + 1
                pos, self.run_end[slot] = self.runs[run]
            self.run_next[slot] = pos + 1
            index = self.order[pos]
            self.since[slot] = time.monotonic()
            self.current[slot] = index
            return index

    def harvest(self):
        """(index, size, seconds) of the files completed since the parent last asked."""
        with self.lock:
            upto = self.finished.value
            got = [(self.finished_index[k], self.finished_bytes[k], self.finished_seconds[k])
                   for k in range(self.harvested, upto)]
        self.harvested = upto
        return got

    @property
    def unclaimed(self) -> bool:
        with self.lock:
            return self.next.value < len(self.runs) or any(a < b for a, b in zip(self.run_next, self.run_end))


# Small files handed to one worker together (_Claims runs): at most this many, each at most this large
RUN_FILES = 16   # a stage of TP 8 ranks with two files each
RUN_FILE_BYTES = 1 << 20


def _claim_size(task: FileTask, root: Path) -> int:
    """The bytes a file's writing moves, for the claim order and its runs: a copy's source's size (in the
    pool's second phase the written files it copies exist), or more than a run's file may hold when that
    cannot be told."""
    if task.format != "copy":
        return task.nbytes
    try:
        return os.stat(root / task.source if task.source_is_output else task.source).st_size
    except OSError:
        return RUN_FILE_BYTES + 1


def _claim_order(size_of: dict[int, int]) -> list[int]:
    """The plan's file indices in the order they are handed out. Largest first: workers claiming from one
    list then end within about one small file of each other (balanced by bytes, not by the number of
    files). The small ones (runs' files) last, in plan order: a stage's ranks and a rank's two files stay
    together in runs, whose worker reads them from one template (pt_meta); sorted by size too, a rank's
    files and a stage's went to different runs and workers, each following the template again."""
    return sorted(size_of, key=lambda i: (-size_of[i], i) if size_of[i] > RUN_FILE_BYTES else (0, i))


def _runs(sizes: list[int]) -> list[tuple[int, int]]:
    """Runs of a claim order whose files have ``sizes``: up to RUN_FILES consecutive files of at most
    RUN_FILE_BYTES each; a larger file is a run of its own."""
    runs, start = [], 0
    while start < len(sizes):
        end = start + 1
        if sizes[start] <= RUN_FILE_BYTES:
            while end < len(sizes) and end - start < RUN_FILES and sizes[end] <= RUN_FILE_BYTES:
                end += 1
        runs.append((start, end))
        start = end
    return runs


def _worker(claims, slot, results, root, plan_files, fsync, parent_pid, progress=True):
    try:
        signals.worker_setup(parent_pid)
        with atomic.umask_of_run(), torch_zip_reader.remembering(False):   # reads what planning remembered
            _worker_loop(claims, slot, results, root, plan_files, fsync, parent_pid, progress)
    except signals.Interrupted as e:   # the temporary file being written is gone already
        results.cancel_join_thread()
        os._exit(e.exit_code)


def _worker_loop(claims, slot, results, root, plan_files, fsync, parent_pid, progress):
    written = claims.written

    def told(nbytes):
        written[slot] += nbytes

    wrote = None
    while True:
        if os.getppid() != parent_pid:   # the main process is gone (no PDEATHSIG off Linux)
            raise signals.Interrupted(signal.SIGTERM)
        index = claims.claim(slot, wrote)
        wrote = None
        if index is None:
            results.put(("idle", slot, None))   # wakes the parent for the last files' harvest
            return
        started = time.perf_counter()
        try:
            n = write_file(plan_files[index], root, progress=told if progress else None, fsync=fsync)
            wrote = (index, n, time.perf_counter() - started)
        except signals.Interrupted:
            raise
        except BaseException as e:  # reported, never raised out of the worker
            results.put(("failed", index, FileResult(plan_files[index].path, False, 0,
                                                     time.perf_counter() - started, _describe(e))))


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
                            file=sys.stderr, disable=None, leave=True)

    @property
    def enabled(self) -> bool:
        return self.bar is not None

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# What writing one file costs beyond its bytes (open, pickle the object tree, rename, the manifest entry),
# in bytes copied in the same time: ~1.7 ms of user CPU per file at 4,096 ranks (2.5 ms before the C
# pickler), plus the filesystem's share of creating and renaming it: the time of copying ~1 - 4 MiB here.
# Without it, thousands of small files (pt_meta, param maps: weight ~0) all land on whichever machine is
# least loaded after the large ones.
FILE_OVERHEAD_BYTES = 1 << 20


def assign_files(plan: Plan, world_size: int) -> list[int]:
    """The machine (0 … world_size-1) that writes each file: a deterministic largest-first
    balance of the cost (bytes plus a fixed per-file overhead); copies of an output go with their
    original (they need it finished), so an original weighs its cost times one plus its number of
    copies. The least-loaded machine (lowest rank on a tie) comes from a heap: O(files x log
    machines), not files x machines."""
    owner = [0] * len(plan.files)
    index_of = {f.path: i for i, f in enumerate(plan.files)}
    copies = [0] * len(plan.files)
    for f in plan.files:
        if f.source_is_output:
            copies[index_of[f.source]] += 1
    weight = [0 if f.source_is_output else (f.nbytes + FILE_OVERHEAD_BYTES) * (1 + copies[i])
              for i, f in enumerate(plan.files)]
    machines = [(0, r) for r in range(world_size)]  # (load, rank): ascending, so already a heap
    for i in sorted((i for i, f in enumerate(plan.files) if not f.source_is_output), key=lambda i: (-weight[i], i)):
        load, r = heapq.heappop(machines)
        owner[i] = r
        heapq.heappush(machines, (load + weight[i], r))
    for i, f in enumerate(plan.files):
        if f.source_is_output:
            owner[i] = owner[index_of[f.source]]
    return owner


MANIFEST = "ckptmap_manifest.json"
DEFAULT_WAIT_TIMEOUT = coordinate.DEFAULT_WAIT_TIMEOUT


def run_plan(plan: Plan, *, processes: int = 1, multiprocess: bool = True, timeout: float | None = None,
             progress: bool = True, fsync: bool = False, world_size: int = 1, rank: int = 0,
             wait_timeout: float | None = DEFAULT_WAIT_TIMEOUT, overwrite: bool = False,
             notify=None) -> RunReport:
    """Write every file of ``plan`` — or, across ``world_size`` machines sharing the output folder,
    this ``rank``'s part of it; then rank 0 waits for every rank's report and writes
    ``ckptmap_manifest.json`` last. ``fsync`` makes each file durable before it is renamed into
    place (slower: it waits for the disk); without it a finished name still never holds a partial
    file, but a power loss may lose recent files.

    Nothing is written into an output folder that holds anything this run would replace (or, when the
    folder is the plan's own, anything at all) unless ``overwrite`` — see ``ckptmap.target``.
    ``wait_timeout``: seconds a rank waits for another that shows no sign of life (None: forever).
    ``notify(line)`` is told what was cleaned up or removed (default: print)."""
    if not 0 <= rank < world_size:
        raise CkptmapError(f"--rank {rank} is outside --world-size {world_size}; ranks are 0 … {world_size - 1}")
    notify = notify or print
    wait = float("inf") if wait_timeout is None else wait_timeout
    root = Path(plan.output_root)
    started = time.perf_counter()
    removed: list[str] = []
    if world_size == 1:
        _check_output(plan, root, overwrite, notify, removed)
        results: dict[int, FileResult] = {}
        _write_part(plan, root, list(range(len(plan.files))), results, processes, multiprocess, timeout,
                    progress, fsync)
        return RunReport([results[i] for i in sorted(results)], time.perf_counter() - started, removed)
    owner = assign_files(plan, world_size)
    mine = [i for i, r in enumerate(owner) if r == rank]
    if rank == 0:
        ordered = _run_rank0(plan, root, owner, mine, world_size, wait, overwrite, notify, removed,
                             (processes, multiprocess, timeout, progress, fsync))
    else:
        ordered = _run_rank_n(plan, root, mine, world_size, rank, wait, notify, removed,
                              (processes, multiprocess, timeout, progress, fsync))
    return RunReport(ordered, time.perf_counter() - started, removed)


def _remove_stale(root: Path, notify, removed: list[str]) -> None:
    for path in atomic.remove_stale_temps(root):
        notify(f"removed {path}: a temporary file of a ckptmap run that was killed")
        removed.append(str(path))


def _check_output(plan, root: Path, overwrite: bool, notify, removed: list[str], extra_paths=()) -> None:
    """Before the first byte: dead runs' temporary files go, then the target is checked."""
    _remove_stale(root, notify, removed)

    def tell(line):
        notify(line)
        if line.startswith("  removed "):
            removed.append(str(root / line[len("  removed "):].rstrip("/")))

    target.prepare(plan, overwrite, tell, extra_paths)


def _write_part(plan, root, indices, results, processes, multiprocess, timeout, progress, fsync) -> None:
    """Write the files ``indices`` of ``plan`` into ``results`` (filled as they finish, so that an
    interrupted caller knows what is complete)."""
    bar = _Progress(sum(plan.files[i].nbytes for i in indices), progress)
    # copies of outputs need their originals first
    phases = [[i for i in indices if not plan.files[i].source_is_output],
              [i for i in indices if plan.files[i].source_is_output]]
    try:
        with atomic.umask_of_run():   # one read of the umask for the run, not one per file
            for phase in phases:
                if not phase:
                    continue
                if multiprocess and processes > 1 and len(phase) > 1:
                    _run_pool(plan, phase, root, min(processes, len(phase)), timeout, bar, fsync, results)
                else:
                    for i in phase:
                        results[i] = _run_inline(plan.files[i], root, bar, fsync)
    finally:
        bar.close()


def _run_rank0(plan, root, owner, mine, world_size, wait, overwrite, notify, removed, run_args) -> list[FileResult]:
    """Rank 0: check the shared output folder once, before any rank writes; write its part; gather
    every rank's report and write the manifest of the whole output."""
    if root.exists() and not root.is_dir():
        raise CkptmapError(f"output {root} is a file, not a folder; choose a folder (new or empty)")
    co = coordinate.Rank0(root, plan, world_size)
    done_writing = False
    try:
        co.start(notify)
        try:
            _check_output(plan, root, overwrite, notify, removed, extra_paths=(MANIFEST,))
        except CkptmapError as e:
            co.refused(str(e))
            raise
        co.writing()
        results: dict[int, FileResult] = {}
        _write_part(plan, root, mine, results, *run_args)
        done_writing = True
        reports, missing, why = co.gather(wait)
        index_of = {f.path: i for i, f in enumerate(plan.files)}
        for r, report in reports.items():
            for item in report["results"]:
                result = FileResult(**item)
                results[index_of[result.path]] = result
        for i, r in enumerate(owner):
            if i in results:
                continue
            if r in reports:
                reason = f"rank {r} was interrupted ({reports[r]['interrupted']}) before it finished this file"
            else:
                reason = f"rank {r} did not report ({why.get(r, 'unknown')}); the file may be missing or incomplete"
            results[i] = FileResult(plan.files[i].path, False, 0, 0.0, reason)
        ordered = [results[i] for i in sorted(results)]
        manifest = {"kind": plan.kind, "info": plan.info, "world_size": world_size,
                    "complete": not missing and all(r.ok for r in ordered) and len(ordered) == len(plan.files),
                    "files": {r.path: {"ok": r.ok, "bytes": (root / r.path).stat().st_size if r.ok else None,
                                       "rank": owner[i], "error": r.error or None}
                              for i, r in sorted(results.items())}}
        if missing:
            manifest["missing_ranks"] = missing
        atomic.write_text(root / MANIFEST, json.dumps(manifest, indent=1))
        if missing:
            listed = ", ".join(map(str, missing))
            details = "; ".join(f"rank {r}: {why[r]}" for r in missing)
            raise CkptmapError(
                f"rank{'s' if len(missing) > 1 else ''} {listed} of {world_size} sent no report and showed no sign of "
                f"life for {wait:g} s (--wait-timeout) — {details}. Their files in {root} may be missing or "
                f"incomplete; {MANIFEST} says complete: false. Start the same command again on every rank with "
                f"--overwrite (rank 0 then replaces what is there)")
        return ordered
    except signals.Interrupted:
        if done_writing:
            notify("rank 0 interrupted while waiting for the other ranks: no manifest was written")
        raise
    finally:
        co.close()


def _run_rank_n(plan, root, mine, world_size, rank, wait, notify, removed, run_args) -> list[FileResult]:
    """Rank R > 0: write nothing until rank 0 has checked the folder and writes; then its part, and a
    report for rank 0 (also when interrupted, so rank 0 need not wait for it)."""
    co = coordinate.RankN(root, plan, world_size, rank)
    co.wait_for_rank0(wait)
    results: dict[int, FileResult] = {}
    try:
        _remove_stale(root, notify, removed)
        co.start_beating()
        _write_part(plan, root, mine, results, *run_args)
    except signals.Interrupted as e:
        co.report([attrs.asdict(results[i]) for i in sorted(results)], interrupted=e.name)
        co.close()
        raise
    except BaseException:
        co.close()
        raise
    ordered = [results[i] for i in sorted(results)]
    reported = co.report([attrs.asdict(r) for r in ordered])
    co.close()
    if not reported:
        raise CkptmapError(
            f"rank {rank} wrote its {len(ordered)} file(s) into {root}, but rank 0's run is gone (its marker in "
            f"{root / coordinate.RUN_DIR} is missing or belongs to another attempt), so no manifest will list "
            f"them; start the same command again on every rank with --overwrite")
    return ordered


def _run_inline(task: FileTask, root: Path, bar: _Progress, fsync: bool) -> FileResult:
    t0 = time.perf_counter()
    try:
        n = write_file(task, root, progress=bar.update, fsync=fsync)
        return FileResult(task.path, True, n, time.perf_counter() - t0)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return FileResult(task.path, False, 0, time.perf_counter() - t0, _describe(e))


def _run_pool(plan: Plan, phase: list[int], root: Path, n: int, timeout, bar: _Progress, fsync: bool,
              done: dict) -> dict:
    ctx = mp.get_context("fork")
    results_q = ctx.Queue()
    size_of = {i: _claim_size(plan.files[i], root) for i in phase}
    order = _claim_order(size_of)
    claims = _Claims(ctx, order, n, _runs([size_of[i] for i in order]))
    parent = os.getpid()

    def spawn(slot):
        p = ctx.Process(target=_worker, args=(claims, slot, results_q, root, plan.files, fsync, parent, bar.enabled),
                        daemon=True)
        with signals.held():
            p.start()
        return p

    def fail(index, seconds, reason):
        done[index] = FileResult(plan.files[index].path, False, 0, seconds, reason)
        remaining.discard(index)

    workers: dict[int, mp.Process] = {}   # slot -> worker
    remaining = set(phase)
    shown = 0   # bytes the bar shows

    def collect():
        nonlocal shown
        for index, nbytes, seconds in claims.harvest():
            done[index] = FileResult(plan.files[index].path, True, nbytes, seconds)
            remaining.discard(index)
        written = sum(claims.written)
        bar.update(written - shown)
        shown = written

    def take(message):
        kind, index, payload = message
        if kind == "failed":
            done[index] = payload
            remaining.discard(index)

    finished = False
    try:
        for slot in range(n):
            workers[slot] = spawn(slot)
        checked = time.monotonic()
        while remaining:
            try:   # a failure or a worker out of files wakes the parent; else it looks in every 20 ms
                take(results_q.get(timeout=0.02))
            except queue.Empty:
                pass
            collect()
            now = time.monotonic()
            if now - checked < 0.2 or not remaining:
                continue
            checked = now
            for slot, proc in list(workers.items()):   # timeouts and deaths, from the claims' slots
                index = claims.current[slot]
                busy = index >= 0 and index in remaining
                timed_out = busy and timeout is not None and now - claims.since[slot] > timeout
                if proc.is_alive() and not timed_out:
                    continue
                if proc.is_alive():
                    proc.kill()
                proc.join()
                del workers[slot]
                if busy:
                    atomic.remove_stale_temps((root / plan.files[index].path).parent, recursive=False)
                    fail(index, now - claims.since[slot],
                         f"timed out after {timeout:g} s (--process_timeout); raise the limit or use more processes"
                         if timed_out else f"worker process died (exit code {proc.exitcode})")
                if claims.unclaimed:
                    workers[slot] = spawn(slot)
            if not workers and remaining:   # every file handed out, every worker gone: read what they reported
                try:
                    while True:
                        collect()
                        if not remaining:
                            break
                        take(results_q.get(timeout=1.0))
                except queue.Empty:
                    collect()
                    for index in sorted(remaining):
                        fail(index, 0.0, "the worker writing it ended without reporting it")
        finished = True
    finally:
        if finished:
            for p in workers.values():   # they exit once every file is handed out
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
        else:   # interrupted (or failed): stop the workers, which remove their temporary files
            _stop(workers.values())
            for d in sorted({(root / plan.files[i].path).parent for i in phase}):
                atomic.remove_stale_temps(d, recursive=False)   # of workers that had to be killed
    return done


def _stop(procs, grace: float = 10.0) -> None:
    procs = [p for p in procs if p.is_alive()]
    for p in procs:
        try:
            p.terminate()       # SIGTERM: the worker unwinds, removing its temporary file, and exits
        except OSError:
            pass
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
