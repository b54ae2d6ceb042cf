"""`ckptmap verify` Megatron vs MindSpore is an independent check: it shares no conversion code with
pt2ms, so a bug in the conversion (or a wrong rule) is not reproduced by the check.

Several tests inject a bug into ckptmap's own conversion code (monkeypatch) and convert with it:
a verify that re-ran the conversion plan (as before issue 9) calls the same patched code and calls
the result identical; the independent verify must not.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch

from ckptmap import verify as verify_mod
from ckptmap.cli import main
from ckptmap.mapping import buckets, ops
from ckptmap.mapping.rules import bundled_rules
from conftest import fixture_dir

LEGACY_RULES = bundled_rules()["megatron_legacy_gpt"]


def pt2ms(src, out, *extra):
    assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "--no-progress",
                 "--multiprocess-off", *extra]) == 0


def run_verify(capsys, *args):
    capsys.readouterr()
    code = main(["verify", *map(str, args)])
    return code, capsys.readouterr().out


def differing_keys(src, out, rules="auto"):
    """Every differing key of every file pair (the printed report shows the first 20 per pair)."""
    return {k for r in verify_mod.verify(src, out, str(rules)) for k, _ in r.differing}


def rewrite_ckpt(path, change):
    """Load a MindSpore file with MindSpore, let ``change`` edit the dict of numpy arrays, save it again."""
    params = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}
    change(params)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], str(path))


def swapped_rules(tmp_path, a, b):
    """The bundled legacy rules with the MindSpore sides of the rules for ``a`` and ``b`` swapped."""
    text = LEGACY_RULES.read_text()
    pa = f"=> language_model.encoder.layers.{{layer}}.{a}"
    pb = f"=> language_model.encoder.layers.{{layer}}.{b}"
    assert text.count(pa) == 1 and text.count(pb) == 1
    text = text.replace(pa, "=> @@").replace(pb, pa).replace("=> @@", pb)
    path = tmp_path / "wrong.rules"
    path.write_text(text)
    return path


# -------------------------------------------------------------------------------------------------
# Bugs in the conversion are not shared by verify


def test_wrong_rules_file_is_caught_with_the_bundled_rules(tmp_path, capsys):
    src = fixture_dir("legacy_tp1pp1dp1")
    wrong = swapped_rules(tmp_path, "input_norm.{p}", "post_attention_norm.{p}")
    out = tmp_path / "ms"
    pt2ms(src, out, "--rules", str(wrong))      # pt2ms happily converts with the wrong rules
    # the rules are trusted for names: given the wrong rules, verify expects the swap
    code, text = run_verify(capsys, src, out, "--rules", wrong)
    assert code == 0
    for rules in ("auto", "megatron_legacy_gpt"):
        code, text = run_verify(capsys, src, out, "--rules", rules)
        assert code == 1
        assert "weights + optimizer states (param_map: " + str(src / "param_map") + ")" in text
        bad = differing_keys(src, out, rules)
        for layer in range(4):
            for name in (f"language_model.encoder.layers.{layer}.input_norm.weight",
                         f"language_model.encoder.layers.{layer}.post_attention_norm.weight"):
                assert {name, f"exp_avg.{name}", f"exp_avg_sq.{name}"} <= bad
        assert all("norm" in k for k in bad)
        line = next(l for l in text.splitlines() if "differs: exp_avg.language_model.encoder.layers.0.input_norm" in l)
        assert "vs distrib_optim.pt buffer 0 bucket 0 exp_avg [" in line and "64 of 64 elements differ" in line


def test_misplaced_optimizer_state_in_the_conversion_is_caught(tmp_path, capsys, monkeypatch):
    """A conversion bug that reads two parameters' optimizer state from each other's place in
    distrib_optim.pt. The old verify computed its expected values with the same code: identical."""
    src = fixture_dir("mcore_tp2pp1dp2_buckets")
    a, b = "module.decoder.layers.0.mlp.linear_fc2.weight", "module.decoder.layers.3.mlp.linear_fc2.weight"
    real = buckets.buffer_from_param_map

    def buggy(*args, **kwargs):
        layout = real(*args, **kwargs)
        slots = {s.name: s for s in layout.slots}
        sa, sb = slots[a], slots[b]
        fixed = {a: buckets.ParamSlot(a, sa.dtype, sa.shape, sb.start, sb.end, sb.bucket),
                 b: buckets.ParamSlot(b, sb.dtype, sb.shape, sa.start, sa.end, sa.bucket)}
        return buckets.BufferLayout(layout.dtype, tuple(fixed.get(s.name, s) for s in layout.slots),
                                    layout.buckets, layout.origin)

    monkeypatch.setattr(buckets, "buffer_from_param_map", buggy)
    out = tmp_path / "ms"
    pt2ms(src, out, "--no-main-param-check")   # pt2ms's own check would refuse this bug; verify must catch it alone
    code, text = run_verify(capsys, src, out)
    assert code == 1
    names = [f"decoder.layers.{layer}.mlp.linear_fc2.weight" for layer in (0, 3)]
    assert differing_keys(src, out) == {prefix + n for n in names for prefix in ("", "exp_avg.", "exp_avg_sq.")}
    assert text.count("DIFFERENT  ") == 2   # both tp ranks
    # the independent rounding check alone sees the swapped main params too
    assert "main param does not round to the Megatron weight decoder.layers.0.mlp.linear_fc2.weight" in text


def test_wrong_bf16_cast_in_the_conversion_is_caught(tmp_path, capsys, monkeypatch):
    """A conversion bug in the bf16 -> fp32 cast (the bits read as float16). The old verify cast its
    expected values with the same function: identical."""
    src = fixture_dir("legacy_tp1pp1dp1")
    monkeypatch.setattr(ops, "bf16_to_f32", lambda bits: bits.view(np.float16).astype(np.float32))
    out = tmp_path / "ms"
    pt2ms(src, out, "--convert-param-only")
    code, text = run_verify(capsys, src, out)
    assert code == 1
    assert "(28 keys" in text and "compared: weights)" in text
    line = next(l for l in text.splitlines() if "differs: language_model.encoder.layers.0.mlp.mapping.weight" in l)
    assert "bf16 -> fp32 exact (bit check)" in line


def test_verify_loads_no_conversion_code(tmp_path):
    """verify across frameworks runs without the compiler, plan, executor, ops or bucket engine."""
    src = fixture_dir("legacy_tp2pp2dp2")
    out = tmp_path / "ms"
    pt2ms(src, out)
    script = (f"import sys; from ckptmap import verify\n"
              f"reports = verify.verify({str(src)!r}, {str(out)!r})\n"
              f"assert len(reports) == 4 and all(r.identical for r in reports), reports\n"
              f"print(sorted(m for m in sys.modules if m.startswith('ckptmap.')))")
    root = str(Path(verify_mod.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    loaded = done.stdout
    for module in ("compiler", "ms2pt", "plan", "ops", "buckets", "combine", "execute"):
        assert f"'ckptmap.mapping.{module}'" not in loaded and f"'ckptmap.{module}'" not in loaded, loaded
    assert "'ckptmap.mapping.layout'" in loaded and "'ckptmap.mapping.rules'" in loaded


# -------------------------------------------------------------------------------------------------
# What the MindSpore side holds


def test_swapped_optimizer_states_in_the_mindspore_file(tmp_path, capsys):
    src = fixture_dir("legacy_tp2pp2dp2")
    out = tmp_path / "ms"
    pt2ms(src, out)
    a = "exp_avg.language_model.encoder.layers.0.attention.out_proj.weight"
    b = "exp_avg.language_model.encoder.layers.1.attention.out_proj.weight"

    def swap(params):
        assert params[a].shape == params[b].shape
        params[a], params[b] = params[b], params[a]

    rewrite_ckpt(out / "rank_1" / "network.ckpt", swap)
    code, text = run_verify(capsys, src, out)
    assert code == 1
    assert differing_keys(src, out) == {a, b}
    assert "DIFFERENT  " + str(src / "iter_0000001" / "mp_rank_01_000") + "  <->  " + str(out / "rank_1") in text
    assert text.count("identical  ") == 3


def test_weights_only_files(tmp_path, capsys):
    src = fixture_dir("legacy_tp2pp2dp2")
    out = tmp_path / "ms"
    pt2ms(src, out, "--convert-param-only", "--format", "safetensors")
    code, text = run_verify(capsys, src, out)
    assert code == 0
    heads = [l for l in text.splitlines() if l.startswith("identical")]
    assert len(heads) == 4 and all(l.endswith("compared: weights)") for l in heads)
    assert "optimizer" not in text and "param_map" not in text
    assert "not compared: epoch_num" in text

    # a weights file must hold the exact upcast: an fp32 value bf16 cannot represent is a difference
    import safetensors.numpy
    path = out / "rank_4" / "network.safetensors"
    tensors = safetensors.numpy.load_file(str(path))
    name = "language_model.encoder.layers.2.attention.qkv_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][1, 3] = np.nextafter(tensors[name][1, 3], np.float32(np.inf))
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "ms"})
    code, text = run_verify(capsys, src, out)
    assert code == 1
    line = next(l for l in text.splitlines() if f"differs: {name}" in l)
    assert "bf16 -> fp32 exact (bit check): 1 of" in line and "first at [1, 3]" in line


def test_without_param_map_the_main_params_are_checked_by_rounding(tmp_path, capsys):
    fixture = fixture_dir("legacy_tp1pp1dp1")
    src = tmp_path / "megatron"
    shutil.copytree(fixture, src, ignore=shutil.ignore_patterns("param_map", "truth"))
    out = tmp_path / "ms"
    pt2ms(src, out)   # pt2ms derives the bucket layout and writes its param_map into pt_meta/

    code, text = run_verify(capsys, src, out)
    assert code == 0
    assert f"weights + optimizer states (param_map: {out / 'pt_meta'})" in text
    assert "was derived by ckptmap's pt2ms" in text

    for p in (out / "pt_meta").glob("param_map_*.json"):
        p.unlink()
    code, text = run_verify(capsys, src, out)
    assert code == 0
    assert "compared: weights + main-param rounding check)" in text
    assert "no usable param_map" in text
    assert "not compared: 54 optimizer state tensors (exp_avg.*, exp_avg_sq.*) (no param_map)" in text

    a = "language_model.encoder.layers.0.mlp.projection.weight"
    b = "language_model.encoder.layers.1.mlp.projection.weight"

    def swap(params):
        for prefix in ("", "exp_avg.", "exp_avg_sq."):
            params[prefix + a], params[prefix + b] = params[prefix + b], params[prefix + a]

    rewrite_ckpt(out / "rank_0" / "network.ckpt", swap)
    code, text = run_verify(capsys, src, out)
    assert code == 1
    assert differing_keys(src, out) == {a, b}
    assert "main param does not round to the Megatron weight" in text


def test_rule_ops_are_applied_by_verify(tmp_path, capsys):
    src = fixture_dir("legacy_tp1pp1dp1")
    text = LEGACY_RULES.read_text()
    dense = "=> language_model.encoder.layers.{layer}.attention.out_proj.weight\n   tp: split(dim=1)"
    fc1 = "=> language_model.encoder.layers.{layer}.mlp.mapping.{p}\n   tp: split(dim=0, halves=2 when swiglu)"
    assert dense in text and fc1 in text
    text = text.replace(dense, dense + "\n   ops: transpose(0, 1)")
    text = text.replace(fc1, fc1 + "\n   ops: chunk_interleave(0, 2)")
    rules = tmp_path / "ops.rules"
    rules.write_text(text)
    out = tmp_path / "ms"
    pt2ms(src, out, "--rules", str(rules))
    code, report = run_verify(capsys, src, out, "--rules", rules)
    assert code == 0
    assert "rule ops applied by verify before comparing: chunk_interleave(0, 2), transpose(0, 1)" in report
    # the bundled rules have no ops: the transposed and interleaved tensors differ from them
    code, report = run_verify(capsys, src, out)
    assert code == 1
    bad = differing_keys(src, out)
    assert "language_model.encoder.layers.0.attention.out_proj.weight" in bad
    assert "exp_avg.language_model.encoder.layers.3.mlp.mapping.weight" in bad
    assert all("out_proj" in k or "mapping" in k for k in bad)


# -------------------------------------------------------------------------------------------------
# Layouts and scalars


def test_v2_layout_and_all_dp_cp_copies(tmp_path, capsys):
    src = fixture_dir("legacy_tp2pp2dp2")
    v2 = tmp_path / "v2"
    pt2ms(src, v2, "--layout", "v2")
    code, text = run_verify(capsys, src, v2)
    assert code == 0, text
    assert "V2 layout" in text and str(v2 / "iter_0000001/mp_rank_01_001/model_optim_rng.ckpt") in text
    assert "4 of 4 file pairs identical" in text

    every = tmp_path / "all"
    pt2ms(src, every, "--generate-all-dp-cp")
    code, text = run_verify(capsys, src, every)
    assert code == 0
    assert "8 of 8 file pairs identical" in text
    # rank 6 = tp 0, dp 1, pp 1 (g = tp + TP*(dp + DP*pp)) holds mp_rank_00_001's values
    assert f"{src / 'iter_0000001/mp_rank_00_001'}  <->  {every / 'rank_6/network.ckpt'}" in text

    shutil.rmtree(every / "rank_4")
    (every / "rank_9").mkdir()
    shutil.copy(every / "rank_0" / "network.ckpt", every / "rank_9" / "network.ckpt")
    code, text = run_verify(capsys, src, every)
    assert code == 1
    assert "only in the first:  (MindSpore file for tp 0 pp 1: rank_4/*.ckpt|safetensors)" in text
    assert "only in the second: (file rank_9 (no rank 9 in TP2 PP2" in text


def test_scalars(tmp_path, capsys):
    src = fixture_dir("legacy_tp1pp1dp1")
    out = tmp_path / "ms"
    pt2ms(src, out)

    def change(params):
        params["learning_rate_group_1"] = np.array(0.5, dtype=np.float32)
        params["step_num"] = np.array(2, dtype=np.int64)

    rewrite_ckpt(out / "rank_0" / "network.ckpt", change)
    code, text = run_verify(capsys, src, out)
    assert code == 1
    assert differing_keys(src, out) == {"learning_rate_group_1", "step_num"}
    assert "differs: step_num: vs Megatron iteration: Megatron 1, MindSpore 2 (int64)" in text
    assert "differs: learning_rate_group_1: vs Megatron optimizer param_groups[1] lr:" in text
    for key in ("epoch_num", "lr_decay_style", "wd_incr_style"):
        assert f"not compared: {key} (no Megatron value of that name)" in text
    assert "not compared: weight_decay_group_0" not in text and "not compared: state_step" not in text


# -------------------------------------------------------------------------------------------------
# verify's own value relations, against torch


def test_round_to_bf16_matches_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(100000).astype(np.float32) * np.float32(3.0),
        np.array([0.0, -0.0, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-45, 1.00390625, 1.01171875],
                 dtype=np.float32),
        # exact ties: the rounding bit set, the rest zero
        ((rng.integers(0, 2 ** 15, 1000, dtype=np.uint32) << 16) | 0x8000).view(np.float32),
    ])
    values = values[~np.isnan(values)]
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(verify_mod._round_to_bf16(values), want)


@pytest.mark.parametrize("relation", ["exact", "rounds_to"])
def test_value_relations(relation):
    bits = np.array([0x3F80, 0xBF81, 0x0000, 0x8000, 0x7F80], dtype=np.uint16)  # 1, -1.0078125, 0, -0, inf
    f32 = (bits.astype(np.uint32) << 16).view(np.float32)
    assert verify_mod._compare_values(bits, "bfloat16", f32, "float32", relation) is None
    nudged = f32.copy()
    nudged[1] = np.nextafter(nudged[1], np.float32(0))   # not a bf16 value; still rounds to it
    problem = verify_mod._compare_values(bits, "bfloat16", nudged, "float32", relation)
    assert (problem is None) == (relation == "rounds_to")
    flipped = f32.copy()
    flipped[3] = 0.0                                     # -0 -> +0 is a different bit pattern
    assert "1 of 5 elements differ" in verify_mod._compare_values(bits, "bfloat16", flipped, "float32", relation)
