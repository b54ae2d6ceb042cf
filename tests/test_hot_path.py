"""Issue 14: the conversions that only move and convert bytes never import torch (nor MindSpore or
Megatron) — in the main process or in any worker — and their outputs stay byte-identical to the
independent truth (the real Megatron-LM fixture files for the way back)."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path


from conftest import fixture_dir

REPO = Path(__file__).resolve().parent.parent

# Records every import of a watched package, in this process and in forked workers (they inherit
# sys.meta_path), into the file $IMPORT_LOG; then runs the ckptmap command line.
RUNNER = r"""
import os, sys
WATCHED = ("torch", "mindspore", "megatron")
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in WATCHED:
            with open(os.environ["IMPORT_LOG"], "a") as f:
                f.write(f"{os.getpid()} {name}\n")
        return None
sys.meta_path.insert(0, Watch())
from ckptmap.cli import main
rc = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in WATCHED)
if loaded:
    with open(os.environ["IMPORT_LOG"], "a") as f:
        f.write(f"{os.getpid()} loaded {loaded}\n")
sys.exit(rc)
"""


def run_watched(tmp_path, *argv) -> str:
    log = tmp_path / "imports.log"
    env = dict(os.environ, IMPORT_LOG=str(log), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", RUNNER, *map(str, argv), "--no-progress", "--process-limit", "2"],
                          env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return log.read_text() if log.exists() else ""


def test_the_watch_sees_an_import(tmp_path):
    """The watch itself works: a command that needs torch (the demo builds tensors) is caught."""
    log = tmp_path / "imports.log"
    env = dict(os.environ, IMPORT_LOG=str(log), PYTHONPATH=str(REPO))
    code = RUNNER.replace("from ckptmap.cli import main", "import torch\nfrom ckptmap.cli import main")
    subprocess.run([sys.executable, "-c", code, "rules", "list"], env=env, capture_output=True, cwd=tmp_path)
    assert "torch" in log.read_text()


def test_pt2ms_and_ms2pt_never_import_torch(tmp_path):
    src = fixture_dir("legacy_tp2pp2dp2")
    ms, param_only, back = tmp_path / "ms", tmp_path / "ms_param", tmp_path / "back"
    assert run_watched(tmp_path, "pt2ms", "--megatron-path", src, "--ms-path", ms) == ""
    assert run_watched(tmp_path, "pt2ms", "--megatron-path", src, "--ms-path", param_only,
                       "--convert-param-only") == ""
    assert run_watched(tmp_path, "ms2pt", "--ms-path", ms, "--megatron-path", back) == ""
    # the way back is the real Megatron-LM files, byte for byte (fp32 state copied, bf16 weights rounded)
    pts = sorted(p.relative_to(src) for p in src.rglob("*.pt"))
    assert len(pts) == 8
    for rel in pts:
        assert filecmp.cmp(src / rel, back / rel, shallow=False), rel
