"""Rules with ``parts:`` (one Megatron tensor <-> several MindSpore tensors), the config the rules resolve
with stored for the way back, and optimizer states named by the rules.

Truth is independent of ckptmap: the fused tensors are sliced here with numpy following Megatron's
documented layouts (megatron.core ``SelfAttention.get_query_key_value_tensors``: per TP shard, per query
group, [the group's heads' q rows; k rows; v rows]; ``MLP`` with ``gated_linear_unit``: per TP shard
``torch.chunk(fc1_out, 2)`` = [gate; up]), from the fixtures' truth/ (captured from the live training
processes) or the live objects of a real megatron-core 0.12.1 run; the MindSpore side is read with the
real ``mindspore.load_checkpoint``; the way back is compared byte for byte with Megatron's own files.
"""

import filecmp
import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptmap.cli import main
from ckptmap.errors import CkptmapError
from ckptmap.formats import torch_zip_reader
from ckptmap.mapping import ops as tensor_ops
from ckptmap.mapping.rules import load_rules, parse_rules
from ckptmap.verify import verify
from conftest import fixture_dir
from mcore_versions.fixtures import mcore_standard  # noqa: F401  (session fixture)

HF_RULES = Path(__file__).resolve().parents[1] / "ckptmap" / "rules" / "examples" / "megatron_core_gpt_hf.rules"
RUN = ["--no-progress", "--multiprocess-off"]

# Megatron name (TP-local, layer L) -> HF-style MindSpore name; written out here, not read from the rules
HF_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.layers.L.input_layernorm.weight": "model.layers.L.input_layernorm.weight",
    "decoder.layers.L.input_layernorm.bias": "model.layers.L.input_layernorm.bias",
    "decoder.layers.L.self_attention.linear_proj.weight": "model.layers.L.self_attn.o_proj.weight",
    "decoder.layers.L.self_attention.linear_proj.bias": "model.layers.L.self_attn.o_proj.bias",
    "decoder.layers.L.pre_mlp_layernorm.weight": "model.layers.L.post_attention_layernorm.weight",
    "decoder.layers.L.pre_mlp_layernorm.bias": "model.layers.L.post_attention_layernorm.bias",
    "decoder.layers.L.mlp.linear_fc2.weight": "model.layers.L.mlp.down_proj.weight",
    "decoder.layers.L.mlp.linear_fc2.bias": "model.layers.L.mlp.down_proj.bias",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "output_layer.weight": "lm_head.weight",
}


def split_fused(name: str, value: np.ndarray, cfg: dict, tp: int) -> dict:
    """{HF suffix: array} of a TP-local fused tensor, by Megatron's layout; {} for other tensors."""
    if ".linear_qkv." in name:
        groups = cfg["query_groups"] // tp
        hpg, kv = cfg["heads"] // cfg["query_groups"], cfg["kv_channels"]
        blocks = value.reshape(groups, (hpg + 2) * kv, *value.shape[1:])
        q, k, v = blocks[:, :hpg * kv], blocks[:, hpg * kv:(hpg + 1) * kv], blocks[:, (hpg + 1) * kv:]
        rest = value.shape[1:]
        return {"self_attn.q_proj": q.reshape(-1, *rest), "self_attn.k_proj": k.reshape(-1, *rest),
                "self_attn.v_proj": v.reshape(-1, *rest)}
    if ".linear_fc1." in name:
        gate, up = np.split(value, 2, axis=0)   # torch.chunk(x, 2, dim=-1) of the output features
        return {"mlp.gate_proj": gate, "mlp.up_proj": up}
    return {}


def expected(name: str, value: np.ndarray, cfg: dict, tp: int) -> dict:
    """{HF-style MindSpore name: array} of one Megatron tensor (layer numbers global = local: PP 1)."""
    parts = name.split(".")
    layer = parts[2] if parts[:2] == ["decoder", "layers"] else None
    generic = ".".join("L" if layer is not None and i == 2 else p for i, p in enumerate(parts))
    fused = split_fused(name, value, cfg, tp)
    if fused:
        suffix = parts[-1]
        return {f"model.layers.{layer}.{k}.{suffix}": v for k, v in fused.items()}
    return {HF_NAMES[generic].replace(".L.", f".{layer}."): value}


def load_ms(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def bf16(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


def megatron_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.glob("iter_*/*/*.pt"))


# ---------------------------------------------------------------------------------------------
# parsing and refusals (`ckptmap rules check`)

def test_hf_rules_parse_with_parts():
    rules = load_rules(HF_RULES)
    qkv = next(r for r in rules.params if "linear_qkv" in str(r.megatron))
    assert qkv.parts.names == ("q_proj", "k_proj", "v_proj")
    assert str(qkv.parts) == ("parts(groups=num_query_groups): q_proj = ((num_attention_heads / num_query_groups) * "
                              "kv_channels), k_proj = kv_channels, v_proj = kv_channels")
    fc1 = next(r for r in rules.params if "linear_fc1" in str(r.megatron))
    assert fc1.parts.names == ("gate_proj", "up_proj") and fc1.parts.groups is None
    assert main(["rules", "check", str(HF_RULES)]) == 0


HEAD = "rules t\nparam a.{layer}.qkv.weight\n   => b.{layer}.{part}.weight\n   tp: split(dim=0)\n"
REFUSED = [
    (HEAD + "   parts: q = 4\n", "t.rules:2:1", "lists one part"),
    (HEAD + "   parts: q = 4, q = 2\n", "t.rules:2:1", "part q is listed twice"),
    ("rules t\nparam a.qkv.weight\n   => b.weight\n   tp: split(dim=0)\n   parts: q = 4, k = 2\n", "t.rules:2:1",
     "must name each part with {part} exactly once"),
    ("rules t\nparam a.qkv.weight\n   => b.{part}.weight\n   tp: split(dim=0)\n", "t.rules:2:1",
     "the rule has no parts: clause"),
    (HEAD + "   parts: q = 4, k = 2\n   ops: transpose(0, 1)\n", "t.rules:2:1", "transpose(0, 1) move elements"),
    ("rules t\nparam a.{part: x|y}.weight\n   => b.{part}.weight\n   tp: split(dim=0)\n   parts: q = 4, k = 2\n",
     "t.rules:2:1", "binds {part}"),
    (HEAD + "   parts: q = 4, k = 2\n   shared_embedding\n", "t.rules:2:1", "shared_embedding cannot be split"),
    (HEAD + "   parts: q = 4, k = 2\n   parts: v = 1, w = 1\n", "t.rules:2:1", "two parts: clauses"),
    (HEAD + "   parts(groups=): q = 4, k = 2\n", "t.rules:5:17", "unexpected ')'"),
]


@pytest.mark.parametrize("text,where,why", REFUSED, ids=[r[2][:24] for r in REFUSED])
def test_misused_parts_are_refused_by_rules_check(text, where, why, tmp_path, capsys):
    path = tmp_path / "t.rules"
    path.write_text(text)
    with pytest.raises(CkptmapError) as e:
        load_rules(path)
    assert f"{tmp_path}/{where}" in str(e.value) and why in str(e.value), str(e.value)
    assert main(["rules", "check", str(path)]) == 2
    assert why in capsys.readouterr().err


def test_parts_resolve_to_megatron_rows_and_refuse_sizes_that_do_not_tile():
    rule = parse_rules("rules t\nparam a.qkv.weight\n  => b.{part}.weight\n  tp: split(dim=0, groups=g)\n"
                       "  parts(groups=g): q = h / g * kv, k = kv, v = kv\n", "t.rules").params[0]
    env = {"g": 4, "h": 8, "kv": 3, "tp": 2}   # per TP shard: 2 groups of [6 q rows; 3 k; 3 v]
    fused = np.arange(24 * 5).reshape(24, 5)
    got = {}
    for name, shape, ranges in tensor_ops.resolve_parts(rule.parts, fused.shape, env, 2, "here"):
        got[name] = np.concatenate([fused.reshape(-1)[s:s + n] for s, n in ranges]).reshape(shape)
    want = split_fused("x.linear_qkv.weight", fused, {"query_groups": 4, "heads": 8, "kv_channels": 3}, 2)
    assert {k: v.tolist() for k, v in got.items()} == {k.split(".")[1][0]: v.tolist() for k, v in want.items()}
    with pytest.raises(CkptmapError) as e:   # kv 4 would need 2 x 16 rows; the shard has 24
        tensor_ops.resolve_parts(rule.parts, fused.shape, dict(env, kv=4), 2, "t.rules:2:1 (a.qkv.weight)")
    msg = str(e.value)
    assert "t.rules:2:1 (a.qkv.weight)" in msg and "cover 32 rows" in msg and "[24, 5]" in msg and "fix" in msg
    with pytest.raises(CkptmapError, match=r"h / g.* is not a whole number|\(h / g\): 8 / 3"):
        tensor_ops.resolve_parts(rule.parts, fused.shape, dict(env, g=3), 1, "here")
    with pytest.raises(CkptmapError, match="uses 'kv', which is not known here"):
        tensor_ops.resolve_parts(rule.parts, fused.shape, {"g": 4, "h": 8, "tp": 2}, 2, "here")


# ---------------------------------------------------------------------------------------------
# the real Megatron-LM core_r0.6.0 fixture: GQA (4 heads, 2 groups: one per TP shard), SwiGLU, TP 2, DP 2

FIXTURE = "mcore_tp2pp1dp2_buckets"


def _fixture_cfg(fixture):
    c = json.loads((fixture / "truth" / "config.json").read_text())
    return {"query_groups": c["num_query_groups"], "heads": c["num_attention_heads"], "kv_channels": c["kv_channels"],
            "tp": c["tp"]}


def test_hf_rules_pt2ms_optimizer_values_and_ms2pt_byte_identical(tmp_path):
    fixture = fixture_dir(FIXTURE)
    cfg = _fixture_cfg(fixture)
    out, back = tmp_path / "ms", tmp_path / "back"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--rules", str(HF_RULES)] + RUN) == 0
    for tp in range(cfg["tp"]):
        truth = load_file(str(fixture / "truth" / f"tp{tp}_pp0.safetensors"))
        got = load_ms(out / f"rank_{tp}" / "network.ckpt")
        want = {}
        for key, t in truth.items():
            state, _, rest = key.partition(".")
            if state not in ("param", "exp_avg", "exp_avg_sq"):
                continue
            name = rest[len("module."):]
            prefix = "" if state == "param" else state + "."
            want.update({prefix + k: v for k, v in expected(name, t.numpy(), cfg, cfg["tp"]).items()})
        assert "model.layers.0.self_attn.k_proj.weight" in want and "exp_avg_sq.model.layers.3.mlp.up_proj.weight" in want
        tensors = {k: v for k, v in got.items() if k in want}
        assert sorted(tensors) == sorted(want)
        for k, v in want.items():   # fp32 main params and both moments, split like the weights
            assert tensors[k].dtype == np.float32 and np.array_equal(tensors[k], v), k
        assert not [k for k in got if ("linear_qkv" in k or "linear_fc1" in k)]
    # verify (its own numpy slicing of the parts) agrees, and tells gate from up
    assert main(["verify", str(fixture), str(out), "--rules", str(HF_RULES)]) == 0
    swapped = tmp_path / "swapped.rules"
    text = HF_RULES.read_text()
    fc1 = "   parts: gate_proj = ffn_hidden_size / tp,\n          up_proj = ffn_hidden_size / tp\n"
    assert text.count(fc1) == 1
    swapped.write_text(text.replace(fc1, "   parts: up_proj = ffn_hidden_size / tp, gate_proj = ffn_hidden_size / tp\n"))
    differing = {name for r in verify(fixture, out, rules=str(swapped)) for name, _ in r.differing}
    assert {"model.layers.0.mlp.gate_proj.weight", "exp_avg.model.layers.3.mlp.up_proj.weight"} <= differing
    assert differing == {n for n in differing if "gate_proj" in n or "up_proj" in n}
    meta = torch_zip_reader.read_objects(out / "pt_meta" / "args_tp00_pp000.pt")
    assert meta["rules_config"] == {"ffn_hidden_size": 66, "kv_channels": 8, "num_attention_heads": 4,
                                    "num_query_groups": 2, "tp": 2}
    assert main(["ms2pt", "--ms-path", str(out), "--megatron-path", str(back), "--rules", str(HF_RULES)] + RUN) == 0
    files = megatron_files(fixture)
    assert len(files) == 4 and megatron_files(back) == files
    for rel in files:
        assert filecmp.cmp(fixture / rel, back / rel, shallow=False), rel


def test_hf_rules_weights_only_are_the_bf16_weights_split(tmp_path):
    fixture = fixture_dir(FIXTURE)
    cfg = _fixture_cfg(fixture)
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--rules", str(HF_RULES),
                 "--convert-param-only"] + RUN) == 0
    for tp in range(cfg["tp"]):
        truth = load_file(str(fixture / "truth" / f"tp{tp}_pp0.safetensors"))
        want = {}
        for key, t in truth.items():
            if key.startswith("model."):
                want.update(expected(key[len("model."):], bf16(t), cfg, cfg["tp"]))
        got = load_ms(out / f"rank_{tp}" / "network.ckpt")
        assert sorted(k for k in got if k in want) == sorted(want)
        for k, v in want.items():
            assert np.array_equal(got[k], v), k


def test_reshape_with_config_values_converts_both_ways(tmp_path):
    """The issue's example: `ops: reshape(num_query_groups, -1)` — the way back resolves the same sizes
    from the config pt2ms stored in pt_meta (it used to resolve ops without any config and fail)."""
    fixture = fixture_dir(FIXTURE)
    core = (Path(__file__).resolve().parents[1] / "ckptmap" / "rules" / "megatron_core_gpt.rules").read_text()
    anchor = "   tp: split(dim=0, groups=num_query_groups)\n"
    assert core.count(anchor) == 1
    rules = tmp_path / "reshaped.rules"
    rules.write_text(core.replace(anchor, anchor + "   ops: reshape(num_query_groups, -1)\n"))
    out, back = tmp_path / "ms", tmp_path / "back"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--rules", str(rules)] + RUN) == 0
    got = load_ms(out / "rank_1" / "network.ckpt")
    truth = load_file(str(fixture / "truth" / "tp1_pp0.safetensors"))
    main_param = truth["param.module.decoder.layers.2.self_attention.linear_qkv.weight"].numpy()
    assert np.array_equal(got["decoder.layers.2.self_attention.linear_qkv.weight"], main_param.reshape(2, -1))
    assert main(["ms2pt", "--ms-path", str(out), "--megatron-path", str(back), "--rules", str(rules)] + RUN) == 0
    for rel in megatron_files(fixture):
        assert filecmp.cmp(fixture / rel, back / rel, shallow=False), rel


def test_optimizer_state_names_come_from_the_rules(tmp_path, capsys):
    fixture = fixture_dir(FIXTURE)
    # the bundled layouts' statements with other state names (and one Megatron does not have), inline
    layouts = (Path(__file__).resolve().parents[1] / "ckptmap" / "rules" / "common" / "megatron_layouts.rules").read_text()
    header = next(line for line in layouts.splitlines() if line.startswith("rules megatron_layouts"))
    own = (layouts.replace(header, "").replace("exp_avg    => exp_avg.{name}", "exp_avg    => adam_m.{name}")
           .replace("exp_avg_sq => exp_avg_sq.{name}", "exp_avg_sq => adam_v.{name}\n   momentum => mom.{name}"))
    assert "adam_m" in own and "mom.{name}" in own
    rules = tmp_path / "renamed.rules"
    rules.write_text(HF_RULES.read_text().replace("include megatron_layouts", own))
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(out), "--rules", str(rules)] + RUN) == 0
    got = load_ms(out / "rank_0" / "network.ckpt")
    truth = load_file(str(fixture / "truth" / "tp0_pp0.safetensors"))
    fused = truth["exp_avg.module.decoder.layers.1.mlp.linear_fc1.weight"].numpy()
    assert np.array_equal(got["adam_m.model.layers.1.mlp.up_proj.weight"], fused[fused.shape[0] // 2:])
    assert not [k for k in got if k.startswith("exp_avg")]
    # a state the rules name but Megatron's distrib_optim.pt does not hold: refused, naming the rules line
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(tmp_path / "x"), "--rules", str(rules),
                 "--dist-opt-content", "momentum"] + RUN) == 2
    err = capsys.readouterr().err
    assert f"{rules}:" in err and "'momentum' is not one Megatron's distrib_optim.pt holds" in err
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(tmp_path / "y"), "--rules", str(rules),
                 "--dist-opt-content", "exp_avg_sq", "nesterov"] + RUN) == 2
    assert "nesterov: the rules" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the real megatron-core 0.12.1: 2 query groups per TP shard (the per-group interleaving shows)

@pytest.mark.mcore_versions
@pytest.mark.slow
def test_hf_rules_on_megatron_core_0_12_with_two_groups_per_shard(tmp_path):
    from hf_gqa_case import CASE, gqa_run

    run_dir, truth = gqa_run()
    tp_size = CASE["tp"]
    cfg = {"query_groups": CASE["query_groups"], "heads": CASE["heads"],
           "kv_channels": CASE["hidden"] // CASE["heads"], "tp": tp_size}
    assert cfg["query_groups"] // tp_size == 2
    src, out, back = run_dir / "legacy", tmp_path / "ms", tmp_path / "back"
    assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "--rules", str(HF_RULES)] + RUN) == 0
    for tp in range(tp_size):
        live = truth["ranks"][(tp, 0, 0)]["chunks"][0]["live"]
        got = load_ms(out / f"rank_{tp}" / "network.ckpt")
        want = {}
        for ddp, states in live.items():
            name = ddp[len("module."):]
            for state in ("param", "exp_avg", "exp_avg_sq"):
                prefix = "" if state == "param" else state + "."
                want.update({prefix + k: v for k, v in
                             expected(name, states[state].numpy(), cfg, tp_size).items()})
        assert "exp_avg.model.layers.2.self_attn.v_proj.bias" in want
        assert sorted(k for k in got if k in want) == sorted(want)
        for k, v in want.items():
            assert np.array_equal(got[k], v), k
    assert main(["ms2pt", "--ms-path", str(out), "--megatron-path", str(back), "--rules", str(HF_RULES)] + RUN) == 0
    files = megatron_files(src)
    assert len(files) == 4 and megatron_files(back) == files
    for rel in files:
        assert filecmp.cmp(src / rel, back / rel, shallow=False), rel


@pytest.mark.mcore_versions
@pytest.mark.slow
def test_hf_rules_on_megatron_core_0_12_pipeline_interleaved_tied(tmp_path, mcore_standard):
    """The harness's `dense` case: TP 2 x PP 2 x VPP 2 x DP 2, tied embeddings across the pipeline
    (the last stage's output_layer is the shared copy), GQA, SwiGLU, biases, several buckets."""
    run = mcore_standard("0.12.1", "dense")
    c = run.case
    cfg = {"query_groups": c.query_groups, "heads": c.heads, "kv_channels": c.hidden // c.heads, "tp": c.tp}
    src, out, back = run.dir / "legacy", tmp_path / "ms", tmp_path / "back"
    assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "--rules", str(HF_RULES)] + RUN) == 0
    per_chunk = c.num_layers // (c.pp * c.vpp)
    for (tp, pp, _), rank in run.truth["ranks"].items():
        want = {}
        for ci, chunk in enumerate(rank["chunks"]):
            for ddp, states in chunk["live"].items():
                name = ddp[len("module."):]
                parts = name.split(".")
                if parts[:2] == ["decoder", "layers"]:   # Megatron's chunk-local layer -> global
                    parts[2] = str((ci * c.pp + pp) * per_chunk + int(parts[2]))
                for state in ("param", "exp_avg", "exp_avg_sq"):
                    prefix = "" if state == "param" else state + "."
                    want.update({prefix + k: v for k, v in
                                 expected(".".join(parts), states[state].numpy(), cfg, c.tp).items()})
        got = load_ms(out / f"rank_{tp + c.tp * c.dp * pp}" / "network.ckpt")
        assert sorted(k for k in got if k in want) == sorted(want)
        for k, v in want.items():
            assert np.array_equal(got[k], v), k
    assert "lm_head.weight" in got and "model.layers.3.mlp.gate_proj.bias" in got
    assert main(["ms2pt", "--ms-path", str(out), "--megatron-path", str(back), "--rules", str(HF_RULES)] + RUN) == 0
    files = megatron_files(src)
    assert len(files) == 8 and megatron_files(back) == files
    for rel in files:
        assert filecmp.cmp(src / rel, back / rel, shallow=False), rel
