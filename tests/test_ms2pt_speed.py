"""Issue 14, ms2pt's data path: the CRC-32 implementations ckptmap may pick, the copy of a file range
that computes its CRC on the way, the in-place fp32 -> bf16 chunks — each against an independent
reference (zlib, ``ops.f32_to_bf16``), and ms2pt's files under every CRC implementation against the
real Megatron-LM files, Python's ``zipfile`` CRC check and stock ``torch.load``."""

from __future__ import annotations

import filecmp
import zipfile
import zlib

import numpy as np
import pytest

from ckptmap.cli import main
from ckptmap.formats import byte_io
from ckptmap.formats.base import FileRange
from ckptmap.mapping.ops import f32_to_bf16
from conftest import fixture_dir


def _available(name: str) -> bool:
    try:
        return byte_io._IMPLEMENTATIONS[name]() is not None
    except ImportError:
        return False


IMPLEMENTATIONS = [pytest.param(name, marks=pytest.mark.skipif(not _available(name), reason=f"{name} not here"))
                   for name in byte_io._IMPLEMENTATIONS]


@pytest.fixture
def use_crc32(monkeypatch):
    """Make byte_io choose again, under CKPTMAP_CRC32 = the given name (undone after the test)."""
    def use(name):
        monkeypatch.setenv("CKPTMAP_CRC32", name)
        monkeypatch.setattr(byte_io, "_chosen", None)
        monkeypatch.setattr(byte_io, "crc32", byte_io._first_crc32)
        assert byte_io.crc32_implementation() == name
    return use


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_every_crc32_implementation_is_zlibs(name, use_crc32):
    use_crc32(name)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    cases = [data, data[:100], b"", memoryview(data)[7:], bytearray(data), memoryview(bytearray(data))[5:200_005],
             np.frombuffer(data, np.uint8),                                  # read-only array
             np.frombuffer(bytearray(data[:300_000]), np.float32).reshape(300, 250)]   # writable, 2-D, not bytes
    for case in cases:
        want = zlib.crc32(case if not isinstance(case, np.ndarray) else case.tobytes(), 0x9E3779B9)
        assert byte_io.crc32(case, 0x9E3779B9) == want
        assert byte_io.crc32(case) == zlib.crc32(case if not isinstance(case, np.ndarray) else case.tobytes())


def test_unknown_or_missing_crc32_implementation_is_an_error(monkeypatch):
    monkeypatch.setattr(byte_io, "_chosen", None)
    monkeypatch.setattr(byte_io, "crc32", byte_io._first_crc32)
    monkeypatch.setenv("CKPTMAP_CRC32", "crc32c")
    with pytest.raises(byte_io.CkptmapError, match="CKPTMAP_CRC32=crc32c: use one of zlib-ng, libdeflate, zlib"):
        byte_io.crc32(b"x")
    monkeypatch.setitem(byte_io._IMPLEMENTATIONS, "libdeflate", lambda: None)
    monkeypatch.setenv("CKPTMAP_CRC32", "libdeflate")
    with pytest.raises(byte_io.CkptmapError, match="not available here"):
        byte_io.crc32(b"x")


@pytest.mark.parametrize("chunk", [4096, 10_000, 256 * 1024])
def test_copy_range_crc_copies_and_checksums_odd_ranges(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(byte_io, "CRC_COPY_CHUNK", chunk)
    data = bytes((i * 7919) % 251 for i in range(300_001))
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    for offset, n in [(0, 300_001), (1, 4095), (4097, 123_457), (299_000, 1001), (5, 0)]:
        out = tmp_path / "out.bin"
        with open(out, "wb") as f:
            f.write(b"head")
            f.flush()
            crc = byte_io.copy_range_crc(FileRange(str(src), offset, n), f.fileno(), 7)
            f.write(b"tail")
        assert crc == zlib.crc32(data[offset:offset + n], 7)
        assert out.read_bytes() == b"head" + data[offset:offset + n] + b"tail"
    with open(tmp_path / "out.bin", "wb") as f, pytest.raises(OSError, match="ends before byte"):
        byte_io.copy_range_crc(FileRange(str(src), 300_000, 10), f.fileno())


def _special_floats() -> np.ndarray:
    bits = [0x00000000, 0x80000000,                     # +-0
            0x00000001, 0x807FFFFF, 0x00008000, 0x00018000,  # subnormals, ties
            0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # ties to even (down, up), below and above a tie
            0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,  # largest finite: rounds to inf / stays finite
            0x7F800000, 0xFF800000,                     # +-inf
            0x7F800001, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0xFF800001]   # NaNs, every sign/payload
    return np.array(bits, dtype=np.uint32).view(np.float32)


@pytest.mark.parametrize("chunk", [7, 1 << 17])
def test_bf16_chunks_equal_the_general_cast_bit_for_bit(tmp_path, monkeypatch, chunk):
    """execute's in-place fp32 -> bf16 chunks give ops.f32_to_bf16's bits and torch's: every rounding case, NaN in
    some chunks and not others, a last chunk shorter than the rest, a range at an odd file offset."""
    from ckptmap import execute

    monkeypatch.setattr(execute, "_BF16_CHUNK", chunk)
    rng = np.random.default_rng(2)
    values = np.concatenate([_special_floats(), rng.standard_normal(300_000, dtype=np.float32) * 0.02,
                             rng.integers(0, 1 << 32, 100_000, dtype=np.uint32).view(np.float32),   # any bits
                             _special_floats()[:-6]])   # ... and a tail without NaN
    path = tmp_path / "f32.bin"
    path.write_bytes(b"abc" + values.tobytes() + b"z")
    got = b"".join(bytes(c) for c in execute._cast_chunks(FileRange(str(path), 3, values.nbytes), "float32",
                                                          "bfloat16"))
    assert got == f32_to_bf16(values).tobytes()
    # independent truth for the rounding: torch's own bf16 cast (the chunks and ops share one formula); NaN bits
    # are a choice (torch's vectorised CPU cast gives 0xFFFF, its scalar c10 path and ckptmap 0x7FC0), not compared
    import torch
    mine = np.frombuffer(got, dtype=np.uint16)
    theirs = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(values)
    assert np.array_equal(mine[finite], theirs[finite])
    assert (mine[~finite] == 0x7FC0).all() and (~finite).sum() >= 12
    assert b"".join(bytes(c) for c in execute._cast_chunks(FileRange(str(path), 3, 0), "float32", "bfloat16")) == b""


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_ms2pt_files_under_every_crc32_are_megatrons(name, use_crc32, tmp_path):
    """ms2pt of a pt2ms conversion of real Megatron-LM files, with this CRC-32: the same bytes as the
    originals, every zip record's CRC right by Python's zipfile, and stock torch.load reads them."""
    use_crc32(name)
    a, b, c = fixture_dir("legacy_tp2pp2dp2"), tmp_path / "ms", tmp_path / "back"
    assert main(["pt2ms", "--megatron-path", str(a), "--ms-path", str(b), "--no-progress"]) == 0
    assert main(["ms2pt", "--ms-path", str(b), "--megatron-path", str(c), "--no-progress",
                 "--process-limit", "2"]) == 0
    pts = sorted(p.relative_to(a) for p in a.rglob("*.pt"))
    assert len(pts) == 8
    for rel in pts:
        back = c / rel
        assert filecmp.cmp(a / rel, back, shallow=False), rel
        with zipfile.ZipFile(back) as zf:
            assert zf.testzip() is None, rel   # reads every record and checks its CRC-32
            assert all(info.CRC != 0 for info in zf.infolist() if info.file_size), rel
    import torch

    for optim in sorted(c.rglob("distrib_optim.pt")):
        state = torch.load(optim, map_location="cpu", weights_only=False)
        assert state, optim
