"""Issue 11, MSAdapter .pt <-> MindSpore .ckpt / safetensors through pt2ms / ms2pt, on the real shim-written
fixtures (``shared/fixtures/msadapter-r0.2.0/tiny-gqa-tp2pp1``, ``tests/fixtures/msadapter/*``: PP 2, VPP 2,
0-d ``numel_unpadded``, core_r0.6 per bucket) against their ``truth/``, in every direction:

* pt2ms: weights and full optimizer state, ckpt and safetensors, read with the real
  ``mindspore.load_checkpoint``, bit-exact with ``truth/`` (names from the fixture's own
  ``param_local_to_global``, not from ckptmap's rules);
* ms2pt: back in the MSAdapter dialect, checked with the independent spec reader
  (``msadapter_spec_reader``: ``check_msadapter_file`` and its loader) against ``truth/``, and byte-identical
  with the shim's files once their zip timestamps are set to ckptmap's 1980-01-01 00:00:00 (by this
  module's own zip patcher); ``--dialect torch``: stock ``torch.load(weights_only=True)`` against ``truth/``,
  RNG states refused / dropped / kept as ``ckptmap convert`` does them;
* ``plan --dry-run`` / ``inspect`` / ``verify`` show and understand the dialect;
* bad inputs (int32, float64, string dtype keys, a legacy non-zip file) are refused by pt2ms naming the
  file and the key, nothing written.
"""

import io
import shutil
import struct
import zipfile
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import msadapter_spec_reader as R
from ckptmap.cli import main
from conftest import fixture_dir as megatron_fixture_dir
from test_msadapter import GOOD, SHARED, _stock_load, config, fixture_dir, pt_files, raw, truth_lookup

FORMATS = ["ckpt", "safetensors"]
DATE_1980 = (1980, 1, 1, 0, 0, 0)


# -------------------------------------------------------------------------------------------------
# helpers (independent of ckptmap)


def restamped(data: bytes, dt=DATE_1980) -> bytes:
    """The zip file ``data`` with the DOS time and date of every local header and central-directory entry set
    to ``dt``; nothing else changed."""
    out = bytearray(data)
    dosdate = (dt[0] - 1980) << 9 | dt[1] << 5 | dt[2]
    dostime = dt[3] << 11 | dt[4] << 5 | dt[5] // 2
    for zi in zipfile.ZipFile(io.BytesIO(data)).infolist():
        assert out[zi.header_offset:zi.header_offset + 4] == b"PK\x03\x04"
        struct.pack_into("<2H", out, zi.header_offset + 10, dostime, dosdate)
    end = data.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack_from("<2L", data, end + 12)
    pos = cd_offset
    while pos < cd_offset + cd_size:
        assert out[pos:pos + 4] == b"PK\x01\x02"
        struct.pack_into("<2H", out, pos + 12, dostime, dosdate)
        n, e, c = struct.unpack_from("<3H", data, pos + 28)
        pos += 46 + n + e + c
    return bytes(out)


def run(*argv) -> int:
    return main([*argv, "--no-progress", "--multiprocess-off"] if argv[0] in ("pt2ms", "ms2pt") else list(argv))


def pt2ms(name, out, *extra):
    assert run("pt2ms", "--megatron-path", str(fixture_dir(name)), "--ms-path", str(out), *extra) == 0
    return out


def ms2pt(ms_dir, out, *extra):
    assert run("ms2pt", "--ms-path", str(ms_dir), "--megatron-path", str(out), *extra) == 0
    return out


def chunk_maps(name: str, md: str) -> dict:
    """{truth prefix ('model' or 'model0', …): {local name: global name}} from the fixture's truth config."""
    rank = config(name)["ranks"][md]
    if "chunks" in rank:
        return {k: c["param_local_to_global"] for k, c in rank["chunks"].items()}
    return {"model": rank["param_local_to_global"]}


def v1_rank(name: str, md: str) -> int:
    cfg, rank = config(name), config(name)["ranks"][md]
    return rank["tp_rank"] + cfg["config"]["tp"] * cfg["config"]["dp"] * rank["pp_rank"]


def load_ms(path: Path, fmt: str) -> dict:
    params = ms.load_checkpoint(str(path), format=fmt) if fmt == "safetensors" else ms.load_checkpoint(str(path))
    return {k: v.asnumpy() for k, v in params.items()}


def iter_dir(name: str) -> str:
    return f"iter_{config(name)['iteration']:07d}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """pt2ms (weights + optimizer state, ckpt) of every good fixture, made once."""
    root = tmp_path_factory.mktemp("pt2ms")
    return {name: pt2ms(name, root / name) for name in GOOD}


# -------------------------------------------------------------------------------------------------
# pt2ms: MSAdapter -> MindSpore, against truth/ through mindspore.load_checkpoint


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", GOOD)
def test_pt2ms_matches_truth(name, fmt, tmp_path, converted):
    out = converted[name] if fmt == "ckpt" else pt2ms(name, tmp_path / "ms", "--format", fmt)
    for md in config(name)["ranks"]:
        got = load_ms(out / f"rank_{v1_rank(name, md)}" / f"network.{fmt}", fmt)
        truth = load_file(str(fixture_dir(name) / "truth" / config(name)["ranks"][md]["truth_file"]))
        expected = {}
        for prefix, names in chunk_maps(name, md).items():
            for local, glob in names.items():
                # the parameter key holds the fp32 main parameter, exp_avg.* / exp_avg_sq.* the moments
                for state, key in (("param", glob), ("exp_avg", f"exp_avg.{glob}"), ("exp_avg_sq", f"exp_avg_sq.{glob}")):
                    tname = f"opt.{state}.{local}" if prefix == "model" else f"opt.{state}.{prefix}.{local}"
                    expected[key] = truth[tname]
        assert expected and set(expected) <= set(got), sorted(set(expected) - set(got))
        for key, t in expected.items():
            assert got[key].dtype == np.float32 and got[key].shape == tuple(t.shape), key
            assert got[key].tobytes() == raw(t), key
        rest = [k for k in got if k not in expected]
        assert rest and all(got[k].size == 1 for k in rest), rest  # scalars only (step_num, lr, …)
        assert int(got["step_num"].reshape(())) == config(name)["iteration"]


@pytest.mark.parametrize("name", [SHARED, "tiny-gqa-tp1pp2vpp2"])
def test_pt2ms_weights_only_matches_truth(name, tmp_path):
    out = pt2ms(name, tmp_path / "ms", "--convert-param-only")
    for md in config(name)["ranks"]:
        got = load_ms(out / f"rank_{v1_rank(name, md)}" / "network.ckpt", "ckpt")
        truth = load_file(str(fixture_dir(name) / "truth" / config(name)["ranks"][md]["truth_file"]))
        for prefix, names in chunk_maps(name, md).items():
            for local, glob in names.items():
                t = truth[f"{prefix}.{local}"]
                assert t.dtype == torch.bfloat16 and got[glob].dtype == np.float32
                assert torch.equal(torch.from_numpy(got[glob]), t.float()), glob   # bf16 -> fp32 is exact
    # pt_meta keeps the Megatron files' dialect, and is itself an MSAdapter file keeping the RNG states as read
    for md in config(name)["ranks"]:
        rank = config(name)["ranks"][md]
        meta_file = out / "pt_meta" / f"args_tp{rank['tp_rank']:02d}_pp{rank['pp_rank']:03d}.pt"
        R.check_msadapter_file(meta_file)
        meta = R.load(meta_file)
        assert meta["ckptmap"]["dialects"] == {"model_optim_rng": "msadapter", "distrib_optim": "msadapter"}
        truth = load_file(str(fixture_dir(name) / "truth" / rank["truth_file"]))
        rs = meta["rng_state"][0]
        assert rs["torch_rng_state"].tobytes() == raw(truth["rng.torch_rng_state"])
        assert rs["cuda_rng_state"].tobytes() == raw(truth["rng.cuda_rng_state"])
        assert meta["args"].params_dtype == R.load(pt_files(name)[1])["args"].params_dtype   # a MindSpore dtype


# -------------------------------------------------------------------------------------------------
# ms2pt: back to the MSAdapter dialect


def _check_back(name: str, back: Path) -> None:
    """Every file written back: the spec's format, truth/'s values (spec reader), and the shim's own bytes
    except the zip timestamps (ckptmap writes 1980-01-01 00:00:00)."""
    for src in pt_files(name):
        rel = src.relative_to(fixture_dir(name))
        dst = back / rel
        R.check_msadapter_file(dst)
        assert dst.read_bytes() == restamped(src.read_bytes()), rel
        assert {i.date_time for i in zipfile.ZipFile(dst).infolist()} == {DATE_1980}
    for md in config(name)["ranks"]:
        d = back / iter_dir(name) / md
        model, optim = R.load(d / "model_optim_rng.pt"), R.load(d / "distrib_optim.pt")
        truth = load_file(str(fixture_dir(name) / "truth" / config(name)["ranks"][md]["truth_file"]))
        n = 0
        for key, t in truth.items():
            ours = truth_lookup(key, model, optim)
            if ours is None:
                continue
            assert ours.dialect == "msadapter" and ours.tobytes() == raw(t), key
            assert ours.is_parameter == key.startswith("model"), key   # the shim's weights are Parameters
            n += 1
        assert n >= 5
        keys = [k for g, v in optim.items() if isinstance(g, int) for k in v]
        keys += [k for d in optim.get("per_bucket_numel", []) for k in d]
        assert keys and all(all(isinstance(x, R.MSDtype) for x in k) for k in keys)
    assert (back / "latest_checkpointed_iteration.txt").read_text() == str(config(name)["iteration"])


@pytest.mark.parametrize("name", GOOD)
def test_ms2pt_writes_the_msadapter_dialect_back(name, tmp_path, converted):
    back = ms2pt(converted[name], tmp_path / "back")
    _check_back(name, back)


def test_safetensors_round_trip(tmp_path):
    name = "tiny-gqa-tp2pp1-numel-tensor"
    ms_dir = pt2ms(name, tmp_path / "ms", "--format", "safetensors")
    _check_back(name, ms2pt(ms_dir, tmp_path / "back"))


def test_changed_values_come_back_in_the_dialect(tmp_path):
    """A MindSpore-side change (one exp_avg value) lands in distrib_optim.pt, still an MSAdapter file."""
    name = "tiny-gqa-tp1pp1dp2-per-bucket"
    ms_dir = pt2ms(name, tmp_path / "ms", "--format", "safetensors")
    from safetensors.numpy import load_file as np_load, save_file as np_save
    path = ms_dir / "rank_0" / "network.safetensors"
    tensors = np_load(str(path))
    key = "exp_avg.decoder.layers.1.mlp.linear_fc2.weight"
    tensors[key] = tensors[key].copy()
    tensors[key].reshape(-1)[3] = 1234.5
    np_save(tensors, str(path), metadata={"format": "ms"})
    back = ms2pt(ms_dir, tmp_path / "back")
    src = pt_files(name)[0]
    dst = back / src.relative_to(fixture_dir(name))
    assert src.name == "distrib_optim.pt"
    R.check_msadapter_file(dst)
    a, b = R.load(src), R.load(dst)
    (ka,), (kb,) = a[0].keys(), b[0].keys()
    assert ka == kb
    changed = [(s, j) for s in ("param", "exp_avg", "exp_avg_sq") for j, (x, y) in
               enumerate(zip(a[0][ka][s], b[0][kb][s])) if x.tobytes() != y.tobytes()]
    assert len(changed) == 1 and changed[0][0] == "exp_avg"
    s, j = changed[0]
    diff = np.flatnonzero(a[0][ka][s][j].array != b[0][kb][s][j].array)
    assert len(diff) == 1 and b[0][kb][s][j].array[diff[0]] == np.float32(1234.5)


# -------------------------------------------------------------------------------------------------
# ms2pt --dialect torch: stock PyTorch files, RNG as `ckptmap convert` handles it


def test_ms2pt_to_stock_torch_refuses_rng_by_default(tmp_path, converted, capsys):
    out = tmp_path / "pt"
    assert run("ms2pt", "--ms-path", str(converted[SHARED]), "--megatron-path", str(out), "--dialect", "torch") == 2
    err = capsys.readouterr().err
    assert "holds RNG state" in err and "MindSpore generator states" in err and "model_optim_rng.pt" in err
    assert "--drop-rng" in err and "--keep-foreign-rng" in err and "--no-load-rng" in err
    assert not out.exists()


@pytest.mark.parametrize("name", GOOD)
def test_ms2pt_to_stock_torch(name, tmp_path, converted):
    out = ms2pt(converted[name], tmp_path / "pt", "--dialect", "torch", "--drop-rng")
    for md in config(name)["ranks"]:
        d = out / iter_dir(name) / md
        model, optim = _stock_load(d / "model_optim_rng.pt"), _stock_load(d / "distrib_optim.pt")
        assert "rng_state" not in model and model["args"].params_dtype is torch.bfloat16
        truth = load_file(str(fixture_dir(name) / "truth" / config(name)["ranks"][md]["truth_file"]))
        n = 0
        for key, t in truth.items():
            if key.startswith("rng."):
                continue
            ours = truth_lookup(key, model, optim)
            if ours is None:
                continue
            assert ours.dtype == t.dtype and ours.shape == t.shape and raw(ours) == raw(t), key
            assert (type(ours) is torch.nn.Parameter) == key.startswith("model"), key
            n += 1
        assert n >= 5
        keys = [k for g in optim if isinstance(g, int) for k in optim[g]]
        keys += [k for d in optim.get("per_bucket_numel", []) for k in d]
        assert keys and all(k == (torch.bfloat16, torch.float32) for k in keys)
    # the same files `ckptmap convert --from msadapter --to torch` makes of the original
    assert main(["convert", "--from", "msadapter", "--to", "torch", "--src", str(fixture_dir(name)),
                 "--dst", str(tmp_path / "convert"), "--drop-rng", "--no-progress"]) == 0
    for src in pt_files(name):
        rel = src.relative_to(fixture_dir(name))
        assert (out / rel).read_bytes() == (tmp_path / "convert" / rel).read_bytes(), rel


def test_ms2pt_to_stock_torch_keeping_rng_converts_back_to_the_shims_files(tmp_path, converted):
    name = "tiny-gqa-tp1pp2"
    out = ms2pt(converted[name], tmp_path / "pt", "--dialect", "torch", "--keep-foreign-rng")
    model = torch.load(out / iter_dir(name) / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=False)
    truth = load_file(str(fixture_dir(name) / "truth" / "tp0_pp1.safetensors"))
    assert raw(model["rng_state"][0]["torch_rng_state"]) == raw(truth["rng.torch_rng_state"])  # MindSpore's 16 bytes
    assert main(["convert", "--from", "torch", "--to", "msadapter", "--src", str(out), "--dst", str(tmp_path / "ms"),
                 "--keep-foreign-rng", "--no-progress"]) == 0
    for src in pt_files(name):
        dst = tmp_path / "ms" / src.relative_to(fixture_dir(name))
        assert dst.read_bytes() == restamped(src.read_bytes()), dst


def test_dialect_options_that_do_not_apply_are_refused(tmp_path, converted, capsys):
    out = tmp_path / "out"
    assert run("ms2pt", "--ms-path", str(converted[SHARED]), "--megatron-path", str(out), "--drop-rng") == 2
    assert "--drop-rng applies when ms2pt writes another dialect" in capsys.readouterr().err
    stock = tmp_path / "stock_ms"
    assert run("pt2ms", "--megatron-path", str(megatron_fixture_dir("legacy_tp1pp1dp1")), "--ms-path", str(stock),
               "--convert-param-only") == 0
    assert run("ms2pt", "--ms-path", str(stock), "--megatron-path", str(out), "--dialect", "msadapter",
               "--convert-param-only") == 2
    err = capsys.readouterr().err
    assert "came from a stock PyTorch file" in err and "ckptmap convert --from torch --to msadapter" in err
    assert not out.exists()
    # a stock source is written back as stock torch (the default and --dialect torch alike)
    assert run("ms2pt", "--ms-path", str(stock), "--megatron-path", str(out), "--dialect", "torch",
               "--convert-param-only") == 0
    src = pt_files("legacy_tp1pp1dp1")[-1]
    assert src.name == "model_optim_rng.pt"
    assert (out / src.relative_to(megatron_fixture_dir("legacy_tp1pp1dp1"))).read_bytes() == src.read_bytes()


# -------------------------------------------------------------------------------------------------
# plan, inspect, verify


def test_plan_dry_run_shows_the_dialect(tmp_path, converted, capsys):
    assert main(["plan", "pt2ms", "--megatron-path", str(fixture_dir("tiny-gqa-tp1pp2vpp2")), "--ms-path",
                 str(tmp_path / "x"), "--dry-run"]) == 0
    assert ", dialect msadapter," in capsys.readouterr().out
    assert main(["plan", "pt2ms", "--megatron-path", str(megatron_fixture_dir("legacy_tp1pp1dp1")), "--ms-path",
                 str(tmp_path / "x"), "--dry-run", "--convert-param-only"]) == 0
    header = capsys.readouterr().out.splitlines()[1]
    assert ", dialect torch," in header and ", mode weights only" in header
    assert main(["plan", "ms2pt", "--ms-path", str(converted[SHARED]), "--megatron-path", str(tmp_path / "x"),
                 "--dry-run"]) == 0
    assert "dialect msadapter (as read)" in capsys.readouterr().out
    assert main(["ms2pt", "--ms-path", str(converted[SHARED]), "--megatron-path", str(tmp_path / "x"), "--dry-run",
                 "--dialect", "torch", "--drop-rng"]) == 0
    assert "dialect torch (from msadapter; RNG states dropped)" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()


def test_inspect_shows_the_dialect_of_written_files(tmp_path, converted, capsys):
    back = ms2pt(converted["tiny-gqa-tp1pp2"], tmp_path / "back")
    assert main(["inspect", str(back)]) == 0
    text = capsys.readouterr().out
    assert text.count("msadapter dialect") == 4 and "torch dialect" not in text
    assert main(["inspect", str(converted["tiny-gqa-tp1pp2"] / "pt_meta")]) == 0
    assert "msadapter dialect" in capsys.readouterr().out


@pytest.mark.parametrize("name", GOOD)
def test_verify_msadapter_checkpoint_against_its_conversion(name, converted, capsys):
    assert main(["verify", str(fixture_dir(name)), str(converted[name])]) == 0
    text = capsys.readouterr().out
    assert "Megatron files in the MSAdapter dialect" in text
    n = len(config(name)["ranks"])
    assert f"{n} of {n} file pairs identical" in text
    # optimizer states are compared for per-bucket and coalesced (0.8+, 64-element gaps) files alike
    assert "weights + optimizer states" in text and "weights + main-param rounding check" not in text


def test_verify_catches_a_changed_value(tmp_path, capsys):
    name = "tiny-gqa-tp1pp1dp2-per-bucket"
    ms_dir = pt2ms(name, tmp_path / "ms", "--format", "safetensors")
    from safetensors.numpy import load_file as np_load, save_file as np_save
    path = ms_dir / "rank_0" / "network.safetensors"
    tensors = np_load(str(path))
    key = "exp_avg_sq.decoder.layers.0.self_attention.linear_qkv.weight"
    tensors[key] = tensors[key].copy()
    tensors[key].reshape(-1)[0] += 1
    np_save(tensors, str(path), metadata={"format": "ms"})
    assert main(["verify", str(fixture_dir(name)), str(ms_dir)]) == 1
    assert f"differs: {key}" in capsys.readouterr().out


def test_verify_across_dialects(tmp_path, converted, capsys):
    name = "tiny-gqa-tp1pp2vpp2"
    back = ms2pt(converted[name], tmp_path / "back")
    pt = ms2pt(converted[name], tmp_path / "pt", "--dialect", "torch", "--keep-foreign-rng")
    it = iter_dir(name)
    assert main(["verify", str(fixture_dir(name) / it), str(back / it)]) == 0
    assert main(["verify", str(fixture_dir(name) / it), str(pt / it)]) == 0
    text = capsys.readouterr().out
    assert "torch zip dialects msadapter vs torch" in text and "4 of 4 file pairs identical" in text
    pt_drop = ms2pt(converted[name], tmp_path / "pt_drop", "--dialect", "torch", "--drop-rng")
    assert main(["verify", str(fixture_dir(name) / it), str(pt_drop / it)]) == 1
    assert "only in the first:  rng_state" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------
# bad inputs: pt2ms refuses naming the file and the key, nothing written


@pytest.mark.parametrize("param_only", [False, True])
@pytest.mark.parametrize("name,key,what", [
    ("bad-int32-numel", "key 0/bfloat16,float32/numel_unpadded", "int32 tensor (IntStorage)"),
    ("bad-float64-exp-avg-sq", "key 0/bfloat16,float32/exp_avg_sq", "float64 tensor"),
    ("bad-dtype-key-strings", "key 0: the dict key ('bfloat16', 'float32') is a pair of plain strings",
     "neither MindSpore nor torch dtype objects"),
])
def test_pt2ms_refuses_bad_inputs(name, key, what, param_only, tmp_path, capsys):
    out = tmp_path / "ms"
    extra = ["--convert-param-only"] if param_only else []
    assert run("pt2ms", "--megatron-path", str(fixture_dir(name)), "--ms-path", str(out), *extra) == 2
    err = capsys.readouterr().err
    assert "distrib_optim.pt: " + key in err and what in err, err
    assert f"{fixture_dir(name)}/iter_0000003/mp_rank_00/distrib_optim.pt" in err
    assert not out.exists()


def test_pt2ms_refuses_a_legacy_non_zip_file(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(fixture_dir("tiny-gqa-tp1pp2"), src, ignore=shutil.ignore_patterns("truth"))
    bad = src / "iter_0000012" / "mp_rank_00_001" / "distrib_optim.pt"
    torch.save({"a": torch.ones(2)}, bad, _use_new_zipfile_serialization=False)
    out = tmp_path / "ms"
    assert run("pt2ms", "--megatron-path", str(src), "--ms-path", str(out)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "legacy pre-1.6 (non-zip)" in err
    assert not out.exists()


def test_pt2ms_refuses_a_dtype_key_of_other_objects(tmp_path, capsys):
    """A (param dtype, grad dtype) key that is neither MindSpore's nor torch's dtypes (here: the integers
    16 and 32) is refused naming the file and the buffer's key."""
    src = tmp_path / "src"
    shutil.copytree(fixture_dir("tiny-gqa-tp1pp2"), src, ignore=shutil.ignore_patterns("truth"))
    path = src / "iter_0000012" / "mp_rank_00_000" / "distrib_optim.pt"
    from ckptmap.formats.torch_zip_reader import TorchZipFile
    from ckptmap.formats.torch_zip_writer import save_streaming
    with TorchZipFile(path) as zf:
        root = zf.root
        (k,) = root[0].keys()
        root[0] = {(16, 32): root[0][k]}
        save_streaming(root, tmp_path / "x.pt", lambda key: [zf.storage_bytes(key)], dialect="msadapter")
    shutil.move(tmp_path / "x.pt", path)
    out = tmp_path / "ms"
    assert run("pt2ms", "--megatron-path", str(src), "--ms-path", str(out)) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "(16, 32)" in err and "neither a pair of torch dtypes nor of MindSpore dtypes" in err
    assert not out.exists()
