"""Planning and multi-machine runs scale linearly with the rank count (project issue 16).

Shown by operation counts, not by timing: the Python lines executed inside ckptmap's planning
modules while a plan is compiled. Quadrupling the mp_rank folders (and the MindSpore ranks) must
quadruple that count, not multiply it by 16 -- per-rank scans over every rank, or over every
rank's param_map files, showed up as exactly that. Also: the streamed plan JSON is the same text
as before, and a 64-machine run splits the files and finishes with one manifest.
"""

from __future__ import annotations

import io
import json
import sys

import attrs
import pytest

from ckptmap import execute
from ckptmap.demo import DemoModel, build_megatron_checkpoint
from ckptmap.mapping import compiler, layout, megatron_source, ms2pt, plan as plan_module
from ckptmap.mapping.compiler import Pt2MsOptions, compile_pt2ms
from ckptmap.mapping.ms2pt import Ms2PtOptions, compile_ms2pt
from ckptmap.mapping.plan import FileTask, Plan, TensorTask
from ckptmap.cli import main
from conftest import fixture_dir

PLANNING = (compiler, megatron_source, ms2pt, layout)


def tiny(pp: int, dp: int) -> DemoModel:
    return DemoModel(tp=2, pp=pp, dp=dp, layers=pp, hidden=16, heads=4, groups=4, kv=4, ffn=16, vocab=64)


def traced_lines(fn, modules) -> tuple[int, object]:
    """(Python lines executed inside the source files of `modules` while fn() runs, its result)."""
    targets = {m.__file__ for m in modules}
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename in targets else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        result = fn()
    finally:
        sys.settrace(previous)
    return count, result


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """TP 2 x PP 4 and TP 2 x PP 16 (8 and 32 mp_rank folders), saved with DP 8; each converted
    once, so that its pt_meta folder holds 8 param_map files per mp_rank."""
    out = {}
    for pp in (4, 16):
        root = tmp_path_factory.mktemp(f"pp{pp}")
        build_megatron_checkpoint(root / "megatron", tiny(pp, 8), iteration=5, keep_truth=False)
        plan = compile_pt2ms(Pt2MsOptions(str(root / "megatron"), str(root / "ms")))
        assert not execute.run_plan(plan, processes=2, progress=False).failed
        out[pp] = root
    return out


def assert_linear(counts: dict, what: str):
    """counts: {pp: lines} for PP 4 and 16 (4x the ranks). Work linear in the ranks, a + b*ranks
    with a >= 0, grows at most 4x (less, as the per-plan part a and the first/last stages' extra
    tensors weigh less); any work per pair of ranks pushes it above 4 (the code before issue 16:
    x4.1 for ms2pt's param_map scan, x7 to x10 for pt2ms)."""
    ratio = counts[16] / counts[4]
    assert 2.5 <= ratio <= 4.0, f"{what}: {counts} (x{ratio:.2f} for 4x the ranks)"


def test_pt2ms_planning_is_linear_in_ranks(checkpoints):
    """Plans with every DP rank written (--generate-all-dp-cp: 64 / 256 MindSpore ranks), with the
    bucket layouts derived, and with the 8-per-mp_rank param_map files given explicitly."""
    for label, extra in [("all dp ranks", dict(generate_all_dp_cp=True)),
                         ("derived layouts", {}),
                         ("explicit param maps", dict(param_map_path="PT_META"))]:
        counts = {}
        for pp, root in checkpoints.items():
            if extra.get("param_map_path"):
                extra = dict(extra, param_map_path=str(root / "ms" / "pt_meta"))
            opt = Pt2MsOptions(str(root / "megatron"), str(root / "out"), **extra)
            counts[pp], plan = traced_lines(lambda: compile_pt2ms(opt), PLANNING)
            ms_ranks = 2 * pp * (8 if opt.generate_all_dp_cp else 1)
            assert sum(f.path.endswith("network.ckpt") for f in plan.files) == ms_ranks
        assert_linear(counts, f"compile_pt2ms ({label})")


def test_ms2pt_planning_is_linear_in_ranks(checkpoints):
    counts = {}
    for pp, root in checkpoints.items():
        opt = Ms2PtOptions(str(root / "ms"), str(root / "back"))
        counts[pp], plan = traced_lines(lambda: compile_ms2pt(opt), PLANNING)
        assert sum(f.path.endswith("distrib_optim.pt") for f in plan.files) == 2 * pp
    assert_linear(counts, "compile_ms2pt")


def test_assign_files_does_not_scan_every_machine_per_file(checkpoints):
    """Splitting a plan between 4 or 512 machines costs the same number of steps per file."""
    plan = compile_pt2ms(Pt2MsOptions(str(checkpoints[16] / "megatron"), "/nowhere", generate_all_dp_cp=True))
    counts = {w: traced_lines(lambda: execute.assign_files(plan, w), [execute])[0] for w in (4, 512)}
    assert counts[512] <= 1.1 * counts[4], counts


def test_assign_files_balances_bytes_and_keeps_copies_with_their_original():
    def sized(name, n):  # a file of n float32 constants: 4n bytes
        return FileTask(name, "ckpt", (TensorTask("t", "float32", (n,), value=0.0),))

    plan = Plan("t", "/o", tuple(sized(f"f{i}", n) for i, n in enumerate([5, 3, 3, 2, 2, 1, 1, 1])))
    # largest first, each to the least-loaded machine (lowest rank on a tie); a file weighs its bytes plus
    # FILE_OVERHEAD_BYTES, so these tiny files spread by count (3, 3, 2; bytes 24, 20, 20)
    assert execute.assign_files(plan, 3) == [0, 1, 2, 1, 2, 0, 1, 2]
    files = [sized("a", 2), sized("b", 4), FileTask("a2", "copy", source="a", source_is_output=True),
             FileTask("a3", "copy", source="a", source_is_output=True), sized("c", 3)]
    # "a" is written three times (two copies follow it): it weighs 3 x (8 + overhead) and goes first
    assert execute.assign_files(Plan("t", "/o", tuple(files)), 2) == [0, 1, 0, 0, 1]


def test_assign_files_spreads_small_files_after_unequal_large_ones():
    """Thousands of tiny files (pt_meta, param maps) after large files of unequal size: each file costs
    more than its bytes (FILE_OVERHEAD_BYTES), so they spread over the machines instead of all going to
    the one the large files left least loaded (bench/bench_multi.py measured 298 / 43 / 43 files before)."""
    mib = 1 << 18   # float32 elements in one MiB
    big = [FileTask(f"big{i}", "ckpt", (TensorTask("t", "float32", (n * mib,), value=0.0),))
           for i, n in enumerate([3, 2])]
    tiny = [FileTask(f"t{i}.json", "text", text="{}") for i in range(40)]
    owner = execute.assign_files(Plan("t", "/o", tuple(big + tiny)), 2)
    assert owner[:2] == [0, 1]
    counts = [owner[2:].count(r) for r in (0, 1)]
    assert abs(counts[0] - counts[1]) <= 2 and sum(counts) == 40, counts


def test_written_plan_json_is_streamed_and_unchanged(checkpoints):
    """write_json writes the plan record by record; the text is json.dumps of the whole plan (also where
    ranks share one tensors tuple, whose text is made once)."""
    root = checkpoints[4]
    plans = [compile_pt2ms(Pt2MsOptions(str(root / "megatron"), str(root / "out"), generate_all_dp_cp=True)),
             compile_ms2pt(Ms2PtOptions(str(root / "ms"), str(root / "back"))),
             Plan("pt2ms", "/o", (), {"note": "no files"})]
    with_tensors = [f for f in plans[0].files if f.tensors]
    assert len({id(f.tensors) for f in with_tensors}) < len(with_tensors)   # shared tuples: written once each
    for p in plans:
        writes = []

        class Stream(io.StringIO):
            def write(self, text):
                writes.append(len(text))
                return super().write(text)

        stream = Stream()
        p.write_json(stream)
        assert stream.getvalue() == json.dumps(attrs.asdict(p, recurse=True), indent=1) == p.to_json()
        assert Plan.from_json(stream.getvalue()) == p
        if p.files:
            largest = max(len(plan_module._nested_json(attrs.asdict(f, recurse=True), 2)) for f in p.files)
            assert len(writes) > len(p.files) and max(writes) <= largest + 4


def test_many_machines_finish_with_one_manifest(tmp_path):
    """64 machines (run one after the other, rank 0 last) share 300 files; each writes its own
    part, rank 0 gathers every report and writes the manifest of all 300."""
    files = tuple(FileTask(f"d{i % 7}/f{i}.txt", "text", text=str(i) * (1 + i % 5)) for i in range(300))
    plan = Plan("text", str(tmp_path / "out"), files)
    owner = execute.assign_files(plan, 64)
    assert set(owner) == set(range(64))
    assert max(owner.count(r) for r in range(64)) - min(owner.count(r) for r in range(64)) <= 1
    import threading

    reports = {}

    def machine(rank):
        reports[rank] = execute.run_plan(plan, multiprocess=False, progress=False, world_size=64, rank=rank,
                                         wait_timeout=60)
    threads = [threading.Thread(target=machine, args=(r,)) for r in range(64)]  # all at once, as a cluster runs
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for rank in range(64):
        assert not reports[rank].failed
        assert len(reports[rank].results) == (300 if rank == 0 else owner.count(rank))
    manifest = json.loads((tmp_path / "out" / execute.MANIFEST).read_text())
    assert manifest["complete"] and manifest["world_size"] == 64 and len(manifest["files"]) == 300
    # which machine wrote each file (to find the one to look at when a file is bad)
    assert [manifest["files"][f.path]["rank"] for f in files] == owner
    assert not (tmp_path / "out" / ".ckptmap-done").exists()
    for i, f in enumerate(files):
        assert (tmp_path / "out" / f.path).read_text() == f.text


def test_planning_parses_each_source_file_once(monkeypatch, capsys, tmp_path):
    """Planning reads each rank's object trees once: the main-param spot check reads its few elements
    at the byte ranges the first read kept, instead of parsing all files again (issue 16: at 4,096
    ranks that second parse was half of a dry run)."""
    from ckptmap.formats import torch_zip_reader as tzr

    opened = []
    original = tzr.TorchZipFile.__init__

    def counting(self, path):
        opened.append(str(path))
        original(self, path)

    monkeypatch.setattr(tzr.TorchZipFile, "__init__", counting)
    src = fixture_dir("legacy_tp2pp2dp2")
    assert main(["plan", "pt2ms", "--megatron-path", str(src), "--ms-path", str(tmp_path / "out"), "--dry-run"]) == 0
    sources = sorted(str(p) for p in src.glob("iter_*/mp_rank_*/*.pt"))
    assert len(sources) == 8 and sorted(set(opened)) == sources
    # one extra read of the first rank's model file (its args) at most; no file is parsed per check
    assert len(opened) <= len(sources) + 1, sorted(opened)


def test_main_param_spot_check_is_one_cast_per_rank(monkeypatch, tmp_path):
    """The planner's spot check of the fp32 main params casts once per batch of ranks (all of their
    parameters' first and last elements together), not once per parameter (issue 16: 41,000 casts at
    4,096 ranks) nor once per rank (16,384 at 16,384 ranks); and a main param whose first element does
    not round to its weight is still named, with its file and tensor, by the per-task check the batch
    falls back to."""
    import shutil
    from pathlib import Path

    import numpy as np

    from ckptmap.errors import CkptmapError
    from ckptmap.formats.megatron_files import OptimFile
    from ckptmap.mapping import ops

    casts = []
    original = ops.cast

    def counting(array, src, dst):
        casts.append(np.size(array))
        return original(array, src, dst)

    monkeypatch.setattr(ops, "cast", counting)
    src = fixture_dir("legacy_tp2pp2dp2")
    plan = compile_pt2ms(Pt2MsOptions(str(src), str(tmp_path / "out")))
    checked = [(f, t) for f in plan.files for t in f.tensors if t.rounds_to is not None]
    ranks = len(list(src.glob("iter_*/mp_rank_*")))
    assert len(checked) > 2 * ranks and len(casts) == 1, (len(checked), casts)   # 4 ranks: one batch
    # the first and the last 64 elements of each (once, if it has at most 64)
    assert casts[0] == sum(min(64, n) + (n > 64) * min(64, n - 64) for n in (t.sources[0].count for _, t in checked))

    # the first element of one main param changed: the batch sees a mismatch, the per-task check names it
    copy = tmp_path / "megatron"
    shutil.copytree(src, copy)
    file_task, task = next((f, t) for f, t in checked if t.sources[0].start == 0)
    rel = Path(file_task.source_path(task.sources[0].file)).relative_to(src)
    optim = OptimFile(copy / rel)
    where = optim.byte_range(task.sources[0].key)
    optim.close()
    data = bytearray((copy / rel).read_bytes())
    value = np.frombuffer(bytes(data[where.offset:where.offset + 4]), dtype=np.float32)[0]
    data[where.offset:where.offset + 4] = np.float32(value * 3 + 1).tobytes()
    (copy / rel).write_bytes(bytes(data))
    with pytest.raises(CkptmapError) as err:
        compile_pt2ms(Pt2MsOptions(str(copy), str(tmp_path / "out2")))
    text = str(err.value)
    assert task.name in text and str(copy / rel) in text and task.sources[0].key in text
    assert "does not round to the model weight" in text and task.rounds_to.key in text


@pytest.mark.parametrize("batched", [False, True])
def test_executor_names_the_rank_file_of_a_shared_task(tmp_path, monkeypatch, batched):
    """Ranks of one structure share their tasks, which name the files as @-inputs; a main param that
    does not round to its weight in the middle (past the plan's spot check of the first and last 64
    elements) is found by the executor's check of every element, naming the rank's real file — checked
    alone, or (a small parameter) with the file's other small ones in one pass, then alone to name it."""
    import shutil
    from pathlib import Path

    import numpy as np

    from ckptmap import execute
    from ckptmap.formats import byte_io
    from ckptmap.formats.megatron_files import OptimFile

    src = fixture_dir("legacy_tp2pp2dp2")
    plan = compile_pt2ms(Pt2MsOptions(str(src), str(tmp_path / "plan")))
    f, task = max(((f, t) for f in plan.files for t in f.tensors if t.rounds_to is not None),
                  key=lambda ft: ft[1].sources[0].count)
    if batched:
        assert task.sources[0].count * 4 <= byte_io.SMALL_RUN and sum(t.rounds_to is not None for t in f.tensors) > 1
    else:
        monkeypatch.setattr(byte_io, "SMALL_RUN", 0)
    assert task.sources[0].file.startswith("@") and task.sources[0].count > 1000
    rel = Path(f.source_path(task.sources[0].file)).relative_to(src)
    copy = tmp_path / "megatron"
    shutil.copytree(src, copy)
    optim = OptimFile(copy / rel)
    where = optim.byte_range(task.sources[0].key)
    optim.close()
    at = where.offset + (task.sources[0].start + task.sources[0].count // 2) * 4
    data = bytearray((copy / rel).read_bytes())
    data[at:at + 4] = np.float32(np.frombuffer(bytes(data[at:at + 4]), np.float32)[0] * 3 + 1).tobytes()
    (copy / rel).write_bytes(bytes(data))
    plan = compile_pt2ms(Pt2MsOptions(str(copy), str(tmp_path / "out")))   # the spot check does not see it
    report = execute.run_plan(plan, processes=1, multiprocess=False, progress=False)
    failed = {r.path: r.error for r in report.failed}
    assert list(failed) == [f.path], list(failed)
    assert str(copy / rel) in failed[f.path] and task.name in failed[f.path]
    assert "does not round to the model weight" in failed[f.path] and "@model" not in failed[f.path] \
        and "@optim" not in failed[f.path] and "@dense" not in failed[f.path]
    assert not (tmp_path / "out" / f.path).exists()


def test_run_report_of_many_files_is_one_line_per_folder_pattern():
    """A 4,096-rank run writes 12,288 files: the report groups them by folder pattern (numbers as N), names the
    failed file in full, and --full restores the per-file listing."""
    import io

    from ckptmap.cli.printing import print_report
    from ckptmap.execute import FileResult, RunReport

    results = [FileResult(f"rank_{r}/network.ckpt", True, 1000, 0.01) for r in range(200)]
    results += [FileResult(f"pt_meta/args_tp{t:02d}_pp{p:03d}.pt", True, 10, 0.001) for t in range(2) for p in range(50)]
    results[7] = FileResult("rank_7/network.ckpt", False, 0, 0.5, "disk full")
    out = io.StringIO()
    print_report(RunReport(results, 3.0), out)
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].split() == ["rank_N/", "200", "folders", "200", "files", "194.3", "KiB", "1", "FAILED"]
    assert lines[1].split() == ["pt_meta/", "1", "folder", "100", "files", "1000", "B", "ok"]
    assert "slowest: rank_7/network.ckpt 0.50 s" in lines[2]
    assert "FAILED rank_7/network.ckpt:\n  disk full" in text
    assert "299 of 300 files written successfully" in text
    full = io.StringIO()
    print_report(RunReport(results, 3.0), full, full=True)
    assert len([line for line in full.getvalue().splitlines() if line.endswith((" ok", "FAILED"))]) == 300


def test_planning_memory_does_not_grow_with_each_ranks_rng_state(checkpoints, monkeypatch):
    """Each rank's model file has its own pickle (its args name its rank; each stage has its own RNG
    states: ~30 KB of objects a rank in Megatron's files). Planning keeps of a rank only what it reads
    again: what it holds once the plan is made (the plan included) grows with the ranks far less than
    their RNG states would, and the plan is the one planning with every rank's whole tree makes."""
    import gc
    import tracemalloc

    from ckptmap.formats import megatron_files
    from ckptmap.mapping import compiler

    held, plans, sources = {}, {}, []
    real = compiler.MegatronSource
    monkeypatch.setattr(compiler, "MegatronSource", lambda *a: sources.append(real(*a)) or sources[-1])
    for pp in (4, 16):
        gc.collect()
        tracemalloc.start()
        try:
            plans[pp] = compile_pt2ms(Pt2MsOptions(str(checkpoints[pp] / "megatron"), str(checkpoints[pp] / "x")))
            gc.collect()
            held[pp] = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        rng = [rank.model.root.get("rng_state") for key, rank in sorted(sources[-1].ranks.items())]
        assert rng[0] is not None and all(r is None for r in rng[1:])
        sources.clear()
    per_rank = (held[16] - held[4]) / (2 * 16 - 2 * 4)
    assert per_rank < 30_000, held   # a rank's RNG states alone are ~30 KB of objects
    monkeypatch.setattr(megatron_files.ModelFile, "slim", lambda self, keep_args=(): None)
    whole = compile_pt2ms(Pt2MsOptions(str(checkpoints[4] / "megatron"), str(checkpoints[4] / "x")))
    assert all(rank.model.root.get("rng_state") is not None for rank in sources[-1].ranks.values())
    assert whole.to_json() == plans[4].to_json()


def test_a_tree_is_freed_when_dropped_not_at_the_next_garbage_collection(checkpoints):
    """The unpickler refers to itself; its memo (every object of the tree) and its input (the pickle's
    bytes) must not live on with it until the cycle collector runs: reading a rank file 100 times with
    the collector off holds about what reading it once does, not 100 trees."""
    import gc
    import tracemalloc

    from ckptmap.formats import torch_zip_reader

    path = next((checkpoints[4] / "megatron").rglob("model_optim_rng.pt"))
    torch_zip_reader.read_objects(path)   # imports, caches
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tree = torch_zip_reader.read_objects(path)
        one_tree = tracemalloc.get_traced_memory()[0] - base
        del tree
        for _ in range(100):
            torch_zip_reader.read_objects(path)
        after = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        gc.enable()
    assert one_tree > 20_000 and after < 10 * one_tree, (one_tree, after)
