"""``python -m mcore_versions.run --serve VERSION``: the per-version launcher process.

It is started by :func:`mcore_versions.run_jobs` with ``PYTHONPATH=<target dir of the version>:
<repo>/tests``, so ``import megatron.core`` is that version. It installs the stand-ins, imports
megatron.core once, then serves: each line on stdin names a ``jobs.json``; for each job it forks
``world`` rank processes (gloo on 127.0.0.1) and waits for them with a timeout. Forking after the
import saves each rank the 5-15 s import of torch + megatron.core, and serving saves it each call
of ``run_jobs`` (one launcher per version per test process). The launcher itself never runs a
torch op, so it stays safe to fork. Per job it writes ``status.json`` (ok / error text with every
rank's traceback / seconds; written whole, then renamed) and, on success, rank 0's ``result.pt``
into the job's ``tmp`` directory. ``python -m mcore_versions.run JOBS.json`` runs one file and exits.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_megatron(version):
    t0 = time.monotonic()
    from . import standins
    standins.install()
    import megatron.core
    from megatron.core import package_info
    if package_info.__version__ != version:
        raise RuntimeError(f"imported megatron.core {package_info.__version__} from {megatron.core.__file__}, "
                           f"expected {version}")
    # everything the ranks use, imported before forking
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.dist_checkpointing.serialization  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.fully_parallel  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.filesystem_async  # noqa: F401
    # torch.optim.Optimizer.__init__ imports torch._dynamo on first use: once here, not per rank
    import torch._dynamo  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import megatron.core.transformer.moe.moe_layer  # noqa: F401
    standins.use_fused_adam()
    standins.fix_missing_te_names()
    standins.adapt_torch_write_item()
    if version == "0.8.0":
        standins.allow_checkpoint_globals()
    from . import worker  # noqa: F401
    return time.monotonic() - t0


def _run_job(job, tmp: Path, timeout: float, grace: float = 5.0):
    from . import worker

    world = job["world"]
    ctx = multiprocessing.get_context("fork")
    last = None
    for _attempt in range(3):  # a fresh port if another process took ours in between
        for f in tmp.glob("rank*"):
            f.unlink()
        port = _free_port()
        # not daemonic: dist_checkpointing's async file writer starts a (spawn) Manager per rank
        procs = [ctx.Process(target=worker.entry, args=(r, world, port, job, str(tmp)))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed_at = None
        while True:
            codes = [p.exitcode for p in procs]
            if all(code == 0 for code in codes):
                return None
            if failed_at is None and any(code not in (None, 0) for code in codes):
                failed_at = time.monotonic()
            now = time.monotonic()
            if all(code is not None for code in codes) or (failed_at and now - failed_at > grace) or now > deadline:
                break
            time.sleep(0.02)
        timed_out = failed_at is None
        _kill_tree(procs)
        lines = [f"mcore_versions {job['kind']} {job['case']} " +
                 (f"timed out after {timeout:.0f} s" if timed_out else "failed")]
        for r, p in enumerate(procs):
            err = tmp / f"rank{r}.err"
            if err.exists():
                lines.append(f"--- rank {r} (exit code {p.exitcode}) ---\n{err.read_text()}")
            elif (tmp / f"rank{r}.ok").exists():
                lines.append(f"--- rank {r}: finished ---")
            else:
                lines.append(f"--- rank {r}: no report (exit code {p.exitcode}; killed or crashed) ---")
        last = "\n".join(lines)
        if "EADDRINUSE" not in last and "Address already in use" not in last:
            return last
    return last


def _flatten(job, tmp: Path):
    """A torch_dist checkpoint as one flat torch file, read in a forked child (no ranks): the
    ``.metadata`` pickles megatron.core classes of the version that wrote it, and torch ops run
    there, not in the launcher that later forks more ranks."""
    err = tmp / "flatten.err"
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
            dcp_to_torch_save(job["src"], job["out"])
        except BaseException:  # noqa: BLE001 - reported to the launcher
            import traceback
            err.write_text(traceback.format_exc())
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status == 0:
        return None
    detail = err.read_text() if err.exists() else f"exit status {status}"
    return f"mcore_versions flatten {job['src']} failed:\n{detail}"


def _kill_tree(procs):
    """Kill the ranks and whatever they started (dist_checkpointing's Manager processes)."""
    import signal
    for p in procs:
        if p.is_alive() and p.pid:
            for child in _children(p.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except OSError:
                    pass
            p.kill()
    for p in procs:
        p.join(5)


def _children(pid):
    try:
        out = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    pids = [int(x) for x in out]
    return pids + [g for c in pids for g in _children(c)]


def _run_spec(spec_path, import_s):
    spec = json.loads(Path(spec_path).read_text())
    for job in spec["jobs"]:
        tmp = Path(job["tmp"])
        tmp.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        if job["kind"] == "flatten":
            error = _flatten(job, tmp)
        else:
            error = _run_job(job, tmp, job.get("timeout", 300.0))
        status = {"ok": error is None, "error": error, "seconds": time.monotonic() - t0, "import_seconds": import_s}
        part = tmp / "status.json.part"
        part.write_text(json.dumps(status))
        part.rename(tmp / "status.json")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == "--serve":
        import_s = _import_megatron(argv[1])
        print("mcore_versions launcher ready", flush=True)
        for line in sys.stdin:      # EOF: the test process is gone or done
            if line.strip():
                _run_spec(line.strip(), import_s)
        return 0
    spec_path = argv[0]
    import_s = _import_megatron(json.loads(Path(spec_path).read_text())["version"])
    _run_spec(spec_path, import_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
