"""Launcher: ``mcore_versions.run`` with ``ckptmap.hooks.megatron`` imported after megatron.core
(before the ranks are forked). See the package docstring."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

from .. import run as base

_state = {}


def _import_megatron(version, _original=base._import_megatron):
    seconds = _original(version)
    import ckptmap.hooks.megatron as hook   # what `import ckptmap.hooks.megatron` in a training script does

    if not hook.installed():
        raise RuntimeError(f"ckptmap.hooks.megatron did not install on megatron-core {version}")
    from .. import training, worker

    run, build, save_legacy = worker._run, worker._build, training.save_legacy

    @functools.wraps(run)
    def _run(rank, world_size, port, job, tmp_dir):
        # --save of this job (None for loads: the hook then warns once and writes nothing at construction)
        hook.configure(save_dir=job.get("hook_save_dir"), load_check=job.get("load_check", "exact"))
        return run(rank, world_size, port, job, tmp_dir)

    @functools.wraps(build)
    def _build(version, c):
        built = build(version, c)
        _state["ddps"] = built[2]
        return built

    @functools.wraps(save_legacy)
    def _save_legacy(version, save_dir, iteration, *args, **kwargs):
        # what the hook's save_checkpoint wrapper does in Megatron-LM, before Megatron writes iter_*
        hook.save_param_maps(_state["ddps"], Path(save_dir) / f"iter_{iteration:07d}" / "param_map")
        return save_legacy(version, save_dir, iteration, *args, **kwargs)

    worker._run, worker._build, training.save_legacy = _run, _build, _save_legacy
    return seconds


if __name__ == "__main__":
    base._import_megatron = _import_megatron
    sys.exit(base.main())
