"""Nothing silent (issue 9): a non-empty output folder is refused unless --overwrite, which leaves
exactly the new conversion; SIGTERM / SIGINT clean up like Ctrl-C; workers die with their parent;
temporary files of dead runs are removed; multi-machine ranks never wait forever; unreadable inputs
give errors that name them.

Truth is the file system and the process table: which files exist with which bytes, exit codes,
which processes are alive — never ckptmap's own account of what it did."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ckptmap import atomic
from ckptmap.cli import main
from ckptmap.demo import DemoModel, build_megatron_checkpoint
from conftest import fixture_dir

ROOT = Path(__file__).resolve().parents[1]
SMALL = DemoModel(tp=2, pp=2, dp=1, layers=4, hidden=64, heads=4, groups=2, kv=16, ffn=96, vocab=128)
# big enough that writing one output file takes a good fraction of a second (~450 MB of fp32 state)
BIG = DemoModel(tp=1, pp=2, dp=1, layers=4, hidden=768, heads=8, groups=2, kv=96, ffn=2048, vocab=8192)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small") / "megatron"
    build_megatron_checkpoint(root, SMALL, iteration=7, keep_truth=False)
    return root


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big") / "megatron"
    build_megatron_checkpoint(root, BIG, iteration=5, keep_truth=False)
    return root


def tree(path):
    """{relative path: bytes} of every file under ``path``, hidden ones included."""
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def names(path):
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def ckptmap_leftovers(path):
    return [n for n in names(path) if ".ckptmap-" in n]


def cli(*argv):
    return [sys.executable, "-m", "ckptmap", *map(str, argv)]


def env():
    return {**{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}, "PYTHONPATH": str(ROOT)}


def pt2ms(source, out, *extra):
    return ["pt2ms", "--megatron-path", str(source), "--ms-path", str(out), "--no-progress", *map(str, extra)]


# ------------------------------------------------------------------------------------------------
# 1. Never overwrite silently


def test_pt2ms_refuses_a_folder_holding_another_conversion_and_overwrite_leaves_exactly_the_new_one(
        small, tmp_path, capsys):
    out, fresh = tmp_path / "ms", tmp_path / "fresh"
    # an earlier conversion with 2 DP ranks: rank_0 … rank_7 (rank_2/rank_3 are dp-1 copies of pp stage 0)
    assert main(pt2ms(small, out, "--convert-param-only", "--generate-all-dp-cp", "--dp-size", "2")) == 0
    before = tree(out)
    assert "rank_7/network.ckpt" in before
    capsys.readouterr()
    # the new conversion (dp 1: rank_0 … rank_3, rank_2 is now pp stage 1) is refused, nothing changes
    assert main(pt2ms(small, out, "--convert-param-only")) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "rank_2/network.ckpt" in err and "rank_7" in err
    assert tree(out) == before
    # the dry run says what --overwrite would do, and writes nothing
    assert main(["plan"] + pt2ms(small, out, "--convert-param-only", "--dry-run")) == 0
    text = capsys.readouterr().out
    assert "not empty" in text and "--overwrite" in text
    assert "replace" in text and "rank_2/network.ckpt" in text
    assert "remove" in text and "rank_7/" in text
    assert tree(out) == before
    # --overwrite: exactly what a run into an empty folder writes, and it lists what it removed
    assert main(pt2ms(small, out, "--convert-param-only", "--overwrite")) == 0
    printed = capsys.readouterr().out
    for gone in ("rank_4/", "rank_5/", "rank_6/", "rank_7/"):
        assert gone in printed
    assert main(pt2ms(small, fresh, "--convert-param-only")) == 0
    assert tree(out) == tree(fresh)


def test_ms2pt_refuses_to_replace_an_existing_megatron_checkpoint(small, tmp_path, capsys):
    ms_dir, existing, fresh = tmp_path / "ms", tmp_path / "existing", tmp_path / "fresh"
    assert main(pt2ms(small, ms_dir)) == 0
    shutil.copytree(small, existing)
    (existing / "notes.txt").write_text("my notes")
    before = tree(existing)
    optim = "iter_0000007/mp_rank_00_000/distrib_optim.pt"
    assert optim in before
    capsys.readouterr()
    argv = ["ms2pt", "--ms-path", str(ms_dir), "--megatron-path", str(existing), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and optim in err
    assert tree(existing) == before
    assert main(argv + ["--overwrite"]) == 0
    assert "notes.txt" in capsys.readouterr().out
    assert main(["ms2pt", "--ms-path", str(ms_dir), "--megatron-path", str(fresh), "--no-progress"]) == 0
    assert tree(existing) == tree(fresh)


def test_apply_refuses_a_non_empty_target(small, tmp_path, capsys):
    out, plan = tmp_path / "ms", tmp_path / "plan.json"
    assert main(["plan"] + pt2ms(small, out, "--convert-param-only", "-o", plan)) == 0
    assert main(["apply", str(plan), "--no-progress"]) == 0
    first = tree(out)
    (out / "rank_0" / "extra.bin").write_bytes(b"x")
    capsys.readouterr()
    assert main(["apply", str(plan), "--no-progress"]) == 2
    assert "rank_0/extra.bin" in capsys.readouterr().err
    assert main(["apply", str(plan), "--no-progress", "--overwrite"]) == 0
    assert tree(out) == first


def test_an_output_folder_holding_the_sources_is_refused_even_with_overwrite(small, tmp_path, capsys):
    source = tmp_path / "megatron"
    shutil.copytree(small, source)
    before = tree(source)
    assert main(pt2ms(source, source, "--convert-param-only", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "model_optim_rng.pt" in err and "source" in err
    assert tree(source) == before


def test_a_folder_with_only_temporary_files_of_dead_runs_counts_as_empty_and_is_cleaned(small, tmp_path, capsys):
    """A re-run removes the temporary files of killed runs — only ckptmap's own kind, of processes of
    this host that are gone — and says so; other hosts' temporary files and a live process's stay."""
    out = tmp_path / "ms"
    (out / "rank_0").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    stale = out / "rank_0" / f".network.ckpt.ckptmap-tmp-{host}-{dead.pid}-0"
    stale.write_bytes(b"half a file")
    other_host = out / "rank_0" / f".network.ckpt.ckptmap-tmp-otherhost-{dead.pid}-1"
    other_host.write_bytes(b"somebody else's")
    assert main(pt2ms(small, out, "--convert-param-only")) == 0
    printed = capsys.readouterr().out
    assert not stale.exists() and str(stale) in printed
    assert other_host.exists()
    assert (out / "rank_3" / "network.ckpt").is_file()
    # a temporary file of a ckptmap process of this host that is still running: another run is writing here
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = out / "rank_1" / f".network.ckpt.ckptmap-tmp-{host}-{live.pid}-0"
        busy.write_bytes(b"being written")
        assert main(pt2ms(small, out, "--convert-param-only", "--overwrite")) == 2
        err = capsys.readouterr().err
        assert str(live.pid) in err and busy.exists()
    finally:
        live.kill()
        live.wait()
    assert main(pt2ms(small, out, "--convert-param-only", "--overwrite")) == 0
    assert not busy.exists()


# ------------------------------------------------------------------------------------------------
# 2, 3. Signals and orphan workers


def _alive(pid):
    """True while ``pid`` runs (a zombie nobody reaps has finished)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _start_when_writing(argv, out, timeout=120, **kwargs):
    """Start ckptmap in a subprocess; return it once a temporary output file exists and has data."""
    proc = subprocess.Popen(cli(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), text=True,
                            **kwargs)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            pytest.fail(f"ckptmap ended (exit {proc.returncode}) before it was seen writing:\n{stdout}\n{stderr}")
        if out.is_dir():
            temps = [p for p in out.rglob(f"*{atomic.TMP_MARK}*") if p.is_file()]
            if any(p.stat().st_size > 1 << 20 for p in temps if p.exists()):
                return proc
        time.sleep(0.005)
    proc.kill()
    pytest.fail("ckptmap was not seen writing")


@pytest.mark.parametrize("how", ["sigterm-pool", "sigterm-inline", "sigint-group"])
def test_a_signal_mid_run_removes_unfinished_files_and_exits_non_zero(big, tmp_path, how):
    out = tmp_path / "ms"
    extra = ["--multiprocess-off"] if how == "sigterm-inline" else ["--process-limit", "2"]
    proc = _start_when_writing(pt2ms(big, out, *extra), out, start_new_session=True)
    workers = _children(proc.pid)
    if how == "sigint-group":          # Ctrl-C in a terminal: the whole foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    else:                              # a scheduler: SIGTERM to the main process
        os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    if how == "sigint-group":
        assert proc.returncode == 130, stderr
        assert "interrupted (SIGINT)" in stderr
    else:
        assert proc.returncode == 143, stderr
        assert "terminated (SIGTERM)" in stderr
    assert "Traceback" not in stderr
    assert ckptmap_leftovers(out) == []
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in workers if _alive(p)]
    # what is there is complete: the finished files are the ones a full run writes, byte for byte
    full = tmp_path / "full"
    assert main(pt2ms(big, full, "--multiprocess-off")) == 0
    expected = tree(full)
    for name, data in tree(out).items():
        assert data == expected[name], name


FORK_WINDOW_SCRIPT = r"""
import multiprocessing, multiprocessing.util, os, signal, sys, time
from pathlib import Path
from ckptmap import execute, signals

marker, root = Path(sys.argv[1]), Path(sys.argv[2])


class Slow:   # widens the moment between fork and worker_setup to one second
    pass


slow = Slow()
multiprocessing.util.register_after_fork(slow, lambda _: (marker.touch(), time.sleep(1.0)))
ctx = multiprocessing.get_context("fork")
claims, results = execute._Claims(ctx, [], 1), ctx.Queue()
with signals.interruptible():
    with signals.held():
        p = ctx.Process(target=execute._worker, args=(claims, 0, results, root, [], False, os.getpid()), daemon=True)
        p.start()
    while not marker.exists():
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGINT)     # Ctrl-C reaching the worker before it set up its handlers
    p.join(20)
print(p.exitcode)
"""


def test_a_signal_between_fork_and_worker_setup_is_handled_by_the_worker(tmp_path):
    # ckptmap's executor forks workers while SIGINT/SIGTERM would raise; a signal arriving in the
    # child before worker_setup used to raise inside multiprocessing's after-fork code (traceback)
    proc = subprocess.run([sys.executable, "-c", FORK_WINDOW_SCRIPT, str(tmp_path / "forked"), str(tmp_path)],
                          env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["130"], proc.stdout   # the worker's own Interrupted exit (128 + SIGINT)
    assert "Traceback" not in proc.stderr, proc.stderr


def test_workers_exit_when_the_main_process_is_killed(big, tmp_path):
    out = tmp_path / "ms"
    proc = _start_when_writing(pt2ms(big, out, "--process-limit", "2"), out)
    workers = _children(proc.pid)
    assert workers, "no worker processes seen"
    proc.kill()                        # SIGKILL: no handler runs in the main process
    proc.communicate()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in workers if _alive(p)], "orphaned workers kept running"
    assert ckptmap_leftovers(out) == []   # they removed their temporary files on the way out


# ------------------------------------------------------------------------------------------------
# 7. Multi-machine: one check, by rank 0, before anything; nobody waits forever


def _ranks(source, out, world, *extra, ranks=None, delay=0.0):
    procs = {}
    for r in ranks if ranks is not None else range(world):
        procs[r] = subprocess.Popen(cli(*pt2ms(source, out, "--convert-param-only", "--world-size", world,
                                               "--rank", r, *extra)),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), text=True)
        time.sleep(delay)
    return procs


def _wait(procs, timeout=120):
    return {r: (p.wait(timeout=timeout), *p.communicate()) for r, p in procs.items()}


def test_ranks_share_one_check_by_rank0(small, tmp_path, capsys):
    out, single = tmp_path / "split", tmp_path / "single"
    assert main(pt2ms(small, single, "--convert-param-only")) == 0
    # rank 1 started first waits for rank 0's check instead of writing into an unchecked folder
    done = _wait(_ranks(small, out, 2, ranks=[1, 0], delay=1.0))
    assert all(code == 0 for code, _, _ in done.values()), done
    manifest = json.loads((out / "ckptmap_manifest.json").read_text())
    assert manifest["complete"] and manifest["world_size"] == 2
    assert set(tree(out)) == set(tree(single)) | {"ckptmap_manifest.json"}
    assert all(tree(out)[k] == v for k, v in tree(single).items())
    # the same command again: rank 0 refuses the non-empty folder; rank 1 learns it and stops at once
    before = tree(out)
    t0 = time.monotonic()
    done = _wait(_ranks(small, out, 2, "--wait-timeout", 300))
    assert time.monotonic() - t0 < 60
    assert done[0][0] == 2 and "--overwrite" in done[0][2]
    assert done[1][0] != 0 and "rank 0" in done[1][2] and "--overwrite" in done[1][2]
    assert tree(out) == before
    # with --overwrite on every rank: rank 1 joining after rank 0 wrote files does not refuse them
    procs = _ranks(small, out, 2, "--overwrite", ranks=[0])
    time.sleep(2)
    procs.update(_ranks(small, out, 2, "--overwrite", ranks=[1]))
    done = _wait(procs)
    assert all(code == 0 for code, _, _ in done.values()), done
    assert set(tree(out)) == set(before)
    assert all(tree(out)[k] == v for k, v in tree(single).items())
    assert ckptmap_leftovers(out) == []


def test_rank0_alone_gives_up_naming_the_missing_rank(small, tmp_path):
    out = tmp_path / "split"
    t0 = time.monotonic()
    code, stdout, stderr = _wait(_ranks(small, out, 3, "--wait-timeout", 3, ranks=[0]))[0]
    assert time.monotonic() - t0 < 60
    assert code != 0
    assert "ranks 1, 2" in stderr and "--wait-timeout" in stderr and "every rank" in stderr
    assert json.loads((out / "ckptmap_manifest.json").read_text())["complete"] is False


def test_a_rank_without_rank0_does_not_wait_forever(small, tmp_path):
    out = tmp_path / "split"
    t0 = time.monotonic()
    code, stdout, stderr = _wait(_ranks(small, out, 2, "--wait-timeout", 3, ranks=[1]))[1]
    assert time.monotonic() - t0 < 60
    assert code != 0 and "rank 0" in stderr and "3 s" in stderr
    assert not out.exists()   # it wrote nothing, not even a marker


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_rank0_notices_a_killed_rank(big, tmp_path, sig):
    """SIGKILL: rank 1's heartbeat stops, rank 0 gives up after --wait-timeout. SIGTERM: rank 1
    reports that it was interrupted, so rank 0 does not wait at all (here: a 300 s timeout)."""
    out = tmp_path / "split"
    wait = 3 if sig == signal.SIGKILL else 300
    procs = {}
    for r in (0, 1):
        procs[r] = subprocess.Popen(cli(*pt2ms(big, out, "--world-size", 2, "--rank", r, "--wait-timeout", wait,
                                               "--multiprocess-off")),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), text=True)
    host = socket.gethostname().replace("-", "_")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:   # until rank 1 is writing a file
        if any(f"-{host}-{procs[1].pid}-" in p.name for p in out.rglob(f"*{atomic.TMP_MARK}*")
               if ".ckptmap-run" not in str(p)):
            break
        assert procs[1].poll() is None, procs[1].communicate()
        time.sleep(0.005)
    procs[1].send_signal(sig)
    t0 = time.monotonic()
    code, stdout, stderr = procs[0].wait(timeout=120), *procs[0].communicate()
    code1, _, stderr1 = procs[1].wait(), *procs[1].communicate()
    assert time.monotonic() - t0 < 60
    if sig == signal.SIGKILL:
        assert code != 0 and "rank 1" in stderr and "--overwrite" in stderr
    else:
        assert code1 == 143 and "terminated (SIGTERM)" in stderr1
        assert code == 1 and "rank 1 was interrupted (SIGTERM)" in stdout
    assert json.loads((out / "ckptmap_manifest.json").read_text())["complete"] is False
    assert not (out / ".ckptmap-run").exists()


# ------------------------------------------------------------------------------------------------
# 5, 6. Inputs that cannot be read


def test_tracker_with_bytes_that_are_not_text(small, tmp_path, capsys):
    source = tmp_path / "megatron"
    shutil.copytree(small, source)
    (source / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\xfe7\x00")
    assert main(pt2ms(source, tmp_path / "ms", "--convert-param-only")) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckptmap pt2ms: error: ") and err.count("\n") == 1, err
    assert str(source / "latest_checkpointed_iteration.txt") in err and r"\xff\xfe7\x00" in err
    assert not (tmp_path / "ms").exists()


@pytest.mark.parametrize("garbage", [b"\x00\x01\xfe not json", b"[1, 2, 3]", b'{"module.x": "nonsense"}'],
                         ids=["binary", "list", "bad-entry"])
@pytest.mark.parametrize("mode", ["optimizer", "param-only"])
def test_a_corrupt_param_map_found_next_to_the_checkpoint_is_ignored_and_said_so(tmp_path, capsys, garbage, mode):
    from test_pt2ms_optimizer import truth_states
    from test_combine import load_ms

    name = "mcore_tp2pp1dp2_buckets"
    fixture = fixture_dir(name)
    source = tmp_path / name
    shutil.copytree(fixture, source, ignore=shutil.ignore_patterns("truth"))
    bad = source / "param_map" / "param_map_buffer0_dp0tp1pp0vpp0.json"
    assert bad.is_file()
    bad.write_bytes(garbage)
    out = tmp_path / "ms"
    extra = ["--convert-param-only"] if mode == "param-only" else []
    assert main(pt2ms(source, out, *extra)) == 0
    printed = capsys.readouterr().out
    assert "ignored" in printed and str(bad) in printed
    assert not [p for p in (out / "pt_meta").iterdir() if p.read_bytes() == garbage]
    if mode == "optimizer":
        truth = truth_states(fixture, 1, 0)
        got = load_ms(out / "rank_1" / "network.ckpt")
        t = truth[("exp_avg", 0, "decoder.layers.2.pre_mlp_layernorm.bias")]
        assert np.array_equal(got["exp_avg.decoder.layers.2.pre_mlp_layernorm.bias"], t.numpy())
    # given explicitly, the same map is an error
    assert main(pt2ms(source, tmp_path / "ms2", "--param-map-path", source / "param_map", *extra)) == 2
    assert str(bad) in capsys.readouterr().err
