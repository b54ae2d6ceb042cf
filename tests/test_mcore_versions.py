"""Self-tests of tests/mcore_versions: the real megatron-core 0.8.0 / 0.12.1 / 0.16.1 train a step on
CPU, write legacy and torch_dist checkpoints, and the truth (read from the live objects) agrees
with itself, with the files, and with what each version's own loaders read back."""
import math
import pathlib
import signal

import pytest
import torch

from mcore_versions import (LOAD_FORMATS, SHARDING_TYPES, STANDARD_CASES, VERSIONS, Case, HarnessError,
                            assemble, run_jobs)
from mcore_versions.fixtures import mcore_standard  # noqa: F401  (session fixture)
from mcore_versions.pickles import load as load_pickle

pytestmark = [pytest.mark.mcore_versions, pytest.mark.slow]

PARAMS = [(v, n) for v in VERSIONS for n in STANDARD_CASES]
IDS = [f"{v}-{n}" for v, n in PARAMS]
STATES = ("param", "exp_avg", "exp_avg_sq")


def _bits(t):
    return t.reshape(-1).view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _expected_dirs(case):
    ep_size = case.ep
    out = []
    for tp in range(case.tp):
        for pp in range(case.pp):
            for ep in range(ep_size):
                name = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if case.pp > 1 else "") + (f"_{ep:03d}" if ep_size > 1 else "")
                out.append(((tp, pp, ep), name))
    return out


def test_versions_match_makefile():
    mk = (pathlib.Path(__file__).parent / "mcore_versions" / "versions.mk").read_text()
    line = next(x for x in mk.splitlines() if x.startswith("MCORE_VERSIONS"))
    assert tuple(line.split(":=")[1].split()) == VERSIONS


# ------------------------------------------------------------------------------------- truth

@pytest.mark.parametrize("version,name", PARAMS, ids=IDS)
def test_truth_layout_is_consistent(mcore_standard, version, name):
    run = mcore_standard(version, name)
    case, truth = run.case, run.truth
    assert sorted(truth["ranks"]) == sorted(k for k, _ in _expected_dirs(case))
    saw_gap = False
    for (tp, pp, ep), rk in truth["ranks"].items():
        assert len(rk["chunks"]) == (case.vpp or 1)
        for ci, ch in enumerate(rk["chunks"]):
            kinds = [b["kind"] for b in ch["buffers"]]
            assert kinds == (["dense", "expert"] if case.num_experts else ["dense"])
            for buf in ch["buffers"]:
                dp_size = case.dp // case.ep if buf["kind"] == "expert" else case.dp
                assert buf["dp_size"] == dp_size
                buckets = buf["bucket_indices"]
                assert buckets[0][0] == 0 and buf["numel"] == buckets[-1][1]
                for b, (s, e) in enumerate(buckets):
                    if b:
                        assert s == buckets[b - 1][1]
                    assert e % math.lcm(dp_size, 128) == 0, (s, e)       # 0.8+ bucket-end padding
                # params: in registration order reversed, 64-aligned, inside their bucket, no overlap
                names = [n for n in ch["registration_order"] if n in buf["param_index_map"]]
                assert list(buf["param_index_map"]) == names[::-1]
                prev_end, prev_b, ends = 0, None, {}
                for n, (s, e, b) in buf["param_index_map"].items():
                    assert s % 64 == 0 and s >= prev_end, (n, s, prev_end)
                    saw_gap |= b == prev_b and s > prev_end
                    prev_b = b
                    assert buckets[b][0] <= s < e <= buckets[b][1]
                    assert e - s == math.prod(ch["shapes"][n])
                    ends[b] = e
                    prev_end = e
                # a bucket's "unpadded" size ends at its last parameter, except a bucket closed because a
                # shared embedding opens the next one: that one ends at the embedding's 64-aligned start
                for b, (s, e) in enumerate(buckets):
                    assert buf["bucket_numel_unpadded"][b] in (ends[b] - s, math.ceil(ends[b] / 64) * 64 - s), b
                assert buf["numel_unpadded"] == sum(buf["bucket_numel_unpadded"])
            dense = ch["buffers"][0]
            if case.overlap_grad_reduce and pp == 0 and ci == 0:
                assert len(dense["bucket_indices"]) >= 2
            elif pp > 0 or ci > 0:
                # Megatron buckets only chunk 0 of pipeline rank 0; elsewhere one bucket, plus one
                # of its own for a shared (tied) embedding
                shared = [n for n in dense["param_index_map"] if n.endswith(("word_embeddings.weight", "output_layer.weight"))]
                assert len(dense["bucket_indices"]) == 1 + (1 if shared and case.tied_embeddings and case.pp > 1 else 0)
            # live values: bf16 weight = fp32 main param rounded; the step filled the moments
            for n, st in ch["live"].items():
                assert st["param"].dtype == torch.float32 and st["weight"].dtype == torch.bfloat16
                assert tuple(st["param"].shape) == ch["shapes"][n]
                assert torch.equal(st["weight"], st["param"].to(torch.bfloat16)), n
                assert not st["param"].isnan().any()
            assert any(float(st["exp_avg_sq"].abs().sum()) > 0 for st in ch["live"].values())
        # the optimizer's own per-bucket sizes (what save_parameter_state works from) match the buffers
        for opt in rk["optimizers"]:
            for (ci, kind, bi), padded, unpadded in zip(opt["buffers"], opt["per_bucket_numel"],
                                                         opt["per_bucket_numel_unpadded"]):
                buf = [b for b in rk["chunks"][ci]["buffers"] if b["kind"] == kind][bi]
                assert list(padded.values()) == [[e - s for s, e in buf["bucket_indices"]]]
                assert list(unpadded.values()) == [buf["bucket_numel_unpadded"]]
    # hidden 40 is not a multiple of 64: the 64-element alignment leaves visible gaps
    assert case.hidden % 64 and saw_gap


# ------------------------------------------------------------------------------------- legacy

def _coalesced_offsets(buf):
    """Offset of each bucket in distrib_optim.pt's bucket-coalesced, unpadded buffer tensors."""
    offs, acc = [], 0
    for n in buf["bucket_numel_unpadded"]:
        offs.append(acc)
        acc += n
    return offs


@pytest.mark.parametrize("version,name", PARAMS, ids=IDS)
def test_legacy_checkpoint_files(mcore_standard, version, name):
    run = mcore_standard(version, name)
    case, truth = run.case, run.truth
    legacy = run.dir / "legacy"
    assert (legacy / "latest_checkpointed_iteration.txt").read_text() == "1"
    expected = _expected_dirs(case)
    assert sorted(p.name for p in (legacy / "iter_0000001").iterdir()) == sorted(n for _, n in expected)
    chunks = case.vpp or 1
    for key, dirname in expected:
        rk = truth["ranks"][key]
        d = legacy / "iter_0000001" / dirname
        assert sorted(p.name for p in d.iterdir()) == ["distrib_optim.pt", "model_optim_rng.pt"]
        sd, globals_seen = load_pickle(d / "model_optim_rng.pt")
        models = ["model"] if chunks == 1 else [f"model{i}" for i in range(chunks)]
        keys = ["args", "checkpoint_version", "iteration", *models, "optimizer", "opt_param_scheduler"]
        if version == "0.12.1" or (version == "0.16.1" and "rerun_state_machine" in sd):
            keys.append("rerun_state_machine")
        keys += ["rng_state", "num_floating_point_operations_so_far"]
        assert list(sd) == keys
        assert sd["checkpoint_version"] == 3.0 and sd["iteration"] == 1
        args = sd["args"]
        assert args.params_dtype == torch.bfloat16
        assert type(args.model_type).__name__ == "ModelType"
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size,
                args.expert_model_parallel_size, args.virtual_pipeline_model_parallel_size) == (
            case.tp, case.pp, case.dp, case.ep, case.vpp)
        if version == "0.16.1":
            assert args.exit_signal == signal.SIGTERM and "signal.Signals" in globals_seen
        if version != "0.8.0":
            assert type(args.attention_backend).__name__ == "AttnBackend"
        assert isinstance(sd["rng_state"], list) and len(sd["rng_state"]) == 1
        groups = sd["optimizer"]["optimizer"]["param_groups"] if "optimizer" in sd["optimizer"] else \
            [g for o in sd["optimizer"] for g in o["optimizer"]["param_groups"]]
        assert groups and all(g.get("step") == 1 for g in groups if "step" in g)
        # model weights: the live bf16 weights, all views of the chunk's one DDP buffer storage
        for ci, mkey in enumerate(models):
            ch = rk["chunks"][ci]
            model = sd[mkey]
            flat = {}

            def walk(prefix, x):
                for k, v in x.items():
                    if isinstance(v, dict):
                        walk(f"{prefix}{k}.", v)
                    else:
                        flat[f"{prefix}{k}"] = v
            walk("", model)
            assert list(flat) == ch["state_dict_keys"]
            storages = set()
            for n, st in ch["live"].items():
                t = flat[n[len("module."):]]
                assert torch.equal(_bits(t), _bits(st["weight"])), n
                storages.add(t.untyped_storage().data_ptr())
            assert len(storages) == len(ch["buffers"])
        # distrib_optim.pt: DP rank 0 of each (sub-)optimizer; ChainedOptimizer (MoE) saves a list
        dist = torch.load(d / "distrib_optim.pt", map_location="cpu", weights_only=True)
        states = dist if isinstance(dist, list) else [dist]
        assert len(states) == len(rk["optimizers"])
        for opt, state in zip(rk["optimizers"], states):
            if state is None:
                # this (tp, pp, ep)'s writer rank is not DP rank 0 of that optimizer
                assert opt["dp_rank"] != 0
                continue
            assert opt["dp_rank"] == 0
            assert state["buckets_coalesced"] is True
            assert list(state) == ["buckets_coalesced", *range(len(opt["buffers"]))]
            for gi, (ci, kind, bi) in enumerate(opt["buffers"]):
                ch = rk["chunks"][ci]
                buf = [b for b in ch["buffers"] if b["kind"] == kind][bi]
                (dtypes, tensors), = state[gi].items()
                assert dtypes == (torch.bfloat16, torch.float32)
                assert list(tensors) == ["param", "exp_avg", "exp_avg_sq", "numel_unpadded"]
                assert tensors["numel_unpadded"] == buf["numel_unpadded"]
                offs = _coalesced_offsets(buf)
                covered = torch.zeros(buf["numel_unpadded"], dtype=torch.bool)
                for n, (s, e, b) in buf["param_index_map"].items():
                    o = offs[b] + s - buf["bucket_indices"][b][0]
                    covered[o:o + e - s] = True
                    for k in STATES:
                        assert torch.equal(_bits(tensors[k][o:o + e - s]), _bits(ch["live"][n][k])), (n, k)
                for k in STATES:  # the 64-alignment gaps inside buckets stay in the file, as zeros
                    assert tensors[k].shape == (buf["numel_unpadded"],)
                    assert not tensors[k][~covered].any()


# ---------------------------------------------------------------------------------- torch_dist

def _from_nd_flattened(t, global_shape):
    """fully_sharded_model_space stores each optimizer tensor "nd-flattened": shape
    ``(*axis_fragmentations, numel of one fragment)``; fragment ``idx`` is the row-major flattening
    of the global tensor's block ``idx``."""
    import itertools

    if tuple(t.shape) == tuple(global_shape):  # 0.8.0 keeps unfragmented 1-D tensors as they are
        return t
    frags = tuple(t.shape[:-1])
    assert len(frags) == len(global_shape), (tuple(t.shape), tuple(global_shape))
    block = [g // f for g, f in zip(global_shape, frags)]
    out = torch.empty(tuple(global_shape), dtype=t.dtype)
    for idx in itertools.product(*(range(f) for f in frags)):
        out[tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))] = t[idx].reshape(block)
    return out


@pytest.mark.parametrize("version,name", PARAMS, ids=IDS)
def test_torch_dist_matches_assembled_truth(mcore_standard, version, name):
    """Full tensors assembled from megatron's own sharded_state_dict() metadata in the truth equal the
    model tensors in the default torch_dist save (and, for fully_sharded_model_space, the optimizer's
    fp32 params and moments)."""
    run = mcore_standard(version, name)
    st = SHARDING_TYPES[version][0]
    it = run.dir / f"torch_dist_{st}" / "iter_0000001"
    assert {"common.pt", "metadata.json", ".metadata"} <= {p.name for p in it.iterdir()}
    assert any(p.suffix == ".distcp" for p in it.iterdir())
    flat = load_pickle(run.flat_torch_dist)[0]   # dcp_to_torch_save of `it`, done by the version's launcher
    weights = assemble(run.truth, "weight")
    assert weights
    for k, t in weights.items():
        assert torch.equal(_bits(flat[k]), _bits(t)), k
    if st == "fully_sharded_model_space":
        prefixes = ["chained_0.", "chained_1."] if run.case.num_experts else [""]
        for state, file_state in (("param", "fp32_param"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
            for k, t in assemble(run.truth, state).items():
                hits = [p for p in prefixes if f"{p}optimizer.state.{file_state}.{k}" in flat]
                assert len(hits) == 1, (k, state)
                got = _from_nd_flattened(flat[f"{hits[0]}optimizer.state.{file_state}.{k}"], t.shape)
                assert torch.equal(_bits(got), _bits(t)), (k, state)


# ------------------------------------------------------------------------------------ reload

LOADS = [(v, n, f, st) for v, n in PARAMS for f, st in LOAD_FORMATS(v)]


@pytest.mark.parametrize("version,name,fmt,sharding_type", LOADS,
                         ids=[f"{v}-{n}-{f}{'-' + st if st else ''}" for v, n, f, st in LOADS])
def test_version_reloads_its_own_checkpoint(mcore_standard, version, name, fmt, sharding_type):
    """The version's own load_parameter_state / dist_checkpointing.load, into a model and optimizer
    poisoned with NaN, gives back exactly the live values (bit for bit) and the same layout."""
    run = mcore_standard(version, name)
    got = run.reloaded[(fmt, sharding_type)]
    assert got["extra"]["iteration"] == 1
    bug = version == "0.16.1" and sharding_type == "fully_reshardable"
    wrong_single, wrong_multi = [], []
    for key, rk in run.truth["ranks"].items():
        for ci, ch in enumerate(rk["chunks"]):
            gch = got["ranks"][key]["chunks"][ci]
            for k in ("registration_order", "shapes", "buffers", "sharded"):
                assert gch[k] == ch[k], k
            multi = {n for b in ch["buffers"] if len(b["bucket_indices"]) > 1 for n in b["param_index_map"]}
            for n, st in ch["live"].items():
                assert torch.equal(_bits(gch["live"][n]["weight"]), _bits(st["weight"])), n
                for s in STATES:
                    if not torch.equal(_bits(gch["live"][n][s]), _bits(st[s])):
                        (wrong_multi if n in multi else wrong_single).append((key, ci, n, s))
    if not bug:
        assert not wrong_single and not wrong_multi
    else:
        # megatron-core 0.16.1 bug (see README): fully_reshardable's save slices the bucket-coalesced,
        # unpadded optimizer tensors with the *padded* buffer offsets, so every buffer with more than
        # one (padded) bucket saves shifted optimizer state. Single-bucket buffers are exact.
        assert not wrong_single
        assert wrong_multi


@pytest.mark.parametrize("version", VERSIONS)
def test_load_at_another_layout(mcore_standard, version):
    """The load mode at a different layout than the save (0.8 / 0.12: TP 2 PP 2 VPP 2 DP 2 ->
    TP 1 PP 2 DP 2 from fully_sharded_model_space; 0.16: DP 2 -> DP 1 from dp_reshardable): the
    global tensors assembled from the loaded truth equal those of the saved run."""
    run = mcore_standard(version, "dense")
    sharding_type, case, loaded = run.resharded
    assert loaded["sizes"]["world"] == case.world != run.case.world
    for state in ("weight", "param", "exp_avg", "exp_avg_sq"):
        want, got = assemble(run.truth, state), assemble(loaded, state)
        assert sorted(want) == sorted(got)
        for k in want:
            assert torch.equal(_bits(got[k]), _bits(want[k])), (k, state)


# ------------------------------------------------------------------------------------ failures

def test_failing_and_hanging_ranks_are_reported(tmp_path):
    """One launcher, two jobs: rank 1 raises right after joining the process group (its traceback
    is in the error, rank 0's report too), then rank 1 hangs (the job times out; no rank reports)."""
    case = Case(version="0.12.1", dp=2, num_layers=1)
    raised, hung = run_jobs("0.12.1", [("generate", case, tmp_path / "a", {"fault": "1:raise"}),
                                       ("generate", case, tmp_path / "b", {"fault": "1:hang"})],
                            timeout=6, raise_errors=False)
    assert isinstance(raised, HarnessError) and isinstance(hung, HarnessError)
    text = str(raised)
    assert "--- rank 1 (exit code 1) ---" in text and "injected failure on rank 1" in text
    assert "--- rank 0" in text
    assert "timed out after 6 s" in str(hung) and "--- rank 1: no report" in str(hung)
