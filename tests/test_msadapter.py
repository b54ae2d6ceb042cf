"""The MSAdapter dialect of the torch zip format (issue 11): ckptmap's reader on the real shim-written
fixtures against their truth/, its writer against the shim's own bytes and the independent spec
reader (``msadapter_spec_reader``: ``check_msadapter_file``), and ``ckptmap convert`` msadapter <->
torch: stock ``torch.load(weights_only=True)`` on the output, round trips, RNG policy, bad inputs."""

import argparse
import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import msadapter_spec_reader as R
from ckptmap.cli import main
from ckptmap.errors import CkptmapError
from ckptmap.formats import dialect_translate as T
from ckptmap.formats import registry, torch_zip_writer
from ckptmap.formats.megatron_files import ModelFile, OptimFile, PtFile
from ckptmap.formats.torch_zip_reader import HeldTensor, TensorRef, TorchZipFile
from ckptmap.formats.torch_zip_writer import save_streaming

HERE = Path(__file__).resolve().parent
REPO_FIXTURES = HERE / "fixtures" / "msadapter"
SHARED_ROOT = Path(os.environ.get(
    "CKPTMAP_MSADAPTER_FIXTURES", HERE.parents[1] / "shared" / "fixtures" / "msadapter-r0.2.0"))
MEGATRON_ROOT = Path(os.environ.get("CKPTMAP_FIXTURES", HERE.parents[1] / "shared" / "fixtures" / "megatron-r0.6.0"))
SHARED = "tiny-gqa-tp2pp1"
GOOD = [SHARED, "tiny-gqa-tp1pp2", "tiny-gqa-tp1pp2vpp2", "tiny-gqa-tp2pp1-numel-tensor",
        "tiny-gqa-tp1pp1dp2-per-bucket"]
BAD = ["bad-int32-numel", "bad-float64-exp-avg-sq", "bad-dtype-key-strings"]
MEGATRON = ["legacy_tp1pp1dp1", "legacy_tp2pp2dp2", "legacy_tp1pp3vpp2dp1", "mcore_tp2pp1dp2_buckets"]
PROBE = REPO_FIXTURES / "probe-dtypes-views" / "probe.pt"


def fixture_dir(name: str) -> Path:
    path = (SHARED_ROOT if name == SHARED else MEGATRON_ROOT if name in MEGATRON else REPO_FIXTURES) / name
    if not path.is_dir():  # fail, never skip
        pytest.fail(f"fixture {path} is missing (CKPTMAP_MSADAPTER_FIXTURES / CKPTMAP_FIXTURES)")
    return path


def pt_files(name: str) -> list[Path]:
    return sorted(fixture_dir(name).glob("iter_*/mp_rank_*/*.pt"))


def config(name: str) -> dict:
    return json.loads((fixture_dir(name) / "truth" / "config.json").read_text())


def raw(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def date_time_of(path) -> tuple:
    return zipfile.ZipFile(path).infolist()[0].date_time


def truth_of(name: str, md: str) -> dict:
    rank = config(name)["ranks"][md]
    return load_file(str(fixture_dir(name) / "truth" / rank["truth_file"]))


def truth_lookup(key: str, model: dict, optim: dict):
    """The object of a fixture file that truth key ``key`` describes (None: derived, not stored as such)."""
    head, _, rest = key.partition(".")
    if head.startswith("model"):
        return model[head][rest]
    if head == "rng":
        rs = model["rng_state"][0]
        if rest.startswith("rng_tracker_states."):
            return rs["rng_tracker_states"][rest.split(".", 1)[1]]
        return rs[rest]
    if head == "distopt":
        g, state, *bucket = rest.split(".")
        (world,) = optim[int(g)].values()
        value = world[state]
        return value[int(bucket[0])] if bucket else value
    return None  # opt.<state>.<name>: parameter-shaped slices of the distopt tensors


def rank_cases(names):
    out = []
    for name in names:
        for md in config(name)["ranks"]:
            out.append(pytest.param(name, md, id=f"{name}/{md}"))
    return out


def ms_dir(name, md):
    cfg = config(name)
    return fixture_dir(name) / f"iter_{cfg['iteration']:07d}" / md


# -------------------------------------------------------------------------------------------------
# Reader


@pytest.mark.parametrize("name,md", rank_cases(GOOD))
def test_reader_reproduces_truth(name, md):
    d = ms_dir(name, md)
    truth = truth_of(name, md)
    with TorchZipFile(d / "model_optim_rng.pt") as mz, TorchZipFile(d / "distrib_optim.pt") as oz:
        assert mz.dialect == oz.dialect == "msadapter"
        n = 0
        for key, ref in truth.items():
            ours = truth_lookup(key, mz.root, oz.root)
            if ours is None:
                continue
            zf = mz if key.startswith(("model", "rng")) else oz
            assert isinstance(ours, TensorRef), key
            arr = zf.array(ours)
            assert ours.dtype == str(ref.dtype).removeprefix("torch.") and tuple(ours.shape) == tuple(ref.shape), key
            assert arr.tobytes() == raw(ref), key
            assert ours.parameter == key.startswith("model"), key  # the shim's model weights are Parameters
            n += 1
        assert n > 10
        # the reader protocol and Megatron's file classes work unchanged
        for f in (d / "model_optim_rng.pt", d / "distrib_optim.pt"):
            r = registry.open_reader(f)
            assert r.dialect == "msadapter" and r.keys()
            for k in r.keys():
                assert r.array(k).shape == tuple(r.spec(k).shape)
                assert r.byte_range(k) is not None  # C-order records: kernel-side copies work
            r.close()
        mf = ModelFile(d / "model_optim_rng.pt")
        names = {t.name for t in mf.tensors()}
        assert names == {k.split(".", 1)[1] for k in truth if k.startswith("model")}
        mf.close()


def test_optim_file_reads_the_per_bucket_layout():
    d = ms_dir("tiny-gqa-tp1pp1dp2-per-bucket", "mp_rank_00")
    of = OptimFile(d / "distrib_optim.pt")
    lay = config("tiny-gqa-tp1pp1dp2-per-bucket")["ranks"]["mp_rank_00"]["distrib_optim_layout"]
    buf = of.buffers[0]
    assert list(buf.padded) == lay["per_bucket_numel"] and buf.param_dtype == "bfloat16" and buf.storage == "per_bucket"
    assert buf.key("exp_avg", 1) == "0/bfloat16,float32/exp_avg/1" and buf.key("exp_avg", 1) in of
    of.close()


def test_reader_probe_dtypes_views_and_parameters():
    cfg = json.loads((PROBE.parent / "truth" / "config.json").read_text())
    truth = load_file(str(PROBE.parent / "truth" / "probe.safetensors"))
    with TorchZipFile(PROBE) as zf:
        root = zf.root
        assert zf.dialect == "msadapter"
        for k, ref in truth.items():
            ours = root[k]
            assert zf.array(ours).tobytes() == raw(ref), k  # C order, whatever stride was recorded
            assert list(ours.msadapter.stride) == cfg["shim_reported"][k]["stride"] and ours.msadapter.stride_is_list
            assert ours.stride == tuple(torch.empty(ref.shape).stride())
        assert root["transposed_view"].msadapter.stride == (1, 3)
        assert root["bfloat16_parameter"].parameter and not root["float32"].parameter
        assert root["bfloat16_parameter"].msadapter.cls == ("torch.nn.parameter", "Parameter")
        assert root["alias_of_float32"] is root["float32"]
        assert root["int64_0d"].shape == () and root["int64_0d"].storage_numel == 1
        assert root["float32_empty"].storage_numel == 0 and zf.array(root["float32_empty"]).shape == (0, 4)
    from ckptmap.formats.torch_zip_reader import load
    real = load(PROBE)
    assert type(real["bfloat16_parameter"]) is torch.nn.Parameter
    assert torch.equal(real["transposed_view"], truth["transposed_view"])


def test_inspect_shows_the_dialect(capsys):
    assert main(["inspect", str(PROBE)]) == 0
    assert "msadapter dialect" in capsys.readouterr().out
    assert main(["inspect", str(pt_files("legacy_tp1pp1dp1")[0])]) == 0
    assert "torch dialect" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------
# Writer


def _all_shim_files():
    files = [p for n in GOOD + BAD for p in pt_files(n)] + [PROBE]
    return [pytest.param(p, id=f"{p.parts[-4]}/{p.parent.name}/{p.stem}" if p != PROBE else "probe") for p in files]


@pytest.mark.parametrize("path", _all_shim_files())
def test_writer_reproduces_the_shims_bytes(path, tmp_path):
    """Re-writing what the reader read gives the shim's file byte for byte (with its timestamp);
    int32 / float64 storages are refused (no MindSpore-side reader knows them)."""
    with TorchZipFile(path) as zf:
        out = tmp_path / path.name
        bad = {r.dtype for _, r in PtFile(path).entries()} - {"float16", "float32", "bfloat16", "int64", "uint8", "bool"}
        if bad:
            with pytest.raises(CkptmapError, match="IntStorage|no storage type"):
                save_streaming(zf.root, out, lambda k: [zf.storage_bytes(k)], dialect="msadapter")
            assert not out.exists() and not list(tmp_path.iterdir())
            return
        save_streaming(zf.root, out, lambda k: [zf.storage_bytes(k)], dialect="msadapter",
                       date_time=date_time_of(path))
        assert out.read_bytes() == path.read_bytes()
        # ckptmap's own deterministic timestamp: still the spec's format, 1980-01-01 00:00:00
        save_streaming(zf.root, out, lambda k: [zf.storage_bytes(k)], dialect="msadapter")
    R.check_msadapter_file(out, require_contiguous=path != PROBE)
    assert {i.date_time for i in zipfile.ZipFile(out).infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert len(out.read_bytes()) == len(path.read_bytes())


def test_writer_from_scratch_passes_the_spec_check(tmp_path):
    rng = np.random.default_rng(0)
    w = HeldTensor("bfloat16", rng.integers(0, 1 << 16, (4, 3), dtype=np.uint16))
    obj = {"w": w, "again": w, "f": HeldTensor("float32", rng.standard_normal(5).astype(np.float32)),
           "z": HeldTensor("int64", np.array(7, dtype=np.int64)), "e": HeldTensor("float32", np.zeros((0, 2), np.float32))}
    out = tmp_path / "x.pt"
    save_streaming(obj, out, None, dialect="msadapter")
    R.check_msadapter_file(out)
    back = R.load(out)
    assert back["w"] is back["again"] and back["w"].array.tobytes() == w.data.tobytes()
    assert back["z"].shape == () and back["z"].storage_numel == 1 and int(back["z"].array) == 7
    assert back["e"].shape == (0, 2) and back["e"].storage_numel == 0
    with pytest.raises(CkptmapError, match="IntStorage"):
        save_streaming({"i": HeldTensor("int32", np.arange(3, dtype=np.int32))}, tmp_path / "y.pt", None,
                       dialect="msadapter")
    from ckptmap.formats.safe_unpickler import torch_global
    with pytest.raises(CkptmapError, match="MindSpore dtype objects"):
        save_streaming({"d": torch_global("torch", "bfloat16")}, tmp_path / "y.pt", None, dialect="msadapter")
    assert not (tmp_path / "y.pt").exists()


def test_writer_refuses_views(tmp_path):
    base = TensorRef("0", "float32", 2, (2,), (1,), 8)
    with pytest.raises(CkptmapError, match="one C-contiguous tensor per storage"):
        save_streaming({"v": base}, tmp_path / "v.pt", lambda k: [b"\0" * 32], dialect="msadapter")


@pytest.mark.parametrize("limit", [None, 40, 3000])
def test_zip_container_equals_python_zipfile(limit, tmp_path, monkeypatch):
    """The container is Python's zipfile.writestr (3.11) byte for byte, zip64 paths included (shown
    with zipfile's limits lowered, which it reads at call time)."""
    records = [("archive/data.pkl", b"\x80\x02N."), ("archive/version", b"3"), ("archive/byteorder", b"little")]
    records += [(f"archive/data/{i}", bytes(range(256)) * (i + 1) * 3) for i in (0, 1, 10, 2)]
    if limit is not None:
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", limit)
        monkeypatch.setattr(torch_zip_writer, "_PY_ZIP64_LIMIT", limit)
        monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 5)
        monkeypatch.setattr(torch_zip_writer, "_PY_ZIP_FILECOUNT_LIMIT", 5)
    ref = tmp_path / "ref.zip"
    with zipfile.ZipFile(ref, "w") as z:
        for name, data in records:
            info = zipfile.ZipInfo(name, date_time=(2026, 12, 1, 6, 30, 6))
            info.external_attr = 0o600 << 16
            z.writestr(info, data)
    ours = tmp_path / "ours.zip"
    with open(ours, "wb") as f:
        w = torch_zip_writer._PyZipWriter(f, "archive/", (2026, 12, 1, 6, 30, 6))
        for name, data in records:
            w.begin(name[len("archive/"):], len(data))  # streamed: CRC patched in afterwards
            w._write(data)
            import zlib
            w.end(zlib.crc32(data))
        w.finish()
    assert ours.read_bytes() == ref.read_bytes()


# -------------------------------------------------------------------------------------------------
# convert: MSAdapter -> stock torch


def _convert(src, dst, frm, to, *extra):
    return main(["convert", "--from", frm, "--to", to, "--src", str(src), "--dst", str(dst), "--no-progress", *extra])


def _stock_load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True, map_location="cpu")


@pytest.mark.parametrize("name", GOOD)
def test_msadapter_to_torch_loads_with_stock_torch(name, tmp_path):
    out = tmp_path / "torch"
    assert _convert(fixture_dir(name), out, "msadapter", "torch", "--drop-rng") == 0
    cfg = config(name)
    assert (out / "latest_checkpointed_iteration.txt").read_bytes() == str(cfg["iteration"]).encode()
    assert not (out / "truth").exists()
    for md in cfg["ranks"]:
        d = out / f"iter_{cfg['iteration']:07d}" / md
        model, optim = _stock_load(d / "model_optim_rng.pt"), _stock_load(d / "distrib_optim.pt")
        assert "rng_state" not in model and model["args"].params_dtype is torch.bfloat16
        assert model["checkpoint_version"] == 3.0 and model["iteration"] == cfg["iteration"]
        truth = truth_of(name, md)
        for key, ref in truth.items():
            if key.startswith("rng."):
                continue
            ours = truth_lookup(key, model, optim)
            if ours is None:
                continue
            assert ours.dtype == ref.dtype and ours.shape == ref.shape and raw(ours) == raw(ref), key
            if key.startswith("model"):
                assert type(ours) is torch.nn.Parameter, key
            else:
                assert type(ours) is torch.Tensor, key
        for chunk in [k for k in model if k.startswith("model")]:
            meta = model[chunk]._metadata
            assert meta and all(v == {"version": 1} for v in meta.values())
        keys = [k for g in optim if isinstance(g, int) for k in optim[g]]
        assert keys and all(k == (torch.bfloat16, torch.float32) for k in keys)
        if cfg["config"].get("numel_unpadded") == "int64_tensor":
            nu = optim[0][(torch.bfloat16, torch.float32)]["numel_unpadded"]
            assert type(nu) is torch.Tensor and nu.dtype == torch.int64 and nu.shape == ()
            expect = cfg["ranks"][md]["chunks"]["model"]["distrib_optim_layout"]["numel_unpadded"] \
                if "chunks" in cfg["ranks"][md] else cfg["ranks"][md]["distrib_optim_layout"]["numel_unpadded"]
            # megatron-core 0.8-0.12 load_parameter_state_from_dp_zero only asserts this equality
            assert expect == nu
        # ckptmap reads its own output as stock torch
        assert TorchZipFile(d / "model_optim_rng.pt").dialect == "torch"


@pytest.mark.parametrize("name", GOOD)
def test_msadapter_torch_msadapter_round_trip(name, tmp_path):
    """Byte-identical back to the shim's files (their timestamps given), RNG kept with the explicit flag;
    and the command's own output equals ckptmap's writer output of the original graph."""
    assert _convert(fixture_dir(name), tmp_path / "torch", "msadapter", "torch", "--keep-foreign-rng") == 0
    assert _convert(tmp_path / "torch", tmp_path / "back", "torch", "msadapter", "--keep-foreign-rng") == 0
    for src in pt_files(name):
        rel = src.relative_to(fixture_dir(name))
        back = tmp_path / "back" / rel
        with TorchZipFile(src) as zf:
            own = tmp_path / "own" / rel
            own.parent.mkdir(parents=True, exist_ok=True)
            save_streaming(zf.root, own, lambda k: [zf.storage_bytes(k)], dialect="msadapter")
        assert back.read_bytes() == own.read_bytes(), rel
        R.check_msadapter_file(back)
        again = tmp_path / "again" / rel
        again.parent.mkdir(parents=True, exist_ok=True)
        T.translate_file(tmp_path / "torch" / rel, again, source="torch", target="msadapter", rng="keep",
                         date_time=date_time_of(src))
        assert again.read_bytes() == src.read_bytes(), rel


# -------------------------------------------------------------------------------------------------
# convert: stock torch -> MSAdapter


class _ModelType:
    def __init__(self, *args):
        self.args = args


def _spec_with_megatron(monkeypatch):
    """The spec reader plus megatron's ModelType (in the args of real Megatron checkpoints)."""
    extra = {("megatron.core.enums", "ModelType"): _ModelType}
    orig = R.load_with_info

    def load_with_info(data, *, extra_globals=None, extra_storage=None):
        return orig(data, extra_globals={**extra, **(extra_globals or {})}, extra_storage=extra_storage)
    monkeypatch.setattr(R, "load_with_info", load_with_info)
    monkeypatch.setattr(R, "_ALLOWED_GLOBALS", R._ALLOWED_GLOBALS | set(extra))


def _spec_tensors(obj, prefix=""):
    return dict(R.walk_tensors(obj, prefix))


@pytest.mark.parametrize("name", MEGATRON)
def test_torch_to_msadapter_passes_the_spec(name, tmp_path, monkeypatch):
    out = tmp_path / "ms"
    assert _convert(fixture_dir(name), out, "torch", "msadapter", "--drop-rng") == 0
    _spec_with_megatron(monkeypatch)
    for src in pt_files(name):
        dst = out / src.relative_to(fixture_dir(name))
        R.check_msadapter_file(dst)
        ours = R.load(dst)
        stock = torch.load(src, map_location="cpu", weights_only=False)
        stock.pop("rng_state", None)
        expect = {k: v for k, v in _flat_torch(stock).items()}
        got = {k.replace("mindspore.", "torch."): v for k, v in _spec_tensors(ours).items()}
        assert list(got) == list(expect)
        for k, t in got.items():
            assert t.dialect == "msadapter" and t.tobytes() == raw(expect[k]), k
        if src.name == "model_optim_rng.pt":
            assert "rng_state" not in ours and ours["args"].params_dtype == _ms("BFloat", 16)
        else:
            keys = [k for g, v in ours.items() if isinstance(g, int) for k in v]
            keys += [k for d in ours.get("per_bucket_numel", []) for k in d]
            assert keys and all(k == (_ms("BFloat", 16), _ms("Float", 32)) for k in keys)


def _ms(kind, bits):
    d = R._MS_DTYPE_CLASSES[kind]()
    d.__setstate__((bits,))
    return d


def _flat_torch(obj, prefix=""):
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat_torch(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flat_torch(v, f"{prefix}.{i}" if prefix else str(i)))
    elif isinstance(obj, argparse.Namespace):
        out.update(_flat_torch(vars(obj), prefix))
    return out


@pytest.mark.parametrize("name", MEGATRON)
def test_torch_msadapter_torch_round_trip(name, tmp_path, monkeypatch):
    """Byte-identical, model_optim_rng.pt included: its weights view one shared parameter buffer, which
    MSAdapter files cannot express, so the layout file beside it carries the views and the buffer's
    uncovered bytes; the MSAdapter files themselves stay exactly in the shim's format."""
    assert _convert(fixture_dir(name), tmp_path / "ms", "torch", "msadapter", "--keep-foreign-rng") == 0
    _spec_with_megatron(monkeypatch)
    for src in pt_files(name):
        ms = tmp_path / "ms" / src.relative_to(fixture_dir(name))
        R.check_msadapter_file(ms)
        assert T.layout_path(ms).is_file() == (src.name == "model_optim_rng.pt")
    assert _convert(tmp_path / "ms", tmp_path / "back", "msadapter", "torch", "--keep-foreign-rng") == 0
    for src in pt_files(name):
        back = tmp_path / "back" / src.relative_to(fixture_dir(name))
        assert back.read_bytes() == src.read_bytes(), src
    assert not list((tmp_path / "back").rglob("*" + T.LAYOUT_SUFFIX))


def test_stale_layout_file_is_ignored(tmp_path, capsys):
    """A layout file that no longer describes its MSAdapter file (MindSpeed saved it again) is ignored:
    the way back is then value-identical, each tensor in its own storage."""
    name = "legacy_tp2pp2dp2"
    assert _convert(fixture_dir(name), tmp_path / "ms", "torch", "msadapter", "--drop-rng") == 0
    src = pt_files(name)[1]
    ms = tmp_path / "ms" / src.relative_to(fixture_dir(name))
    with TorchZipFile(ms) as zf:  # "re-saved by MindSpeed": same graph, one tensor value changed
        first = next(iter(zf.storage_keys()))

        def fill(k):
            data = bytearray(zf.storage_bytes(k))
            if k == first:
                data[0] ^= 1
            return [bytes(data)]
        obj = zf.root
        obj["iteration"] = 2
        save_streaming(obj, tmp_path / "resaved.pt", fill, dialect="msadapter")
    os.replace(tmp_path / "resaved.pt", ms)
    capsys.readouterr()
    assert main(["plan", "convert", "--from", "msadapter", "--to", "torch", "--src", str(tmp_path / "ms"),
                 "--dst", str(tmp_path / "back")]) == 0
    assert "describes another version of this file" in capsys.readouterr().out
    assert _convert(tmp_path / "ms", tmp_path / "back", "msadapter", "torch") == 0
    back = tmp_path / "back" / src.relative_to(fixture_dir(name))
    a, b = torch.load(src, weights_only=False), torch.load(back, weights_only=False)
    assert b["iteration"] == 2
    fa, fb = _flat_torch(a), _flat_torch(b)
    fa.pop("rng_state.0.torch_rng_state"), fa.pop("rng_state.0.cuda_rng_state")
    fa = {k: v for k, v in fa.items() if not k.startswith("rng_state")}
    assert list(fa) == list(fb)
    changed = [k for k in fa if raw(fa[k]) != raw(fb[k])]
    assert len(changed) == 1 and fb[changed[0]].untyped_storage().nbytes() == fb[changed[0]].nbytes


def test_stock_file_without_shared_storage_round_trips_byte_identical(tmp_path):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(3, 4).to(torch.bfloat16)
    sd = lin.state_dict()
    obj = {"args": argparse.Namespace(params_dtype=torch.bfloat16, iteration=7),
           "model": sd, "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
           "zero_d": torch.tensor(5), "empty": torch.zeros(0, 3), "bools": torch.tensor([True, False]),
           "u8": torch.arange(4, dtype=torch.uint8), "half": torch.randn(3, generator=g).half(),
           "opt": {0: {(torch.bfloat16, torch.float32): {"param": torch.randn(8, generator=g), "numel_unpadded": 8}}}}
    src = tmp_path / "a" / "x.pt"
    src.parent.mkdir()
    torch.save(obj, src)
    ms = tmp_path / "b" / "x.pt"
    ms.parent.mkdir()
    T.translate_file(src, ms, source="torch", target="msadapter")
    R.check_msadapter_file(ms)
    spec = R.load(ms)
    assert spec["param"].is_parameter and spec["param"].type_name == "torch.nn.parameter.Parameter"
    assert spec["model"]["weight"].type_name == "mindspore.common.tensor.Tensor"
    assert all(v == {} for v in spec["model"]._metadata.values())
    assert spec["args"].params_dtype == _ms("BFloat", 16)
    back = tmp_path / "c" / "x.pt"
    back.parent.mkdir()
    T.translate_file(ms, back, source="msadapter", target="torch")
    assert back.read_bytes() == src.read_bytes()


def test_whole_records_are_copied_with_the_crc_their_source_recorded(tmp_path, monkeypatch):
    """A tensor whose storage is a whole record of the source goes to its own record by a kernel copy,
    with the CRC-32 the source recorded for those bytes: nothing is read to recompute it, every record of
    both translations passes zipfile's CRC check, and a record damaged after saving stays detectably
    damaged in the copy (a recomputed CRC would vouch for the damage)."""
    from ckptmap.formats import byte_io

    g = torch.Generator().manual_seed(3)
    obj = {"w": torch.randn(64, 33, generator=g).bfloat16(), "m": torch.randn(4096, generator=g),
           "i": torch.arange(7), "view": torch.arange(12.0)[2:9]}   # the view: part of a record, CRC'd
    src = tmp_path / "a" / "x.pt"
    src.parent.mkdir()
    torch.save(obj, src)
    computed = []
    real_crc_copy = byte_io.copy_range_crc
    monkeypatch.setattr(byte_io, "copy_range_crc", lambda rng, fd, crc=0: computed.append(rng.nbytes) or
                        real_crc_copy(rng, fd, crc))
    ms = tmp_path / "b" / "x.pt"
    ms.parent.mkdir()
    T.translate_file(src, ms, source="torch", target="msadapter")
    assert computed == [7 * 4]   # only the view's bytes were read for a CRC
    assert zipfile.ZipFile(ms).testzip() is None
    R.check_msadapter_file(ms)
    back = tmp_path / "c" / "x.pt"
    back.parent.mkdir()
    T.translate_file(ms, back, source="msadapter", target="torch")
    assert zipfile.ZipFile(back).testzip() is None
    loaded = torch.load(back, weights_only=True)
    assert all(torch.equal(loaded[k], obj[k]) for k in obj)

    def fp32_record(path):
        with zipfile.ZipFile(path) as z:
            return next(i for i in z.infolist() if i.file_size == 4096 * 4)

    info = fp32_record(src)   # flip one byte of the fp32 record after saving
    data = bytearray(src.read_bytes())
    name_len, extra_len = struct.unpack_from("<2H", data, info.header_offset + 26)   # its local header
    data[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF
    src.write_bytes(bytes(data))
    assert zipfile.ZipFile(src).testzip() == info.filename
    damaged = tmp_path / "d" / "x.pt"
    damaged.parent.mkdir()
    T.translate_file(src, damaged, source="torch", target="msadapter")
    assert zipfile.ZipFile(damaged).testzip() == fp32_record(damaged).filename


def test_dry_run_shows_dialects_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["plan", "convert", "--from", "msadapter", "--to", "torch", "--src",
                 str(fixture_dir("tiny-gqa-tp1pp2vpp2")), "--dst", str(out), "--drop-rng"]) == 0
    text = capsys.readouterr().out
    assert "msadapter  -> torch" in text and "RNG dropped: rng_state" in text and "--no-load-rng" in text
    assert "iter_0000008/mp_rank_00_001/distrib_optim.pt" in text and "latest_checkpointed_iteration.txt" in text
    assert _convert(fixture_dir("tiny-gqa-tp1pp2vpp2"), out, "msadapter", "torch", "--drop-rng", "--dry-run") == 0
    assert not out.exists()


def test_single_file_and_iteration_folder(tmp_path):
    src = pt_files("tiny-gqa-tp1pp2")[1]
    assert _convert(src, tmp_path / "one.pt", "msadapter", "torch", "--drop-rng") == 0
    assert "decoder.layers.0.mlp.linear_fc1.weight" in _stock_load(tmp_path / "one.pt")["model"]
    (tmp_path / "into").mkdir()
    assert _convert(src, tmp_path / "into", "msadapter", "torch", "--drop-rng") == 0
    a, b = _stock_load(tmp_path / "into" / src.name)["model"], _stock_load(tmp_path / "one.pt")["model"]
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)
    iter_dir = fixture_dir("tiny-gqa-tp1pp2") / "iter_0000012"
    assert _convert(iter_dir, tmp_path / "it", "msadapter", "torch", "--drop-rng") == 0
    assert sorted(p.relative_to(tmp_path / "it").as_posix() for p in (tmp_path / "it").rglob("*.pt")) == [
        "mp_rank_00_000/distrib_optim.pt", "mp_rank_00_000/model_optim_rng.pt",
        "mp_rank_00_001/distrib_optim.pt", "mp_rank_00_001/model_optim_rng.pt"]


# -------------------------------------------------------------------------------------------------
# refusals: a clear error naming file and key, nothing written


def _refused(capsys, tmp_path, src, *args, frm="msadapter", to="torch"):
    out = tmp_path / "out"
    assert _convert(src, out, frm, to, *args) == 2
    err = capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*")), "nothing may be written"
    return err


def test_rng_is_refused_by_default(capsys, tmp_path):
    err = _refused(capsys, tmp_path, fixture_dir(SHARED))
    assert "model_optim_rng.pt holds RNG state" in err and "MindSpore generator states" in err
    assert "--drop-rng" in err and "--no-load-rng" in err and "--keep-foreign-rng" in err
    err = _refused(capsys, tmp_path, fixture_dir("legacy_tp1pp1dp1"), frm="torch", to="msadapter")
    assert "PyTorch CPU/CUDA generator states" in err and "--drop-rng" in err


@pytest.mark.parametrize("name,key,what", [
    ("bad-int32-numel", "0/bfloat16,float32/numel_unpadded", "int32 tensor (IntStorage)"),
    ("bad-float64-exp-avg-sq", "0/bfloat16,float32/exp_avg_sq", "float64 tensor"),
    ("bad-dtype-key-strings", "key 0: the dict key ('bfloat16', 'float32') is a pair of plain strings", "not dtypes"),
])
def test_bad_inputs(name, key, what, capsys, tmp_path):
    err = _refused(capsys, tmp_path, fixture_dir(name), "--drop-rng")
    assert "distrib_optim.pt" in err and key in err and what in err and "nothing was written" in err


def test_legacy_non_zip_file(capsys, tmp_path):
    src = tmp_path / "src" / "iter_0000001" / "mp_rank_00"
    src.mkdir(parents=True)
    torch.save({"a": torch.ones(2)}, src / "model_optim_rng.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "src" / "latest_checkpointed_iteration.txt").write_text("1")
    err = _refused(capsys, tmp_path, tmp_path / "src", "--drop-rng")
    assert str(src / "model_optim_rng.pt") in err and "legacy" in err


def test_wrong_direction_is_refused(capsys, tmp_path):
    err = _refused(capsys, tmp_path, fixture_dir("legacy_tp1pp1dp1"), "--drop-rng")
    assert "is a stock PyTorch (torch.save) file, not msadapter" in err
    err = _refused(capsys, tmp_path, fixture_dir("tiny-gqa-tp1pp2"), "--drop-rng", frm="torch", to="msadapter")
    assert "is an MSAdapter-dialect file, not torch" in err


def test_probe_file_both_ways(tmp_path):
    """Every storage kind, 0-d, empty, views, a Parameter, aliasing, all MindSpore dtype objects and a
    nested torch.save(None): to stock torch (weights_only load, values = truth) and back (spec format)."""
    truth = load_file(str(PROBE.parent / "truth" / "probe.safetensors"))
    out = tmp_path / "probe_torch.pt"
    T.translate_file(PROBE, out, source="msadapter", target="torch")
    with torch.serialization.safe_globals([io.BytesIO]):  # TransformerEngine's _extra_state type
        got = _stock_load(out)
    for k, ref in truth.items():
        assert got[k].dtype == ref.dtype and torch.equal(got[k], ref) and got[k].is_contiguous(), k
    assert type(got["bfloat16_parameter"]) is torch.nn.Parameter and got["alias_of_float32"] is got["float32"]
    assert got["dtypes"] == [torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.int8, torch.int16,
                             torch.int32, torch.int64, torch.uint8, torch.bool]
    assert torch.load(io.BytesIO(got["te_extra_state"].getvalue()), weights_only=True) is None
    back = tmp_path / "probe.pt"
    T.translate_file(out, back, source="torch", target="msadapter")
    R.check_msadapter_file(back)
    spec = R.load(back)
    for k, ref in truth.items():
        assert spec[k].tobytes() == raw(ref), k
    assert [d.name for d in spec["dtypes"]] == [d.name for d in R.load(PROBE)["dtypes"]]
    assert spec["bfloat16_parameter"].is_parameter and spec["alias_of_float32"] is spec["float32"]


def test_convert_needs_neither_torch_nor_mindspore(tmp_path):
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in ('mindspore', 'torch', 'megatron'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        from ckptmap.cli import main
        rc = main(['convert', '--from', 'msadapter', '--to', 'torch', '--src', {str(fixture_dir(SHARED))!r},
                   '--dst', {str(tmp_path / 'pt')!r}, '--drop-rng', '--no-progress'])
        rc |= main(['convert', '--from', 'torch', '--to', 'msadapter', '--src', {str(fixture_dir("legacy_tp1pp1dp1"))!r},
                    '--dst', {str(tmp_path / 'ms')!r}, '--drop-rng', '--no-progress'])
        assert not any(m.split('.')[0] in ('mindspore', 'torch', 'megatron') for m in sys.modules)
        sys.exit(rc)
    """)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list((tmp_path / "pt").rglob("*.pt"))) == 4 and len(list((tmp_path / "ms").rglob("*.pt"))) == 2
