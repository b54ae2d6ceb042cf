"""The rules' ``torch_dist`` block: the bundled one against the keys real megatron-core saves, and every
block the grammar accepts either works or is refused by ``rules check`` with its file:line:col."""

import pytest

from ckptmap.cli import main
from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_dist as M
from ckptmap.formats import torch_dist as td
from ckptmap.mapping.rules import bundled_rules, load_rules, parse_rules

GOOD = '''rules t
torch_dist megatron {
   stacked "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.{rest}" => "decoder.layers.mlp.experts.experts.{rest}"
   stacked "decoder.layers.{layer}.{rest}" => "decoder.layers.{rest}"
   layer_names local { "input_layernorm." => "self_attention.linear_qkv.layer_norm_" }
   layer_names transformer_engine { }
   dropped_extra_state "output_layer._extra_state"
   rank_object rng_state => "rng_state" over_dp for 0.15 - 0.16
   dist_only common: "content_metadata"
   chained: "chained_{optimizer}."
   sharding fully_reshardable for 0.15 - 0.16 "0.15+" {
      space: model
      param_groups: common
      tensors: "optimizer.state.{state: param|exp_avg|exp_avg_sq}.{name}"
   }
   sharding dp_reshardable for 0.15 {
      space: bucket
      tensors: "optimizer.distributed.dp_group_idx_{group}.gbuf_idx_{gbuf}.dtype_{dtypes}.bucket_idx_{bucket}.{state: param|exp_avg|exp_avg_sq}"
      objects: "optimizer.distributed.dp_group_idx_{group}.{what: optimizer|per_bucket_numel|per_bucket_numel_unpadded}"
   }
   unsupported fsdp_dtensor "Megatron FSDP"
}
'''


def _bad(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


def test_a_minimal_block_parses_and_spells_keys():
    lay = parse_rules(GOOD, "t.rules").torch_dist_layout()
    st = lay.sharding("dp_reshardable")
    key = lay.chained_prefix(1) + st.tensor_key(group=3, gbuf=0, dtypes="(torch.bfloat16, torch.float32)", bucket=2,
                                                 state="exp_avg")
    assert key == ("chained_1.optimizer.distributed.dp_group_idx_3.gbuf_idx_0.dtype_(torch.bfloat16, torch.float32)."
                   "bucket_idx_2.exp_avg")
    assert lay.split_chained(key) == (1, key[len("chained_1."):])
    assert st.tensors.match(key[len("chained_1."):]) == {"group": 3, "gbuf": 0, "dtypes": "(torch.bfloat16, torch.float32)",
                                                         "bucket": 2, "state": "exp_avg"}
    assert lay.sharded_item("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight", None) == \
        ("decoder.layers.mlp.experts.experts.linear_fc1.weight", (3, 5))
    assert lay.sharded_item("decoder.layers.2.input_layernorm.weight", "local") == \
        ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (2,))
    assert lay.item_name("decoder.layers.self_attention.linear_qkv.layer_norm_weight", {"layer": 2}, "local") == \
        "decoder.layers.2.input_layernorm.weight"
    assert lay.item_name("decoder.layers.self_attention.linear_qkv.layer_norm_weight", {"layer": 2}, None) == \
        "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"
    assert lay.rank_objects_over_dp("0.16.1") == {"rng_state"} == lay.rank_objects_over_dp("0.15")
    assert lay.rank_objects_over_dp("0.14.0") == set() == lay.rank_objects_over_dp("0.12")
    assert lay.sharding("dp_reshardable").covers("0.15.2") and not lay.sharding("dp_reshardable").covers("0.16")
    with pytest.raises(CkptmapError, match="transformer_impl 'fancy'.*layer_names fancy"):
        lay.sharded_item("decoder.layers.2.input_layernorm.weight", "fancy")


@pytest.mark.parametrize("old,new,words", [
    ('"decoder.layers.{layer}.{rest}" =>', '"decoder.layers.{layr}.{rest}" =>', "unknown placeholder {layr}"),
    ('=> "decoder.layers.{rest}"', '=> "decoder.{rest}.layers"', "must be literal text followed by {rest}"),
    ('"decoder.layers.{layer}.{rest}" =>', '"decoder.layers.{rest}" =>', "must name the stacked axes"),
    ('"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.{rest}"',
     '"decoder.layers.{expert}.mlp.experts.local_experts.{layer}.{rest}"', "name {layer} first"),
    ('   stacked "decoder.layers.{layer}.mlp', '   stacked "decoder.layers.{layer}.{rest}" => "decoder.layers.{rest}"\n'
     '   stacked "decoder.layers.{layer}.mlp', "is never used"),
    ('"chained_{optimizer}."', '"chained_{group}."', "needs `chained:"),
    ("over_dp for 0.15 - 0.16", "over_dp for 0.16 - 0.15", "version range 0.16 - 0.15 is empty"),
    ("over_dp for 0.15 - 0.16", "over_dp for dp_reshardable", "expected"),
    ("sharding dp_reshardable for 0.15 {", "sharding dp_reshardable {", "expected"),
    ("sharding fully_reshardable for 0.15 - 0.16", "sharding fully_reshardable for 0.16 - 0.15", "is empty"),
    ('rank_object rng_state => "rng_state"', 'rank_object rng_state => "rng"', "keeps per-rank state at"),
    ("dist_only common:", "dist_only model:", "dist_only model"),
    ("      space: model\n", "      space: tensor\n", "space tensor is unknown"),
    ("      space: model\n", "", "has no `space:`"),
    ("param_groups: common", "param_groups: nowhere", "param_groups nowhere is unknown"),
    (".{name}\"", "\"", "exactly the placeholders {name}, {state}"),
    ("{state: param|exp_avg|exp_avg_sq}.{name}", "{state: param|m|v}.{name}", "must stand for param, exp_avg, exp_avg_sq"),
    ("      param_groups: common\n", "      param_groups: common\n      nd_flattened\n      states: fp32 = param\n",
     "fp32 is not a word of {state}"),
    ("      space: bucket\n", "      space: bucket\n      nd_flattened\n", "nd_flattened applies to model-space"),
    ("|per_bucket_numel_unpadded}", "}", "must include per_bucket_numel_unpadded"),
    ("{group}.{what: optimizer", "{group}{what: optimizer", "two placeholders in a row"),
    ("{name}", "{name: a|b}", "{name} takes no list of words"),
    ("{state: param|exp_avg|exp_avg_sq}.{name}", "{state}.{name}", "{state} lists the words"),
    ("unsupported fsdp_dtensor", "unsupported dp_reshardable", "sharding type dp_reshardable is declared twice"),
    ("      space: model\n", "      space: model\n      space: model\n", "space given twice"),
    ('"decoder.layers.{layer}.{rest}" =>', '"decoder.layers.{layer.{rest}" =>', "unbalanced brace"),
])
def test_bad_blocks_are_refused_with_their_location(tmp_path, capsys, old, new, words):
    path = tmp_path / "t.rules"
    path.write_text(_bad(old, new))
    with pytest.raises(CkptmapError) as e:
        load_rules(path)
    assert words in str(e.value)
    assert str(e.value).startswith(f"{path}:"), str(e.value)
    assert main(["rules", "check", str(path)]) == 2
    assert words in capsys.readouterr().err


def test_a_second_block_for_one_framework_is_refused(tmp_path):
    text = GOOD + "torch_dist megatron {" + GOOD.split("torch_dist megatron {", 1)[1]
    with pytest.raises(CkptmapError, match="a second `torch_dist megatron` block"):
        parse_rules(text, "t.rules")


def test_model_rules_carry_the_bundled_block():
    for name in ("megatron_core_gpt", "megatron_legacy_gpt"):
        lay = load_rules(bundled_rules()[name]).torch_dist_layout("megatron")
        assert set(lay.sharding_types) == {"fully_sharded_model_space", "fully_reshardable", "dp_reshardable",
                                           "dp_zero_gather_scatter"}
        assert lay.optimizer_prefix == "optimizer."
    assert M.default_layout() == load_rules(bundled_rules()["megatron_core_gpt"]).torch_dist_layout()


def test_a_rules_file_without_the_block_says_how_to_get_it():
    with pytest.raises(CkptmapError, match="include megatron_layouts"):
        parse_rules("rules t\n", "t.rules").torch_dist_layout()


# -------------------------------------------------------------------------------------------------
# The bundled block against the keys real megatron-core 0.8.0 / 0.12.1 / 0.16.1 saves

from mcore_versions import SHARDING_TYPES, STANDARD_CASES  # noqa: E402
from mcore_versions.fixtures import mcore_standard  # noqa: E402,F401  (session fixture)

SAVES = [(v, n, st) for v in SHARDING_TYPES for n in STANDARD_CASES for st in SHARDING_TYPES[v]]


@pytest.mark.parametrize("version,name,sharding_type", SAVES, ids=[f"{v}-{n}-{st}" for v, n, st in SAVES])
@pytest.mark.mcore_versions
@pytest.mark.slow
def test_every_key_of_a_real_save_is_spelled_by_the_rules(mcore_standard, version, name, sharding_type):
    """Each optimizer key the real library wrote matches its sharding type's declared template and is spelled
    back identically from the bindings; model keys never look like optimizer keys; stacked keys unstack."""
    lay = M.default_layout()
    st = lay.sharding(sharding_type)
    run = mcore_standard(version, name)
    with td.TorchDistCheckpoint(run.dir / f"torch_dist_{sharding_type}" / "iter_0000001") as r:
        meta = r.meta
        optimizer = [k for k in meta.order if lay.is_optimizer_key(k)]
        model = [k for k in meta.tensors if not lay.is_optimizer_key(k)]
        assert model and all(not k.startswith("optimizer.") and ".optimizer." not in k for k in model)
        assert any(k.startswith("decoder.layers.") for k in model)
        for key in optimizer:
            opt, rest = lay.split_chained(key)
            if key in meta.tensors:
                b = st.tensors.match(rest)
                assert b is not None, key
                assert lay.chained_prefix(opt) + st.tensors.format(**b) == key
                if st.space == "model":
                    assert b["name"] in meta.tensors   # the parameter it belongs to is a model key
            else:
                obj = meta.objects[key].name
                b = st.objects.match(lay.split_chained(obj)[1])
                assert b is not None, key
                assert M.group_object_key(lay, st, opt, b["group"], b["what"]) == key
        for key in model:
            s = lay.stacked_key(key)
            if s is None:
                continue
            shape = meta.tensors[key].shape
            item = lay.item_name(key, {a: n - 1 for a, n in zip(s.axes, shape)}, None)
            assert lay.sharded_item(item, None) == (key, tuple(n - 1 for n in shape[:len(s.axes)]))
