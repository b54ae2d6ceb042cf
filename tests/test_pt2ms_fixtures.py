"""pt2ms --convert-param-only on every real Megatron fixture, checked against the fixture's truth/
(captured from the live training processes) through the real mindspore.load_checkpoint."""

import json

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptmap.cli import main
from conftest import FIXTURE_NAMES, fixture_dir

# formats.md §3.2, written out independently of the bundled rules
LEGACY_RENAMES = [("self_attention.query_key_value", "attention.qkv_proj"),
                  ("self_attention.dense", "attention.out_proj"),
                  ("mlp.dense_h_to_4h", "mlp.mapping"), ("mlp.dense_4h_to_h", "mlp.projection")]


def expected_ms_name(name: str, chunk: int, pp: int, cfg: dict) -> str:
    L, PP, VPP = cfg["num_layers"], cfg["pp"], cfg["vpp"] or 1
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers") + 1
        local = int(parts[i])
        if VPP > 1:
            g = chunk * L // VPP + pp * L // (VPP * PP) + local
        else:
            g = pp * L // PP + local
        parts[i] = str(g)
    out = ".".join(parts)
    if name.startswith("language_model."):
        for a, b in LEGACY_RENAMES:
            out = out.replace(a, b)
    return out


def truth_weights(fixture, tp, pp):
    """{(chunk, megatron name): bf16 tensor} from truth/ (model.<name> or model{v}.<name>)."""
    raw = load_file(str(fixture / "truth" / f"tp{tp}_pp{pp}.safetensors"))
    out = {}
    for key, t in raw.items():
        head, _, name = key.partition(".")
        if head == "model":
            out[(0, name)] = t
        elif head.startswith("model") and head[5:].isdigit():
            out[(int(head[5:]), name)] = t
    return out


def load_ms(path, fmt):
    params = ms.load_checkpoint(str(path), format=fmt) if fmt == "safetensors" else ms.load_checkpoint(str(path))
    return {k: v.asnumpy() for k, v in params.items()}


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_weights_bit_exact(name, fmt, tmp_path):
    fixture = fixture_dir(name)
    cfg = json.loads((fixture / "truth" / "config.json").read_text())
    out = tmp_path / "ms"
    argv = ["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--convert-param-only",
            "--format", fmt, "--tp-size", str(cfg["tp"]), "--pp-size", str(cfg["pp"]),
            "--dp-size", str(cfg["dp"]), "--num-layers", str(cfg["num_layers"]), "--no-progress"]
    if cfg["vpp"]:
        argv += ["--vpp-size", str(cfg["vpp"])]
    if name.startswith("mcore"):
        argv += ["--rules", "megatron_core_gpt"]
    assert main(argv) == 0

    TP, PP, DP = cfg["tp"], cfg["pp"], cfg["dp"]
    expected_ranks = {pp * DP * TP + tp: (tp, pp) for tp in range(TP) for pp in range(PP)}
    assert sorted(p.name for p in out.iterdir()) == sorted([f"rank_{g}" for g in expected_ranks] + ["pt_meta"])
    for g, (tp, pp) in expected_ranks.items():
        got = load_ms(out / f"rank_{g}" / f"network.{fmt}", fmt)
        truth = truth_weights(fixture, tp, pp)
        expected = {expected_ms_name(n, v, pp, cfg): t for (v, n), t in truth.items()}
        assert set(got) == set(expected) | {"step_num", "epoch_num"}
        for ms_name, t in expected.items():
            value = got[ms_name]
            assert value.dtype == np.float32 and value.shape == tuple(t.shape), ms_name
            want = t.float().numpy()  # bf16 -> fp32 is exact
            assert np.array_equal(value.view(np.uint32), want.view(np.uint32)), ms_name
        assert int(got["step_num"]) == cfg["iteration"] and int(got["epoch_num"]) == 0
    metas = sorted(p.name for p in (out / "pt_meta").iterdir())
    assert [m for m in metas if m.startswith("args_")] == sorted(
        f"args_tp{tp:02d}_pp{pp:03d}.pt" for tp in range(TP) for pp in range(PP))
    assert sorted(m for m in metas if m.startswith("param_map")) == sorted(
        p.name for p in (fixture / "param_map").iterdir())


def test_fixture_layer_numbers_vpp(tmp_path):
    """legacy_tp1pp3vpp2dp1: stage p holds global layers 2p, 2p+1, 6+2p, 7+2p (fixtures README)."""
    fixture = fixture_dir("legacy_tp1pp3vpp2dp1")
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--convert-param-only",
                 "--no-progress"]) == 0
    for pp in range(3):
        names = ms.load_checkpoint(str(out / f"rank_{pp}" / "network.ckpt"))
        layers = {int(n.split(".")[3]) for n in names if ".layers." in n}
        assert layers == {2 * pp, 2 * pp + 1, 6 + 2 * pp, 7 + 2 * pp}


def test_generate_all_dp_cp_and_v2(tmp_path):
    fixture = fixture_dir("legacy_tp2pp2dp2")
    out = tmp_path / "all"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--convert-param-only",
                 "--dp-size", "2", "--cp-size", "2", "--generate-all-dp-cp", "--no-progress"]) == 0
    ranks = sorted(int(p.name[5:]) for p in out.iterdir() if p.name.startswith("rank_"))
    assert ranks == list(range(2 * 2 * 2 * 2))
    for g in ranks:  # g = tp + TP*(cp + CP*(dp + DP*pp)); every copy equals its (tp, pp) original
        tp, pp = g % 2, g // 8
        original = out / f"rank_{pp * 8 + tp}" / "network.ckpt"
        assert (out / f"rank_{g}" / "network.ckpt").read_bytes() == original.read_bytes()
    v2 = tmp_path / "v2"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(v2), "--convert-param-only",
                 "--layout", "v2", "--format", "safetensors", "--no-progress"]) == 0
    assert (v2 / "latest_checkpointed_iteration.txt").read_text() == "1"
    files = sorted(str(p.relative_to(v2)) for p in v2.rglob("model_optim_rng.*"))
    assert files == [f"iter_0000001/mp_rank_{t:02d}_{p:03d}/model_optim_rng.safetensors"
                     for t in range(2) for p in range(2)]
    got = load_ms(v2 / files[0], "safetensors")
    assert int(got["iteration"]) == 1 and float(got["checkpoint_version"]) == 2.0


def test_dtype_keep_writes_bf16(tmp_path):
    fixture = fixture_dir("legacy_tp1pp1dp1")
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--convert-param-only",
                 "--dtype", "keep", "--no-progress", "--multiprocess-off"]) == 0
    params = ms.load_checkpoint(str(out / "rank_0" / "network.ckpt"))
    truth = truth_weights(fixture, 0, 0)
    w = params["language_model.encoder.layers.0.attention.qkv_proj.weight"]
    assert w.dtype == ms.bfloat16
    want = truth[(0, "language_model.encoder.layers.0.self_attention.query_key_value.weight")]
    assert np.array_equal(w.float().asnumpy(), want.float().numpy())


def test_crc_trailer_checked_by_mindspore(tmp_path):
    fixture = fixture_dir("legacy_tp1pp1dp1")
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--convert-param-only",
                 "--crc", "--fsync", "--no-progress"]) == 0
    path = out / "rank_0" / "network.ckpt"
    assert path.read_bytes()[-17:-10] == b"crc_num"
    assert len(ms.load_checkpoint(str(path), crc_check=True)) == 27 + 2  # 27 weights + step_num, epoch_num
