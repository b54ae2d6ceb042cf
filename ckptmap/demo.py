"""`ckptmap demo`: build a small Megatron-LM legacy GPT checkpoint (TP 2, PP 2, bf16, laid out as
Megatron saves it: every chunk's tensors are views of one parameter buffer), convert it with
`pt2ms --convert-param-only`, read the MindSpore files back and check every value.

The model description below is demo data — what a Megatron training run would have saved —
not conversion knowledge: the conversion itself only uses the bundled `.rules`.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from ckptmap.formats import megatron, torch_zip

TP, PP, DP = 2, 2, 2
LAYERS, HIDDEN, HEADS, GROUPS, KV, FFN, VOCAB = 4, 256, 8, 2, 32, 704, 4096


def _layer_shapes(tp: int) -> list[tuple[str, tuple[int, ...]]]:
    qkv_rows = (HEADS * KV + 2 * GROUPS * KV) // tp
    return [
        ("input_norm.weight", (HIDDEN,)),
        ("self_attention.query_key_value.weight", (qkv_rows, HIDDEN)),
        ("self_attention.dense.weight", (HIDDEN, HEADS * KV // tp)),
        ("post_attention_norm.weight", (HIDDEN,)),
        ("mlp.dense_h_to_4h.weight", (2 * FFN // tp, HIDDEN)),   # SwiGLU [gate; up]
        ("mlp.dense_4h_to_h.weight", (HIDDEN, FFN // tp)),
    ]


def _stage_tensors(tp: int, pp: int) -> list[tuple[list[str], tuple[int, ...]]]:
    """(nested key path, shape) of one rank's model dict, in state-dict order."""
    out = []
    if pp == 0:
        out.append((["language_model", "embedding", "word_embeddings", "weight"], (VOCAB // TP, HIDDEN)))
    for n in range(LAYERS // PP):
        for suffix, shape in _layer_shapes(TP):
            out.append((["language_model", "encoder", f"layers.{n}.{suffix}"], shape))
    if pp == PP - 1:
        out.append((["language_model", "encoder", "final_norm.weight"], (HIDDEN,)))
        out.append((["language_model", "output_layer", "weight"], (VOCAB // TP, HIDDEN)))
    return out


def _args(iteration: int) -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        kv_channels=KV, ffn_hidden_size=FFN, padded_vocab_size=VOCAB, swiglu=True,
        tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP, data_parallel_size=DP,
        context_parallel_size=1, virtual_pipeline_model_parallel_size=None, params_dtype=torch.bfloat16,
        bf16=True, use_distributed_optimizer=True, iteration=iteration, consumed_train_samples=iteration * 64,
        save="checkpoints/demo")


def build_megatron_checkpoint(save_root: Path, iteration: int = 100, seed: int = 0) -> dict:
    """Write the demo checkpoint; returns {(tp, pp): {dotted name: bf16 tensor}} as truth."""
    gen = torch.Generator().manual_seed(seed)
    truth = {}
    iter_dir = save_root / megatron.iter_dir_name(iteration)
    for tp in range(TP):
        for pp in range(PP):
            entries = _stage_tensors(tp, pp)
            numels = [math.prod(shape) for _, shape in entries]
            # Megatron: one bf16 buffer per chunk, parameters in reverse order, tensors are views of it
            buffer = (torch.randn(sum(numels), generator=gen) * 0.02).to(torch.bfloat16)
            model: dict = {}
            offset = sum(numels)
            names = {}
            for (path, shape), numel in zip(entries, numels):
                offset -= numel
                t = buffer[offset:offset + numel].view(shape)
                node = model
                for k in path[:-1]:
                    node = node.setdefault(k, {})
                node[path[-1]] = t
                names[".".join(path)] = t
            state = {
                "args": _args(iteration), "checkpoint_version": megatron.CHECKPOINT_VERSION,
                "iteration": iteration, "model": model,
                "optimizer": {"optimizer": {"param_groups": [{"lr": 1e-4, "step": iteration}]}},
                "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": iteration},
                "rng_state": [{"random_rng_state": (3, tuple(range(5)), None)}],
                "num_floating_point_operations_so_far": 0,
            }
            rank_dir = iter_dir / megatron.mp_rank_dir_name(tp, pp, PP)
            rank_dir.mkdir(parents=True, exist_ok=True)
            torch_zip.save(state, rank_dir / megatron.MODEL_FILE)
            truth[(tp, pp)] = names
    megatron.write_tracker(save_root, iteration)
    return truth


def run_demo(workdir: Path | None = None) -> int:
    from ckptmap.cli import print_plan, print_report
    from ckptmap.execute import run_plan
    from ckptmap.formats.mindspore_ckpt import load as load_ckpt
    from ckptmap.mapping.compiler import Pt2MsOptions, compile_pt2ms

    holder = None
    if workdir is None:
        holder = tempfile.TemporaryDirectory(prefix="ckptmap-demo-")
        workdir = Path(holder.name)
    try:
        src, dst = workdir / "megatron", workdir / "mindspore"
        print(f"== 1. building a Megatron legacy GPT checkpoint (TP {TP}, PP {PP}, bf16) in {src}")
        truth = build_megatron_checkpoint(src)
        size = sum(p.stat().st_size for p in src.rglob("*.pt"))
        print(f"   {len(truth)} mp_rank files, {size / 2**20:.1f} MiB")

        print("\n== 2. the plan (ckptmap plan pt2ms --convert-param-only --dry-run)")
        plan = compile_pt2ms(Pt2MsOptions(megatron_path=str(src), ms_path=str(dst), convert_param_only=True,
                                          dp_size=DP))
        print_plan(plan, detail=False)

        print("\n== 3. converting")
        t0 = time.perf_counter()
        report = run_plan(plan, processes=2, progress=False)
        print_report(report)
        if report.failed:
            return 1

        print(f"\n== 4. reading the MindSpore files back ({time.perf_counter() - t0:.2f} s so far)")
        rows, all_ok = [], True
        for f in plan.files:
            if f.format != "ckpt":
                continue
            loaded = load_ckpt(dst / f.path)
            tp, pp = _rank_of(f, plan)
            equal = 0
            for t in f.tensors:
                if not t.sources:
                    continue
                expected = truth[(tp, pp)][t.note].float()
                got = loaded[t.name]
                equal += int(got.dtype == torch.float32 and torch.equal(got, expected))
            weights = sum(1 for t in f.tensors if t.sources)
            ok = equal == weights
            all_ok &= ok
            layers = sorted({int(part) for n in loaded for part in n.split(".") if part.isdigit()})
            rows.append((f.path, f"tp{tp} pp{pp}", str(len(loaded)), f"{layers}",
                         f"{equal}/{weights}", "ok" if ok else "MISMATCH"))
        header = ("MindSpore file", "Megatron rank", "keys", "global layers", "bit-exact", "")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        for r in [header] + rows:
            print("   " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
        print("\n" + ("demo ok: every MindSpore tensor equals the Megatron weight (bf16 -> fp32 exact)"
                      if all_ok else "demo FAILED: some tensors differ"))
        return 0 if all_ok else 1
    finally:
        if holder is not None:
            holder.cleanup()


def _rank_of(file_task, plan) -> tuple[int, int]:
    source = Path(next(t.sources[0].file for t in file_task.tensors if t.sources)).parent.name
    parts = megatron.parse_mp_rank_dir_name(source)
    return parts[0], parts[1] if len(parts) > 1 else 0
