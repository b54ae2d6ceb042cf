"""What one rank runs: build the model the way Megatron-LM's ``pretrain_gpt.model_provider`` +
``training.get_model`` + ``setup_model_and_optimizer`` do (local layer spec, ``Float16Module``,
megatron.core's ``DistributedDataParallel`` and ``get_megatron_optimizer``), then either

* ``generate``: one (or ``steps``) real training step(s) through ``get_forward_backward_func`` and
  ``finalize_model_grads``, a legacy save and a ``torch_dist`` save per optimizer sharding type,
  then the truth from the live objects; or
* ``load``: for each source, poison every live value with NaN, load it the way
  ``checkpointing.load_checkpoint`` does (legacy: ``model.load_state_dict`` of the model file,
  ``optimizer.load_state_dict`` and ``optimizer.load_parameter_state``; torch_dist:
  ``dist_checkpointing.load`` of the sharded state dict, then the same two ``load_state_dict``),
  and collect the truth of what got loaded.

Ranks are forked from ``run.py`` after megatron.core was imported there, so nothing heavy is
imported here per rank.
"""
from __future__ import annotations

import datetime
import functools
import inspect
import multiprocessing
import multiprocessing.util
import os
import random
import sys
import time
import traceback
from pathlib import Path

from . import training as T
from . import truth as truth_mod

COLLECTIVE_TIMEOUT_S = 120
FAULT_ENV = "MCORE_VERSIONS_FAULT"


def entry(rank, world_size, port, job, tmp_dir):
    """Process target (forked). Writes ``rank{r}.err`` (traceback) or ``rank{r}.ok``."""
    code = 0
    tmp_dir = Path(tmp_dir)
    try:
        if os.environ.get("MCORE_VERSIONS_PROFILE") and rank == 0:
            import cProfile
            cProfile.runctx("_run(rank, world_size, port, job, tmp_dir)", globals(), locals(),
                            os.environ["MCORE_VERSIONS_PROFILE"])
        else:
            _run(rank, world_size, port, job, tmp_dir)
        _stop_children()
        (tmp_dir / f"rank{rank}.ok").write_text("ok")
    except BaseException:  # noqa: BLE001 - reported to the launcher
        code = 1
        (tmp_dir / f"rank{rank}.err").write_text(traceback.format_exc())
        for p in multiprocessing.active_children():
            p.kill()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: gloo threads of a failed peer could block it


def _stop_children():
    """What a normal interpreter exit does for multiprocessing: run its finalizers, which shut down
    the Manager dist_checkpointing's async writer started in this rank."""
    multiprocessing.util._exit_function()


def _injected_fault(rank, job):
    spec = job.get("fault") or os.environ.get(FAULT_ENV, "")
    if spec.partition(":")[0] != str(rank):
        return
    if spec.partition(":")[2] == "hang":
        while True:
            time.sleep(1)
    raise RuntimeError(f"injected failure on rank {rank} ({FAULT_ENV}={spec})")


# ------------------------------------------------------------------------------------ building

def _config(version, c):
    import torch
    from megatron.core.transformer import TransformerConfig

    v = T.vtuple(version)
    kw = dict(
        num_layers=c["num_layers"], hidden_size=c["hidden"], num_attention_heads=c["heads"],
        num_query_groups=c["query_groups"], kv_channels=c["hidden"] // c["heads"], ffn_hidden_size=c["ffn"],
        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=c["bias"], gated_linear_unit=c["swiglu"],
        activation_func=torch.nn.functional.silu if c["swiglu"] else torch.nn.functional.gelu,
        normalization="LayerNorm", layernorm_epsilon=1e-5, init_method_std=T.INIT_METHOD_STD,
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        use_cpu_initialization=True, perform_initialization=True,
        tensor_model_parallel_size=c["tp"], pipeline_model_parallel_size=c["pp"],
        virtual_pipeline_model_parallel_size=c["vpp"], context_parallel_size=1,
        expert_model_parallel_size=c["ep"], sequence_parallel=False, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        # deallocate_pipeline_outputs (Megatron-LM's default True) frees a stage's output right after
        # its asynchronous send; on gloo/CPU the send may still read that memory (0.8.0 then
        # trains on garbage: NaN grads). A memory optimisation only, so off here.
        apply_rope_fusion=False, persist_layer_norm=False, deallocate_pipeline_outputs=False,
        variable_seq_lengths=False, overlap_p2p_comm=bool(c["vpp"]), batch_p2p_comm=not c["vpp"],
    )
    if c["num_experts"]:
        kw.update(num_moe_experts=c["num_experts"], moe_router_topk=c["moe_topk"],
                  moe_grouped_gemm=c["moe_grouped_gemm"], moe_token_dispatcher_type="allgather",
                  moe_aux_loss_coeff=1e-2)
    if v >= (0, 12):
        kw.update(expert_tensor_parallel_size=c["tp"])
    # uneven stages: Megatron-LM's --decoder-first/last-pipeline-num-layers (config names from 0.11)
    for flag, new, old in (("first_stage_layers", "num_layers_in_first_pipeline_stage", "first_pipeline_num_layers"),
                           ("last_stage_layers", "num_layers_in_last_pipeline_stage", "last_pipeline_num_layers")):
        if c.get(flag) is not None:
            kw[new if v >= (0, 11) else old] = c[flag]
    fields = {f for f in TransformerConfig.__dataclass_fields__}
    missing = set(kw) - fields
    for k in missing:
        if k in ("expert_tensor_parallel_size", "num_layers_in_first_pipeline_stage", "first_pipeline_num_layers",
                 "num_layers_in_last_pipeline_stage", "last_pipeline_num_layers"):
            raise RuntimeError(f"TransformerConfig of {version} has no {k}")
        kw.pop(k)
    return TransformerConfig(**kw)


def _build(version, c):
    """pretrain_gpt.model_provider (local spec) + training.get_model + setup_model_and_optimizer."""
    import torch
    from megatron.core import parallel_state as mpu, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    v = T.vtuple(version)
    config = _config(version, c)
    spec = get_gpt_layer_local_spec(c["num_experts"], c["moe_grouped_gemm"])
    chunks = c["vpp"] or 1
    gpt_params = inspect.signature(GPTModel.__init__).parameters
    models = []
    for i in range(chunks):
        kwargs = {}
        if c["vpp"]:
            if v >= (0, 16):
                from megatron.core.pipeline_parallel.utils import is_vp_first_stage, is_vp_last_stage
                pre = mpu.is_pipeline_first_stage(ignore_virtual=True) and is_vp_first_stage(i, chunks)
                post = mpu.is_pipeline_last_stage(ignore_virtual=True) and is_vp_last_stage(i, chunks)
            else:
                mpu.set_virtual_pipeline_model_parallel_rank(i)
                pre, post = mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()
            if "vp_stage" in gpt_params:
                kwargs["vp_stage"] = i
        else:
            pre, post = mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=c["vocab"],
                         max_sequence_length=T.SEQ_LENGTH, pre_process=pre, post_process=post,
                         fp16_lm_cross_entropy=False, parallel_output=True,
                         share_embeddings_and_output_weights=c["tied_embeddings"],
                         position_embedding_type="rope", rotary_percent=1.0, **kwargs)
        from megatron.core.enums import ModelType
        model.model_type = ModelType.encoder_or_decoder
        if c["vpp"]:
            model.vp_stage = i
        for p in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        models.append(model)
    if c["vpp"] and v < (0, 16):
        mpu.set_virtual_pipeline_model_parallel_rank(0)
    fp16 = [Float16Module(config, m) for m in models]

    ddp_kwargs = dict(grad_reduce_in_fp32=True, overlap_grad_reduce=c["overlap_grad_reduce"],
                      use_distributed_optimizer=True, check_for_nan_in_grad=True, bucket_size=c["bucket_size"])
    ddps = []
    for i, m in enumerate(fp16):
        ddp_config = DistributedDataParallelConfig(**ddp_kwargs)
        if v >= (0, 12):
            # training.get_model (0.12+) resolves the bucket size before building the DDP
            if ddp_config.bucket_size is None:
                ddp_config.bucket_size = max(40000000, 1000000 * mpu.get_data_parallel_world_size(
                    with_context_parallel=True))
            if not ddp_config.overlap_grad_reduce:
                ddp_config.bucket_size = None
        ddps.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=m,
                                            disable_bucketing=i > 0))

    _check_buffer_layout(version, ddps)
    opt_kwargs = dict(optimizer="adam", lr=T.LR, min_lr=T.MIN_LR, weight_decay=T.WEIGHT_DECAY, bf16=True,
                      params_dtype=torch.bfloat16, adam_beta1=T.BETAS[0], adam_beta2=T.BETAS[1],
                      adam_eps=T.ADAM_EPS, use_distributed_optimizer=True, clip_grad=T.CLIP_GRAD)
    opt_fields = set(OptimizerConfig.__dataclass_fields__)
    for k, val in (("overlap_grad_reduce", c["overlap_grad_reduce"]), ("overlap_param_gather", False)):
        if k in opt_fields:
            opt_kwargs[k] = val
    optimizer = get_megatron_optimizer(OptimizerConfig(**opt_kwargs), ddps)
    gbs = T.MICRO_BATCH_SIZE * T.NUM_MICROBATCHES * c["dp"]
    scheduler = T.make_scheduler(version, optimizer, gbs, c["steps"])
    return config, models, ddps, optimizer, scheduler, gbs


def _check_buffer_layout(version, ddps):
    """Refuse, with a readable message, a layout megatron itself would trip over later.

    megatron-core 0.8.0 and 0.12.1 place a shared-embedding parameter (tied embeddings with PP > 1)
    at the 64-aligned end of the previous parameter when it opens its own bucket, but pad the
    previous bucket's end to lcm(dp, 128): when those differ, the embedding overlaps the previous
    bucket and the DistributedOptimizer later fails with "Param should not be in param_gbuf_map;
    each param only belongs to a single bucket" (0.16 places the parameter at the padded end)."""
    for ci, d in enumerate(ddps):
        names = {p: n for n, p in d.module.named_parameters()}
        for buf in list(d.buffers) + list(d.expert_parallel_buffers):
            for p, (start, end, b) in buf.param_index_map.items():
                bs, be = buf.bucket_indices[b]
                if not (bs <= start and end <= be):
                    raise RuntimeError(
                        f"megatron-core {version} buffer layout bug (chunk {ci}): {names[p]} at [{start}, {end}) "
                        f"lies outside its bucket {b} = [{bs}, {be}) (bucket_indices {buf.bucket_indices}). "
                        "A shared embedding that opens a bucket at an offset that is not a multiple of "
                        "lcm(dp, 128) overlaps the previous bucket at this version: choose sizes / bucket_size "
                        "so that the bucket before it closes on its own.")


# ------------------------------------------------------------------------------------ training

def _gpt_batches(c, dp_rank, step):
    import torch

    out = []
    for mb in range(T.NUM_MICROBATCHES):
        g = torch.Generator().manual_seed(1_000_003 * (c["seed"] + 1) + 10_007 * dp_rank + 101 * step + mb)
        text = torch.randint(0, c["vocab"], (T.MICRO_BATCH_SIZE, T.SEQ_LENGTH + 1), generator=g)
        mask = torch.tril(torch.ones(T.SEQ_LENGTH, T.SEQ_LENGTH)).unsqueeze(0) < 0.5
        out.append({
            "tokens": text[:, :-1].contiguous(), "labels": text[:, 1:].contiguous(),
            "loss_mask": torch.ones(T.MICRO_BATCH_SIZE, T.SEQ_LENGTH, dtype=torch.float),
            "attention_mask": mask.unsqueeze(0).expand(T.MICRO_BATCH_SIZE, 1, T.SEQ_LENGTH, T.SEQ_LENGTH).contiguous(),
            "position_ids": torch.arange(T.SEQ_LENGTH).unsqueeze(0).expand(T.MICRO_BATCH_SIZE, -1).contiguous(),
        })
    return out


def _forward_step(data_iterator, model):
    """pretrain_gpt.forward_step: every stage draws its micro-batch (middle stages ignore it)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, functools.partial(T.loss_func, batch["loss_mask"])


def _train(version, c, config, ddps, optimizer, scheduler, gbs):
    """training.train_step: the schedule of ``get_forward_backward_func`` over all model chunks,
    ``finalize_model_grads`` (via the config), ``optimizer.step``, scheduler step."""
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config.grad_scale_func = optimizer.scale_loss
    if c["overlap_grad_reduce"]:
        config.no_sync_func = [d.no_sync for d in ddps]
        if len(ddps) == 1:
            config.no_sync_func = config.no_sync_func[0]
    config.finalize_model_grads_func = finalize_model_grads
    dp_rank = mpu.get_data_parallel_rank()
    for step in range(c["steps"]):
        for d in ddps:
            d.zero_grad_buffer()
        optimizer.zero_grad()
        batches = _gpt_batches(c, dp_rank, step)
        iterators = [iter(list(batches)) for _ in ddps]
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iterators if len(ddps) > 1 else iterators[0],
            model=ddps, num_microbatches=T.NUM_MICROBATCHES, seq_length=T.SEQ_LENGTH,
            micro_batch_size=T.MICRO_BATCH_SIZE, decoder_seq_length=T.SEQ_LENGTH, forward_only=False)
        ok, _grad_norm, _ = optimizer.step()
        if not ok:
            raise RuntimeError(f"optimizer step {step} was skipped")
        scheduler.step(increment=gbs)
    return losses


# ------------------------------------------------------------------------------------------ load

def _poison(models, optimizer):
    """NaN into every live model weight, fp32 main param and Adam moment, so that an element a load
    does not write shows up in the truth."""
    import torch

    for m in models:
        for p in m.parameters():
            p.data.fill_(float("nan"))
    for opt in truth_mod.sub_optimizers(optimizer):
        for group in opt.shard_fp32_from_float16_groups:
            for main in group:
                main.data.fill_(float("nan"))
                state = opt.optimizer.state.get(main, {})
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in state:
                        state[k].fill_(float("nan"))


def _load_legacy(version, c, src, models, ddps, optimizer, scheduler):
    """checkpointing.load_checkpoint, ``torch`` format: the model file of this (tp, pp, ep),
    ``model.load_state_dict`` per chunk (strict), ``optimizer.load_state_dict`` of its
    ``optimizer`` entry, then ``optimizer.load_parameter_state(distrib_optim.pt)``."""
    import torch

    iteration = int((Path(src) / "latest_checkpointed_iteration.txt").read_text().strip())
    name = T.checkpoint_name(src, iteration)
    sd = torch.load(name, map_location="cpu", weights_only=False)
    if len(models) == 1:
        ddps[0].load_state_dict(sd["model"], strict=True)
    else:
        for i, d in enumerate(ddps):
            d.load_state_dict(sd[f"model{i}"], strict=True)
    optimizer.load_state_dict(sd["optimizer"])
    if T.vtuple(version) >= (0, 12):
        optimizer.load_parameter_state(T.distrib_optim_name(name), update_legacy_format=False)
    else:
        optimizer.load_parameter_state(T.distrib_optim_name(name))
    scheduler.load_state_dict(sd["opt_param_scheduler"])
    return iteration


def _load_torch_dist(version, c, src, sharding_type, models, ddps, optimizer, scheduler, args):
    """checkpointing.load_checkpoint, ``torch_dist`` format: the sharded state dict of the run
    (``generate_state_dict`` with ``is_loading=True``; 0.16: the content metadata stored in the
    checkpoint, plus the dp-cp group), ``dist_checkpointing.load`` with the default load strategy,
    then ``model.load_state_dict`` and ``optimizer.load_state_dict``."""
    from megatron.core import dist_checkpointing, parallel_state as mpu
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy

    v = T.vtuple(version)
    iteration = int((Path(src) / "latest_checkpointed_iteration.txt").read_text().strip())
    base = T.checkpoint_name(src, iteration, return_base_dir=True)
    if v >= (0, 16):
        metadata = dist_checkpointing.load_content_metadata(base) or {}
        metadata["dp_cp_group"] = mpu.get_data_parallel_group(with_context_parallel=True)
        optim_kwargs, model_kwargs = dict(metadata=metadata, is_loading=True), dict(metadata=metadata)
    else:
        optim_kwargs, model_kwargs = dict(sharding_type=sharding_type, is_loading=True), None
    rng = T.get_rng_state(version, "torch_dist")
    sharded = T.generate_state_dict(version, args, models, optimizer, scheduler, rng, iteration,
                                    optim_sd_kwargs=optim_kwargs, model_sd_kwargs=model_kwargs)
    sharded.pop("args")
    sharded.pop("rng_state")  # the loader drops RNG state it cannot use; not part of the truth
    strategy = get_default_load_sharded_strategy(base)
    kwargs = {}
    if v >= (0, 12):
        kwargs["strict"] = "assume_ok_unexpected"
    state_dict = dist_checkpointing.load(sharded, base, strategy, **kwargs)
    if len(models) == 1:
        ddps[0].load_state_dict(state_dict["model"], strict=True)
    else:
        for i, d in enumerate(ddps):
            d.load_state_dict(state_dict[f"model{i}"], strict=True)
    optimizer.load_state_dict(state_dict["optimizer"])
    scheduler.load_state_dict(state_dict["opt_param_scheduler"])
    return iteration


# -------------------------------------------------------------------------------------- the rank

def _run(rank, world_size, port, job, tmp_dir: Path):
    import numpy as np
    import torch
    from megatron.core import parallel_state as mpu, tensor_parallel

    from . import standins

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    c = job["case"]
    version = c["version"]
    timings = {}
    t0 = time.monotonic()
    with standins.CudaOnCpu():
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        _injected_fault(rank, job)
        standins.install_cpu_rng_tracker()
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=c["tp"], pipeline_model_parallel_size=c["pp"],
            virtual_pipeline_model_parallel_size=c["vpp"], expert_model_parallel_size=c["ep"],
            distributed_timeout_minutes=max(1, COLLECTIVE_TIMEOUT_S // 60))
        assert mpu.get_data_parallel_world_size() == c["dp"], (mpu.get_data_parallel_world_size(), c["dp"])
        # initialize._set_random_seed: a different seed per pipeline stage
        seed = c["seed"] + 1 + 100 * mpu.get_pipeline_model_parallel_rank()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        timings["init"] = time.monotonic() - t0

        config, models, ddps, optimizer, scheduler, gbs = _build(version, c)
        timings["build"] = time.monotonic() - t0 - timings["init"]
        results = []
        if job["kind"] == "generate":
            _train(version, c, config, ddps, optimizer, scheduler, gbs)
            timings["train"] = time.monotonic() - t0 - sum(timings.values())
            standins.fork_started_results_queue()
            out = Path(job["out_dir"])
            iteration = c["steps"]
            files = {}
            for fmt, st in job["saves"]:
                args = T.make_args(version, c, world_size, fmt, st, iteration, gbs, c["bucket_size"])
                flops = float(T.num_floating_point_operations(args, gbs) * iteration)
                sub = out / _save_dir_name(fmt, st)
                if fmt == "torch":
                    T.save_legacy(version, str(sub), iteration, models, optimizer, scheduler, args, flops)
                else:
                    T.save_torch_dist(version, str(sub), iteration, models, optimizer, scheduler, args, flops, st)
                files[_save_dir_name(fmt, st)] = True
                timings[f"save {_save_dir_name(fmt, st)}"] = time.monotonic() - t0 - sum(timings.values())
            results.append(truth_mod.collect(version, c, models, ddps, optimizer, extra={"saved": sorted(files)}))
        else:
            built = truth_mod.param_groups(ddps, optimizer)   # what the library builds at this layout
            for src in job["sources"]:
                _poison(models, optimizer)
                if src["fmt"] == "torch":
                    it = _load_legacy(version, c, src["dir"], models, ddps, optimizer, scheduler)
                else:
                    args = T.make_args(version, c, world_size, "torch_dist", src["sharding_type"], 0, gbs,
                                       c["bucket_size"])
                    it = _load_torch_dist(version, c, src["dir"], src["sharding_type"], models, ddps, optimizer,
                                          scheduler, args)
                results.append(truth_mod.collect(version, c, models, ddps, optimizer,
                                                 extra={"source": dict(src), "iteration": it}, built_groups=built))
            timings["load"] = time.monotonic() - t0 - sum(timings.values())
        torch.distributed.barrier()
        if rank == 0:
            for r in results:
                r["rank0_timings"] = dict(timings)
            torch.save(results, tmp_dir / "result.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _save_dir_name(fmt, sharding_type):
    return "legacy" if fmt == "torch" else f"torch_dist_{sharding_type}"
