"""The writer's C pickler (``torch_zip_writer._CPickler``: pickle.Pickler with ckptmap's globals
written through aliases) writes the bytes the pure-Python pickler writes, which are torch.save's:
every fixture's data.pkl and every pickle a real megatron-core save holds, re-pickled from what
ckptmap reads, is the original byte for byte; graphs the aliases cannot express fall back to the
pure-Python pickler; nothing is imported or faked in sys.modules."""

import argparse
import collections
import enum
import importlib
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ckptmap.cli import main
from ckptmap.errors import CkptmapError
from ckptmap.formats import torch_zip_writer as tzw
from ckptmap.formats.torch_zip_reader import TorchZipFile

HERE = Path(__file__).resolve().parent
MEGATRON_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "megatron-r0.6.0"
MSADAPTER_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "msadapter-r0.2.0"
MEGATRON_FILES = sorted(MEGATRON_FIXTURES.glob("*/iter_*/mp_rank_*/*.pt"))
MSADAPTER_FILES = sorted(MSADAPTER_FIXTURES.glob("**/*.pt")) + sorted((HERE / "fixtures" / "msadapter").glob("**/*.pt"))


def picklers(zf):
    if zf.dialect == "msadapter":
        return tzw._MSAdapterPicklerC, tzw._MSAdapterPickler
    return tzw._StreamPicklerC, tzw._StreamPickler


def repickle(cls, obj, path):
    """data.pkl of ``obj`` by pickler class ``cls``, or None when it asks for the pure-Python one."""
    buf = io.BytesIO()
    try:
        tzw._dump(cls(buf, path), obj, path)
    except tzw._NeedsPurePython:
        return None
    return buf.getvalue()


def check_file(path) -> bool:
    """Both picklers re-write ``path``'s data.pkl from ckptmap's reading of it; returns whether the C
    pickler took it."""
    zf = TorchZipFile(path)
    original = bytes(zf._archive.read_record("data.pkl"))
    fast, slow = picklers(zf)
    assert repickle(slow, zf.root, path) == original, path
    got = repickle(fast, zf.root, path)
    assert got is None or got == original, path
    return got is not None


def test_fixture_counts():
    assert len(MEGATRON_FILES) == 20 and len(MSADAPTER_FILES) >= 4


@pytest.mark.parametrize("path", MEGATRON_FILES, ids=lambda p: "/".join(p.parts[-4:]))
def test_megatron_fixtures_repickle_through_the_c_pickler(path):
    assert check_file(path), f"{path}: the C pickler should take a stock Megatron file"


@pytest.mark.parametrize("path", MSADAPTER_FILES, ids=lambda p: "/".join(p.parts[-4:]))
def test_msadapter_fixtures_repickle(path):
    """MindSpore dtype objects are NEWOBJ stand-ins: those files take the pure-Python pickler (the C
    pickler insists that NEWOBJ's class be the object's own); the bytes are the same either way, and
    a file the dialect cannot hold (the repository's bad-* fixtures) is refused alike."""
    zf = TorchZipFile(path)
    try:
        repickle(tzw._MSAdapterPickler, zf.root, path)
    except CkptmapError as e:
        with pytest.raises(CkptmapError) as got:   # what the writer does: C pickler, then the pure one
            tzw._pickled(tzw._MSAdapterPicklerC, tzw._MSAdapterPickler, zf.root, path)
        assert str(got.value) == str(e)
        return
    check_file(path)


def test_real_megatron_core_save_repickles(tmp_path):
    from mcore_harness import Case, run_case

    run_case(Case(dp=2, hidden=12, ffn=33, num_layers=2, overlap_grad_reduce=True, bucket_size=300, seed=7),
             tmp_path / "megatron")
    files = sorted((tmp_path / "megatron").glob("**/*.pt"))
    assert len(files) >= 2
    for f in files:
        assert check_file(f), f


FAKE = '''
import enum

class Kind(enum.Enum):
    ENCODER = 1
    DECODER = 2

class Plain:
    def __init__(self, x):
        self.x = x

class Outer:
    class Inner:
        pass
'''


@pytest.fixture
def fake_module(tmp_path):
    root = tmp_path / "pkgroot"
    (root / "fake_mcore_c").mkdir(parents=True)
    (root / "fake_mcore_c" / "__init__.py").write_text("")
    (root / "fake_mcore_c" / "enums.py").write_text(FAKE)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    yield importlib.import_module("fake_mcore_c.enums")
    if str(root) in sys.path:
        sys.path.remove(str(root))
    for m in [m for m in sys.modules if m.split(".")[0] == "fake_mcore_c"]:
        del sys.modules[m]


def unimport(module):
    for m in [m for m in sys.modules if m.split(".")[0] == module]:
        del sys.modules[m]
    sys.path[:] = [p for p in sys.path if not (Path(p) / module).exists()]
    importlib.invalidate_caches()


def test_c_pickler_writes_torch_saves_bytes(tmp_path, fake_module):
    """A graph with everything the aliases carry — stand-ins of Enum members shared in several places,
    torch dtypes as values and as tuple dict keys, storage types, tensors sharing a storage, a
    Parameter, OrderedDict, Namespace, builtins — goes through the C pickler and gives torch.save's
    data.pkl, opcode for opcode."""
    mod = fake_module
    base = torch.arange(12, dtype=torch.float32)
    ns = argparse.Namespace(model_type=mod.Kind.DECODER, params_dtype=torch.bfloat16, kinds=[mod.Kind.ENCODER],
                            again=mod.Kind.DECODER, s={1, 2}, b=b"\x00\xff", e=b"", f=1.5, big=1 << 70)
    obj = {"args": ns, "w": base[2:8].view(2, 3), "all": base, "p": torch.nn.Parameter(torch.ones(2)),
           "od": collections.OrderedDict(a=torch.zeros(1, dtype=torch.bfloat16)),
           "keys": {(torch.bfloat16, torch.float32): [torch.int64, torch.bfloat16]},
           "kind": mod.Kind.DECODER}
    src = tmp_path / "model_optim_rng.pt"
    torch.save(obj, src)
    unimport("fake_mcore_c")
    zf = TorchZipFile(src)
    original = bytes(zf._archive.read_record("data.pkl"))
    assert repickle(tzw._StreamPicklerC, zf.root, src) == original
    out = tmp_path / "out" / "model_optim_rng.pt"
    out.parent.mkdir()
    tzw.save_streaming(zf.root, out, lambda key: [zf.storage_bytes(key)])
    assert out.read_bytes() == src.read_bytes()


def test_graphs_the_aliases_cannot_express_fall_back(tmp_path, fake_module):
    """NEWOBJ of a stand-in, a nested stand-in class, a stand-in class as a value: the C pickler hands
    over, the file is still torch.save's."""
    mod = fake_module
    srcs = []
    for i, value in enumerate((mod.Plain(3), mod.Outer.Inner(), mod.Plain, enum.Enum)):
        srcs.append(tmp_path / f"src{i}" / "ckpt.pt")
        srcs[-1].parent.mkdir()
        torch.save({"v": value, "k": mod.Kind.ENCODER, "d": torch.bfloat16}, srcs[-1])
    unimport("fake_mcore_c")
    for src in srcs:
        zf = TorchZipFile(src)
        assert repickle(tzw._StreamPicklerC, zf.root, src) is None, src
        out = src.with_name("out.pt")
        tzw.save_streaming(zf.root, out, lambda key: [zf.storage_bytes(key)])
        assert bytes(TorchZipFile(out)._archive.read_record("data.pkl")) == bytes(zf._archive.read_record("data.pkl"))


def test_pt_meta_written_by_the_c_pickler_is_the_pure_picklers(tmp_path):
    """pt2ms of a fixture: every pt_meta file's data.pkl re-pickled by the pure-Python pickler from
    what ckptmap reads of it is the written file's."""
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(MEGATRON_FIXTURES / "legacy_tp2pp2dp2"), "--ms-path", str(out),
                 "--no-progress", "--multiprocess-off"]) == 0
    metas = sorted((out / "pt_meta").glob("*.pt"))
    assert len(metas) == 4
    for f in metas:
        assert check_file(f), f


def test_no_module_is_imported_or_faked(tmp_path):
    """Saving through the aliases imports neither torch nor the stand-ins' modules, puts nothing into
    sys.modules and renames only ckptmap's private alias names."""
    src = MEGATRON_FIXTURES / "legacy_tp1pp1dp1" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    code = textwrap.dedent(f"""
        import _compat_pickle, sys
        from ckptmap.formats import torch_zip_writer as tzw
        from ckptmap.formats.torch_zip_reader import TorchZipFile
        zf = TorchZipFile({str(src)!r})
        before_modules, before_map = set(sys.modules), dict(_compat_pickle.REVERSE_NAME_MAPPING)
        tzw.save_streaming(zf.root, {str(tmp_path / 'model_optim_rng.pt')!r}, lambda key: [zf.storage_bytes(key)])
        assert set(sys.modules) == before_modules, set(sys.modules) ^ before_modules
        assert "torch" not in sys.modules and not any(m.startswith("megatron") for m in sys.modules)
        added = {{k: v for k, v in _compat_pickle.REVERSE_NAME_MAPPING.items() if k not in before_map}}
        assert added and all(k[0].startswith("ckptmap.formats.") and k[1].startswith("_ckptmap_alias_")
                             for k in added), added
        assert all(_compat_pickle.REVERSE_NAME_MAPPING[k] == v for k, v in before_map.items())
        print(sorted(added.values()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE.parent)
    assert r.returncode == 0, r.stderr
    assert "('megatron.core.enums', 'ModelType')" in r.stdout and "('torch._utils', '_rebuild_tensor_v2')" in r.stdout
    assert (tmp_path / "model_optim_rng.pt").read_bytes() == src.read_bytes()
