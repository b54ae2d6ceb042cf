"""ckptmap.formats.torch_zip against real torch (torch.load / torch.save) and the Megatron fixtures."""

import argparse
import collections
import enum
import importlib
import io
import math
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptmap.errors import CkptmapError
from ckptmap.formats import safe_unpickler, torch_zip_reader, torch_zip_writer
from ckptmap.formats.safe_unpickler import StandIn, StandInClass
from ckptmap.formats.torch_zip_reader import TensorRef, TorchZipFile, load, read_objects
from ckptmap.formats.torch_zip_writer import save

FIXTURES = Path("/work/shared/fixtures/megatron-r0.6.0")
FILES = sorted(FIXTURES.glob("*/iter_0000001/mp_rank_*/*.pt"))
MODEL_FILES = [f for f in FILES if f.name == "model_optim_rng.pt"]
SMALL = FIXTURES / "legacy_tp1pp1dp1/iter_0000001/mp_rank_00/model_optim_rng.pt"
REPO = Path(__file__).resolve().parents[1]


def fid(p: Path) -> str:
    return f"{p.parts[-4]}/{p.parts[-2]}/{p.stem}"


def test_fixtures_present():
    assert len(FILES) == 20 and len(MODEL_FILES) == 10


# -------------------------------------------------------------------------------------------------
# helpers


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(ours, ref, where="root"):
    """``ours`` (from ckptmap) equals ``ref`` (from torch.load) in structure, order, types and bytes;
    Enum members must have become stand-ins remembering the member's value."""
    if isinstance(ref, torch.Tensor):
        assert type(ours) is type(ref), where
        assert ours.device.type == "cpu", where
        assert (ours.dtype, ours.shape, ours.stride(), ours.storage_offset(), ours.requires_grad) == \
            (ref.dtype, ref.shape, ref.stride(), ref.storage_offset(), ref.requires_grad), where
        assert ours.untyped_storage().nbytes() == ref.untyped_storage().nbytes(), where
        assert raw(ours) == raw(ref), where
    elif isinstance(ref, enum.Enum):
        assert isinstance(ours, StandIn), where
        assert (ours.module, ours.qualname, ours.kind, ours.args) == \
            (type(ref).__module__, type(ref).__qualname__, "reduce", (ref.value,)), where
    elif isinstance(ref, dict):
        assert type(ours) is type(ref), where
        assert list(ours) == list(ref), where
        for k in ref:
            assert_same(ours[k], ref[k], f"{where}/{k}")
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref) and len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ref, (argparse.Namespace, types.SimpleNamespace)):
        assert type(ours) is type(ref), where
        assert list(vars(ours)) == list(vars(ref)), where
        for k in vars(ref):
            assert_same(getattr(ours, k), getattr(ref, k), f"{where}.{k}")
    elif isinstance(ref, np.ndarray):
        assert type(ours) is np.ndarray and ours.dtype == ref.dtype and ours.shape == ref.shape, where
        assert ours.tobytes() == ref.tobytes(), where
    elif isinstance(ref, io.BytesIO):
        assert type(ours) is io.BytesIO and ours.getvalue() == ref.getvalue() and ours.tell() == ref.tell(), where
    elif isinstance(ref, float) and math.isnan(ref):
        assert type(ours) is float and math.isnan(ours), where
    else:
        assert type(ours) is type(ref) and ours == ref, (where, ours, ref)


def leaves(obj, path="", out=None, kind=torch.Tensor):
    """(path, leaf) for every leaf of type ``kind`` in dicts / lists / tuples, in order."""
    out = [] if out is None else out
    if isinstance(obj, kind):
        out.append((path, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            leaves(v, f"{path}/{k}", out, kind)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            leaves(v, f"{path}/{i}", out, kind)
    return out


def storage_groups(pairs, key):
    groups = collections.defaultdict(set)
    for path, t in pairs:
        groups[key(t)].add(path)
    return sorted(sorted(g) for g in groups.values())


def torch_load(p):
    return torch.load(p, weights_only=False, map_location="cpu")


def globals_of(pkl: bytes) -> list[str]:
    """Every GLOBAL / STACK_GLOBAL reference of a pickle, in order."""
    out, strings = [], []
    for op, arg, _ in pickletools.genops(pkl):
        if op.name == "GLOBAL":
            out.append(arg)
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            out.append(f"{strings[-2]} {strings[-1]}")
    return out


def data_pkl(path) -> bytes:
    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        return z.read(name)


def make_zip(path, pkl: bytes, records=None, prefix="archive/", compress=None, byteorder=b"little"):
    """A torch-style zip: ``<prefix>data.pkl``, byteorder, data/<key> records (stored unless listed in
    ``compress``)."""
    records = dict(records or {})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(prefix + "data.pkl", pkl)
        if byteorder is not None:
            z.writestr(prefix + "byteorder", byteorder)
        for k, v in records.items():
            z.writestr(prefix + k, v, zipfile.ZIP_DEFLATED if compress and k in compress else zipfile.ZIP_STORED)
        z.writestr(prefix + "version", b"3\n")
    return path


def rezip(src, dst, *, replace=None, compress=None):
    """Copy a torch zip record by record, replacing some record bodies and/or compressing some."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            body = zi.read(info.filename)
            short = info.filename.split("/", 1)[1]
            if replace and short in replace:
                body = replace[short]
            zo.writestr(info.filename, body,
                        zipfile.ZIP_DEFLATED if compress and short in compress else zipfile.ZIP_STORED)
    return dst


def assert_error(fn, path, *needles):
    with pytest.raises(CkptmapError) as e:
        fn(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


# -------------------------------------------------------------------------------------------------
# Real Megatron fixtures


@pytest.mark.parametrize("path", FILES, ids=fid)
def test_load_equals_torch_load(path):
    ours, ref = load(path), torch_load(path)
    assert_same(ours, ref)
    # storages are shared exactly as in the file (all model tensors of a chunk: one storage)
    key = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert storage_groups(leaves(ours), key) == storage_groups(leaves(ref), key)


@pytest.mark.parametrize("path", FILES, ids=fid)
def test_refs_describe_the_tensors(path):
    ref_root = torch_load(path)
    with TorchZipFile(path) as zf:
        refs = leaves(zf.root, kind=TensorRef)
        tensors = dict(leaves(ref_root))
        assert [p for p, _ in refs] == list(tensors)
        for p, r in refs:
            t = tensors[p]
            assert r.dtype == {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.uint8: "uint8",
                               torch.int64: "int64"}[t.dtype]
            assert (r.shape, r.stride, r.storage_offset, r.requires_grad, r.location) == \
                (tuple(t.shape), t.stride(), t.storage_offset(), t.requires_grad, "cpu")
            assert r.storage_numel * t.element_size() == t.untyped_storage().nbytes() == zf.storage_nbytes(r.storage)
            assert r.nbytes == t.numel() * t.element_size()
            view = zf.tensor(r)
            assert raw(view) == raw(t) and view.stride() == t.stride()
        # TensorRefs name storages the way the file shares them
        key_groups = storage_groups(refs, lambda r: r.storage)
        assert key_groups == storage_groups(tensors.items(), lambda t: t.untyped_storage().data_ptr())
        assert sorted({r.storage for _, r in refs}, key=int) == zf.storage_keys()


@pytest.mark.parametrize("path", MODEL_FILES, ids=fid)
def test_model_chunk_is_one_storage(path):
    root = read_objects(path)
    chunks = [k for k in root if k == "model" or k.startswith("model")]
    assert chunks
    keys = set()
    for c in chunks:
        refs = [r for _, r in leaves(root[c], kind=TensorRef)]
        assert refs and len({r.storage for r in refs}) == 1 and refs[0].dtype == "bfloat16"
        keys.add(refs[0].storage)
    assert len(keys) == len(chunks)  # one storage per chunk, not shared between chunks
    args = root["args"]
    assert type(args) is argparse.Namespace
    mt = args.model_type
    assert isinstance(mt, StandIn) and isinstance(type(mt), StandInClass)
    assert (mt.module, mt.qualname, mt.kind, mt.args) == ("megatron.core.enums", "ModelType", "reduce", (1,))
    assert repr(mt) == "<stand-in megatron.core.enums.ModelType(1)>"
    assert hash(mt) == hash(StandInClass.make("megatron.core.enums", "ModelType")(1))
    assert mt == StandInClass.make("megatron.core.enums", "ModelType")(1)
    assert mt != StandInClass.make("megatron.core.enums", "ModelType")(2)


@pytest.mark.parametrize("path", FILES, ids=fid)
def test_resave_is_byte_identical(path, tmp_path):
    """save(load(f)) under the same file name reproduces Megatron's file byte for byte: same GLOBALs
    (ModelType written back as megatron.core.enums ModelType), same storage sharing, same memo."""
    out = tmp_path / path.name
    save(load(path), out)
    assert out.read_bytes() == path.read_bytes()


def test_loader_never_imports_megatron():
    code = textwrap.dedent(f"""
        import sys
        attempts = []
        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('megatron', 'transformer_engine', 'apex'):
                    attempts.append(name)
                return None
        sys.meta_path.insert(0, Spy())
        from ckptmap.formats.torch_zip_reader import load, read_objects, TorchZipFile
        for p in {[str(p) for p in FILES]!r}:
            obj = load(p)
            root = read_objects(p)
            if p.endswith('model_optim_rng.pt'):
                print(repr(obj['args'].model_type))
        bad = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformer_engine', 'apex')]
        assert not bad and not attempts, (bad, attempts)
        print('OK')
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "OK"
    assert "<stand-in megatron.core.enums.ModelType(1)>" in r.stdout


# -------------------------------------------------------------------------------------------------
# Synthetic files: tensors, views, parameters, plain values


def test_views_parameters_and_plain_values(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, generator=g).bfloat16()
    obj = collections.OrderedDict(
        full=base, slice=base[3:9], mat=base.view(4, 6).t(), scalar=torch.tensor(2.5, dtype=torch.float64),
        empty=torch.zeros(0, 3), bools=torch.rand(5, generator=g) > 0.5, i8=torch.arange(-3, 3, dtype=torch.int8),
        param=torch.nn.Parameter(torch.ones(2, 2)), frozen=torch.nn.Parameter(torch.ones(3), requires_grad=False),
        ns=argparse.Namespace(a=1, params_dtype=torch.bfloat16, t=(1, 2.0, "x")), empty_ns=argparse.Namespace(),
        sn=types.SimpleNamespace(k=[1, 2]), extra=io.BytesIO(b"te extra state"),
        np_arr=np.arange(6, dtype=np.uint32).reshape(2, 3), np_scalar=np.float64(1.5),
        np_obj=np.array([1, "a"], dtype=object),
        values=[{1, 2}, frozenset({3}), b"", b"\x00\xffbytes", bytearray(b"ba"), complex(1, 2), slice(1, 5, 2),
                range(3), None, True, 1e-8, float("nan"), 2 ** 70, "é"],
        dtypes={(torch.bfloat16, torch.float32): [torch.Size([2, 3]), torch.device("cuda", 0)]},
    )
    src = tmp_path / "a" / "ckpt.pt"
    src.parent.mkdir()
    torch.save(obj, src)
    ours, ref = load(src), torch_load(src)
    assert_same(ours, ref)
    assert type(ours["param"]) is torch.nn.Parameter and ours["param"].requires_grad
    key = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert storage_groups(leaves(ours), key) == storage_groups(leaves(ref), key)
    with TorchZipFile(src) as zf:
        r = zf.root
        assert r["full"].storage == r["slice"].storage == r["mat"].storage
        assert r["slice"].storage_offset == 3 and r["mat"].stride == (1, 6)
        assert r["param"].requires_grad and not r["frozen"].requires_grad
        assert raw(zf.tensor(r["mat"])) == raw(base.view(4, 6).t())
    out = tmp_path / "b" / "ckpt.pt"
    out.parent.mkdir()
    save(ours, out)
    assert out.read_bytes() == src.read_bytes()


def test_cuda_tensors_load_on_cpu(tmp_path, monkeypatch):
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:1")
    src = tmp_path / "gpu.pt"
    torch.save({"w": t}, src)
    monkeypatch.undo()
    assert b"cuda:1" in data_pkl(src)
    ref = read_objects(src)["w"]
    assert ref.location == "cuda:1"
    loaded = load(src)["w"]
    assert loaded.device.type == "cpu" and torch.equal(loaded, t)


def test_loaded_tensors_outlive_the_file_object(tmp_path):
    zf = TorchZipFile(SMALL)
    r = zf.root["model"]["language_model"]["output_layer"]["weight"]
    t = zf.tensor(r)
    expect = raw(t)
    zf.close()
    del zf
    import gc
    gc.collect()
    assert raw(t) == expect  # the mapping stays alive with the tensor
    t.add_(1)  # copy-on-write: the file is never written
    assert raw(torch_load(SMALL)["model"]["language_model"]["output_layer"]["weight"]) == expect


def test_tensor_refs_are_validated(tmp_path):
    with TorchZipFile(SMALL) as zf:
        r = zf.root["model"]["language_model"]["output_layer"]["weight"]
        bad = [
            TensorRef(r.storage, r.dtype, r.storage_numel - r.numel + 1, r.shape, r.stride, r.storage_numel),
            TensorRef(r.storage, r.dtype, 0, (10 ** 9,), (1,), r.storage_numel),
            TensorRef(r.storage, r.dtype, 0, r.shape, r.stride, r.storage_numel * 2),
            TensorRef("99", r.dtype, 0, (1,), (1,), 1),
            TensorRef(r.storage, r.dtype, -1, (1,), (1,), 10),
        ]
        for b in bad:
            with pytest.raises(CkptmapError, match=str(SMALL)):
                zf.tensor(b)
        with pytest.raises(CkptmapError):
            zf.storage_nbytes("99")
    with pytest.raises(CkptmapError, match="closed"):
        zf.tensor(r)


def test_save_refuses_tensor_refs(tmp_path):
    ref = read_objects(SMALL)["model"]["language_model"]["output_layer"]["weight"]
    out = tmp_path / "x.pt"
    with pytest.raises(CkptmapError, match="TensorRef"):
        save({"w": ref}, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------------
# Classes from modules that are not importable: stand-ins, and written back unchanged


FAKE_ENUMS = '''
import enum


class Kind(enum.Enum):
    ENCODER = 1
    DECODER = 2


class Plain:
    def __init__(self, x, items):
        self.x = x
        self.items = items

    def __eq__(self, other):
        return type(other) is type(self) and vars(other) == vars(self)


class Outer:
    class Inner:
        def __init__(self):
            self.v = 3

        def __eq__(self, other):
            return type(other) is type(self) and vars(other) == vars(self)


class MyDict(dict):
    pass


class MyList(list):
    pass
'''


@pytest.fixture
def fake_module(tmp_path):
    """A package fake_megatron_xyz importable only while ``importable(True)``."""
    root = tmp_path / "pkgroot"
    (root / "fake_megatron_xyz").mkdir(parents=True)
    (root / "fake_megatron_xyz" / "__init__.py").write_text("")
    (root / "fake_megatron_xyz" / "enums.py").write_text(FAKE_ENUMS)

    def importable(on: bool):
        for m in [m for m in sys.modules if m.split(".")[0] == "fake_megatron_xyz"]:
            del sys.modules[m]
        if on and str(root) not in sys.path:
            sys.path.insert(0, str(root))
        if not on and str(root) in sys.path:
            sys.path.remove(str(root))
        importlib.invalidate_caches()

    importable(True)
    yield importable
    importable(False)


def test_unimportable_classes_round_trip(tmp_path, fake_module):
    mod = importlib.import_module("fake_megatron_xyz.enums")
    d = mod.MyDict(a=1)
    d.extra = "attr"
    obj = {"kind": mod.Kind.DECODER, "kinds": [mod.Kind.ENCODER, mod.Kind.DECODER],
           "plain": mod.Plain(5, [1, 2]), "inner": mod.Outer.Inner(), "cls": mod.Plain,
           "mydict": d, "mylist": mod.MyList([7, 8]), "w": torch.ones(3)}
    src = tmp_path / "orig" / "ckpt.pt"
    src.parent.mkdir()
    torch.save(obj, src)
    fake_module(False)
    with pytest.raises(ImportError):
        importlib.import_module("fake_megatron_xyz.enums")

    got = load(src)
    kind = got["kind"]
    assert isinstance(kind, StandIn) and type(kind) is StandInClass.make("fake_megatron_xyz.enums", "Kind")
    assert (kind.kind, kind.args, kind.built) == ("reduce", (2,), False)
    assert repr(kind) == "<stand-in fake_megatron_xyz.enums.Kind(2)>"
    assert got["kinds"][1] is kind  # pickle memo identity kept
    assert {kind, got["kinds"][0]} == {StandInClass.make("fake_megatron_xyz.enums", "Kind")(1), kind}
    plain = got["plain"]
    assert (plain.kind, plain.args, plain.state) == ("newobj", (), {"x": 5, "items": [1, 2]})
    assert "fake_megatron_xyz.enums.Plain" in repr(plain) and "'x': 5" in repr(plain)
    assert got["inner"].qualname == "Outer.Inner" and got["inner"].state == {"v": 3}
    assert got["cls"] is StandInClass.make("fake_megatron_xyz.enums", "Plain")
    assert got["mydict"].dictitems == [("a", 1)] and got["mydict"].state == {"extra": "attr"}
    assert got["mylist"].listitems == [7, 8]
    assert torch.equal(got["w"], torch.ones(3))
    assert read_objects(src)["plain"] == plain
    assert "fake_megatron_xyz" not in sys.modules

    out = tmp_path / "resaved" / "ckpt.pt"
    out.parent.mkdir()
    save(got, out)
    globs = globals_of(data_pkl(out))
    for g in ["fake_megatron_xyz.enums Kind", "fake_megatron_xyz.enums Plain", "fake_megatron_xyz.enums Outer",
              "__builtin__ getattr", "fake_megatron_xyz.enums MyDict", "fake_megatron_xyz.enums MyList"]:
        assert g in globs
    assert globs == globals_of(data_pkl(src))
    assert data_pkl(out) == data_pkl(src)  # same reconstruction, opcode for opcode

    fake_module(True)
    mod = importlib.import_module("fake_megatron_xyz.enums")
    back = torch.load(out, weights_only=False)
    assert back["kind"] is mod.Kind.DECODER and back["kinds"] == [mod.Kind.ENCODER, mod.Kind.DECODER]
    assert back["plain"] == mod.Plain(5, [1, 2]) and back["inner"] == mod.Outer.Inner()
    assert back["cls"] is mod.Plain
    assert type(back["mydict"]) is mod.MyDict and back["mydict"] == {"a": 1} and back["mydict"].extra == "attr"
    assert type(back["mylist"]) is mod.MyList and back["mylist"] == [7, 8]
    assert torch.equal(back["w"], torch.ones(3))


# -------------------------------------------------------------------------------------------------
# Malicious pickles: refused before anything runs


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > marker",))


def g(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text):
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def call(module, name, *args):
    return b"\x80\x02" + g(module, name) + b"(" + b"".join(s(a) for a in args) + b"tR."


SHELL = "echo pwned > marker"
DENIED = [
    ("builtins", "eval", "__import__('os').system('echo pwned > marker')"),
    ("__builtin__", "eval", "__import__('os').system('echo pwned > marker')"),
    ("builtins", "exec", "import os; os.system('echo pwned > marker')"),
    ("builtins", "__import__", "os"),
    ("builtins", "open", "marker"),
    ("builtins", "compile", "1"),
    ("builtins", "type", "X"),
    ("os", "system", SHELL),
    ("posix", "system", SHELL),
    ("nt", "system", SHELL),
    ("os.path", "exists", "marker"),
    ("subprocess", "Popen", SHELL),
    ("subprocess", "check_output", SHELL),
    ("sys", "exit", "1"),
    ("importlib", "import_module", "os"),
    ("runpy", "run_path", "marker"),
    ("shutil", "rmtree", "marker"),
    ("pickle", "loads", "x"),
    ("marshal", "loads", "x"),
    ("types", "FunctionType", "x"),
    ("code", "InteractiveInterpreter", "x"),
    ("ctypes", "CDLL", "libc.so.6"),
    ("socket", "socket", "x"),
    ("pty", "spawn", "sh"),
    ("webbrowser", "open", "x"),
    ("functools", "partial", "x"),
    ("operator", "attrgetter", "system"),
    ("operator", "methodcaller", "system"),
    ("torch", "load", "marker"),
    ("torch.serialization", "load", "marker"),
    ("torch._utils", "_rebuild_wrapper_subclass", "x"),
    ("torch.nn.modules.linear", "Linear", "x"),
    ("numpy", "load", "marker"),
    ("numpy.testing._private.utils", "runstring", SHELL),
    ("copyreg", "add_extension", "x"),
    ("_codecs", "decode", "x"),
]


@pytest.mark.parametrize("module,name,arg", DENIED, ids=[f"{m}.{n}" for m, n, _ in DENIED])
def test_denied_globals(tmp_path, monkeypatch, module, name, arg):
    monkeypatch.chdir(tmp_path)
    p = make_zip(tmp_path / "evil.pt", call(module, name, arg))
    for fn in (load, read_objects, TorchZipFile):
        assert_error(fn, p, "refusing to load", "never runs code")
    assert not (tmp_path / "marker").exists()


def test_os_system_reduce_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    torch.save({"x": Evil(), "w": torch.ones(2)}, p)
    assert f"{os.system.__module__} system" in globals_of(data_pkl(p))  # the payload is really there
    msg = assert_error(load, p, "refusing to load", f"{os.system.__module__}.system")
    assert "trusted" in msg
    assert not (tmp_path / "marker").exists()


def test_stack_global_and_getattr_tricks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # protocol 4 STACK_GLOBAL spelling of builtins.eval
    pkl = (b"\x80\x04" + s("builtins") + s("eval") + b"\x93" + b"("
           + s("__import__('os').system('echo pwned > marker')") + b"tR.")
    assert_error(load, make_zip(tmp_path / "a.pt", pkl), "builtins.eval")
    # getattr(OrderedDict, '__init__'): getattr is only honoured for nested stand-in classes
    pkl = b"\x80\x02" + g("builtins", "getattr") + b"(" + g("collections", "OrderedDict") + s("__init__") + b"tR."
    assert_error(load, make_zip(tmp_path / "b.pt", pkl), "builtins.getattr")
    # a dotted name cannot walk attributes of an allow-listed object: it is only an inert stand-in
    pkl = b"\x80\x04" + s("collections") + s("OrderedDict.__init__.__globals__") + b"\x93."
    got = load(make_zip(tmp_path / "c.pt", pkl))
    assert isinstance(got, StandInClass) and got.qualname == "OrderedDict.__init__.__globals__"
    # calling a stand-in never runs anything
    pkl = call("megatron.training", "run_training", SHELL)
    got = load(make_zip(tmp_path / "d.pt", pkl))
    assert isinstance(got, StandIn) and got.args == (SHELL,)
    # _codecs.encode only as encode(str, 'latin1')
    assert_error(load, make_zip(tmp_path / "e.pt", call("_codecs", "encode", "x", "rot13")), "malformed")
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("pkl", [
    b"", b"garbage", b"\x80\x02}q\x00(X", b"\x80\x02(\x85.", b"\x80\x02Q.",
    b"\x80\x02(X\x07\x00\x00\x00storageq\x00ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ.",
    b"\x80\x02(X\x07\x00\x00\x00storagectorch\nfloat32\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ.",
], ids=["empty", "garbage", "eof", "bad-tuple", "persid-empty-stack", "storage-missing", "storage-type"])
def test_malformed_pickles(tmp_path, pkl):
    p = make_zip(tmp_path / "bad.pt", pkl)
    assert_error(load, p)
    assert_error(read_objects, p)


def test_bare_storage_is_refused(tmp_path):
    p = tmp_path / "s.pt"
    torch.save({"s": torch.zeros(2).untyped_storage()}, p)
    assert_error(load, p, "bare torch storage")


# -------------------------------------------------------------------------------------------------
# Broken or foreign files


def test_missing_and_foreign_files(tmp_path):
    assert_error(load, tmp_path / "nope.pt", "does not exist")
    assert_error(load, tmp_path, "directory")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_error(load, tmp_path / "empty.pt", "empty")
    (tmp_path / "text.pt").write_text("hello, this is not a checkpoint\n" * 10)
    assert_error(load, tmp_path / "text.pt", "not a torch checkpoint")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    assert_error(TorchZipFile, tmp_path / "other.zip", "data.pkl")


def test_legacy_format(tmp_path):
    p = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False)
    assert_error(load, p, "pre-1.6", "torch.save")


def test_big_endian_and_compressed(tmp_path):
    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, src)
    assert_error(load, rezip(src, tmp_path / "big.pt", replace={"byteorder": b"big"}), "endian")
    assert_error(load, rezip(src, tmp_path / "deflated.pt", compress={"data/0"}), "compressed")
    # a stored copy without alignment padding still loads
    assert torch.equal(load(rezip(src, tmp_path / "plain.pt"))["w"], torch.arange(1000, dtype=torch.float32))


def _central_dir_offset(data: bytes) -> int:
    (cd_offset,) = struct.unpack_from("<L", data, data.rindex(b"PK\x05\x06") + 16)
    return cd_offset


def test_truncated_copies(tmp_path):
    data = SMALL.read_bytes()
    with zipfile.ZipFile(SMALL) as z:
        rec0 = z.getinfo("model_optim_rng/data/0").header_offset
    cd = _central_dir_offset(data)
    cuts = [1, 10, 100, 4096, len(data) // 2, rec0 + 1000, cd - 5, cd + 10, cd + 200, len(data) - 10, len(data) - 1]
    for n in cuts:
        p = tmp_path / f"cut_{n}.pt"
        p.write_bytes(data[:n])
        for fn in (load, read_objects, TorchZipFile):
            assert_error(fn, p)


def test_record_running_past_eof(tmp_path):
    data = bytearray(SMALL.read_bytes())
    name = b"model_optim_rng/data/0"
    pos = _central_dir_offset(bytes(data))
    while True:  # find data/0's central directory entry and inflate its sizes
        assert data[pos:pos + 4] == b"PK\x01\x02"
        nlen, elen, clen = struct.unpack_from("<3H", data, pos + 28)
        if data[pos + 46: pos + 46 + nlen] == name:
            struct.pack_into("<2L", data, pos + 20, len(data), len(data))
            break
        pos += 46 + nlen + elen + clen
    p = tmp_path / "inflated.pt"
    p.write_bytes(bytes(data))
    assert_error(load, p, "data/0", "past the end")


# -------------------------------------------------------------------------------------------------
# Laziness: a 2 GiB storage (a sparse file) is never read


class _Storage0:
    pass


class _HugeTensor:
    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (_STORAGE0, 0, (self.n,), (1,), False, collections.OrderedDict()))


_STORAGE0 = _Storage0()


def _write_sparse_torch_zip(path, pkl: bytes, key: str, nbytes: int):
    """A stored zip with <prefix>/data.pkl and a data record that is a hole in a sparse file."""
    prefix = path.stem + "/"
    entries = []
    with open(path, "wb") as f:
        for name, body, size in ((prefix + "data.pkl", pkl, len(pkl)), (prefix + "data/" + key, None, nbytes)):
            off = f.tell()
            crc = zipfile.crc32(body) if body is not None else 0
            f.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, size, size, len(name), 0))
            f.write(name.encode())
            if body is not None:
                f.write(body)
            else:
                f.seek(size, os.SEEK_CUR)
            entries.append((name, off, crc, size))
        cd = f.tell()
        for name, off, crc, size in entries:
            f.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc, size, size, len(name),
                                0, 0, 0, 0, 0, off))
            f.write(name.encode())
        end = f.tell()
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), end - cd, cd, 0))


def test_tensor_bytes_are_not_read(tmp_path):
    import resource
    import time

    n = 2 ** 29  # 2 GiB of float32
    buf = io.BytesIO()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cuda:0", n) if obj is _STORAGE0 else None

    P(buf, protocol=2).dump({"huge": _HugeTensor(n), "tail": _HugeTensor(n)})
    p = tmp_path / "huge.pt"
    _write_sparse_torch_zip(p, buf.getvalue(), "0", 4 * n)
    assert p.stat().st_size > 4 * n
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with TorchZipFile(p) as zf:
        r = zf.root["huge"]
        assert r == TensorRef("0", "float32", 0, (n,), (1,), n, False, "cuda:0")
        assert zf.storage_nbytes("0") == 4 * n and r.nbytes == 4 * n
        t = zf.tensor(r)
        assert t.shape == (n,) and t[-3:].tolist() == [0.0, 0.0, 0.0]
    obj = load(p)
    assert obj["huge"].untyped_storage().data_ptr() == obj["tail"].untyped_storage().data_ptr()
    assert obj["tail"][n // 2].item() == 0.0
    elapsed = time.perf_counter() - t0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert elapsed < 2 and grown_mib < 256, (elapsed, grown_mib)


def test_zip_directory_fast_path_matches_zipfile(tmp_path):
    """The zip directory read straight from the mapping (thousands of rank files) gives exactly what
    zipfile gives for torch.save's archives and Python zipfile's; anything unusual (a comment, data
    before the archive) is left to zipfile, which still reads it."""
    import mmap

    from ckptmap.formats import torch_zip_reader as tzr

    def both(path):
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        fast = tzr._central_directory(mm, os.path.getsize(path))
        slow = [(zi.filename, zi.flag_bits, zi.compress_type, zi.compress_size, zi.file_size, zi.header_offset,
                 zi.CRC) for zi in zipfile.ZipFile(path).infolist()]
        return fast, slow

    saved = tmp_path / "model.pt"
    torch.save({"a": torch.arange(10, dtype=torch.bfloat16), "b": [torch.ones(3)]}, saved)
    fast, slow = both(saved)
    assert fast == slow and len(fast) > 3
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("archive/data.pkl", b"x" * 10)
        z.writestr("archive/data/0", b"y" * 100)
    fast, slow = both(plain)
    assert fast == slow
    with zipfile.ZipFile(plain, "a") as z:
        z.comment = b"a comment"
    assert both(plain)[0] is None
    prepended = tmp_path / "prepended.pt"
    prepended.write_bytes(b"\0" * 100 + saved.read_bytes())
    assert both(prepended)[0] is None
    assert sorted(tzr.TorchZipFile(prepended).root) == ["a", "b"]   # zipfile reads it


def _count_parses(monkeypatch):
    parses = []
    real = torch_zip_reader._central_directory

    def counted(mm, size):
        parses.append(size)
        return real(mm, size)
    monkeypatch.setattr(torch_zip_reader, "_central_directory", counted)
    return parses


def test_an_unchanged_file_is_not_parsed_again(tmp_path, monkeypatch):
    """A file opened again, unchanged, reuses its zip directory (and, among files of one structure, its
    object tree); the second open reads the same tensors as torch.load."""
    path = tmp_path / "a.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "step": 3}, path)
    parses = _count_parses(monkeypatch)
    with torch_zip_reader.shared_trees({}):
        first = TorchZipFile(path)
        second = TorchZipFile(path)
        assert len(parses) == 1 and second.root is first.root
        assert np.array_equal(second.array(second.root["w"]), torch.load(path)["w"].numpy())


@pytest.mark.parametrize("same_stat", [False, True])
def test_a_rewritten_file_is_read_afresh(tmp_path, monkeypatch, same_stat):
    """A file written again since it was read (a new inode, or in place) is parsed again and its new
    tensors are read — also when its stat looks the same (rewritten within one tick of the file
    system's clock: here the identity is made equal), because its directory's bytes differ."""
    path = tmp_path / "a.pt"
    torch.save({"w": torch.zeros(4)}, path)
    if same_stat:
        monkeypatch.setattr(torch_zip_reader, "_identity", lambda st: "the same")
    with torch_zip_reader.shared_trees({}):
        TorchZipFile(path)
        (tmp_path / "other").mkdir()
        torch.save({"v": torch.ones(4)}, tmp_path / "other" / "a.pt")   # another pickle, same size
        data = (tmp_path / "other" / "a.pt").read_bytes()
        assert len(data) == path.stat().st_size   # the same layout and size; values, CRCs, serialization id differ
        with open(path, "r+b") as f:              # in place: the same inode
            f.write(data)
        again = TorchZipFile(path)
        # its remembered directory is not reused (the records are those of the file's bytes now: laid
        # out alike, they may come from the last directory parsed of that shape, with their own CRC-32s)
        assert not again._archive.reopened
        assert {n: r.crc32 for n, r in again._archive.records.items()} == \
            {i.filename: i.CRC for i in zipfile.ZipFile(path).infolist()}
        assert list(again.root) == ["v"]
        assert np.array_equal(again.array(again.root["v"]), np.ones(4, dtype=np.float32))


def _stage_files(tmp_path, names) -> list:
    """Rank-like files of one layout (same sizes, other data), each in a folder of its own."""
    paths = []
    for i, name in enumerate(names):
        (tmp_path / f"r{i}").mkdir()
        paths.append(tmp_path / f"r{i}" / name)
        gen = torch.Generator().manual_seed(i)
        torch.save({"w": torch.randn(16, generator=gen), "b": torch.randn(3, generator=gen)}, paths[-1])
    assert len({p.stat().st_size for p in paths}) == 1
    return paths


def _zipfile_records(path) -> dict:
    """{name: (local header offset, size, CRC-32, bytes)} as zipfile reads them."""
    with zipfile.ZipFile(path) as z:
        return {i.filename: (i.header_offset, i.file_size, i.CRC, z.read(i)) for i in z.infolist()}


def test_directories_laid_out_alike_are_taken_from_the_last_parsed_with_their_own_crcs(tmp_path, monkeypatch):
    """Files of one layout (a stage's ranks) parse their zip directory once; the others' records — CRC-32s
    included, and the bytes they point at — equal zipfile's. A file whose directory differs in a name
    (same size, same end records) or whose local header differs is parsed itself."""
    torch_zip_reader._SHAPES.clear()
    paths = _stage_files(tmp_path, ["model_optim_rng.pt"] * 3 + ["model_optim_rnh.pt"])
    bad = tmp_path / "r1" / "copy" / "model_optim_rng.pt"
    bad.parent.mkdir()
    data = bytearray(paths[1].read_bytes())
    data[_zipfile_records(paths[1])["model_optim_rng/data/0"][0] + 3] ^= 1   # a local header's signature
    bad.write_bytes(bytes(data))
    parsed = _count_parses(monkeypatch)
    for p in paths:
        archive = torch_zip_reader._Archive(p)
        got = {n: (r.size, r.crc32, bytes(archive.mm[r.offset:r.offset + r.size])) for n, r in archive.records.items()}
        assert got == {n: w[1:] for n, w in _zipfile_records(p).items()}, p
        assert archive.prefix == p.stem + "/"
        if p == paths[2]:   # the last parsed is the first file's shape: the damaged copy is compared with it
            assert len(parsed) == 1
            with pytest.raises(CkptmapError, match="no local file header"):   # parsed, so the damage is seen
                torch_zip_reader._Archive(bad)
            assert len(parsed) == 2
    assert len(parsed) == 3   # the first file, the damaged one, and the one whose record names differ
