"""Benchmark for issue 14 ("convert at the speed of copying"): ckptmap against `cp -r` of the same
bytes, at two checkpoint sizes, to show that the cost is linear and close to copying.

Builds legacy GPT checkpoints (TP 2, PP 2, hidden 2048, bf16 weights, the distributed optimizer's
fp32 main params and Adam moments in ``distrib_optim.pt``) in the real on-disk format
(``ckptmap.demo.build_megatron_checkpoint``: the object tree and bucket layout of Megatron
core_r0.6.0, written as torch.save writes it), then runs, in one interleaved series (every command
once per round, ``--repeat`` rounds), each in a fresh process:

* ``cp -r`` of the Megatron source (and of the MindSpore folder, the input of ms2pt);
* ``ckptmap pt2ms`` (weights + optimizer), ``ckptmap pt2ms --convert-param-only`` (fp32 weights);
* ``ckptmap ms2pt`` (weights + optimizer, back to both Megatron files);

and reports per command the median wall time, the median CPU time (user + system of the whole
process tree, from ``wait4``), the peak proportional anonymous memory of the process tree (Pss_Anon
summed over processes, sampled every 20 ms: what the tool allocates; forked pages count once) and,
apart, the peak RSS (which also counts mapped file pages), with ratios to ``cp -r`` of the same input.

    PYTHONPATH=. .venv/bin/python bench/bench_copy.py [--workdir DIR] [--sizes 2g 4g] [--repeat 5]
        [--src OTHER_CHECKOUT] [--before OTHER_CHECKOUT] [--only pt2ms-full ...]

``--src`` runs another checkout's ckptmap (e.g. ``git archive COMMIT ckptmap | tar -x -C /tmp/old``)
on the same checkpoints: the "before" of a change. Checkpoints are cached in the work dir. Results
are copied into bench/RESULTS.md by hand, with the machine's load (printed at the start and end).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {"2g": dict(layers=2, vocab=16000), "4g": dict(layers=4, vocab=32000)}


def anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return 0


def tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/*/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def run_measured(cmd, env=None, cwd=None) -> dict:
    peak = {"anon": 0, "rss": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = tree(proc.pid)
            peak["anon"] = max(peak["anon"], sum(anon_kib(p) for p in pids))
            peak["rss"] = max(peak["rss"], sum(rss_kib(p) for p in pids))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)   # CPU of the process and every descendant it waited for
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{err.decode()}")
    return {"wall": seconds, "cpu": usage.ru_utime + usage.ru_stime, "user": usage.ru_utime,
            "sys": usage.ru_stime, **peak}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(work: Path, size: str) -> Path:
    src = work / size / "megatron"
    if not src.exists():
        from ckptmap.demo import DemoModel, build_megatron_checkpoint

        model = DemoModel(tp=2, pp=2, dp=1, hidden=2048, heads=16, groups=4, kv=128, ffn=5632, **SIZES[size])
        t0 = time.perf_counter()
        tmp = src.with_name("megatron.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_megatron_checkpoint(tmp, model, keep_truth=False, optimizer=True)
        tmp.rename(src)
        print(f"built {size}: {du(src) / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    return src


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ckptmap-bench"))
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--src", help="checkout whose ckptmap package to run (default: this one)")
    ap.add_argument("--before", help="another checkout (e.g. the commit before a change) whose conversions run in "
                                     "the same interleaved series, labelled before:…")
    ap.add_argument("--process-limit", type=int, default=2)
    ap.add_argument("--only", nargs="+", help="labels to run (cp, cp-ms, pt2ms-full, pt2ms-param, ms2pt)")
    ns = ap.parse_args()
    work = Path(ns.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    code = Path(ns.src).resolve() if ns.src else REPO
    # a user's install has its bytecode compiled: measure with __pycache__ written and used
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(code)
    cli = [sys.executable, "-c", "import sys; from ckptmap.cli import main; sys.exit(main())"]
    run_flags = ["--no-progress", "--process-limit", str(ns.process_limit)]
    print(f"code: {code}; python {sys.version.split()[0]}; {os.cpu_count()} cores; load {load()}", flush=True)
    for size in ns.sizes:
        src = build(work, size)
        ms = work / size / "ms"   # ms2pt's input: made once, by this checkout
        if not ms.exists():
            subprocess.run(cli + ["pt2ms", "--megatron-path", str(src), "--ms-path", str(ms.with_name("ms.tmp")),
                                  "--no-progress", "--overwrite"],
                           check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))
            ms.with_name("ms.tmp").rename(ms)
        out = work / size / "out"
        commands = {
            "cp": ["cp", "-r", str(src), str(out)],
            "cp-ms": ["cp", "-r", str(ms), str(out)],
            "pt2ms-full": cli + ["pt2ms", "--megatron-path", str(src), "--ms-path", str(out)] + run_flags,
            "pt2ms-param": cli + ["pt2ms", "--megatron-path", str(src), "--ms-path", str(out),
                                  "--convert-param-only"] + run_flags,
            "ms2pt": cli + ["ms2pt", "--ms-path", str(ms), "--megatron-path", str(out)] + run_flags,
        }
        tiny = REPO.parent / "shared" / "fixtures" / "megatron-r0.6.0" / "legacy_tp1pp1dp1"
        if tiny.is_dir():   # start-up and fixed costs: a 3 MB checkpoint, one output file
            commands["pt2ms-tiny"] = cli + ["pt2ms", "--megatron-path", str(tiny), "--ms-path", str(out)] + run_flags
        if ns.only:
            commands = {k: v for k, v in commands.items() if k in ns.only}
        envs = {k: env for k in commands}
        if ns.before:
            before_env = dict(env, PYTHONPATH=str(Path(ns.before).resolve()))
            for k in [k for k in commands if not k.startswith("cp")]:
                commands["before:" + k] = commands[k]
                envs["before:" + k] = before_env
        baseline = {"pt2ms-full": "cp", "pt2ms-param": "cp", "ms2pt": "cp-ms"}
        baseline.update({"before:" + k: v for k, v in baseline.items()})
        # warm the page cache with the inputs, as for every cp -r after the first
        for d in (src, ms):
            for p in d.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        while f.read(1 << 24):
                            pass
        series: dict[str, list[dict]] = {k: [] for k in commands}
        sizes: dict[str, tuple[int, int]] = {}
        for _ in range(ns.repeat):
            for label, cmd in commands.items():
                shutil.rmtree(out, ignore_errors=True)
                # cwd outside any checkout: `python -c` puts the cwd first on sys.path, which would shadow
                # PYTHONPATH (--src / --before) with the ckptmap of the folder the script was started in
                r = run_measured(cmd, envs[label], cwd=work)
                series[label].append(r)
                kind = label.split(":")[-1]
                source = ms if kind in ("ms2pt", "cp-ms") else tiny if kind == "pt2ms-tiny" else src
                sizes[label] = (du(source), du(out))
        shutil.rmtree(out, ignore_errors=True)
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "cpu", "user", "sys")}
               for k, v in series.items()}
        peak = {k: {m: max(r[m] for r in v) for m in ("anon", "rss")} for k, v in series.items()}
        print(f"\n{size}: source {du(src) / 1e9:.2f} GB (Megatron), {du(ms) / 1e9:.2f} GB (MindSpore); "
              f"{ns.repeat} rounds; load {load()}")
        print(f"{'command':19s} {'in GB':>6s} {'out GB':>6s} {'wall s':>7s} {'CPU s':>6s} {'user':>5s} {'sys':>5s} "
              f"{'x cp wall':>9s} {'anon MiB':>8s} {'RSS MiB':>8s}")
        for label in commands:
            m, p = med[label], peak[label]
            base = baseline.get(label)
            ratio = f"{m['wall'] / med[base]['wall']:9.2f}" if base in med else f"{'':9s}"
            print(f"{label:19s} {sizes[label][0] / 1e9:6.2f} {sizes[label][1] / 1e9:6.2f} {m['wall']:7.2f} "
                  f"{m['cpu']:6.2f} {m['user']:5.2f} {m['sys']:5.2f} {ratio} {p['anon'] / 1024:8.0f} "
                  f"{p['rss'] / 1024:8.0f}", flush=True)


if __name__ == "__main__":
    main()
