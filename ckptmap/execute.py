"""Run a Plan: stream every output file to a temporary name, rename it into place when complete.

Workers are long-lived forked processes pulling file tasks from a queue; each holds one output
tensor in memory at a time (source tensors are zero-copy views of mmap'd files). A task that
exceeds ``timeout`` seconds has its worker killed and replaced, and is reported as failed.
Copies of finished outputs (extra DP/CP ranks) run after their originals.
"""

from __future__ import annotations

import heapq
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
import traceback
from pathlib import Path

import attrs
import numpy as np

from ckptmap import atomic, dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import pt_meta, registry
from ckptmap.mapping import ops as tensor_ops
from ckptmap.mapping.plan import FileTask, Plan, TensorTask



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

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if not r.ok]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.results if r.ok)


class _Sources:
    """Source files opened lazily and kept open for the life of one worker task."""

    def __init__(self):
        self._open = {}

    def reader(self, path):
        reader = self._open.get(path)
        if reader is None:
            reader = self._open[path] = registry.open_reader(path)
        return reader

    def slice(self, s) -> np.ndarray:
        """The elements of a SourceSlice (flat when it is a range, else in the tensor's shape)."""
        reader = self.reader(s.file)
        spec = reader.spec(s.key)
        if tuple(spec.shape) != tuple(s.shape) or spec.dtype != s.dtype:
            raise CkptmapError(
                f"{s.file}: tensor {s.key} is {spec.dtype} {list(spec.shape)} but the plan expects {s.dtype} "
                f"{list(s.shape)}; the source changed since the plan was made — re-create the plan")
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
        first = task.sources[0]
        if len(parts) == 1 and first.start == 0 and first.numel is None:
            out = parts[0]  # whole tensor: stay a zero-copy view
            return out if tuple(out.shape) == tuple(task.src_shape) else out.reshape(task.src_shape)
        return np.concatenate([p.reshape(-1) for p in parts]).reshape(task.src_shape)

    def _assemble(self, task: TensorTask) -> np.ndarray:
        out = np.zeros(task.src_shape, dtype=dtypes.storage(task.src_dtype))
        for r in task.reads:
            src = self.slice(r.source).reshape(r.view)
            box = src[tuple(slice(o, o + n) for o, n in zip(r.offsets, r.lengths))]
            lengths = r.dst_lengths or r.lengths
            out[tuple(slice(o, o + n) for o, n in zip(r.dst_offsets, lengths))] = box
        if task.replicas:
            self._check_replicas(task, self.slice(task.reads[0].source))
        return out

    def _check_replicas(self, task: TensorTask, first: np.ndarray) -> None:
        """A replicated tensor is read from one rank; every other rank's copy must be the same bytes."""
        want = np.ascontiguousarray(first).reshape(-1).view(np.uint8)
        for other in task.replicas:
            got = np.ascontiguousarray(self.slice(other)).reshape(-1).view(np.uint8)
            if got.shape != want.shape or not np.array_equal(got, want):
                differing = int(np.count_nonzero(got != want)) if got.shape == want.shape else "all"
                raise CkptmapError(
                    f"{task.name}: the tensor is replicated across tensor-parallel ranks, but {other.file} ({other.key}) "
                    f"differs from the copy used ({task.reads[0].source.file if task.reads else task.sources[0].file}): "
                    f"{differing} bytes differ; the source ranks disagree — check the checkpoint (one rank may be "
                    f"stale or corrupt) before resharding it")

    def raw(self, s) -> np.ndarray:
        return self.reader(s.file).array(s.key)

    def close(self):
        for r in self._open.values():
            r.close()
        self._open.clear()


def expected_array(task: TensorTask, sources: _Sources) -> np.ndarray:
    """The value a TensorTask describes, as an array of ``task.dtype``'s storage type: its sources
    through its ops, or its constant."""
    if not task.sources:
        return np.array(task.value, dtype=dtypes.storage(task.dtype)).reshape(task.shape)
    value = tensor_ops.apply_all(task.ops, sources.array(task))
    if tuple(value.shape) != tuple(task.shape) or value.dtype != dtypes.storage(task.dtype):
        raise CkptmapError(f"internal error: {task.name} came out {value.dtype} {list(value.shape)}, "
                           f"plan says {task.dtype} {list(task.shape)}")
    return value


def _storage_bytes(storages, sources: "_Sources", progress):
    """fill(key) for a streamed torch file: each storage's pieces in order, as raw bytes."""
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
                value = expected_array(t, sources)
                yield np.ascontiguousarray(value).reshape(-1).view(np.uint8)
                if progress:
                    progress(t.nbytes)
            else:
                yield sources.raw(piece.padding)
    return fill


def write_file(task: FileTask, root: Path, progress=None, fsync: bool = False) -> int:
    """Write one FileTask atomically; returns the bytes of tensor data written."""
    final = root / task.path
    final.parent.mkdir(parents=True, exist_ok=True)
    if task.format == "torch_stream":
        sources = _Sources()
        try:
            pt_meta.write_from_skeleton(task.source, task.extra["skeleton"], task.extra.get("set", []), final,
                                        _storage_bytes(task.storages, sources, progress), fsync=fsync)
        finally:
            sources.close()
        return task.nbytes
    if task.format == "torch_meta":
        pt_meta.write_pt_meta(task.source, task.aux_source, task.keys, task.extra, final, fsync=fsync)
        return 0
    written = 0
    with atomic.atomic_output(final, fsync=fsync) as tmp:
        if task.format in registry.TENSOR_FORMATS:
            entries = [(t.name, t.dtype, t.shape) for t in task.tensors]
            sources = _Sources()
            try:
                with registry.open_writer(task.format, tmp, entries, task.metadata, crc=task.crc) as writer:
                    for t in task.tensors:
                        writer.write(t.name, expected_array(t, sources), t.dtype)
                        written += t.nbytes
                        if progress:
                            progress(t.nbytes)
            finally:
                sources.close()
        elif task.format == "copy":
            source = root / task.source if task.source_is_output else Path(task.source)
            shutil.copyfile(source, tmp)
        elif task.format == "text":
            tmp.write_text(task.text)
        else:
            raise CkptmapError(f"plan has a file of unknown format {task.format!r} ({task.path})")
    return written


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CkptmapError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _worker(tasks, results, root, plan_files, fsync):
    while True:
        item = tasks.get()
        if item is None:
            return
        index = item
        results.put(("start", index, os.getpid()))
        started = time.perf_counter()
        try:
            n = write_file(plan_files[index], root, progress=lambda b: results.put(("bytes", index, b)),
                           fsync=fsync)
            results.put(("done", index, FileResult(plan_files[index].path, True, n, time.perf_counter() - started)))
        except BaseException as e:  # reported, never raised out of the worker
            results.put(("done", index, FileResult(plan_files[index].path, False, 0,
                                                   time.perf_counter() - started, _describe(e))))


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
                            file=sys.stderr, disable=None, leave=True)

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def assign_files(plan: Plan, world_size: int) -> list[int]:
    """The machine (0 … world_size-1) that writes each file: a deterministic largest-first
    balance of the bytes; copies of an output go with their original (they need it finished),
    so an original weighs its bytes times one plus its number of copies. The least-loaded machine
    (lowest rank on a tie) comes from a heap: O(files x log machines), not files x machines."""
    owner = [0] * len(plan.files)
    index_of = {f.path: i for i, f in enumerate(plan.files)}
    copies = [0] * len(plan.files)
    for f in plan.files:
        if f.source_is_output:
            copies[index_of[f.source]] += 1
    weight = [0 if f.source_is_output else (f.nbytes + 1) * (1 + copies[i]) for i, f in enumerate(plan.files)]
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
_DONE_DIR = ".ckptmap-done"


def run_plan(plan: Plan, *, processes: int = 1, multiprocess: bool = True, timeout: float | None = None,
             progress: bool = True, fsync: bool = False, world_size: int = 1, rank: int = 0,
             wait_timeout: float | None = None) -> RunReport:
    """Write every file of ``plan`` — or, across ``world_size`` machines sharing the output folder,
    this ``rank``'s part of it; then rank 0 waits for every rank's report and writes
    ``ckptmap_manifest.json`` last. ``fsync`` makes each file durable before it is renamed into
    place (slower: it waits for the disk); without it a finished name still never holds a partial
    file, but a power loss may lose recent files."""
    if not 0 <= rank < world_size:
        raise CkptmapError(f"--rank {rank} is outside --world-size {world_size}; ranks are 0 … {world_size - 1}")
    root = Path(plan.output_root)
    started = time.perf_counter()
    mine = [i for i, r in enumerate(assign_files(plan, world_size)) if r == rank]
    bar = _Progress(sum(plan.files[i].nbytes for i in mine), progress)
    # copies of outputs need their originals first
    phases = [[i for i in mine if not plan.files[i].source_is_output],
              [i for i in mine if plan.files[i].source_is_output]]
    results: dict[int, FileResult] = {}
    try:
        for phase in phases:
            if not phase:
                continue
            if multiprocess and processes > 1 and len(phase) > 1:
                results.update(_run_pool(plan, phase, root, min(processes, len(phase)), timeout, bar, fsync))
            else:
                for i in phase:
                    results[i] = _run_inline(plan.files[i], root, bar, fsync)
    finally:
        bar.close()
    ordered = [results[i] for i in sorted(results)]
    if world_size > 1:
        ordered = _finish_distributed(plan, root, ordered, world_size, rank, wait_timeout)
    return RunReport(ordered, time.perf_counter() - started)


def _finish_distributed(plan, root: Path, mine: list[FileResult], world_size: int, rank: int,
                        wait_timeout) -> list[FileResult]:
    """Each rank reports its files in ``.ckptmap-done/``; rank 0 gathers the reports, writes the
    manifest of the whole output, and returns every rank's results (so its exit code covers all)."""
    done = root / _DONE_DIR
    done.mkdir(parents=True, exist_ok=True)
    report = done / f"rank{rank}-of-{world_size}.json"
    atomic.write_text(report, json.dumps([attrs.asdict(r) for r in mine]))
    if rank != 0:
        return mine
    deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
    reports = [done / f"rank{r}-of-{world_size}.json" for r in range(world_size)]
    pending = list(range(world_size))  # each poll looks only at the ranks not yet reported
    while True:
        pending = [r for r in pending if not reports[r].is_file()]
        if not pending:
            break
        if deadline is not None and time.monotonic() > deadline:
            missing = [str(r) for r in pending]
            raise CkptmapError(f"rank 0 waited {wait_timeout:g} s for ranks {', '.join(missing)} of {world_size} to "
                               f"finish writing {root}; their files may be incomplete — rerun those ranks "
                               f"(same plan, --rank R) and then rank 0")
        time.sleep(0.5)
    results = [FileResult(**r) for p in reports for r in json.loads(p.read_text())]
    manifest = {"kind": plan.kind, "info": plan.info, "world_size": world_size,
                "complete": all(r.ok for r in results) and len(results) == len(plan.files),
                "files": {r.path: {"ok": r.ok, "bytes": (root / r.path).stat().st_size if r.ok else None,
                                   "error": r.error or None} for r in results}}
    atomic.write_text(root / MANIFEST, json.dumps(manifest, indent=1))
    shutil.rmtree(done, ignore_errors=True)
    return results


def _run_inline(task: FileTask, root: Path, bar: _Progress, fsync: bool) -> FileResult:
    t0 = time.perf_counter()
    try:
        n = write_file(task, root, progress=bar.update, fsync=fsync)
        return FileResult(task.path, True, n, time.perf_counter() - t0)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return FileResult(task.path, False, 0, time.perf_counter() - t0, _describe(e))


def _run_pool(plan: Plan, phase: list[int], root: Path, n: int, timeout, bar: _Progress, fsync: bool) -> dict:
    ctx = mp.get_context("fork")
    tasks, results_q = ctx.Queue(), ctx.Queue()
    for i in phase:
        tasks.put(i)

    def spawn():
        p = ctx.Process(target=_worker, args=(tasks, results_q, root, plan.files, fsync), daemon=True)
        p.start()
        return p

    workers = {}
    for _ in range(n):
        p = spawn()
        workers[p.pid] = p
    running: dict[int, tuple[int, float]] = {}  # task -> (pid, start time)
    done: dict[int, FileResult] = {}
    try:
        while len(done) < len(phase):
            try:
                kind, index, payload = results_q.get(timeout=0.2)
            except queue.Empty:
                kind = None
            if kind == "start":
                running[index] = (payload, time.monotonic())
            elif kind == "bytes":
                bar.update(payload)
            elif kind == "done":
                running.pop(index, None)
                done[index] = payload
            now = time.monotonic()
            for index, (pid, t0) in list(running.items()):
                proc = workers.get(pid)
                timed_out = timeout is not None and now - t0 > timeout
                died = proc is not None and not proc.is_alive()
                if timed_out or died:
                    if proc is not None and proc.is_alive():
                        proc.kill()
                        proc.join()
                    workers.pop(pid, None)
                    running.pop(index)
                    atomic.remove_stale_temps((root / plan.files[index].path).parent)  # the killed worker's
                    reason = (f"timed out after {timeout:g} s (--process_timeout); raise the limit or use "
                              f"more processes" if timed_out else f"worker process died (exit code {proc.exitcode})")
                    done[index] = FileResult(plan.files[index].path, False, 0, now - t0, reason)
                    if len(done) + len(running) < len(phase):
                        p = spawn()
                        workers[p.pid] = p
    finally:
        for _ in workers:
            tasks.put(None)
        for p in workers.values():
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return done
