"""`ckptmap demo`: build a small Megatron-LM legacy GPT checkpoint (TP 2, PP 2, bf16, laid out as
Megatron saves it: every chunk's tensors are views of one parameter buffer), convert it with
`pt2ms --convert-param-only`, read the MindSpore files back and check every value.

The model description below is demo data — what a Megatron training run would have saved —
not conversion knowledge: the conversion itself only uses the bundled `.rules`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import attrs
import torch

from ckptmap.formats import megatron_files, megatron_folders, torch_zip_writer

@attrs.frozen
class DemoModel:
    """Shape of a legacy GPT model and its parallel layout (SwiGLU, RMSNorm, no biases, untied)."""

    tp: int = 2
    pp: int = 2
    dp: int = 2
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    groups: int = 2
    kv: int = 32
    ffn: int = 704
    vocab: int = 4096

    def layer_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        qkv_rows = (self.heads * self.kv + 2 * self.groups * self.kv) // self.tp
        return [
            ("input_norm.weight", (self.hidden,)),
            ("self_attention.query_key_value.weight", (qkv_rows, self.hidden)),
            ("self_attention.dense.weight", (self.hidden, self.heads * self.kv // self.tp)),
            ("post_attention_norm.weight", (self.hidden,)),
            ("mlp.dense_h_to_4h.weight", (2 * self.ffn // self.tp, self.hidden)),   # SwiGLU [gate; up]
            ("mlp.dense_4h_to_h.weight", (self.hidden, self.ffn // self.tp)),
        ]

    def stage_tensors(self, pp: int) -> list[tuple[list[str], tuple[int, ...]]]:
        """(nested key path, shape) of one rank's model dict, in state-dict order."""
        out = []
        if pp == 0:
            out.append((["language_model", "embedding", "word_embeddings", "weight"],
                        (self.vocab // self.tp, self.hidden)))
        for n in range(self.layers // self.pp):
            for suffix, shape in self.layer_shapes():
                out.append((["language_model", "encoder", f"layers.{n}.{suffix}"], shape))
        if pp == self.pp - 1:
            out.append((["language_model", "encoder", "final_norm.weight"], (self.hidden,)))
            out.append((["language_model", "output_layer", "weight"], (self.vocab // self.tp, self.hidden)))
        return out

    def args(self, iteration: int) -> argparse.Namespace:
        return argparse.Namespace(
            num_layers=self.layers, hidden_size=self.hidden, num_attention_heads=self.heads,
            num_query_groups=self.groups, kv_channels=self.kv, ffn_hidden_size=self.ffn,
            padded_vocab_size=self.vocab, swiglu=True, tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp, data_parallel_size=self.dp, context_parallel_size=1,
            virtual_pipeline_model_parallel_size=None, params_dtype=torch.bfloat16, bf16=True,
            untie_embeddings_and_output_weights=True, overlap_grad_reduce=False,
            use_distributed_optimizer=True, iteration=iteration, consumed_train_samples=iteration * 64,
            save="checkpoints/demo")


def rank_fields(rank: int) -> dict:
    """The args Megatron records per process: every rank's model_optim_rng.pt differs in them (so no
    two ranks' pickles are the same bytes, as in real checkpoints)."""
    return {"rank": rank, "local_rank": rank % 8}


def rng_state(pp: int, torch_state, seed: int = 1234) -> list:
    """``rng_state`` as Megatron saves it: Python's and NumPy's generator states (seeded per pipeline
    stage, ``seed + 100 * pp``, as Megatron seeds them; pickled objects, not tensors) and torch's."""
    import random

    import numpy as np

    return [{"random_rng_state": random.Random(seed + 100 * pp).getstate(),
             "np_rng_state": np.random.RandomState(seed + 100 * pp).get_state(),
             "torch_rng_state": torch_state}]


def build_megatron_checkpoint(save_root: Path, model: DemoModel = DemoModel(), iteration: int = 100,
                              seed: int = 0, keep_truth: bool = True, optimizer: bool = True) -> dict:
    """Write the checkpoint as Megatron core_r0.6.0 with the distributed optimizer would (a
    DemoMoEModel: as megatron-core 0.8+ would, see moe_stage_files; keyed by (tp, pp, ep)): per chunk
    one bf16 parameter buffer laid out by the rules' `buckets megatron` block (tensors are views of
    it), fp32 main params and Adam moments in ``distrib_optim.pt``, bf16 weights = main params
    rounded. Returns {(tp, pp): {dotted name: {"weight", "param", "exp_avg", "exp_avg_sq"}}}."""
    from ckptmap.mapping import buckets
    from ckptmap.mapping.layout import ParallelLayout
    from ckptmap.mapping.rules import bundled_rules, load_rules

    gen = torch.Generator().manual_seed(seed)
    truth = {}
    iter_dir = save_root / megatron_folders.iter_dir_name(iteration)
    if isinstance(model, DemoMoEModel):   # {(tp, pp, ep): ...}
        for pp in range(model.pp):
            for key, name, state, optim, rank_truth in moe_stage_files(model, pp, iteration, gen, keep_truth):
                rank_dir = iter_dir / name
                rank_dir.mkdir(parents=True, exist_ok=True)
                torch_zip_writer.save(state, rank_dir / megatron_folders.MODEL_FILE)
                if optimizer:
                    torch_zip_writer.save(optim, rank_dir / megatron_folders.OPTIM_FILE)
                truth[key] = rank_truth
        megatron_folders.write_tracker(save_root, iteration)
        return truth
    rule = load_rules(bundled_rules()["megatron_legacy_gpt"]).bucket_layout("megatron", "0.6")
    ranks = ParallelLayout(tp=model.tp, pp=model.pp, dp=model.dp)   # the model files: data-parallel rank 0's
    for tp in range(model.tp):
        for pp in range(model.pp):
            entries = model.stage_tensors(pp)
            names = [".".join(path) for path, _ in entries]
            params = [buckets.ParamEntry("module." + n, shape, "bfloat16") for n, (_, shape) in zip(names, entries)]
            env = buckets.layout_env(rule, {"dp": model.dp, "cp": 1, "dp_group": model.dp, "pp": model.pp, "pp_rank": pp, "chunk": 0,
                                            "overlap_grad_reduce": False,
                                            "untie_embeddings_and_output_weights": True})
            layout = buckets.build_buffer(rule, params, env)
            total = sum(b.numel for b in layout.buckets)
            states = {"param": torch.randn(total, generator=gen) * 0.02,
                      "exp_avg": torch.randn(total, generator=gen) * 1e-3,
                      "exp_avg_sq": torch.rand(total, generator=gen) * 1e-6}
            buffer = states["param"].to(torch.bfloat16)   # the DDP parameter buffer, padding included
            tree: dict = {}
            rank_truth = {}
            for name, (path, shape), slot in zip(names, entries, (layout.slot("module." + n) for n in names)):
                t = buffer[slot.start:slot.end].view(shape)
                node = tree
                for k in path[:-1]:
                    node = node.setdefault(k, {})
                node[path[-1]] = t
                rank_truth[name] = {"weight": t, **{k: v[slot.start:slot.end].view(shape) for k, v in states.items()}}
            state = {
                "args": argparse.Namespace(**vars(model.args(iteration)), **rank_fields(ranks.global_rank(tp=tp, pp=pp))),
                "checkpoint_version": megatron_files.CHECKPOINT_VERSION, "iteration": iteration, "model": tree,
                "optimizer": {"optimizer": {"param_groups": [
                    {"lr": 9.5e-5, "weight_decay": 0.01, "betas": (0.9, 0.95), "eps": 1e-8, "step": iteration},
                    {"lr": 9.5e-5, "weight_decay": 0.0, "betas": (0.9, 0.95), "eps": 1e-8, "step": iteration}]}},
                "opt_param_scheduler": {"max_lr": 1e-4, "lr_warmup_steps": 10, "num_steps": iteration * 64,
                                        "lr_decay_style": "cosine", "lr_decay_steps": 10000, "min_lr": 1e-5,
                                        "start_wd": 0.01, "end_wd": 0.01, "wd_incr_style": "constant",
                                        "wd_incr_steps": 10000},
                "rng_state": rng_state(pp, torch.get_rng_state()),
                "num_floating_point_operations_so_far": 0,
            }
            rank_dir = iter_dir / megatron_folders.mp_rank_dir_name(tp, pp, model.pp)
            rank_dir.mkdir(parents=True, exist_ok=True)
            torch_zip_writer.save(state, rank_dir / megatron_folders.MODEL_FILE)
            if optimizer:
                key = (torch.bfloat16, torch.float32)
                bucket_tensors = {k: [v[b.start:b.start + b.numel].clone() for b in layout.buckets]
                                  for k, v in states.items()}
                torch_zip_writer.save({"per_bucket_numel": [{key: layout.per_bucket_numel}],
                                "per_bucket_numel_unpadded": [{key: layout.per_bucket_numel_unpadded}],
                                0: {key: bucket_tensors}}, rank_dir / megatron_folders.OPTIM_FILE)
            truth[(tp, pp)] = rank_truth if keep_truth else None
    megatron_folders.write_tracker(save_root, iteration)
    return truth


@attrs.frozen
class DemoMoEModel:
    """Shape of a megatron.core GPTModel with mixture-of-experts layers (local spec: SequentialMLP
    experts, a router per layer, untied embeddings, no linear biases) and its parallel layout, as
    megatron-core 0.8 - 0.16 saves it in the legacy format: one ``mp_rank_TT[_PPP]_EEE`` folder per
    (tp, pp, ep) rank, the model file written by expert-data-parallel rank 0, the dense optimizer
    state by data-parallel rank 0 only (so ``[None, expert]`` in expert ranks > 0's distrib_optim.pt).
    Experts are split over TP like the dense MLP (expert_tensor_parallel_size = tp)."""

    tp: int = 1
    pp: int = 1
    dp: int = 4                  # data-parallel size; expert parallelism is carved out of it
    ep: int = 2
    experts: int = 4             # num_experts, all layers; ep must divide it
    layers: int = 2
    hidden: int = 40
    heads: int = 4
    groups: int = 4
    kv: int = 10
    ffn: int = 24                # of each expert
    vocab: int = 64
    swiglu: bool = False
    norm_bias: bool = True       # LayerNorm (weight + bias); False: RMSNorm (weight only)
    overlap_grad_reduce: bool = False
    bucket_size: int | None = None
    version: str = "0.12"        # the rules' `buckets megatron` block the buffers are laid out by

    def __attrs_post_init__(self):
        if self.dp % self.ep or self.experts % self.ep or self.layers % self.pp:
            raise ValueError(f"{self}: ep must divide dp and experts, pp must divide layers")

    def norm(self, name: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{name}.weight", (self.hidden,))] + ([(f"{name}.bias", (self.hidden,))] if self.norm_bias else [])

    def layer_tensors(self, n: int) -> list[tuple[str, tuple[int, ...] | None]]:
        """(name, shape) of one layer in state-dict order (= registration order); shape None: an
        ``_extra_state`` entry (None in the local spec's checkpoints)."""
        p = f"decoder.layers.{n}."
        qkv_rows = (self.heads + 2 * self.groups) * self.kv // self.tp
        fc1_rows = (2 if self.swiglu else 1) * self.ffn // self.tp
        out = self.norm(p + "input_layernorm") + [
            (p + "self_attention.linear_proj.weight", (self.hidden, self.heads * self.kv // self.tp)),
            (p + "self_attention.linear_proj._extra_state", None),
            (p + "self_attention.linear_qkv.weight", (qkv_rows, self.hidden)),
            (p + "self_attention.linear_qkv._extra_state", None),
        ] + self.norm(p + "pre_mlp_layernorm") + [(p + "mlp.router.weight", (self.experts, self.hidden))]
        for e in range(self.experts // self.ep):
            q = f"{p}mlp.experts.local_experts.{e}."
            out += [(q + "linear_fc1.weight", (fc1_rows, self.hidden)), (q + "linear_fc1._extra_state", None),
                    (q + "linear_fc2.weight", (self.hidden, self.ffn // self.tp)), (q + "linear_fc2._extra_state", None)]
        return out

    def stage_tensors(self, pp: int) -> list[tuple[str, tuple[int, ...] | None]]:
        out = [("embedding.word_embeddings.weight", (self.vocab // self.tp, self.hidden))] if pp == 0 else []
        per_stage = self.layers // self.pp
        for n in range(per_stage):
            out += self.layer_tensors(n)
        if pp == self.pp - 1:
            out += self.norm("decoder.final_layernorm") + [("output_layer.weight", (self.vocab // self.tp, self.hidden)),
                                                           ("output_layer._extra_state", None)]
        return out

    @staticmethod
    def is_expert(name: str) -> bool:
        return ".mlp.experts." in name

    def args(self, iteration: int) -> argparse.Namespace:
        return argparse.Namespace(
            num_layers=self.layers, encoder_num_layers=self.layers, hidden_size=self.hidden,
            num_attention_heads=self.heads, num_query_groups=self.groups, group_query_attention=self.groups != self.heads,
            kv_channels=self.kv, ffn_hidden_size=self.ffn, padded_vocab_size=self.vocab, vocab_size=self.vocab,
            swiglu=self.swiglu, add_qkv_bias=False, add_bias_linear=False,
            normalization="LayerNorm" if self.norm_bias else "RMSNorm",
            num_experts=self.experts, moe_router_topk=2, moe_grouped_gemm=False, moe_token_dispatcher_type="allgather",
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
            expert_model_parallel_size=self.ep, expert_tensor_parallel_size=self.tp,
            data_parallel_size=self.dp, context_parallel_size=1, virtual_pipeline_model_parallel_size=None,
            world_size=self.tp * self.pp * self.dp, params_dtype=torch.bfloat16, bf16=True,
            main_params_dtype=torch.float32, exp_avg_dtype=torch.float32, exp_avg_sq_dtype=torch.float32,
            untie_embeddings_and_output_weights=True, overlap_grad_reduce=self.overlap_grad_reduce,
            ddp_bucket_size=self.bucket_size, use_distributed_optimizer=True, iteration=iteration,
            consumed_train_samples=iteration * 64, save="checkpoints/demo_moe")


def _param_groups(params, expert: bool, iteration: int, policy) -> list[dict]:
    """megatron-core 0.8 - 0.13's saved param groups of one optimizer: a group per wd_mult (0 for the
    parameters the rules' ``param_groups`` block exempts from weight decay, else 1) in the order the rank's
    ``params`` (state-dict order) first need them."""
    def group(wd_mult):
        return {"wd_mult": wd_mult, "lr_mult": 1.0, "is_expert_parallel": expert, "is_decoupled_lr": False,
                "max_lr": 1e-4, "min_lr": 1e-5, "lr": 9.5e-5, "bias_correction": True, "betas": (0.9, 0.95),
                "eps": 1e-8, "weight_decay": 0.01 * wd_mult, "step": iteration}
    order = []
    for name, shape in params:
        wd_mult = 0.0 if policy.no_weight_decay(name, shape) else 1.0
        if wd_mult not in order:
            order.append(wd_mult)
    return [group(w) for w in order]


def _coalesced(layout, states: dict) -> dict:
    """A buffer's entry of a coalesced distrib_optim.pt (megatron-core >= 0.7): per state, every
    bucket's unpadded part concatenated; then numel_unpadded."""
    entry = {k: torch.cat([v[b.start:b.start + b.numel_unpadded] for b in layout.buckets]) for k, v in states.items()}
    entry["numel_unpadded"] = layout.numel_unpadded
    return entry


def moe_stage_files(model: DemoMoEModel, pp: int, iteration: int, gen: torch.Generator, keep_truth: bool = True):
    """Every (tp, ep) rank of pipeline stage ``pp``: yields ((tp, pp, ep), folder name, model_optim_rng state,
    distrib_optim state, truth {name: {"weight", "param", "exp_avg", "exp_avg_sq"}} or None), laid out
    as megatron-core's DDP does (buffers per the rules' ``buckets megatron`` block of
    ``model.version``: dense and expert parameters in buffers of their own, 64-element aligned
    parameter starts whose gaps hold zeros, bucket ends padded for the buffer's DP group), model
    tensors views of those bf16 buffers, fp32 main params that round to them."""
    from collections import OrderedDict

    from ckptmap.mapping import buckets
    from ckptmap.mapping.layout import ParallelLayout
    from ckptmap.mapping.rules import bundled_rules, load_rules

    rules = load_rules(bundled_rules()["megatron_core_gpt"])
    rule = rules.bucket_layout("megatron", model.version)
    policy = rules.param_group_policies("megatron", (model.version, model.version))[0]
    sizes = ParallelLayout(tp=model.tp, pp=model.pp, dp=model.dp, ep=model.ep)
    entries = model.stage_tensors(pp)
    weights = [(n, s) for n, s in entries if s is not None]
    groups = {"dense": [(n, s) for n, s in weights if not model.is_expert(n)],
              "expert": [(n, s) for n, s in weights if model.is_expert(n)]}
    layouts = {}
    for kind, params in groups.items():
        env = buckets.layout_env(rule, {
            "dp": model.dp, "cp": 1, "ep": model.ep, "dp_group": sizes.expert_dp if kind == "expert" else sizes.dp,
            "pp": model.pp, "pp_rank": pp, "chunk": 0, "bucket_size": model.bucket_size,
            "overlap_grad_reduce": model.overlap_grad_reduce, "untie_embeddings_and_output_weights": True})
        layouts[kind] = buckets.build_buffer(rule, [buckets.ParamEntry("module." + n, s, "bfloat16") for n, s in params],
                                             env)

    def random_states(layout):
        total = sum(b.numel for b in layout.buckets)
        states = {"param": torch.randn(total, generator=gen) * 0.02,
                  "exp_avg": torch.randn(total, generator=gen) * 1e-3,
                  "exp_avg_sq": torch.rand(total, generator=gen) * 1e-6}
        used = torch.zeros(total, dtype=torch.bool)
        for slot in layout.slots:
            used[slot.start:slot.end] = True
        for v in states.values():   # alignment gaps and bucket padding: zeros, as in Megatron's buffers
            v[~used] = 0
        return states

    key = (torch.bfloat16, torch.float32)
    scheduler = {"max_lr": 1e-4, "lr_warmup_steps": 10, "num_steps": iteration * 64, "lr_decay_style": "cosine",
                 "lr_decay_steps": 10000, "min_lr": 1e-5, "start_wd": 0.01, "end_wd": 0.01,
                 "wd_incr_style": "constant", "wd_incr_steps": 10000}
    for tp in range(model.tp):
        dense_states = random_states(layouts["dense"])   # replicated over data (and expert) parallel ranks
        for ep in range(model.ep):
            states = {"dense": dense_states, "expert": random_states(layouts["expert"])}
            views = {}
            for kind, layout in layouts.items():
                buffer = states[kind]["param"].to(torch.bfloat16)   # the DDP parameter buffer, padding included
                slots = {slot.name: slot for slot in layout.slots}   # buffer order: reverse registration
                for name, shape in groups[kind]:
                    slot = slots["module." + name]
                    views[name] = (buffer[slot.start:slot.end].view(shape), kind, slot)
            tree = OrderedDict()
            tree._metadata = OrderedDict([("", {"version": 1})])
            for name, shape in entries:
                tree[name] = views[name][0] if shape is not None else None
            state = {
                # the model file is written by expert-data-parallel rank 0: data-parallel rank ep (DP = EP)
                "args": argparse.Namespace(**vars(model.args(iteration)),
                                           **rank_fields(sizes.global_rank(tp=tp, pp=pp, dp=ep))),
                "checkpoint_version": megatron_files.CHECKPOINT_VERSION, "iteration": iteration, "model": tree,
                "optimizer": [{"optimizer": {"param_groups": _param_groups(groups[kind], kind == "expert", iteration, policy)}}
                              for kind in ("dense", "expert")],
                "opt_param_scheduler": scheduler,
                "rng_state": rng_state(pp, gen.get_state()),
                "num_floating_point_operations_so_far": 0,
            }
            optim = [{"buckets_coalesced": True, 0: {key: _coalesced(layouts[kind], states[kind])}}
                     for kind in ("dense", "expert")]
            if ep > 0:   # the dense optimizer's DP rank 0 is in expert rank 0's folder
                optim[0] = None
            truth = None
            if keep_truth:
                truth = {name: {"weight": t, **{k: v[slot.start:slot.end].view(t.shape) for k, v in states[kind].items()}}
                         for name, (t, kind, slot) in views.items()}
            yield (tp, pp, ep), megatron_folders.mp_rank_dir_name(tp, pp, model.pp, ep), state, optim, truth


def run_demo(workdir: Path | None = None) -> int:
    from ckptmap.cli.printing import print_plan, print_report
    from ckptmap.execute import run_plan
    from ckptmap.mapping.compiler import Pt2MsOptions, compile_pt2ms
    from ckptmap.mapping.ms2pt import Ms2PtOptions, compile_ms2pt
    from ckptmap.verify import md5_report

    holder = None
    if workdir is None:
        holder = tempfile.TemporaryDirectory(prefix="ckptmap-demo-")
        workdir = Path(holder.name)
    try:
        src, dst, back = workdir / "megatron", workdir / "mindspore", workdir / "megatron_again"
        model = DemoModel()
        print(f"== 1. a Megatron legacy GPT checkpoint with the distributed optimizer (TP {model.tp}, PP {model.pp}, "
              f"DP {model.dp}, bf16) in {src}")
        truth = build_megatron_checkpoint(src, model)
        size = sum(p.stat().st_size for p in src.rglob("*.pt"))
        print(f"   {len(truth)} mp_rank folders, {size / 2**20:.1f} MiB")

        print("\n== 2. the plan: `ckptmap plan pt2ms --megatron-path … --ms-path … --dry-run` (summary)")
        plan = compile_pt2ms(Pt2MsOptions(megatron_path=str(src), ms_path=str(dst)))
        print_plan(plan, detail=False)

        print("\n== 3. converting to MindSpore (fp32 main params + Adam moments)")
        report = run_plan(plan, processes=2, progress=False, overwrite=True)   # the demo owns its folders
        print_report(report)
        if report.failed:
            return 1

        print("\n== 4. reading the MindSpore files back")
        rows, all_ok = [], True
        for f in plan.files:
            if f.format != "ckpt":
                continue
            loaded = _load_back(dst / f.path)
            tp, pp = _rank_of(f, plan)
            equal = checked = 0
            for t in f.tensors:
                if not t.sources:
                    continue
                state = next((s for s in ("exp_avg_sq", "exp_avg") if t.name.startswith(s + ".")), "param")
                expected = truth[(tp, pp)][t.note.split(" ")[0]][state]
                checked += 1
                equal += int(torch.equal(loaded[t.name], expected))
            ok = equal == checked
            all_ok &= ok
            layers = sorted({int(part) for n in loaded for part in n.split(".") if part.isdigit()})
            rows.append((f.path, f"tp{tp} pp{pp}", str(len(loaded)), f"{layers}", f"{equal}/{checked}",
                         "ok" if ok else "MISMATCH"))
        header = ("MindSpore file", "Megatron rank", "keys", "global layers", "bit-exact", "")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        for r in [header] + rows:
            print("   " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))

        print("\n== 5. and back: `ckptmap ms2pt`, then md5 of every file against the original")
        report = run_plan(compile_ms2pt(Ms2PtOptions(ms_path=str(dst), megatron_path=str(back))),
                          processes=2, progress=False, overwrite=True)
        if report.failed:
            print_report(report)
            return 1
        for original in sorted(src.rglob("*.pt")):
            same, lines = md5_report([original, back / original.relative_to(src)])
            all_ok &= same
            print(f"   {str(original.relative_to(src)):45s} {'identical' if same else 'DIFFERENT'}  "
                  f"{lines[-1].split(': ')[-1] if same else ''}")
        print("\n" + ("demo ok: MindSpore holds every main param and moment bit-exactly, and the way back "
                      "reproduces Megatron's files byte for byte" if all_ok else "demo FAILED"))
        return 0 if all_ok else 1
    finally:
        if holder is not None:
            holder.cleanup()


def _load_back(path: Path) -> dict:
    """Read with the real MindSpore when it is installed (it is, via `make demo`), else ckptmap's reader."""
    try:
        import mindspore
    except ImportError:
        from ckptmap.formats.mindspore_ckpt import load
        return load(path)
    return {k: torch.from_numpy(v.asnumpy()) for k, v in mindspore.load_checkpoint(str(path)).items()}


def _rank_of(file_task, plan) -> tuple[int, int]:
    source = Path(file_task.source_path(next(t.sources[0].file for t in file_task.tensors if t.sources))).parent.name
    parts = megatron_folders.parse_mp_rank_dir_name(source)
    return parts[0], parts[1] if len(parts) > 1 else 0
