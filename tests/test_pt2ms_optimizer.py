"""pt2ms with the distributed optimizer on every real Megatron fixture: fp32 main params and Adam
moments equal truth/ (captured from the live optimizer) bit-exactly, read back through the real
mindspore.load_checkpoint — with the training run's param_map and with the layout derived from the
checkpoint alone."""

import json
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptmap.cli import main
from conftest import FIXTURE_NAMES, fixture_dir
from test_pt2ms_fixtures import expected_ms_name, load_ms

STATE_PREFIX = {"param": "", "exp_avg": "exp_avg.", "exp_avg_sq": "exp_avg_sq."}


def truth_states(fixture, tp, pp):
    """{(state, chunk, megatron name): fp32 tensor} from truth/ (param.<ddp name>, param.vpp1.<ddp name>, …)."""
    out = {}
    for key, t in load_file(str(fixture / "truth" / f"tp{tp}_pp{pp}.safetensors")).items():
        state, _, rest = key.partition(".")
        if state not in STATE_PREFIX:
            continue
        chunk = 0
        if rest.startswith("vpp"):
            head, _, rest = rest.partition(".")
            chunk = int(head[3:])
        assert rest.startswith("module.")
        out[(state, chunk, rest[len("module."):])] = t
    return out


def without_param_map(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(fixture_dir(name), dst, ignore=shutil.ignore_patterns("truth", "param_map"))
    return dst


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("with_param_map", [True, False], ids=["param_map", "derived"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_optimizer_state_bit_exact(name, with_param_map, fmt, tmp_path):
    check_optimizer_state(name, with_param_map, fmt, tmp_path)


@pytest.mark.parametrize("with_param_map", [True, False], ids=["param_map", "derived"])
@pytest.mark.parametrize("name", [n for n in FIXTURE_NAMES if "pp1" not in n])
def test_optimizer_state_bit_exact_planned_by_stage_in_processes(name, with_param_map, tmp_path):
    """Planning split over processes, each reading some pipeline stages (issue 16), converts the same
    values: forced here (it starts at 1,024 ranks by default), one process per stage."""
    check_optimizer_state(name, with_param_map, "ckpt", tmp_path, ["--planning-processes", "3"])


def check_optimizer_state(name, with_param_map, fmt, tmp_path, extra_argv=()):
    fixture = fixture_dir(name)
    cfg = json.loads((fixture / "truth" / "config.json").read_text())
    source = fixture if with_param_map else without_param_map(name, tmp_path)
    out = tmp_path / "ms"
    argv = ["pt2ms", "--megatron-path", str(source), "--ms-path", str(out), "--format", fmt, "--no-progress",
            *extra_argv]
    if with_param_map:
        argv += ["--param-map-path", str(fixture / "param_map")]
    assert main(argv) == 0
    TP, PP, DP = cfg["tp"], cfg["pp"], cfg["dp"]
    for tp in range(TP):
        for pp in range(PP):
            got = load_ms(out / f"rank_{pp * DP * TP + tp}" / f"network.{fmt}", fmt)
            truth = truth_states(fixture, tp, pp)
            expected = {STATE_PREFIX[s] + expected_ms_name(n, v, pp, cfg): t for (s, v, n), t in truth.items()}
            tensors = {k for k, v in got.items() if v.ndim > 1 or (v.ndim == 1 and v.shape != (1,))}
            assert tensors == set(expected)
            for key, t in expected.items():
                assert got[key].dtype == np.float32 and got[key].shape == tuple(t.shape), key
                assert np.array_equal(got[key].view(np.uint32), t.numpy().view(np.uint32)), key

            state = torch.load(source / f"iter_0000001/{rank_dir(tp, pp, PP)}/model_optim_rng.pt",
                               weights_only=False)
            groups = state["optimizer"]["optimizer"]["param_groups"]
            for i, g in enumerate(groups):
                assert got[f"learning_rate_group_{i}"] == np.float32(g["lr"])
                assert got[f"weight_decay_group_{i}"] == np.float32(g["weight_decay"])
                assert got[f"bias_correction_group_{i}"] == np.float32(g["bias_correction"])  # a flag: 1.0 / 0.0
                assert f"betas_group_{i}" not in got
            assert got["state_step"].shape == (1,) and got["state_step"][0] == groups[0]["step"]
            sched = state["opt_param_scheduler"]
            assert got["max_lr"].dtype == np.float64 and got["max_lr"] == sched["max_lr"]
            assert got["num_steps"].dtype == np.int32 and got["num_steps"] == sched["num_steps"]
            assert got["lr_decay_style"] == ["constant", "WSD", "linear", "cosine",
                                             "inverse-square-root"].index(sched["lr_decay_style"])
            assert got["wd_incr_style"] == ["constant", "linear", "cosine"].index(sched["wd_incr_style"])
            assert int(got["step_num"]) == cfg["iteration"]
    if not with_param_map:
        # the derived layout, written in param_map form, is exactly what the training run recorded
        for path in (fixture / "param_map").iterdir():
            if "_dp0" not in path.name:
                continue
            derived = out / "pt_meta" / path.name
            assert list(json.loads(derived.read_text()).items()) == list(json.loads(path.read_text()).items())


def rank_dir(tp, pp, PP):
    return f"mp_rank_{tp:02d}" if PP == 1 else f"mp_rank_{tp:02d}_{pp:03d}"


def test_dist_opt_content_selects_states(tmp_path):
    fixture = fixture_dir("legacy_tp1pp1dp1")
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--no-progress",
                 "--dist-opt-content", "exp_avg"]) == 0
    got = ms.load_checkpoint(str(out / "rank_0" / "network.ckpt"))
    names = [k for k in got if "layers.0.attention.qkv_proj.weight" in k]
    assert names == ["exp_avg.language_model.encoder.layers.0.attention.qkv_proj.weight"]


def test_dry_run_shows_bucket_ranges(tmp_path, capsys):
    fixture = fixture_dir("mcore_tp2pp1dp2_buckets")
    assert main(["plan", "pt2ms", "--megatron-path", str(fixture), "--ms-path", str(tmp_path / "o"),
                 "--dry-run", "--full"]) == 0
    text = capsys.readouterr().out
    # param_map: layers.2.pre_mlp_layernorm.bias is [10396, 10429) in bucket 1, which starts at 10396 (padded)
    row = next(l for l in text.splitlines() if l.lstrip().startswith("exp_avg.decoder.layers.2.pre_mlp_layernorm.bias "))
    assert "buffer 0 bucket 1 [0:33]" in row and "distrib_optim.pt" in row
    assert not (tmp_path / "o").exists()


def refused(argv, capsys, out, *words):
    assert main(argv + ["--ms-path", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    assert not out.exists()


def as_if_dp1(param_map_dir, out_dir):
    """The param_map files of ``param_map_dir`` as a run without bucket padding (dp 1) would have
    written them: every parameter right after the previous one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in list(param_map_dir.iterdir()):
        entries = json.loads(path.read_text())
        pos, fixed = 0, {}
        for key, (dtype, shape, start, end, bucket) in entries.items():
            fixed[key] = [dtype, shape, pos, pos + end - start, bucket]
            pos += end - start
        (out_dir / path.name).write_text(json.dumps(fixed))


def test_param_map_from_other_dp_is_refused(tmp_path, capsys):
    """A param_map written with dp 1 has no bucket padding: bucket 1 would start one element early."""
    fixture = fixture_dir("mcore_tp2pp1dp2_buckets")
    maps = tmp_path / "param_map"
    as_if_dp1(fixture / "param_map", maps)
    refused(["pt2ms", "--megatron-path", str(fixture), "--param-map-path", str(maps)], capsys, tmp_path / "o",
            "module.decoder.layers.2.pre_mlp_layernorm.bias", "expected the parameter at element 10396",
            "different run")


def test_param_map_of_other_model_is_refused(tmp_path, capsys):
    fixture = fixture_dir("legacy_tp1pp1dp1")
    maps = tmp_path / "param_map"
    shutil.copytree(fixture / "param_map", maps)
    path = maps / "param_map_buffer0_dp0tp0pp0vpp0.json"
    entries = json.loads(path.read_text())
    renamed = {k.replace("layers.3.mlp.dense_4h_to_h", "layers.3.mlp.fc2"): v for k, v in entries.items()}
    path.write_text(json.dumps(renamed))
    refused(["pt2ms", "--megatron-path", str(fixture), "--param-map-path", str(maps)], capsys, tmp_path / "o",
            "module.language_model.encoder.layers.3.mlp.dense_4h_to_h.weight", "different model")


def test_underivable_layout_asks_for_param_map(tmp_path, capsys):
    source = without_param_map("mcore_tp2pp1dp2_buckets", tmp_path)
    for rank in ("mp_rank_00", "mp_rank_01"):
        path = source / "iter_0000001" / rank / "model_optim_rng.pt"
        state = torch.load(path, weights_only=False)
        state["args"].overlap_grad_reduce = False   # then Megatron would have built one bucket
        torch.save(state, path)
    refused(["pt2ms", "--megatron-path", str(source)], capsys, tmp_path / "o",
            "A param_map is required", "[10396, 9966, 3796]", "--param-map-path")


def test_missing_distrib_optim(tmp_path, capsys):
    source = without_param_map("legacy_tp1pp1dp1", tmp_path)
    (source / "iter_0000001/mp_rank_00/distrib_optim.pt").unlink()
    refused(["pt2ms", "--megatron-path", str(source)], capsys, tmp_path / "o",
            "distrib_optim.pt is missing", "--convert-param-only")


def test_stale_param_map_next_to_the_checkpoint_falls_back_to_derivation(tmp_path, capsys):
    """<save>/param_map left by another run (here: as if dp 1, no padding) is not trusted blindly:
    it does not fit distrib_optim.pt, so the layout is derived, and pt_meta gets the derived maps."""
    name = "mcore_tp2pp1dp2_buckets"
    fixture = fixture_dir(name)
    source = tmp_path / name
    shutil.copytree(fixture, source, ignore=shutil.ignore_patterns("truth"))
    as_if_dp1(source / "param_map", source / "param_map")
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(source), "--ms-path", str(out), "--no-progress"]) == 0
    assert "bucket_layout derived" in capsys.readouterr().out
    for path in (fixture / "param_map").iterdir():   # the real layout, not the stale one
        got = json.loads((out / "pt_meta" / path.name).read_text())
        assert list(got.items()) == list(json.loads(path.read_text()).items())
    truth = truth_states(fixture, 0, 0)
    got = load_ms(out / "rank_0" / "network.ckpt", "ckpt")
    t = truth[("exp_avg", 0, "decoder.layers.2.pre_mlp_layernorm.bias")]
    assert np.array_equal(got["exp_avg.decoder.layers.2.pre_mlp_layernorm.bias"], t.numpy())
