"""The non-tensor keys of pt2ms's MindSpore files are the ones MindSpeed-Core-MS r0.1.0's own
``convert_pt2ckpt.py`` writes — same names, dtypes, shapes and values — and ms2pt reads them back
into Megatron's types.

The reference's file is rebuilt here from formats.md §3.3 alone: the values it computes from
``model_optim_rng.pt``, turned into MindSpore objects the way it does (``Tensor(v, float32)`` for
every number of a param group, a bool included; ``Parameter(int(v))`` for the scheduler's counts and
style indices, which MindSpore 2.10 stores as Int32) and written by ``mindspore.save_checkpoint``;
ckptmap's file is read with ``mindspore.load_checkpoint``. Nothing here calls ckptmap's own scalar code."""

import filecmp
import json
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch

from ckptmap.cli import main
from conftest import FIXTURE_NAMES, fixture_dir
from test_pt2ms_fixtures import expected_ms_name
from test_pt2ms_optimizer import STATE_PREFIX, rank_dir, truth_states

LR_DECAY_STYLES = ["constant", "WSD", "linear", "cosine", "inverse-square-root"]
WD_INCR_STYLES = ["constant", "linear", "cosine"]
SCHEDULER_FLOATS = ["max_lr", "min_lr", "start_wd", "end_wd"]
SCHEDULER_COUNTS = ["lr_warmup_steps", "num_steps", "lr_decay_steps", "wd_incr_steps"]


def reference_scalars(state, layout):
    """{key: MindSpore object} of the scalars convert_pt2ckpt.py writes for one rank (formats.md §3.3)."""
    it = state["iteration"]
    out = {"step_num": ms.Tensor(it, ms.int64), "epoch_num": ms.Tensor(0, ms.int64)}
    if layout == "v2":
        out["iteration"] = ms.Tensor(it, ms.int64)
        out["checkpoint_version"] = ms.Tensor(2.0, ms.float32)
    for i, group in enumerate(state["optimizer"]["optimizer"]["param_groups"]):
        for key, value in group.items():
            if key == "lr":
                out[f"learning_rate_group_{i}"] = ms.Tensor(value, ms.float32)
            elif key == "step":
                out.setdefault("state_step", ms.Tensor([float(value)], ms.float32))
            elif isinstance(value, (int, float)):   # a bool is an int: True -> 1.0
                out[f"{key}_group_{i}"] = ms.Tensor(value, ms.float32)
    sched = state["opt_param_scheduler"]
    for key in SCHEDULER_FLOATS:
        out[key] = ms.Tensor(sched[key], ms.float64)
    for key in SCHEDULER_COUNTS:
        out[key] = ms.Parameter(int(sched[key]), name=key)
    out["lr_decay_style"] = ms.Parameter(LR_DECAY_STYLES.index(sched["lr_decay_style"]), name="lr_decay_style")
    out["wd_incr_style"] = ms.Parameter(WD_INCR_STYLES.index(sched["wd_incr_style"]), name="wd_incr_style")
    return out


def table(params):
    """{key: (MindSpore dtype, shape)} of what mindspore.load_checkpoint returned."""
    return {k: (str(v.dtype), tuple(v.shape)) for k, v in params.items()}


def load(path, fmt):
    return ms.load_checkpoint(str(path), format=fmt) if fmt == "safetensors" else ms.load_checkpoint(str(path))


CASES = [(name, "ckpt", "v1") for name in FIXTURE_NAMES] + [("legacy_tp2pp2dp2", "safetensors", "v2"),
                                                             ("mcore_tp2pp1dp2_buckets", "ckpt", "v2")]


@pytest.mark.parametrize("name, fmt, layout", CASES)
def test_keys_dtypes_and_shapes_are_the_reference_converters(name, fmt, layout, tmp_path):
    fixture = fixture_dir(name)
    cfg = json.loads((fixture / "truth" / "config.json").read_text())
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--format", fmt,
                 "--layout", layout, "--no-progress"]) == 0
    TP, PP, DP = cfg["tp"], cfg["pp"], cfg["dp"]
    for tp in range(TP):
        for pp in range(PP):
            state = torch.load(fixture / "iter_0000001" / rank_dir(tp, pp, PP) / "model_optim_rng.pt",
                               weights_only=False)
            # every key the reference writes: the fp32 main params and moments, then the scalars
            ref = {STATE_PREFIX[s] + expected_ms_name(n, v, pp, cfg): ms.Tensor(t.numpy())
                   for (s, v, n), t in truth_states(fixture, tp, pp).items()}
            ref.update(reference_scalars(state, layout))
            ms.save_checkpoint([{"name": k, "data": v} for k, v in ref.items()], str(tmp_path / "reference.ckpt"))
            want = ms.load_checkpoint(str(tmp_path / "reference.ckpt"))

            path = (out / f"rank_{pp * DP * TP + tp}" / f"network.{fmt}" if layout == "v1" else
                    out / "iter_0000001" / rank_dir(tp, pp, PP) / f"model_optim_rng.{fmt}")
            got = load(path, fmt)
            scalars = {k for k, (_, shape) in table(want).items() if shape in ((), (1,))}
            assert {k: table(got)[k] for k in scalars if k in got} == {k: table(want)[k] for k in scalars}, path
            assert table(got) == table(want), path
            for key, value in want.items():
                assert got[key].asnumpy().tobytes() == value.asnumpy().tobytes(), (path, key)


def test_flags_are_written_as_numbers(tmp_path):
    fixture = fixture_dir("legacy_tp1pp1dp1")
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--no-progress"]) == 0
    got = ms.load_checkpoint(str(out / "rank_0" / "network.ckpt"))
    for key, value in {"bias_correction_group_0": 1.0, "is_expert_parallel_group_0": 0.0,
                       "is_decoupled_lr_group_1": 0.0}.items():
        assert (str(got[key].dtype), got[key].shape, got[key].asnumpy().item()) == ("Float32", (), value)
    assert "betas_group_0" not in got and "step_group_0" not in got
    assert {k: str(got[k].dtype) for k in ("num_steps", "lr_decay_style", "wd_incr_style")} == \
        dict.fromkeys(("num_steps", "lr_decay_style", "wd_incr_style"), "Int32")


def rewrite(path, edit=None, drop=(), extra=None):
    """Re-save a MindSpore file with mindspore.save_checkpoint: ``edit`` {key: new MindSpore object},
    ``drop`` keys left out, ``extra`` non-tensor entries appended."""
    params = ms.load_checkpoint(str(path))
    params.update(edit or {})
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items() if k not in drop], str(path),
                       append_dict=extra)


def megatron_state(c):
    return torch.load(c / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)


@pytest.fixture
def converted(tmp_path):
    b = tmp_path / "B"
    assert main(["pt2ms", "--megatron-path", str(fixture_dir("legacy_tp1pp1dp1")), "--ms-path", str(b),
                 "--no-progress"]) == 0
    return b


def test_edited_scalars_come_back_in_megatrons_types(converted, tmp_path):
    """MindSpore-side values (as if MindSpeed had changed them) reach Megatron's files: flags as bools,
    counts as ints, style indices as the style's name, floats as floats."""
    rewrite(converted / "rank_0" / "network.ckpt", {
        "bias_correction_group_0": ms.Tensor(0.0, ms.float32),
        "is_expert_parallel_group_1": ms.Tensor(1.0, ms.float32),
        "wd_mult_group_0": ms.Tensor(0.5, ms.float32),
        "state_step": ms.Tensor([3.0], ms.float32),
        "lr_warmup_steps": ms.Parameter(7, name="lr_warmup_steps"),
        "lr_decay_style": ms.Parameter(2, name="lr_decay_style"),
        "wd_incr_style": ms.Parameter(2, name="wd_incr_style"),
        "min_lr": ms.Tensor(2e-5, ms.float64),
    }, extra={"note": "a string entry is not a scalar"})
    c = tmp_path / "C"
    assert main(["ms2pt", "--ms-path", str(converted), "--megatron-path", str(c), "--no-progress"]) == 0
    state = megatron_state(c)
    g0, g1 = state["optimizer"]["optimizer"]["param_groups"]
    assert g0["bias_correction"] is False and g1["bias_correction"] is True
    assert g1["is_expert_parallel"] is True and g0["is_expert_parallel"] is False
    assert type(g0["wd_mult"]) is float and g0["wd_mult"] == 0.5 and g1["wd_mult"] == 0.0
    assert type(g0["step"]) is int and g0["step"] == g1["step"] == 3
    assert g0["betas"] == (0.9, 0.95)
    sched = state["opt_param_scheduler"]
    assert type(sched["lr_warmup_steps"]) is int and sched["lr_warmup_steps"] == 7
    assert sched["lr_decay_style"] == "linear" and sched["wd_incr_style"] == "cosine"
    assert sched["min_lr"] == 2e-5 and sched["num_steps"] == 4


def test_files_without_flags_and_with_int64_counts_read_back(converted, tmp_path):
    """ckptmap's earlier files (no flag keys, Int64 counts and styles) still come back byte for byte,
    and an Int64 count that changed is taken."""
    a = fixture_dir("legacy_tp1pp1dp1")
    path = converted / "rank_0" / "network.ckpt"
    params = ms.load_checkpoint(str(path))
    flags = [k for k in params if k.split("_group_")[0] in ("bias_correction", "is_expert_parallel", "is_decoupled_lr")]
    assert len(flags) == 6
    as_int64 = {k: ms.Tensor(params[k].asnumpy().astype(np.int64))
                for k in SCHEDULER_COUNTS + ["lr_decay_style", "wd_incr_style"]}
    rewrite(path, as_int64, drop=flags)
    c = tmp_path / "C"
    assert main(["ms2pt", "--ms-path", str(converted), "--megatron-path", str(c), "--no-progress"]) == 0
    for f in ("model_optim_rng.pt", "distrib_optim.pt"):
        assert filecmp.cmp(a / "iter_0000001/mp_rank_00" / f, c / "iter_0000001/mp_rank_00" / f, shallow=False), f
    rewrite(path, {"num_steps": ms.Tensor(12, ms.int64)})
    d = tmp_path / "D"
    assert main(["ms2pt", "--ms-path", str(converted), "--megatron-path", str(d), "--no-progress"]) == 0
    assert megatron_state(d)["opt_param_scheduler"]["num_steps"] == 12


def test_count_beyond_int32_is_kept_as_int64(tmp_path):
    """The reference's Parameter(int(v)) would wrap 3e9 to a negative Int32; ckptmap writes Int64 then,
    and the round trip stays byte-identical."""
    a = tmp_path / "A"
    shutil.copytree(fixture_dir("legacy_tp1pp1dp1"), a, ignore=shutil.ignore_patterns("truth"))
    path = a / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["opt_param_scheduler"].update(num_steps=3_000_000_000, lr_decay_steps=2 ** 31 - 1)
    torch.save(state, path)
    b, c = tmp_path / "B", tmp_path / "C"
    assert main(["pt2ms", "--megatron-path", str(a), "--ms-path", str(b), "--no-progress"]) == 0
    got = ms.load_checkpoint(str(b / "rank_0" / "network.ckpt"))
    assert (str(got["num_steps"].dtype), got["num_steps"].asnumpy().item()) == ("Int64", 3_000_000_000)
    assert (str(got["lr_decay_steps"].dtype), got["lr_decay_steps"].asnumpy().item()) == ("Int32", 2 ** 31 - 1)
    assert main(["ms2pt", "--ms-path", str(b), "--megatron-path", str(c), "--no-progress"]) == 0
    for f in ("model_optim_rng.pt", "distrib_optim.pt"):
        assert filecmp.cmp(path.parent / f, c / "iter_0000001" / "mp_rank_00" / f, shallow=False), f


@pytest.mark.parametrize("key, value, words", [
    ("lr_decay_style", ms.Parameter(9, name="x"), ["lr_decay_style is 9", "3 = cosine", "4 = inverse-square-root"]),
    ("wd_incr_style", ms.Parameter(-1, name="x"), ["wd_incr_style is -1", "0 = constant"]),
    ("bias_correction_group_1", ms.Tensor(0.5, ms.float32), ["bias_correction_group_1 is 0.5", "flag"]),
    ("state_step", ms.Tensor([1.5], ms.float32), ["state_step is 1.5", "whole number"]),
])
def test_values_megatron_cannot_hold_are_refused(converted, tmp_path, capsys, key, value, words):
    path = converted / "rank_0" / "network.ckpt"
    rewrite(path, {key: value})
    c = tmp_path / "C"
    assert main(["ms2pt", "--ms-path", str(converted), "--megatron-path", str(c), "--no-progress"]) == 2
    err = capsys.readouterr().err
    for w in [str(path)] + words:
        assert w in err, err
    assert not c.exists()
