"""torch_zip_writer.save_streaming: torch.save's exact bytes with storages streamed from a fill() callback."""

import argparse
import collections
import pickletools
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import attrs
import pytest
import torch
from conftest import FIXTURE_NAMES, FIXTURE_ROOT, fixture_dir

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import safe_unpickler, torch_zip_reader, torch_zip_writer
from ckptmap.formats.safe_unpickler import StandInClass
from ckptmap.formats.torch_zip_reader import TensorRef, TorchZipFile, load
from ckptmap.formats.torch_zip_writer import save, save_streaming

REPO = Path(__file__).resolve().parents[1]
FILES = sorted(FIXTURE_ROOT.glob("*/iter_0000001/mp_rank_*/*.pt"))


def fid(p: Path) -> str:
    return f"{p.parts[-4]}/{p.parts[-2]}/{p.stem}"


def test_fixtures_present():
    for name in FIXTURE_NAMES:
        fixture_dir(name)
    assert len(FILES) == 20 and {p.name for p in FILES} == {"model_optim_rng.pt", "distrib_optim.pt"}


def mmap_fill(zf: TorchZipFile, calls: list, chunk=4096):
    """fill() reading each storage record from the source file's mmap, ``chunk`` bytes at a time."""
    def fill(key):
        calls.append(key)
        rec = zf._archive.record("data/" + key)
        mm = zf._archive.mm
        end = rec.offset + rec.size
        for i in range(rec.offset, end, chunk):
            yield mm[i: min(i + chunk, end)]
    return fill


def data_pkl(path) -> bytes:
    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        return z.read(name)


# -------------------------------------------------------------------------------------------------
# The core proof: every real Megatron file, rebuilt from TensorRefs + streamed storage bytes


@pytest.mark.parametrize("path", FILES, ids=fid)
def test_fixture_files_stream_byte_identical(path, tmp_path):
    with TorchZipFile(path) as zf:
        calls = []
        out = tmp_path / path.name
        save_streaming(zf.root, out, mmap_fill(zf, calls))
        assert calls == zf.storage_keys()  # once per storage, in record order
    assert out.read_bytes() == path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left


def test_a_small_whole_record_keeps_the_crc_its_source_recorded(tmp_path):
    """A small record copied from another file as a whole (read into the write buffer, not copied by the
    kernel) keeps the CRC-32 its source recorded: a record damaged after saving fails zipfile's check in the
    copy too, instead of getting a fresh CRC that vouches for the damage."""
    src = tmp_path / "a" / "x.pt"
    src.parent.mkdir()
    torch.save({"m": torch.randn(4096, generator=torch.Generator().manual_seed(5))}, src)   # 16 KiB
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if i.file_size == 4096 * 4)
    data = bytearray(src.read_bytes())
    name_len, extra_len = struct.unpack_from("<2H", data, info.header_offset + 26)   # its local header
    data[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF
    src.write_bytes(bytes(data))
    assert zipfile.ZipFile(src).testzip() == info.filename
    out = tmp_path / "b" / "x.pt"
    out.parent.mkdir()
    with TorchZipFile(src) as zf:
        ref = zf.root["m"]
        save_streaming(zf.root, out, lambda key: [torch_zip_reader.file_range(zf, ref)])
    assert zipfile.ZipFile(out).testzip() == info.filename


# -------------------------------------------------------------------------------------------------
# Synthetic objects: TensorRefs + fill vs torch.save of the materialised tensors


def storage_bytes(name: str, dtype: str, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)) + numel)
    dt = dtypes.to_torch(dtype)
    if dt == torch.bool:
        return torch.rand(numel, generator=g) > 0.5
    if dt.is_floating_point:
        return torch.randn(numel, generator=g).to(dt)
    return torch.randint(-100 if dt != torch.uint8 else 0, 100, (numel,), generator=g, dtype=dt)


class Real:
    """Materialises tensor specs as real CPU tensors (views of shared base tensors)."""

    def __init__(self):
        self.bases = {}

    def __call__(self, storage, dtype, numel, offset=0, shape=None, stride=None, requires_grad=False,
                 location="cpu"):
        base = self.bases.get(storage)
        if base is None:
            base = self.bases[storage] = storage_bytes(storage, dtype, numel)
        assert base.dtype == dtypes.to_torch(dtype) and base.numel() == numel
        shape = (numel,) if shape is None else shape
        stride = (1,) if stride is None else stride
        t = base.as_strided(shape, stride, offset)
        if requires_grad:
            t = t.detach().requires_grad_(True)
        return t


class Refs:
    """The same specs as TensorRefs, with a fill() serving the bases' bytes in odd-sized chunks."""

    def __init__(self, chunk=7):
        self.bases = {}
        self.calls = []
        self.chunk = chunk

    def __call__(self, storage, dtype, numel, offset=0, shape=None, stride=None, requires_grad=False,
                 location="cpu"):
        self.bases.setdefault(storage, storage_bytes(storage, dtype, numel))
        shape = (numel,) if shape is None else shape
        stride = (1,) if stride is None else stride
        return TensorRef(storage, dtype, offset, shape, stride, numel, requires_grad, location)

    def fill(self, key):
        self.calls.append(key)
        data = self.bases[key].view(torch.uint8).numpy().tobytes() if self.bases[key].numel() else b""
        for i in range(0, len(data), self.chunk):
            yield data[i: i + self.chunk]
        yield b""  # empty chunks are allowed


def rich_graph(T, stand_ins=False, storage_string=True):
    """Views with offsets and strides into shared storages, several dtypes, 0-d, empty storages,
    nested containers, Namespace, strings that torch's persistent ids memo-share."""
    shared = dict(storage="w", dtype="bfloat16", numel=48)
    obj = collections.OrderedDict()
    obj["device"] = "cpu"  # the same (interned) object as torch's location tag
    if storage_string:
        # str(0) is a cached one-character string, like torch's first storage key; 'storage' is the
        # interned literal torch's persistent ids start with (a loaded graph cannot keep that identity)
        obj["0"] = "storage"
    obj["model"] = collections.OrderedDict([
        ("a.weight", T(**shared, offset=0, shape=(4, 6), stride=(6, 1))),
        ("a.bias", T(**shared, offset=24, shape=(6,), stride=(1,))),
        ("t", T(**shared, offset=30, shape=(3, 3), stride=(1, 3))),  # transposed view
        ("strided", T(**shared, offset=1, shape=(5,), stride=(9,))),
        ("scalar", T("s", "float32", 1, 0, (), ())),
        ("scalar_in_big", T(**shared, offset=47, shape=(), stride=())),
        ("_extra_state", None),
    ])
    mask = T("m", "bool", 10)
    obj["optimizer"] = {
        "state": {0: {"step": T("st", "int64", 1, 0, (), ()), "exp_avg": T("e", "float32", 12, 2, (2, 5), (5, 1))},
                  1: {"mask": mask, "again": mask}},  # the same tensor object twice: memo
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0, 1]}],
    }
    obj["empty"] = [T("z1", "float32", 0, 0, (0,), (1,)), T("z2", "int64", 0, 0, (0, 3), (3, 1)),
                    T("z3", "bfloat16", 0)]
    obj["bytes"] = (T("u", "uint8", 17), T("u", "uint8", 17, 3, (2, 2), (4, 1)))
    obj["grad"] = T("g", "float32", 6, 0, (2, 3), (3, 1), requires_grad=True)
    obj["args"] = argparse.Namespace(params_dtype=torch.bfloat16, iteration=3, device="cpu", tp=1)
    obj["iteration"] = 3
    obj["rng_state"] = [{"random_rng_state": (3, (1, 2, 3), None), "cuda_rng_state": T("r", "uint8", 16)}]
    if stand_ins:
        obj["args"].model_type = StandInClass.make("megatron.core.enums", "ModelType")(1)
        obj["plain"] = StandInClass.make("megatron.core.optimizer", "Config").__new__(
            StandInClass.make("megatron.core.optimizer", "Config"))
        obj["plain"].__setstate__({"lr": 0.1, "w": T("w", "bfloat16", 48, 5, (2,), (1,))})
    return obj


def save_real(obj, path, pickle_module=None):
    if pickle_module is None:
        torch.save(obj, path)
    else:
        torch.save(obj, path, pickle_module=pickle_module)


def test_rich_graph_equals_torch_save(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_real(rich_graph(Real()), tmp_path / "a" / "ckpt.pt")  # real torch.save, C pickler
    refs = Refs()
    save_streaming(rich_graph(refs), tmp_path / "b" / "ckpt.pt", refs.fill)
    assert (tmp_path / "b" / "ckpt.pt").read_bytes() == (tmp_path / "a" / "ckpt.pt").read_bytes()
    # fill: once per storage, in first-encounter order; keys renumbered 0, 1, ... in that order
    assert refs.calls == ["w", "s", "st", "e", "m", "z1", "z2", "z3", "u", "g", "r"]
    with TorchZipFile(tmp_path / "b" / "ckpt.pt") as zf:
        assert zf.storage_keys() == [str(i) for i in range(11)]
        assert zf.root["model"]["a.weight"].storage == "0" and zf.root["grad"].storage == "9"
    # and torch reads it back to the same values
    back = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    real = rich_graph(Real())
    assert torch.equal(back["model"]["t"], real["model"]["t"])
    assert back["model"]["t"].untyped_storage().data_ptr() == back["model"]["a.weight"].untyped_storage().data_ptr()
    assert back["grad"].requires_grad and back["model"]["scalar"].shape == ()


def test_stand_ins_equal_save(tmp_path):
    """Stand-ins re-pickle as save() writes them (torch.save with ckptmap's pickler)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save(rich_graph(Real(), stand_ins=True), tmp_path / "a" / "model_optim_rng.pt")
    refs = Refs(chunk=4096)
    save_streaming(rich_graph(refs, stand_ins=True), tmp_path / "b" / "model_optim_rng.pt", refs.fill)
    assert (tmp_path / "b" / "model_optim_rng.pt").read_bytes() == (tmp_path / "a" / "model_optim_rng.pt").read_bytes()
    assert b"megatron.core.enums" in data_pkl(tmp_path / "b" / "model_optim_rng.pt")


def test_real_tensors_may_be_mixed_in(tmp_path):
    real = Real()
    expect = {"a": real("x", "float32", 8), "b": real("y", "int64", 3), "c": real("x", "float32", 8, 2, (3,), (2,))}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(expect, tmp_path / "a" / "m.pt")
    refs = Refs()
    mixed = {"a": refs("x", "float32", 8), "b": real.bases["y"], "c": refs("x", "float32", 8, 2, (3,), (2,))}
    save_streaming(mixed, tmp_path / "b" / "m.pt", refs.fill)
    assert (tmp_path / "b" / "m.pt").read_bytes() == (tmp_path / "a" / "m.pt").read_bytes()
    assert refs.calls == ["x"]


@pytest.mark.parametrize("n", [0, 1, 9, 10, 11, 12, 25, 60, 130, 300])
def test_storage_count_and_serialization_id(n, tmp_path):
    """The serialization id hashes the record names (their count decides the hash table's layout)
    and the CRCs; checked against torch.save for storage counts across rehash boundaries."""
    real, refs = Real(), Refs()
    spec = [(f"s{i}", ["float32", "bfloat16", "uint8"][i % 3], i % 5) for i in range(n)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save([real(*s) for s in spec], tmp_path / "a" / "x.pt")
    save_streaming([refs(*s) for s in spec], tmp_path / "b" / "x.pt", refs.fill)
    assert (tmp_path / "b" / "x.pt").read_bytes() == (tmp_path / "a" / "x.pt").read_bytes()


@pytest.mark.parametrize("name", ["x.pt", "noext", "a.b.c", "x.", "sp ace.pt", "..pt", "ab..pt", "é.pt", "a\\b.pt"])
def test_archive_prefix_from_file_name(name, tmp_path):
    real, refs = Real(), Refs()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save({"w": real("w", "float32", 3)}, tmp_path / "a" / name)
    save_streaming({"w": refs("w", "float32", 3)}, tmp_path / "b" / name, refs.fill)
    assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()


def test_name_without_stem_is_refused(tmp_path):
    refs = Refs()
    with pytest.raises(CkptmapError, match="no stem"):
        save_streaming({"w": refs("w", "float32", 3)}, tmp_path / ".hidden", refs.fill)
    assert list(tmp_path.iterdir()) == []


def test_torch_save_options_are_honoured(tmp_path):
    from torch.utils.serialization import config
    real, refs = Real(), Refs()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    crc, alignment = torch.serialization.get_crc32_options(), config.save.storage_alignment
    try:
        torch.serialization.set_crc32_options(False)
        config.save.storage_alignment = 256
        torch.save({"w": real("w", "float32", 30), "v": real("v", "uint8", 5)}, tmp_path / "a" / "o.pt")
        save_streaming({"w": refs("w", "float32", 30), "v": refs("v", "uint8", 5)}, tmp_path / "b" / "o.pt",
                       refs.fill)
    finally:
        torch.serialization.set_crc32_options(crc)
        config.save.storage_alignment = alignment
    assert (tmp_path / "b" / "o.pt").read_bytes() == (tmp_path / "a" / "o.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / "b" / "o.pt") as z:  # no CRCs: zipfile cannot check the records
        assert z.getinfo("o/data/0").CRC == 0
    with TorchZipFile(tmp_path / "b" / "o.pt") as zf:
        assert zf._archive.read_record(".storage_alignment") == b"256"
        assert zf._archive.record("data/0").offset % 256 == 0


def test_storage_types_match_torch():
    """ckptmap's own table (no torch) names the storage type torch pickles for every dtype, and every
    dtype global the unpickler maps to a ckptmap dtype is that torch dtype."""
    expect = torch.storage._dtype_to_storage_type_map()
    for name in dtypes.NAMES:
        assert safe_unpickler.STORAGE_TYPE_OF[name] == expect[dtypes.to_torch(name)], name
        assert safe_unpickler.STORAGE_TYPES[expect[dtypes.to_torch(name)]] == name
    for n in dir(torch):
        if isinstance(getattr(torch, n, None), torch.dtype) and n == str(getattr(torch, n)).rpartition(".")[2]:
            marker = safe_unpickler.ALLOWED_OBJECTS.get(("torch", n))
            assert marker is not None, f"torch.{n} has no marker"
            assert marker.dtype == (n if n in dtypes.TABLE else None)


# -------------------------------------------------------------------------------------------------
# Tensors saved from CUDA: torch tags each storage 'cuda:<i>', built anew for every tensor


def cuda_tag(storage):
    """What torch.serialization._backend_tag('cuda', ...) returns for a storage on cuda:0: a string
    built by concatenation on every call (so never memo-shared in the pickle)."""
    return "cuda" + ":" + str(0)


def test_cuda_location_equals_torch_save_from_cuda(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", cuda_tag)
        save_real(rich_graph(Real()), tmp_path / "a" / "gpu.pt")
    refs = Refs()
    location = "cuda:0"
    graph = rich_graph(lambda *a, **k: refs(*a, **{**k, "location": location}))
    save_streaming(graph, tmp_path / "b" / "gpu.pt", refs.fill)
    assert (tmp_path / "b" / "gpu.pt").read_bytes() == (tmp_path / "a" / "gpu.pt").read_bytes()
    pkl = data_pkl(tmp_path / "b" / "gpu.pt")
    ops = [op.name for op, arg, _ in pickletools.genops(pkl) if op.name == "BINPERSID" or arg == "cuda:0"]
    n_tensors = ops.count("BINPERSID")
    assert n_tensors == 16 and ops.count("BINUNICODE") == n_tensors  # 'cuda:0' written out for each tensor



def test_cuda_file_round_trips(tmp_path, monkeypatch):
    """A file saved from CUDA (each tensor's 'cuda:0' written out) round-trips through TensorRefs."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", cuda_tag)
        save_real(rich_graph(Real(), storage_string=False), tmp_path / "gpu.pt")
    (tmp_path / "b").mkdir()
    with TorchZipFile(tmp_path / "gpu.pt") as zf:
        assert zf.root["model"]["a.bias"].location == "cuda:0"
        save_streaming(zf.root, tmp_path / "b" / "gpu.pt", mmap_fill(zf, []))
    assert (tmp_path / "b" / "gpu.pt").read_bytes() == (tmp_path / "gpu.pt").read_bytes()


def test_loaded_synthetic_file_round_trips(tmp_path):
    save_real(rich_graph(Real(), storage_string=False), tmp_path / "x.pt")
    (tmp_path / "b").mkdir()
    with TorchZipFile(tmp_path / "x.pt") as zf:
        save_streaming(zf.root, tmp_path / "b" / "x.pt", mmap_fill(zf, [], chunk=5))
    assert (tmp_path / "b" / "x.pt").read_bytes() == (tmp_path / "x.pt").read_bytes()


@pytest.mark.parametrize("path", [p for p in FILES if p.parts[-4] == "legacy_tp1pp1dp1"], ids=fid)
def test_fixture_as_if_saved_from_cuda(path, tmp_path, monkeypatch):
    """Fixture-derived expectation: the Megatron file as torch.save would have written it with every
    storage on cuda:0 (save(load(fixture)) reproduces the fixture; with the CUDA location tagger it
    gives the CUDA variant) == save_streaming of the fixture's TensorRefs moved to 'cuda:0'."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", cuda_tag)
        save(load(path), tmp_path / "a" / path.name)
    expect = (tmp_path / "a" / path.name).read_bytes()
    assert expect != path.read_bytes() and b"cuda:0" in data_pkl(tmp_path / "a" / path.name)
    with TorchZipFile(path) as zf:
        def to_cuda(o):  # in place: the containers keep their identity (pickle memo)
            if isinstance(o, TensorRef):
                return attrs.evolve(o, location="cuda:0")
            if isinstance(o, dict):
                for k, v in o.items():
                    o[k] = to_cuda(v)
            elif isinstance(o, list):
                o[:] = [to_cuda(v) for v in o]
            else:
                assert not isinstance(o, tuple) or not any(isinstance(v, TensorRef) for v in o)
            return o
        save_streaming(to_cuda(zf.root), tmp_path / "b" / path.name, mmap_fill(zf, []))
    assert (tmp_path / "b" / path.name).read_bytes() == expect


# -------------------------------------------------------------------------------------------------
# Errors: nothing is left at the path


def small_graph():
    refs = Refs()
    return {"w": refs("w", "float32", 10), "v": refs("v", "int64", 4, 1, (2,), (1,))}, refs


@pytest.mark.parametrize("change", ["short", "long", "long_in_one_chunk", "empty"])
def test_wrong_storage_length(change, tmp_path):
    obj, refs = small_graph()

    def fill(key):
        data = b"".join(refs.fill(key))
        if key == "v":
            data = {"short": data[:-1], "long": data + b"\0", "long_in_one_chunk": data + b"\0",
                    "empty": b""}[change]
        if change == "long":
            yield from (data[i: i + 3] for i in range(0, len(data), 3))
        else:
            yield data

    out = tmp_path / "m.pt"
    with pytest.raises(CkptmapError) as e:
        save_streaming(obj, out, fill)
    msg = str(e.value)
    assert str(out) in msg and "'v'" in msg and "32 bytes" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_file(tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"old")
    obj, refs = small_graph()
    with pytest.raises(CkptmapError):
        save_streaming(obj, out, lambda key: [b"x"])
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    save_streaming(obj, out, refs.fill)
    assert torch.equal(torch.load(out)["v"], refs.bases["v"][1:3])


def test_fill_errors(tmp_path):
    obj, refs = small_graph()
    out = tmp_path / "m.pt"

    def failing(key):
        yield b"\0" * 8
        raise OSError(5, "Input/output error")

    cases = [(lambda key: None, "not an iterable"), (lambda key: [object()], "not a bytes-like"),
             (failing, "Input/output error")]
    for fill, needle in cases:
        with pytest.raises(CkptmapError, match=needle):
            save_streaming(obj, out, fill)
        assert list(tmp_path.iterdir()) == []
    # buffers of any element type are taken as bytes
    save_streaming(obj, out, lambda key: [refs.bases[key].numpy()])
    assert out.read_bytes() == _saved(obj, refs, tmp_path)


def _saved(obj, refs, tmp_path) -> bytes:
    (tmp_path / "ref").mkdir()
    save_streaming(obj, tmp_path / "ref" / "m.pt", refs.fill)
    return (tmp_path / "ref" / "m.pt").read_bytes()


def test_bad_tensor_refs(tmp_path):
    out = tmp_path / "m.pt"
    bad = [
        TensorRef("w", "float32", 5, (6,), (1,), 10),  # runs past the end
        TensorRef("w", "float32", 0, (3, 4), (4, 1), 10),
        TensorRef("w", "float32", -1, (1,), (1,), 10),
        TensorRef("w", "float32", 0, (2,), (1, 1), 10),
    ]
    for ref in bad:
        with pytest.raises(CkptmapError, match="does not fit its storage") as e:
            save_streaming({"w": ref}, out, lambda key: pytest.fail("fill must not be called"))
        assert str(out) in str(e.value)
    with pytest.raises(CkptmapError, match="disagree about storage 'w'"):
        save_streaming([TensorRef("w", "float32", 0, (1,), (1,), 10), TensorRef("w", "bfloat16", 0, (1,), (1,), 20)],
                       out, lambda key: [])
    with pytest.raises(CkptmapError, match="unknown dtype"):
        save_streaming([TensorRef("w", "float8", 0, (1,), (1,), 10)], out, lambda key: [])
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------------
# Memory: a 1.5 GiB storage streams through without being held in memory


def test_large_storage_streams_in_bounded_memory(tmp_path):
    out = tmp_path / "distrib_optim.pt"
    numel = 3 * (1 << 27)  # 1.5 GiB of float32
    code = textwrap.dedent(f"""
        import resource
        import numpy as np
        import psutil
        from ckptmap.formats.torch_zip_reader import TensorRef
        from ckptmap.formats.torch_zip_writer import save_streaming

        def peak_kib():  # VmHWM: the peak resident set size (resettable), else ru_maxrss
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        numel = {numel}
        step = (8 << 20) // 4  # 8 MiB chunks
        def fill(key):
            for start in range(0, numel, step):
                yield (np.arange(start, min(start + step, numel), dtype=np.int32) % 1000003).astype(np.float32)
        ref = TensorRef("0", "float32", 0, (numel,), (1,), numel)
        moment = TensorRef("0", "float32", 8, (16,), (1,), numel)
        obj = {{0: {{(None, "float32"): {{"param": [ref], "exp_avg": [moment]}}}}}}
        # warm up everything but the big write, then measure the peak during it
        save_streaming({{"x": TensorRef("s", "float32", 0, (4,), (1,), 4)}}, {str(tmp_path / "warm.pt")!r},
                       lambda key: [np.zeros(4, np.float32)])
        before = psutil.Process().memory_info().rss // 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak to the current resident size
        except OSError:
            pass  # then the peak so far counts as growth: stricter, never laxer
        save_streaming(obj, {str(out)!r}, fill)
        print((peak_kib() - before) // 1024)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    growth_mib = int(r.stdout.strip().splitlines()[-1])
    try:
        print(f"peak RSS growth while writing 1.5 GiB: {growth_mib} MiB")
        assert growth_mib < 100, f"peak RSS grew by {growth_mib} MiB"
        assert out.stat().st_size > numel * 4
        back = torch.load(out, mmap=True, weights_only=False)
        param = back[0][(None, "float32")]["param"][0]
        assert param.shape == (numel,) and param.dtype == torch.float32
        for i in [0, 1, 1000002, 1000003, 2_097_151, 2_097_152, numel // 2 + 12345, numel - 1]:
            assert param[i].item() == float(i % 1000003), i
        exp_avg = back[0][(None, "float32")]["exp_avg"][0]
        assert exp_avg.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
        assert exp_avg.tolist() == [float(i) for i in range(8, 24)]
        with zipfile.ZipFile(out) as z:  # CRC of the big record checked by zipfile, streamed
            with z.open("distrib_optim/data/0") as rec:
                while rec.read(64 << 20):
                    pass
        del back, param, exp_avg
    finally:
        out.unlink()
