"""Session fixture: every standard case of a version generated once (and reloaded by the version's
own loaders once), cached on disk by version + case + harness source hash.

    from mcore_versions.fixtures import mcore_standard   # registers the fixture in a test module

    def test_x(mcore_standard):
        run = mcore_standard("0.12.1", "dense")
        run.case, run.dir, run.truth            # run.dir / "legacy", run.dir / "torch_dist_<type>"
        run.reloaded[("torch_dist", "dp_zero_gather_scatter")]   # truth of the self-reload

The first request for a version runs *all* its standard cases in one launcher process (import
megatron.core once, generate each case, then reload every save of it). The cache lives in
``<venv>/mcore-cache/`` (``$MCORE_VERSIONS_CACHE`` overrides; ``MCORE_VERSIONS_CACHE=off`` uses a
pytest temp dir, i.e. no reuse across sessions). A cache entry is used only if complete.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time

import pytest

from . import LOAD_FORMATS, SHARDING_TYPES, STANDARD_CASES, Case, run_jobs, source_hash


# A load at another layout, per version, of the "dense" standard case's torch_dist save: the
# sharding type that version can reshard, and the layout it is loaded into.
RESHARD = {
    "0.8.0": ("fully_sharded_model_space", dict(tp=1, pp=2, vpp=None, dp=2)),
    "0.12.1": ("fully_sharded_model_space", dict(tp=1, pp=2, vpp=None, dp=2)),
    # dp_reshardable reshards along DP only (TP/PP changes are refused with "Global shape mismatch");
    # fully_reshardable would reshard but saves wrong optimizer state at 0.16.1 (README)
    "0.16.1": ("dp_reshardable", dict(dp=1)),
}


@dataclasses.dataclass
class StandardRun:
    version: str
    name: str
    case: Case
    dir: pathlib.Path
    truth: dict
    reloaded: dict          # {(fmt, sharding_type): truth of what the version's own loader loaded}
    flat_torch_dist: pathlib.Path  # the default-sharding torch_dist save as one flat torch file
    seconds: dict           # {"generate": s, "load": s, "import": s, "launcher": s} (of the run that made it)
    cached: bool
    resharded: tuple | None = None  # ("dense" only) (sharding type, Case loaded into, truth of that load)


def _key(version, name, case):
    blob = json.dumps([version, name, dataclasses.asdict(case), source_hash()], sort_keys=True)
    return f"{version}-{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _save_subdir(fmt, st):
    return "legacy" if fmt == "legacy" else f"torch_dist_{st}"


class StandardRuns:
    def __init__(self, root: pathlib.Path):
        self.root = root
        self._runs = {}
        self.log = []   # (version, seconds of the launcher, cached) for the timing summary

    def __call__(self, version: str, name: str) -> StandardRun:
        if (version, name) not in self._runs:
            # pytest-xdist workers share the cache: one generates a version, the others wait and read it
            with open(self.root / f".lock-{version}", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    self._make_version(version)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        return self._runs[(version, name)]

    def _make_version(self, version):
        import torch

        todo, jobs = [], []
        for name, kw in STANDARD_CASES.items():
            case = Case(version=version, **kw)
            d = self.root / _key(version, name, case)
            if (d / "complete.json").exists():
                meta = json.loads((d / "complete.json").read_text())
                self._runs[(version, name)] = StandardRun(
                    version, name, case, d / "ckpt", torch.load(d / "ckpt" / "truth.pt", weights_only=False),
                    torch.load(d / "reloaded.pt", weights_only=False), d / "flat_torch_dist.pt",
                    meta["seconds"], True, _load_resharded(d))
                continue
            for stale in self.root.glob(f"{version}-{name}-*"):  # other harness versions of this case
                shutil.rmtree(stale, ignore_errors=True)
            d.mkdir(parents=True)
            srcs = [(d / "ckpt" / _save_subdir(f, st), f, st) for f, st in LOAD_FORMATS(version)]
            todo.append((name, case, d))
            jobs += [("generate", case, d / "ckpt"), ("load", case, srcs)]
        if not jobs:
            self.log.append((version, 0.0, True))
            return
        reshard_jobs, reshard_of = [], []
        for name, case, d in todo:
            if name == "dense":
                rst, over = RESHARD[version]
                rcase = dataclasses.replace(case, **over)
                reshard_jobs.append(("load", rcase, [(d / "ckpt" / f"torch_dist_{rst}", "torch_dist", rst)]))
                reshard_of.append((d, rst, rcase))
        st = SHARDING_TYPES[version][0]
        flat_jobs = [("flatten", case, d / "ckpt" / f"torch_dist_{st}" / "iter_0000001", d / "flat_torch_dist.pt")
                     for _, case, d in todo]
        t0 = time.monotonic()
        results = run_jobs(version, jobs + reshard_jobs + flat_jobs)
        for (d, rst, rcase), res in zip(reshard_of, results[len(jobs):len(jobs) + len(reshard_jobs)]):
            torch.save({"sharding_type": rst, "case": dataclasses.asdict(rcase), "truth": res[0]}, d / "resharded.pt")
        launcher = time.monotonic() - t0
        self.log.append((version, launcher, False))
        self.log.append((f"{version} import", f"{results[0]['import_seconds']:.1f} s", False))
        for i, (name, case, d) in enumerate(todo):
            truth, loads = results[2 * i], results[2 * i + 1]
            self.log.append((f"{version} {name}", f"generate {truth['seconds']:.1f} s, reload (all formats) "
                             f"{loads[0]['seconds']:.1f} s", False))
            reloaded = {(f, st): r for (f, st), r in zip(LOAD_FORMATS(version), loads)}
            seconds = {"generate": truth["seconds"], "load": loads[0]["seconds"],
                       "import": truth["import_seconds"], "launcher": launcher}
            torch.save(reloaded, d / "reloaded.pt")
            (d / "complete.json").write_text(json.dumps({"seconds": seconds}))
            self._runs[(version, name)] = StandardRun(version, name, case, d / "ckpt", truth, reloaded,
                                                      d / "flat_torch_dist.pt", seconds, False, _load_resharded(d))


def _load_resharded(d):
    import torch

    if not (d / "resharded.pt").exists():
        return None
    r = torch.load(d / "resharded.pt", weights_only=False)
    return r["sharding_type"], Case(**r["case"]), r["truth"]


def _cache_root(tmp_path_factory):
    env = os.environ.get("MCORE_VERSIONS_CACHE")
    if env == "off":
        return tmp_path_factory.mktemp("mcore_versions")
    root = pathlib.Path(env) if env else pathlib.Path(sys.prefix) / "mcore-cache"
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def mcore_standard(tmp_path_factory):
    runs = StandardRuns(_cache_root(tmp_path_factory))
    yield runs
    if runs.log:
        lines = [f"  {v}: " + ("cached" if cached else s if isinstance(s, str) else
                                f"{s:.1f} s launcher in all (import of megatron.core + every job below)")
                 for v, s, cached in runs.log]
        print("\nmcore_versions timings:\n" + "\n".join(lines))
