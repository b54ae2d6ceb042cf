"""``python -m mcore_versions.dcp CKPT_ITER_DIR OUT.pt``: a torch_dist checkpoint as one flat torch
file (``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``). Run with the version's
target dir on ``PYTHONPATH`` (:func:`read_torch_dist`): the ``.metadata`` file pickles
megatron.core classes of the version that wrote it."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile


def read_torch_dist(version: str, iter_dir) -> dict:
    import torch

    from . import TESTS, target_dir

    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "flat.pt"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target_dir(version)), str(TESTS)]),
                   PYTHONWARNINGS="ignore")
        proc = subprocess.run([sys.executable, "-m", "mcore_versions.dcp", str(iter_dir), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"reading {iter_dir} failed:\n{proc.stdout.decode(errors='replace')[-5000:]}")
        from .pickles import load
        return load(out)[0]


if __name__ == "__main__":
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(sys.argv[1], sys.argv[2])
