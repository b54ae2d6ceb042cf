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
