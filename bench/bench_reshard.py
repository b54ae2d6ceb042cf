"""Benchmark: `ckptmap reshard` TP 2 -> TP 1 of a multi-GB legacy Megatron checkpoint with the
distributed optimizer's state (bf16 weights in model_optim_rng.pt, fp32 main params and both Adam
moments in distrib_optim.pt), against `cp -r` of the same files. Records wall time and the peak
proportional anonymous memory of the whole process tree (PSS anon from /proc/*/smaps_rollup, as
bench_pt2ms.py does: what the tool allocates, forked workers' shared pages counted once) and the
largest single target tensor, which is what one worker holds at a time.

    .venv/bin/python bench/bench_reshard.py [--workdir DIR] [--layers N] [--repeat N] [--keep]

The TP 2 source is made by resharding a TP 1 checkpoint built by ckptmap.demo (real on-disk format:
tensors as views of the DDP parameter buffer, per-bucket distrib_optim.pt): the demo builder draws
every rank independently, so its TP 2 ranks would disagree on replicated tensors (layer norms),
which reshard refuses; a TP 1 build resharded to TP 2 is a faithful TP 2 checkpoint. Its param_map
files say the layout but not the version, so the target's is named (--target-megatron-version 0.6).
"""

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pt2ms import du, run_measured  # noqa: E402  (same sampler: PSS anon + RSS of the tree, 20 ms)

from ckptmap.demo import DemoModel, build_megatron_checkpoint  # noqa: E402

VOCAB = 32000


def largest_target_tensor(model: DemoModel) -> tuple[str, int]:
    """The largest tensor a TP 1 target holds, in bytes as one worker assembles it (fp32 states)."""
    shapes = {"word embeddings / output layer (fp32 state)": (model.vocab, model.hidden),
              "mlp.dense_h_to_4h (fp32 state)": (2 * model.ffn, model.hidden)}
    name = max(shapes, key=lambda k: math.prod(shapes[k]))
    return name, 4 * math.prod(shapes[name])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    ns = ap.parse_args()
    work = Path(ns.workdir or tempfile.mkdtemp(prefix="ckptmap-bench-reshard-"))
    ckptmap = str(Path(sys.executable).with_name("ckptmap"))
    tp1, src = work / "tp1", work / "tp2"
    model = DemoModel(tp=1, pp=1, dp=1, layers=ns.layers, hidden=2048, heads=16, groups=4, kv=128, ffn=5632,
                      vocab=VOCAB)
    if not src.exists():
        t0 = time.perf_counter()
        if not tp1.exists():
            build_megatron_checkpoint(tp1, model, keep_truth=False, optimizer=True)
        subprocess.run([ckptmap, "reshard", "--megatron-path", str(tp1), "--output-path", str(src),
                        "--target-tp-size", "2", "--vocab-size", str(VOCAB), "--no-progress"], check=True,
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(tp1)
        print(f"built the TP 2 source ({du(src) / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    size = du(src)
    name, biggest = largest_target_tensor(model)
    runs = {
        "cp -r": lambda out: ["cp", "-r", str(src), str(out)],
        "ckptmap reshard TP2->TP1 (2 procs)": lambda out: [
            ckptmap, "reshard", "--megatron-path", str(src), "--output-path", str(out), "--target-tp-size", "1",
            "--vocab-size", str(VOCAB), "--target-megatron-version", "0.6", "--no-progress", "--process-limit", "2"],
        "ckptmap reshard TP2->TP1 (1 proc)": lambda out: [
            ckptmap, "reshard", "--megatron-path", str(src), "--output-path", str(out), "--target-tp-size", "1",
            "--vocab-size", str(VOCAB), "--target-megatron-version", "0.6", "--no-progress", "--multiprocess-off"],
        "python -c 'import ckptmap.cli, torch'": lambda out: [
            sys.executable, "-c", "import ckptmap.cli, ckptmap.mapping.reshard, ckptmap.execute, torch"],
    }
    print(f"source: {size / 1e9:.2f} GB, legacy GPT TP2 PP1 DP1, {ns.layers} layers, hidden 2048, vocab {VOCAB}, "
          f"weights + distributed optimizer")
    print(f"largest target tensor: {name}, {biggest / 2**20:.0f} MiB")
    print(f"{'command':38s} {'best s':>7s} {'out GB':>7s} {'peak PSS anon MiB':>18s} {'peak RSS MiB':>13s} {'procs':>5s}")
    for label, make in runs.items():
        best = None
        for _ in range(ns.repeat):
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            r = run_measured(make(out))
            r["out"] = du(out) if out.exists() else 0
            if best is None or r["seconds"] < best["seconds"]:
                best = r
        print(f"{label:38s} {best['seconds']:7.2f} {best['out'] / 1e9:7.2f} {best['anon'] / 1024:18.0f} "
              f"{best['rss'] / 1024:13.0f} {best['procs']:5d}")
    shutil.rmtree(work / "out", ignore_errors=True)
    if not ns.keep and not ns.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
