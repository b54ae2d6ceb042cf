"""The MSAdapter-format fixtures (shared ``msadapter-r0.2.0`` and ``tests/fixtures/msadapter``),
read by the independent spec reader ``msadapter_spec_reader`` and compared bit for bit with their
``truth/``; byte-level format checks (``check_msadapter_file``) and the reader on stock torch files."""

import argparse
import collections
import hashlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import msadapter_spec_reader as R

HERE = Path(__file__).resolve().parent
REPO_FIXTURES = HERE / "fixtures" / "msadapter"
# CI clones the repo next to a copy of shared/; the shared fixture is never copied into the project.
SHARED_ROOT = Path(os.environ.get(
    "CKPTMAP_MSADAPTER_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "msadapter-r0.2.0"))
SHARED = "tiny-gqa-tp2pp1"
GOOD = ["tiny-gqa-tp1pp2", "tiny-gqa-tp1pp2vpp2", "tiny-gqa-tp2pp1-numel-tensor", "tiny-gqa-tp1pp1dp2-per-bucket"]
BAD = ["bad-int32-numel", "bad-float64-exp-avg-sq", "bad-dtype-key-strings"]
PROBE = "probe-dtypes-views"
DOUBLE = {"DoubleStorage": ("float64", "<f8")}  # only for the hand-made float64 fixture
STATES = ("param", "exp_avg", "exp_avg_sq")
BF16_F32 = (R._MS_DTYPE_CLASSES["BFloat"](), R._MS_DTYPE_CLASSES["Float"]())
BF16_F32[0].__setstate__((16,))
BF16_F32[1].__setstate__((32,))


def fixture_dir(name: str) -> Path:
    path = (SHARED_ROOT if name == SHARED else REPO_FIXTURES) / name
    if not path.is_dir():  # fail, never skip: a missing fixture must not turn the suite green
        pytest.fail(f"fixture {path} is missing; set CKPTMAP_MSADAPTER_FIXTURES to shared/fixtures/msadapter-r0.2.0")
    return path


def config(name: str) -> dict:
    return json.loads((fixture_dir(name) / "truth" / "config.json").read_text())


def _rank_cases():
    cases = []
    for name in [SHARED] + GOOD + BAD:
        root = (SHARED_ROOT if name == SHARED else REPO_FIXTURES) / name / "truth" / "config.json"
        if not root.is_file():
            cases.append(pytest.param(name, "missing", id=f"{name}-missing"))
            continue
        for md in json.loads(root.read_text())["ranks"]:
            cases.append(pytest.param(name, md, id=f"{name}/{md}"))
    return cases


RANK_CASES = _rank_cases()


def pt_files(name: str) -> list:
    return sorted(fixture_dir(name).glob("iter_*/mp_rank_*/*.pt"))


def chunks(rank: dict) -> dict:
    """Per model chunk: layout etc.  The shared fixture keeps them at rank level (one chunk)."""
    if "chunks" in rank:
        return rank["chunks"]
    return {"model": dict(gbuf_idx=0, pre_process=True, post_process=True, **{
        k: rank[k] for k in ("global_layers", "model_keys_in_file_order", "extra_state",
                             "param_local_to_global", "distrib_optim_layout")})}


def raw(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def assert_same(ours: R.SpecTensor, ref: torch.Tensor, where: str):
    assert isinstance(ours, R.SpecTensor), where
    assert ours.dtype == str(ref.dtype).removeprefix("torch."), where
    assert ours.shape == tuple(ref.shape), where
    assert ours.tobytes() == raw(ref), where


def plain(obj):
    """JSON-comparable form (tuples -> lists, OrderedDict -> dict)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


# -------------------------------------------------------------------------------------------------
# every rank of every fixture against truth/


@pytest.mark.parametrize("name,md", RANK_CASES)
def test_rank_matches_truth(name, md):
    fdir = fixture_dir(name)
    cfg = config(name)
    rank = cfg["ranks"][md]
    truth = load_file(str(fdir / "truth" / rank["truth_file"]))
    rdir = fdir / f"iter_{cfg['iteration']:07d}" / md
    used = set()

    # files are the ones truth/config.json describes
    for fn, meta in rank["files"].items():
        data = (rdir / fn).read_bytes()
        assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"], fn

    m = R.load(rdir / "model_optim_rng.pt")
    ch = chunks(rank)
    vpp = list(ch) != ["model"]
    expect_keys = rank.get("model_file_keys") or (
        ["args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler", "rng_state",
         "num_floating_point_operations_so_far"])
    assert type(m) is dict and list(m) == expect_keys

    # args: a Namespace with MindSpore params_dtype; rank-specific 'rank'
    args = m["args"]
    assert type(args) is argparse.Namespace
    a = dict(vars(args))
    assert a.pop("params_dtype") == BF16_F32[0]
    c = cfg["config"]
    assert a.pop("rank") == rank["tp_rank"] + c["tp"] * c["dp"] * rank["pp_rank"]
    expect_args = {k: v for k, v in cfg["args"].items() if k not in ("rank", "params_dtype")}
    assert a == expect_args and list(a) == list(expect_args)
    assert type(m["checkpoint_version"]) is float and m["checkpoint_version"] == 3.0
    assert m["iteration"] == cfg["iteration"] == args.iteration
    assert m["num_floating_point_operations_so_far"] == cfg["num_floating_point_operations_so_far"]
    assert plain(m["optimizer"]) == rank["optimizer"]
    assert m["opt_param_scheduler"] == rank["opt_param_scheduler"]

    # model chunks: keys in file order, Parameter-typed bf16 tensors, _extra_state None
    for key, chunk in ch.items():
        sd = m[key]
        assert type(sd) is collections.OrderedDict
        assert [k for k, _ in chunk["model_keys_in_file_order"]] == list(sd)
        for k, typ in chunk["model_keys_in_file_order"]:
            if typ == "builtins.NoneType":
                assert sd[k] is None and [k, "None"] in chunk["extra_state"]
            else:
                assert sd[k].type_name == typ and sd[k].is_parameter and sd[k].dialect == "msadapter"
                assert_same(sd[k], truth[f"{key}.{k}"], f"{key}.{k}")
                used.add(f"{key}.{k}")
        meta = sd._metadata
        assert type(meta) is collections.OrderedDict and next(iter(meta)) == ""
        assert all(v == {} for v in meta.values())
        for k in sd:
            assert k.rsplit(".", 1)[0] in meta, k
        assert list(chunk["param_local_to_global"]) == [k for k, t in chunk["model_keys_in_file_order"]
                                                        if t != "builtins.NoneType"]

    # RNG: MindSpore 16-byte generator states (seed, offset as little-endian int64)
    rs = m["rng_state"]
    assert type(rs) is list and len(rs) == 1
    rs = rs[0]
    assert list(rs) == ["random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state",
                        "rng_tracker_states"]
    seed = rank["rng_seed_used"]
    random.seed(seed)
    assert rs["random_rng_state"] == random.getstate()
    np_state = np.random.RandomState(seed).get_state()
    assert rs["np_rng_state"][0] == np_state[0] and rs["np_rng_state"][2:] == np_state[2:]
    assert np.array_equal(rs["np_rng_state"][1], np_state[1])
    for k in ("torch_rng_state", "cuda_rng_state"):
        assert_same(rs[k], truth[f"rng.{k}"], k)
        assert rs[k].tobytes() == struct.pack("<qq", seed, 0)
        used.add(f"rng.{k}")
    assert list(rs["rng_tracker_states"]) == ["data-parallel-rng", "model-parallel-rng", "expert-parallel-rng"]
    for k, t in rs["rng_tracker_states"].items():
        assert_same(t, truth[f"rng.rng_tracker_states.{k}"], k)
        used.add(f"rng.rng_tracker_states.{k}")
        if "rng_tracker_seeds" in rank:
            assert t.tobytes() == struct.pack("<qq", rank["rng_tracker_seeds"][k], 0)

    # distrib_optim.pt
    extra = DOUBLE if name == "bad-float64-exp-avg-sq" else None
    d = R.load(rdir / "distrib_optim.pt", extra_storage=extra)
    formats = {c["distrib_optim_layout"].get("format", "coalesced") for c in ch.values()}
    assert len(formats) == 1
    fmt = formats.pop()
    gbufs = [c["gbuf_idx"] for c in ch.values()]
    if fmt == "coalesced":
        assert list(d) == ["buckets_coalesced"] + gbufs and d["buckets_coalesced"] is True
    else:
        assert list(d) == ["per_bucket_numel", "per_bucket_numel_unpadded"] + gbufs
    for key, chunk in ch.items():
        lay = chunk["distrib_optim_layout"]
        g = chunk["gbuf_idx"]
        assert lay["gbuf_idx"] == g
        (dkey, world), = d[g].items()
        if name == "bad-dtype-key-strings":
            assert dkey == ("bfloat16", "float32") and all(type(x) is str for x in dkey)
        else:
            assert dkey == BF16_F32 and all(isinstance(x, R.MSDtype) for x in dkey)
        opt_prefix = f"{key}." if vpp else ""
        params = lay["params"]
        # reverse named_parameters order
        assert list(params) == list(reversed(chunk["param_local_to_global"]))
        if fmt == "coalesced":
            assert list(world) == ["param", "exp_avg", "exp_avg_sq", "numel_unpadded"]
            n = lay["numel_unpadded"]
            nu = world["numel_unpadded"]
            kind = lay.get("numel_unpadded_stored_as", "int")
            if kind == "int":
                assert type(nu) is int and nu == n
            else:
                dt, st = {"int64_tensor": ("int64", "LongStorage"), "int32_tensor": ("int32", "IntStorage")}[kind]
                assert isinstance(nu, R.SpecTensor) and nu.shape == () and nu.dtype == dt and nu.storage_type == st
                assert int(nu.array) == n
                assert_same(nu, truth[f"distopt.{g}.numel_unpadded"], "numel_unpadded")
                used.add(f"distopt.{g}.numel_unpadded")
            prev_end = 0
            for pname, p in params.items():  # core_r0.8.0: 64-element aligned starts, zero gaps
                assert p["start"] % 64 == 0 and p["start"] >= prev_end and p["start"] - prev_end < 64
                prev_end = p["end"]
            assert prev_end == n and lay["bucket_numel_padded"] % 128 == 0 and lay["bucket_numel_padded"] - n < 128
            for s in STATES:
                t = world[s]
                assert t.shape == (n,) and t.type_name == "mindspore.common.tensor.Tensor"
                assert_same(t, truth[f"distopt.{g}.{s}"], f"distopt.{g}.{s}")
                used.add(f"distopt.{g}.{s}")
                vals = t.array
                covered = np.zeros(n, bool)
                for pname, p in params.items():
                    ref = truth[f"opt.{s}.{opt_prefix}{pname}"]
                    assert list(ref.shape) == p["shape"]
                    piece = vals[p["start"]:p["end"]]
                    assert piece.tobytes() == raw(ref.to(torch.float64 if vals.dtype == np.float64 else ref.dtype)), pname
                    covered[p["start"]:p["end"]] = True
                    used.add(f"opt.{s}.{opt_prefix}{pname}")
                assert not vals[~covered].any(), "gaps must be zeros"
        else:
            assert list(world) == list(STATES)
            assert d["per_bucket_numel"][g] == {dkey: lay["per_bucket_numel"]}
            assert d["per_bucket_numel_unpadded"][g] == {dkey: lay["per_bucket_numel_unpadded"]}
            buckets = lay["buckets"]
            assert len(buckets) >= 2 and sum(b["end_padded"] != b["end_unpadded"] for b in buckets) >= 2
            dp = cfg["config"]["dp"]
            for b, nb, nu in zip(buckets, lay["per_bucket_numel"], lay["per_bucket_numel_unpadded"]):
                assert nb % dp == 0 and 0 <= nb - nu < dp and nb == b["end_padded"] - b["start"]
            for s in STATES:
                assert type(world[s]) is list and len(world[s]) == len(buckets)
                for i, t in enumerate(world[s]):
                    assert_same(t, truth[f"distopt.{g}.{s}.{i}"], f"distopt.{g}.{s}.{i}")
                    used.add(f"distopt.{g}.{s}.{i}")
                prev_end = 0
                for pname, p in params.items():
                    b = buckets[p["bucket"]]
                    assert b["start"] <= p["start"] < p["end"] <= b["end_unpadded"]
                    assert p["start"] == max(prev_end, b["start"])  # no per-param alignment in r0.6.0
                    prev_end = p["end"]
                    piece = world[s][p["bucket"]].array[p["start"] - b["start"]:p["end"] - b["start"]]
                    ref = truth[f"opt.{s}.{opt_prefix}{pname}"]
                    assert piece.tobytes() == raw(ref), pname
                    used.add(f"opt.{s}.{opt_prefix}{pname}")

        # every bf16 weight is its fp32 main parameter rounded (to nearest even) to bf16; in
        # tests/fixtures/msadapter the main parameters are bf16-exact, so the two are equal.  (The
        # shared fixture's main parameters are NOT bf16-exact, whatever its README says.)
        for pname in params:
            w = m[key][pname]
            main = truth[f"opt.param.{opt_prefix}{pname}"]
            assert w.tobytes() == raw(main.to(torch.bfloat16)), pname
            if name != SHARED:
                assert np.array_equal(w.numpy(), main.numpy()), pname

    assert used == set(truth), sorted(set(truth) ^ used)


@pytest.mark.parametrize("name", [SHARED] + GOOD + BAD)
def test_ranks_merge_to_full_truth(name):
    """Merging the ranks' truth with mcore's TP rules (SwiGLU fc1 [gate; up] per rank) and the
    local->global layer names reproduces truth/full.safetensors: the layout in config.json is right."""
    fdir = fixture_dir(name)
    cfg = config(name)
    tp = cfg["config"]["tp"]
    full = load_file(str(fdir / "truth" / "full.safetensors"))
    pieces = collections.defaultdict(dict)  # truth key -> {tp: tensor}
    for md, rank in cfg["ranks"].items():
        truth = load_file(str(fdir / "truth" / rank["truth_file"]))
        ch = chunks(rank)
        vpp = list(ch) != ["model"]
        for key, chunk in ch.items():
            for local, glob in chunk["param_local_to_global"].items():
                pieces[f"model.{glob}"][rank["tp_rank"]] = truth[f"{key}.{local}"]
                for s in STATES:
                    pieces[f"opt.{s}.{glob}"][rank["tp_rank"]] = truth[f"opt.{s}.{key + '.' if vpp else ''}{local}"]
    assert set(pieces) == set(full)
    for k, parts in pieces.items():
        parts = [parts[r] for r in range(tp)]
        if k.endswith("linear_fc1.weight"):
            gates, ups = zip(*(p.chunk(2, 0) for p in parts))
            merged = torch.cat(gates + ups, 0)
        elif k.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
            merged = torch.cat(parts, 0)
        elif k.endswith(("linear_proj.weight", "linear_fc2.weight")):
            merged = torch.cat(parts, 1)
        else:
            assert all(torch.equal(p, parts[0]) for p in parts), k
            merged = parts[0]
        assert merged.dtype == full[k].dtype and raw(merged) == raw(full[k]), k


@pytest.mark.parametrize("name", [SHARED] + GOOD + BAD)
def test_tracker_file(name):
    cfg = config(name)
    assert (fixture_dir(name) / "latest_checkpointed_iteration.txt").read_bytes() == str(cfg["iteration"]).encode()
    assert sorted(p.name for p in (fixture_dir(name)).glob("iter_*")) == [f"iter_{cfg['iteration']:07d}"]
    assert sorted(p.name for p in fixture_dir(name).glob("iter_*/*")) == sorted(cfg["ranks"])


def test_fixture_set_covers_the_brief():
    """PP > 1 folders, VPP chunks, the int64-tensor numel_unpadded, per-bucket r0.6.0 with >= 2 buckets."""
    pp = config("tiny-gqa-tp1pp2")
    assert sorted(pp["ranks"]) == ["mp_rank_00_000", "mp_rank_00_001"]
    vpp = config("tiny-gqa-tp1pp2vpp2")
    assert all(list(r["chunks"]) == ["model0", "model1"] for r in vpp["ranks"].values())
    assert config("tiny-gqa-tp2pp1-numel-tensor")["config"]["numel_unpadded"] == "int64_tensor"
    pb = config("tiny-gqa-tp1pp1dp2-per-bucket")
    assert pb["config"]["distrib_optim_format"] == "per_bucket" and pb["config"]["dp"] == 2
    for name in GOOD + BAD:  # small files
        assert all(p.stat().st_size < 64 * 1024 for p in pt_files(name)), name


# -------------------------------------------------------------------------------------------------
# the bad inputs


def test_bad_int32_numel():
    f = next(p for p in pt_files("bad-int32-numel") if p.name == "distrib_optim.pt")
    nu = R.load(f)[0][BF16_F32]["numel_unpadded"]
    assert nu.storage_type == "IntStorage" and nu.dtype == "int32" and nu.shape == ()
    problems = R.msadapter_file_problems(f)
    assert problems == ["IntStorage (int32): no MindSpore-side reader can read it"]
    R.check_msadapter_file(f, allow_int32=True)
    with pytest.raises(R.MSAdapterFormatError, match="IntStorage"):
        R.check_msadapter_file(f)


def test_bad_float64_is_hand_made_and_refused():
    cfg = config("bad-float64-exp-avg-sq")
    assert cfg["hand_made"] is True
    assert cfg["provenance"]["unpatched_writer_error"] == "KeyError: mindspore.float64"
    f = next(p for p in pt_files("bad-float64-exp-avg-sq") if p.name == "distrib_optim.pt")
    with pytest.raises(R.SpecReaderError, match="DoubleStorage"):
        R.load(f)
    world = R.load(f, extra_storage=DOUBLE)[0][BF16_F32]
    assert world["exp_avg_sq"].dtype == "float64" and world["exp_avg_sq"].storage_type == "DoubleStorage"
    assert world["exp_avg"].dtype == "float32"
    with pytest.raises(R.MSAdapterFormatError, match="DoubleStorage"):
        R.check_msadapter_file(f)


def test_bad_dtype_key_is_plain_strings():
    f = next(p for p in pt_files("bad-dtype-key-strings") if p.name == "distrib_optim.pt")
    d = R.load(f)
    assert list(d[0]) == [("bfloat16", "float32")]
    R.check_msadapter_file(f)  # the container and pickle are well-formed; the defect is semantic
    assert not any(g[0].startswith("mindspore._c_expression") for g in R.load_with_info(f)[1].globals)


# -------------------------------------------------------------------------------------------------
# the probe file: dtypes, views, 0-d, empty, Parameter, aliasing, dtype objects, BytesIO


def test_probe_matches_truth():
    fdir = fixture_dir(PROBE)
    cfg = config(PROBE)
    data = (fdir / "probe.pt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == cfg["file"]["sha256"]
    obj, info = R.load_with_info(data)
    truth = load_file(str(fdir / "truth" / "probe.safetensors"))
    for k, ref in truth.items():
        t = obj[k]
        assert_same(t, ref, k)
        # the stride is recorded as the shim reported it (views keep theirs); bytes are C order
        assert t.stride == cfg["shim_reported"][k]["stride"] and type(t.stride) is list
        assert t.storage_offset == 0 and t.storage_numel == t.numel
    assert obj["transposed_view"].stride == [1, 3] and obj["column_view"].stride == [3]
    assert obj["bfloat16_parameter"].is_parameter and not obj["float32"].is_parameter
    assert obj["alias_of_float32"] is obj["float32"]
    assert obj["int64_0d"].storage_numel == 1 and obj["float32_empty"].storage_numel == 0
    assert [d.name for d in obj["dtypes"]] == cfg["dtype_objects"]
    assert all(isinstance(d, R.MSDtype) for d in obj["dtypes"])
    te = obj["te_extra_state"]
    assert type(te) is io.BytesIO and R.load(te.getvalue()) is None
    R.check_msadapter_file(te.getvalue())
    R.check_msadapter_file(data, require_contiguous=False)
    problems = R.msadapter_file_problems(data)
    assert len(problems) == 2 and all("not C-contiguous" in p for p in problems)
    assert len({c.pid[2] for c in info.tensor_calls}) == len(truth)


# -------------------------------------------------------------------------------------------------
# byte-level format checks on every real file


def _real_files():
    out = [pytest.param(SHARED, i, id=f"{SHARED}-{i}") for i in range(4)]
    for name in GOOD + BAD:
        for p in sorted((REPO_FIXTURES / name).glob("iter_*/mp_rank_*/*.pt")):
            if name in ("bad-int32-numel", "bad-float64-exp-avg-sq") and p.name == "distrib_optim.pt":
                continue
            out.append(pytest.param(name, str(p.relative_to(REPO_FIXTURES / name)),
                                    id=f"{name}/{p.parent.name}/{p.stem}"))
    return out


@pytest.mark.parametrize("name,which", _real_files())
def test_check_msadapter_file_accepts_real_files(name, which):
    path = pt_files(name)[which] if isinstance(which, int) else fixture_dir(name) / which
    R.check_msadapter_file(path)
    data = path.read_bytes()
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = zf.namelist()
    # spelled out once more, directly from the spec
    assert names[:3] == ["archive/data.pkl", "archive/version", "archive/byteorder"]
    assert zf.read("archive/version") == b"3" and zf.read("archive/byteorder") == b"little"
    keys = [n.removeprefix("archive/data/") for n in names[3:]]
    assert keys == sorted(str(i) for i in range(len(keys)))
    assert not any(n.endswith((".format_version", ".storage_alignment", "serialization_id")) for n in names)
    assert all(i.compress_type == zipfile.ZIP_STORED and not i.extra for i in zf.infolist())
    assert data.startswith(b"PK\x03\x04") and struct.unpack_from("<H", data, 28)[0] == 0  # no local extra
    pkl = zf.read("archive/data.pkl")
    assert pkl[:2] == b"\x80\x02"
    assert b"ctorch\nBFloat16Storage" not in pkl and b"ctorch\nbfloat16" not in pkl
    if len(keys) > 10:
        assert keys.index("10") < keys.index("2")  # sorted as strings


def _rewrite(data: bytes, mutate) -> bytes:
    """Re-zip a file record by record with ``mutate(records) -> records`` (list of [ZipInfo, bytes])."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    recs = [[zipfile.ZipInfo(i.filename, date_time=i.date_time), zf.read(i)] for i in zf.infolist()]
    recs = mutate(recs)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info, payload in recs:
            out.writestr(info, payload)
    return buf.getvalue()


def _shared_or_repo_model_file() -> bytes:
    return next(p for p in pt_files("tiny-gqa-tp1pp2vpp2") if p.name == "model_optim_rng.pt").read_bytes()


def _identity(recs):
    return recs


def _set_extra(recs):
    recs[3][0].extra = b"\x00" * 20  # the kind of padding stock torch uses for 64-byte alignment
    return recs


def _deflate(recs):
    recs[0][0].compress_type = zipfile.ZIP_DEFLATED
    return recs


def _prefix(recs):
    for r in recs:
        r[0].filename = r[0].filename.replace("archive/", "model_optim_rng/", 1)
    return recs


def _numeric_order(recs):
    return recs[:3] + sorted(recs[3:], key=lambda r: int(r[0].filename.rsplit("/", 1)[1]))


def _version_newline(recs):
    recs[1][1] = b"3\n"
    return recs


def _stock_records(recs):
    return recs + [[zipfile.ZipInfo("archive/.format_version"), b"1"],
                   [zipfile.ZipInfo("archive/.data/serialization_id"), b"123"]]


def _no_byteorder(recs):
    return [r for r in recs if not r[0].filename.endswith("/byteorder")]


@pytest.mark.parametrize("mutate,expect", [
    (_identity, None),
    (_set_extra, "local extra field"),
    (_deflate, "compressed"),
    (_prefix, "not under archive/"),
    (_numeric_order, "not sorted as strings"),
    (_version_newline, "expected b'3'"),
    (_stock_records, "stock-only record"),
    (_no_byteorder, "first records are"),
], ids=["identity", "alignment", "deflate", "prefix", "order", "version", "stock-records", "byteorder"])
def test_check_msadapter_file_catches_container_mutations(mutate, expect):
    data = _rewrite(_shared_or_repo_model_file(), mutate)
    problems = R.msadapter_file_problems(data)
    if expect is None:
        assert problems == []
    else:
        assert any(expect in p for p in problems), problems


def test_check_msadapter_file_rejects_stock_torch(tmp_path):
    lin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    obj = {"w": lin.weight, "t": torch.arange(4, dtype=torch.float32), "dtype": torch.bfloat16,
           "sd": lin.state_dict()}
    path = tmp_path / "stock.pt"
    torch.save(obj, path)
    problems = "\n".join(R.msadapter_file_problems(path))
    for expect in ["not under archive/", "local extra field", "stock-only record .format_version",
                   "stock storage class global torch.BFloat16Storage", "stock torch global torch.bfloat16",
                   "stock _rebuild_parameter", "not wrapped in _rebuild_from_type_v2", "backward hooks",
                   "is a tuple, expected list"]:
        assert expect in problems, expect
    with pytest.raises(R.MSAdapterFormatError):
        R.check_msadapter_file(path)


# -------------------------------------------------------------------------------------------------
# the reader itself: stock torch files, refusals, no mindspore


def test_reader_reads_stock_torch_files(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 8
    tensors = collections.OrderedDict([
        ("f32", base), ("row", base[1]), ("t", base.t()), ("strided", base[::2, 1::3]),
        ("bf16", base.to(torch.bfloat16)), ("f16", base.half()), ("f64", base.double()),
        ("i64", torch.arange(-3, 3)), ("i32", torch.arange(5, dtype=torch.int32)),
        ("i16", torch.arange(5, dtype=torch.int16)), ("i8", torch.arange(-2, 3, dtype=torch.int8)),
        ("u8", torch.arange(250, 256, dtype=torch.uint8)), ("b", torch.tensor([True, False])),
        ("zero_d", torch.tensor(7)), ("empty", torch.zeros(0, 3)),
    ])
    param = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.bfloat16))
    obj = {"tensors": tensors, "param": param, "ns": argparse.Namespace(params_dtype=torch.bfloat16, x=1),
           "bytes": b"\x00\xff", "np": np.arange(3, dtype=np.uint32)}
    buf = io.BytesIO()
    torch.save(obj, buf)
    path = tmp_path / "stock_file.pt"
    torch.save(obj, path)
    for src in (buf.getvalue(), path):
        got, info = R.load_with_info(src)
        assert info.prefix == ("archive" if isinstance(src, bytes) else "stock_file")
        for k, ref in tensors.items():
            t = got["tensors"][k]
            assert t.dialect == "stock" and t.stride == ref.stride() and t.storage_offset == ref.storage_offset()
            assert_same(t, ref, k)
            assert torch.equal(t.to_torch(), ref), k
        assert got["tensors"]["row"].storage_key == got["tensors"]["f32"].storage_key  # shared storage
        assert got["param"].is_parameter and got["param"].type_name == "torch.nn.parameter.Parameter"
        assert_same(got["param"], param.detach(), "param")
        assert got["ns"].params_dtype == R.TorchDtype("bfloat16") and got["ns"].x == 1
        assert got["bytes"] == b"\x00\xff" and np.array_equal(got["np"], obj["np"])


def test_reader_refusals(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(R.SpecReaderError, match="not a zip"):
        R.load(legacy)

    def zip_with(pkl: bytes, records=()):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", pkl)
            z.writestr("archive/version", "3")
            z.writestr("archive/byteorder", "little")
            for n, b in records:
                z.writestr(n, b)
        return buf.getvalue()

    with pytest.raises(R.SpecReaderError, match="os.system"):
        R.load(zip_with(b"\x80\x02cos\nsystem\nq\x00."))
    # a made-up storage string in an otherwise MSAdapter-shaped pickle
    data = next(p for p in pt_files("tiny-gqa-tp1pp2vpp2") if p.name == "distrib_optim.pt").read_bytes()
    zf = zipfile.ZipFile(io.BytesIO(data))
    pkl = zf.read("archive/data.pkl").replace(b"\x0c\x00\x00\x00FloatStorage", b"\x0c\x00\x00\x00QuuxStorage_")
    assert pkl != zf.read("archive/data.pkl")
    with pytest.raises(R.SpecReaderError, match="QuuxStorage_"):
        R.load(zip_with(pkl, [(n, zf.read(n)) for n in zf.namelist()[3:]]))
    with pytest.raises(R.SpecReaderError, match="big"):
        R.load(_rewrite(data, lambda recs: [r if not r[0].filename.endswith("byteorder") else [r[0], b"big"]
                                            for r in recs]))


def test_reader_never_imports_mindspore():
    """Run the reader over every fixture in a process where mindspore, torch and ml_dtypes cannot be imported."""
    files = [str(p) for name in [SHARED] + GOOD + BAD for p in pt_files(name)]
    files.append(str(fixture_dir(PROBE) / "probe.pt"))
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in ('mindspore', 'torch', 'ml_dtypes'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(HERE)!r})
        import msadapter_spec_reader as R
        n = 0
        for f in {files!r}:
            extra = {{'DoubleStorage': ('float64', '<f8')}} if 'float64' in f and f.endswith('distrib_optim.pt') else None
            n += sum(1 for _ in R.walk_tensors(R.load(f, extra_storage=extra)))
        assert not any(m.split('.')[0] in ('mindspore', 'torch', 'ml_dtypes') for m in sys.modules), sorted(sys.modules)
        print(n)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    records = sum(sum(n.startswith("archive/data/") for n in zipfile.ZipFile(f).namelist()) for f in files)
    assert int(out.stdout.strip()) == records + 1  # the probe stores one tensor object under two keys


def test_ms_dtype_objects():
    f = next(p for p in pt_files(SHARED) if p.name == "distrib_optim.pt")
    (key,) = R.load(f)[0]
    assert [d.name for d in key] == ["bfloat16", "float32"] and repr(key[0]) == "mindspore.bfloat16"
    assert hash(key) == hash(BF16_F32) and key == BF16_F32
    with pytest.raises(R.SpecReaderError):
        R._MS_DTYPE_CLASSES["Float"]().__setstate__((32, 1))
