"""Issue 14: the conversions that only move and convert bytes never import torch (nor MindSpore or
Megatron) — in the main process or in any worker — and their outputs stay byte-identical to the
independent truth (the real Megatron-LM fixture files for the way back)."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path


import pytest

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


def test_crc32_is_zlibs():
    """Whichever CRC-32 implementation byte_io picked (zlib-ng when installed), it is zlib's function."""
    import zlib

    from ckptmap.formats import byte_io

    data = bytes(range(256)) * 4099
    assert byte_io.crc32(data) == zlib.crc32(data)
    assert byte_io.crc32(data[1000:], byte_io.crc32(data[:1000])) == zlib.crc32(data)


@pytest.mark.parametrize("window", [4096, 10000, 64 << 20])
def test_copy_range_crc_and_copy_range_of_odd_ranges(tmp_path, monkeypatch, window):
    """The CRC of a file range copied through a reused buffer of ``window`` bytes (chunks not aligned to the
    range) and the kernel copy of the range: both against the bytes read plainly."""
    import zlib

    from ckptmap.formats import byte_io
    from ckptmap.formats.base import FileRange

    monkeypatch.setattr(byte_io, "CRC_COPY_CHUNK", window)
    data = bytes((i * 7919) % 251 for i in range(300_001))
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    for offset, n in [(0, 300_001), (1, 4095), (4097, 123_457), (299_000, 1001), (5, 0)]:
        rng = FileRange(str(src), offset, n)
        crc_copy = tmp_path / "crc.bin"
        with open(crc_copy, "wb") as f:
            assert byte_io.copy_range_crc(rng, f.fileno(), 7) == zlib.crc32(data[offset:offset + n], 7)
        assert crc_copy.read_bytes() == data[offset:offset + n]
        out = tmp_path / "out.bin"
        with open(out, "wb") as f:
            f.write(b"head")
            f.flush()
            byte_io.copy_range(rng, f.fileno())
            f.write(b"tail")
        assert out.read_bytes() == b"head" + data[offset:offset + n] + b"tail"



def test_source_fds_open_each_source_once_and_close_them(tmp_path, monkeypatch):
    """Inside byte_io.source_fds() (the executor's scope for one output file) the copies and reads of many
    ranges of one source open it once, give the same bytes as outside, and close it when the block ends."""
    import zlib

    from ckptmap.formats import byte_io
    from ckptmap.formats.base import FileRange

    data = bytes((i * 7919) % 251 for i in range(300_001))
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (opened.append(str(path)), real_open(path, *a, **k))[1])
    ranges = [(0, 1000), (10, 5), (299_000, 1001), (4097, 123_457)]
    out = tmp_path / "out.bin"
    with open(out, "wb") as f:
        with byte_io.source_fds():
            with byte_io.source_fds():   # nested: the outer block's descriptors
                for offset, n in ranges:
                    byte_io.copy_range(FileRange(str(src), offset, n), f.fileno())
            crc = byte_io.copy_range_crc(FileRange(str(src), 7, 300), f.fileno())
            read = b"".join(bytes(c) for c in byte_io.read_chunks(FileRange(str(src), 3, 70_000), 4096))
            fds = list(byte_io._open_sources.fds.values())
    assert opened == [str(src)] and len(fds) == 1
    with pytest.raises(OSError):
        os.fstat(fds[0])   # closed with the block
    assert out.read_bytes() == b"".join(data[o:o + n] for o, n in ranges) + data[7:307]
    assert crc == zlib.crc32(data[7:307]) and read == data[3:70_003]
    with open(tmp_path / "x.bin", "wb") as g:
        byte_io.copy_range(FileRange(str(src), 0, 10), g.fileno())
    assert opened.count(str(src)) == 2   # outside the block: opened per call again

START_UP = r"""
import sys
from ckptmap.cli import main
rc = main(sys.argv[1:])
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] == "lark" or m in (
    "ckptmap.mapping.torch_dist_legacy", "ckptmap.formats.torch_dist", "ckptmap.formats.megatron_dist",
    "ckptmap.mapping.reshard", "uuid"))), file=sys.stderr)
sys.exit(rc)
"""


def test_pt2ms_start_up_skips_what_a_legacy_source_does_not_need(tmp_path):
    """Start-up (issue 14): once the rules' parse is cached, a legacy pt2ms imports no lark, no torch_dist
    modules (no .metadata in sight) and no uuid (single machine)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("CKPTMAP_NO_CACHE", None)
    argv = ["pt2ms", "--megatron-path", fixture_dir("legacy_tp1pp1dp1"), "--ms-path", tmp_path / "out", "--dry-run"]
    seen = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", START_UP, *map(str, argv)], env=env, capture_output=True,
                              text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        seen.append(done.stderr.split())
    assert "lark" in seen[0]   # the first run parses (and fills the cache)
    assert seen[1] == []


def test_torch_dist_sources_are_still_recognised(tmp_path):
    from ckptmap.formats.megatron_folders import may_hold_torch_dist as _may_be_torch_dist

    it = tmp_path / "save" / "iter_0000005"
    it.mkdir(parents=True)
    assert not _may_be_torch_dist(tmp_path / "save") and not _may_be_torch_dist(it)
    assert not _may_be_torch_dist(tmp_path / "missing") and not _may_be_torch_dist(tmp_path / "save" / "x.txt")
    (it / ".metadata").write_bytes(b"")
    assert _may_be_torch_dist(it) and not _may_be_torch_dist(tmp_path / "save")   # no tracker: not one
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("5")
    assert _may_be_torch_dist(tmp_path / "save")
    from ckptmap.mapping.torch_dist_legacy import is_torch_dist_source
    for p in (tmp_path / "save", it, tmp_path / "missing"):   # never False where the real check says True
        assert _may_be_torch_dist(p) or not is_torch_dist_source(p)
