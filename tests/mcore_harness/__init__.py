"""Ground truth from the real megatron-core 0.6.0, run in-process on CPU.

``run_case(Case(dp=2, ...), out_dir)`` starts ``dp * cp`` rank processes (forked from a
multiprocessing fork server that imported megatron.core once, gloo). Each builds megatron.core's ``GPTModel`` with the local layer spec, wraps it like
Megatron's training does (``Float16Module`` for bf16, then
``megatron.core.distributed.DistributedDataParallel`` with its ``ParamAndGradBuffer``), builds the
real ``DistributedOptimizer`` through ``get_megatron_optimizer`` over a pure-torch apex-FusedAdam
stand-in, trains ``steps`` steps with Megatron's no-pipelining schedule and
``finalize_model_grads``, and (if ``save``) writes a legacy Megatron checkpoint: ``distrib_optim.pt``
by the optimizer's own ``save_parameter_state`` and ``model_optim_rng.pt`` as
``save_checkpoint`` builds it. See ``stubs.py`` for what is stood in for (apex,
TransformerEngine, CUDA) and ``worker.py`` for the per-rank steps.

The returned dict (see :func:`run_case`) describes the real buffers and holds the live optimizer
state stitched from every rank's shards, independently of ``distrib_optim.pt``.

Megatron-core 0.6.0 facts that shape the cases:

* The DDP constructor of 0.6 takes ``(config, module, data_parallel_group,
  accumulate_allreduce_grads_in_fp32, overlap_grad_reduce, use_distributed_optimizer,
  expert_data_parallel_group=None, disable_bucketing=False, check_for_nan_in_grad=False,
  bucket_size=40000000)``; ``DistributedDataParallelConfig`` arrived later (0.7).
* Bucketing is off (one bucket per buffer) unless ``overlap_grad_reduce``: the DDP replaces
  ``bucket_size`` by ``None``. ``ddp_bucket_size`` in the result is the value *passed*.
* The local spec's ``DotProductAttention`` refuses context parallelism, so with ``cp > 1`` the
  attention core is Megatron's ``TEDotProductAttention`` over the TE stand-in; it has no
  parameters, so names and buffer layout are those of the local spec.
* Position embedding is RoPE (as in the shared fixtures): no ``position_embeddings`` weight.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import tempfile
import shutil
import time

from .worker import SEQ_LENGTH  # stdlib-only module top: cheap, no torch / megatron import

__all__ = ["Case", "run_case", "HarnessError"]


@dataclasses.dataclass(frozen=True)
class Case:
    dp: int = 1                 # data-parallel size, 1..8 (world size = dp * cp; tp = pp = 1)
    cp: int = 1                 # context-parallel size (1 or 2 is enough)
    num_layers: int = 2
    hidden: int = 16            # odd sizes work (kv_channels = hidden // heads)
    ffn: int = 24
    heads: int = 2
    vocab: int = 37             # padded vocab as Megatron would use
    swiglu: bool = False
    bias: bool = True
    overlap_grad_reduce: bool = False
    bucket_size: int | None = None     # DDP bucket_size argument (None = Megatron default 40_000_000)
    tied_embeddings: bool = False      # with pp=1 megatron ties inside the one stage
    model: str = "mcore"        # megatron.core.models.gpt.GPTModel with get_gpt_layer_local_spec()
    seed: int = 0
    steps: int = 1
    chunks: int = 1             # model chunks per rank, as Megatron's get_model builds them for virtual
                                # pipelining (parallel_state's virtual-pipeline size is set to it);
                                # num_layers is the total over the chunks

    def __post_init__(self):
        if not 1 <= self.dp <= 8:
            raise ValueError(f"dp must be 1..8, got {self.dp}")
        if self.cp < 1 or (self.cp > 1 and SEQ_LENGTH % (2 * self.cp)):
            raise ValueError(f"cp must split the sequence ({SEQ_LENGTH}) into 2*cp chunks, got {self.cp}")
        if self.model != "mcore":
            raise ValueError(f"model must be 'mcore', got {self.model!r}")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.hidden // self.heads < 1:
            raise ValueError("hidden must be >= heads")
        if self.chunks < 1 or self.num_layers % self.chunks:
            raise ValueError(f"chunks must divide num_layers ({self.num_layers}), got {self.chunks}")
        if self.chunks > 1 and (self.cp > 1 or self.tied_embeddings):
            raise ValueError("chunks > 1 runs with cp = 1 and untied embeddings only")


class HarnessError(RuntimeError):
    """A rank failed or the run timed out; the message holds every failed rank's traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: Case, out_dir: pathlib.Path, *, save: bool = True, timeout: float = 300.0,
             load_from: pathlib.Path | None = None, rank_setup=None, megatron_training: bool = False) -> dict:
    """Run ``case`` in ``dp * cp`` processes and return rank 0's view (gathered where needed).

    Returns plain python / CPU tensors::

      param_index_map   [ {ddp_name: (start, end, bucket_id)} per buffer ], buffer order
      param_dtype       {ddp_name: "bfloat16"};  shapes {ddp_name: tuple}
      bucket_indices    [ [(start, end) padded, ...] per buffer ]  (ParamAndGradBuffer.bucket_indices)
      per_bucket_numel, per_bucket_numel_unpadded   exactly the DistributedOptimizer's lists
      registration_order  ddp names in model.parameters() order
      state_dict_order    keys of the saved model state dict ('.'-flattened), _extra_state included
      live              {ddp_name: {"param", "exp_avg", "exp_avg_sq"}} full fp32 tensors stitched
                        from every rank's live main-param shard and Adam state (each element
                        covered exactly once, checked)
      ddp_bucket_size   the bucket_size passed to the DDP;  overlap_grad_reduce  bool
      buffer_chunk      the model chunk of each buffer (the lists above are per buffer, over all chunks)
      chunks            [ per model chunk: {param_index_map, bucket_indices (this chunk's buffers),
                        param_dtype, shapes, registration_order, state_dict_order, live} ]
      warnings          rank 0's warnings whose text starts with "ckptmap" (from hooks)

    With ``Case(chunks > 1)`` the name-keyed entries (``param_dtype``, ``shapes``, ``live``, …)
    exist only per chunk, in ``chunks`` (names repeat across chunks).

    ``ddp_name`` is the name the MindSpeed param_map patch records ("module." + GPTModel name).
    With ``save`` the Megatron checkpoint is written under ``out_dir`` (only DP rank 0 writes).
    Raises :class:`HarnessError` with each failed rank's traceback; never waits longer than
    ``timeout`` seconds (``timeout`` is an addition to the agreed API). With ``load_from`` the
    model and optimizer are built but not trained: the real ``DistributedOptimizer.
    load_parameter_state(load_from)`` fills them and ``live`` reports what it loaded. For the harness's own
    tests, ``MCORE_HARNESS_FAULT=<rank>:raise|hang`` in the environment injects a rank failure.

    ``rank_setup``: a picklable callable (a module-level function, or a ``functools.partial`` of
    one) that every rank calls as ``rank_setup(rank=, out_dir=, case=)`` after the apex / TE / CUDA
    stand-ins are installed and before the process group and the model exist — e.g. to import
    ``ckptmap.hooks.megatron``. ``megatron_training``: emulate Megatron-LM's ``megatron.training``
    with the test-only package in ``tests/fake_megatron_training`` — the ranks set its
    ``get_args()`` (with ``args.save`` = ``out_dir``, or None without ``save``) before building the
    model, and save through its ``training.save_checkpoint_and_time`` →
    ``checkpointing.save_checkpoint`` (the same files as without it).
    """
    import torch

    from . import worker

    out_dir = pathlib.Path(out_dir)
    if save:
        out_dir.mkdir(parents=True, exist_ok=True)
    world = case.dp * case.cp
    case_dict = dataclasses.asdict(case)
    if load_from is not None:
        case_dict["load_from"] = str(load_from)
        save = False
    ctx = _context()
    options = {"rank_setup": rank_setup, "megatron_training": megatron_training,
               # read here: the fork server's environment is the one it started with
               "fault": os.environ.get(worker.FAULT_ENV, "")}
    last_error = None
    for _attempt in range(3):  # a fresh port if another process grabbed ours in between
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="mcore_harness_"))
        started = []
        try:
            port = _free_port()
            procs = [ctx.Process(target=worker.entry, daemon=True,
                                 args=(r, world, port, case_dict, str(out_dir), save, str(tmp), options))
                     for r in range(world)]
            for p in procs:
                p.start()
                started.append(p)
            error = _wait(procs, tmp, timeout, case)
            if error is None:
                return torch.load(tmp / "result.pt", weights_only=False)
            last_error = error
            if "EADDRINUSE" not in error and "Address already in use" not in error:
                raise HarnessError(error)
        finally:
            for p in started:
                if p.is_alive():
                    p.kill()
                p.join(5)
            shutil.rmtree(tmp, ignore_errors=True)
    raise HarnessError(last_error)


def _context():
    """Ranks start from a fork server that imported torch, the stand-ins and megatron.core once
    (``preload.py``): each rank is a fork of it, never of the test process, and skips that import."""
    import multiprocessing
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mcore_harness.preload"])
    # The server ignores the sys.path it is handed when it imports the preload (and swallows the
    # ImportError): it finds this package through PYTHONPATH, given to it alone.
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).resolve().parent.parent)]
                                               + ([before] if before else []))
    try:
        forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    return ctx


def _wait(procs, tmp: pathlib.Path, timeout: float, case: Case, grace: float = 5.0):
    """Wait for all ranks; return None on success, else an error text with every rank's report."""
    deadline = time.monotonic() + timeout
    failed_at = None
    while True:
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return None
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()  # give the other ranks a moment to report their own errors
        now = time.monotonic()
        if all(c is not None for c in codes) or (failed_at is not None and now - failed_at > grace) \
                or now > deadline:
            break
        time.sleep(0.05)
    timed_out = failed_at is None
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(5)
    lines = [f"mcore harness: {case} " + (f"timed out after {timeout:.0f} s" if timed_out else "failed")]
    for r, p in enumerate(procs):
        err = tmp / f"rank{r}.err"
        if err.exists():
            lines.append(f"--- rank {r} (exit code {p.exitcode}) ---\n{err.read_text()}")
        elif (tmp / f"rank{r}.ok").exists():
            lines.append(f"--- rank {r}: finished ---")
        else:
            lines.append(f"--- rank {r}: no report (exit code {p.exitcode}; killed or crashed) ---")
    return "\n".join(lines)
