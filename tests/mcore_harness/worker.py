"""What one rank process runs: real megatron-core 0.6.0 DDP + DistributedOptimizer on CPU.

The steps follow Megatron-LM core_r0.6.0's ``pretrain_gpt.py`` / ``megatron/training``
(get_model, setup_model_and_optimizer, train_step, save_checkpoint) with the megatron.core pieces
called directly; the few things that live in ``megatron.training`` (not part of the megatron-core
wheel) — the lr/wd scheduler, the GPT batch, the loss function, the RNG-state collection and the
legacy save — are re-written here in a few lines each, following that source.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import random
import sys
import traceback
import warnings
from pathlib import Path

SEQ_LENGTH = 16
MICRO_BATCH_SIZE = 2
NUM_MICROBATCHES = 2
LR, MIN_LR, LR_DECAY_ITERS = 1e-3, 1e-5, 10
WEIGHT_DECAY, BETAS, ADAM_EPS, CLIP_GRAD = 0.01, (0.9, 0.95), 1e-8, 1.0
INIT_METHOD_STD = 0.02
DEFAULT_BUCKET_SIZE = 40_000_000
COLLECTIVE_TIMEOUT_S = 120
FAULT_ENV = "MCORE_HARNESS_FAULT"


FAKE_MEGATRON_TRAINING = Path(__file__).resolve().parent.parent / "fake_megatron_training"


def entry(rank: int, world_size: int, port: int, case: dict, out_dir: str, save: bool, tmp_dir: str,
          options: dict | None = None):
    """Process target. Writes ``rank{r}.err`` (traceback) or ``rank{r}.ok`` into ``tmp_dir``.
    ``options``: ``rank_setup`` (a callable run in every rank before the model is built) and
    ``megatron_training`` (use the test-only ``megatron.training`` of ``tests/fake_megatron_training``)."""
    code = 0
    try:
        if "mcore_harness.preload" not in sys.modules:
            raise RuntimeError("the fork server did not import mcore_harness.preload (see _context)")
        _main(rank, world_size, port, case, Path(out_dir), save, Path(tmp_dir), options or {})
        (Path(tmp_dir) / f"rank{rank}.ok").write_text("ok")
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        code = 1
        (Path(tmp_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter teardown: gloo threads of a failed peer could otherwise block the exit.
        os._exit(code)


# ------------------------------------------------------------------------------ Megatron bits

class OptimizerParamScheduler:
    """megatron.training.optimizer_param_scheduler.OptimizerParamScheduler, the parts used here
    (cosine lr decay without warm-up, constant weight decay)."""

    def __init__(self, optimizer, max_lr, min_lr, lr_warmup_steps, lr_decay_steps, lr_decay_style,
                 start_wd, end_wd, wd_incr_steps, wd_incr_style):
        self.optimizer = optimizer
        self.init_lr = 0.0
        self.max_lr, self.min_lr = float(max_lr), min_lr
        self.lr_warmup_steps, self.lr_decay_steps = lr_warmup_steps, lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.start_wd, self.end_wd = start_wd, end_wd
        self.wd_incr_steps, self.wd_incr_style = wd_incr_steps, wd_incr_style
        self.num_steps = 0
        self.step(0)

    def get_wd(self):
        assert self.wd_incr_style == "constant"
        return self.end_wd

    def get_lr(self, param_group):
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * float(self.num_steps) / float(self.lr_warmup_steps)
        if self.lr_decay_style == "constant":
            return max_lr
        if self.num_steps > self.lr_decay_steps:
            return min_lr
        assert self.lr_decay_style == "cosine"
        decay_ratio = float(self.num_steps - self.lr_warmup_steps) / float(self.lr_decay_steps - self.lr_warmup_steps)
        coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return min_lr + coeff * (max_lr - min_lr)

    def step(self, increment):
        self.num_steps += increment
        new_wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = new_wd * group.get("wd_mult", 1.0)

    def state_dict(self):
        return {
            "max_lr": self.max_lr, "lr_warmup_steps": self.lr_warmup_steps, "num_steps": self.num_steps,
            "lr_decay_style": self.lr_decay_style, "lr_decay_steps": self.lr_decay_steps,
            "min_lr": self.min_lr, "start_wd": self.start_wd, "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style, "wd_incr_steps": self.wd_incr_steps,
        }


def _num_floating_point_operations(a, batch_size):
    """megatron.training.training.num_floating_point_operations (core_r0.6.0)."""
    query_groups = a.num_query_groups if a.group_query_attention else a.num_attention_heads
    swiglu_factor = 3 if a.swiglu else 2
    return (12 * batch_size * a.seq_length * a.num_layers * a.hidden_size * a.hidden_size * (
        1 + (a.ffn_hidden_size / a.hidden_size) * 1 * (swiglu_factor / 2)
        + query_groups / a.num_attention_heads + a.seq_length / a.hidden_size
        + a.padded_vocab_size / (2 * a.num_layers * a.hidden_size)))


def _make_args(case, out_dir: Path, world_size, kv_channels, gbs, bucket_size, iteration):
    import torch
    from megatron.core.enums import ModelType

    a = argparse.Namespace()
    fields = dict(
        num_layers=case["num_layers"], encoder_num_layers=case["num_layers"], decoder_num_layers=None,
        hidden_size=case["hidden"], ffn_hidden_size=case["ffn"], num_attention_heads=case["heads"],
        kv_channels=kv_channels, group_query_attention=False, num_query_groups=case["heads"],
        max_position_embeddings=SEQ_LENGTH, position_embedding_type="rope",
        use_rotary_position_embeddings=False, rotary_percent=1.0, rotary_interleaved=False,
        add_position_embedding=True, make_vocab_size_divisible_by=1, normalization="LayerNorm",
        norm_epsilon=1e-5, apply_layernorm_1p=False, swiglu=case["swiglu"],
        untie_embeddings_and_output_weights=not case["tied_embeddings"],
        attention_dropout=0.0, hidden_dropout=0.0, weight_decay=WEIGHT_DECAY,
        start_weight_decay=WEIGHT_DECAY, end_weight_decay=WEIGHT_DECAY, weight_decay_incr_style="constant",
        clip_grad=CLIP_GRAD, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=ADAM_EPS,
        micro_batch_size=MICRO_BATCH_SIZE, global_batch_size=gbs, use_cpu_initialization=True,
        train_iters=case["steps"], add_bias_linear=case["bias"], add_qkv_bias=False, optimizer="adam",
        sequence_parallel=False, gradient_accumulation_fusion=False, use_mcore_models=True,
        seed=case["seed"], init_method_std=INIT_METHOD_STD, lr=LR, lr_decay_style="cosine",
        lr_decay_iters=LR_DECAY_ITERS, lr_warmup_iters=0, min_lr=MIN_LR,
        save=f"checkpoints/{out_dir.name}", save_interval=1, load=None, use_dist_ckpt=False,
        fp16=False, bf16=True, loss_scale=None, accumulate_allreduce_grads_in_fp32=True,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        distributed_backend="gloo",
        overlap_grad_reduce=case["overlap_grad_reduce"], delay_grad_reduce=True,
        overlap_param_gather=False, use_distributed_optimizer=True,
        context_parallel_size=case["cp"], expert_model_parallel_size=1, num_experts=None,
        vocab_size=case["vocab"], seq_length=SEQ_LENGTH, encoder_seq_length=SEQ_LENGTH,
        tokenizer_type="NullTokenizer", transformer_impl="local", rank=0, world_size=world_size,
        transformer_pipeline_model_parallel_size=1, data_parallel_size=case["dp"],
        virtual_pipeline_model_parallel_size=case.get("chunks", 1) if case.get("chunks", 1) > 1 else None,
        num_layers_per_virtual_pipeline_stage=(case["num_layers"] // case["chunks"]
                                               if case.get("chunks", 1) > 1 else None),
        params_dtype=torch.bfloat16,
        consumed_train_samples=gbs * iteration, consumed_valid_samples=0, padded_vocab_size=case["vocab"],
        model_type=ModelType.encoder_or_decoder, ddp_bucket_size=bucket_size,
        # Megatron's own save keeps args.iteration at its load-time value (0 for a fresh run).
        iteration=0, num_floating_point_operations_so_far=0, curr_iteration=0,
    )
    for k, v in fields.items():
        setattr(a, k, v)
    return a


def _gpt_batches(case, dp_rank, step, vocab):
    """Random GPT micro-batches in Megatron's batch format, identical on all CP ranks of a replica."""
    import torch

    out = []
    for mb in range(NUM_MICROBATCHES):
        g = torch.Generator().manual_seed(1_000_003 * (case["seed"] + 1) + 10_007 * dp_rank + 101 * step + mb)
        text = torch.randint(0, vocab, (MICRO_BATCH_SIZE, SEQ_LENGTH + 1), generator=g)
        mask = (torch.tril(torch.ones(SEQ_LENGTH, SEQ_LENGTH)).unsqueeze(0) < 0.5)
        out.append({
            "tokens": text[:, :-1].contiguous(),
            "labels": text[:, 1:].contiguous(),
            "loss_mask": torch.ones(MICRO_BATCH_SIZE, SEQ_LENGTH, dtype=torch.float),
            "attention_mask": mask.unsqueeze(0).expand(MICRO_BATCH_SIZE, 1, SEQ_LENGTH, SEQ_LENGTH).contiguous(),
            "position_ids": torch.arange(SEQ_LENGTH).unsqueeze(0).expand(MICRO_BATCH_SIZE, -1).contiguous(),
        })
    return out


def _batch_on_this_cp_rank(batch):
    """megatron.training.utils.get_batch_on_this_cp_rank."""
    import torch
    from megatron.core import parallel_state

    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return batch
    r = parallel_state.get_context_parallel_rank()
    out = {}
    for key, val in batch.items():
        seq_dim = 1 if key != "attention_mask" else 2
        val = val.view(*val.shape[:seq_dim], 2 * cp, val.shape[seq_dim] // (2 * cp), *val.shape[seq_dim + 1:])
        val = val.index_select(seq_dim, torch.tensor([r, 2 * cp - r - 1]))
        out[key] = val.view(*val.shape[:seq_dim], -1, *val.shape[seq_dim + 2:])
    return out


def _loss_func(cp_size, loss_mask, output_tensor):
    """pretrain_gpt.loss_func of core_r0.6.0 (without the logging reduction)."""
    import torch
    from megatron.core import parallel_state

    losses = output_tensor.float()
    loss_mask = loss_mask.view(-1).float()
    if cp_size > 1:
        loss = torch.cat([torch.sum(losses.view(-1) * loss_mask).view(1), loss_mask.sum().view(1)])
        torch.distributed.all_reduce(loss, group=parallel_state.get_context_parallel_group())
        loss = loss[0] / loss[1]
    else:
        loss = torch.sum(losses.view(-1) * loss_mask) / loss_mask.sum()
    return loss * cp_size, {"lm loss": loss.detach()}


def _forward_step(cp_size, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, functools.partial(_loss_func, cp_size, batch["loss_mask"])


# ------------------------------------------------------------------------------------ the rank

def _injected_fault(rank, spec):
    """Test hook: ``MCORE_HARNESS_FAULT=<rank>:raise`` or ``<rank>:hang`` makes that rank fail or
    block forever right after joining the process group (the peers then block in collectives)."""
    if spec.partition(":")[0] != str(rank):
        return
    if spec.partition(":")[2] == "hang":
        import time
        while True:
            time.sleep(1)
    raise RuntimeError(f"injected failure on rank {rank} ({FAULT_ENV}={spec})")


def _main(rank, world_size, port, case, out_dir: Path, save: bool, tmp_dir: Path, options: dict):
    # ckptmap's own warnings (from hooks run in this rank) are recorded and returned in the result
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("always", message="ckptmap")
        _run_rank(rank, world_size, port, case, out_dir, save, tmp_dir, options, caught)


def _run_rank(rank, world_size, port, case, out_dir: Path, save: bool, tmp_dir: Path, options: dict, caught):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("NVTE_APPLY_QK_LAYER_SCALING", "0")

    from . import stubs
    stubs.install()
    if options.get("megatron_training"):
        # megatron is a namespace package in the megatron-core wheel: this adds megatron.training
        sys.path.insert(0, str(FAKE_MEGATRON_TRAINING))

    import numpy as np
    import torch
    torch.set_num_threads(1)

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.custom_layers.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.module import Float16Module
    stubs.install_cpu_rng_tracker()

    dp, cp = case["dp"], case["cp"]
    chunks = case.get("chunks", 1)
    with stubs.CudaOnCpu():
        if options.get("rank_setup") is not None:
            options["rank_setup"](rank=rank, out_dir=out_dir, case=case)
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=cp,
            distributed_timeout_minutes=max(1, COLLECTIVE_TIMEOUT_S // 60))
        if chunks > 1:
            # Megatron's initialize_model_parallel refuses virtual pipelining below PP 3 at this
            # version; the chunk bookkeeping itself is just this setting.
            parallel_state.set_virtual_pipeline_model_parallel_world_size(chunks)
        assert parallel_state.get_data_parallel_world_size() == dp
        _injected_fault(rank, options.get("fault", ""))

        # megatron.training.initialize._set_random_seed (pp rank 0, no data-parallel random init)
        seed = case["seed"]
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

        heads, hidden = case["heads"], case["hidden"]
        kv_channels = max(1, hidden // heads)
        bucket_size = DEFAULT_BUCKET_SIZE if case["bucket_size"] is None else case["bucket_size"]
        gbs = MICRO_BATCH_SIZE * NUM_MICROBATCHES * dp
        iteration = case["steps"]
        megatron_args = None
        if options.get("megatron_training"):
            import megatron.training
            megatron_args = _make_args(case, out_dir, world_size, kv_channels, gbs, bucket_size, iteration)
            megatron_args.save = str(out_dir) if save else None   # the real --save (or none)
            megatron.training.set_args(megatron_args)

        # ---- model (pretrain_gpt.model_provider with --use-mcore-models, local spec) ----
        config = TransformerConfig(
            num_layers=case["num_layers"], hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=heads, kv_channels=kv_channels, ffn_hidden_size=case["ffn"],
            hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=case["bias"],
            gated_linear_unit=case["swiglu"],
            activation_func=torch.nn.functional.silu if case["swiglu"] else torch.nn.functional.gelu,
            normalization="LayerNorm", layernorm_epsilon=1e-5, init_method_std=INIT_METHOD_STD,
            bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
            use_cpu_initialization=True, perform_initialization=True,
            tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=cp,
            sequence_parallel=False, gradient_accumulation_fusion=False,
            bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
            apply_rope_fusion=False, persist_layer_norm=True, deallocate_pipeline_outputs=True)
        spec = get_gpt_layer_local_spec()
        if cp > 1:
            # megatron.core 0.6's local DotProductAttention refuses context parallelism; the
            # attention core holds no parameters, so the TE core (pure-torch stand-in) keeps the
            # local spec's parameters, names and buffer layout unchanged.
            spec.submodules.self_attention.submodules.core_attention = TEDotProductAttention
        if case["model"] != "mcore":
            raise ValueError(f"unknown model {case['model']!r} (only 'mcore')")
        # megatron.training.training.get_model: one model per virtual-pipeline chunk, built with the
        # chunk's virtual rank set (first / last stage decide embedding / output layer), then each
        # wrapped in Float16Module and DDP, in order, bucketing only for chunk 0.
        models = []
        for i in range(chunks):
            if chunks > 1:
                parallel_state.set_virtual_pipeline_model_parallel_rank(i)
            model = GPTModel(
                config=config, transformer_layer_spec=spec, vocab_size=case["vocab"],
                max_sequence_length=SEQ_LENGTH, pre_process=parallel_state.is_pipeline_first_stage(),
                post_process=parallel_state.is_pipeline_last_stage(),
                fp16_lm_cross_entropy=False, parallel_output=True,
                share_embeddings_and_output_weights=case["tied_embeddings"],
                position_embedding_type="rope", rotary_percent=1.0)
            for param in model.parameters():
                tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
            models.append(Float16Module(config, model))
        ddps = [DistributedDataParallel(
            config, model,
            data_parallel_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            accumulate_allreduce_grads_in_fp32=True,
            overlap_grad_reduce=case["overlap_grad_reduce"],
            use_distributed_optimizer=True,
            expert_data_parallel_group=parallel_state.get_data_modulo_expert_parallel_group(),
            disable_bucketing=(i > 0), check_for_nan_in_grad=True, bucket_size=bucket_size)
            for i, model in enumerate(models)]

        # ---- optimizer (setup_model_and_optimizer) ----
        opt_config = OptimizerConfig(
            optimizer="adam", lr=LR, min_lr=MIN_LR, weight_decay=WEIGHT_DECAY, bf16=True,
            params_dtype=torch.bfloat16, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=ADAM_EPS,
            use_distributed_optimizer=True, overlap_grad_reduce=case["overlap_grad_reduce"],
            overlap_param_gather=False, clip_grad=CLIP_GRAD)
        optimizer = get_megatron_optimizer(opt_config, ddps)
        scheduler = OptimizerParamScheduler(
            optimizer, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=0, lr_decay_steps=LR_DECAY_ITERS * gbs,
            lr_decay_style="cosine", start_wd=WEIGHT_DECAY, end_wd=WEIGHT_DECAY,
            wd_incr_steps=case["steps"] * gbs, wd_incr_style="constant")

        if case.get("load_from"):
            # megatron.training.checkpointing.load_checkpoint with --use-distributed-optimizer:
            # the optimizer state exists (init_state_fn), then the real load_parameter_state fills it
            optimizer.init_state_fn(optimizer.optimizer)
            optimizer.load_parameter_state(case["load_from"])
        else:
            _train(case, ddps, optimizer, scheduler, config, gbs)
            if save:
                flops = float(_num_floating_point_operations(
                    _make_args(case, out_dir, world_size, kv_channels, gbs, bucket_size, iteration), gbs) * iteration)
                if megatron_args is not None:
                    # as Megatron-LM's train loop saves: training.save_checkpoint_and_time calls the
                    # save_checkpoint that training.py imported by name
                    import megatron.training.training
                    megatron.training.training.save_checkpoint_and_time(iteration, ddps, optimizer, scheduler, flops)
                else:
                    _save(case, out_dir, ddps, optimizer, scheduler, world_size, kv_channels, gbs, bucket_size,
                          iteration)

        result = _collect(case, ddps, optimizer, bucket_size)
        torch.distributed.barrier()
        if rank == 0:
            result["warnings"] = [str(w.message) for w in caught if str(w.message).startswith("ckptmap")]
            torch.save(result, tmp_dir / "result.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _train(case, ddps, optimizer, scheduler, config, gbs):
    """megatron.training.training.train / train_step, ``case["steps"]`` iterations."""
    import contextlib

    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config.grad_scale_func = optimizer.scale_loss
    if case["overlap_grad_reduce"]:
        config.no_sync_func = ddps[0].no_sync if len(ddps) == 1 else [d.no_sync for d in ddps]
    config.finalize_model_grads_func = finalize_model_grads
    cp = case["cp"]
    dp_rank = parallel_state.get_data_parallel_rank()
    for step in range(case["steps"]):
        for ddp in ddps:
            ddp.zero_grad_buffer()
        optimizer.zero_grad()
        batches = [_batch_on_this_cp_rank(b) for b in _gpt_batches(case, dp_rank, step, case["vocab"])]
        if len(ddps) == 1:
            get_forward_backward_func()(
                forward_step_func=functools.partial(_forward_step, cp), data_iterator=iter(batches),
                model=ddps, num_microbatches=NUM_MICROBATCHES, seq_length=SEQ_LENGTH,
                micro_batch_size=MICRO_BATCH_SIZE, decoder_seq_length=SEQ_LENGTH, forward_only=False)
        else:
            # Model chunks on one rank (virtual pipelining without a pipeline): the chunks run one
            # after the other in one autograd graph, set_input_tensor carrying the hidden states,
            # the loss scaled like the schedules do; grads sync for every chunk at the end.
            for mb, batch in enumerate(batches):
                last = mb == len(batches) - 1
                with contextlib.ExitStack() as stack:
                    if case["overlap_grad_reduce"] and not last:
                        for ddp in ddps:
                            stack.enter_context(ddp.no_sync())
                    hidden = None
                    for i, ddp in enumerate(ddps):
                        parallel_state.set_virtual_pipeline_model_parallel_rank(i)
                        if i > 0:
                            ddp.module.set_input_tensor(hidden)
                        hidden = ddp(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                                     labels=batch["labels"] if i == len(ddps) - 1 else None)
                    loss, _ = _loss_func(cp, batch["loss_mask"], hidden)
                    optimizer.scale_loss(loss / NUM_MICROBATCHES).backward()
            finalize_model_grads(ddps)
        ok, _grad_norm, _ = optimizer.step()
        if not ok:
            raise RuntimeError(f"optimizer step {step} was skipped")
        scheduler.step(increment=gbs)


def _save(case, out_dir, ddps, optimizer, scheduler, world_size, kv_channels, gbs, bucket_size, iteration):
    """megatron.training.checkpointing.save_checkpoint (legacy torch format), tp = pp = 1."""
    args = _make_args(case, out_dir, world_size, kv_channels, gbs, bucket_size, iteration)
    flops = float(_num_floating_point_operations(args, gbs) * iteration)
    save_legacy_checkpoint(out_dir, iteration, ddps, optimizer, scheduler, args, flops)


def save_legacy_checkpoint(out_dir, iteration, ddps, optimizer, scheduler, args, flops):
    """The files Megatron-LM core_r0.6.0's save_checkpoint writes (legacy torch format, tp = pp = 1):
    ``distrib_optim.pt`` by the optimizer's own save_parameter_state, ``model_optim_rng.pt`` (``model``,
    or ``model0``, ``model1``, … for several chunks) by DP rank 0, then the tracker file."""
    import numpy as np
    import torch
    from megatron.core import parallel_state, tensor_parallel

    out_dir = Path(out_dir)
    rng_state = [{
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state(),  # the CPU generator's state (stand-in)
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }]
    ckpt_dir = out_dir / f"iter_{iteration:07d}" / "mp_rank_00"
    writer = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    if writer:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    optimizer.save_parameter_state(str(ckpt_dir / "distrib_optim.pt"))
    if writer:
        state_dict = {}
        state_dict["args"] = args
        state_dict["checkpoint_version"] = 3.0
        state_dict["iteration"] = iteration
        if len(ddps) == 1:
            state_dict["model"] = ddps[0].state_dict_for_save_checkpoint()
        else:
            for i, ddp in enumerate(ddps):
                parallel_state.set_virtual_pipeline_model_parallel_rank(i)
                state_dict[f"model{i}"] = ddp.state_dict_for_save_checkpoint()
        state_dict["optimizer"] = optimizer.state_dict()
        state_dict["opt_param_scheduler"] = scheduler.state_dict()
        state_dict["rng_state"] = rng_state
        state_dict["num_floating_point_operations_so_far"] = flops
        torch.save(state_dict, ckpt_dir / "model_optim_rng.pt")
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (out_dir / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    torch.distributed.barrier()


def _flatten_keys(d, prefix=""):
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flatten_keys(v, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k}")
    return out


def _collect(case, ddps, optimizer, bucket_size):
    """Buffer layout from the real buffers, and the live optimizer state stitched from all ranks."""
    import torch

    # Names as the MindSpeed param_map patch records them: the DDP's param_to_name, i.e. the
    # names of DDP.module (Megatron's Float16Module) = "module." + the GPTModel parameter name.
    names_of = [{p: n for n, p in ddp.module.named_parameters()} for ddp in ddps]
    chunk_of = {p: (v, n) for v, name_of in enumerate(names_of) for p, n in name_of.items()}
    layout = {
        "param_index_map": [{name_of[p]: tuple(int(x) for x in idx) for p, idx in buf.param_index_map.items()}
                            for ddp, name_of in zip(ddps, names_of) for buf in ddp.buffers],
        "bucket_indices": [[(int(s), int(e)) for s, e in buf.bucket_indices] for ddp in ddps for buf in ddp.buffers],
        "buffer_chunk": [v for v, ddp in enumerate(ddps) for _ in ddp.buffers],
        "per_bucket_numel": [dict(d) for d in optimizer.per_bucket_numel],
        "per_bucket_numel_unpadded": [dict(d) for d in optimizer.per_bucket_numel_unpadded],
    }
    # Each rank's owned pieces: (chunk, name, start, end) inside the flattened parameter, from the
    # optimizer's own model-param -> shard maps, with the fp32 main shard and the Adam moments.
    pieces = []
    for model_group, main_group in zip(optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups):
        for model_param, main_param in zip(model_group, main_group):
            sub = optimizer._get_model_param_range_map(model_param)["param"]
            state = optimizer.optimizer.state[main_param]
            pieces.append((*chunk_of[model_param], sub.start, sub.end, main_param.detach().clone(),
                           state["exp_avg"].detach().clone(), state["exp_avg_sq"].detach().clone()))
    if optimizer.model_fp32_groups and any(optimizer.model_fp32_groups):
        raise RuntimeError("unexpected fp32 model params (the harness trains bf16)")

    world = torch.distributed.get_world_size()
    gathered = [None] * world if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object((layout, pieces), gathered, dst=0)
    if torch.distributed.get_rank() != 0:
        return None

    for r, (other, _) in enumerate(gathered):
        if other != layout:
            raise RuntimeError(f"rank {r}'s buffer layout differs from rank 0's:\n{other}\n{layout}")

    params = [dict(ddp.module.named_parameters()) for ddp in ddps]
    live = [{} for _ in ddps]
    for v, chunk_params in enumerate(params):
        for name, p in chunk_params.items():
            n = p.numel()
            live[v][name] = {k: torch.zeros(n, dtype=torch.float32) for k in ("param", "exp_avg", "exp_avg_sq")}
            live[v][name]["_count"] = torch.zeros(n, dtype=torch.int32)
    for _, rank_pieces in gathered:
        for v, name, start, end, main, m, s in rank_pieces:
            slot = live[v][name]
            for key, t in (("param", main), ("exp_avg", m), ("exp_avg_sq", s)):
                assert t.numel() == end - start, (name, start, end, t.shape)
                slot[key][start:end] = t
            slot["_count"][start:end] += 1
    for v, chunk_live in enumerate(live):
        for name, slot in chunk_live.items():
            count = slot.pop("_count")
            if not bool((count == 1).all()):
                bad = (count != 1).nonzero().flatten()[:10].tolist()
                raise RuntimeError(f"chunk {v} {name}: elements {bad} covered {count[bad].tolist()} times, not once")
            for key in list(slot):
                slot[key] = slot[key].view(params[v][name].shape)

    from megatron.core import parallel_state
    state_dict_orders = []
    for v, ddp in enumerate(ddps):
        if len(ddps) > 1:
            parallel_state.set_virtual_pipeline_model_parallel_rank(v)
        state_dict_orders.append(_flatten_keys(ddp.state_dict_for_save_checkpoint()))
    per_chunk = [{
        "param_index_map": [m for m, c in zip(layout["param_index_map"], layout["buffer_chunk"]) if c == v],
        "bucket_indices": [b for b, c in zip(layout["bucket_indices"], layout["buffer_chunk"]) if c == v],
        "param_dtype": {n: str(p.dtype).replace("torch.", "") for n, p in params[v].items()},
        "shapes": {n: tuple(p.shape) for n, p in params[v].items()},
        "registration_order": [names_of[v][p] for p in ddp.module.parameters()],
        "state_dict_order": state_dict_orders[v],
        "live": live[v],
    } for v, ddp in enumerate(ddps)]
    result = {
        "param_index_map": layout["param_index_map"],
        "bucket_indices": layout["bucket_indices"],
        "buffer_chunk": layout["buffer_chunk"],
        "per_bucket_numel": layout["per_bucket_numel"],
        "per_bucket_numel_unpadded": layout["per_bucket_numel_unpadded"],
        "chunks": per_chunk,
        "ddp_bucket_size": bucket_size,
        "overlap_grad_reduce": bool(case["overlap_grad_reduce"]),
    }
    if len(ddps) == 1:  # names are unique only within a chunk
        for key in ("param_dtype", "shapes", "registration_order", "state_dict_order", "live"):
            result[key] = per_chunk[0][key]
    return result
