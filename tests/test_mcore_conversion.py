"""Against the real megatron-core 0.6.0 (DDP buffers + DistributedOptimizer, in-process over gloo):
the bucket layout ckptmap derives from a checkpoint equals the live param_index_map and bucket
sizes; a distrib_optim.pt written by the real save_parameter_state converts to the live optimizer's
values; and the real load_parameter_state loads what ms2pt writes back."""

import json
import random

import mindspore as ms
import numpy as np
import pytest

from ckptmap.cli import main
from mcore_harness import Case, HarnessError, run_case
from test_hooks_megatron import hook_setup


def random_cases(n, seed=1234):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        dp = rng.choice([1, 2, 2, 3, 4, 8] if i == 0 else [1, 2, 2, 3, 4])
        cp = 2 if i % 4 == 3 else 1
        if cp == 2:
            dp = 2   # the combination the harness runs context parallelism with on CPU
        overlap = rng.random() < 0.6
        cases.append(Case(
            dp=dp, cp=cp, num_layers=rng.choice([1, 2, 3]), hidden=rng.choice([8, 12, 16, 17]),
            ffn=rng.choice([16, 24, 33]), heads=2, vocab=rng.choice([31, 37, 64]),
            swiglu=rng.random() < 0.5, bias=rng.random() < 0.5, overlap_grad_reduce=overlap,
            bucket_size=rng.choice([None, 100, 257, 600]) if overlap else None,
            tied_embeddings=rng.random() < 0.3, seed=i))
    return cases


CASES = random_cases(10)


@pytest.mark.parametrize("case", CASES, ids=[f"dp{c.dp}cp{c.cp}-L{c.num_layers}h{c.hidden}-"
                                             f"{'ov' + str(c.bucket_size) if c.overlap_grad_reduce else 'noov'}"
                                             for c in CASES])
def test_derived_layout_and_values_match_live_megatron(case, tmp_path):
    megatron_dir = tmp_path / "megatron"
    truth = run_case(case, megatron_dir)
    ms_dir = tmp_path / "ms"
    # no param_map anywhere: the layout is derived from the checkpoint and the rules' bucket block
    assert main(["pt2ms", "--megatron-path", str(megatron_dir), "--ms-path", str(ms_dir), "--no-progress",
                 "--rules", "megatron_core_gpt"]) == 0
    derived = json.loads((ms_dir / "pt_meta" / "param_map_buffer0_dp0tp0pp0vpp0.json").read_text())
    live_map = truth["param_index_map"][0]
    assert list(derived) == list(live_map)                      # names and buffer order
    for name, (dtype, shape, start, end, bucket) in derived.items():
        assert (start, end, bucket) == tuple(live_map[name]), name
        assert tuple(shape) == tuple(truth["shapes"][name]) and dtype == "torch.bfloat16"
    padded = [e - s for s, e in truth["bucket_indices"][0]]
    assert padded == list(next(iter(truth["per_bucket_numel"][0].values())))

    got = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(ms_dir / "rank_0" / "network.ckpt")).items()}
    for ddp_name, states in truth["live"].items():
        name = ddp_name[len("module."):]
        for state, prefix in (("param", ""), ("exp_avg", "exp_avg."), ("exp_avg_sq", "exp_avg_sq.")):
            want = states[state].numpy()
            assert np.array_equal(got[prefix + name].view(np.uint32), want.view(np.uint32)), (state, name)


@pytest.mark.parametrize("case", [
    Case(dp=2, hidden=12, ffn=33, num_layers=2, overlap_grad_reduce=True, bucket_size=300, seed=7),
    Case(dp=4, hidden=16, num_layers=1, swiglu=True, seed=8),
], ids=["dp2-buckets", "dp4"])
def test_real_load_parameter_state_reads_ms2pt_output(case, tmp_path):
    a = tmp_path / "A"
    truth = run_case(case, a)
    b, c = tmp_path / "B", tmp_path / "C"
    assert main(["pt2ms", "--megatron-path", str(a), "--ms-path", str(b), "--no-progress"]) == 0
    assert main(["ms2pt", "--ms-path", str(b), "--megatron-path", str(c), "--no-progress"]) == 0
    produced = c / "iter_0000001" / "mp_rank_00" / "distrib_optim.pt"
    # C carries the (derived) param_map in its iter dir, so ckptmap's Megatron load hook checks it too
    assert sorted(p.name for p in (c / "iter_0000001" / "param_map").iterdir()) == [
        f"param_map_buffer0_dp{d}tp0pp0vpp0.json" for d in range(case.dp)]
    loaded = run_case(case, tmp_path / "unused", load_from=produced, rank_setup=hook_setup, megatron_training=True)
    for name, states in truth["live"].items():
        for state in ("param", "exp_avg", "exp_avg_sq"):
            assert np.array_equal(loaded["live"][name][state].numpy().view(np.uint32),
                                  states[state].numpy().view(np.uint32)), (state, name)
    # and the hook really checks it: a param_map that swaps two parameters is refused
    for path in (c / "iter_0000001" / "param_map").iterdir():
        entries = list(json.loads(path.read_text()).items())
        (k0, v0), (k1, v1) = entries[0], entries[1]
        entries[0], entries[1] = (k1, v0), (k0, v1)
        path.write_text(json.dumps(dict(entries)))
    with pytest.raises(HarnessError, match=f"first differ at parameter {k1}"):
        run_case(case, tmp_path / "unused2", load_from=produced, rank_setup=hook_setup, megatron_training=True)
