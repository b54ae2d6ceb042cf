"""The few pieces of Megatron-LM's ``megatron/training`` (not part of the megatron-core wheel) that a
training step and a save need, re-written in a few lines each from the Megatron-LM source at the
tag of each version (``core_v0.8.0``, ``core_v0.12.1``, ``core_v0.16.1``):

* ``checkpointing.get_checkpoint_name`` / ``get_distributed_optimizer_checkpoint_name``
* ``checkpointing.get_rng_state``
* ``checkpointing.generate_state_dict`` and the legacy (``torch``) and ``torch_dist`` branches of
  ``checkpointing.save_checkpoint`` (:func:`save_legacy`, :func:`save_torch_dist`)
* ``checkpointing._build_sharded_state_dict_metadata`` (0.16)
* ``arguments.parse_args``: an ``argparse.Namespace`` with the fields ``save_checkpoint`` and the
  checkpoint readers use, typed as Megatron-LM types them (:func:`make_args`)
* ``optimizer_param_scheduler.OptimizerParamScheduler`` for 0.8 (from 0.12 on it is in megatron.core)
* ``pretrain_gpt.loss_func`` and ``training.num_floating_point_operations``

Everything else (model, DDP, optimizer, schedules, dist_checkpointing) is the real megatron.core.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import signal

SEQ_LENGTH = 16
MICRO_BATCH_SIZE = 2
NUM_MICROBATCHES = 2
LR, MIN_LR, LR_DECAY_ITERS = 1e-3, 1e-5, 10
WEIGHT_DECAY, BETAS, ADAM_EPS, CLIP_GRAD = 0.01, (0.9, 0.95), 1e-8, 1.0
INIT_METHOD_STD = 0.02


def vtuple(version: str):
    return tuple(int(x) for x in version.split(".")[:3])


# ----------------------------------------------------------------------------- checkpoint names

def checkpoint_name(save_dir, iteration, *, return_base_dir=False):
    """checkpointing.get_checkpoint_name (same at 0.8.0, 0.12.1, 0.16.1)."""
    from megatron.core import parallel_state as mpu

    directory = os.path.join(save_dir, f"iter_{iteration:07d}")
    if return_base_dir:
        return directory
    tp_rank = mpu.get_tensor_model_parallel_rank()
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        common = os.path.join(directory, f"mp_rank_{tp_rank:02d}_{mpu.get_pipeline_model_parallel_rank():03d}")
    else:
        common = os.path.join(directory, f"mp_rank_{tp_rank:02d}")
    if mpu.get_expert_model_parallel_world_size() > 1:
        common += f"_{mpu.get_expert_model_parallel_rank():03d}"
    return os.path.join(common, "model_optim_rng.pt")


def distrib_optim_name(model_checkpoint_name):
    return os.path.join(os.path.dirname(model_checkpoint_name), "distrib_optim.pt")


# ------------------------------------------------------------------------------------- rng state

def get_rng_state(version, ckpt_format):
    """checkpointing.get_rng_state (no data-parallel random init)."""
    import numpy as np
    import torch
    from megatron.core import parallel_state as mpu, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rng_state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state(),  # the CPU generator's state (stand-in)
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    rng_state_list = [rng_state]
    if ckpt_format == "torch_dist":
        pp_rank, pp_size = mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()
        tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
        if vtuple(version) >= (0, 16) and mpu.get_expert_model_parallel_world_size() > 1:
            dp_rank = mpu.get_data_parallel_rank(with_context_parallel=True)
            dp_size = mpu.get_data_parallel_world_size(with_context_parallel=True)
            return ShardedObject("rng_state", rng_state_list, (pp_size, tp_size, dp_size),
                                 (pp_rank, tp_rank, dp_rank), replica_id=0)
        return ShardedObject("rng_state", rng_state_list, (pp_size, tp_size), (pp_rank, tp_rank),
                             replica_id=mpu.get_data_parallel_rank(with_context_parallel=True))
    return rng_state_list


def rerun_state(version, ckpt_format):
    """save_checkpoint: ``get_rerun_state_machine().state_dict(...)`` (0.12+)."""
    if vtuple(version) < (0, 12):
        return None
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    return get_rerun_state_machine().state_dict(data_iterator=None, ckpt_format=ckpt_format)


# -------------------------------------------------------------------------------------- metadata

def sharded_sd_metadata(version, sharding_type):
    """0.16: checkpointing._build_sharded_state_dict_metadata, with the sharding type chosen by
    the caller (``dp_reshardable`` by default, ``fully_reshardable`` with
    ``--dist-ckpt-optim-fully-reshardable``; ``dp_zero_gather_scatter`` is accepted by the
    optimizer's ``sharded_state_dict`` but has no Megatron-LM flag at 0.16.1)."""
    from megatron.core import parallel_state as mpu

    metadata = {"distrib_optim_sharding_type": sharding_type}
    if sharding_type == "fully_reshardable":
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
    metadata["singleton_local_shards"] = False
    metadata["chained_optim_avoid_prefix"] = True
    metadata["dp_cp_group"] = mpu.get_data_parallel_group(with_context_parallel=True)
    return metadata


# ------------------------------------------------------------------------------------ state dict

def generate_state_dict(version, args, models, optimizer, scheduler, rng_state, iteration,
                        optim_sd_kwargs=None, model_sd_kwargs=None, rerun=None):
    """checkpointing.generate_state_dict (0.8.0 / 0.12.1 / 0.16.1); ``models`` are unwrapped."""
    from megatron.core import parallel_state as mpu

    v = vtuple(version)
    torch_dist = args.ckpt_format == "torch_dist" if v >= (0, 12) else args.use_dist_ckpt
    state_dict = {"args": args, "checkpoint_version": 3.0, "iteration": iteration}
    for i, model in enumerate(models):
        key = "model"
        if len(models) > 1:
            if v < (0, 16):
                mpu.set_virtual_pipeline_model_parallel_rank(i)
            key = f"model{i}"
        if torch_dist:
            state_dict[key] = model.sharded_state_dict(**(model_sd_kwargs or {}))
        else:
            state_dict[key] = model.state_dict_for_save_checkpoint()
    if torch_dist:
        state_dict["optimizer"] = optimizer.sharded_state_dict(state_dict, **(optim_sd_kwargs or {}))
    else:
        state_dict["optimizer"] = optimizer.state_dict()
    state_dict["opt_param_scheduler"] = scheduler.state_dict()
    if v >= (0, 16):
        if rerun:
            state_dict["rerun_state_machine"] = rerun
    elif v >= (0, 12):
        state_dict["rerun_state_machine"] = rerun
    state_dict["rng_state"] = rng_state
    return state_dict


def save_legacy(version, save_dir, iteration, models, optimizer, scheduler, args, flops):
    """save_checkpoint with ``--ckpt-format torch`` (0.8: without ``--use-dist-ckpt``): the
    optimizer's own ``save_parameter_state`` writes ``distrib_optim.pt`` (every rank calls it;
    DP rank 0 of each optimizer writes), the expert-data-parallel rank 0 of every (tp, pp, ep)
    writes ``model_optim_rng.pt``, global rank 0 the tracker file."""
    import torch
    from megatron.core import parallel_state as mpu

    v = vtuple(version)
    rng_state = get_rng_state(version, "torch")
    rerun = rerun_state(version, "torch")
    name = checkpoint_name(save_dir, iteration)
    os.makedirs(os.path.dirname(name), exist_ok=True)
    optimizer.save_parameter_state(distrib_optim_name(name))
    writer = (mpu.get_data_modulo_expert_parallel_rank(with_context_parallel=True) if v < (0, 12)
              else mpu.get_expert_data_parallel_rank()) == 0
    if writer:
        state_dict = generate_state_dict(version, args, models, optimizer, scheduler, rng_state, iteration,
                                         rerun=rerun)
        state_dict["num_floating_point_operations_so_far"] = flops
        torch.save(state_dict, name)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    torch.distributed.barrier()


def save_torch_dist(version, save_dir, iteration, models, optimizer, scheduler, args, flops, sharding_type):
    """save_checkpoint with ``--ckpt-format torch_dist`` (0.8: ``--use-dist-ckpt``), fully
    parallel save (the default ``--ckpt-fully-parallel-save``) except where the sharding type
    implies the flag's absence (0.8 / 0.12: ``dp_zero_gather_scatter`` is what
    ``--no-ckpt-fully-parallel-save`` selects)."""
    import torch
    from megatron.core import dist_checkpointing, parallel_state as mpu
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    v = vtuple(version)
    rng_state = get_rng_state(version, "torch_dist")
    rerun = rerun_state(version, "torch_dist")
    base = checkpoint_name(save_dir, iteration, return_base_dir=True)
    if torch.distributed.get_rank() == 0:
        os.makedirs(base, exist_ok=True)
    torch.distributed.barrier()
    if v >= (0, 16):
        metadata = sharded_sd_metadata(version, sharding_type)
        optim_kwargs, model_kwargs = dict(metadata=metadata), dict(metadata=metadata)
        fully_parallel = True
    else:
        optim_kwargs, model_kwargs, metadata = {"sharding_type": sharding_type}, None, None
        fully_parallel = sharding_type == "fully_sharded_model_space"
    state_dict = generate_state_dict(version, args, models, optimizer, scheduler, rng_state, iteration,
                                     optim_sd_kwargs=optim_kwargs, model_sd_kwargs=model_kwargs, rerun=rerun)
    state_dict["num_floating_point_operations_so_far"] = flops
    strategy = get_default_save_sharded_strategy("torch_dist")
    if fully_parallel:
        strategy = FullyParallelSaveStrategyWrapper(strategy, mpu.get_data_parallel_group(with_context_parallel=True),
                                                    False)
    kwargs = dict(async_sharded_save=False, validate_access_integrity=True)
    if v >= (0, 12):
        kwargs["preprocess_common_before_consistancy_check"] = None
    if v >= (0, 16):
        from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization
        kwargs["content_metadata"] = _clean_metadata_for_serialization(metadata)
    dist_checkpointing.save(state_dict, base, strategy, **kwargs)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    torch.distributed.barrier()


# ------------------------------------------------------------------------------------------ args

def make_args(version, case, world_size, ckpt_format, sharding_type, iteration, gbs, bucket_size):
    """An ``argparse.Namespace`` as Megatron-LM's ``parse_args`` + ``validate_args`` leave it for this
    run (the fields checkpoint readers look at, with Megatron's types: ``params_dtype`` a
    torch dtype, ``model_type`` megatron.core's ``ModelType`` enum, 0.12+ ``attention_backend`` an
    ``AttnBackend`` enum and the ``main_*_dtype`` torch dtypes, 0.16 ``exit_signal`` a
    ``signal.Signals``)."""
    import torch
    from megatron.core.enums import ModelType

    v = vtuple(version)
    c = case
    dp = c["dp"]
    a = argparse.Namespace()
    fields = dict(
        num_layers=c["num_layers"], encoder_num_layers=c["num_layers"], decoder_num_layers=None,
        hidden_size=c["hidden"], ffn_hidden_size=c["ffn"], num_attention_heads=c["heads"],
        kv_channels=c["hidden"] // c["heads"], group_query_attention=c["query_groups"] != c["heads"],
        num_query_groups=c["query_groups"], max_position_embeddings=SEQ_LENGTH,
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=10000, rotary_interleaved=False,
        add_position_embedding=False, make_vocab_size_divisible_by=1, normalization="LayerNorm",
        norm_epsilon=1e-5, apply_layernorm_1p=False, swiglu=c["swiglu"],
        untie_embeddings_and_output_weights=not c["tied_embeddings"], attention_dropout=0.0, hidden_dropout=0.0,
        weight_decay=WEIGHT_DECAY, start_weight_decay=WEIGHT_DECAY, end_weight_decay=WEIGHT_DECAY,
        weight_decay_incr_style="constant", clip_grad=CLIP_GRAD, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_eps=ADAM_EPS, micro_batch_size=MICRO_BATCH_SIZE, global_batch_size=gbs,
        use_cpu_initialization=True, train_iters=c["steps"], add_bias_linear=c["bias"], add_qkv_bias=c["bias"],
        optimizer="adam", sequence_parallel=False, gradient_accumulation_fusion=False, use_mcore_models=True,
        use_legacy_models=False, seed=c["seed"], init_method_std=INIT_METHOD_STD, lr=LR, lr_decay_style="cosine",
        lr_decay_iters=LR_DECAY_ITERS, lr_warmup_iters=0, min_lr=MIN_LR, save="checkpoints/run", save_interval=1,
        load=None, no_save_optim=None, no_save_rng=None, fp16=False, bf16=True, loss_scale=None,
        accumulate_allreduce_grads_in_fp32=True, tensor_model_parallel_size=c["tp"],
        pipeline_model_parallel_size=c["pp"], context_parallel_size=1,
        expert_model_parallel_size=c["ep"], num_experts=c["num_experts"], moe_router_topk=c["moe_topk"],
        moe_grouped_gemm=c["moe_grouped_gemm"], moe_token_dispatcher_type="allgather",
        distributed_backend="gloo", overlap_grad_reduce=c["overlap_grad_reduce"], overlap_param_gather=False,
        use_distributed_optimizer=True, ddp_bucket_size=c["bucket_size"], data_parallel_random_init=False,
        virtual_pipeline_model_parallel_size=c["vpp"],
        num_layers_per_virtual_pipeline_stage=(c["num_layers"] // (c["pp"] * c["vpp"]) if c["vpp"] else None),
        overlap_p2p_comm=bool(c["vpp"]), vocab_size=c["vocab"], padded_vocab_size=c["vocab"],
        seq_length=SEQ_LENGTH, encoder_seq_length=SEQ_LENGTH, tokenizer_type="NullTokenizer",
        transformer_impl="local", rank=0, world_size=world_size,
        transformer_pipeline_model_parallel_size=c["pp"], data_parallel_size=dp,
        params_dtype=torch.bfloat16, model_type=ModelType.encoder_or_decoder,
        check_for_nan_in_loss_and_grad=True,
        consumed_train_samples=gbs * iteration, consumed_valid_samples=0,
        # Megatron's own save keeps args.iteration at its load-time value (0 for a fresh run).
        iteration=0, curr_iteration=0, num_floating_point_operations_so_far=0,
        async_save=False,
    )
    if v < (0, 12):
        fields.update(use_dist_ckpt=ckpt_format == "torch_dist", dist_ckpt_format="torch_dist",
                      ckpt_fully_parallel_save=sharding_type != "dp_zero_gather_scatter",
                      ckpt_fully_parallel_load=False, ckpt_assume_constant_structure=False)
    else:
        from megatron.core.transformer.enums import AttnBackend
        fields.update(ckpt_format=ckpt_format, use_dist_ckpt=ckpt_format != "torch",
                      ckpt_fully_parallel_save=(sharding_type != "dp_zero_gather_scatter") if v < (0, 16) else True,
                      ckpt_fully_parallel_load=False, ckpt_assume_constant_structure=False,
                      attention_backend=AttnBackend.auto, main_grads_dtype=torch.float32,
                      main_params_dtype=torch.float32, exp_avg_dtype=torch.float32,
                      exp_avg_sq_dtype=torch.float32, expert_tensor_parallel_size=c["tp"],
                      num_distributed_optimizer_instances=1, ddp_average_in_collective=False,
                      use_precision_aware_optimizer=False, non_persistent_ckpt_type=None)
    if v >= (0, 16):
        fields.update(dist_ckpt_optim_fully_reshardable=sharding_type == "fully_reshardable",
                      distrib_optim_fully_reshardable_mem_efficient=False,
                      exit_signal_handler=False, exit_signal=signal.SIGTERM, dist_ckpt_strictness="assume_ok_unexpected")
    for k, val in fields.items():
        setattr(a, k, val)
    return a


# ----------------------------------------------------------------------------------- scheduler

class OptimizerParamScheduler:
    """megatron.training.optimizer_param_scheduler.OptimizerParamScheduler of core_v0.8.0, the parts
    used here (cosine decay without warm-up, constant weight decay); 0.12+ use megatron.core's."""

    def __init__(self, optimizer, init_lr, max_lr, min_lr, lr_warmup_steps, lr_decay_steps, lr_decay_style,
                 start_wd, end_wd, wd_incr_steps, wd_incr_style):
        self.optimizer = optimizer
        self.init_lr = init_lr
        self.max_lr, self.min_lr = float(max_lr), min_lr
        self.lr_warmup_steps, self.lr_decay_steps = lr_warmup_steps, lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.start_wd, self.end_wd = start_wd, end_wd
        self.wd_incr_steps, self.wd_incr_style = wd_incr_steps, wd_incr_style
        self.num_steps = 0
        self.step(0)

    def get_lr(self, param_group):
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        if self.num_steps > self.lr_decay_steps:
            return min_lr
        ratio = float(self.num_steps - self.lr_warmup_steps) / float(self.lr_decay_steps - self.lr_warmup_steps)
        return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (max_lr - min_lr)

    def step(self, increment):
        self.num_steps += increment
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.end_wd * group.get("wd_mult", 1.0)

    def state_dict(self):
        return {"max_lr": self.max_lr, "lr_warmup_steps": self.lr_warmup_steps, "num_steps": self.num_steps,
                "lr_decay_style": self.lr_decay_style, "lr_decay_steps": self.lr_decay_steps,
                "min_lr": self.min_lr, "start_wd": self.start_wd, "end_wd": self.end_wd,
                "wd_incr_style": self.wd_incr_style, "wd_incr_steps": self.wd_incr_steps}

    def load_state_dict(self, sd):
        self.num_steps = sd["num_steps"]
        self.step(0)


def make_scheduler(version, optimizer, gbs, steps):
    """training.get_optimizer_param_scheduler (no warm-up, cosine, constant weight decay)."""
    kwargs = dict(init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=0, lr_decay_steps=LR_DECAY_ITERS * gbs,
                  lr_decay_style="cosine", start_wd=WEIGHT_DECAY, end_wd=WEIGHT_DECAY,
                  wd_incr_steps=steps * gbs, wd_incr_style="constant")
    if vtuple(version) < (0, 12):
        return OptimizerParamScheduler(optimizer, **kwargs)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler as Core
    return Core(optimizer, **kwargs)


# --------------------------------------------------------------------------------- loss / flops

def loss_func(loss_mask, output_tensor):
    """pretrain_gpt.loss_func (no context parallelism): (summed loss, token count, report)."""
    import torch

    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])}


def num_floating_point_operations(a, batch_size):
    """training.num_floating_point_operations, dense/MoE transformer part (core_v0.8.0 form)."""
    query_groups = a.num_query_groups if a.group_query_attention else a.num_attention_heads
    num_experts_routed_to = 1 if a.num_experts is None else a.moe_router_topk
    swiglu_factor = 3 if a.swiglu else 2
    return (12 * batch_size * a.seq_length * a.num_layers * a.hidden_size * a.hidden_size * (
        (1 + (query_groups / a.num_attention_heads) + (a.seq_length / a.hidden_size))
        + (a.ffn_hidden_size / a.hidden_size) * num_experts_routed_to * (swiglu_factor / 2)
        + (a.padded_vocab_size / (2 * a.num_layers * a.hidden_size))))
