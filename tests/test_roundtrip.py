"""Megatron A -> pt2ms -> MindSpore B -> ms2pt -> Megatron C reproduces A byte for byte; and from the
MindSpore side, ms2pt -> pt2ms returns the MindSpore tensors unchanged."""

import filecmp
import os
import shutil

import mindspore as ms
import numpy as np
import pytest

from ckptmap.cli import main
from conftest import FIXTURE_NAMES, fixture_dir, pt2ms_into, refused_ms2pt


def rank_dirs(root):
    return sorted(p.relative_to(root) for p in (root / "iter_0000001").glob("mp_rank_*"))


def convert_and_back(fixture, tmp_path, *extra, fmt="ckpt", layout="v1"):
    b, c = tmp_path / "B", tmp_path / "C"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(b), "--format", fmt, "--layout", layout,
                 "--no-progress", *extra]) == 0
    assert main(["ms2pt", "--ms-path", str(b), "--megatron-path", str(c), "--no-progress", *extra]) == 0
    return b, c


CASES = [(name, fmt, layout) for name in FIXTURE_NAMES for fmt, layout in [("ckpt", "v1"), ("safetensors", "v2")]]
CASES += [("legacy_tp2pp2dp2", "safetensors", "v1"), ("mcore_tp2pp1dp2_buckets", "ckpt", "v2")]


@pytest.mark.parametrize("name, fmt, layout", CASES)
def test_full_round_trip_is_byte_identical(name, fmt, layout, tmp_path):
    a = fixture_dir(name)
    _, c = convert_and_back(a, tmp_path, fmt=fmt, layout=layout)
    assert rank_dirs(c) == rank_dirs(a)
    assert (c / "latest_checkpointed_iteration.txt").read_bytes() == (a / "latest_checkpointed_iteration.txt").read_bytes()
    for rank in rank_dirs(a):
        for f in ("distrib_optim.pt", "model_optim_rng.pt"):
            assert filecmp.cmp(a / rank / f, c / rank / f, shallow=False), f"{rank}/{f} differs"
    # C describes its own bucket layout, as a checkpoint saved under ckptmap.hooks.megatron does
    maps = sorted(p.name for p in (a / "param_map").iterdir())
    assert sorted(p.name for p in (c / "iter_0000001" / "param_map").iterdir()) == maps
    for name in maps:
        assert (c / "iter_0000001" / "param_map" / name).read_bytes() == (a / "param_map" / name).read_bytes()


@pytest.mark.parametrize("name", ["legacy_tp2pp2dp2", "legacy_tp1pp3vpp2dp1"])
def test_round_trip_planned_by_stage_in_processes_is_byte_identical(name, tmp_path, forks):
    """Both directions planned in one process per pipeline stage (issue 16; forced: by default from 1,024 ranks)."""
    a = fixture_dir(name)
    _, c = convert_and_back(a, tmp_path, "--planning-processes", "3")
    stages = [f"pipeline stage {p}" for p in range(1, 3 if "pp3" in name else 2)]
    assert forks == stages + stages   # pt2ms, then ms2pt
    assert rank_dirs(c) == rank_dirs(a)
    for rank in rank_dirs(a):
        for f in ("distrib_optim.pt", "model_optim_rng.pt"):
            assert filecmp.cmp(a / rank / f, c / rank / f, shallow=False), f"{rank}/{f} differs"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_param_only_round_trip_is_byte_identical(name, tmp_path):
    a = fixture_dir(name)
    _, c = convert_and_back(a, tmp_path, "--convert-param-only")
    for rank in rank_dirs(a):
        assert filecmp.cmp(a / rank / "model_optim_rng.pt", c / rank / "model_optim_rng.pt", shallow=False), rank
        assert not (c / rank / "distrib_optim.pt").exists()


def ms_tensors(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def test_from_mindspore_side(tmp_path):
    """MindSpore tensors saved by mindspore.save_checkpoint (as if training went on 4 more steps)
    -> ms2pt -> pt2ms -> the same tensors."""
    a = fixture_dir("legacy_tp2pp2dp2")
    b = tmp_path / "B"
    assert main(["pt2ms", "--megatron-path", str(a), "--ms-path", str(b), "--no-progress"]) == 0
    rng = np.random.default_rng(0)
    edited = {}
    for rank in sorted(b.glob("rank_*")):
        params = ms_tensors(rank / "network.ckpt")
        out = []
        for k, v in params.items():
            if v.dtype == np.float32 and v.ndim >= 1 and v.shape != (1,):
                v = (v + rng.standard_normal(v.shape).astype(np.float32) * 1e-3).astype(np.float32)
            if k == "step_num":
                v = np.array(5, dtype=np.int64)
            out.append({"name": k, "data": ms.Tensor(v)})
        ms.save_checkpoint(out, str(rank / "network.ckpt"))
        edited[rank.name] = {d["name"]: d["data"].asnumpy() for d in out}
    c, b2 = tmp_path / "C", tmp_path / "B2"
    assert main(["ms2pt", "--ms-path", str(b), "--megatron-path", str(c), "--no-progress"]) == 0
    assert (c / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert (c / "iter_0000005" / "mp_rank_01_001" / "distrib_optim.pt").is_file()
    assert main(["pt2ms", "--megatron-path", str(c), "--ms-path", str(b2), "--no-progress"]) == 0
    for rank, expected in edited.items():
        got = ms_tensors(b2 / rank / "network.ckpt")
        assert set(got) == set(expected)
        for k, v in expected.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), (rank, k)


refused = refused_ms2pt


@pytest.fixture
def converted(tmp_path):
    return pt2ms_into(tmp_path / "B", fixture_dir("legacy_tp1pp1dp1"))


def test_missing_pt_meta(converted, tmp_path, capsys):
    shutil.rmtree(converted / "pt_meta")
    refused(["ms2pt", "--ms-path", str(converted)], capsys, tmp_path / "C", "pt_meta", "--param-map-path")


def test_mindspore_file_missing_a_parameter(converted, tmp_path, capsys):
    path = converted / "rank_0" / "network.ckpt"
    params = ms.load_checkpoint(str(path))
    del params["exp_avg.language_model.encoder.layers.2.mlp.projection.weight"]
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], str(path))
    refused(["ms2pt", "--ms-path", str(converted)], capsys, tmp_path / "C", str(path),
            "exp_avg.language_model.encoder.layers.2.mlp.projection.weight")


def test_mindspore_file_with_wrong_shape(converted, tmp_path, capsys):
    path = converted / "rank_0" / "network.ckpt"
    params = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}
    params["language_model.encoder.layers.1.attention.qkv_proj.weight"] = np.zeros((3, 64), np.float32)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], str(path))
    refused(["ms2pt", "--ms-path", str(converted)], capsys, tmp_path / "C",
            "language_model.encoder.layers.1.attention.qkv_proj.weight", "[3, 64]", "[96, 64]")


def test_noop_that_does_not_fit(converted, tmp_path, capsys):
    refused(["ms2pt", "--ms-path", str(converted), "--noop", "7"], capsys, tmp_path / "C", "--noop")
    refused(["ms2pt", "--ms-path", str(converted), "--num-layers", "5", "--noop", "1", "2"], capsys,
            tmp_path / "C", "expects")


def test_noop_layers_round_trip(tmp_path):
    """MindSpeed layer 2 of 5 is a noop layer: Megatron's 4 layers become MindSpeed 0, 1, 3, 4 and
    come back to Megatron's compact numbering byte for byte."""
    a = fixture_dir("legacy_tp1pp1dp1")
    b, c = convert_and_back(a, tmp_path, "--num-layers", "5", "--noop", "2")
    names = ms.load_checkpoint(str(b / "rank_0" / "network.ckpt"))
    layers = {int(n.split(".")[3]) for n in names if n.startswith("language_model.encoder.layers.")}
    assert layers == {0, 1, 3, 4}
    w = names["language_model.encoder.layers.3.attention.qkv_proj.weight"].asnumpy()
    from safetensors.torch import load_file
    truth = load_file(str(a / "truth" / "tp0_pp0.safetensors"))
    want = truth["param.module.language_model.encoder.layers.2.self_attention.query_key_value.weight"].numpy()
    assert np.array_equal(w, want)
    for f in ("distrib_optim.pt", "model_optim_rng.pt"):
        assert filecmp.cmp(a / "iter_0000001/mp_rank_00" / f, c / "iter_0000001/mp_rank_00" / f, shallow=False)


def test_a_stages_files_are_written_from_its_first_ones_pickles(tmp_path):
    """ms2pt: the ranks of a stage read their pt_meta from its first one's tree; each file after the first
    is written from the first one's pickle (torch_zip_writer.save_kept): distrib_optim.pt's skeleton is one
    object, model_optim_rng.pt's has its own args.rank / local_rank bytes put in — and every file is still
    Megatron's, byte for byte."""
    from ckptmap.formats import torch_zip_writer

    a = fixture_dir("legacy_tp2pp2dp2")
    b, c = tmp_path / "B", tmp_path / "C"
    assert main(["pt2ms", "--megatron-path", str(a), "--ms-path", str(b), "--no-progress"]) == 0
    kept = []
    real = torch_zip_writer.save_kept
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_zip_writer, "save_kept", lambda k, path, *x, **kw: kept.append(os.path.basename(path)) or real(k, path, *x, **kw))
        assert main(["ms2pt", "--ms-path", str(b), "--megatron-path", str(c), "--no-progress", "--multiprocess-off"]) == 0
    assert kept == ["model_optim_rng.pt", "distrib_optim.pt"] * 2   # tp 1 of each of the 2 stages
    for rank in rank_dirs(a):
        for f in ("distrib_optim.pt", "model_optim_rng.pt"):
            assert filecmp.cmp(a / rank / f, c / rank / f, shallow=False), f"{rank}/{f} differs"
