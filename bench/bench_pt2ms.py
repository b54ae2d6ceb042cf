"""Benchmark: `ckptmap pt2ms --convert-param-only` on a ~2.15 GB Megatron checkpoint (legacy GPT,
TP 2, PP 2, bf16), against `cp -r` of the same files. Records wall time and peak memory of the
whole process tree (sum over processes, sampled every 20 ms): proportional anonymous memory (what
the tool allocates; pages shared by forked workers count once) and RSS (which also counts mmap'd
file pages, page cache the kernel can drop at any time).

    .venv/bin/python bench/bench_pt2ms.py [--workdir DIR] [--layers N] [--keep]

Results are appended to bench/RESULTS.md by hand after a run (numbers from this 2-core machine).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from ckptmap.demo import DemoModel, build_megatron_checkpoint


def anon_kib(proc: psutil.Process) -> int:
    """Proportional anonymous memory: pages a forked worker shares with its parent count once."""
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd) -> dict:
    peak = {"anon": 0, "rss": 0, "procs": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                anon = sum(anon_kib(p) for p in procs)
                rss = sum(p.memory_info().rss for p in procs if p.is_running()) // 1024
            except psutil.Error:
                anon = rss = 0
                procs = []
            peak["anon"] = max(peak["anon"], anon)
            peak["rss"] = max(peak["rss"], rss)
            peak["procs"] = max(peak["procs"], len(procs))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{err.decode()}")
    return {"seconds": seconds, **peak}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--optimizer", action="store_true",
                    help="also write distrib_optim.pt and time the full conversion and the way back")
    ns = ap.parse_args()
    work = Path(ns.workdir or tempfile.mkdtemp(prefix="ckptmap-bench-"))
    src = work / "megatron"
    model = DemoModel(tp=2, pp=2, dp=1, layers=ns.layers, hidden=2048, heads=16, groups=4, kv=128,
                      ffn=5632, vocab=32000)
    if not src.exists():
        t0 = time.perf_counter()
        build_megatron_checkpoint(src, model, keep_truth=False, optimizer=ns.optimizer)
        print(f"built {du(src) / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    size = du(src)
    ckptmap = str(Path(sys.executable).with_name("ckptmap"))
    runs = {
        "cp -r": lambda out: ["cp", "-r", str(src), str(out)],
    }
    if ns.optimizer:
        ms_dir = work / "ms_full"
        if not ms_dir.exists():
            subprocess.run([ckptmap, "pt2ms", "--megatron-path", str(src), "--ms-path", str(ms_dir),
                            "--no-progress"], check=True, stdout=subprocess.DEVNULL)
        runs.update({
            "ckptmap pt2ms (optimizer, 2 procs)": lambda out: [
                ckptmap, "pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "--no-progress",
                "--process-limit", "2"],
            "ckptmap ms2pt (optimizer, 2 procs)": lambda out: [
                ckptmap, "ms2pt", "--ms-path", str(ms_dir), "--megatron-path", str(out), "--no-progress",
                "--process-limit", "2"],
        })
    else:
        runs.update(_weight_runs(src))
    print(f"source: {size / 1e9:.2f} GB, legacy GPT TP2 PP2, {ns.layers} layers, hidden 2048")
    print(f"{'command':36s} {'best s':>7s} {'out GB':>7s} {'peak PSS anon MiB':>18s} {'peak RSS MiB':>13s} {'procs':>5s}")
    for label, make in runs.items():
        best = None
        for _ in range(ns.repeat):
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            r = run_measured(make(out))
            r["out"] = du(out)
            if best is None or r["seconds"] < best["seconds"]:
                best = r
        print(f"{label:36s} {best['seconds']:7.2f} {best['out'] / 1e9:7.2f} {best['anon'] / 1024:18.0f} "
              f"{best['rss'] / 1024:13.0f} {best['procs']:5d}")
    shutil.rmtree(work / "out", ignore_errors=True)
    if not ns.keep and not ns.workdir:
        shutil.rmtree(work)


def _weight_runs(src):
    ckptmap = str(Path(sys.executable).with_name("ckptmap"))
    return {
        "ckptmap pt2ms (fp32, 2 procs)": lambda out: [ckptmap, "pt2ms", "--megatron-path", str(src),
                                                      "--ms-path", str(out), "--convert-param-only",
                                                      "--no-progress", "--process-limit", "2"],
        "ckptmap pt2ms (fp32, 1 proc)": lambda out: [ckptmap, "pt2ms", "--megatron-path", str(src),
                                                     "--ms-path", str(out), "--convert-param-only",
                                                     "--no-progress", "--multiprocess-off"],
        "ckptmap pt2ms (--dtype keep)": lambda out: [ckptmap, "pt2ms", "--megatron-path", str(src),
                                                     "--ms-path", str(out), "--convert-param-only",
                                                     "--no-progress", "--dtype", "keep"],
    }


if __name__ == "__main__":
    main()
