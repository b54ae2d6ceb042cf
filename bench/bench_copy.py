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
* ``ckptmap combine`` of MindSpeed distributed-optimizer shards (DP 2, ``buffer_{i}_bucket_{j}`` +
  ``exp_avg.`` / ``exp_avg_sq.``, with their ``opt_shard_info``), made from the pt2ms output;
* ``ckptmap reshard`` TP 2 -> TP 1 and PP 2 -> PP 1, with the distributed optimizer;
* ``ckptmap convert --from torch --to msadapter`` and ``--from msadapter --to torch`` (the MSAdapter
  input made by the former);
* ``ckptmap convert --from torch_dist --to torch`` and ``pt2ms`` of a megatron.core GPT torch_dist folder
  (fully_sharded_model_space: a real megatron-core 0.12.1 save scaled up, ``bench_torch_dist.build``), and
  ``--from torch --to torch_dist`` of its legacy files (made by the former);

every one against ``cp -r`` of its own input (rows ``cp-<input>``), and reports per command the median wall time, the median CPU time (user + system of the whole
process tree, from ``wait4``), the peak proportional anonymous memory of the process tree (Pss_Anon
summed over processes, sampled every 20 ms: what the tool allocates; forked pages count once) and,
apart, the peak RSS (which also counts mapped file pages), with ratios to ``cp -r`` of the same input.

    PYTHONPATH=. .venv/bin/python bench/bench_copy.py [--workdir DIR] [--sizes 2g 4g] [--repeat 5]
        [--src OTHER_CHECKOUT] [--before OTHER_CHECKOUT] [--only pt2ms-full ...]

Labels (``--only``): cp, pt2ms-full, pt2ms-param, reshard-tp, reshard-pp, pt2msa, cp-ms, ms2pt,
cp-shards, combine, cp-msa, msa2pt, cp-td, td2pt, td2ms, cp-mc, pt2td, pt2ms-tiny.

The Megatron source is built at TP 1 and resharded to TP 2 by ckptmap (the demo builder draws every
rank independently, so its TP ranks would disagree on replicated tensors, which reshard and torch ->
torch_dist refuse). Every input is read once before each measured command (page cache warm for ``cp``
and conversions alike). ``--sizes 2g 4g --repeat 3`` took 38 minutes on 2 cores shared with other
jobs (load average 4 - 12), about 5 of them building the inputs (cached in the work dir for the next run),
and needs ~45 GB free in the work dir (inputs of both sizes and one output at a time).

``--src`` runs another checkout's ckptmap (e.g. ``git archive COMMIT ckptmap | tar -x -C /tmp/old``)
on the same checkpoints: the "before" of a change. Checkpoints are cached in the work dir. Results
are copied into bench/RESULTS.md by hand, with the machine's load (printed at the start and end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_torch_dist
MODEL = dict(hidden=2048, heads=16, groups=4, kv=128, ffn=5632)
SIZES = {"2g": dict(layers=2, vocab=16000, **MODEL), "4g": dict(layers=4, vocab=32000, **MODEL),
         # a few MB, to try the script itself (not a measurement)
         "smoke": dict(layers=2, vocab=1024, hidden=256, heads=8, groups=2, kv=32, ffn=704)}
# the torch_dist rows' source (megatron.core GPT: torch_dist holds megatron.core models only): a real
# megatron-core 0.12.1 save (TP 2 PP 2 VPP 2 DP 2) scaled up by bench_torch_dist.build
TD_SIZES = {"2g": dict(layers=4, hidden=1536, ffn=4096, vocab=32000),
            "4g": dict(layers=8, hidden=1536, ffn=4096, vocab=32000),
            "smoke": dict(layers=4, hidden=96, ffn=256, vocab=1024)}
DP_SHARDS = 2                    # DP ranks of the MindSpeed shards combine merges
SHARD_BUCKET = 40_000_000        # their DDP bucket size in elements (Megatron's default order of magnitude)


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


def build(work: Path, size: str, cli: list[str]) -> Path:
    """The legacy TP 2 PP 2 source: built at TP 1 (real on-disk format), resharded to TP 2 by ckptmap."""
    src = work / size / "megatron"
    if not src.exists():
        from ckptmap.demo import DemoModel, build_megatron_checkpoint

        model = DemoModel(tp=1, pp=2, dp=1, **SIZES[size])
        t0 = time.perf_counter()
        tp1, tmp = src.with_name("megatron-tp1.tmp"), src.with_name("megatron.tmp")
        for d in (tp1, tmp):
            shutil.rmtree(d, ignore_errors=True)
        with megatron_06_param_groups():
            build_megatron_checkpoint(tp1, model, keep_truth=False, optimizer=True)
        made(cli + ["reshard", "--megatron-path", str(tp1), "--output-path", str(tmp), "--target-tp-size", "2",
                    "--vocab-size", str(model.vocab), "--target-megatron-version", "0.6"])
        shutil.rmtree(tp1)
        tmp.rename(src)
        print(f"built {size}: {du(src) / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    return src


@contextlib.contextmanager
def megatron_06_param_groups():
    """The demo's optimizer param groups lack the keys core_r0.6.0's `_get_param_groups` saves (wd_mult,
    lr_mult, is_expert_parallel, is_decoupled_lr); reshard needs wd_mult to give each parameter its
    group. Add them, as Megatron would have, while the demo saves its files."""
    from ckptmap.formats import torch_zip_writer

    save = torch_zip_writer.save

    def with_groups(obj, *args, **kwargs):
        if isinstance(obj, dict) and isinstance(obj.get("optimizer"), dict):
            for g in obj["optimizer"]["optimizer"]["param_groups"]:
                g.setdefault("wd_mult", 1.0 if g["weight_decay"] else 0.0)
                g.setdefault("lr_mult", 1.0)
                g.setdefault("is_expert_parallel", False)
                g.setdefault("is_decoupled_lr", False)
        return save(obj, *args, **kwargs)

    torch_zip_writer.save = with_groups
    try:
        yield
    finally:
        torch_zip_writer.save = save


def made(cmd: list[str]) -> None:
    """Run a command that builds an input (this checkout's ckptmap), quietly unless it fails."""
    r = subprocess.run(cmd + ["--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    if r.returncode:
        sys.exit(f"building an input failed: {' '.join(cmd)}\n{r.stderr.decode()}")


def build_with(cli: list[str], out: Path, args: list[str]) -> Path:
    """An input made by a ckptmap command (cached: written under a temporary name, then renamed)."""
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        made(cli + [a if a != "{out}" else str(tmp) for a in args])
        tmp.rename(out)
        print(f"built {out}: {du(out) / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def build_shards(ms: Path, out: Path, tp_size: int = 2) -> Path:
    """MindSpeed distributed-optimizer shards (V1 names, DP_SHARDS ranks per group) of the pt2ms output
    ``ms`` (one rank per (tp, pp), DP 1): every parameter's fp32 value and Adam moments placed in
    MindSpeed's bucket layout (ckptmap.hooks.mindspeed, the layout combine is tested against), each
    bucket cut into DP_SHARDS equal pieces, scalars copied to every rank; plus the opt_shard_info JSON."""
    if out.exists():
        return out
    import numpy as np

    from ckptmap.formats import opt_shard_info as osi
    from ckptmap.formats.mindspore_ckpt import CkptReader, CkptWriter
    from ckptmap.hooks.mindspeed import compute_opt_shard_info

    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(ms.glob("rank_*/*.ckpt"), key=lambda f: int(f.parent.name.split("_")[1]))
    pp_size = len(files) // tp_size
    for g_src, path in enumerate(files):
        tp, pp = g_src % tp_size, g_src // tp_size
        ranks = [tp + tp_size * (d + DP_SHARDS * pp) for d in range(DP_SHARDS)]
        with CkptReader(path) as r:
            keys = r.keys()
            params = [k for k in keys if f"exp_avg.{k}" in r]
            others = [k for k in keys if k not in params and not k.startswith(("exp_avg.", "exp_avg_sq."))]
            info = compute_opt_shard_info([(k, r.spec(k).shape, "bfloat16") for k in params], ranks,
                                          bucket_size=SHARD_BUCKET, pp_size=pp_size, pp_rank=pp,
                                          untie_embeddings_and_output_weights=True)
            info_path = tmp / "opt_shard_info" / osi.v1_shard_info_path(ranks[0])
            info_path.parent.mkdir(parents=True, exist_ok=True)
            info_path.write_text(json.dumps(info))
            for g in ranks[1:]:   # the other ranks' strategy folders exist, empty, as MindSpeed leaves them
                (tmp / "opt_shard_info" / osi.rank_dir_name(g)).mkdir(parents=True, exist_ok=True)
            step = int(r.array("step_num")) if "step_num" in r else 0
            writers = []
            for g in ranks:
                f = tmp / osi.rank_dir_name(g) / f"network_rank_{g}-0_{step}.ckpt"
                f.parent.mkdir(parents=True, exist_ok=True)
                writers.append(CkptWriter(f))
            for state in ("", "exp_avg", "exp_avg_sq"):
                for i, buffer in sorted(info["buffer_info"].items(), key=lambda kv: int(kv[0])):
                    bucket_start = 0
                    for j in range(buffer["bucket_num"]):
                        padded = buffer["buckets"][str(j)][0]
                        full = np.zeros(padded, np.float32)
                        for name, p in info["param_info"].items():
                            bi, bj, start, end = p["range_map"]
                            if (str(bi), bj) == (i, j):
                                full[start - bucket_start:end - bucket_start] = r.array(
                                    f"{state}.{name}" if state else name).reshape(-1)
                        n = padded // DP_SHARDS
                        for d, w in enumerate(writers):
                            w.write(osi.buffer_key(int(i), j, state), full[d * n:(d + 1) * n])
                        bucket_start += padded
            for k in others:
                for w in writers:
                    if r.spec(k).dtype == "str":
                        w.write_string(k, r.string(k))
                    else:
                        w.write(k, r.array(k), r.spec(k).dtype)
            for w in writers:
                w.close()
    tmp.rename(out)
    print(f"built {out}: {du(out) / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def build_torch_dist(out: Path, size: str) -> Path:
    """A fully_sharded_model_space torch_dist folder: bench_torch_dist.build (a real megatron-core 0.12.1
    save of the test harness, `.venv/mcore-cache`, scaled up, written by ckptmap's torch_dist writer)."""
    if not out.exists():
        from bench_torch_dist import _template, build as build_td

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        build_td(_template(), tmp, **TD_SIZES[size])
        tmp.rename(out)
        print(f"built {out}: {du(out) / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def warm(path: Path) -> None:
    """Read every file once (untimed), so each command starts with its input in the page cache."""
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ckptmap-bench"))
    ap.add_argument("--sizes", nargs="+", default=["2g", "4g"], choices=list(SIZES))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--src", help="checkout whose ckptmap package to run (default: this one)")
    ap.add_argument("--before", help="another checkout (e.g. the commit before a change) whose conversions run in "
                                     "the same interleaved series, labelled before:…")
    ap.add_argument("--process-limit", type=int, default=2)
    ap.add_argument("--only", nargs="+", help="labels to run (see the module docstring)")
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
        made_by = [sys.executable, "-P", "-m", "ckptmap"]   # inputs are made by this checkout
        src = build(work, size, made_by)
        vocab = str(SIZES[size]["vocab"])
        # ms2pt's input, and what combine's shards are cut from
        ms = build_with(made_by, work / size / "ms", ["pt2ms", "--megatron-path", str(src), "--ms-path", "{out}"])
        inputs = {
            "": src, "ms": ms,
            "shards": work / size / "shards",
            "msa": work / size / "msadapter",
            "td": work / size / "torch_dist",
            "mc": work / size / "megatron-core",   # the torch_dist source as legacy files (torch -> torch_dist)
        }
        out = work / size / "out"
        commands = {
            "cp": ["cp", "-r", str(src), str(out)],
            "pt2ms-full": cli + ["pt2ms", "--megatron-path", str(src), "--ms-path", str(out)] + run_flags,
            "pt2ms-param": cli + ["pt2ms", "--megatron-path", str(src), "--ms-path", str(out),
                                  "--convert-param-only"] + run_flags,
            "reshard-tp": cli + ["reshard", "--megatron-path", str(src), "--output-path", str(out),
                                 "--target-tp-size", "1", "--vocab-size", vocab, "--target-megatron-version", "0.6"]
                          + run_flags,
            "reshard-pp": cli + ["reshard", "--megatron-path", str(src), "--output-path", str(out),
                                 "--target-pp-size", "1", "--target-megatron-version", "0.6"] + run_flags,
            "pt2msa": cli + ["convert", "--from", "torch", "--to", "msadapter", "--src", str(src), "--dst", str(out),
                             "--keep-foreign-rng"] + run_flags,
            "cp-ms": ["cp", "-r", str(ms), str(out)],
            "ms2pt": cli + ["ms2pt", "--ms-path", str(ms), "--megatron-path", str(out)] + run_flags,
            "cp-shards": ["cp", "-r", str(inputs["shards"]), str(out)],
            "combine": cli + ["combine", "--strategy-dir", str(inputs["shards"] / "opt_shard_info"),
                              "--checkpoint-dir", str(inputs["shards"]), "--output-dir", str(out)] + run_flags,
            "cp-msa": ["cp", "-r", str(inputs["msa"]), str(out)],
            "msa2pt": cli + ["convert", "--from", "msadapter", "--to", "torch", "--src", str(inputs["msa"]),
                             "--dst", str(out), "--keep-foreign-rng"] + run_flags,
            "cp-td": ["cp", "-r", str(inputs["td"]), str(out)],
            "td2pt": cli + ["convert", "--from", "torch_dist", "--to", "torch", "--src", str(inputs["td"]),
                            "--dst", str(out), "--target-megatron-version", "0.12.1"] + run_flags,
            "td2ms": cli + ["pt2ms", "--megatron-path", str(inputs["td"]), "--ms-path", str(out),
                            "--megatron-version", "0.12.1",
                            "--no-main-param-check"] + run_flags,   # the built source's weights are random too
            "cp-mc": ["cp", "-r", str(inputs["mc"]), str(out)],
            "pt2td": cli + ["convert", "--from", "torch", "--to", "torch_dist", "--src", str(inputs["mc"]),
                            "--dst", str(out), "--sharding-type", "fully_sharded_model_space"] + run_flags,
        }
        tiny = REPO.parent / "shared" / "fixtures" / "megatron-r0.6.0" / "legacy_tp1pp1dp1"
        if tiny.is_dir():   # start-up and fixed costs: a 3 MB checkpoint, one output file
            commands["pt2ms-tiny"] = cli + ["pt2ms", "--megatron-path", str(tiny), "--ms-path", str(out)] + run_flags
            inputs["tiny"] = tiny
        if ns.only:
            commands = {k: v for k, v in commands.items() if k in ns.only}
        # the inputs the chosen rows need, made by this checkout's ckptmap and cached in the work dir
        need = {input_of(k) for k in commands}
        if "shards" in need:
            build_shards(ms, inputs["shards"])
        if "msa" in need:
            build_with(made_by, inputs["msa"], ["convert", "--from", "torch", "--to", "msadapter", "--src", str(src),
                                                "--dst", "{out}", "--keep-foreign-rng"])
        if need & {"td", "mc"}:
            build_torch_dist(inputs["td"], size)
        if "mc" in need:
            build_with(made_by, inputs["mc"], ["convert", "--from", "torch_dist", "--to", "torch", "--src",
                                               str(inputs["td"]), "--dst", "{out}", "--target-megatron-version",
                                               "0.12.1"])
        envs = {k: env for k in commands}
        if ns.before:
            before_env = dict(env, PYTHONPATH=str(Path(ns.before).resolve()))
            for k in [k for k in commands if not k.startswith("cp")]:
                commands["before:" + k] = commands[k]
                envs["before:" + k] = before_env
        series: dict[str, list[dict]] = {k: [] for k in commands}
        sizes: dict[str, tuple[int, int]] = {}
        for _ in range(ns.repeat):
            for label, cmd in commands.items():
                shutil.rmtree(out, ignore_errors=True)
                kind = label.split(":")[-1]
                source = inputs[input_of(kind)]
                warm(source)   # untimed: cp -r and the conversions all start from a warm page cache
                # cwd outside any checkout: `python -c` puts the cwd first on sys.path, which would shadow
                # PYTHONPATH (--src / --before) with the ckptmap of the folder the script was started in
                r = run_measured(cmd, envs[label], cwd=work)
                series[label].append(r)
                sizes[label] = (du(source), du(out))
        shutil.rmtree(out, ignore_errors=True)
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "cpu", "user", "sys")}
               for k, v in series.items()}
        peak = {k: {m: max(r[m] for r in v) for m in ("anon", "rss")} for k, v in series.items()}
        print(f"\n{size}: source {du(src) / 1e9:.2f} GB (Megatron), {du(ms) / 1e9:.2f} GB (MindSpore); "
              f"{ns.repeat} rounds; load {load()}")
        print(f"{'command':19s} {'in GB':>6s} {'out GB':>6s} {'wall s':>7s} {'CPU s':>6s} {'user':>5s} {'sys':>5s} "
              f"{'x cp wall':>9s} {'x cp CPU':>8s} {'anon MiB':>8s} {'RSS MiB':>8s}")
        for label in commands:
            m, p = med[label], peak[label]
            kind = label.split(":")[-1]
            base = baseline_of(kind)
            ratio = f"{m['wall'] / med[base]['wall']:9.2f}" if base in med and base != label else f"{'':9s}"
            cratio = f"{m['cpu'] / med[base]['cpu']:8.2f}" if base in med and base != label else f"{'':8s}"
            print(f"{label:19s} {sizes[label][0] / 1e9:6.2f} {sizes[label][1] / 1e9:6.2f} {m['wall']:7.2f} "
                  f"{m['cpu']:6.2f} {m['user']:5.2f} {m['sys']:5.2f} {ratio} {cratio} {p['anon'] / 1024:8.0f} "
                  f"{p['rss'] / 1024:8.0f}", flush=True)


# which input each row reads ("" = the Megatron source), and so which `cp -r` row it is measured against
INPUT_OF = {"ms2pt": "ms", "cp-ms": "ms", "combine": "shards", "cp-shards": "shards", "msa2pt": "msa",
            "cp-msa": "msa", "td2pt": "td", "td2ms": "td", "cp-td": "td", "pt2td": "mc", "cp-mc": "mc",
            "pt2ms-tiny": "tiny"}


def input_of(label: str) -> str:
    return INPUT_OF.get(label, "")


def baseline_of(label: str) -> str | None:
    if label == "pt2ms-tiny":
        return None
    kind = input_of(label)
    return f"cp-{kind}" if kind else "cp"

if __name__ == "__main__":
    main()
