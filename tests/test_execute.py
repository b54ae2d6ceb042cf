"""The executor: plan JSON round trip, dry-run output, worker pool, failures, timeouts and atomicity."""

import json
import os
import time

import numpy as np
import pytest
import torch

from ckptmap import execute
from ckptmap import atomic
from ckptmap.cli import main
from ckptmap.demo import DemoModel, build_megatron_checkpoint
from torch_views import load_torch as load_ckpt
from ckptmap.mapping.compiler import Pt2MsOptions, compile_pt2ms
from ckptmap.mapping.plan import Plan

SMALL = DemoModel(tp=2, pp=2, dp=1, layers=4, hidden=64, heads=4, groups=2, kv=16, ffn=96, vocab=128)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    truth = build_megatron_checkpoint(root, SMALL, iteration=7)
    return root, truth


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def test_dry_run_lists_every_tensor_and_writes_nothing(source, tmp_path, capsys):
    root, truth = source
    out = tmp_path / "ms"
    assert main(["plan", "pt2ms", "--megatron-path", str(root), "--ms-path", str(out),
                 "--convert-param-only", "--dry-run", "--full"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    for line in ["rank_0/network.ckpt", "rank_1/network.ckpt", "rank_2/network.ckpt", "rank_3/network.ckpt"]:
        assert line in text
    # one row per tensor: MindSpore name, Megatron name, source file, shape, dtype, ops, bytes
    row = next(l for l in text.splitlines() if "layers.3.attention.qkv_proj.weight" in l and "mp_rank_01_001" in l)
    assert "language_model.encoder.layers.1.self_attention.query_key_value.weight" in row
    assert "64x64" in row and "float32" in row and "cast(bfloat16, float32)" in row and str(64 * 64 * 4) in row
    n_weights = sum(len(t) for t in truth.values())
    assert f"{n_weights + 2 * 4} tensors" in text  # + step_num, epoch_num per file


def test_dry_run_summary_by_pattern(source, tmp_path, capsys):
    """Without --full a dry run prints one row per pattern (numbers as N) with counts, bytes and how
    the executor makes the bytes, plus one full example row per pattern; its length does not grow
    with the ranks."""
    root, truth = source
    out = tmp_path / "ms"
    assert main(["plan", "pt2ms", "--megatron-path", str(root), "--ms-path", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    lines = text.splitlines()
    files = next(l for l in lines if l.strip().startswith("rank_N/network.ckpt"))
    assert files.split()[1:3] == ["ckpt", "4"]
    # every (rank, layer) qkv weight has its exp_avg: one pattern row counts them all
    n_qkv = sum(1 for (tp, pp), names in truth.items() for n in names if "query_key_value" in n)
    row = next(l for l in lines if l.strip().startswith("exp_avg.language_model.encoder.layers.N.attention.qkv_proj.weight "))
    assert row.split()[1:4] == ["byte", "copy", str(n_qkv)]
    # one full example row of that pattern: a real name, its source tensor and file
    example = next(l for l in lines if l.strip().startswith("exp_avg.language_model.encoder.layers.0.attention.qkv_proj.weight "))
    assert "distrib_optim.pt" in example and "query_key_value" in example
    # no second example of a pattern
    assert not any(l.strip().startswith("exp_avg.language_model.encoder.layers.1.attention.qkv_proj.weight ")
                   for l in lines)
    n_weights = sum(len(t) for t in truth.values())
    assert f"byte copy {3 * n_weights} tensors" in text  # params, exp_avg, exp_avg_sq: all contiguous fp32 runs
    assert "--full" in text


def test_plan_json_apply_round_trip(source, tmp_path, capsys):
    root, truth = source
    out, plan_file = tmp_path / "ms", tmp_path / "plan.json"
    assert main(["plan", "pt2ms", "--megatron-path", str(root), "--ms-path", str(out),
                 "--convert-param-only", "-o", str(plan_file)]) == 0
    assert not out.exists()
    plan = Plan.from_json(plan_file.read_text())
    assert plan.to_json() == plan_file.read_text()
    assert main(["apply", str(plan_file), "--no-progress"]) == 0
    got = load_ckpt(out / "rank_3" / "network.ckpt")
    assert torch.equal(got["language_model.encoder.layers.3.mlp.mapping.weight"],
                       truth[(1, 1)]["language_model.encoder.layers.1.mlp.dense_h_to_4h.weight"]["weight"].float())
    assert int(got["step_num"]) == 7


def test_bad_plan_file(tmp_path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"version": 2, "kind": "pt2ms"}))
    assert main(["apply", str(bad)]) == 2
    assert "not a valid ckptmap plan" in capsys.readouterr().err


def test_pool_and_inline_give_identical_files(source, tmp_path):
    root, _ = source
    outputs = {}
    for label, kwargs in {"pool": dict(processes=2), "inline": dict(multiprocess=False)}.items():
        out = tmp_path / label
        plan = compile_pt2ms(Pt2MsOptions(str(root), str(out), convert_param_only=True))
        report = execute.run_plan(plan, progress=False, **kwargs)
        assert not report.failed
        outputs[label] = {f: (out / f).read_bytes() for f in files_under(out) if f.endswith(".ckpt")}
    assert outputs["pool"] == outputs["inline"] and len(outputs["pool"]) == 4


def test_pool_reports_every_file_with_its_size_and_the_bytes_written(source, tmp_path, monkeypatch):
    """Workers report finished files and progress through shared memory, not a message per file: every
    file comes back ok with the size it has on disk, and the progress bar is told every tensor byte."""
    root, _ = source
    bars = []

    class RecordingBar(execute._Progress):   # the tqdm bar is off without a terminal; record what it is told
        def __init__(self, total, enabled):
            self.bar, self.total, self.told = None, total, 0
            bars.append(self)

        enabled = property(lambda self: True)

        def update(self, n):
            self.told += n

    monkeypatch.setattr(execute, "_Progress", RecordingBar)
    out = tmp_path / "ms"
    plan = compile_pt2ms(Pt2MsOptions(str(root), str(out)))
    report = execute.run_plan(plan, processes=2)
    assert not report.failed and len(report.results) == len(plan.files) > 8
    assert {r.path: r.nbytes for r in report.results} == {f: (out / f).stat().st_size for f in files_under(out)}
    tensor_bytes = sum(t.nbytes for f in plan.files for t in f.tensors)
    assert [b.told for b in bars] == [bars[0].total] and tensor_bytes <= bars[0].total


@pytest.mark.parametrize("crc", [False, True])
def test_small_ckpt_files_assembled_in_memory(source, tmp_path, monkeypatch, crc):
    """.ckpt files of byte copies and constants are assembled in memory from a per-structure image, not
    through CkptWriter — TP rank 1's by the reads worked out for TP rank 0 of its stage —: the same bytes
    as the writer's (which equal MindSpore's own: test_mindspore_ckpt), loaded by MindSpore (CRC
    checked) with the live optimizer's values."""
    import mindspore as ms
    from ckptmap.formats import mindspore_ckpt

    root, truth = source
    writers = []
    real_writer = mindspore_ckpt.CkptWriter

    def counted(*args, **kwargs):
        writers.append(args[0])
        return real_writer(*args, **kwargs)

    monkeypatch.setattr(mindspore_ckpt, "CkptWriter", counted)
    programs_run = _record_image_programs(monkeypatch)
    files = {}
    for label, limit in (("image", execute.CKPT_IMAGE_BYTES), ("writer", 0)):
        monkeypatch.setattr(execute, "CKPT_IMAGE_BYTES", limit)
        writers.clear()
        out = tmp_path / label
        plan = compile_pt2ms(Pt2MsOptions(str(root), str(out), crc=crc))
        assert not execute.run_plan(plan, multiprocess=False, progress=False).failed
        files[label] = {f: (out / f).read_bytes() for f in files_under(out) if f.endswith(".ckpt")}
        assert len(writers) == (0 if label == "image" else len(files[label])) and len(files[label]) == 4
    assert files["image"] == files["writer"]
    assert programs_run == ["rank_1/network.ckpt", "rank_3/network.ckpt"]
    loaded = ms.load_checkpoint(str(tmp_path / "image" / "rank_3" / "network.ckpt"), crc_check=crc)
    want = truth[(1, 1)]["language_model.encoder.layers.1.mlp.dense_h_to_4h.weight"]
    for prefix, state in (("", "param"), ("exp_avg.", "exp_avg"), ("exp_avg_sq.", "exp_avg_sq")):
        got = loaded[prefix + "language_model.encoder.layers.3.mlp.mapping.weight"].asnumpy()
        assert np.array_equal(got, want[state].numpy()), state
    assert int(loaded["step_num"].asnumpy()) == 7


def _record_image_programs(monkeypatch) -> list:
    """The paths of the .ckpt files read by the reads worked out for an earlier rank (execute._run_image_program)."""
    programs_run = []
    run_program = execute._run_image_program

    def run_and_record(task, *args):
        ran = run_program(task, *args)
        if ran:
            programs_run.append(task.path)
        return ran
    monkeypatch.setattr(execute, "_run_image_program", run_and_record)
    return programs_run


def _patch_reads(monkeypatch, before):
    """Run ``before(task)`` ahead of every tensor read, on both of the executor's read paths: whole
    arrays (``_Sources.array``) and streamed byte runs (``execute.streamed``)."""
    real_array, real_streamed = execute._Sources.array, execute.streamed

    def array(self, task):
        before(task)
        return real_array(self, task)

    def streamed(task, sources):
        before(task)
        return real_streamed(task, sources)
    monkeypatch.setattr(execute._Sources, "array", array)
    monkeypatch.setattr(execute, "streamed", streamed)


def _failing_reader(monkeypatch, fail_key_part):
    def fail(task):
        if fail_key_part in task.name:
            raise OSError(5, "Input/output error (injected)")
    _patch_reads(monkeypatch, fail)


@pytest.mark.parametrize("processes", [1, 2])
def test_failed_file_leaves_nothing_partial(source, tmp_path, monkeypatch, capsys, processes):
    root, _ = source
    _failing_reader(monkeypatch, "layers.3.mlp")   # only on the pp = 1 stage
    out = tmp_path / "ms"
    argv = ["pt2ms", "--megatron-path", str(root), "--ms-path", str(out), "--convert-param-only",
            "--no-progress", "--process-limit", str(processes)]
    assert main(argv) == 1
    text = capsys.readouterr().out
    files = files_under(out)
    assert "rank_0/network.ckpt" in files and "rank_1/network.ckpt" in files
    assert "rank_2/network.ckpt" not in files and "rank_3/network.ckpt" not in files
    assert not [f for f in files if atomic.TMP_MARK in f]
    assert "FAILED rank_2/network.ckpt" in text and "Input/output error (injected)" in text
    assert "6 of 8 files written successfully" in text


def test_timeout_kills_the_worker(source, tmp_path, monkeypatch):
    root, _ = source
    def slow(task):
        if "layers.2." in task.name:
            time.sleep(30)
    _patch_reads(monkeypatch, slow)
    out = tmp_path / "ms"
    plan = compile_pt2ms(Pt2MsOptions(str(root), str(out), convert_param_only=True))
    t0 = time.monotonic()
    report = execute.run_plan(plan, processes=2, timeout=3, progress=False)
    assert time.monotonic() - t0 < 20
    failed = {r.path: r.error for r in report.failed}
    assert set(failed) == {"rank_2/network.ckpt", "rank_3/network.ckpt"}
    assert all("timed out after 3 s" in e for e in failed.values())
    assert not [f for f in files_under(out) if atomic.TMP_MARK in f]
    assert (out / "rank_0" / "network.ckpt").exists() and (out / "rank_1" / "network.ckpt").exists()


def test_a_worker_that_dies_fails_its_file_only(source, tmp_path, monkeypatch):
    """A worker killed while writing (here: it exits on the spot, as under the OOM killer) fails the file its
    slot says it had claimed, naming the exit code; a new worker takes the files not yet handed out, and the
    run ends. (With a per-file "start" message instead, a worker dying before its queue's feeder thread sent
    that message left the run waiting forever.)"""
    root, _ = source
    out = tmp_path / "ms"
    plan = compile_pt2ms(Pt2MsOptions(str(root), str(out), convert_param_only=True))
    doomed = next(f.path for f in plan.files if f.path.endswith("rank_2/network.ckpt"))
    real = execute.write_file

    def dies_on_rank_2(task, *args, **kwargs):
        if task.path == doomed:
            os._exit(3)
        return real(task, *args, **kwargs)

    monkeypatch.setattr(execute, "write_file", dies_on_rank_2)
    t0 = time.monotonic()
    report = execute.run_plan(plan, processes=2, progress=False)
    assert time.monotonic() - t0 < 20
    failed = {r.path: r.error for r in report.failed}
    assert failed == {doomed: "worker process died (exit code 3)"}
    assert len(report.results) == len(plan.files)
    assert all((out / r.path).exists() for r in report.results if r.ok)


def test_inspect_lists_pt_and_ckpt(source, tmp_path, capsys):
    root, _ = source
    assert main(["inspect", str(root)]) == 0
    rows = [l.split(None, 2) for l in capsys.readouterr().out.splitlines()]
    assert ["model/language_model/encoder/layers.1.mlp.dense_h_to_4h.weight", "bfloat16", "[96, 64]"] in rows
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(root), "--ms-path", str(out), "--convert-param-only",
                 "--no-progress", "--format", "safetensors"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out / "rank_0" / "network.safetensors")]) == 0
    rows = [l.split(None, 2) for l in capsys.readouterr().out.splitlines()]
    assert ["language_model.encoder.layers.1.mlp.mapping.weight", "float32", "[96, 64]"] in rows
    assert ["step_num", "int64", "[]"] in rows


def test_two_machines_split_the_plan_and_rank0_writes_the_manifest(source, tmp_path, capsys):
    """--world-size 2: each rank writes a disjoint part into the shared output; the union equals a
    single-machine run byte for byte, and rank 0 writes the manifest once every rank reported."""
    root, _ = source
    single, split = tmp_path / "single", tmp_path / "split"
    common = ["pt2ms", "--megatron-path", str(root), "--convert-param-only", "--no-progress",
              "--generate-all-dp-cp", "--dp-size", "2"]
    assert main(common + ["--ms-path", str(single)]) == 0
    plan = compile_pt2ms(Pt2MsOptions(str(root), str(split), convert_param_only=True, generate_all_dp_cp=True,
                                      dp_size=2))
    owner = execute.assign_files(plan, 2)
    assert set(owner) == {0, 1}
    index = {f.path: i for i, f in enumerate(plan.files)}
    for i, f in enumerate(plan.files):
        if f.source_is_output:
            assert owner[i] == owner[index[f.source]]   # a copy runs where its original is written
    # the two "machines": rank 1 (a thread here) waits until rank 0 has checked the output folder
    import threading

    codes = {}
    rank1 = threading.Thread(target=lambda: codes.setdefault(1, main(
        common + ["--ms-path", str(split), "--world-size", "2", "--rank", "1", "--multiprocess-off"])))
    rank1.start()
    time.sleep(1.5)
    assert rank1.is_alive() and not split.exists()   # nothing written before rank 0's check
    codes[0] = main(common + ["--ms-path", str(split), "--world-size", "2", "--rank", "0", "--multiprocess-off"])
    rank1.join(timeout=60)
    assert codes == {0: 0, 1: 0}
    assert set(files_under(split)) == set(files_under(single)) | {execute.MANIFEST}
    for f in files_under(single):
        if f.endswith(".ckpt"):
            assert (split / f).read_bytes() == (single / f).read_bytes(), f
    manifest = json.loads((split / execute.MANIFEST).read_text())
    assert manifest["complete"] and manifest["world_size"] == 2
    assert set(manifest["files"]) == {f.path for f in plan.files}
    assert all(e["ok"] and e["bytes"] == (split / p).stat().st_size for p, e in manifest["files"].items())


def test_many_ranks_with_few_file_handles(tmp_path):
    """32 mp_rank files converted under a limit of 32 open files: planning keeps no file open per
    rank, and the executor opens sources only while it writes from them."""
    import subprocess
    import sys
    import textwrap

    root = tmp_path / "megatron"
    build_megatron_checkpoint(root, DemoModel(tp=4, pp=8, dp=1, layers=8, hidden=16, heads=4, groups=4, kv=4,
                                              ffn=16, vocab=64), iteration=3)
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
        from ckptmap.cli import main
        sys.exit(main(["pt2ms", "--megatron-path", {str(root)!r}, "--ms-path", {str(tmp_path / 'ms')!r},
                       "--no-progress", "--multiprocess-off"]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "ms").glob("rank_*/network.ckpt"))) == 32


@pytest.mark.parametrize("path", ["image", "image program", "writer"])
def test_every_main_param_element_is_checked(source, tmp_path, capsys, monkeypatch, path):
    """The executor compares every element of a main param with its weight, not only the ends the
    planner spot-checks: one fp32 value changed in the middle of the largest main param (found with
    torch.load of the real file, not with ckptmap's reader) fails that file and only that one — in a
    .ckpt assembled in memory (its main params compared from the bytes read), in one assembled by the
    reads worked out for an earlier rank of the same structure (TP rank 1 after TP rank 0), and in one
    CkptWriter writes."""
    import shutil

    import numpy as np

    if path == "writer":
        monkeypatch.setattr(execute, "CKPT_IMAGE_BYTES", 0)
    programs_run = _record_image_programs(monkeypatch)
    rank_dir, rank = ("mp_rank_01_000", "rank_1") if path == "image program" else ("mp_rank_00_000", "rank_0")
    root, _ = source
    src = tmp_path / "megatron"
    shutil.copytree(root, src)
    optim = next(src.rglob(f"{rank_dir}/distrib_optim.pt"))
    state = torch.load(optim, map_location="cpu", weights_only=False)
    params = next(t for k, t in _tensors(state) if "param" in k)
    data = optim.read_bytes()
    # the bytes of that storage in the file: its values as fp32, found by content
    raw = params.detach().float().numpy().tobytes()
    at = data.find(raw)
    assert at > 0 and data.find(raw, at + 1) == -1
    middle = at + (len(raw) // 8) * 4   # an element far from both ends of every parameter at this size
    value = np.frombuffer(data, dtype=np.float32, count=1, offset=middle)[0]
    optim.write_bytes(data[:middle] + np.float32(value + 3.0).tobytes() + data[middle + 4:])
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "--no-progress",
                 "--multiprocess-off"]) == 1
    text = capsys.readouterr().out
    assert f"FAILED {rank}/network.ckpt" in text and "1 of " in text and "does not round to the model weight" in text
    # exit code 1, not 2: the planner's spot check of both ends passed, the executor's full check failed
    assert "11 of 12 files written successfully" in text
    assert not (out / rank / "network.ckpt").exists()
    if path == "image program":
        assert programs_run == ["rank_1/network.ckpt", "rank_3/network.ckpt"]


def _tensors(obj, path=""):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}.{i}")


@pytest.mark.parametrize("cast", [False, True])
def test_tensor_assembled_from_boxes_streams_in_slabs(tmp_path, monkeypatch, cast):
    """A tensor assembled from boxes of several sources — a dim-1 merge of two shards, the last row
    repeated into padding rows (``dst_lengths``), one row no read covers (zeros) — is assembled one
    slab of rows at a time (slabs of one row here: byte_io.CHUNK patched to a row's bytes), never whole,
    optionally cast on the way; the file the safetensors library reads back equals the tensor numpy
    builds from the same shards."""
    from safetensors.numpy import load_file, save_file

    from ckptmap.formats import byte_io
    from ckptmap.mapping.plan import FileTask, Read, SourceSlice, TensorTask
    from ckptmap.mapping.ops import resolve

    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal((4, 6)).astype(np.float32) for _ in range(2))
    src = tmp_path / "shards.safetensors"
    save_file({"a": a, "b": b}, str(src))
    sa, sb = (SourceSlice(str(src), k, "float32", (4, 6)) for k in "ab")
    reads = (Read(sa, (4, 6), (0, 0), (4, 6), (0, 0)), Read(sb, (4, 6), (0, 0), (4, 6), (0, 6)),
             Read(sa, (4, 6), (3, 0), (1, 6), (4, 0), (2, 6)), Read(sb, (4, 6), (3, 0), (1, 6), (4, 6), (2, 6)))
    merged = np.hstack([a, b])
    want = np.vstack([merged, merged[3:4], merged[3:4], np.zeros((1, 12), np.float32)])
    ops, dtype = (), "float32"
    if cast:
        op, _, dtype = resolve("cast", ("float16",), (7, 12), "float32", {}, "test")
        ops, want = (op,), want.astype(np.float16)
    task = TensorTask("t", dtype, (7, 12), (), "float32", (7, 12), ops, reads=reads)
    monkeypatch.setattr(byte_io, "CHUNK", 12 * 4)
    monkeypatch.setattr(execute._Sources, "_assemble", lambda self, t: pytest.fail("assembled whole"))
    slabs, real = [], execute._slab_chunks
    monkeypatch.setattr(execute, "_slab_chunks", lambda t, views: (slabs.append(c.nbytes) or c for c in real(t, views)))
    execute.write_file(FileTask("out.safetensors", "safetensors", (task,)), tmp_path)
    got = load_file(str(tmp_path / "out.safetensors"))["t"]
    assert slabs == [48] * 7
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_ops_within_leading_rows_stream_row_by_row(tmp_path, monkeypatch):
    """A tensor whose ops act within each leading row (stacked experts: transpose(1, 2), a chunk-interleave
    of dim 1, a reshape keeping dim 0, a cast) is computed a slab of leading rows at a time from its sources'
    runs — never as a whole array — and equals what torch makes of the same values (transpose, chunk + stack,
    half); an op that moves the leading dimension keeps the whole-array path."""
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    from ckptmap.formats import byte_io
    from ckptmap.mapping.ops import resolve
    from ckptmap.mapping.plan import FileTask, SourceSlice, TensorTask

    experts = torch.randn(5, 6, 8)
    save_file({"a": experts[:3].clone()}, str(tmp_path / "x.safetensors"))
    save_file({"b": torch.cat([torch.zeros(7), experts[3:].reshape(-1)])}, str(tmp_path / "y.safetensors"))
    runs = (SourceSlice(str(tmp_path / "x.safetensors"), "a", "float32", (3, 6, 8)),
            SourceSlice(str(tmp_path / "y.safetensors"), "b", "float32", (7 + 96,), 7, 96))
    shape, dtype, ops = (5, 6, 8), "float32", []
    for kind, args in (("transpose", (1, 2)), ("chunk_interleave", (1, 2)), ("reshape", (5, 48)),
                       ("cast", ("float16",))):
        op, shape, dtype = resolve(kind, args, shape, dtype, {}, "test")
        ops.append(op)
    task = TensorTask("t", "float16", (5, 48), runs, "float32", (5, 6, 8), tuple(ops))
    assert execute._rows_kept(task)
    t = experts.transpose(1, 2)                                       # (5, 8, 6)
    t = torch.stack(torch.chunk(t, 2, dim=1), dim=2).reshape(5, 8, 6)   # chunk i's row j -> row j * 2 + i
    want = t.reshape(5, 48).half().numpy()
    monkeypatch.setattr(byte_io, "CHUNK", 6 * 8 * 4)   # one expert per slab
    monkeypatch.setattr(execute, "expected_array", lambda *a: pytest.fail("computed whole"))
    execute.write_file(FileTask("out.safetensors", "safetensors", (task,)), tmp_path)
    got = load_file(str(tmp_path / "out.safetensors"))["t"]
    assert got.dtype == np.float16 and np.array_equal(got, want)
    across, _, _ = resolve("transpose", (0, 1), (5, 6, 8), "float32", {}, "test")
    assert not execute._rows_kept(TensorTask("u", "float32", (6, 5, 8), runs, "float32", (5, 6, 8), (across,)))


def test_a_tensor_of_runs_of_several_files_streams_and_is_checked_whole(tmp_path):
    """A tensor made of runs of several files (pt2ms of torch_dist: ranges of the torch_dist chunks) is
    streamed run after run -- kernel copies, or a cast chunk by chunk -- giving the concatenation's values
    (written by torch through safetensors, read back by MindSpore); its main-param check covers every run, the
    weight being runs at other boundaries: an element changed in the second run, or at the end (the
    planner's spot check), is found."""
    import mindspore as ms
    from safetensors.torch import save_file

    from ckptmap.errors import CkptmapError
    from ckptmap.mapping.megatron_source import spot_check_main_params
    from ckptmap.mapping.plan import FileTask, Op, SourceSlice, TensorTask

    main_param = torch.randn(1000)
    weight = main_param.bfloat16()

    def write_sources(second_run):
        save_file({"a": main_param[:300].clone(), "w": weight[:700].clone()}, str(tmp_path / "x.safetensors"))
        save_file({"b": torch.cat([torch.zeros(5), second_run]), "v": weight[700:].clone()},
                  str(tmp_path / "y.safetensors"))

    write_sources(main_param[300:])
    x, y = str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors")
    runs = (SourceSlice(x, "a", "float32", (300,)), SourceSlice(y, "b", "float32", (705,), 5, 700))
    weight_runs = (SourceSlice(x, "w", "bfloat16", (700,)), SourceSlice(y, "v", "bfloat16", (300,)))
    param = TensorTask("param", "float32", (10, 100), runs, "float32", (10, 100), rounds_to=weight_runs)
    cast = TensorTask("weight", "float32", (1000,), weight_runs, "bfloat16", (1000,),
                      (Op("cast", ("bfloat16", "float32")),))
    sources = execute._Sources()
    try:
        assert execute.streamed(param, sources)[0] == "ranges" and execute.streamed(cast, sources)[0] == "chunks"
    finally:
        sources.close()
    execute.write_file(FileTask("o.ckpt", "ckpt", (param, cast)), tmp_path)
    got = ms.load_checkpoint(str(tmp_path / "o.ckpt"))
    assert np.array_equal(got["param"].asnumpy(), main_param.numpy().reshape(10, 100))
    assert np.array_equal(got["weight"].asnumpy(), weight.float().numpy())
    spot_check_main_params([param])
    for at in (310, 999):   # the second run's middle (the executor's check), its last element (the spot check too)
        changed = main_param[300:].clone()
        changed[at - 300] += 1.0
        write_sources(changed)
        with pytest.raises(CkptmapError, match="does not round to the model weight w \\+ 1 more runs"):
            execute.write_file(FileTask("p.ckpt", "ckpt", (param,)), tmp_path)
        if at == 999:
            with pytest.raises(CkptmapError, match="1 of 1000 elements differ|1 of 64 elements differ"):
                spot_check_main_params([param])
        assert not (tmp_path / "p.ckpt").exists()


def test_small_files_are_handed_out_in_runs_a_slot_finishes():
    """Claims in runs: a worker's slot takes a run of small files (one claim each, so its slot always names
    the file it has); another slot takes the next run; a slot whose worker died still holds the rest of its
    run (unclaimed), which the worker respawned in it continues. Large files are runs of their own."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    n = execute.RUN_FILES
    assert execute._runs([5 << 20] + [0] * (n + 2) + [2 << 20, 7]) == \
        [(0, 1), (1, n + 1), (n + 1, n + 3), (n + 3, n + 4), (n + 4, n + 5)]
    claims = execute._Claims(ctx, [10, 11, 12, 13, 14], 2, runs=[(0, 3), (3, 5)])
    assert [claims.claim(0), claims.claim(1), claims.claim(0), claims.claim(1)] == [10, 13, 11, 14]
    assert list(claims.current) == [11, 14]
    assert claims.claim(1) is None and claims.current[1] == -1
    assert claims.unclaimed   # slot 0 (say its worker died writing 11) still holds 12
    assert claims.claim(0, wrote=None) == 12 and not claims.unclaimed
    assert claims.claim(0) is None


def test_large_files_are_handed_out_largest_first_then_the_small_ones_in_plan_order():
    """Large files by size, so that the workers finish together; small ones (RUN_FILE_BYTES) after them in
    the plan's order, which keeps a stage's ranks and a rank's files in one run."""
    big = execute.RUN_FILE_BYTES + 1
    sizes = {0: 5000, 1: 3 * big, 2: 70_000, 3: big, 4: 5000, 5: 2 * big, 6: 0}
    assert execute._claim_order(sizes) == [1, 5, 3, 0, 2, 4, 6]


def test_a_copy_is_a_run_of_its_own_unless_its_source_is_small(tmp_path):
    """A copy's size for the claim order is its source's (a rank file copied to its other data-parallel ranks
    can be gigabytes, not the 0 bytes of tensors its task lists): a large or not yet known one is never
    put in a run with others."""
    from ckptmap.mapping.plan import FileTask
    (tmp_path / "rank_0").mkdir()
    (tmp_path / "rank_0" / "small.ckpt").write_bytes(b"x" * 100)
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(3 << 20)
    sizes = [execute._claim_size(FileTask("a", "copy", source="rank_0/small.ckpt", source_is_output=True), tmp_path),
             execute._claim_size(FileTask("b", "copy", source=str(big)), tmp_path),
             execute._claim_size(FileTask("c", "copy", source=str(tmp_path / "missing")), tmp_path),
             execute._claim_size(FileTask("d", "text", text="{}"), tmp_path)]
    assert sizes == [100, 3 << 20, execute.RUN_FILE_BYTES + 1, 0]
    assert execute._runs([0, 100, 3 << 20, execute.RUN_FILE_BYTES + 1, 0]) == [(0, 2), (2, 3), (3, 4), (4, 5)]
