"""What stands in for CUDA, apex and TransformerEngine when a real megatron-core 0.8 / 0.12 / 0.16
runs on this CPU-only torch. Nothing here replaces megatron's model, DDP, optimizer, schedules or
dist_checkpointing code.

* CUDA: the pieces of ``mcore_harness.stubs`` (``torch.cuda.current_device`` answers the CPU,
  ``synchronize`` / ``Stream`` are no-ops, :class:`CudaOnCpu` maps ``device='cuda'`` to the CPU and
  answers ``Tensor.type()`` with the ``torch.cuda.*`` name megatron checks), plus a few calls the
  newer versions make (``torch.cuda.current_stream`` / ``stream`` / ``Event``, memory statistics).
* RNG: megatron's CUDA RNG-states tracker forks the CPU generator instead (:func:`install_cpu_rng_tracker`).
* TransformerEngine: absent. 0.8+ runs without it on the *local* layer spec (megatron's own
  ``WrappedTorchLayerNorm`` / ``WrappedTorchNorm``, ``DotProductAttention``, column/row parallel
  linears), exactly as megatron allows.
* apex: absent too (megatron's local spec then uses its torch norms, and clip_grads its local
  multi-tensor fallbacks). The one exception is the *optimizer*: with neither apex nor TE,
  megatron picks ``torch.optim.AdamW`` / ``Adam``, keeps ``step`` per parameter, and at 0.12.1 then
  cannot reload its own ``distrib_optim.pt`` (``KeyError: 'step'``); 0.8.0's DistributedOptimizer
  refuses to run at all (``assert HAVE_APEX_OR_TE``). :func:`use_fused_adam` therefore sets the
  module globals megatron's optimizer package derived from ``from apex.optimizers import FusedAdam``
  to what that import would have given: ``mcore_harness.stubs.FusedAdam`` (apex FusedAdam's
  arithmetic in torch: decoupled weight decay in ``adam_w_mode``, ``step`` kept per param group).
  A bare ``apex`` module is *not* put in ``sys.modules``: megatron's layer specs test
  ``import apex`` to choose apex's fused norms.
* megatron-core 0.16.1 bug: ``transformer/moe/moe_utils.py`` imports ``te_general_gemm`` only
  inside its ``try: import transformer_engine`` block but the router's gating
  (``RouterGatingLinearFunction``) tests ``te_general_gemm is not None`` unconditionally, so any
  MoE forward without TE raises ``NameError``. :func:`fix_missing_te_names` sets the name to
  ``None``, which is what the ``except ImportError`` branch should have done.
* megatron-core 0.12.1 bug: ``DistributedOptimizer._copy_main_params_to_model_params`` always
  calls ``fp8_utils.quantize_param_shard`` (with empty lists when no parameter is fp8), and without
  TE that function's fallback raises ``RuntimeError("Invalid Transformer Engine version for FP8
  distributed optimizer")`` unconditionally, so no optimizer step can run. The fallback is replaced
  by one that does nothing for empty lists and raises as before otherwise.
* ``dist_checkpointing``'s async file writer (used synchronously by ``dist_checkpointing.save``)
  collects write results through a ``multiprocessing.Manager().Queue()`` it creates once per
  process; 0.8.0 and 0.16.1 start that Manager with the *spawn* method, a fresh interpreter that
  then imports torch to unpickle the results (seconds of CPU per rank, on 2 cores for 8 ranks).
  :func:`fork_started_results_queue` pre-sets that module-level queue in each rank to the queue of
  a *fork*-started Manager, as 0.12.1 itself does; the write path is unchanged.
* torch 2.13's private ``torch.distributed.checkpoint.filesystem._write_item`` (which
  ``dist_checkpointing``'s async writer calls) takes ``(transforms, stream, data, write_item,
  storage_key, serialization_format)``. 0.8.0 calls it as ``(stream, data, write_item, storage_key)``
  (the torch 2.3 signature) and 0.12.1 without ``serialization_format``; 0.16.1 adapts itself
  (it passes ``SerializationFormat.TORCH_SAVE`` when the parameter exists).
  :func:`adapt_torch_write_item` gives the two older versions the same adapter: the transforms
  torch's own ``FileSystemWriter`` uses by default (none) and ``TORCH_SAVE``.
* torch >= 2.4's ``create_default_local_save_plan`` already requests every BytesIO (ShardedObject)
  on every rank; 0.8.0's ``MCoreSavePlanner`` (written for torch 2.3, which requested them on the
  coordinator only) adds them again on the other ranks (``_add_non_coordinator_iobytes_request``),
  and torch 2.13's global planner then rejects the duplicates (``AssertionError: item.index.fqn
  not in md``). :func:`adapt_torch_write_item` makes that method a no-op, which is what 0.12+ do
  (their planner builds the local plan without it); each object is still written once.
* torch >= 2.6 loads with ``weights_only=True`` by default. 0.8.0's ``dist_checkpointing``
  reads ``common.pt`` (which holds the ``args`` Namespace and its ``ModelType`` enum) with a bare
  ``torch.load``; :func:`allow_checkpoint_globals` registers those two classes with
  ``torch.serialization.add_safe_globals``, as 0.16.1's own ``megatron.core.safe_globals`` does
  (0.12.1 loads ``common.pt`` with ``weights_only=False``).
* ``torch.compile`` (megatron's ``jit_fuser`` for a few fused elementwise helpers, e.g. in the
  MoE router / aux loss): the decorated functions run eagerly. Compiling them with inductor on
  CPU costs ~5 s per rank process and changes no checkpoint structure.
* numpy: 0.12 still calls ``np.product`` (removed in numpy 2): aliased to ``np.prod`` if missing.
* 0.8.0 imports ``pkg_resources``: the Makefile installs ``setuptools<70`` into 0.8.0's target dir.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from mcore_harness.stubs import CudaOnCpu, FusedAdam, _patch_torch_cuda  # noqa: F401

__all__ = ["CudaOnCpu", "install", "use_fused_adam", "install_cpu_rng_tracker"]


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def install():
    """Before megatron.core is imported."""
    if any(m == "megatron.core" or m.startswith("megatron.core.") for m in sys.modules):
        raise RuntimeError("standins.install() must run before megatron.core is imported")
    import importlib.util
    for real in ("apex", "transformer_engine"):
        if importlib.util.find_spec(real) is not None:
            raise RuntimeError(f"{real} is installed; the harness expects a CPU-only environment")
    import numpy as np
    if not hasattr(np, "product"):
        np.product = np.prod
    _patch_torch_cuda()
    cuda = torch.cuda
    stream = cuda.Stream()
    cuda.current_stream = lambda *a, **k: stream
    cuda.default_stream = lambda *a, **k: stream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.Event = _Event
    cuda.set_device = lambda *a, **k: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.empty_cache = lambda: None
    _eager_torch_compile()


def _eager_torch_compile():
    def compile(model=None, **kwargs):
        if model is None:
            return lambda fn: fn
        return model

    compile.__standin__ = True
    torch.compile = compile


def use_fused_adam():
    """After importing megatron.core.optimizer: the module globals as ``from apex.optimizers import
    FusedAdam as Adam`` would have set them (see the module docstring)."""
    import megatron.core.optimizer as mopt
    import megatron.core.optimizer.distrib_optimizer as mdo

    for mod in (mopt, mdo):
        mod.Adam = FusedAdam
        for flag, value in (("HAVE_APEX_OR_TE", True), ("USING_PYTORCH_OPTIMIZER", False),
                            ("USING_APEX_OPTIMIZER", True), ("USING_TE_OPTIMIZER", False)):
            if hasattr(mod, flag):
                setattr(mod, flag, value)


def install_cpu_rng_tracker():
    """Megatron's RNG-states tracker, forking the CPU generator; installed as already initialised
    so that ``model_parallel_cuda_manual_seed`` keeps it (it only resets and re-adds states)."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def fix_missing_te_names():
    """See the module docstring (megatron-core 0.16.1 MoE router, 0.12.1 fp8 fallback, without TE)."""
    try:
        import megatron.core.fp8_utils as fp8_utils
    except ImportError:
        fp8_utils = None
    impl = getattr(fp8_utils, "_quantize_param_shard_impl", None)
    if impl is not None and not getattr(fp8_utils, "HAVE_TE", True) and not getattr(impl, "__standin__", False):
        def _quantize_param_shard_impl(model_params, *args, **kwargs):
            if len(model_params) == 0:
                return None
            return impl(model_params, *args, **kwargs)
        _quantize_param_shard_impl.__standin__ = True
        fp8_utils._quantize_param_shard_impl = _quantize_param_shard_impl
    try:
        import megatron.core.transformer.moe.moe_utils as moe_utils
    except ImportError:
        return
    if not getattr(moe_utils, "HAVE_TE", True) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def fork_started_results_queue():
    """In a rank, before the first torch_dist save (see the module docstring)."""
    import multiprocessing as mp
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "missing") is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


def adapt_torch_write_item():
    """See the module docstring (torch 2.13 ``_write_item`` signature)."""
    import inspect

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch.distributed.checkpoint import filesystem

    from megatron.core.dist_checkpointing.strategies import torch as mtorch
    planner = getattr(mtorch, "MCoreSavePlanner", None)
    if planner is not None and hasattr(planner, "_add_non_coordinator_iobytes_request"):
        planner._add_non_coordinator_iobytes_request = lambda self, plan: None

    real = filesystem._write_item
    params = inspect.signature(real).parameters
    if getattr(filesystem_async._write_item, "__standin__", False) or "serialization_format" not in params:
        return
    src = inspect.getsource(filesystem_async)
    if "serialization_format" in src:  # 0.16.1 passes it itself
        return

    def _write_item(*args):
        if len(args) == 4:  # 0.8.0: (stream, data, write_item, storage_key)
            args = (filesystem._StorageWriterTransforms(),) + args
        return real(*args, serialization_format=filesystem.SerializationFormat.TORCH_SAVE)

    _write_item.__standin__ = True
    filesystem_async._write_item = _write_item


def allow_checkpoint_globals():
    """See the module docstring (torch >= 2.6 ``weights_only`` default, 0.8.0 ``common.pt``)."""
    import argparse

    from megatron.core.enums import ModelType
    torch.serialization.add_safe_globals([argparse.Namespace, ModelType])
