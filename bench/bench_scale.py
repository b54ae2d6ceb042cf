"""Benchmark: planning and converting checkpoints with many ranks (project issue 16).

Builds tiny legacy GPT checkpoints with the distributed optimizer, saved as TP 8 x PP N mp_rank
folders (each with ``model_optim_rng.pt`` and ``distrib_optim.pt``, laid out exactly as
``ckptmap.demo.build_megatron_checkpoint`` writes them), then measures, each in a fresh process:

* ``ckptmap plan pt2ms --dry-run`` (reads every rank's object tree and ``distrib_optim.pt``
  header, derives every bucket layout, prints the whole plan to /dev/null);
* ``ckptmap plan pt2ms -o plan.json`` (the same, plus the plan saved as JSON);
* ``ckptmap pt2ms`` (the full conversion, 2 worker processes);
* with ``--ms2pt``, the way back from that conversion's output: ``ckptmap plan ms2pt --dry-run`` and
  ``ckptmap ms2pt`` (2 workers; the MindSpore checkpoint is converted once, unmeasured, by the CLI measured);

with wall time, CPU time (user + system of the process tree: steadier than wall time when other
jobs share the machine) and the peak memory of the whole process tree, sampled every 20 ms: RSS
(which also counts mmap'd source pages) and, separately, proportional anonymous memory (Pss_Anon:
what the processes allocate; pages shared by forked workers count once). It also times
``import torch`` alone, splits one plan of each checkpoint into imports / compile / printing /
JSON in a fresh process, and times the rank arithmetic of a 16,384-rank layout
(TP 8 x PP 64 x DP 32 x EP 32).

    PYTHONPATH=. .venv/bin/python bench/bench_scale.py [--ranks 512 1024 4096] [--all-dp 32]
        [--workdir DIR] [--keep] [--repeat N] [--no-convert] [--profile] [--src OTHER_CHECKOUT]

``--all-dp 32`` also builds a TP 8 x PP 64 checkpoint saved with DP 32 and plans it with
``--generate-all-dp-cp`` (16,384 MindSpore rank files). ``--moe --ep 32`` builds mixture-of-experts
checkpoints instead (megatron-core 0.12 layout, ``ckptmap.demo.DemoMoEModel``: a router and
``--experts-per-rank`` SequentialMLP experts per layer and EP rank, dense and expert buffers, DP = EP):
``--ranks 16384 --moe --ep 32`` is TP 8 x PP 64 x EP 32, 16,384 ``mp_rank_TT_PPP_EEE`` folders. ``--profile`` prints a cProfile of the
in-process compile of the two last checkpoints. ``--src`` measures another checkout's CLI, e.g.
the commit before a change (``git archive COMMIT ckptmap | tar -x -C /tmp/old``); the checkpoints
are still built by this one. Checkpoints are cached in the work dir (keyed by their shape), so
re-runs skip the build (4,096 ranks: 8,192 files, 335 MB, ~6 s on 2 cores). Results are copied
into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing as mp
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_pt2ms import run_measured
from ckptmap.demo import DemoModel, DemoMoEModel, moe_stage_files, rank_fields, rng_state
from ckptmap.formats import megatron_files, megatron_folders

REPO = Path(__file__).resolve().parent.parent
# -P: the checkout named by PYTHONPATH (--src), not one in the current directory
CLI = [sys.executable, "-P", "-c", "import sys; from ckptmap.cli import main; sys.exit(main())"]


def tiny_model(tp: int, pp: int, dp: int = 1, hidden: int = 64) -> DemoModel:
    """One transformer layer per pipeline stage, hidden 64: ~70 KB per rank, 19 tensors (hidden 256:
    ~1 MB per rank; the bytes grow with its square, the tensors stay)."""
    return DemoModel(tp=tp, pp=pp, dp=dp, layers=pp, hidden=hidden, heads=8, groups=2, kv=hidden // 8,
                     ffn=2 * hidden, vocab=256)


def tiny_moe_model(tp: int, pp: int, ep: int, experts_per_rank: int = 1) -> DemoMoEModel:
    """One MoE layer per pipeline stage, hidden 64, ``experts_per_rank`` local experts; DP = EP (the
    smallest data-parallel size expert parallelism allows: expert-data-parallel size 1)."""
    return DemoMoEModel(tp=tp, pp=pp, dp=ep, ep=ep, experts=ep * experts_per_rank, layers=pp, hidden=64, heads=8,
                        groups=2, kv=8, ffn=128, vocab=256, swiglu=True, norm_bias=False)


def checkpoint_name(model) -> str:
    """Keyed by shape and by the writer's version (v2: each rank's args name its rank, stages have their
    own Python and NumPy RNG states, as in Megatron's files: no two ranks' pickles are the same bytes)."""
    return _shape_name(model) + "_v2"


def _shape_name(model) -> str:
    if isinstance(model, DemoMoEModel):
        return f"megatron_moe_tp{model.tp}_pp{model.pp}_ep{model.ep}_x{model.experts // model.ep}"
    return f"megatron_tp{model.tp}_pp{model.pp}_dp{model.dp}" + ("" if model.hidden == 64 else f"_h{model.hidden}")


# ------------------------------------------------------------------------------------------ builder


def _build_stage(job) -> None:
    """Every tp rank of one pipeline stage, as ckptmap.demo.build_megatron_checkpoint writes it
    (same object tree — each rank's args with its own rank, as Megatron's —, same bucket layout from
    the bundled rules), with a seed per rank so stages
    can be built in parallel, and with torch.save (its C pickler) instead of ckptmap's
    torch_zip.save (pure-Python pickler + a temporary directory per file: 4x slower here)."""
    iter_dir, model, pp, iteration = job
    from ckptmap.mapping import buckets
    from ckptmap.mapping.layout import ParallelLayout
    from ckptmap.mapping.rules import bundled_rules, load_rules

    rule = load_rules(bundled_rules()["megatron_legacy_gpt"]).bucket_layout("megatron", "0.6")
    entries = model.stage_tensors(pp)
    names = [".".join(path) for path, _ in entries]
    params = [buckets.ParamEntry("module." + n, shape, "bfloat16") for n, (_, shape) in zip(names, entries)]
    env = buckets.layout_env(rule, {"dp": model.dp, "cp": 1, "dp_group": model.dp, "pp": model.pp, "pp_rank": pp,
                                    "chunk": 0,
                                    "overlap_grad_reduce": False, "untie_embeddings_and_output_weights": True})
    layout = buckets.build_buffer(rule, params, env)
    slots = [layout.slot("module." + n) for n in names]
    total = sum(b.numel for b in layout.buckets)
    args = model.args(iteration)
    ranks = ParallelLayout(tp=model.tp, pp=model.pp, dp=model.dp)   # the model files: data-parallel rank 0's
    for tp in range(model.tp):
        gen = torch.Generator().manual_seed(pp * model.tp + tp)
        states = {"param": torch.randn(total, generator=gen) * 0.02,
                  "exp_avg": torch.randn(total, generator=gen) * 1e-3,
                  "exp_avg_sq": torch.rand(total, generator=gen) * 1e-6}
        buffer = states["param"].to(torch.bfloat16)
        tree: dict = {}
        for (path, shape), slot in zip(entries, slots):
            node = tree
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = buffer[slot.start:slot.end].view(shape)
        state = {
            "args": argparse.Namespace(**vars(args), **rank_fields(ranks.global_rank(tp=tp, pp=pp))), "checkpoint_version": megatron_files.CHECKPOINT_VERSION, "iteration": iteration,
            "model": tree,
            "optimizer": {"optimizer": {"param_groups": [
                {"lr": 9.5e-5, "weight_decay": 0.01, "betas": (0.9, 0.95), "eps": 1e-8, "step": iteration},
                {"lr": 9.5e-5, "weight_decay": 0.0, "betas": (0.9, 0.95), "eps": 1e-8, "step": iteration}]}},
            "opt_param_scheduler": {"max_lr": 1e-4, "lr_warmup_steps": 10, "num_steps": iteration * 64,
                                    "lr_decay_style": "cosine", "lr_decay_steps": 10000, "min_lr": 1e-5,
                                    "start_wd": 0.01, "end_wd": 0.01, "wd_incr_style": "constant",
                                    "wd_incr_steps": 10000},
            "rng_state": rng_state(pp, gen.get_state()),
            "num_floating_point_operations_so_far": 0,
        }
        rank_dir = iter_dir / megatron_folders.mp_rank_dir_name(tp, pp, model.pp)
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, rank_dir / megatron_folders.MODEL_FILE)
        key = (torch.bfloat16, torch.float32)
        torch.save({"per_bucket_numel": [{key: layout.per_bucket_numel}],
                    "per_bucket_numel_unpadded": [{key: layout.per_bucket_numel_unpadded}],
                    0: {key: {k: [v[b.start:b.start + b.numel].clone() for b in layout.buckets]
                              for k, v in states.items()}}},
                   rank_dir / megatron_folders.OPTIM_FILE)


def _build_moe_stage(job) -> None:
    """Every (tp, ep) rank of one pipeline stage of an MoE checkpoint: ckptmap.demo.moe_stage_files'
    objects, saved with torch.save."""
    iter_dir, model, pp, iteration = job
    gen = torch.Generator().manual_seed(pp)
    for _, name, state, optim, _ in moe_stage_files(model, pp, iteration, gen, keep_truth=False):
        rank_dir = iter_dir / name
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, rank_dir / megatron_folders.MODEL_FILE)
        torch.save(optim, rank_dir / megatron_folders.OPTIM_FILE)


def build_checkpoint(save_root: Path, model, iteration: int = 100, processes: int = 2) -> float:
    """Write the checkpoint (stages split over `processes`); returns the seconds it took."""
    t0 = time.perf_counter()
    partial = save_root.with_name(save_root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    iter_dir = partial / megatron_folders.iter_dir_name(iteration)
    iter_dir.mkdir(parents=True)
    jobs = [(iter_dir, model, pp, iteration) for pp in range(model.pp)]
    build = _build_moe_stage if isinstance(model, DemoMoEModel) else _build_stage
    with mp.get_context("fork").Pool(processes) as pool:
        for _ in pool.imap_unordered(build, jobs, chunksize=4):
            pass
    megatron_folders.write_tracker(partial, iteration)
    os.replace(partial, save_root)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ runs


def du(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def import_torch_seconds(repeat: int = 5) -> float:
    """Best-of wall time of `import torch` in a fresh interpreter, minus an empty interpreter."""
    def best(code):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - t0)
        return min(times)
    return best("import torch") - best("pass")


def layout_arithmetic(tp=8, pp=64, dp=32, ep=32) -> dict:
    """Seconds to enumerate every global rank of every mp_rank of a TP x PP x DP (EP) layout."""
    from ckptmap.mapping.layout import ParallelLayout
    t0 = time.perf_counter()
    lay = ParallelLayout(tp=tp, pp=pp, dp=dp, ep=ep)
    n = sum(len(lay.mp_rank_ranks(t, p, all_dp_cp=True)) for p in range(pp) for t in range(tp))
    zero = sum(len(lay.mp_rank_ranks(t, p, all_dp_cp=False)) for p in range(pp) for t in range(tp))
    return {"world": lay.world_size, "ranks": n, "zero_redundancy": zero, "seconds": time.perf_counter() - t0}


PHASES = """
import os, sys, time
t = [time.perf_counter()]; c = [time.process_time()]
def mark():
    t.append(time.perf_counter()); c.append(time.process_time())
mark()   # torch is no longer imported by a plan (issue 14): this phase is empty
from ckptmap.cli import print_plan
from ckptmap.mapping.compiler import Pt2MsOptions, compile_pt2ms; mark()
plan = compile_pt2ms(Pt2MsOptions(megatron_path=sys.argv[1], ms_path=sys.argv[2], generate_all_dp_cp=sys.argv[3] == "1"))
mark()
with open(os.devnull, "w") as f:
    try:
        print_plan(plan, out=f, detail=False, summary=True)   # what --dry-run prints by default
    except TypeError:   # ckptmap before the summary: the full listing
        print_plan(plan, out=f)
mark()
with open(os.devnull, "w") as f:
    plan.write_json(f) if hasattr(plan, "write_json") else f.write(plan.to_json())  # older ckptmap: one string
mark()
names = ["(torch)", "import ckptmap", "compile_pt2ms", "print_plan (--dry-run)", "write_json (-o)"]
print("; ".join(f"{n} {c[i + 1] - c[i]:.2f} s CPU / {t[i + 1] - t[i]:.2f} s wall" for i, n in enumerate(names)))
"""


def phases(src: Path, out: Path, extra: dict) -> str:
    """Where the time of a plan goes, in a fresh process: imports, compile, printing, JSON."""
    done = subprocess.run([sys.executable, "-P", "-c", PHASES, str(src), str(out),
                           "1" if extra.get("generate_all_dp_cp") else "0"], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def profile_compile(src: Path, out: Path, extra: dict, top: int = 25) -> str:
    from ckptmap.mapping.compiler import Pt2MsOptions, compile_pt2ms
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    plan = compile_pt2ms(Pt2MsOptions(megatron_path=str(src), ms_path=str(out), **extra))
    prof.disable()
    seconds = time.perf_counter() - t0
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return f"compile_pt2ms of {src.name}: {len(plan.files)} files, {seconds:.2f} s under cProfile\n{buf.getvalue()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir")
    ap.add_argument("--ranks", type=int, nargs="+", default=[512, 1024, 4096],
                    help="world sizes to build and measure (TP 8, PP = ranks / 8, DP 1)")
    ap.add_argument("--all-dp", type=int, default=0,
                    help="also plan a TP 8 x PP 64 checkpoint saved with this DP, with --generate-all-dp-cp")
    ap.add_argument("--moe", action="store_true",
                    help="mixture-of-experts checkpoints: TP 8 x PP (ranks / 8 / EP) x EP, DP = EP")
    ap.add_argument("--ep", type=int, default=32, help="expert-parallel size with --moe")
    ap.add_argument("--experts-per-rank", type=int, default=1, help="local experts per EP rank with --moe")
    ap.add_argument("--hidden", type=int, default=64,
                    help="hidden size of the dense checkpoints (64: ~70 KB per rank; 256: ~1 MB per rank, for the "
                         "conversion time once ranks hold bytes)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (the fastest is shown)")
    ap.add_argument("--no-convert", action="store_true", help="plan only; skip the full conversion")
    ap.add_argument("--ms2pt", action="store_true",
                    help="also measure the way back (plan ms2pt --dry-run, ms2pt) from a pt2ms output")
    ap.add_argument("--profile", action="store_true", help="cProfile the compile of the largest checkpoint")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (checkpoints are reused)")
    ap.add_argument("--out-dir", help="where the conversions (and cp -r) write, e.g. /dev/shm: every run into a "
                                      "fresh folder, all removed after the checkpoint's runs (default: the work "
                                      "dir). On ext4 without a journal, creating files just after deleting many "
                                      "makes the allocator skip recently deleted inodes: a cost of the benchmark")
    ap.add_argument("--src", default=str(REPO),
                    help="the ckptmap checkout whose CLI is measured (default: this one), e.g. an older commit "
                         "exported with `git archive` for a before/after comparison")
    ns = ap.parse_args()
    work = Path(ns.workdir or tempfile.mkdtemp(prefix="ckptmap-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    # the CLI runs in fresh processes: make them import this checkout of ckptmap
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ns.src, os.environ.get("PYTHONPATH")]))
    # with bytecode caching, as an installed ckptmap runs (some shells set PYTHONDONTWRITEBYTECODE: every run
    # would compile ckptmap again, 1 - 2 s of a 16,384-rank dry run; bench_copy and bench_startup do the same)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.chdir(work)  # `python -c` puts the working directory first on sys.path: keep checkouts out of it

    out_root = Path(ns.out_dir) if ns.out_dir else work
    fresh = iter(range(1 << 30))

    def measured(cmd, out=None):
        best = None
        for _ in range(ns.repeat):
            if out is not None:   # each run writes into a folder of its own (pt2ms never overwrites)
                run_out = out_root / f"ckptmap-scale-out-{os.getpid()}-{next(fresh)}"
                cmd = [str(run_out) if c == str(out) else c for c in cmd]
                out = run_out
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = run_measured(cmd)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            # CPU seconds of the process tree (user + system): less sensitive than wall time to other
            # load on the machine
            r["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            r["out"] = out
            if out is not None:   # counted, then removed: output held in memory (tmpfs) slows the next run
                r["written"] = du(out)
                shutil.rmtree(out, ignore_errors=True)
            if best is None or r["seconds"] < best["seconds"]:
                best = r
        return best

    def remove_outputs():
        for old in out_root.glob(f"ckptmap-scale-out-{os.getpid()}-*"):
            shutil.rmtree(old, ignore_errors=True)

    if ns.moe:
        cases = [(f"{r} ranks (TP 8 x PP {r // 8 // ns.ep} x EP {ns.ep}, MoE)",
                  tiny_moe_model(8, r // 8 // ns.ep, ns.ep, ns.experts_per_rank), {}) for r in ns.ranks]
    else:
        wide = "" if ns.hidden == 64 else f", hidden {ns.hidden}"
        cases = [(f"{r} ranks (TP 8 x PP {r // 8}{wide})", tiny_model(8, r // 8, hidden=ns.hidden), {})
                 for r in ns.ranks]
    if ns.all_dp:
        cases.append((f"{512 * ns.all_dp} ranks (TP 8 x PP 64 x DP {ns.all_dp}, --generate-all-dp-cp)",
                      tiny_model(8, 64, ns.all_dp), {"generate_all_dp_cp": True}))
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} cores; work dir {work}")
    print(f"import torch alone: {import_torch_seconds():.2f} s")
    print(f"measuring the ckptmap of {ns.src}")
    if ns.src == str(REPO):
        arith = layout_arithmetic()
        print(f"rank arithmetic TP 8 x PP 64 x DP 32 x EP 32: {arith['ranks']} ranks of {arith['world']} "
              f"(+ {arith['zero_redundancy']} zero-redundancy) in {arith['seconds']:.3f} s")
    header = (f"{'case':58s} {'step':20s} {'wall s':>7s} {'CPU s':>7s} {'files':>6s} {'MB':>7s} "
              f"{'peak RSS MiB':>13s} {'peak anon MiB':>14s}")
    rows = []
    for label, model, extra in cases:
        src = work / checkpoint_name(model)
        if not src.exists():
            seconds = build_checkpoint(src, model)
            n, size = du(src)
            print(f"built {label}: {n} files, {size / 1e6:.0f} MB in {seconds:.1f} s")
        flags = ["--megatron-path", str(src)] + (["--generate-all-dp-cp"] if extra.get("generate_all_dp_cp") else [])
        out = out_root / "ckptmap-scale-out"
        steps = [("plan --dry-run", CLI + ["plan", "pt2ms"] + flags + ["--ms-path", str(out), "--dry-run"], None),
                 ("plan -o plan.json", CLI + ["plan", "pt2ms"] + flags + ["--ms-path", str(out), "-o",
                                                                         str(work / "plan.json")], work / "plan.json")]
        if not ns.no_convert:
            steps.append(("cp -r of the source", ["cp", "-r", str(src), str(out)], out))
            steps.append(("pt2ms (2 workers)", CLI + ["pt2ms"] + flags + ["--ms-path", str(out), "--no-progress",
                                                                         "--process-limit", "2"], out))
        ms_dir = out_root / f"ckptmap-scale-out-{os.getpid()}-ms"   # the way back reads it (removed with the rest)
        if ns.ms2pt:
            subprocess.run(CLI + ["pt2ms"] + flags + ["--ms-path", str(ms_dir), "--no-progress"], check=True,
                           stdout=subprocess.DEVNULL)
            steps.append(("plan ms2pt --dry-run", CLI + ["plan", "ms2pt", "--ms-path", str(ms_dir), "--megatron-path",
                                                         str(out), "--dry-run"], None))
            steps.append(("ms2pt (2 workers)", CLI + ["ms2pt", "--ms-path", str(ms_dir), "--megatron-path", str(out),
                                                      "--no-progress", "--process-limit", "2"], out))
        for step, cmd, written in steps:
            r = measured(cmd, out if written == out else None)
            n, size = r["written"] if written == out else (1, written.stat().st_size) if written else (0, 0)
            rows.append(f"{label:58s} {step:20s} {r['seconds']:7.2f} {r['cpu']:7.2f} {n:6d} {size / 1e6:7.1f} "
                        f"{r['rss'] / 1024:13.0f} {r['anon'] / 1024:14.0f}")
            if len(rows) == 1:
                print(header)
            print(rows[-1])
        remove_outputs()
    print()
    for label, model, extra in cases:
        src = work / checkpoint_name(model)
        print(f"{label}: {phases(src, work / 'out', extra)}")
    if ns.profile:
        for label, model, extra in cases[-2:]:
            src = work / checkpoint_name(model)
            print("\n" + profile_compile(src, work / "out", extra))
    (work / "plan.json").unlink(missing_ok=True)
    if not ns.keep and not ns.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
