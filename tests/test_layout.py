"""Property tests for ckptmap.mapping.layout: exhaustive over small configurations.

The reference formulas (formats.md §3.1, §3.2) are written out here independently of the
implementation, on purpose without sharing any helper with it.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import struct
import sys

import pytest

from ckptmap.errors import CkptmapError
from ckptmap.mapping.layout import ParallelLayout, parse_stage_list
from conftest import FIXTURE_NAMES, fixture_dir

SIZES = (1, 2, 3, 4)


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------- ranks


def test_default_order_formula_bijection_and_zero_redundancy():
    for TP, PP, DP, CP in itertools.product(SIZES, repeat=4):
        for EP in divisors(DP):
            lay = ParallelLayout(tp=TP, pp=PP, dp=DP, cp=CP, ep=EP)
            world = TP * PP * DP * CP
            assert lay.world_size == world
            seen = set()
            for tp, cp, dp, pp in itertools.product(range(TP), range(CP), range(DP), range(PP)):
                g = lay.global_rank(tp=tp, pp=pp, dp=dp, cp=cp)
                assert g == tp + TP * (cp + CP * (dp + DP * pp))
                assert lay.coords(g) == {"tp": tp, "cp": cp, "ep": dp % EP, "dp": dp, "pp": pp}
                seen.add(g)
            assert seen == set(range(world))

            zero = lay.ranks(all_dp_cp=False)
            expected = sorted(pp * DP * CP * TP + tp for pp in range(PP) for tp in range(TP))
            assert [g for g, _ in zero] == expected
            for g, c in zero:
                assert c["dp"] == 0 and c["cp"] == 0 and c["ep"] == 0
                assert c == lay.coords(g)
            assert {(c["tp"], c["pp"]) for _, c in zero} == set(
                itertools.product(range(TP), range(PP)))

            full = lay.ranks(all_dp_cp=True)
            assert [g for g, _ in full] == list(range(world))
            assert len({(c["tp"], c["cp"], c["dp"], c["pp"]) for _, c in full}) == world
            assert all(lay.coords(g) == c for g, c in full)


def reference_rank(order, sizes, coords):
    """Mixed radix over `order` without 'ep' (Megatron's order_wo_ep), full dp, first fastest."""
    g, stride = 0, 1
    for tok in order.split("-"):
        if tok == "ep":
            continue
        g += coords[tok] * stride
        stride *= sizes[tok]
    return g


def orders_with_ep_next_to_dp():
    out = []
    for perm in itertools.permutations(["tp", "cp", "ep", "dp", "pp"]):
        i, j = perm.index("ep"), perm.index("dp")
        if abs(i - j) == 1:
            out.append("-".join(perm))
    return out


def test_every_valid_order_is_a_bijection_matching_megatron_mixed_radix():
    orders = orders_with_ep_next_to_dp()
    assert len(orders) == 48 and "tp-cp-ep-dp-pp" in orders
    small = (1, 2, 3)
    for order in orders:
        ep_first = order.index("ep") < order.index("dp")
        for TP, PP, DP, CP in itertools.product(small, repeat=4):
            for EP in divisors(DP):
                lay = ParallelLayout(tp=TP, pp=PP, dp=DP, cp=CP, ep=EP, order=order)
                sizes = {"tp": TP, "pp": PP, "dp": DP, "cp": CP}
                seen = set()
                for tp, cp, dp, pp in itertools.product(
                        range(TP), range(CP), range(DP), range(PP)):
                    c = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
                    g = lay.global_rank(**c)
                    assert g == reference_rank(order, sizes, c)
                    ep = dp % EP if ep_first else dp // (DP // EP)
                    assert lay.coords(g) == {**c, "ep": ep}
                    seen.add(g)
                assert seen == set(range(TP * PP * DP * CP))


def test_expert_digit_is_carved_out_of_dp():
    # ep-dp: consecutive dp ranks cycle through the expert ranks; dp-ep: blocks of DP/EP.
    lay = ParallelLayout(dp=6, ep=3)
    assert [lay.coords(g)["ep"] for g in range(6)] == [0, 1, 2, 0, 1, 2]
    lay = ParallelLayout(dp=6, ep=3, order="tp-cp-dp-ep-pp")
    assert [lay.coords(g)["ep"] for g in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [lay.coords(g)["dp"] for g in range(6)] == [0, 1, 2, 3, 4, 5]


def test_model_parallel_ranks_of_dense_and_expert_optimizers():
    """dp_group_idx_N of torch_dist bucket-space keys: the dense optimizer's N is the rank in the TP x PP
    group, the expert optimizer's the rank in the TP x EP x PP group (global-rank order), as the real
    0.16.1 MoE save (TP 1, DP 4, EP 2) writes chained_1.…dp_group_idx_0 / _1."""
    moe = ParallelLayout(tp=1, pp=1, dp=4, ep=2)
    assert [moe.expert_model_parallel_rank(0, 0, e) for e in range(2)] == [0, 1]
    assert moe.model_parallel_rank(0, 0) == 0
    lay = ParallelLayout(tp=2, pp=2, dp=4, ep=2)
    got = {(t, p, e): lay.expert_model_parallel_rank(t, p, e) for t in range(2) for p in range(2) for e in range(2)}
    assert sorted(got.values()) == list(range(8))
    assert got == {(t, p, e): t + 2 * e + 4 * p for t, p, e in got}   # tp fastest, then ep, then pp
    assert {(t, p): lay.model_parallel_rank(t, p) for t in range(2) for p in range(2)} == \
        {(t, p): t + 2 * p for t in range(2) for p in range(2)}
    with pytest.raises(CkptmapError):
        lay.expert_model_parallel_rank(0, 0, 2)


@pytest.mark.parametrize("order", ["tp-cp-ep-dp-pp", "tp-pp-ep-dp-cp", "pp-ep-dp-tp-cp", "cp-ep-dp-pp-tp"])
def test_model_parallel_ranks_equal_brute_force_enumeration(order):
    """The group ranks are computed from the rank order's digits; brute force sorts the group's global ranks."""
    for tp, pp, dp, ep, cp in itertools.product([1, 2, 3], [1, 3], [2, 6], [1, 2], [1, 2]):
        lay = ParallelLayout(tp=tp, pp=pp, dp=dp, ep=ep, cp=cp, order=order)
        dense = sorted((lay.global_rank(tp=t, pp=p), (t, p)) for t in range(tp) for p in range(pp))
        assert [lay.model_parallel_rank(t, p) for _, (t, p) in dense] == list(range(tp * pp))
        expert = sorted((lay.mp_rank_ranks(t, p, all_dp_cp=False, ep=e)[0], (t, p, e))
                        for t in range(tp) for p in range(pp) for e in range(ep))
        assert [lay.expert_model_parallel_rank(*c) for _, c in expert] == list(range(tp * pp * ep))


def test_order_tokens_of_size_one_may_be_omitted_and_case_is_ignored():
    a = ParallelLayout(tp=2, pp=3, dp=2)
    b = ParallelLayout(tp=2, pp=3, dp=2, order=" TP-DP-PP ")
    assert b.order == "tp-dp-pp"
    for g in range(a.world_size):
        assert a.coords(g) == b.coords(g)
    c = ParallelLayout(tp=2, pp=3, dp=2, order="pp-dp-tp")
    assert c.global_rank(pp=1) == 1 and c.global_rank(dp=1) == 3 and c.global_rank(tp=1) == 6


def test_fixture_spot_ranks():
    lay = ParallelLayout(tp=2, pp=2, dp=2, num_layers=4)      # legacy_tp2pp2dp2, 8 ranks
    assert [g for g, _ in lay.ranks(all_dp_cp=False)] == [0, 1, 4, 5]
    assert lay.coords(6) == {"tp": 0, "cp": 0, "ep": 0, "dp": 1, "pp": 1}
    lay = ParallelLayout(pp=3, vpp=2, num_layers=12)           # legacy_tp1pp3vpp2dp1
    assert [g for g, _ in lay.ranks(all_dp_cp=False)] == [0, 1, 2]


# --------------------------------------------------------------------------- layers


def valid_uniform_configs(max_layers=24):
    for L in range(1, max_layers + 1):
        for PP in divisors(L):
            for VPP in divisors(L // PP):
                if VPP > 1 and PP == 1:
                    continue
                yield L, PP, VPP


def check_partition_and_inverses(lay):
    L = lay.num_layers
    assert lay.chunks() == [(p, v) for p in range(lay.pp) for v in range(lay.vpp)]
    covered = []
    for p, v in lay.chunks():
        ids = lay.chunk_layers(p, v)
        assert list(ids) == list(range(ids[0], ids[0] + len(ids))) if ids else True
        covered.extend(ids)
        kept = lay.megatron_layers(p, v)
        assert kept == tuple(g for g in ids if g not in lay.noop)
        for n, g in enumerate(kept):
            assert lay.global_layer(p, v, n) == g
            assert lay.locate_layer(g) == (p, v, n)
        for g in ids:
            if g in lay.noop:
                assert lay.locate_layer(g) == (p, v, None)
        with pytest.raises(CkptmapError, match=rf"holds {len(kept)} layer"):
            lay.global_layer(p, v, len(kept))
    assert sorted(covered) == list(range(L)) and len(covered) == L


def test_uniform_and_interleaved_layouts_partition_and_match_formulas():
    count = 0
    for L, PP, VPP in valid_uniform_configs():
        lay = ParallelLayout(pp=PP, vpp=VPP, num_layers=L)
        check_partition_and_inverses(lay)
        per_chunk = L // (VPP * PP)
        for p, v in lay.chunks():
            ids = lay.chunk_layers(p, v)
            assert len(ids) == per_chunk
            for N in range(per_chunk):
                if VPP > 1:
                    G = v * L // VPP + p * L // (VPP * PP) + N
                else:
                    G = N + sum([L // PP] * p)
                assert ids[N] == G
                assert lay.global_layer(p, v, N) == G
        count += 1
    assert count > 100


def test_fixture_spot_layers():
    lay = ParallelLayout(pp=3, vpp=2, num_layers=12)           # legacy_tp1pp3vpp2dp1
    for p in range(3):
        assert lay.chunk_layers(p, 0) == (2 * p, 2 * p + 1)
        assert lay.chunk_layers(p, 1) == (6 + 2 * p, 7 + 2 * p)
        assert lay.global_layer(p, 1, 1) == 7 + 2 * p
    assert lay.locate_layer(9) == (1, 1, 1)
    lay = ParallelLayout(tp=2, pp=2, dp=2, num_layers=4)       # legacy_tp2pp2dp2
    assert lay.chunk_layers(1) == (2, 3) and lay.megatron_layers(1) == (2, 3)
    assert lay.global_layer(1, 0, 0) == 2 and lay.locate_layer(3) == (1, 0, 1)
    lay = ParallelLayout(tp=2, dp=2, num_layers=4)             # mcore_tp2pp1dp2_buckets
    assert lay.chunks() == [(0, 0)] and lay.chunk_layers(0) == (0, 1, 2, 3)


def compositions(total, parts):
    return [c for c in itertools.product(range(total + 1), repeat=parts) if sum(c) == total]


def check_stage_list(lay, stage_list):
    PP, VPP = lay.pp, lay.vpp
    check_partition_and_inverses(lay)
    for p, v in lay.chunks():
        ids = lay.chunk_layers(p, v)
        if VPP == 1:
            assert ids == tuple(N + sum(stage_list[:p]) for N in range(stage_list[p]))
        else:
            k = v * PP + p
            assert ids == tuple(N + sum(stage_list[:k]) for N in range(stage_list[k]))


def test_stage_lists_exhaustive_small_and_random():
    # every composition (zeros allowed) for small L, without and with VPP
    for L in range(0 + 1, 7):
        for PP in (1, 2, 3):
            for sl in compositions(L, PP):
                check_stage_list(ParallelLayout(pp=PP, num_layers=L, stage_list=sl), sl)
        for PP, VPP in ((2, 2), (3, 2), (2, 3)):
            if PP * VPP > 6:
                continue
            for sl in compositions(L, PP * VPP):
                check_stage_list(
                    ParallelLayout(pp=PP, vpp=VPP, num_layers=L, stage_list=sl), sl)
    rng = random.Random(1234)
    for _ in range(300):
        PP = rng.randint(1, 6)
        VPP = 1 if PP == 1 else rng.choice((1, 1, 2, 3, 4))
        sl = tuple(rng.randint(0, 5) for _ in range(PP * VPP))
        if sum(sl) == 0:
            sl = (1,) + sl[1:]
        check_stage_list(ParallelLayout(pp=PP, vpp=VPP, num_layers=sum(sl), stage_list=sl), sl)


def test_stage_list_edge_cases():
    lay = ParallelLayout(pp=3, num_layers=5, stage_list=(0, 5, 0))
    assert lay.chunk_layers(0) == () and lay.chunk_layers(1) == (0, 1, 2, 3, 4)
    assert lay.chunk_layers(2) == () and lay.locate_layer(4) == (1, 0, 4)
    with pytest.raises(CkptmapError, match="holds 0 layers"):
        lay.global_layer(0, 0, 0)
    lay = ParallelLayout(pp=2, num_layers=5, stage_list=(2, 3))
    assert lay.chunk_layers(1) == (2, 3, 4) and lay.global_layer(1, 0, 2) == 4
    # VPP stage list in execution order: virtual stage k = v*PP + p
    lay = ParallelLayout(pp=2, vpp=2, num_layers=10, stage_list=(1, 2, 3, 4))
    assert lay.chunk_layers(0, 0) == (0,) and lay.chunk_layers(1, 0) == (1, 2)
    assert lay.chunk_layers(0, 1) == (3, 4, 5) and lay.chunk_layers(1, 1) == (6, 7, 8, 9)
    # the uniform list equals the default split
    assert ParallelLayout(pp=3, vpp=2, num_layers=12, stage_list=(2,) * 6).chunk_layers(2, 1) \
        == ParallelLayout(pp=3, vpp=2, num_layers=12).chunk_layers(2, 1)


def test_parse_stage_list():
    assert parse_stage_list("3") == (3,)
    assert parse_stage_list("3,4,5") == (3, 4, 5)
    assert parse_stage_list(["3", "4,5"]) == (3, 4, 5)
    assert parse_stage_list([3, 4, 5]) == (3, 4, 5)
    assert parse_stage_list((0, " 2 ", "1, 1")) == (0, 2, 1, 1)
    assert parse_stage_list(7) == (7,)
    assert parse_stage_list("2 3 , 4") == (2, 3, 4)
    for bad in ([], "", "3,x", [3.5], "-1", [True], "3,,4", "3,", None, [[3]]):
        with pytest.raises(CkptmapError, match="--stage-list"):
            parse_stage_list(bad)
    assert ParallelLayout(pp=3, num_layers=9, stage_list="2,3,4").stage_list == (2, 3, 4)


def test_noop_every_subset():
    configs = [(L, PP, VPP, None) for L, PP, VPP in valid_uniform_configs(8)]
    configs += [(7, 3, 1, (3, 0, 4)), (8, 2, 2, (1, 3, 0, 4)), (6, 2, 1, (5, 1))]
    n = 0
    for L, PP, VPP, sl in configs:
        for r in range(L + 1):
            for noop in itertools.combinations(range(L), r):
                lay = ParallelLayout(pp=PP, vpp=VPP, num_layers=L, stage_list=sl, noop=noop)
                check_partition_and_inverses(lay)
                for p, v in lay.chunks():
                    kept = lay.megatron_layers(p, v)
                    # compact: Megatron local ids are exactly 0..len-1, ascending global order
                    assert kept == tuple(sorted(kept))
                    assert [lay.locate_layer(g)[2] for g in kept] == list(range(len(kept)))
                total_kept = sum(len(lay.megatron_layers(*c)) for c in lay.chunks())
                assert total_kept == L - len(noop)
                for g in noop:
                    assert lay.locate_layer(g)[2] is None
                n += 1
    assert n > 1000


def test_noop_spot_check():
    # MindSpeed 8 layers on 2 stages, layers 3 and 7 noop: Megatron stores 3 layers per stage
    lay = ParallelLayout(pp=2, num_layers=8, noop={3, 7})
    assert lay.megatron_layers(0) == (0, 1, 2) and lay.megatron_layers(1) == (4, 5, 6)
    assert lay.global_layer(1, 0, 0) == 4
    assert lay.locate_layer(7) == (1, 0, None) and lay.locate_layer(6) == (1, 0, 2)
    # noop accepted as list / strings, normalised to a frozenset
    assert ParallelLayout(pp=2, num_layers=8, noop=["3,7"]).noop == frozenset({3, 7})
    assert ParallelLayout(pp=2, num_layers=8, noop=[7, 3]) == lay


def test_value_semantics():
    a = ParallelLayout(pp=3, vpp=2, num_layers=12)
    assert a == ParallelLayout(pp=3, vpp=2, num_layers=12) and hash(a) == hash(
        ParallelLayout(pp=3, vpp=2, num_layers=12))
    assert ParallelLayout(vpp=None) == ParallelLayout(vpp=1)
    with pytest.raises(Exception):
        a.pp = 2  # frozen


def test_no_layer_count_means_rank_only_layout():
    lay = ParallelLayout(tp=2, pp=2)
    assert lay.world_size == 4 and lay.chunks() == [(0, 0), (1, 0)]
    for call in (lambda: lay.chunk_layers(0), lambda: lay.megatron_layers(0),
                 lambda: lay.global_layer(0, 0, 0), lambda: lay.locate_layer(0)):
        with pytest.raises(CkptmapError, match="--num-layers"):
            call()


# --------------------------------------------------------------------------- invalid inputs

INVALID = [
    (dict(pp=3, num_layers=10), "--num-layers 10 is not divisible by --pp-size 3"),
    (dict(pp=3, vpp=2, num_layers=9), r"--pp-size 3 x --vpp-size 2 = 6"),
    (dict(pp=2, num_layers=5, stage_list=(2, 2)), r"--stage-list 2,2 adds up to 4"),
    (dict(pp=3, vpp=2, num_layers=12, stage_list=(4, 4, 4)), r"--stage-list.*ambiguous"),
    (dict(pp=3, num_layers=12, stage_list=(4, 8)), r"--stage-list: expected 3 entries"),
    (dict(pp=2, vpp=2, num_layers=12, stage_list=(4, 4, 4)), r"--stage-list: expected 4 entries"),
    (dict(pp=2, num_layers=4, stage_list=(5, -1)), r"--stage-list"),
    (dict(num_layers=4, noop={4}), r"--noop.*0\.\.3"),
    (dict(num_layers=4, noop={-1}), r"--noop"),
    (dict(noop={0}), r"--noop.*--num-layers"),
    (dict(num_layers=4, noop=["x"]), r"--noop"),
    (dict(order="tp-cp-ep-dp-xp"), r"--parallel-init-order.*'xp'"),
    (dict(order="tp-tp-dp-pp"), r"--parallel-init-order.*repeated"),
    (dict(order="tp-ep-cp-dp-pp"), r"--parallel-init-order.*adjacent"),
    (dict(tp=2, order="cp-ep-dp-pp"), r"--parallel-init-order.*leaves out 'tp'.*--tp-size is 2"),
    (dict(dp=3, ep=2), r"--dp-size 3 is not divisible by --ep-size 2"),
    (dict(dp=2, ep=4), r"--dp-size 2 is not divisible by --ep-size 4"),
    (dict(tp=0), r"--tp-size"),
    (dict(pp=-1), r"--pp-size"),
    (dict(dp=0), r"--dp-size"),
    (dict(cp=0), r"--cp-size"),
    (dict(ep=0), r"--ep-size"),
    (dict(vpp=0), r"--vpp-size"),
    (dict(tp=2.0), r"--tp-size"),
    (dict(pp=True), r"--pp-size"),
    (dict(vpp=2, num_layers=4), r"--vpp-size 2 needs pipeline parallelism.*--pp-size"),
    (dict(num_layers=-4), r"--num-layers"),
]


@pytest.mark.parametrize("kwargs, pattern", INVALID)
def test_invalid_layouts_name_the_flag(kwargs, pattern):
    with pytest.raises(CkptmapError, match=pattern) as info:
        ParallelLayout(**kwargs)
    assert "\n" not in str(info.value)


def test_out_of_range_queries():
    lay = ParallelLayout(tp=2, pp=2, dp=2, num_layers=4)
    for kwargs, flag in ((dict(tp=2), "--tp-size"), (dict(pp=2), "--pp-size"),
                         (dict(dp=-1), "--dp-size"), (dict(cp=1), "--cp-size")):
        with pytest.raises(CkptmapError, match=flag):
            lay.global_rank(**kwargs)
    for rank in (-1, 8):
        with pytest.raises(CkptmapError, match="8 ranks"):
            lay.coords(rank)
    with pytest.raises(CkptmapError, match="--num-layers 4"):
        lay.locate_layer(4)
    with pytest.raises(CkptmapError, match="--vpp-size 1"):
        lay.chunk_layers(0, 1)
    with pytest.raises(CkptmapError, match="holds 2 layers"):
        lay.global_layer(1, 0, 2)
    with pytest.raises(CkptmapError, match="holds 2 layers"):
        lay.global_layer(1, 0, -1)


# --------------------------------------------------------------------------- real fixtures

def safetensors_keys(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return [k for k in json.loads(f.read(n)) if k != "__metadata__"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_real_fixture_ranks_and_layer_counts(name):
    """Ranks recorded by the live Megatron processes, and the local layer numbers in the truth
    tensors, agree with the layout."""
    fixture = fixture_dir(name)
    cfg = json.loads((fixture / "truth" / "config.json").read_text())
    lay = ParallelLayout(tp=cfg["tp"], pp=cfg["pp"], dp=cfg["dp"], cp=cfg["cp"], ep=cfg["ep"],
                         vpp=cfg["vpp"] or 1, num_layers=cfg["num_layers"])
    assert lay.world_size == cfg["world_size"]
    for r in cfg["ddp_layout_per_rank"]:
        assert lay.global_rank(tp=r["tp"], pp=r["pp"], dp=r["dp"]) == r["rank"]
        c = lay.coords(r["rank"])
        assert (c["tp"], c["pp"], c["dp"]) == (r["tp"], r["pp"], r["dp"])
    for t, p in itertools.product(range(lay.tp), range(lay.pp)):
        keys = safetensors_keys(fixture / "truth" / f"tp{t}_pp{p}.safetensors")
        for v in range(lay.vpp):
            prefix = "model." if lay.vpp == 1 else f"model{v}."
            local = {int(m.group(1)) for k in keys if k.startswith(prefix)
                     for m in [re.search(r"\blayers\.(\d+)\.", k)] if m}
            assert sorted(local) == list(range(len(lay.megatron_layers(p, v))))


# --------------------------------------------------------------------------- ranks at scale
#
# The oracle below is Megatron's RankGenerator (megatron/core/parallel_state.py, core_r0.7.0 and
# later: ``generate_masked_orthogonal_rank_groups`` + ``RankGenerator.get_ranks``), rewritten
# from its semantics: it enumerates every process group of every kind and reads a rank's
# coordinate as its position in its group. It shares nothing with layout.py.


def _prefix_product(sizes):
    out = [1]
    for s in sizes:
        out.append(out[-1] * s)
    return out


def _decompose(index, shape):
    return [(index // d) % s for s, d in zip(shape, _prefix_product(shape))]


def _masked_orthogonal_rank_groups(world, parallel_size, mask):
    """Every group of the dimensions selected by `mask`, each listed by its in-group index."""
    masked = [s for s, m in zip(parallel_size, mask) if m]
    unmasked = [s for s, m in zip(parallel_size, mask) if not m]
    stride = _prefix_product(parallel_size)
    masked_stride = [d for d, m in zip(stride, mask) if m]
    unmasked_stride = [d for d, m in zip(stride, mask) if not m]
    group_size = _prefix_product(masked)[-1]
    groups = []
    for group_index in range(world // group_size):
        outer = _decompose(group_index, unmasked)
        groups.append([sum(i * d for i, d in zip(_decompose(k, masked), masked_stride))
                       + sum(i * d for i, d in zip(outer, unmasked_stride)) for k in range(group_size)])
    return groups


def rank_generator_coords(TP, PP, DP, CP, EP, order):
    """{global rank: {"tp", "cp", "ep", "dp", "pp"}} as Megatron's RankGenerator assigns them:
    tp/pp/dp/cp groups from the order without 'ep' (dp of full size), ep groups from the order
    with 'ep' (dp of size DP/EP); missing tokens (size 1) are appended."""
    sizes = {"tp": TP, "pp": PP, "dp": DP, "ep": EP, "cp": CP}
    tokens = order.lower().split("-")
    tokens += [t for t in sizes if t not in tokens]
    wo_ep = [t for t in tokens if t != "ep"]
    world = TP * PP * DP * CP
    coords = {g: {} for g in range(world)}

    def assign(order_tokens, size_of, token):
        groups = _masked_orthogonal_rank_groups(world, [size_of[t] for t in order_tokens],
                                                [t == token for t in order_tokens])
        for group in groups:
            for i, g in enumerate(group):
                assert token not in coords[g]
                coords[g][token] = i

    for token in ("tp", "pp", "dp", "cp"):
        assign(wo_ep, sizes, token)
    assign(tokens, dict(sizes, dp=DP // EP), "ep")
    return coords


def check_against_brute_force(lay, TP, PP, DP, CP, EP, order):
    truth = rank_generator_coords(TP, PP, DP, CP, EP, order)
    assert lay.world_size == len(truth)
    by_mp_rank = {}
    for g, c in truth.items():
        assert lay.coords(g) == c, (order, TP, PP, DP, CP, EP, g)
        assert lay.global_rank(tp=c["tp"], pp=c["pp"], dp=c["dp"], cp=c["cp"]) == g
        by_mp_rank.setdefault((c["tp"], c["pp"]), []).append(g)
    assert len(by_mp_rank) == TP * PP
    for (t, p), gs in by_mp_rank.items():
        assert lay.mp_rank_ranks(t, p, all_dp_cp=True) == sorted(gs)
        zero = [g for g in gs if truth[g]["dp"] == 0 and truth[g]["cp"] == 0]
        assert lay.mp_rank_ranks(t, p, all_dp_cp=False) == zero
    assert lay.ranks(all_dp_cp=True) == sorted(truth.items())
    assert lay.ranks(all_dp_cp=False) == sorted(
        (g, c) for g, c in truth.items() if c["dp"] == 0 and c["cp"] == 0)


# Distinct sizes per dimension, so that a swapped pair of digits cannot go unnoticed.
SCALE_CONFIGS = [  # TP, PP, DP, CP, EP
    (2, 3, 4, 5, 2), (3, 2, 6, 1, 3), (1, 3, 4, 2, 4), (2, 1, 6, 3, 2), (4, 2, 3, 1, 1), (2, 2, 2, 2, 2),
]


@pytest.mark.parametrize("order", orders_with_ep_next_to_dp())
def test_rank_arithmetic_equals_megatron_rank_generator_brute_force(order):
    for TP, PP, DP, CP, EP in SCALE_CONFIGS:
        lay = ParallelLayout(tp=TP, pp=PP, dp=DP, cp=CP, ep=EP, order=order)
        check_against_brute_force(lay, TP, PP, DP, CP, EP, order)


def test_rank_arithmetic_brute_force_with_tokens_left_out_and_vpp():
    """Orders that leave out size-1 tokens (Megatron appends them), every size 1..3, EP | DP, and
    VPP/layers (which must not move a rank)."""
    base = ["tp", "cp", "ep", "dp", "pp"]
    for TP, PP, DP, CP in itertools.product((1, 2, 3), repeat=4):
        for EP in divisors(DP):
            sizes = {"tp": TP, "pp": PP, "dp": DP, "cp": CP, "ep": EP}
            kept = [t for t in base if sizes[t] > 1 or (t == "dp" and EP > 1)]
            for order in {"-".join(base), "-".join(kept) or "tp", "-".join(reversed(kept)) or "pp"}:
                vpp = 2 if PP > 1 else 1
                lay = ParallelLayout(tp=TP, pp=PP, dp=DP, cp=CP, ep=EP, order=order, vpp=vpp,
                                     num_layers=PP * vpp * 2)
                check_against_brute_force(lay, TP, PP, DP, CP, EP, order)


def test_default_order_equals_megatron_core_0_6_0_process_groups(monkeypatch):
    """The installed megatron-core 0.6.0 builds its groups with explicit loops (default order
    only): run initialize_model_parallel with torch.distributed stubbed to record the groups."""
    parallel_state = pytest.importorskip("megatron.core.parallel_state")
    import torch.distributed as dist

    for TP, PP, DP, CP, EP in [(2, 3, 4, 1, 2), (2, 2, 6, 1, 3), (2, 3, 2, 3, 1), (1, 2, 4, 2, 1), (4, 1, 4, 1, 4)]:
        world = TP * PP * DP * CP
        groups = []

        def new_group(ranks=None, timeout=None, backend=None, pg_options=None, **kw):
            if pg_options is not None:   # the gloo twins carry no name
                groups.append((pg_options, list(ranks)))
            return object()

        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
        monkeypatch.setattr(dist, "new_group", new_group)
        monkeypatch.setattr(parallel_state, "get_nccl_options", lambda name, cfgs: name)
        parallel_state.destroy_model_parallel()
        try:
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP,
                                                     context_parallel_size=CP, expert_model_parallel_size=EP)
        finally:
            parallel_state.destroy_model_parallel()
        coords = {g: {} for g in range(world)}
        for name, token in (("tp", "tp"), ("pp", "pp"), ("dp", "dp"), ("cp", "cp"), ("exp", "ep")):
            for ranks in (r for n, r in groups if n == name):
                for i, g in enumerate(ranks):
                    coords[g][token] = i
        lay = ParallelLayout(tp=TP, pp=PP, dp=DP, cp=CP, ep=EP)
        for g, c in coords.items():
            assert lay.coords(g) == c, (TP, PP, DP, CP, EP, g)
        assert coords == rank_generator_coords(TP, PP, DP, CP, EP, "tp-cp-ep-dp-pp")


def traced_lines(fn, module) -> int:
    """Python lines executed inside `module`'s source file while fn() runs (comprehension and
    generator iterations included): an operation count, independent of the machine's speed."""
    target = module.__file__
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == target else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def test_rank_enumeration_is_linear_in_the_ranks_listed():
    """Listing the ranks of every mp_rank -- what a plan does -- costs a bounded number of
    operations per rank listed and per mp_rank, up to 16,384 ranks (TP 8 x PP 64 x DP 32 x
    EP 32), for orders placing the replica digits fast, slow or dp-before-ep. Counted in executed
    lines of layout.py: doubling the mp_ranks or the replicas doubles the count (a per-mp_rank
    scan of every rank, as before, would quadruple it)."""
    import ckptmap.mapping.layout as layout_module

    def count(lay, all_dp_cp):
        listed = []

        def run():
            listed.append(sum(len(lay.mp_rank_ranks(t, p, all_dp_cp=all_dp_cp))
                              for p in range(lay.pp) for t in range(lay.tp)))
        lines = traced_lines(run, layout_module)
        assert listed == [lay.world_size if all_dp_cp else lay.tp * lay.pp]
        return lines

    for order in ("tp-cp-ep-dp-pp", "pp-tp-dp-ep-cp", "ep-dp-cp-tp-pp"):
        for grow in ("pp", "dp"):
            full, zero, worlds = [], [], []
            for k in (8, 16, 32, 64):
                PP, DP = (k, 32) if grow == "pp" else (64, k // 2)
                lay = ParallelLayout(tp=8, pp=PP, dp=DP, ep=min(DP, 32), vpp=2, num_layers=2 * PP, order=order)
                full.append(count(lay, True))
                zero.append(count(lay, False))
                worlds.append(lay.world_size)
                mp_ranks = lay.tp * lay.pp
                assert full[-1] <= 2 * lay.world_size + 20 * mp_ranks + 100, (order, PP, DP, full[-1])
                assert zero[-1] <= 20 * mp_ranks, (order, PP, DP, zero[-1])
            if grow == "pp":
                # each step doubles the mp_ranks and the ranks: the work doubles, no more
                for series in (full, zero):
                    for a, b in zip(series, series[1:]):
                        assert 1.5 * a <= b <= 2.1 * a, (order, grow, series)
            else:
                # same mp_ranks, more replicas each: every rank added costs the same few steps
                steps = [(b - a) / (wb - wa) for a, b, wa, wb in zip(full, full[1:], worlds, worlds[1:])]
                assert all(0.5 <= x <= 2 for x in steps) and max(steps) <= 1.2 * min(steps), steps
                assert len(set(zero)) == 1, zero   # the zero-redundancy listing does not depend on DP
    # the whole-world listings with coordinates, once each, are linear too (~20 lines a rank)
    for PP in (32, 64):
        lay = ParallelLayout(tp=8, pp=PP, dp=32, ep=32)
        n_full = traced_lines(lambda: lay.ranks(all_dp_cp=True), layout_module)
        n_zero = traced_lines(lambda: lay.ranks(all_dp_cp=False), layout_module)
        assert n_full <= 25 * lay.world_size and n_zero <= 25 * lay.tp * lay.pp, (PP, n_full, n_zero)


def test_stage_major_puts_a_stages_ranks_together():
    """(tp, pp, ep) keys sorted stage by stage: pipeline rank, then expert rank, then tensor rank (written out)."""
    from ckptmap.mapping.layout import stage_major

    keys = [(tp, pp, ep) for tp in range(2) for pp in range(2) for ep in range(2)]
    assert sorted(keys, key=stage_major) == [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1),
                                             (0, 1, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1)]
