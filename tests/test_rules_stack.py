"""Rules with ``stack: expert`` (a rank's local experts <-> one MindSpore tensor stacked on a new leading axis).

Truth is independent of ckptmap: the live weights, fp32 main params and Adam moments that the real
megatron-core run recorded per expert (``truth.pt`` of tests/mcore_versions: the expert DDP buffers'
state, stitched over the expert-data-parallel ranks) are stacked here with numpy, in local-expert order
(expert-parallel rank e holds global experts e*E/EP ...), and transposed to MindFormers' [experts, in, out];
the MindSpore side is read with the real ``mindspore.load_checkpoint``; the way back is compared byte
for byte with Megatron's own files.
"""

import filecmp
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from ckptmap.cli import main
from ckptmap.errors import CkptmapError
from ckptmap.formats.megatron_files import ModelTensor
from ckptmap.mapping.compiler import stack_units
from ckptmap.mapping.layout import ParallelLayout
from ckptmap.mapping.megatron_source import match_rules
from ckptmap.mapping.rules import load_rules
from mcore_versions.fixtures import mcore_standard  # noqa: F401  (session fixture)

STACKED_RULES = (Path(__file__).resolve().parents[1] / "ckptmap" / "rules" / "examples" /
                 "megatron_core_gpt_moe_stacked.rules")
RUN = ["--no-progress", "--multiprocess-off"]
STATES = (("param", ""), ("exp_avg", "exp_avg."), ("exp_avg_sq", "exp_avg_sq."))

# Megatron per-expert weight -> (MindSpore stacked name, axes of the stacked array); written out here,
# not read from the rules. [experts, out, in] -> [experts, in, out] (MindFormers' expert Linear).
STACKED = {
    "linear_fc1.weight": ("model.layers.L.feed_forward.ffn.w1.weight", (0, 2, 1)),
    "linear_fc2.weight": ("model.layers.L.feed_forward.ffn.w2.weight", (0, 2, 1)),
}


# ---------------------------------------------------------------------------------------------------
# parsing and refusals (`ckptmap rules check`)

def test_example_rules_parse_with_stack():
    rules = load_rules(STACKED_RULES)
    stacked = [r for r in rules.params if r.stack]
    assert {str(r.mindspore) for r in stacked} == {
        "model.layers.{layer}.feed_forward.ffn.w1.weight", "model.layers.{layer}.feed_forward.ffn.w1.bias",
        "model.layers.{layer}.feed_forward.ffn.w2.weight", "model.layers.{layer}.feed_forward.ffn.w2.bias"}
    assert all(r.stack == "expert" and "num_experts" in r.config_symbols() for r in stacked)
    assert main(["rules", "check", str(STACKED_RULES)]) == 0


HEAD = "rules t\nparam a.{layer}.experts.{expert}.fc1.weight\n   => b.{layer}.w1.weight\n   tp: split(dim=0)\n"
REFUSED = [
    ("rules t\nparam a.{layer}.fc1.weight\n   => b.{layer}.w1.weight\n   tp: split(dim=0)\n   stack: expert\n",
     "t.rules:5:4", "has no {expert}"),
    ("rules t\nparam a.{layer}.experts.{expert}.fc1.weight\n   => b.{layer}.{expert}.w1.weight\n   tp: split(dim=0)\n"
     "   stack: expert\n", "t.rules:5:4", "still names {expert}"),
    (HEAD + "   stack: layer\n", "t.rules:5:4", "only expert can be stacked"),
    (HEAD + "   stack: expert\n   ops: transpose(0, 1)\n", "t.rules:5:4", "must leave axis 0 alone"),
    (HEAD + "   stack: expert\n   ops: reshape(4, -1)\n", "t.rules:5:4", "must leave axis 0 alone"),
    ("rules t\nparam a.{layer}.experts.{expert}.fc1.weight\n   => b.{layer}.{part}.weight\n   tp: split(dim=0)\n"
     "   parts: g = 4, u = 4\n   stack: expert\n", "t.rules:6:4", "stack: and parts: in one rule"),
    (HEAD + "   stack: expert\n   shared_embedding\n", "t.rules:5:4", "cannot be stacked"),
    (HEAD + "   stack: expert\n   stack: expert\n", "t.rules:2:1", "two stack: clauses"),
    (HEAD, "t.rules:2:1", "add `stack: expert`"),   # {expert} dropped without stack:
    (HEAD + "   stack:\n", "t.rules:5:9", "unexpected end of file; expected a name"),
]


@pytest.mark.parametrize("text,where,why", REFUSED, ids=[r[2][:28] for r in REFUSED])
def test_misused_stack_is_refused_by_rules_check(text, where, why, tmp_path, capsys):
    path = tmp_path / "t.rules"
    path.write_text(text)
    with pytest.raises(CkptmapError) as e:
        load_rules(path)
    assert f"{tmp_path}/{where}" in str(e.value) and why in str(e.value), str(e.value)
    assert main(["rules", "check", str(path)]) == 2
    assert why in capsys.readouterr().err


def _units(names_shapes, num_experts=4, ep=2):
    rules = load_rules(STACKED_RULES)
    tensors = [ModelTensor(0, n, n, "bfloat16", shape) for n, shape in names_shapes]
    matched, unmatched = match_rules(rules, tensors, "ckpt/model_optim_rng.pt")
    assert not unmatched
    return stack_units(matched, ParallelLayout(dp=ep, ep=ep, num_layers=1), {"num_experts": num_experts},
                       "ckpt/model_optim_rng.pt")


FC1 = "decoder.layers.0.mlp.experts.local_experts.{}.linear_fc1.weight"


def test_planning_refuses_experts_that_do_not_fill_the_stack():
    units = _units([(FC1.format(1), (24, 40)), (FC1.format(0), (24, 40))])
    assert len(units) == 1 and [m.tensor.name for m in units[0].members] == [FC1.format(0), FC1.format(1)]
    with pytest.raises(CkptmapError) as e:        # 4 experts on EP 2: local experts 0, 1 — not 0 alone
        _units([(FC1.format(0), (24, 40))])
    assert "ckpt/model_optim_rng.pt" in str(e.value) and "megatron_core_gpt_moe_stacked.rules:" in str(e.value)
    assert "over the 2 local experts 0 … 1" in str(e.value) and "holds experts [0]" in str(e.value)
    with pytest.raises(CkptmapError) as e:
        _units([(FC1.format(0), (24, 40)), (FC1.format(1), (12, 40))])
    assert "[12, 40]" in str(e.value) and "[24, 40]" in str(e.value) and "one shape and dtype" in str(e.value)
    with pytest.raises(CkptmapError) as e:
        _units([(FC1.format(0), (24, 40)), (FC1.format(1), (24, 40))], num_experts=None)
    assert "give no num_experts" in str(e.value)


# ---------------------------------------------------------------------------------------------------
# the real megatron-core MoE run (4 experts, EP 2, expert-DP 2, ChainedOptimizer)

def ms_rank(case, tp, pp, ep):
    """Global rank of (tp, pp, ep) at dp = cp = 0, rank order tp-cp-ep-dp-pp (Megatron's RankGenerator)."""
    return tp + case.tp * (ep + case.ep * (case.dp // case.ep) * pp)


def expected(run, rank_key, which):
    """{MindSpore name: array} of one rank from the live truth: the experts of each layer stacked with
    numpy in local order, every other parameter under its own name. ``which``: "param" / "exp_avg" /
    "exp_avg_sq" (fp32 state) or "weight" (the bf16 weight, as float32)."""
    chunk = run.truth["ranks"][rank_key]["chunks"][0]      # PP 1, no VPP: one chunk, local = global layers
    per_rank = run.case.num_experts // run.case.ep
    out, stacks = {}, {}
    for ddp, live in chunk["live"].items():
        name = ddp[len("module."):]
        value = live[which].float().numpy()
        parts = name.split(".")
        if "local_experts" in parts:
            i = parts.index("local_experts")
            layer, expert, rest = parts[2], int(parts[i + 1]), ".".join(parts[i + 2:])
            stacks.setdefault((layer, rest), {})[expert] = value
        else:
            out[name] = value
    for (layer, rest), experts in stacks.items():
        assert sorted(experts) == list(range(per_rank))
        ms_name, axes = STACKED[rest]
        out[ms_name.replace(".L.", f".{layer}.")] = np.stack([experts[e] for e in range(per_rank)]).transpose(axes)
    return out


@pytest.fixture(scope="module", params=["0.12.1", "0.16.1"])
def moe_run(request, mcore_standard):
    return mcore_standard(request.param, "moe")


def megatron_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.pt"))


@pytest.mark.mcore_versions
@pytest.mark.slow
def test_stacked_experts_equal_the_live_optimizer_and_come_back_byte_identical(moe_run, tmp_path):
    run, c = moe_run, moe_run.case
    src, out, back = run.dir / "legacy", tmp_path / "ms", tmp_path / "back"
    assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "--rules", str(STACKED_RULES)] + RUN) == 0
    stacked_seen = 0
    for (tp, pp, ep) in run.truth["ranks"]:
        got = {k: v.asnumpy() for k, v in
               ms.load_checkpoint(str(out / f"rank_{ms_rank(c, tp, pp, ep)}" / "network.ckpt")).items()}
        for state, prefix in STATES:
            want = {prefix + k: v for k, v in expected(run, (tp, pp, ep), state).items()}
            # every parameter of the rank is there, the experts only stacked (no per-expert tensor left)
            held = [k for k in got if k.startswith(prefix)] if prefix else [
                k for k in got if not k.startswith("exp_avg") and got[k].size > 1]   # not the scalars
            assert sorted(held) == sorted(want), state
            for k, v in want.items():
                assert got[k].shape == v.shape and np.array_equal(got[k], v), (ep, k)
                stacked_seen += "feed_forward" in k
    assert stacked_seen == 2 * c.num_layers * c.ep * 3   # w1 + w2, per layer, per EP rank, 3 states
    assert got["model.layers.1.feed_forward.ffn.w1.weight"].shape == (c.num_experts // c.ep, c.hidden, c.ffn)
    assert main(["ms2pt", "--ms-path", str(out), "--megatron-path", str(back), "--rules", str(STACKED_RULES)]
                + RUN) == 0
    files = megatron_files(src)
    assert len(files) == 4 and megatron_files(back) == files
    for rel in files:
        assert filecmp.cmp(src / rel, back / rel, shallow=False), rel


@pytest.mark.mcore_versions
@pytest.mark.slow
def test_stacked_experts_weights_only_are_the_bf16_weights(moe_run, tmp_path):
    run, c = moe_run, moe_run.case
    out = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(run.dir / "legacy"), "--ms-path", str(out), "--rules",
                 str(STACKED_RULES), "--convert-param-only"] + RUN) == 0
    for (tp, pp, ep) in run.truth["ranks"]:
        got = ms.load_checkpoint(str(out / f"rank_{ms_rank(c, tp, pp, ep)}" / "network.ckpt"))
        want = expected(run, (tp, pp, ep), "weight")
        assert not any(k.startswith("exp_avg") for k in got)
        for k, v in want.items():
            assert got[k].dtype == ms.float32 and np.array_equal(got[k].asnumpy(), v), (ep, k)


@pytest.mark.mcore_versions
@pytest.mark.slow
def test_a_stacked_tensor_with_the_wrong_expert_count_is_refused_by_ms2pt(moe_run, tmp_path, capsys):
    run = moe_run
    out, back = tmp_path / "ms", tmp_path / "back"
    assert main(["pt2ms", "--megatron-path", str(run.dir / "legacy"), "--ms-path", str(out), "--rules",
                 str(STACKED_RULES)] + RUN) == 0
    path = out / "rank_1" / "network.ckpt"
    params = ms.load_checkpoint(str(path))
    name = "model.layers.0.feed_forward.ffn.w2.weight"
    params[name] = ms.Parameter(ms.Tensor(params[name].asnumpy()[:1]), name=name)   # one expert dropped
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], str(path))
    capsys.readouterr()
    assert main(["ms2pt", "--ms-path", str(out), "--megatron-path", str(back), "--rules", str(STACKED_RULES)]
                + RUN) == 2
    err = capsys.readouterr().err
    assert name in err and "[1, 24, 40]" in err and "[2, 24, 40]" in err and "2 stacked experts" in err, err
    assert not back.exists()


@pytest.mark.mcore_versions
@pytest.mark.slow
def test_stacked_at_ep_1_holds_every_expert_in_global_order(moe_run, tmp_path):
    """pt2ms --target-ep-size 1 (reshard, then stack): one tensor of all 4 experts, global id = ep * E/EP + local;
    ms2pt --target-ep-size 2 back gives Megatron's distrib_optim.pt byte for byte (model_optim_rng.pt differs
    only where a reshard may: RNG states, storage layout — README, Resharding)."""
    run, c = moe_run, moe_run.case
    src, out, back = run.dir / "legacy", tmp_path / "ms", tmp_path / "back"
    assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "--rules", str(STACKED_RULES),
                 "--target-ep-size", "1"] + RUN) == 0
    got = ms.load_checkpoint(str(out / "rank_0" / "network.ckpt"))
    for state, prefix in STATES:
        per_rank = [expected(run, key, state) for key in sorted(run.truth["ranks"])]   # EP rank 0, then 1
        for k in per_rank[0]:
            if "feed_forward" in k:
                want = np.concatenate([r[k] for r in per_rank])    # experts 0, 1 of rank 0, then 2, 3 of rank 1
                assert want.shape[0] == c.num_experts and np.array_equal(got[prefix + k].asnumpy(), want), k
            else:
                assert np.array_equal(got[prefix + k].asnumpy(), per_rank[0][k]), k
    assert main(["ms2pt", "--ms-path", str(out), "--megatron-path", str(back), "--rules", str(STACKED_RULES),
                 "--target-ep-size", "2"] + RUN) == 0
    optim = sorted(p.relative_to(src) for p in src.rglob("distrib_optim.pt"))
    assert len(optim) == 2
    for rel in optim:
        assert filecmp.cmp(src / rel, back / rel, shallow=False), rel
