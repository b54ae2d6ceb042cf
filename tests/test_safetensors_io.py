"""ckptmap.formats.safetensors_io against the safetensors library and MindSpore 2.10."""

import filecmp
import json
import struct

import pytest
import numpy as np
import torch
from torch_views import read_tensor
from safetensors import safe_open
from safetensors.torch import save_file

import mindspore as ms

from ckptmap.errors import CkptmapError
from ckptmap.formats.safetensors_io import SafetensorsReader, SafetensorsWriter, load


def raw(t) -> bytes:
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t).tobytes()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample_tensors():
    g = torch.Generator().manual_seed(1)
    return {  # deliberately not in the library's layout order
        "z.bool": torch.rand(5, generator=g) > 0.5,
        "layers.0.weight": torch.randn(4, 3, generator=g).bfloat16(),
        "layers.10.weight": torch.randn(4, 3, generator=g),
        "layers.9.weight": torch.randn(2, 3, generator=g),
        "Upper": torch.randn(3, generator=g),
        "fp16": torch.randn(3, generator=g).half(),
        "fp64": torch.randn(2, generator=g).double(),
        "i64": torch.randint(-2**40, 2**40, (3,), generator=g),
        "i32": torch.randint(-100, 100, (3,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-100, 100, (3,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-100, 100, (3,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(2, 0),
        "transposed": torch.randn(3, 4, generator=g).t(),
        'odd "name"\n\t\x01 é 😀': torch.ones(1),
    }


def entries_of(tensors):
    return [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors.items()]


def write_ours(path, tensors, metadata=None):
    with SafetensorsWriter(path, entries_of(tensors), metadata, slice_bytes=123, crc=True) as w:
        for name, t in tensors.items():
            w.write(name, t)


@pytest.mark.parametrize("metadata", [None, {}, {"format": "ms"}, {"odd\u2028\"key": "é\n\x1f"}])
def test_bytes_identical_to_library(tmp_path, metadata):
    tensors = sample_tensors()
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    write_ours(ours, tensors, metadata)
    save_file({n: t.contiguous() for n, t in tensors.items()}, theirs, metadata)
    assert filecmp.cmp(ours, theirs, shallow=False)


def test_rewrite_reproduces_library_file(tmp_path):
    # With several metadata keys the library's key order is random per process (a Rust HashMap);
    # reading a file and writing it back with the metadata in file order reproduces it exactly.
    tensors = sample_tensors()
    theirs, ours = str(tmp_path / "theirs.safetensors"), str(tmp_path / "ours.safetensors")
    save_file({n: t.contiguous() for n, t in tensors.items()}, theirs,
              {"z": "1", "format": "ms", "a": "2", "remove_redundancy": "False"})
    with SafetensorsReader(theirs) as r:
        with SafetensorsWriter(ours, [(n, *r.spec(n)) for n in r.keys()], r.metadata()) as w:
            for name in r.keys():
                w.write(name, r.get(name))
    assert filecmp.cmp(ours, theirs, shallow=False)


def test_trailing_empty_tensor_keeps_size(tmp_path):
    tensors = {"a": torch.ones(2), "zz": torch.zeros(0, dtype=torch.bool)}  # the empty one is laid out last
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    write_ours(ours, tensors)
    save_file(tensors, theirs)
    assert filecmp.cmp(ours, theirs, shallow=False)


def test_mindspore_loads_our_file(tmp_path):
    tensors = {n: t for n, t in sample_tensors().items() if n != "empty"}
    path = str(tmp_path / "ours.safetensors")
    write_ours(path, tensors, {"format": "ms"})
    loaded = ms.load_checkpoint(path, format="safetensors")
    assert sorted(loaded) == sorted(tensors)
    for name, t in tensors.items():
        assert tuple(loaded[name].shape) == tuple(t.shape), name
        assert loaded[name].asnumpy().tobytes() == raw(t), name
    assert str(loaded["layers.0.weight"].dtype) == "BFloat16"
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "ms"}


@pytest.mark.parametrize("source", ["library", "mindspore"])
def test_reader_reads_foreign_files(tmp_path, source):
    tensors = sample_tensors()
    path = str(tmp_path / "theirs.safetensors")
    if source == "library":
        save_file({n: t.contiguous() for n, t in tensors.items()}, path, {"format": "ms"})
    else:
        del tensors["empty"]
        obj = {n: ms.Parameter(ms.Tensor(t.float().numpy()).astype(ms.bfloat16) if t.dtype == torch.bfloat16
                               else ms.Tensor(t.contiguous().numpy())) for n, t in tensors.items()}
        ms.save_checkpoint(obj, path, format="safetensors")
    with SafetensorsReader(path) as r:
        assert sorted(r.keys()) == sorted(tensors)
        assert r.metadata()["format"] == "ms"
        assert "scalar" in r and "nope" not in r
        for name, t in tensors.items():
            assert r.spec(name) == (str(t.dtype).removeprefix("torch."), tuple(t.shape))
            got = read_tensor(r, name)
            assert got.dtype == t.dtype and got.shape == t.shape and raw(got) == raw(t), name
        with pytest.raises(CkptmapError, match="nope"):
            r.get("nope")
    assert raw(load(path)["i64"]) == raw(tensors["i64"])


def write_raw(path, header: bytes, data: bytes, n=None):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header) if n is None else n) + header + data)


@pytest.mark.parametrize("case", ["short", "huge_n", "not_json", "not_object", "bad_dtype", "size_mismatch",
                                  "gap", "past_end", "trailing", "duplicate"])
def test_bad_header(tmp_path, case):
    path = str(tmp_path / "bad.safetensors")
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    data = bytes(8)
    if case == "short":
        open(path, "wb").write(b"\x01\x00")
    elif case == "huge_n":
        write_raw(path, json.dumps(ok).encode(), data, n=1 << 40)
    elif case == "not_json":
        write_raw(path, b"{not json}", data)
    elif case == "not_object":
        write_raw(path, b"[1, 2]  ", b"")
    elif case == "bad_dtype":
        write_raw(path, json.dumps({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}).encode(), data)
    elif case == "size_mismatch":
        write_raw(path, json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(), data)
    elif case == "gap":
        write_raw(path, json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode(),
                  bytes(12))
    elif case == "past_end":  # truncated data
        write_raw(path, json.dumps(ok).encode(), bytes(4))
    elif case == "trailing":
        write_raw(path, json.dumps(ok).encode(), bytes(12))
    elif case == "duplicate":
        write_raw(path, b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                        b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data)
    with pytest.raises(CkptmapError) as e:
        SafetensorsReader(path)
    assert path in str(e.value)


def test_writer_contract(tmp_path):
    tensors = {"a": torch.ones(2), "b": torch.zeros(3, dtype=torch.int8)}
    path = str(tmp_path / "w.safetensors")
    entries = entries_of(tensors)
    w = SafetensorsWriter(path, entries)
    with pytest.raises(CkptmapError, match="announced"):
        w.write("b", tensors["b"])  # out of announced order
    with pytest.raises(CkptmapError, match="announced"):
        w.write("a", torch.ones(2, dtype=torch.float64))
    w.write("a", tensors["a"])
    with pytest.raises(CkptmapError, match="1 of 2"):
        w.close()
    with pytest.raises(CkptmapError, match="unique"):
        SafetensorsWriter(path, entries + entries[:1])
    with pytest.raises(CkptmapError, match="str to str"):
        SafetensorsWriter(path, entries, {"format": 1})


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_range_and_chunk_writes_identical_to_library(tmp_path, monkeypatch, kernel_copy):
    """write_range (bytes copied from another file, by the kernel or through a buffer) and
    write_chunks (odd-sized pieces) give the library's own file."""
    from ckptmap.formats import byte_io
    from ckptmap.formats.base import FileRange

    monkeypatch.setattr(byte_io, "_KERNEL_COPY", kernel_copy)
    tensors = {n: t.contiguous() for n, t in sample_tensors().items()}
    blob, where = bytearray(b"junk!"), {}
    for name, t in tensors.items():
        where[name] = (len(blob), len(raw(t)))
        blob += raw(t)
    src = tmp_path / "source.bin"
    src.write_bytes(bytes(blob))
    theirs = str(tmp_path / "theirs.safetensors")
    save_file(tensors, theirs)
    for mode in ("range", "chunks"):
        ours = tmp_path / f"ours_{mode}.safetensors"
        with SafetensorsWriter(ours, entries_of(tensors)) as w:
            for (name, dtype, shape) in entries_of(tensors):
                offset, n = where[name]
                if mode == "range":
                    w.write_range(name, dtype, shape, FileRange(str(src), offset, n))
                else:
                    data = bytes(blob[offset:offset + n])
                    w.write_chunks(name, dtype, shape, (data[i:i + 5] for i in range(0, n, 5)))
        assert filecmp.cmp(ours, theirs, shallow=False), mode
