"""Start-up of `ckptmap pt2ms` / `ms2pt` (issue 14): wall and CPU time of no-op and tiny commands, each
in a fresh process, in an interleaved series (every command of every checkout once per round).

    PYTHONPATH=. .venv/bin/python bench/bench_startup.py [--repeat 9] [--before OTHER_CHECKOUT]

Commands: ``pt2ms --help``; ``pt2ms --dry-run`` of the 3.7 MB ``legacy_tp1pp1dp1`` fixture (plan,
nothing written); the conversion of that fixture (2 worker processes, and ``--multiprocess-off``);
``ms2pt`` of the conversion's output back. Reports the median wall time and the median CPU time
(user + system of the process tree, ``wait4``). Bytecode is written and used (as in an install:
``PYTHONDONTWRITEBYTECODE`` is unset), the rules parse cache is warm after the first round (each
checkout keeps its own entries), and the commands run outside any checkout (``python -c`` would put
the current folder first on ``sys.path``, shadowing ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO.parent / "shared" / "fixtures" / "megatron-r0.6.0" / "legacy_tp1pp1dp1"
CLI = [sys.executable, "-c", "import sys; from ckptmap.cli import main; sys.exit(main())"]


def measure(cmd, env, cwd) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{err.decode()[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--before", help="another checkout (e.g. `git archive COMMIT ckptmap | tar -x -C DIR`)")
    ap.add_argument("--tiny", default=str(TINY), help="the small Megatron checkpoint (default: the shared fixture)")
    ns = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckptmap-startup-"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    codes = {"after": REPO} | ({"before": Path(ns.before).resolve()} if ns.before else {})
    out, ms = work / "out", work / "ms"
    subprocess.run(CLI + ["pt2ms", "--megatron-path", ns.tiny, "--ms-path", str(ms), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL, env=dict(env, PYTHONPATH=str(REPO)), cwd=work)
    run = ["--no-progress", "--process-limit", "2"]
    commands = {
        "pt2ms --help": ["pt2ms", "--help"],
        "pt2ms --dry-run": ["pt2ms", "--megatron-path", ns.tiny, "--ms-path", str(out), "--dry-run"],
        "pt2ms": ["pt2ms", "--megatron-path", ns.tiny, "--ms-path", str(out)] + run,
        "pt2ms --multiprocess-off": ["pt2ms", "--megatron-path", ns.tiny, "--ms-path", str(out), "--no-progress",
                                     "--multiprocess-off"],
        "ms2pt": ["ms2pt", "--ms-path", str(ms), "--megatron-path", str(out)] + run,
    }
    print(f"python {sys.version.split()[0]}; {os.cpu_count()} cores; load {os.getloadavg()}", flush=True)
    results: dict[tuple[str, str], list] = {}
    try:
        for _ in range(ns.repeat + 1):   # the first round warms the bytecode and the rules cache: not counted
            for label, args in commands.items():
                for code_label, code in codes.items():
                    shutil.rmtree(out, ignore_errors=True)
                    r = measure(CLI + args, dict(env, PYTHONPATH=str(code)), work)
                    results.setdefault((label, code_label), []).append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{ns.repeat} rounds; load {os.getloadavg()}")
    print(f"{'command':26s} {'code':7s} {'wall s':>7s} {'CPU s':>6s} {'min wall':>8s}")
    for (label, code_label), rs in results.items():
        rs = rs[1:]
        print(f"{label:26s} {code_label:7s} {statistics.median(r[0] for r in rs):7.3f} "
              f"{statistics.median(r[1] for r in rs):6.3f} {min(r[0] for r in rs):8.3f}")


if __name__ == "__main__":
    main()
