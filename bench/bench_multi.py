"""Benchmark: one conversion split over several "machines" (``--world-size N --rank R``) at thousands of
ranks (project issue 16: "multi-machine runs split the work by bytes and finish with one manifest ... at
this scale too").

Builds (or reuses) the tiny TP 8 x PP N legacy GPT checkpoint of ``bench_scale.py`` (4,096 mp_rank folders
for PP 512), converts it once with ``--world-size 1`` as the reference, then with each world size given,
all ranks started at once on this machine, sharing one output folder as machines share a file system.
Reports per run: wall time until the last rank exits, CPU seconds of every rank (user + system of its
process tree, from ``wait4``), files and bytes each rank wrote (from ``ckptmap_manifest.json``'s ``rank``
of each file), and checks that the manifest is complete and that every output file is byte-identical to
the single-machine run's.

    PYTHONPATH=.:bench .venv/bin/python bench/bench_multi.py [--pp 512] [--world-sizes 2 4]
        [--process-limit 1] [--workdir DIR] [--keep]

On one 2-core machine the ranks compete for the same cores, so the wall time shows the coordination
cost and the balance, not the speed-up real machines would give.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_scale

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-P", "-c", "import sys; from ckptmap.cli import main; sys.exit(main())"]


def run_ranks(src: Path, out: Path, world: int, process_limit: int, log_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    procs = {}
    for rank in range(world):
        log = open(log_dir / f"rank{rank}-of-{world}.log", "w")
        cmd = CLI + ["pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "--no-progress",
                     "--process-limit", str(process_limit)]
        if world > 1:
            cmd += ["--world-size", str(world), "--rank", str(rank)]
        procs[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_dir).pid] = (rank, log)
    cpu, codes, ends = {}, {}, {}
    while procs:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in procs:
            continue
        rank, log = procs.pop(pid)
        log.close()
        ends[rank] = time.perf_counter() - t0
        codes[rank] = os.waitstatus_to_exitcode(status)
        cpu[rank] = usage.ru_utime + usage.ru_stime
    return {"wall": max(ends.values()), "ends": ends, "cpu": cpu, "codes": codes}


def digests(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "ckptmap_manifest.json":
            out[str(p.relative_to(root))] = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=512, help="pipeline stages (x TP 8 = mp_rank folders)")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--process-limit", type=int, default=1, help="worker processes per rank")
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    ns = ap.parse_args()
    work = Path(ns.workdir) if ns.workdir else Path(tempfile.mkdtemp(prefix="ckptmap-multi-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"tp8pp{ns.pp}"
    if not src.exists():
        print(f"building TP 8 x PP {ns.pp}: {bench_scale.build_checkpoint(src, bench_scale.tiny_model(8, ns.pp)):.1f} s")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    reference = None
    rows = []
    for world in [1] + ns.world_sizes:
        out = work / f"out-w{world}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_ranks(src, out, world, ns.process_limit, work)
        if any(r["codes"].values()):
            bad = {k: v for k, v in r["codes"].items() if v}
            sys.exit(f"world size {world}: ranks {bad} failed; see {work}/rank*-of-{world}.log")
        files = digests(out)
        if reference is None:
            reference = files
        identical = files == reference
        per_rank = {}
        if world > 1:
            manifest = json.loads((out / "ckptmap_manifest.json").read_text())
            assert manifest["complete"] and len(manifest["files"]) == len(reference), "manifest incomplete"
            for path, entry in manifest["files"].items():
                n, b = per_rank.get(entry["rank"], (0, 0))
                per_rank[entry["rank"]] = (n + 1, b + entry["bytes"])
        rows.append((world, r, len(files), identical, per_rank, os.getloadavg()[0]))
        print(f"world {world}: {r['wall']:.1f} s wall, CPU {sum(r['cpu'].values()):.1f} s, {len(files)} files, "
              f"identical to world 1: {identical}")
        if world > 1 and not ns.keep:
            shutil.rmtree(out)
    print()
    print("| world size | wall s (last rank) | CPU s (sum) | per rank: CPU s | per rank: files / MiB written | "
          "identical to 1 | load |")
    print("|---:|---:|---:|---|---|---|---:|")
    for world, r, n, identical, per_rank, load in rows:
        cpus = " / ".join(f"{r['cpu'][k]:.1f}" for k in sorted(r["cpu"]))
        split = " / ".join(f"{per_rank[k][0]} / {per_rank[k][1] / 2**20:.1f}" for k in sorted(per_rank)) or f"{n} files"
        print(f"| {world} | {r['wall']:.1f} | {sum(r['cpu'].values()):.1f} | {cpus} | {split} | "
              f"{'yes' if identical else 'NO'} | {load:.1f} |")
    if not ns.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
