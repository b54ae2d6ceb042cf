"""ckptmap verify: value-by-value comparison, within and across frameworks, and md5."""

import shutil

import mindspore as ms
import numpy as np
import torch

from ckptmap.cli import main
from conftest import fixture_dir


def test_megatron_dirs_identical_then_one_value_changed(tmp_path, capsys):
    a = fixture_dir("legacy_tp1pp1dp1")
    b = tmp_path / "copy"
    shutil.copytree(a, b)
    assert main(["verify", str(a), str(b)]) == 0
    path = b / "iter_0000001/mp_rank_00/model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    w = state["model"]["language_model"]["encoder"]["layers.1.mlp.dense_4h_to_h.weight"]
    w[3, 5] += 1
    state["args"].lr = 0.5
    torch.save(state, path)
    capsys.readouterr()
    assert main(["verify", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "differs: model/language_model/encoder/layers.1.mlp.dense_4h_to_h.weight: 1 of 6144 elements differ" in out
    assert "first at [3, 5]" in out
    assert "differs: args/lr:" in out and "0.5" in out
    assert "DIFFERENT" in out and "identical" in out  # distrib_optim.pt pair stays identical


def test_megatron_vs_mindspore(tmp_path, capsys):
    a = fixture_dir("legacy_tp2pp2dp2")
    b = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(a), "--ms-path", str(b), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["verify", str(a), str(b)]) == 0
    path = b / "rank_4" / "network.ckpt"
    params = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}
    params["exp_avg.language_model.encoder.layers.3.mlp.mapping.weight"][0, 2] = 7.0
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], str(path))
    capsys.readouterr()
    assert main(["verify", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "exp_avg.language_model.encoder.layers.3.mlp.mapping.weight" in l)
    assert "vs distrib_optim.pt buffer 0 bucket 0 exp_avg [" in line
    assert "1 of" in line and "first at [0, 2]" in line and "7.0" in line


def test_md5(tmp_path, capsys):
    a = fixture_dir("legacy_tp1pp1dp1") / "iter_0000001/mp_rank_00/distrib_optim.pt"
    b = tmp_path / "b.pt"
    shutil.copy(a, b)
    assert main(["verify", "--md5", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    import hashlib
    assert f"All files have the same md5sum value: {hashlib.md5(a.read_bytes()).hexdigest()}" in out
    b.write_bytes(b.read_bytes()[:-1] + b"x")
    assert main(["verify", "--md5", str(a), str(b)]) == 1


def test_megatron_vs_weights_only_mindspore(tmp_path, capsys):
    """Files written by --convert-param-only are recognised as such and compared weight by weight."""
    a = fixture_dir("legacy_tp1pp1dp1")
    b = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(a), "--ms-path", str(b), "--no-progress",
                 "--convert-param-only"]) == 0
    capsys.readouterr()
    assert main(["verify", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    # 27 weights (130752 values, exact bf16 -> fp32 upcasts) + step_num; epoch_num has no Megatron counterpart
    assert "(28 keys, 130753 values compared: weights)" in out
    assert "not compared: epoch_num" in out
