"""The rules DSL: bundled files, name mapping per formats.md §3.2, and error messages."""

import pytest

from ckptmap.cli import main
from ckptmap.errors import CkptmapError
from ckptmap.mapping.rules import bundled_rules, load_rules, parse_rules

# formats.md §3.2, written out by hand: Megatron legacy name (layer 1 local) -> MindSpeed name (layer 5 global)
LEGACY_TABLE = {
    "language_model.embedding.word_embeddings.weight": ("language_model.embedding.word_embeddings.weight", "split(dim=0, vocab_padded)"),
    "language_model.embedding.position_embeddings.weight": ("language_model.embedding.position_embeddings.weight", "replicated"),
    "language_model.encoder.layers.1.input_norm.weight": ("language_model.encoder.layers.5.input_norm.weight", "replicated"),
    "language_model.encoder.layers.1.input_norm.bias": ("language_model.encoder.layers.5.input_norm.bias", "replicated"),
    "language_model.encoder.layers.1.self_attention.query_key_value.weight": ("language_model.encoder.layers.5.attention.qkv_proj.weight", "split(dim=0, groups=num_query_groups)"),
    "language_model.encoder.layers.1.self_attention.query_key_value.bias": ("language_model.encoder.layers.5.attention.qkv_proj.bias", "split(dim=0, groups=num_query_groups)"),
    "language_model.encoder.layers.1.self_attention.dense.weight": ("language_model.encoder.layers.5.attention.out_proj.weight", "split(dim=1)"),
    "language_model.encoder.layers.1.self_attention.dense.bias": ("language_model.encoder.layers.5.attention.out_proj.bias", "replicated"),
    "language_model.encoder.layers.1.post_attention_norm.weight": ("language_model.encoder.layers.5.post_attention_norm.weight", "replicated"),
    "language_model.encoder.layers.1.post_attention_norm.bias": ("language_model.encoder.layers.5.post_attention_norm.bias", "replicated"),
    "language_model.encoder.layers.1.mlp.dense_h_to_4h.weight": ("language_model.encoder.layers.5.mlp.mapping.weight", "split(dim=0, halves=2)"),
    "language_model.encoder.layers.1.mlp.dense_h_to_4h.bias": ("language_model.encoder.layers.5.mlp.mapping.bias", "split(dim=0, halves=2)"),
    "language_model.encoder.layers.1.mlp.dense_4h_to_h.weight": ("language_model.encoder.layers.5.mlp.projection.weight", "split(dim=1)"),
    "language_model.encoder.layers.1.mlp.dense_4h_to_h.bias": ("language_model.encoder.layers.5.mlp.projection.bias", "replicated"),
    "language_model.encoder.layers.1.attn_post_norm.weight": ("language_model.encoder.layers.5.attn_post_norm.weight", "replicated"),
    "language_model.encoder.layers.1.ffn_post_norm.weight": ("language_model.encoder.layers.5.ffn_post_norm.weight", "replicated"),
    "language_model.encoder.final_norm.weight": ("language_model.encoder.final_norm.weight", "replicated"),
    "language_model.encoder.final_norm.bias": ("language_model.encoder.final_norm.bias", "replicated"),
    "language_model.output_layer.weight": ("language_model.output_layer.weight", "split(dim=0, vocab_padded)"),
    "word_embeddings_for_head.weight": ("word_embeddings.weight", "split(dim=0, vocab_padded)"),
}


def _map(rules, name, global_layer):
    hits = [(r, b) for r in rules.params if (b := r.megatron.match(name)) is not None]
    assert len(hits) == 1, f"{name}: {len(hits)} rules match"
    rule, b = hits[0]
    if "layer" in b:
        b["layer"] = global_layer
    return rule.mindspore.format(b), str(rule.tp), rule


def test_bundled_rules_parse():
    assert set(bundled_rules()) == {"megatron_legacy_gpt", "megatron_core_gpt"}
    for path in bundled_rules().values():
        rules = load_rules(path)
        assert rules.params and {s.state for s in rules.states} == {"param", "exp_avg", "exp_avg_sq"}
        assert {b.name for b in rules.buckets} == {"megatron", "mindspeed"}


def test_legacy_rules_cover_every_row_of_formats_table():
    rules = load_rules(bundled_rules()["megatron_legacy_gpt"])
    for megatron_name, (ms_name, split) in LEGACY_TABLE.items():
        got, got_split, _ = _map(rules, megatron_name, 5)
        # the table describes SwiGLU checkpoints; the rules cut fc1 in halves only when args.swiglu says so
        got_split = got_split.replace("halves=2 when swiglu", "halves=2")
        assert (got, got_split) == (ms_name, split), megatron_name


def test_tied_head_has_its_ddp_name():
    rules = load_rules(bundled_rules()["megatron_legacy_gpt"])
    _, _, rule = _map(rules, "word_embeddings_for_head.weight", 0)
    assert rule.ddp_pattern().format({}) == "module.word_embeddings.weight"
    _, _, rule = _map(rules, "language_model.encoder.layers.3.input_norm.weight", 0)
    assert rule.ddp_pattern().format({"layer": 3, "p": "weight"}) == "module.language_model.encoder.layers.3.input_norm.weight"


def test_core_rules_keep_names_except_layer_number():
    rules = load_rules(bundled_rules()["megatron_core_gpt"])
    names = ["embedding.word_embeddings.weight", "decoder.layers.0.input_layernorm.weight",
             "decoder.layers.0.input_layernorm.bias", "decoder.layers.0.self_attention.linear_qkv.weight",
             "decoder.layers.0.self_attention.linear_proj.weight", "decoder.layers.0.pre_mlp_layernorm.weight",
             "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight",
             "decoder.final_layernorm.bias", "output_layer.weight",
             "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]
    for name in names:
        got, _, _ = _map(rules, name, 7)
        assert got == name.replace("layers.0.", "layers.7."), name


def test_pattern_rejects_near_misses():
    rules = load_rules(bundled_rules()["megatron_legacy_gpt"])
    for bad in ["language_model.encoder.layers.01.input_norm.weight",
                "language_model.encoder.layers.x.input_norm.weight",
                "language_model.encoder.layers.1.input_norm.scale",
                "language_model.encoder.layers.1.input_norm"]:
        assert not any(r.megatron.match(bad) is not None for r in rules.params), bad


@pytest.mark.parametrize("text, where, words", [
    ('rules x\nparam a.b => a.c\n  tp: split(dim=0\nparam', "<t>:4:1", ["expected", "')'"]),
    ('rules x\nparam a.b => a.c tp: sharded', "<t>:2:22", ["unexpected", "'sharded'", "'replicated'"]),
    ('rules x\nparam a.{layer}.b => a.c tp: replicated', "<t>:2:1", ["drops {layer}"]),
    ('rules x\nparam a.b => a.{p} tp: replicated', "<t>:2:1", ["{p}", "does not bind"]),
    ('rules x\nparam a.{p}.b => a.{p} tp: replicated', "<t>:2:1", ["not defined"]),
    ('rules x\nparam a.b => a.c tp: replicated ops: flip(0)', "<t>:2:1", ["unknown op flip()"]),
    ('rules x\nparam a.b => a.c', "<t>:2:1", ["no tp: clause"]),
    ('rules x\nparam a.b => a.c tp: replicated\nparam a.b => a.d tp: replicated', "<t>:3:1", ["already mapped at <t>:2:1"]),
    ('rules x\noptimizer_state { exp_avg => exp_avg }', "<t>:2:19", ["must contain {name}"]),
    ('rules x\nbuckets m { order: sideways }', "<t>:2:1", ["order: sideways is unknown"]),
    ('rules x\nparam a.b => a.c tp: split(halves=2)', "<t>:2:", ["needs dim=N"]),
])
def test_errors_point_at_file_line_col(text, where, words):
    with pytest.raises(CkptmapError) as e:
        parse_rules(text, "<t>")
    msg = str(e.value)
    assert msg.startswith(where), msg
    for w in words:
        assert w in msg, msg


def test_bucket_expressions_evaluate():
    rules = load_rules(bundled_rules()["megatron_legacy_gpt"])
    mega = rules.bucket_layout("megatron", "0.6")
    assert mega.bucket_pads[0].amount.evaluate({"dp_group": 8}) == 8 and mega.bucket_pads[0].unit == "elements"
    env = {"overlap_grad_reduce": True, "pp_rank": 0, "chunk": 0, "untie_embeddings_and_output_weights": False,
           "pp": 2}
    assert [str(c) for c in mega.close_when] == ["overlap_grad_reduce", "pp_rank == 0", "chunk == 0"]
    assert all(c.holds(env) for c in mega.close_when)
    assert not all(c.holds(dict(env, chunk=1)) for c in mega.close_when)
    assert all(c.holds(env) for c in mega.shared_when)
    assert not all(c.holds(dict(env, pp=1)) for c in mega.shared_when)
    assert dict(mega.defaults)["bucket_size"].evaluate({}) == 40_000_000
    ms = rules.bucket_layout("mindspeed")
    assert ms.bucket_pads[0].amount.evaluate({"dp": 4}) == 2048 and ms.bucket_pads[0].unit == "bytes"
    assert ms.param_align[0].evaluate({}) == 512


def test_cli_rules_list_and_check(capsys, tmp_path):
    assert main(["rules", "list"]) == 0
    out = capsys.readouterr().out
    assert "megatron_legacy_gpt" in out and "megatron_core_gpt" in out
    assert main(["rules", "check", str(bundled_rules()["megatron_core_gpt"])]) == 0
    bad = tmp_path / "bad.rules"
    bad.write_text("rules bad\nparam a.b =>\n")
    assert main(["rules", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:11" in err and "unexpected end of file; expected" in err


def test_versioned_bucket_blocks_are_chosen_by_version():
    rules = load_rules(bundled_rules()["megatron_core_gpt"])
    assert [b.label for b in rules.bucket_layouts("megatron")] == [
        "megatron for 0.6", "megatron for 0.7", "megatron for 0.8", "megatron for 0.9 - 0.12",
        "megatron for 0.13 - 0.16"]
    assert rules.bucket_layout("megatron", "0.6.0").storage == "per_bucket"
    assert rules.bucket_layout("megatron", "0.7").storage == "coalesced"
    v12 = rules.bucket_layout("megatron", "0.12.1")
    assert v12.param_start_align[0].evaluate({}) == 64
    env = {"dp_group": 6, "pad_buckets_for_high_nccl_busbw": 0}
    first = next(p for p in v12.bucket_pads if all(c.holds(env) for c in p.when))
    assert first.amount.evaluate(env) == 384                       # lcm(6, 128)
    env["pad_buckets_for_high_nccl_busbw"] = 1
    first = next(p for p in v12.bucket_pads if all(c.holds(env) for c in p.when))
    assert first.amount.evaluate(env) == 196608                    # lcm(6, 128, 2**16)
    with pytest.raises(CkptmapError, match="no `buckets megatron` block for version 0.17"):
        rules.bucket_layout("megatron", "0.17")


@pytest.mark.parametrize("first_numel, dp, expected", [
    # a 100-element parameter, then the tied embedding (first stage, PP > 1) in a bucket of its own; the
    # embedding would start at 128 (64-aligned). DP 3 pads buckets to lcm(3, 128) = 384: 0.13+ close the
    # first bucket at 128 and start the embedding at 384; 0.9 - 0.12 see 128 % 3 != 0 and pad first,
    # counting the padding as the bucket's content; 0.8 would leave the embedding at 128 inside the padding
    (100, 3, {"0.8.0": None, "0.12.1": ([384, 384], [384, 64]), "0.16.1": ([384, 384], [128, 64])}),
    # DP 2 (lcm 128): 128 is a multiple of the padding already: every version agrees
    (100, 2, {"0.8.0": ([128, 128], [128, 64]), "0.12.1": ([128, 128], [128, 64]), "0.16.1": ([128, 128], [128, 64])}),
    # start 64, DP 2: 64 % 2 == 0, so 0.9 - 0.12 do not pad and, like 0.8, would overlap the padding
    (30, 2, {"0.8.0": None, "0.12.1": None, "0.16.1": ([128, 128], [64, 64])}),
])
def test_tied_embedding_bucket_start_per_version(first_numel, dp, expected):
    from ckptmap.mapping import buckets
    rules = load_rules(bundled_rules()["megatron_core_gpt"])
    params = [buckets.ParamEntry("module.embedding.word_embeddings.weight", (8, 8), "bfloat16", True),
              buckets.ParamEntry("module.decoder.final_layernorm.weight", (first_numel,), "bfloat16", False)]
    values = {"dp_group": dp, "pp": 2, "pp_rank": 0, "chunk": 0, "overlap_grad_reduce": False,
              "untie_embeddings_and_output_weights": False, "ep": 1}
    for version, want in expected.items():
        block = rules.bucket_layout("megatron", version)
        env = buckets.layout_env(block, values)
        if want is None:
            with pytest.raises(buckets.UnfaithfulLayout, match="no faithful checkpoint exists"):
                buckets.build_buffer(block, params, env)
            continue
        bl = buckets.build_buffer(block, params, env)
        assert (bl.per_bucket_numel, bl.per_bucket_numel_unpadded) == want, version
        assert bl.slots[-1].start == want[0][0], version   # the embedding starts its bucket


def test_include_cycle_and_missing(tmp_path):
    (tmp_path / "a.rules").write_text('rules a\ninclude b\n')
    (tmp_path / "b.rules").write_text('rules b\ninclude a\n')
    with pytest.raises(CkptmapError, match="includes itself"):
        load_rules(tmp_path / "a.rules")
    (tmp_path / "c.rules").write_text('rules c\ninclude nowhere\n')
    with pytest.raises(CkptmapError, match=r"c.rules:2:1: include nowhere"):
        load_rules(tmp_path / "c.rules")


def test_overlapping_version_blocks_are_refused(tmp_path):
    block = "buckets megatron for {} {{\n   order: reverse_registration\n}}\n"
    (tmp_path / "x.rules").write_text("rules x\n" + block.format("0.8 - 0.12") + block.format("0.12 - 0.16"))
    with pytest.raises(CkptmapError, match="same versions"):
        load_rules(tmp_path / "x.rules")


def test_start_alignment_places_parameters_like_megatron_0_8():
    # param_start_align: gaps before parameters, none after the last one of a bucket
    from ckptmap.mapping import buckets
    rule = load_rules(bundled_rules()["megatron_core_gpt"]).bucket_layout("megatron", "0.8")
    params = [buckets.ParamEntry(f"p{i}", (n,), "bfloat16") for i, n in enumerate([10, 70, 3])]
    env = buckets.layout_env(rule, {"dp_group": 2, "overlap_grad_reduce": False, "pp_rank": 0, "chunk": 0, "pp": 1,
                                    "untie_embeddings_and_output_weights": True})
    layout = buckets.build_buffer(rule, params, env)
    # reverse order: p2 [0,3), p1 at 64, p0 at 192
    assert [(s.name, s.start, s.end) for s in layout.slots] == [("p2", 0, 3), ("p1", 64, 134), ("p0", 192, 202)]
    assert layout.per_bucket_numel_unpadded == [202] and layout.per_bucket_numel == [256]


def test_param_groups_and_uneven_stages_blocks():
    """The versioned facts resharding needs: how each Megatron orders and loads optimizer param groups
    (read in megatron/core/optimizer of 0.8.0 - 0.16.1: first use + load by position up to 0.13, key
    matching from 0.14, sorted groups at 0.16) and which versions build uneven pipeline stages."""
    from ckptmap.mapping.rules import parse_rules, resolve_rules

    rules = resolve_rules("megatron_core_gpt")
    order = {v: [(p.order, p.load) for p in rules.param_group_policies("megatron") if p.covers(v)]
             for v in ("0.8.0", "0.12.1", "0.13.0", "0.14.0", "0.16.1")}
    assert order == {"0.8.0": [("first_use", "by_index")], "0.12.1": [("first_use", "by_index")],
                     "0.13.0": [("first_use", "by_index")], "0.14.0": [("first_use_then_gathered", "by_key")],
                     "0.16.1": [("sorted", "by_key")]}
    p = rules.param_group_policies("megatron")[0]
    assert p.no_weight_decay("decoder.layers.0.mlp.linear_fc1.bias", (8,)) and p.no_weight_decay("x.weight", (8,))
    assert not p.no_weight_decay("decoder.layers.0.mlp.linear_fc1.weight", (8, 4))
    assert [rules.bucket_layout("megatron", v).uneven_stages for v in ("0.8.0", "0.12.1", "0.16.1")] == \
        ["none", "first_last", "first_last"]
    with pytest.raises(CkptmapError, match="param_groups order: 'by_name' is not one of"):
        parse_rules('rules x\nparam_groups megatron for 0.1 { order: by_name }')
    with pytest.raises(CkptmapError, match="uneven_stages: 'any' is not one of"):
        parse_rules('rules x\nbuckets megatron { order: reverse_registration\n uneven_stages: any }')
