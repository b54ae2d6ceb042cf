"""The real megatron-core 0.8.0 / 0.12.1 / 0.16.1 runs of ``mcore_versions`` with
``ckptmap.hooks.megatron`` active, as a training script that imports it would have it.

    from mcore_versions.hooked import run_hooked
    truths = run_hooked("0.16.1", [("generate", case, save_dir),                     # legacy save only
                                   ("load", case, save_dir, {"load_check": "exact"})])

A launcher of its own (``python -m mcore_versions.hooked.run --serve``, kept like the plain one) runs ``mcore_versions.run`` after
importing ``ckptmap.hooks.megatron`` right after megatron.core, so the hook wraps that version's
``DistributedDataParallel.__init__`` and ``load_parameter_state`` before any rank is forked. Per
job it calls ``configure(save_dir=<save_dir>)`` (the wheel has no ``megatron.training``, so the
hook writes ``<save_dir>/param_map`` at model construction) and, before the legacy save,
``save_param_maps(<the DDP chunks>, <save_dir>/iter_NNNNNNN/param_map)`` — what the hook's
``save_checkpoint`` wrapper does in Megatron-LM. Nothing of megatron is replaced beyond what
``mcore_versions`` already stands in for.

Kept in a sub-package on purpose: ``mcore_versions.source_hash()`` hashes the package's top-level
modules only, so the cached standard runs (``<venv>/mcore-cache``) stay valid whatever changes
here — these runs are not part of them.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from .. import TESTS, Case, HarnessError, _job_dict, run_in_launcher, target_dir

REPO = TESTS.parent


def run_hooked(version: str, jobs: list, *, timeout: float = 300.0, raise_errors: bool = True) -> list:
    """``("generate", case, save_dir)``: train one step, write the legacy checkpoint into
    ``save_dir`` (the ``--save`` directory) with the hook's param_maps; returns the truth.
    ``("load", case, save_dir, {"load_check": ...})``: build the model, load the legacy checkpoint
    (``load_parameter_state`` runs the hook's check); returns the truth of what was loaded, or, with
    ``raise_errors=False``, the :class:`HarnessError` holding every rank's traceback."""
    tmp_root = pathlib.Path(tempfile.mkdtemp(prefix=f"mcore_hooked_{version}_"))
    try:
        spec_jobs = []
        for i, job in enumerate(jobs):
            kind, case = job[0], job[1]
            assert isinstance(case, Case) and case.version == version, (i, case)
            tmp = str(tmp_root / f"job{i}")
            if kind == "generate":
                out = pathlib.Path(job[2])
                if out.exists():
                    shutil.rmtree(out)
                out.mkdir(parents=True)
                # the worker saves into <out_dir>/legacy: that is the --save directory
                spec_jobs.append(_job_dict("generate", case, out_dir=str(out), saves=[("torch", None)], tmp=tmp,
                                           timeout=timeout, hook_save_dir=str(out / "legacy")))
            elif kind == "load":
                opts = job[3] if len(job) > 3 else {}
                spec_jobs.append(_job_dict("load", case, sources=[{"dir": str(job[2]), "fmt": "torch",
                                                                   "sharding_type": None}],
                                           tmp=tmp, timeout=timeout, hook_save_dir=None,
                                           load_check=opts.get("load_check", "exact")))
            else:
                raise ValueError(f"unknown job kind {kind!r}")
        spec = tmp_root / "jobs.json"
        spec.write_text(json.dumps({"version": version, "jobs": spec_jobs}))
        out_text, code = run_in_launcher("mcore_versions.hooked.run", version, [target_dir(version), TESTS, REPO],
                                         spec, [pathlib.Path(j["tmp"]) / "status.json" for j in spec_jobs],
                                         timeout * len(jobs))
        import torch
        results = []
        for i, job in enumerate(spec_jobs):
            status_file = pathlib.Path(job["tmp"]) / "status.json"
            if not status_file.exists():
                raise HarnessError(f"mcore_versions.hooked {version} launcher "
                                   f"{'timed out' if code is None else f'exited {code}'} before job "
                                   f"{i} ({job['kind']}) finished; its output:\n{out_text[-20000:]}")
            status = json.loads(status_file.read_text())
            if not status["ok"]:
                if raise_errors:
                    raise HarnessError(status["error"])
                results.append(HarnessError(status["error"]))
                continue
            res = torch.load(pathlib.Path(job["tmp"]) / "result.pt", weights_only=False)
            for r in res:
                r["seconds"], r["import_seconds"] = status["seconds"], status["import_seconds"]
            results.append(res[0])
        return results
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
