"""ckptmap.formats.mindspore_ckpt against the real MindSpore 2.10 (the independent truth)."""

import filecmp

import numpy as np
import pytest
import torch
from torch_views import read_tensor

import mindspore as ms
import mindspore.train.serialization as ms_serialization
from mindspore import Parameter, Tensor
from mindspore.train.checkpoint_pb2 import Checkpoint

from ckptmap.errors import CkptmapError
from ckptmap.formats.mindspore_ckpt import (DEFAULT_SLICE_BYTES, CkptReader, CkptWriter, crc_trailer,
                                           image_layout, load)

MS_DTYPE = {  # what MindSpore reports for each canonical dtype, written out independently of the module
    torch.float32: "Float32", torch.bfloat16: "BFloat16", torch.float16: "Float16", torch.float64: "Float64",
    torch.int64: "Int64", torch.int32: "Int32", torch.int16: "Int16", torch.int8: "Int8", torch.uint8: "UInt8",
    torch.bool: "Bool",
}


def raw(t) -> bytes:
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t).tobytes()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def to_ms(t: torch.Tensor) -> Parameter:
    if t.dtype == torch.bfloat16:  # bf16 -> f32 -> bf16 is exact
        return Parameter(Tensor(t.float().numpy()).astype(ms.bfloat16))
    return Parameter(Tensor(t.numpy()))


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    ts = {
        "fp32.matrix": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 3, generator=g).bfloat16(),
        "fp16": torch.randn(6, generator=g).half(),
        "fp64": torch.randn(2, 2, 2, generator=g).double(),
        "int64": torch.randint(-2**40, 2**40, (5,), generator=g),
        "int32": torch.randint(-2**31, 2**31 - 1, (2, 3), generator=g, dtype=torch.int32),
        "int16": torch.randint(-2**15, 2**15 - 1, (3,), generator=g, dtype=torch.int16),
        "int8": torch.randint(-128, 127, (4,), generator=g, dtype=torch.int8),
        "uint8": torch.randint(0, 255, (4,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(7, generator=g) > 0.5,
        "scalar.fp32": torch.tensor(3.25),
        "scalar.bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "scalar.int64": torch.tensor(1000, dtype=torch.int64),
        "scalar.bool": torch.tensor(True),
        "nan.inf": torch.tensor([float("nan"), float("inf"), -0.0]),
        "big": torch.randn(37, 11, generator=g),  # 1628 bytes: several slices under a small slice size
        "big.bf16": torch.randn(101, generator=g).bfloat16(),
        "transposed": torch.randn(4, 6, generator=g).t(),  # non-contiguous
    }
    return ts


def write_ours(path, tensors, strings=(), **kw):
    with CkptWriter(path, **kw) as w:
        for name, t in tensors.items():
            w.write(name, t)
        for name, s in strings:
            w.write_string(name, s)


def records(path):
    """(tag, dims, type, content length) of every record, parsed by MindSpore's own protobuf class."""
    data = open(path, "rb").read()
    if data[-17:-10] == b"crc_num":
        data = data[:-17]
    ckpt = Checkpoint()
    ckpt.ParseFromString(data)
    return [(v.tag, list(v.tensor.dims), v.tensor.tensor_type, len(v.tensor.tensor_content)) for v in ckpt.value]


def assert_ms_equal(loaded, tensors):
    for name, t in tensors.items():
        p = loaded[name]
        assert str(p.dtype) == MS_DTYPE[t.dtype], name
        assert tuple(p.shape) == tuple(t.shape), name
        assert p.asnumpy().tobytes() == raw(t), name


@pytest.mark.parametrize("slice_bytes", [64, 70, 1 << 20])
def test_our_file_loads_in_mindspore(tmp_path, slice_bytes):
    tensors = sample_tensors()
    path = str(tmp_path / "ours.ckpt")
    write_ours(path, tensors, [("text", "héllo, 世界 😀"), ("empty.text", "")], slice_bytes=slice_bytes)
    loaded = ms.load_checkpoint(path)
    assert list(loaded) == list(tensors) + ["text", "empty.text"]
    assert_ms_equal(loaded, tensors)
    assert loaded["text"] == "héllo, 世界 😀" and loaded["empty.text"] == ""

    recs = records(path)
    big = [r for r in recs if r[0] == "big"]
    step = slice_bytes // 4 * 4
    assert [r[3] for r in big] == [min(step, 1628 - s) for s in range(0, 1628, step)]
    assert all(r[1] == [37, 11] and r[2] == "Float32" for r in big)
    assert [r for r in recs if r[0] == "scalar.fp32"] == [("scalar.fp32", [], "Float32", 4)]
    assert [r for r in recs if r[0] == "text"][0][1:3] == ([0], "str")


def test_zero_element_tensor(tmp_path):
    # MindSpore's own writer silently drops zero-element tensors; ours writes one empty record,
    # which MindSpore's loader reads back with its shape.
    path = str(tmp_path / "empty.ckpt")
    write_ours(path, {"e": torch.zeros(2, 0), "x": torch.ones(1)})
    loaded = ms.load_checkpoint(path)
    assert tuple(loaded["e"].shape) == (2, 0) and str(loaded["e"].dtype) == "Float32"
    with CkptReader(path) as r:
        assert r.spec("e") == ("float32", (2, 0)) and r.array("e").shape == (2, 0)
    with pytest.raises(CkptmapError, match=r"shape \(0,\)"):
        write_ours(str(tmp_path / "e1.ckpt"), {"e": torch.zeros(0)})


def test_mindspore_file_read_by_us(tmp_path, monkeypatch):
    tensors = sample_tensors()
    monkeypatch.setattr(ms_serialization, "SLICE_SIZE", 1)  # KiB: makes MindSpore slice "big" cheaply
    path = str(tmp_path / "theirs.ckpt")
    obj = {name: to_ms(t.contiguous()) for name, t in tensors.items()}
    obj["text"] = "héllo 😀"
    ms.save_checkpoint(obj, path)
    assert [r[3] for r in records(path) if r[0] == "big"] == [1024, 604]

    with CkptReader(path) as r:
        assert r.keys() == list(tensors) + ["text"]
        assert "big" in r and "missing" not in r
        for name, t in tensors.items():
            assert r.spec(name) == (str(t.dtype).removeprefix("torch."), tuple(t.shape))
            got = read_tensor(r, name)
            assert got.dtype == t.dtype and got.shape == t.shape, name
            assert raw(got) == raw(t), name
        assert r.spec("text") == ("str", ()) and r.get("text") == "héllo 😀"
        # single-slice tensors are views of the mapping, not copies
        assert r.array("fp32.matrix").ctypes.data == r.array("fp32.matrix").ctypes.data
        with pytest.raises(CkptmapError, match="missing"):
            r.get("missing")
    again = load(path)  # views outlive the reader
    assert raw(again["big"]) == raw(tensors["big"])


@pytest.mark.parametrize("crc", [False, True])
def test_bytes_identical_to_mindspore(tmp_path, monkeypatch, crc):
    tensors = {k: t.contiguous() for k, t in sample_tensors().items()}
    ours, theirs = str(tmp_path / "ours.ckpt"), str(tmp_path / "theirs.ckpt")
    ms_obj = {name: to_ms(t) for name, t in tensors.items()}
    ms_obj["text"] = "héllo"

    assert ms_serialization.SLICE_SIZE * 1024 == DEFAULT_SLICE_BYTES  # MindSpore's SLICE_SIZE is in KiB
    write_ours(ours, tensors, [("text", "héllo")], crc=crc)  # default 512 MiB slices: one record each
    ms.save_checkpoint(ms_obj, theirs, crc_check=crc)
    assert filecmp.cmp(ours, theirs, shallow=False)

    monkeypatch.setattr(ms_serialization, "SLICE_SIZE", 1)  # both sides slice at 1 KiB
    write_ours(ours, tensors, [("text", "héllo")], crc=crc, slice_bytes=1024)
    ms.save_checkpoint(ms_obj, theirs, crc_check=crc)
    assert filecmp.cmp(ours, theirs, shallow=False)


@pytest.mark.parametrize("crc", [False, True])
def test_image_layout_filled_in_is_mindspores_file(tmp_path, crc):
    """image_layout: the file with every content left zero, and where each content goes; filled in (and
    given crc_trailer), it is what MindSpore's save_checkpoint writes for the same tensors."""
    import zlib

    tensors = {k: t.contiguous() for k, t in sample_tensors().items()}
    entries = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in tensors.items()]
    data, offsets = image_layout(entries)
    image = bytearray(data)
    for t, at in zip(tensors.values(), offsets):
        assert image[at:at + len(raw(t))] == bytes(len(raw(t)))
        image[at:at + len(raw(t))] = raw(t)
    if crc:
        image += crc_trailer(zlib.crc32(image))
    theirs = tmp_path / "theirs.ckpt"
    ms.save_checkpoint({name: to_ms(t) for name, t in tensors.items()}, str(theirs), crc_check=crc)
    assert bytes(image) == theirs.read_bytes()


def test_image_layout_leaves_the_writer_what_it_must_decide():
    """Strings, shape (0,), tensors of several records and repeated names: no image (the writer writes
    them, or refuses them with its own message)."""
    plain = ("a", "float32", (2, 3))
    assert image_layout([plain]) is not None
    assert image_layout([plain, ("s", "str", ())]) is None
    assert image_layout([plain, ("e", "float32", (0,))]) is None
    assert image_layout([plain], slice_bytes=16) is None    # 24 bytes: two records
    assert image_layout([plain, plain]) is None


def flip(path, offset):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_crc_ours_checked_by_mindspore(tmp_path):
    tensors = sample_tensors()
    path = str(tmp_path / "crc.ckpt")
    write_ours(path, tensors, crc=True, slice_bytes=256)
    data = open(path, "rb").read()
    assert data[-17:-10] == b"crc_num" and data[-10:-4] == bytes(6)
    assert_ms_equal(ms.load_checkpoint(path, crc_check=True), tensors)
    with CkptReader(path) as r:
        assert r.has_crc

    flip(path, 200)  # inside tensor content: framing intact, only the CRC can tell
    with pytest.raises(ValueError):
        ms.load_checkpoint(path, crc_check=True)
    with pytest.raises(CkptmapError, match="CRC-32 mismatch") as e:
        CkptReader(path)
    assert path in str(e.value)
    with CkptReader(path, verify_crc=False) as r:  # opt-out reads the (corrupt) data
        assert len(r.keys()) == len(tensors)


def test_crc_mindspore_verified_by_us(tmp_path):
    path = str(tmp_path / "theirs.ckpt")
    t = torch.randn(50)
    ms.save_checkpoint({"w": to_ms(t), "s": to_ms(torch.tensor(2, dtype=torch.int32))}, path, crc_check=True)
    with CkptReader(path) as r:
        assert r.has_crc and raw(r.get("w")) == raw(t)
    flip(path, 40)
    with pytest.raises(CkptmapError, match="CRC"):
        CkptReader(path)


def test_no_trailer_when_writer_fails(tmp_path):
    path = str(tmp_path / "fail.ckpt")
    with pytest.raises(RuntimeError):
        with CkptWriter(path, crc=True) as w:
            w.write("a", torch.ones(3))
            raise RuntimeError("boom")
    assert b"crc_num" not in open(path, "rb").read()


@pytest.mark.parametrize("cut", [1, 5, 30, 100, 600, -20, -3])
def test_truncated_file(tmp_path, cut):
    path = str(tmp_path / "trunc.ckpt")
    write_ours(path, {"a": torch.randn(100), "b": torch.randn(50)}, crc=True, slice_bytes=128)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(CkptmapError, match="byte offset") as e:
        CkptReader(path)
    assert path in str(e.value)


def test_unknown_tensor_type(tmp_path):
    path = str(tmp_path / "odd.ckpt")
    ms.save_checkpoint({"u": Parameter(Tensor(np.arange(3, dtype=np.uint16)))}, path)
    with pytest.raises(CkptmapError, match="UInt16"):
        CkptReader(path)


def test_writer_follows_announced_entries(tmp_path):
    entries = [("a", "float32", (2,)), ("s", "str", ()), ("b", "bfloat16", [3, 1])]
    path = str(tmp_path / "e.ckpt")
    with CkptWriter(path, entries, metadata={"ignored": "yes"}) as w:
        w.write("a", torch.ones(2))
        w.write_string("s", "x")
        w.write("b", torch.ones(3, 1, dtype=torch.bfloat16))
    assert list(ms.load_checkpoint(path)) == ["a", "s", "b"]

    bad = [("b", torch.ones(3, 1, dtype=torch.bfloat16)),  # wrong order
           ("a", torch.ones(2, dtype=torch.float64)),     # wrong dtype
           ("a", torch.ones(3))]                          # wrong shape
    for name, t in bad:
        w = CkptWriter(path, entries)
        with pytest.raises(CkptmapError, match="announced"):
            w.write(name, t)
        w._abort()
    w = CkptWriter(path, entries)
    w.write("a", torch.ones(2))
    with pytest.raises(CkptmapError, match="1 of 3"):
        w.close()
    with pytest.raises(CkptmapError, match="twice"):
        with CkptWriter(path) as w:
            w.write("a", torch.ones(1))
            w.write("a", torch.ones(1))


@pytest.mark.parametrize("crc", [False, True])
@pytest.mark.parametrize("kernel_copy", [True, False])
@pytest.mark.parametrize("small_run", [0, 1 << 16])
def test_range_and_chunk_writes_identical_to_mindspore(tmp_path, monkeypatch, crc, kernel_copy, small_run):
    """write_range (bytes copied from another file, by the kernel or through a buffer when it cannot;
    runs up to ``small_run`` bytes read into the write buffer instead; one run or two) and write_chunks
    (bytes streamed in odd-sized pieces) give MindSpore's own file, also when the content is cut into
    several records and with a CRC trailer."""
    from ckptmap.formats import byte_io
    from ckptmap.formats.base import FileRange

    monkeypatch.setattr(byte_io, "_KERNEL_COPY", kernel_copy)
    monkeypatch.setattr(byte_io, "SMALL_RUN", small_run)
    tensors = {k: t.contiguous() for k, t in sample_tensors().items()}
    # the source: every tensor's raw bytes at a known offset of one file, behind some junk
    blob, where = bytearray(b"junk" * 3), {}
    for name, t in tensors.items():
        where[name] = (len(blob), len(raw(t)))
        blob += raw(t)
    src = tmp_path / "source.bin"
    src.write_bytes(bytes(blob))
    ms_obj = {name: to_ms(t) for name, t in tensors.items()}
    monkeypatch.setattr(ms_serialization, "SLICE_SIZE", 1)  # MindSpore slices at 1 KiB: "big" spans records
    theirs = str(tmp_path / "theirs.ckpt")
    ms.save_checkpoint(ms_obj, theirs, crc_check=crc)
    for mode in ("range", "runs", "chunks"):
        ours = tmp_path / f"ours_{mode}.ckpt"
        with CkptWriter(ours, crc=crc, slice_bytes=1024) as w:
            for name, t in tensors.items():
                dtype, shape = str(t.dtype).removeprefix("torch."), tuple(t.shape)
                offset, n = where[name]
                if mode == "range":
                    w.write_range(name, dtype, shape, FileRange(str(src), offset, n))
                elif mode == "runs":   # cut at an odd byte: a record boundary falls inside a run
                    cut = n // 3 + 1 if n > 1 else n
                    w.write_range(name, dtype, shape, [FileRange(str(src), offset, cut),
                                                      FileRange(str(src), offset + cut, n - cut)])
                else:   # 7-byte pieces: record and element boundaries fall inside pieces
                    data = bytes(blob[offset:offset + n])
                    w.write_chunks(name, dtype, shape, (data[i:i + 7] for i in range(0, n, 7)))
        assert filecmp.cmp(ours, theirs, shallow=False), mode


def test_range_write_refuses_a_range_of_the_wrong_size(tmp_path):
    from ckptmap.formats.base import FileRange

    src = tmp_path / "source.bin"
    src.write_bytes(bytes(64))
    with pytest.raises(CkptmapError, match="needs 48 bytes"):
        with CkptWriter(tmp_path / "x.ckpt") as w:
            w.write_range("a", "float32", (3, 4), FileRange(str(src), 0, 64))
    with pytest.raises(CkptmapError, match="needs 48 bytes but its data ended after 40"):
        with CkptWriter(tmp_path / "y.ckpt") as w:
            w.write_chunks("a", "float32", (3, 4), [bytes(40)])


def test_files_laid_out_alike_are_read_from_the_last_scan(tmp_path, monkeypatch):
    """The ranks of a pipeline stage: .ckpt files of one size whose records differ only in their contents.
    A file is not parsed again when its bytes outside the contents are a scanned file's of its size, or
    differ from them only inside names (another stage's ``layers.2``), yet every name and value read is
    its own (MindSpore's load_checkpoint is the truth); a file of equal size whose types differ, or whose
    new names would name one tensor twice, is parsed (and refused if it must be); a damaged content byte
    still fails the CRC."""
    import ckptmap.formats.mindspore_ckpt as mc

    g = torch.Generator().manual_seed(1)

    def save(path, names, crc=False):
        ms.save_checkpoint({n: to_ms(torch.randn(4, 3, generator=g)) for n in names}, str(path), crc_check=crc)

    a, b, c = (tmp_path / f"{x}.ckpt" for x in "abc")
    save(a, ["layers.1.w", "layers.1.b"])
    save(b, ["layers.1.w", "layers.1.b"])
    save(c, ["layers.2.w", "layers.2.b"])   # the same size: names of the same length
    assert a.stat().st_size == b.stat().st_size == c.stat().st_size and a.read_bytes() != b.read_bytes()
    scans = []
    real = mc.CkptReader._scan
    monkeypatch.setattr(mc.CkptReader, "_scan", lambda self, size, names: scans.append(self.path) or real(self, size, names))
    mc._SHAPES.clear()
    for path in (a, b, c):
        want = ms.load_checkpoint(str(path))
        with CkptReader(path) as r:
            assert r.keys() == list(want)
            for name, value in want.items():
                assert r.spec(name) == ("float32", (4, 3))
                assert raw(r.array(name)) == raw(value.asnumpy()), (path, name)
    assert scans == [str(a)]   # c: a's records under its own names
    twice = tmp_path / "twice.ckpt"   # c with its second name made its first: one tensor in two records
    data = c.read_bytes()
    twice.write_bytes(data.replace(b"layers.2.b", b"layers.2.w"))
    with pytest.raises(CkptmapError, match="'layers.2.w'.*needs 48 content bytes, its records hold 96"):
        CkptReader(twice)
    assert scans[-1] == str(twice)
    at = data.index(b"Float32")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data[:at] + b"Float33" + data[at + 7:])
    with pytest.raises(CkptmapError, match="Float33"):
        CkptReader(bad)
    assert scans[-1] == str(bad)
    d, e = tmp_path / "d.ckpt", tmp_path / "e.ckpt"
    save(d, ["w", "b"], crc=True)
    save(e, ["w", "b"], crc=True)
    with CkptReader(d) as r:
        assert r.has_crc
    flip(str(e), 60)   # a content byte: the layout is d's, the CRC-32 is still checked
    with pytest.raises(CkptmapError, match="CRC-32 mismatch"):
        CkptReader(e)
    assert scans[-1] == str(d)


def test_files_of_one_layout_share_their_specs_and_differ_in_content_bytes(tmp_path):
    """specs() is spec() of every name, in file order, as MindSpore saved them; files of one layout share
    the dict, another layout gets its own; content_bytes is each tensor's bytes as MindSpore loads them."""
    import mindspore as ms
    from ckptmap.formats.mindspore_ckpt import CkptReader

    def save(path, scale, names=("w", "b", "step")):
        data = {names[0]: np.arange(6, dtype=np.float32).reshape(2, 3) * scale,
                names[1]: np.full((4,), scale, np.float16), names[2]: np.array(7 * scale, np.int64)}
        ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in data.items()], str(path))
        return data

    one, two, other = tmp_path / "one.ckpt", tmp_path / "two.ckpt", tmp_path / "other.ckpt"
    data = save(one, 1)
    save(two, 3)
    save(other, 1, names=("v", "b", "step"))
    with CkptReader(one) as r1:
        specs = r1.specs()   # before the others are read: theirs come from its layout
        r2, r3 = CkptReader(two), CkptReader(other)
        loaded = ms.load_checkpoint(str(one))
        assert specs is r1.specs() and list(specs) == list(loaded)
        for k, v in loaded.items():
            assert r1.specs()[k] == (str(data[k].dtype), tuple(v.shape)), k
        assert r2.specs() is r1.specs()
        assert r3.specs() is not r1.specs() and list(r3.specs()) == ["v", "b", "step"]
        for k, v in data.items():
            assert r1.content_bytes([k]) == ms.load_checkpoint(str(one))[k].asnumpy().tobytes(), k
        assert r1.content_bytes(["b", "step"]) == data["b"].tobytes() + data["step"].tobytes()
        assert r2.content_bytes(["b"]) != r1.content_bytes(["b"])
        r2.close()
        r3.close()
