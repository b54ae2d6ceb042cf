"""Self-tests of tests/mcore_harness: it runs the real megatron-core 0.6.0, and what it returns is
consistent with the files Megatron itself wrote (distrib_optim.pt by the DistributedOptimizer,
model_optim_rng.pt as save_checkpoint builds it)."""
import argparse
import math
import time

import pytest
import torch

from mcore_harness import Case, HarnessError, run_case

DTYPES = (torch.bfloat16, torch.float32)

CASES = {
    "dp1": Case(dp=1),
    "dp2_odd_tied": Case(dp=2, hidden=17, tied_embeddings=True),
    "dp4_swiglu_2steps": Case(dp=4, swiglu=True, bias=False, vocab=41, steps=2),
    "dp2_buckets": Case(dp=2, hidden=17, overlap_grad_reduce=True, bucket_size=300),
    "dp2cp2_buckets": Case(dp=2, cp=2, hidden=17, overlap_grad_reduce=True, bucket_size=300),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(key):
        if key not in cache:
            out = tmp_path_factory.mktemp(key)
            cache[key] = (CASES[key], out, run_case(CASES[key], out))
        return cache[key]

    return get


def _ckpt(out, case):
    d = out / f"iter_{case.steps:07d}" / "mp_rank_00"
    return (torch.load(d / "model_optim_rng.pt", map_location="cpu", weights_only=False),
            torch.load(d / "distrib_optim.pt", map_location="cpu", weights_only=False))


@pytest.mark.parametrize("key", list(CASES))
def test_layout_is_consistent(runs, key):
    case, _, res = runs(key)
    shard = case.dp * case.cp
    assert len(res["param_index_map"]) == 1  # one dtype -> one buffer
    index_map = res["param_index_map"][0]
    buckets = res["bucket_indices"][0]
    padded = res["per_bucket_numel"][0][DTYPES]
    unpadded = res["per_bucket_numel_unpadded"][0][DTYPES]
    assert len(buckets) == len(padded) == len(unpadded)

    # Buffer order is the reverse of registration order; every trainable param is in it.
    assert list(index_map) == res["registration_order"][::-1]
    assert set(index_map) == set(res["shapes"]) == set(res["param_dtype"]) == set(res["live"])
    assert set(res["param_dtype"].values()) == {"bfloat16"}

    # Buckets are contiguous from 0; each starts at the padded end of the previous one.
    assert buckets[0][0] == 0
    for b, (start, end) in enumerate(buckets):
        if b:
            assert start == buckets[b - 1][1]
        assert end - start == padded[b]
        assert padded[b] == math.ceil(unpadded[b] / shard) * shard  # padding rule: multiple of dp*cp
        assert end % shard == 0

    # Params are packed without gaps inside each bucket, from its start to its unpadded end.
    by_bucket = {}
    for name, (start, end, bucket) in index_map.items():
        assert end - start == math.prod(res["shapes"][name])
        by_bucket.setdefault(bucket, []).append((start, end))
    assert sorted(by_bucket) == list(range(len(buckets)))
    ids = [bucket for _, _, bucket in index_map.values()]
    assert ids == sorted(ids)
    for b, ranges in by_bucket.items():
        assert ranges[0][0] == buckets[b][0]
        for (_, prev_end), (start, _) in zip(ranges, ranges[1:]):
            assert start == prev_end
        assert ranges[-1][1] == buckets[b][0] + unpadded[b]

    # Bucket closing rule: one bucket without overlap; with it, a bucket closes at the first
    # parameter that brings it to >= bucket_size elements.
    if not case.overlap_grad_reduce:
        assert len(buckets) == 1
    else:
        assert res["ddp_bucket_size"] == case.bucket_size
        for b, ranges in by_bucket.items():
            sizes = [e - s for s, e in ranges]
            if b < len(buckets) - 1:
                assert sum(sizes) >= case.bucket_size > sum(sizes[:-1])
            else:
                assert sum(sizes[:-1]) < case.bucket_size
    assert res["overlap_grad_reduce"] == case.overlap_grad_reduce


@pytest.mark.parametrize("key", list(CASES))
def test_distrib_optim_matches_live_state(runs, key):
    """Megatron's own distrib_optim.pt, sliced with param_index_map at the *padded* bucket
    offsets, equals the live optimizer state stitched from every rank (bit for bit)."""
    case, out, res = runs(key)
    _, dist = _ckpt(out, case)
    assert list(dist) == ["per_bucket_numel", "per_bucket_numel_unpadded", 0]
    assert dist["per_bucket_numel"] == res["per_bucket_numel"]
    assert dist["per_bucket_numel_unpadded"] == res["per_bucket_numel_unpadded"]
    state = dist[0][DTYPES]
    assert list(state) == ["param", "exp_avg", "exp_avg_sq"]
    offsets = [start for start, _ in res["bucket_indices"][0]]
    for key_, tensors in state.items():
        assert [t.numel() for t in tensors] == res["per_bucket_numel"][0][DTYPES]
        assert all(t.dtype == torch.float32 for t in tensors)
    for name, (start, end, bucket) in res["param_index_map"][0].items():
        for key_ in ("param", "exp_avg", "exp_avg_sq"):
            got = state[key_][bucket][start - offsets[bucket]:end - offsets[bucket]]
            want = res["live"][name][key_]
            assert want.shape == res["shapes"][name] and want.dtype == torch.float32
            assert torch.equal(got, want.flatten()), (name, key_)
    # The step moved the params and filled the moments.
    assert any(float(v["exp_avg_sq"].abs().sum()) > 0 for v in res["live"].values())


@pytest.mark.parametrize("key", list(CASES))
def test_model_optim_rng_matches_live_params(runs, key):
    case, out, res = runs(key)
    sd, _ = _ckpt(out, case)
    assert list(sd) == ["args", "checkpoint_version", "iteration", "model", "optimizer",
                        "opt_param_scheduler", "rng_state", "num_floating_point_operations_so_far"]
    assert sd["checkpoint_version"] == 3.0 and sd["iteration"] == case.steps
    assert (out / "latest_checkpointed_iteration.txt").read_text() == str(case.steps)

    model = sd["model"]
    assert list(model) == res["state_dict_order"]
    assert [k for k in model if not k.endswith("._extra_state")] == \
        [n[len("module."):] for n in res["registration_order"]]
    assert all(model[k] is None for k in model if k.endswith("._extra_state"))

    # bf16 weights = fp32 main params rounded to bf16; all are views of the one DDP buffer.
    storages = set()
    buffer_numel = res["bucket_indices"][0][-1][1]
    for name, (start, _, _) in res["param_index_map"][0].items():
        t = model[name[len("module."):]]
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, res["live"][name]["param"].to(torch.bfloat16)), name
        assert t.storage_offset() == start
        storages.add(t.untyped_storage().data_ptr())
        assert t.untyped_storage().nbytes() == buffer_numel * 2
    assert len(storages) == 1

    args = sd["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
            args.num_query_groups, args.kv_channels, args.padded_vocab_size) == (
        case.num_layers, case.hidden, case.ffn, case.heads, case.heads, case.hidden // case.heads, case.vocab)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size,
            args.context_parallel_size, args.virtual_pipeline_model_parallel_size) == (1, 1, case.dp, case.cp, None)
    assert args.use_distributed_optimizer is True and args.overlap_grad_reduce == case.overlap_grad_reduce
    assert args.untie_embeddings_and_output_weights == (not case.tied_embeddings)
    assert args.params_dtype == torch.bfloat16 and args.bf16 and not args.fp16
    assert args.swiglu == case.swiglu and args.add_bias_linear == case.bias
    assert args.consumed_train_samples == sd["opt_param_scheduler"]["num_steps"]

    groups = sd["optimizer"]["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert all(g["step"] == case.steps and "params" not in g for g in groups)
    assert set(sd["opt_param_scheduler"]) == {"max_lr", "lr_warmup_steps", "num_steps", "lr_decay_style",
                                              "lr_decay_steps", "min_lr", "start_wd", "end_wd",
                                              "wd_incr_style", "wd_incr_steps"}
    assert isinstance(sd["rng_state"], list) and len(sd["rng_state"]) == 1


def test_tied_embeddings_share_one_parameter(runs):
    case, _, res = runs("dp2_odd_tied")
    names = set(res["param_index_map"][0])
    assert "module.embedding.word_embeddings.weight" in names
    assert "module.output_layer.weight" not in names
    assert "output_layer._extra_state" in res["state_dict_order"]
    # With pp = 1 the shared embedding is not split into a bucket of its own.
    assert len(res["bucket_indices"][0]) == 1


def test_context_parallel_trains_like_no_context_parallel(runs):
    """Same data per DP replica, same init: CP only splits the sequence. Checks the pure-torch TE
    attention stand-in and the CP batch split (up to bf16 noise; zero-gradient elements such as
    the key bias may flip the sign of their first Adam step, so params are not compared)."""
    _, _, ref = runs("dp2_buckets")
    _, _, cp = runs("dp2cp2_buckets")
    for name in ref["live"]:
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = ref["live"][name][key], cp["live"][name][key]
            assert (a - b).abs().max() <= 0.05 * a.abs().max() + 1e-12, (name, key)


def test_failing_ranks_report_tracebacks(tmp_path):
    with pytest.raises(HarnessError) as err:
        run_case(Case(dp=2, vocab=0), tmp_path, save=False, timeout=120)
    text = str(err.value)
    assert text.count("Traceback") == 2 and "--- rank 0 (exit code 1)" in text and "--- rank 1 (exit code 1)" in text
    assert "random_ expects" in text


def test_one_failing_rank_is_reported(tmp_path, monkeypatch):
    """Rank 1 dies after joining the process group; rank 0 then fails in (or, if gloo did not
    notice, is killed out of) its first collective. Rank 1's traceback is in the error."""
    monkeypatch.setenv("MCORE_HARNESS_FAULT", "1:raise")
    with pytest.raises(HarnessError) as err:
        run_case(Case(dp=2), tmp_path, save=False, timeout=120)
    text = str(err.value)
    assert "--- rank 1 (exit code 1)" in text and "injected failure on rank 1" in text
    assert "--- rank 0 (exit code 1)" in text or "--- rank 0: no report" in text


def test_hanging_rank_times_out(tmp_path, monkeypatch):
    monkeypatch.setenv("MCORE_HARNESS_FAULT", "1:hang")
    start = time.monotonic()
    with pytest.raises(HarnessError, match="timed out after 8 s") as err:
        run_case(Case(dp=2), tmp_path, save=False, timeout=8)
    assert time.monotonic() - start < 30
    assert "--- rank 0: no report" in str(err.value) and "--- rank 1: no report" in str(err.value)
