"""Pure-torch stand-ins that let the real megatron-core 0.6.0 run on a CPU-only torch build.

Nothing here replaces Megatron's own DDP, ParamAndGradBuffer or DistributedOptimizer code. The
stand-ins answer only what needs apex, TransformerEngine or CUDA:

* ``apex.optimizers.FusedAdam``: torch Adam with apex's behaviour (state ``exp_avg`` /
  ``exp_avg_sq``, ``step`` counter kept in the *param group*, empty groups skipped, decoupled
  weight decay in ``adam_w_mode`` — the arithmetic of apex's ``multi_tensor_adam`` kernel).
  ``FusedSGD`` is torch SGD (imported by Megatron, never used here).
* ``apex.multi_tensor_apply.multi_tensor_applier`` and ``amp_C.multi_tensor_l2norm`` /
  ``multi_tensor_scale``: loops over the tensor lists (gradient clipping).
* ``apex.normalization.fused_layer_norm.FusedLayerNormAffineFunction``: ``F.layer_norm`` in fp32,
  cast back (megatron's own ``FusedLayerNorm`` module of the local spec uses it).
* ``transformer_engine``: ``te.pytorch.LayerNorm`` / ``RMSNorm`` (the ``TENorm`` that
  megatron.core 0.6 uses for the *final* layernorm even with the local spec: parameters
  ``weight`` then ``bias``, no ``_extra_state``), ``te.pytorch.DotProductAttention`` (causal
  attention in torch; with context parallelism it all-gathers K/V over the CP group), and
  placeholder ``Linear`` / ``LayerNormLinear`` base classes that refuse to be built. A
  distribution entry for ``transformer-engine`` (version 1.5.0) answers
  ``importlib.metadata.version`` at megatron's import time.
* ``pkg_resources`` (only if setuptools no longer provides it): exposes ``packaging``.
* CUDA: ``torch.cuda.current_device`` answers the CPU device, ``synchronize`` is a no-op,
  ``Stream`` a dummy, ``get_rng_state`` the CPU generator state; :class:`CudaOnCpu` (a torch
  function mode active while a rank runs) maps ``device='cuda'`` / integer devices to the CPU,
  drops ``pin_memory``, makes ``Tensor.cuda()`` the identity and answers the no-argument
  ``Tensor.type()`` with the ``torch.cuda.*`` name Megatron checks for (e.g. the distributed
  optimizer accepts only ``'torch.cuda.BFloat16Tensor'``-typed model params).
* :func:`install_cpu_rng_tracker`: Megatron's RNG-states tracker forking the CPU generator
  instead of the CUDA one (``model_parallel_cuda_manual_seed`` and the dropout forks use it).

``torch.distributed.new_group`` answers "not a member" for an *empty* rank list instead of
failing (megatron 0.6 asks for such groups when ``cp > 1``; see :func:`_tolerate_empty_new_group`).
``torch.compile`` (megatron's ``jit_fuser``) compiles lazily, at first call (start-up time only).
Collectives are not stubbed: torch 2.13's gloo backend runs ``_reduce_scatter_base`` and
``_all_gather_base`` on CPU tensors (including the in-place forms Megatron uses), asynchronously
when Megatron asks for ``async_op=True``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.metadata
import importlib.util
import math
import sys
import types

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

TE_VERSION = "1.5.0"
_INSTALLED = False


# --------------------------------------------------------------------------------------- apex

class FusedAdam(torch.optim.Optimizer):
    """apex.optimizers.FusedAdam in pure torch (fp32 params; no amsgrad, no capturable)."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 adam_w_mode=True, weight_decay=0.0, amsgrad=False, set_grad_none=True,
                 capturable=False, master_weights=False):
        if amsgrad or capturable or master_weights:
            raise RuntimeError("FusedAdam stand-in: amsgrad / capturable / master_weights unsupported")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none

    def zero_grad(self, set_to_none=None):
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if len(group["params"]) == 0:
                continue  # apex skips empty groups: their step counter does not advance
            beta1, beta2 = group["betas"]
            group["step"] = group["step"] + 1 if "step" in group else 1
            step = group["step"]
            if group["bias_correction"]:
                bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
            else:
                bc1 = bc2 = 1.0
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.float32:
                    raise RuntimeError("FusedAdam stand-in expects fp32 (main) params")
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                g = p.grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if self.adam_w_mode == 0 and decay != 0:  # ADAM_MODE_0: L2 regularisation
                    g = g + decay * p
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / bc2).sqrt_().add_(eps)
                update = (m / bc1) / denom
                if self.adam_w_mode == 1 and decay != 0:  # ADAM_MODE_1: decoupled weight decay
                    update = update + decay * p
                p.add_(update, alpha=-lr)
        return loss


class FusedSGD(torch.optim.SGD):
    """Imported by megatron.core.optimizer; not used by the harness."""


class MultiTensorApply:
    available = True
    warned = False

    def __init__(self, chunk_size):
        self.chunk_size = chunk_size

    def __call__(self, op, noop_flag_buffer, tensor_lists, *args):
        return op(self.chunk_size, noop_flag_buffer, tensor_lists, *args)


def multi_tensor_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor=False):
    tensors = tensor_lists[0]
    norms = torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]) if tensors \
        else torch.zeros(0, dtype=torch.float32)
    total = torch.linalg.vector_norm(norms).reshape(1)
    return total, (norms if per_tensor else torch.empty(0, dtype=torch.float32))


def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    for src, dst in zip(*tensor_lists):
        out = src.float() * scale
        if noop_flag is not None and not torch.isfinite(out).all():
            noop_flag.fill_(1)
        dst.copy_(out)


class FusedLayerNormAffineFunction:
    """apex's fused layer norm: statistics in fp32, output in the input dtype."""

    @staticmethod
    def forward(ctx, input, weight, bias, normalized_shape, eps, memory_efficient=False):
        out = F.layer_norm(input.float(), tuple(normalized_shape), weight.float(), bias.float(), eps)
        return out.to(input.dtype)

    @classmethod
    def apply(cls, input, weight, bias, normalized_shape, eps, memory_efficient=False):
        return cls.forward(None, input, weight, bias, normalized_shape, eps, memory_efficient)


# ---------------------------------------------------------------------------- transformer_engine

def _cpu(device):
    return "cpu" if device is None or _is_cuda_device(device) else device


class TELayerNorm(torch.nn.Module):
    """te.pytorch.LayerNorm: parameters ``weight`` then ``bias``; fp32 statistics."""

    def __init__(self, hidden_size, eps=1e-5, sequence_parallel=False, params_dtype=None,
                 zero_centered_gamma=False, device="cuda"):
        super().__init__()
        dtype = params_dtype or torch.get_default_dtype()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.normalized_shape = (hidden_size,)
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=_cpu(device)))
        self.bias = torch.nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=_cpu(device)))
        self.weight.sequence_parallel = sequence_parallel
        self.bias.sequence_parallel = sequence_parallel
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.zeros_(self.weight) if self.zero_centered_gamma else torch.nn.init.ones_(self.weight)
        torch.nn.init.zeros_(self.bias)

    def forward(self, inp):
        w = self.weight + 1 if self.zero_centered_gamma else self.weight
        out = F.layer_norm(inp.float(), self.normalized_shape, w.float(), self.bias.float(), self.eps)
        return out.to(inp.dtype)


class TERMSNorm(torch.nn.Module):
    """te.pytorch.RMSNorm: parameter ``weight``; fp32 statistics."""

    def __init__(self, hidden_size, eps=1e-5, sequence_parallel=False, params_dtype=None,
                 zero_centered_gamma=False, device="cuda"):
        super().__init__()
        dtype = params_dtype or torch.get_default_dtype()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=_cpu(device)))
        self.weight.sequence_parallel = sequence_parallel
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.zeros_(self.weight) if self.zero_centered_gamma else torch.nn.init.ones_(self.weight)

    def forward(self, inp):
        w = (self.weight + 1 if self.zero_centered_gamma else self.weight).float()
        x = inp.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w).to(inp.dtype)


class _TEUnavailable(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__}: TransformerEngine linear layers are not stubbed; "
            "the harness builds the local layer spec")


class TELinear(_TEUnavailable):
    pass


class TELayerNormLinear(_TEUnavailable):
    pass


class _CPGather(torch.autograd.Function):
    """All-gather along dim 0 over the context-parallel group; backward = sum, keep own slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = torch.distributed.get_world_size(group)
        ctx.rank = torch.distributed.get_rank(group)
        ctx.n = x.shape[0]
        out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype)
        torch.distributed.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


class TEDotProductAttention(torch.nn.Module):
    """te.pytorch.DotProductAttention (``sbhd`` layout, causal or no mask), pure torch.

    With a context-parallel group of size cp, every rank holds the sequence chunks
    ``(r, 2cp-1-r)`` of ``2cp`` equal chunks (Megatron's load-balanced split); K and V are
    all-gathered and the causal mask uses global positions.
    """

    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 qkv_format="sbhd", attn_mask_type="causal", window_size=None, sequence_parallel=False,
                 tp_size=1, get_rng_state_tracker=None, tp_group=None, layer_number=None,
                 attention_type="self", cp_group=None, cp_global_ranks=None, cp_stream=None,
                 softmax_scale=None):
        super().__init__()
        if attention_dropout:
            raise NotImplementedError("TE attention stand-in: attention dropout must be 0")
        self.kv_channels = kv_channels
        self.attn_mask_type = attn_mask_type
        self.cp_group = cp_group
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, **kwargs):
        mask_type = attn_mask_type or self.attn_mask_type
        if mask_type not in ("causal", "no_mask"):
            raise NotImplementedError(f"TE attention stand-in: mask type {mask_type!r}")
        sq, b, nh, hn = query.shape
        cp = torch.distributed.get_world_size(self.cp_group) if self.cp_group is not None else 1
        if cp > 1:
            r = torch.distributed.get_rank(self.cp_group)
            half = sq // 2
            key, value = (self._gather_global(t, cp) for t in (key, value))
            q_pos = torch.cat([torch.arange(r * half, (r + 1) * half),
                               torch.arange((2 * cp - 1 - r) * half, (2 * cp - r) * half)])
        else:
            q_pos = torch.arange(sq)
        k_pos = torch.arange(key.shape[0])
        ng = key.shape[2]
        if nh != ng:
            key = key.repeat_interleave(nh // ng, dim=2)
            value = value.repeat_interleave(nh // ng, dim=2)
        scores = torch.einsum("sbhd,tbhd->bhst", query.float(), key.float()) * self.softmax_scale
        if mask_type == "causal":
            scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("bhst,tbhd->sbhd", probs, value.float()).to(query.dtype)
        return out.reshape(sq, b, nh * hn)

    def _gather_global(self, t, cp):
        gathered = _CPGather.apply(t, self.cp_group)  # [cp * local, ...], rank-major
        half = t.shape[0] // 2
        chunks = gathered.split(half, dim=0)  # rank j holds chunks (j, 2cp-1-j)
        order = [None] * (2 * cp)
        for j in range(cp):
            order[j], order[2 * cp - 1 - j] = chunks[2 * j], chunks[2 * j + 1]
        return torch.cat(order, dim=0)


class _TEDistribution(importlib.metadata.Distribution):
    def read_text(self, filename):
        if filename in ("METADATA", "PKG-INFO"):
            return f"Metadata-Version: 2.1\nName: transformer-engine\nVersion: {TE_VERSION}\n"
        return None

    def locate_file(self, path):
        return None


class _TEDistributionFinder(importlib.abc.MetaPathFinder):
    """Lets ``importlib.metadata.version('transformer-engine')`` answer the stand-in's version."""

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        name = getattr(context, "name", None)
        if name and name.lower().replace("-", "_").replace(".", "_") == "transformer_engine":
            yield _TEDistribution()


# ------------------------------------------------------------------------------------------ CUDA

def _is_cuda_device(device):
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaOnCpu(TorchFunctionMode):
    """Answers CUDA-only tensor calls on the CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(args[0])
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _DummyStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


def _tolerate_empty_new_group():
    """megatron.core 0.6 ``initialize_model_parallel`` creates some expert-parallel groups from
    empty rank ranges when ``context_parallel_size > 1`` (``range(start + k, end, tp * cp)``); the
    result is never used, but torch 2.13's ``new_group`` rejects an empty rank list. Every rank
    makes the same calls, so answering "not a member" without creating a group keeps the group
    numbering consistent across ranks."""
    import torch.distributed as dist

    real_new_group = dist.new_group
    if getattr(real_new_group, "__stub__", False):
        return

    def new_group(ranks=None, *args, **kwargs):
        if ranks is not None and len(list(ranks)) == 0:
            return dist.GroupMember.NON_GROUP_MEMBER
        return real_new_group(ranks, *args, **kwargs)

    new_group.__stub__ = True
    dist.new_group = new_group


def _lazy_torch_compile():
    """megatron.core 0.6 decorates a few fused helpers with ``torch.compile`` at import time
    (``megatron.core.jit.jit_fuser``), which imports torch._dynamo/inductor (~1.5 s per rank
    process). The stand-in defers the real ``torch.compile`` to the first call of a decorated
    function (none is called with the harness's configuration): same behaviour, faster start."""
    real_compile = torch.compile
    if getattr(real_compile, "__stub__", False):
        return

    def compile(model=None, **kwargs):
        if model is None:
            return lambda fn: compile(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def lazily_compiled(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **kwargs)
            return compiled(*args, **kw)

        return lazily_compiled

    compile.__stub__ = True
    torch.compile = compile


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _DummyStream
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()


# ----------------------------------------------------------------------------------- installing

def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__stub__ = True
    sys.modules[name] = mod
    return mod


def install():
    """Put the stand-ins into ``sys.modules`` / torch.cuda; call before importing megatron."""
    global _INSTALLED
    if _INSTALLED:
        return
    if "megatron.core" in sys.modules:
        raise RuntimeError("stubs.install() must run before megatron.core is imported")
    for real in ("apex", "amp_C", "transformer_engine"):
        if real not in sys.modules and importlib.util.find_spec(real) is not None:
            raise RuntimeError(f"{real} is installed; the harness expects a CPU-only environment")

    apex = _module("apex")
    apex.optimizers = _module("apex.optimizers", FusedAdam=FusedAdam, FusedSGD=FusedSGD)
    apex.multi_tensor_apply = _module("apex.multi_tensor_apply", MultiTensorApply=MultiTensorApply,
                                      multi_tensor_applier=MultiTensorApply(2048 * 32))
    apex.normalization = _module("apex.normalization")
    apex.normalization.fused_layer_norm = _module(
        "apex.normalization.fused_layer_norm", FusedLayerNormAffineFunction=FusedLayerNormAffineFunction)
    _module("amp_C", multi_tensor_l2norm=multi_tensor_l2norm, multi_tensor_scale=multi_tensor_scale)

    te = _module("transformer_engine", __version__=TE_VERSION)
    te.pytorch = _module("transformer_engine.pytorch", LayerNorm=TELayerNorm, RMSNorm=TERMSNorm,
                         Linear=TELinear, LayerNormLinear=TELayerNormLinear,
                         DotProductAttention=TEDotProductAttention)
    sys.meta_path.append(_TEDistributionFinder())

    if importlib.util.find_spec("pkg_resources") is None:
        import packaging.version
        _module("pkg_resources", packaging=packaging)

    _patch_torch_cuda()
    _tolerate_empty_new_group()
    _lazy_torch_compile()
    _INSTALLED = True


def install_cpu_rng_tracker():
    """Replace Megatron's CUDA RNG-states tracker by one that forks the CPU generator."""
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
