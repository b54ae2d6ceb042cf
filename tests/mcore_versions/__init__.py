"""Real megatron-core 0.8.0 / 0.12.1 / 0.16.1 on CPU: a training step, real checkpoints, and the
truth read from the live objects. See ``README.md``.

    from mcore_versions import Case, generate, load
    case = Case(version="0.12.1", tp=2, pp=2, vpp=2, dp=2, swiglu=True, query_groups=2)
    truth = generate(case, out_dir)            # out_dir/legacy, out_dir/torch_dist_<type>, truth.pt
    back = load(case, out_dir / "legacy", fmt="legacy")
    back = load(case, out_dir / "torch_dist_fully_sharded_model_space", fmt="torch_dist",
                sharding_type="fully_sharded_model_space")

Each version has one launcher process per test process (``python -m mcore_versions.run --serve``
with that version's target dir first on ``PYTHONPATH``, started on first use, kept for the next
calls): it imports megatron.core once and forks the ranks of every job it is sent.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

__all__ = ["Case", "generate", "load", "run_jobs", "HarnessError", "VERSIONS", "SHARDING_TYPES",
           "target_dir", "source_hash", "STANDARD_CASES", "LOAD_FORMATS", "assemble"]

VERSIONS = ("0.8.0", "0.12.1", "0.16.1")
# the DistributedOptimizer sharding types each version's save_checkpoint can write (first = default)
SHARDING_TYPES = {
    "0.8.0": ("fully_sharded_model_space", "dp_zero_gather_scatter"),
    "0.12.1": ("fully_sharded_model_space", "dp_zero_gather_scatter"),
    "0.16.1": ("dp_reshardable", "fully_reshardable", "dp_zero_gather_scatter"),
}
HERE = pathlib.Path(__file__).resolve().parent
TESTS = HERE.parent


class HarnessError(RuntimeError):
    """A rank or the launcher failed or timed out; the message holds every failed rank's traceback."""


@dataclasses.dataclass(frozen=True)
class Case:
    version: str = "0.16.1"
    tp: int = 1
    pp: int = 1
    vpp: int | None = None          # model chunks per pipeline rank (interleaved schedule), None = off
    dp: int = 1                     # data-parallel size (expert parallelism is carved out of it)
    ep: int = 1
    num_experts: int | None = None  # MoE in every layer: router + local experts (SequentialMLP)
    moe_topk: int = 2
    moe_grouped_gemm: bool = False  # GroupedMLP needs the CUDA ``grouped_gemm`` package: refused on CPU
    num_layers: int = 2             # total over pipeline stages and chunks
    hidden: int = 40                # not a multiple of 64: 0.8+'s 64-element param alignment shows
    ffn: int = 56
    heads: int = 4
    query_groups: int | None = None  # None = heads (no GQA)
    vocab: int = 64
    swiglu: bool = False
    bias: bool = True
    overlap_grad_reduce: bool = False
    bucket_size: int | None = None  # DDP bucket_size; every version ignores it without overlap_grad_reduce
    tied_embeddings: bool = False
    seed: int = 0
    steps: int = 1
    # uneven pipeline stages (0.9+, no VPP): layers of the first / last stage, the rest split evenly
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def __post_init__(self):
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {self.version!r}")
        if self.query_groups is None:
            object.__setattr__(self, "query_groups", self.heads)
        if self.world > 9:   # 9: TP 1 x PP 3 x DP 3, the combined reshard target of issue 13
            raise ValueError(f"world size tp*pp*dp = {self.world} > 9")
        if self.dp % self.ep:
            raise ValueError("ep must divide dp")
        if self.ep > 1 and not self.num_experts:
            raise ValueError("ep > 1 needs num_experts")
        if self.num_experts and self.num_experts % self.ep:
            raise ValueError("ep must divide num_experts")
        if self.moe_grouped_gemm:
            raise ValueError("moe_grouped_gemm: megatron's GroupedMLP calls the CUDA-only grouped_gemm "
                             "package (and TEGroupedMLP needs TransformerEngine); not available on CPU")
        chunks = self.pp * (self.vpp or 1)
        uneven = [n for n in (self.first_stage_layers, self.last_stage_layers) if n is not None]
        if uneven:
            rest, left = self.num_layers - sum(uneven), self.pp - len(uneven)
            if self.vpp is not None or left < 0 or (rest % left if left else rest):
                raise ValueError("uneven stages: no vpp, and the layers left must split over the stages left")
        elif self.num_layers % chunks:
            raise ValueError(f"num_layers must split over pp*vpp = {chunks} chunks")
        if self.vpp is not None and (self.pp < 2 or self.vpp < 2):
            raise ValueError("vpp needs pp >= 2 and vpp >= 2 (or None)")
        if self.heads % self.tp or self.query_groups % self.tp or self.heads % self.query_groups:
            raise ValueError("tp must divide heads and query_groups, query_groups must divide heads")
        if self.vocab % self.tp or self.ffn % self.tp:
            raise ValueError("tp must divide vocab and ffn")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")

    @property
    def world(self):
        return self.tp * self.pp * self.dp


# The standard cases: few, since every run starts up to 8 ranks on 2 cores.
STANDARD_CASES = {
    # TP 2 x PP 2 (interleaved, 2 chunks per stage) x DP 2: SwiGLU, GQA, tied embeddings across
    # the pipeline, overlap-grad-reduce with a bucket size that makes several buckets on chunk 0 of
    # pipeline rank 0 (the only one Megatron buckets), hidden 40 (64-alignment gaps). bucket_size
    # 600 makes the bucket before the shared embedding close on its own (see
    # worker._check_buffer_layout for the 0.8 / 0.12 layout bug other sizes run into)
    "dense": dict(tp=2, pp=2, vpp=2, dp=2, num_layers=4, hidden=40, ffn=56, heads=4, query_groups=2,
                  swiglu=True, bias=True, tied_embeddings=True, overlap_grad_reduce=True, bucket_size=600),
    # DP 4 (TP 1, PP 1) with MoE: 4 experts, EP 2 (expert-DP 2), router + SequentialMLP experts,
    # untied embeddings, overlap-grad-reduce with small buckets (padding to lcm(dp, 128)); no bias
    # (0.12.1: "Bias is not supported for MoE")
    "moe": dict(tp=1, pp=1, dp=4, ep=2, num_experts=4, num_layers=2, hidden=40, ffn=24, heads=4,
                bias=False, overlap_grad_reduce=True, bucket_size=2000),
}


def LOAD_FORMATS(version):
    """(fmt, sharding_type) of every save a generate run writes: legacy + one torch_dist per type."""
    return [("legacy", None)] + [("torch_dist", st) for st in SHARDING_TYPES[version]]


def target_dir(version: str) -> pathlib.Path:
    """Where ``make mcore-versions`` installed megatron-core ``version``: ``<venv>/mcore/<version>``
    (``<venv>`` = the running interpreter's ``sys.prefix``), or ``$MCORE_VERSIONS_DIR/<version>``."""
    root = os.environ.get("MCORE_VERSIONS_DIR")
    base = pathlib.Path(root) if root else pathlib.Path(sys.prefix) / "mcore"
    d = base / version
    if not (d / ".installed").exists():
        raise HarnessError(f"megatron-core {version} is not installed in {d}: run `make mcore-versions`")
    return d


def source_hash() -> str:
    """Hash of the harness source (and the stand-ins it reuses): part of every cache key."""
    h = hashlib.sha256()
    for path in sorted(HERE.glob("*.py")) + [TESTS / "mcore_harness" / "stubs.py"]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _saves(version):
    return [("torch", None)] + [("torch_dist", st) for st in SHARDING_TYPES[version]]


def _job_dict(kind, case: Case, **kw):
    d = {"kind": kind, "case": dataclasses.asdict(case), "world": case.world}
    d.update(kw)
    return d


def run_jobs(version: str, jobs: list, *, timeout: float = 300.0, raise_errors: bool = True) -> list:
    """Run ``jobs`` in one launcher process of ``version`` (one import of megatron.core for all).
    Each job is ``("generate", case, out_dir)``, ``("load", case, sources)`` with ``sources`` a list
    of ``(dir, fmt, sharding_type)``, or ``("flatten", case, torch_dist_iter_dir, out_file)``
    (``dcp_to_torch_save``, in a child of the launcher). Generate / load jobs take an optional
    4th element ``{"fault": "<rank>:raise|hang"}`` (the harness's own failure tests).
    Returns one result per job: the truth dict (generate), the list of truths, one per source
    (load), or the flat file's path (flatten); with ``raise_errors=False`` a failed job's result
    is its :class:`HarnessError`. ``timeout`` is per job; a launcher's start gets 300 s more."""
    target = target_dir(version)
    tmp_root = pathlib.Path(tempfile.mkdtemp(prefix=f"mcore_versions_{version}_"))
    try:
        spec_jobs = []
        for i, job in enumerate(jobs):
            kind, case = job[0], job[1]
            if case.version != version:
                raise ValueError(f"job {i}: case version {case.version} != {version}")
            tmp = tmp_root / f"job{i}"
            if kind == "generate":
                out = pathlib.Path(job[2])
                if out.exists():
                    shutil.rmtree(out)
                out.mkdir(parents=True)
                spec_jobs.append(_job_dict("generate", case, out_dir=str(out), saves=_saves(version),
                                           tmp=str(tmp), timeout=timeout))
            elif kind == "load":
                sources = []
                for d, fmt, st in job[2]:
                    if fmt not in ("legacy", "torch_dist"):
                        raise ValueError(f"fmt must be 'legacy' or 'torch_dist', got {fmt!r}")
                    if fmt == "torch_dist" and st not in SHARDING_TYPES[version]:
                        raise ValueError(f"{version} has no sharding type {st!r}: {SHARDING_TYPES[version]}")
                    sources.append({"dir": str(d), "fmt": "torch" if fmt == "legacy" else "torch_dist",
                                    "sharding_type": st})
                spec_jobs.append(_job_dict("load", case, sources=sources, tmp=str(tmp), timeout=timeout))
            elif kind == "flatten":
                spec_jobs.append(_job_dict("flatten", case, src=str(job[2]), out=str(job[3]), tmp=str(tmp)))
                continue
            else:
                raise ValueError(f"unknown job kind {kind!r}")
            if len(job) > 3 and job[3].get("fault"):
                spec_jobs[-1]["fault"] = job[3]["fault"]
        spec = tmp_root / "jobs.json"
        spec.write_text(json.dumps({"version": version, "jobs": spec_jobs}))
        launcher_out, code = run_in_launcher("mcore_versions.run", version, [target, TESTS], spec,
                                             [pathlib.Path(j["tmp"]) / "status.json" for j in spec_jobs],
                                             timeout * len(jobs))
        results = []
        import torch
        for i, job in enumerate(spec_jobs):
            status_file = pathlib.Path(job["tmp"]) / "status.json"
            if not status_file.exists():
                raise HarnessError(f"mcore_versions {version} launcher "
                                   f"{'timed out' if code is None else f'exited {code}'} before job {i} "
                                   f"({job['kind']} {job['case']}) finished; its output:\n{launcher_out[-20000:]}")
            status = json.loads(status_file.read_text())
            if not status["ok"]:
                if not raise_errors:
                    results.append(HarnessError(status["error"]))
                    continue
                raise HarnessError(status["error"])
            if job["kind"] == "flatten":
                results.append(pathlib.Path(job["out"]))
                continue
            res = torch.load(pathlib.Path(job["tmp"]) / "result.pt", weights_only=False)
            for r in res:
                r["seconds"] = status["seconds"]
                r["import_seconds"] = status["import_seconds"]
            if job["kind"] == "generate":
                truth = res[0]
                torch.save(truth, pathlib.Path(job["out_dir"]) / "truth.pt")
                results.append(truth)
            else:
                results.append(res)
        return results
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


class _Launcher:
    """A launcher process (``python -m <module> --serve <version>``) and where its output goes."""

    def __init__(self, module, version, paths):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONWARNINGS"] = "ignore"
        self.log = tempfile.NamedTemporaryFile(prefix=f"mcore_launcher_{version}_", suffix=".log")
        # its own session: a timeout kills the launcher and every rank it forked in one signal
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--serve", version], env=env,
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = True     # the next call's wait includes the import

    def output(self, since=0):
        with open(self.log.name, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def kill(self):
        import signal
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()


_LAUNCHERS: dict = {}


def _close_launchers():
    for launcher in _LAUNCHERS.values():
        try:
            launcher.proc.stdin.close()      # EOF: the launcher returns
            launcher.proc.wait(10)
        except Exception:  # noqa: BLE001
            launcher.kill()
    _LAUNCHERS.clear()


atexit.register(_close_launchers)


def run_in_launcher(module, version, paths, spec, status_files, timeout):
    """Send ``spec`` (a jobs.json) to the ``module`` launcher of ``version`` (started with ``paths``
    on ``PYTHONPATH`` if none runs) and wait until every status file exists. Returns (the
    launcher's output during the call, None) on success, or (output, exit code or None if it timed
    out and was killed) when it stopped first; a dead or killed launcher is started anew next time."""
    key = (module, version)
    launcher = _LAUNCHERS.get(key)
    if launcher is None or launcher.proc.poll() is not None:
        launcher = _LAUNCHERS[key] = _Launcher(module, version, paths)
    since = os.path.getsize(launcher.log.name)
    deadline = time.monotonic() + timeout + 30 + (300 if launcher.started else 0)
    launcher.started = False
    try:
        launcher.proc.stdin.write(f"{spec}\n".encode())
        launcher.proc.stdin.flush()
    except OSError:
        pass    # it died: reported below
    while not all(f.exists() for f in status_files):
        code = launcher.proc.poll()
        if code is not None or time.monotonic() > deadline:
            if code is None:
                launcher.kill()
            del _LAUNCHERS[key]
            return launcher.output(since), code
        time.sleep(0.05)
    return launcher.output(since), None


def generate(case: Case, out_dir, *, timeout: float = 300.0) -> dict:
    """Train ``case`` one step and save legacy + torch_dist (every sharding type of the version)
    under ``out_dir``; return the truth (also written to ``out_dir/truth.pt``)."""
    return run_jobs(case.version, [("generate", case, out_dir)], timeout=timeout)[0]


def load(case: Case, ckpt_dir, fmt: str = "legacy", sharding_type: str | None = None, *,
         timeout: float = 300.0) -> dict:
    """Build ``case``'s model and optimizer (no training), load ``ckpt_dir`` (the directory with
    ``latest_checkpointed_iteration.txt``) with the version's own loaders, return the truth of what
    got loaded. ``fmt="torch_dist"`` needs the ``sharding_type`` it was saved with (0.16 reads it
    from the checkpoint's content metadata; the argument is still checked)."""
    if fmt == "torch_dist" and sharding_type is None:
        sharding_type = SHARDING_TYPES[case.version][0]
    return run_jobs(case.version, [("load", case, [(ckpt_dir, fmt, sharding_type)])], timeout=timeout)[0][0]


def assemble(truth: dict, state: str = "weight") -> dict:
    """Full (unsharded) tensors from megatron's own ``sharded_state_dict()`` metadata in the truth:
    ``{sharded key: tensor of the global shape}`` for ``state`` in ``weight`` (bf16 model weights) or
    ``param`` / ``exp_avg`` / ``exp_avg_sq`` (fp32). Each rank's local tensor is cut into the pieces
    its ShardedTensor (or a factory's pieces, in order along dim 0) describes; only main replicas
    (``replica_id`` all zero) are placed, and every element must be placed exactly once."""
    import torch

    out, count = {}, {}
    for key, rk in truth["ranks"].items():
        for ch in rk["chunks"]:
            for sd_key, meta in ch["sharded"].items():
                if meta["type"] == "ShardedObject":
                    continue
                name = "module." + sd_key
                if name not in ch["live"]:
                    continue
                local = ch["live"][name][state]
                pieces = meta["pieces"] if meta["type"] == "ShardedTensorFactory" else [meta]
                rows = [p["local_shape"][0] for p in pieces]
                if sum(rows) != local.shape[0]:
                    raise AssertionError(f"{key} {sd_key}: pieces {rows} do not split {tuple(local.shape)}")
                for p, part in zip(pieces, torch.split(local, rows, dim=0)):
                    if p["flattened_range"] is not None:
                        raise AssertionError(f"{sd_key}: flattened ShardedTensor in a model state dict")
                    rid = p["replica_id"]
                    if (rid if isinstance(rid, int) else max(rid)) != 0:
                        continue
                    k = p["key"]
                    if k not in out:
                        out[k] = torch.zeros(p["global_shape"], dtype=local.dtype)
                        count[k] = torch.zeros(p["global_shape"], dtype=torch.int32)
                    pre = p["prepend_axis_num"]
                    idx = tuple(slice(o, o + 1) for o in p["global_offset"][:pre]) + tuple(
                        slice(o, o + n) for o, n in zip(p["global_offset"][pre:], p["local_shape"]))
                    out[k][idx] = part.reshape(out[k][idx].shape)
                    count[k][idx] += 1
    for k, c in count.items():
        if not bool((c == 1).all()):
            raise AssertionError(f"{k}: elements placed {sorted(set(c.flatten().tolist()))} times, not once")
    return out
