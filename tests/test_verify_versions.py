"""ckptmap verify on pt2ms outputs of real megatron-core 0.8.0 / 0.12.1 / 0.16.1 legacy checkpoints
(coalesced distrib_optim.pt with 64-element gaps; MoE EP 2: mp_rank_TT_EEE folders, a
ChainedOptimizer's [dense, expert] lists, dense state only in expert rank 0's folder): every file
pair identical with the optimizer states compared (from the training run's param_map, or pt2ms's
pt_meta), and a one-element change in an Adam moment of a MindSpore file named with its key. The
checkpoints are the hook runs of test_hooks_mcore_versions (cached; no megatron run of their own)."""
import shutil

import mindspore as ms
import numpy as np
import pytest

from ckptmap import verify
from ckptmap.cli import main
from test_hooks_mcore_versions import IDS, ITER, KEYS, hooked  # noqa: F401  (module fixture)
from test_versions_legacy import ms_name, ms_rank

pytestmark = [pytest.mark.mcore_versions, pytest.mark.slow]


def _pt2ms(src, out, *extra):
    assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "--no-progress", *extra]) == 0


def _assert_identical(reports, case, map_dir):
    ranks = case.tp * case.pp * case.ep
    assert len(reports) == ranks and all(r.identical for r in reports), verify.report_lines(reports)[1]
    for r in reports:
        assert r.what == f"{verify.WEIGHTS_AND_STATES} (param_map: {map_dir})", r.what
        assert r.values > 10000 and not any("optimizer state" in k for k, _ in r.not_compared)
        # param-group scalars compared too (MoE: the ChainedOptimizer's groups numbered on)
        assert not any("_group_" in k for k, _ in r.not_compared), r.not_compared


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_verify_pt2ms_output_is_identical(hooked, key, tmp_path):
    version, name = key
    case, save, _ = hooked(version)[name]
    _pt2ms(save, tmp_path / "ms")
    # the training run's param_map (iter_*/param_map, written by the hook)
    _assert_identical(verify.verify(save, tmp_path / "ms"), case, save / ITER / "param_map")
    # without it: the param_map pt2ms derived into pt_meta
    bare = tmp_path / "bare"
    shutil.copytree(save, bare, ignore=shutil.ignore_patterns("param_map"))
    _assert_identical(verify.verify(bare, tmp_path / "ms"), case, tmp_path / "ms" / "pt_meta")


@pytest.mark.parametrize("key", [("0.16.1", "moe"), ("0.8.0", "dense")], ids=["0.16.1-moe", "0.8.0-dense"])
def test_verify_v2_safetensors(hooked, key, tmp_path):
    version, name = key
    case, save, _ = hooked(version)[name]
    _pt2ms(save, tmp_path / "ms", "--layout", "v2", "--format", "safetensors")
    _assert_identical(verify.verify(save, tmp_path / "ms"), case, save / ITER / "param_map")


@pytest.mark.parametrize("key", [(v, "moe") for v in ("0.8.0", "0.12.1", "0.16.1")] + [("0.12.1", "dense")],
                         ids=["0.8.0-moe", "0.12.1-moe", "0.16.1-moe", "0.12.1-dense"])
def test_verify_names_a_changed_moment(hooked, key, tmp_path):
    """One element of exp_avg_sq changed in the MindSpore file: of an expert on expert rank 1 (state
    from that rank's distrib_optim.pt), and of a dense parameter on expert rank 1 (state from expert
    rank 0's file); dense case: a parameter of pipeline rank 1, chunk 1."""
    version, name = key
    case, save, truth = hooked(version)[name]
    out = tmp_path / "ms"
    _pt2ms(save, out)
    if name == "moe":
        rank_key = (0, 0, 1)
        ddps = [next(n for n in truth["ranks"][rank_key]["chunks"][0]["live"] if "local_experts.1" in n),
                "module.decoder.layers.1.self_attention.linear_qkv.weight"]
        chunk = 0
    else:
        rank_key, chunk = (1, 1, 0), 1
        ddps = ["module.decoder.layers.0.mlp.linear_fc2.weight"]
    tp, pp, ep = rank_key
    path = out / f"rank_{ms_rank(case, tp, pp, ep)}" / "network.ckpt"
    params = ms.load_checkpoint(str(path))
    changed = []
    for i, ddp in enumerate(ddps):
        k = "exp_avg_sq." + ms_name(case, pp, chunk, ep, ddp)
        a = params[k].asnumpy().copy()
        a.reshape(-1)[7 + i] += np.float32(1e-3) + a.reshape(-1)[7 + i] * np.float32(0.5)
        params[k] = ms.Parameter(ms.Tensor(a), name=k)
        changed.append(k)
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], str(path))
    reports = verify.verify(save, out)
    bad = [r for r in reports if not r.identical]
    assert len(bad) == 1 and bad[0].right == str(path), verify.report_lines(reports)[1]
    assert sorted(k for k, _ in bad[0].differing) == sorted(changed), bad[0].differing
    for k, text in bad[0].differing:
        assert "distrib_optim.pt" in text and "exp_avg_sq" in text and "1 of " in text, text
        if name == "moe" and "local_experts" not in k:   # a dense parameter's state on expert rank 1
            assert "mp_rank_00_000/distrib_optim.pt (expert rank 0's)" in text, text
    assert not bad[0].only_left and not bad[0].only_right
