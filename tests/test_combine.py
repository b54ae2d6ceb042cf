"""`ckptmap combine` against shards built here, independently of ckptmap's bucket engine, from the
description of formats.md §3.4, and written and read back with the real mindspore.save_checkpoint /
mindspore.load_checkpoint.

The MindSpeed layout as this test builds it: one buffer per parameter dtype (in order of first
appearance), parameters in reverse registration order, every parameter followed by padding up to a
multiple of 512 bytes of its dtype, a bucket closing once its (aligned) fill reaches bucket_size
elements, each bucket padded to a multiple of dp·512 bytes; DP rank k holds [k·n/dp, (k+1)·n/dp)
of each bucket. Padding positions hold a sentinel (-7.0), so a merge that reads any padding fails.
"""

import json
import math
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from ckptmap.cli import main
from mindspeed_reference import key_of, reference_layout

SENTINEL = np.float32(-7.0)
STATES = ("", "exp_avg", "exp_avg_sq")
HIDDEN = 16
BUCKET_SIZE = 1000  # elements


# ------------------------------------------------------------------------------------------------
# A tiny model, split by TP and PP the way MindSpeed names it


def model_params(tp_size, pp, pp_size):
    """[(name, shape, dtype)] in registration order for one (tp, pp) rank; one layer per stage."""
    out = []
    if pp == 0:
        out.append(("language_model.embedding.word_embeddings.weight", (40 // tp_size, HIDDEN), "bfloat16"))
    pre = f"language_model.encoder.layers.{pp}."
    out += [
        (pre + "input_norm.weight", (HIDDEN,), "float32"),
        (pre + "attention.qkv_proj.weight", (48 // tp_size, HIDDEN), "bfloat16"),
        (pre + "attention.out_proj.weight", (HIDDEN, HIDDEN // tp_size), "bfloat16"),
        (pre + "post_attention_norm.weight", (HIDDEN,), "float32"),
        (pre + "mlp.mapping.weight", (64 // tp_size, HIDDEN), "bfloat16"),
        (pre + "mlp.projection.weight", (HIDDEN, 32 // tp_size), "bfloat16"),
    ]
    if pp == pp_size - 1:
        out += [("language_model.encoder.final_norm.weight", (HIDDEN,), "float32"),
                ("language_model.output_layer.weight", (40 // tp_size, HIDDEN), "bfloat16")]
    return out


def zero3_params(pp):
    return [(f"language_model.encoder.layers.{pp}.moe.experts.weight", (13, HIDDEN)),
            (f"language_model.encoder.layers.{pp}.moe.router.weight", (5, 3))]


def mindspeed_buffers(params, dp, bucket_size=BUCKET_SIZE):
    """{buffer index: (slots [(name, shape, dtype, start, end, bucket)], buckets [(padded, unpadded)])}."""
    return reference_layout(params, dp, bucket_size)


def shard_info_json(dp_ranks, buffers, zero3):
    param_info, buffer_info = {}, {}
    for i, (slots, buckets) in buffers.items():
        for name, shape, dtype, start, end, bucket in slots:
            param_info[name] = {"range_map": [i, bucket, start, end], "shape": list(shape), "dtype": dtype}
        buffer_info[str(i)] = {"buckets": {str(j): list(b) for j, b in enumerate(buckets)},
                               "buffer_size": sum(b[0] for b in buckets),
                               "buffer_numel_unpadded": sum(b[1] for b in buckets), "bucket_num": len(buckets)}
    return {"dp_rank_list": list(dp_ranks), "param_info": param_info, "zero3_params": [n for n, _ in zero3],
            "buffer_info": buffer_info}


def save_ms(path, tensors, fmt):
    obj = {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint(obj, str(path), format=fmt)


def load_ms(path, fmt=None):
    fmt = fmt or Path(path).suffix[1:]
    params = ms.load_checkpoint(str(path), format=fmt) if fmt == "safetensors" else ms.load_checkpoint(str(path))
    return {k: v.asnumpy() for k, v in params.items()}


def bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def scalars_for(g, step):
    rng = np.random.default_rng(1000 * g + step)
    return {
        "state_step": np.array([step], np.float32),
        "learning_rate_group_0": np.float32(1e-3 / step), "weight_decay_group_0": np.float32(0.1),
        "learning_rate_group_1": np.float32(1e-3 / step), "weight_decay_group_1": np.float32(0.0),
        "max_lr": np.float64(1e-3), "num_steps": np.int64(step * 8), "lr_decay_style": np.int64(3),
        "step_num": np.int64(step), "epoch_num": np.int64(0), "iteration": np.int64(step),
        "rng_state": rng.integers(0, 255, 16, dtype=np.uint8),  # differs per rank: must come from the lowest
    }


OPTIMIZER_SCALARS = {"state_step", "learning_rate_group_0", "weight_decay_group_0", "learning_rate_group_1",
                     "weight_decay_group_1"}


def build_run(root, *, tp_size, pp_size, dp, steps=(1,), fmt="ckpt", layout="v1", rank_steps=None):
    """Write a MindSpeed distributed-optimizer checkpoint; return {dp-0 rank: {step: expected merged dict}}.

    Global rank g = tp + TP·(dp + DP·pp) (order tp-dp-pp). ``rank_steps`` overrides the steps saved
    by particular ranks ({g: steps})."""
    root = Path(root)
    truth = {}
    for pp in range(pp_size):
        for tp in range(tp_size):
            ranks = [tp + tp_size * (d + dp * pp) for d in range(dp)]
            params = model_params(tp_size, pp, pp_size)
            buffers = mindspeed_buffers(params, dp)
            z3 = zero3_params(pp)
            info = shard_info_json(ranks, buffers, z3)
            mp_dir = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if pp_size > 1 else "")
            info_path = (root / "opt_shard_info" / f"rank_{ranks[0]}" / f"dist_opt_shard_info_rank_{ranks[0]}-0_0.json"
                         if layout == "v1" else root / "opt_shard_info" / mp_dir /
                         "dist_opt_shard_info_model_optim_rng.json")
            info_path.parent.mkdir(parents=True, exist_ok=True)
            info_path.write_text(json.dumps(info))
            for d in range(1, dp):  # the other ranks' strategy folders exist but are empty
                if layout == "v1":
                    (root / "opt_shard_info" / f"rank_{ranks[d]}").mkdir(parents=True, exist_ok=True)
            truth[ranks[0]] = {}
            for step in sorted({s for r in ranks for s in (rank_steps or {}).get(r, steps)}):
                rng = np.random.default_rng([tp, pp, dp, step])
                expected = {}
                shards = [dict() for _ in range(dp)]
                for i, (slots, buckets) in buffers.items():
                    starts = np.cumsum([0] + [b[0] for b in buckets])
                    for s in STATES:
                        for j, (padded, _) in enumerate(buckets):
                            full = np.full(padded, SENTINEL, np.float32)
                            for name, shape, _, start, end, bucket in slots:
                                if bucket != j:
                                    continue
                                value = rng.standard_normal(shape).astype(np.float32)
                                expected[key_of(s, name)] = value
                                full[start - starts[j]:end - starts[j]] = value.reshape(-1)
                            n = padded // dp
                            for d in range(dp):
                                shards[d][key_of(s, f"buffer_{i}_bucket_{j}")] = full[d * n:(d + 1) * n].copy()
                for name, shape in z3:
                    for s in STATES:
                        value = rng.standard_normal(shape).astype(np.float32)
                        expected[key_of(s, name)] = value
                        for d, part in enumerate(np.array_split(value, dp, axis=0)):
                            shards[d][key_of(s, name)] = np.ascontiguousarray(part)
                for d in range(dp):
                    shards[d].update(scalars_for(ranks[d], step))
                expected.update(scalars_for(ranks[0], step))
                truth[ranks[0]][step] = expected
                for d, g in enumerate(ranks):
                    if step not in (rank_steps or {}).get(g, steps):
                        continue
                    path = (root / f"rank_{g}" / f"network_rank_{g}-0_{step}.{fmt}" if layout == "v1" else
                            root / f"iter_{step:07d}" / mp_dir / f"model_optim_rng_{d:03d}.{fmt}")
                    save_ms(path, shards[d], fmt)
    return truth


def combine(src, out, *extra, fmt="ckpt", dst="ckpt"):
    return main(["combine", "--strategy-dir", str(Path(src) / "opt_shard_info"), "--checkpoint-dir", str(src),
                 "--output-dir", str(out), "--src-format", fmt, "--dst-format", dst, "--no-progress",
                 "--multiprocess-off", *extra])


def assert_merged(path, expected, fmt=None):
    got = load_ms(path, fmt)
    assert set(got) == set(expected), (sorted(set(got) ^ set(expected)))
    for k, v in expected.items():
        assert bits_equal(got[k], v), k


# ------------------------------------------------------------------------------------------------
# Bit-exact merge


@pytest.mark.parametrize("pp_size", [1, 2])
@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_combine_v1_bit_exact(dp, tp_size, pp_size, tmp_path):
    src, out = tmp_path / "run", tmp_path / "merged"
    truth = build_run(src, tp_size=tp_size, pp_size=pp_size, dp=dp)
    layouts = [mindspeed_buffers(model_params(tp_size, pp, pp_size), dp) for pp in range(pp_size)]
    assert max(len(b) for lay in layouts for _, b in lay.values()) >= 2  # several buckets
    assert combine(src, out) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"rank_{g}/network_rank_{g}-0_1_dp_merged.ckpt" for g in truth)
    for g, by_step in truth.items():
        assert_merged(out / f"rank_{g}/network_rank_{g}-0_1_dp_merged.ckpt", by_step[1])


def test_merged_tensor_order_and_dtypes(tmp_path):
    src, out = tmp_path / "run", tmp_path / "merged"
    truth = build_run(src, tp_size=1, pp_size=1, dp=2)
    assert combine(src, out) == 0
    got = ms.load_checkpoint(str(out / "rank_0/network_rank_0-0_1_dp_merged.ckpt"))
    names = list(got)
    # parameters in buffer order, each followed by its moments (as the conversion guide lists them)
    assert names[:3] == ["language_model.output_layer.weight", "exp_avg.language_model.output_layer.weight",
                         "exp_avg_sq.language_model.output_layer.weight"]
    assert names[-len(scalars_for(0, 1)):] == list(scalars_for(0, 1))
    assert str(got["language_model.output_layer.weight"].dtype) == "Float32"
    assert str(got["step_num"].dtype) == "Int64" and str(got["max_lr"].dtype) == "Float64"
    assert tuple(got["state_step"].shape) == (1,)
    assert set(names) == set(truth[0][1])


@pytest.mark.parametrize("src_fmt,dst_fmt", [("safetensors", "ckpt"), ("ckpt", "safetensors"),
                                             ("safetensors", "safetensors")])
def test_formats(src_fmt, dst_fmt, tmp_path):
    src, out = tmp_path / "run", tmp_path / "merged"
    truth = build_run(src, tp_size=2, pp_size=1, dp=2, fmt=src_fmt)
    assert combine(src, out, fmt=src_fmt, dst=dst_fmt) == 0
    for g in truth:
        assert_merged(out / f"rank_{g}/network_rank_{g}-0_1_dp_merged.{dst_fmt}", truth[g][1], dst_fmt)


BIG = (4096, 4096)   # 64 MiB of fp32: 8x the executor's 8 MiB read chunk (byte_io.CHUNK)


def build_big_run(root, dp=3, fmt="ckpt"):
    """One DP group whose large parameter starts inside rank 0's shard and ends in the last rank's
    (after a small one): its merged value is a run of every rank's bytes. Returns the expected dict."""
    params = [("big.weight", BIG, "bfloat16"), ("small.weight", (100, 3), "bfloat16")]
    buffers = mindspeed_buffers(params, dp, bucket_size=None)   # one bucket
    (slots, ((padded, _),)), = buffers.values()
    info = root / "opt_shard_info" / "rank_0" / "dist_opt_shard_info_rank_0-0_0.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps(shard_info_json(range(dp), buffers, [])))
    rng = np.random.default_rng(14)
    full = np.full(padded, SENTINEL, np.float32)
    expected = {}
    for name, shape, _, start, end, _ in slots:
        expected[name] = rng.standard_normal(shape, dtype=np.float32)
        full[start:end] = expected[name].reshape(-1)
    n = padded // dp
    assert slots[1][0] == "big.weight" and slots[1][3] < n and (dp - 1) * n < slots[1][4]   # spans every rank
    for d in range(dp):
        save_ms(root / f"rank_{d}" / f"network_rank_{d}-0_1.{fmt}",
                {"buffer_0_bucket_0": full[d * n:(d + 1) * n], **scalars_for(d, 1)}, fmt)
    del full
    expected.update(scalars_for(0, 1))
    return expected


@pytest.mark.parametrize("dst,extra", [("ckpt", ()), ("ckpt", ("--crc",)), ("safetensors", ())])
def test_merged_tensor_streams_in_bounded_memory(tmp_path, dst, extra):
    """A parameter merged from several ranks' shards is copied run by run into the output record, never
    assembled: the peak of Python and numpy allocations while combining a 64 MiB tensor stays far below its
    size (tracemalloc sees numpy's buffers). The output is what mindspore.load_checkpoint reads as truth."""
    import tracemalloc

    src, out = tmp_path / "run", tmp_path / "merged"
    expected = build_big_run(src)
    tracemalloc.start()
    try:
        assert combine(src, out, *extra, dst=dst) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    nbytes = math.prod(BIG) * 4
    assert peak < nbytes // 4, f"combine held {peak / 2**20:.1f} MiB for a {nbytes / 2**20:.0f} MiB tensor"
    assert_merged(out / f"rank_0/network_rank_0-0_1_dp_merged.{dst}", expected)


def test_dry_run_says_merged_tensors_are_byte_copies(tmp_path, capsys):
    """--dry-run says how the executor makes the bytes: a parameter merged from several DP shards of one
    dtype is byte copies (the run-by-run streaming above), not computed."""
    src = tmp_path / "run"
    build_big_run(src)
    assert combine(src, tmp_path / "merged", "--dry-run") == 0
    how = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("how the bytes are made"))
    assert "byte copy" in how and "computed" not in how, how


@pytest.mark.parametrize("dp,tp_size,pp_size", [(2, 2, 2), (4, 1, 1)])
def test_combine_v2(dp, tp_size, pp_size, tmp_path):
    src, out = tmp_path / "run", tmp_path / "merged"
    truth = build_run(src, tp_size=tp_size, pp_size=pp_size, dp=dp, layout="v2", steps=(3, 5))
    assert combine(src, out) == 0
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "5"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.ckpt"))
    mp_dirs = [f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if pp_size > 1 else "")
               for pp in range(pp_size) for tp in range(tp_size)]
    assert written == sorted(f"iter_0000005/{d}/model_optim_rng.ckpt" for d in mp_dirs)
    for pp in range(pp_size):
        for tp in range(tp_size):
            g = tp + tp_size * dp * pp
            d = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if pp_size > 1 else "")
            assert_merged(out / f"iter_0000005/{d}/model_optim_rng.ckpt", truth[g][5])
    out3 = tmp_path / "merged3"
    assert combine(src, out3, "--iteration", "3") == 0
    first = "mp_rank_00" if pp_size == 1 else "mp_rank_00_000"
    assert_merged(out3 / f"iter_0000003/{first}/model_optim_rng.ckpt", truth[0][3])
    assert (out3 / "latest_checkpointed_iteration.txt").read_text() == "3"


def test_reference_defaults_and_rerun_in_place(tmp_path, monkeypatch):
    # combine_ckpt_dp_zero.py's defaults: output/opt_shard_info, output, output; merged files beside
    # the shards, which a second run does not mistake for shards
    from ckptmap.cli import build_parser

    ns = build_parser().parse_args(["combine"])
    assert (ns.strategy_dir, ns.checkpoint_dir, ns.output_dir) == ("output/opt_shard_info", "output", "output")
    assert (ns.src_format, ns.dst_format, ns.process_limit, ns.rank_section) == ("ckpt", "ckpt", 8, None)
    assert build_parser().parse_args(["combine", "--max-process-limit", "3"]).process_limit == 3
    assert build_parser().parse_args(["combine", "--process-limit", "2"]).process_limit == 2
    monkeypatch.chdir(tmp_path)
    truth = build_run("output", tp_size=2, pp_size=1, dp=2)
    for overwrite in ([], ["--overwrite"]):   # a second run into the same folder replaces only on request
        assert main(["combine", "--no-progress", "--max-proccess-limit", "2", *overwrite]) == 0
        for g in truth:
            assert_merged(Path(f"output/rank_{g}/network_rank_{g}-0_1_dp_merged.ckpt"), truth[g][1])
    assert sorted(p.name for p in Path("output/rank_0").iterdir()) == [
        "network_rank_0-0_1.ckpt", "network_rank_0-0_1_dp_merged.ckpt"]


def test_rerun_in_place_refuses_existing_merged_files_and_never_touches_the_shards(tmp_path, capsys):
    """--output-dir = --checkpoint-dir (the reference's default): the folder holds the run's shards,
    so only the files combine writes count — an existing merged file is refused without --overwrite,
    and --overwrite replaces exactly those files; shards and anything else stay."""
    src = tmp_path / "run"
    build_run(src, tp_size=1, pp_size=1, dp=2, steps=(1, 2))
    (src / "rank_1" / "notes.txt").write_text("mine")
    assert combine(src, src) == 0
    merged = src / "rank_0/network_rank_0-0_2_dp_merged.ckpt"
    everything = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    merged.write_bytes(b"an older merge")
    capsys.readouterr()
    assert combine(src, src) == 2
    err = capsys.readouterr().err
    assert "rank_0/network_rank_0-0_2_dp_merged.ckpt" in err and "--overwrite" in err
    assert merged.read_bytes() == b"an older merge"
    assert combine(src, src, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "replace" in printed and "rank_0/network_rank_0-0_2_dp_merged.ckpt" in printed
    assert "nothing else" in printed
    assert combine(src, src, "--overwrite") == 0
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == everything
    # a separate output folder belongs to the merge: a stray file there is refused, then removed
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stray.ckpt").write_bytes(b"x")
    assert combine(src, out) == 2
    assert "stray.ckpt" in capsys.readouterr().err
    assert combine(src, out, "--overwrite") == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "rank_0", "rank_0/network_rank_0-0_2_dp_merged.ckpt"]


@pytest.mark.parametrize("key", ["state_step", "iteration"])
def test_error_ranks_of_a_dp_group_at_different_steps(tmp_path, capsys, key):
    """Shards named as the same step whose contents are of different optimizer steps (a rank's file
    copied from another save) cannot be merged into one optimizer state."""
    src = tmp_path / "run"
    build_run(src, tp_size=2, pp_size=1, dp=2)
    path = src / "rank_3/network_rank_3-0_1.ckpt"
    tensors = load_ms(path)
    tensors[key] = np.asarray(tensors[key] + 1, dtype=tensors[key].dtype)
    save_ms(path, tensors, "ckpt")
    err = _refused(src, tmp_path / "out", capsys, key, "rank 1", "rank 3", "[1, 3]")
    assert "1" in err and "2" in err


def test_no_save_optim_drops_exactly_the_optimizer_keys(tmp_path):
    src, out = tmp_path / "run", tmp_path / "merged"
    truth = build_run(src, tp_size=1, pp_size=2, dp=2)
    assert combine(src, out, "--no-save-optim") == 0
    for g, by_step in truth.items():
        full = by_step[1]
        dropped = {k for k in full if k.startswith(("exp_avg.", "exp_avg_sq.")) or k in OPTIMIZER_SCALARS}
        assert {k for k in full if k.startswith("exp_avg")} and dropped >= OPTIMIZER_SCALARS
        kept = {k: v for k, v in full.items() if k not in dropped}
        assert "rng_state" in kept and "step_num" in kept and "max_lr" in kept
        assert_merged(out / f"rank_{g}/network_rank_{g}-0_1_dp_merged.ckpt", kept)


def test_copy_to_all_dp_ranks(tmp_path):
    src, out = tmp_path / "run", tmp_path / "merged"
    truth = build_run(src, tp_size=2, pp_size=1, dp=2)
    assert combine(src, out, "--copy-to-all-dp-ranks") == 0
    groups = {0: [0, 2], 1: [1, 3]}
    for g0, ranks in groups.items():
        first = (out / f"rank_{g0}/network_rank_{g0}-0_1_dp_merged.ckpt").read_bytes()
        for r in ranks:
            path = out / f"rank_{r}/network_rank_{r}-0_1_dp_merged.ckpt"
            assert path.read_bytes() == first
        assert_merged(out / f"rank_{ranks[-1]}/network_rank_{ranks[-1]}-0_1_dp_merged.ckpt", truth[g0][1])
    assert len(list(out.rglob("*.ckpt"))) == 4


def test_rank_section(tmp_path):
    src = tmp_path / "run"
    truth = build_run(src, tp_size=2, pp_size=2, dp=2)  # groups start at ranks 0, 1, 4, 5
    out = tmp_path / "a"
    assert combine(src, out, "--rank-section", "1", "5") == 0
    assert sorted(p.parent.name for p in out.rglob("*.ckpt")) == ["rank_1", "rank_4"]
    assert_merged(out / "rank_4/network_rank_4-0_1_dp_merged.ckpt", truth[4][1])
    out = tmp_path / "b"  # with copies: the section's own rank folders, even when dp rank 0 is outside it
    assert combine(src, out, "--rank-section", "2", "4", "--copy-to-all-dp-ranks") == 0
    assert sorted(p.parent.name for p in out.rglob("*.ckpt")) == ["rank_2", "rank_3"]
    assert_merged(out / "rank_3/network_rank_3-0_1_dp_merged.ckpt", truth[1][1])
    assert combine(src, tmp_path / "c", "--rank-section", "8", "9") == 2
    assert not (tmp_path / "c").exists()


def test_step_selection_latest_common_then_asked(tmp_path, capsys):
    src = tmp_path / "run"
    # rank 0 saved steps 1..3, rank 1 only 1..2 (its step-3 save never happened)
    truth = build_run(src, tp_size=1, pp_size=1, dp=2, rank_steps={0: (1, 2, 3), 1: (1, 2)})
    out = tmp_path / "merged"
    assert combine(src, out) == 0
    printed = capsys.readouterr().out
    assert "step 0_2" in printed and "rank_0: 0_3" in printed
    assert [p.name for p in out.rglob("*.ckpt")] == ["network_rank_0-0_2_dp_merged.ckpt"]
    assert_merged(out / "rank_0/network_rank_0-0_2_dp_merged.ckpt", truth[0][2])
    out1 = tmp_path / "merged1"
    assert combine(src, out1, "--iteration", "1") == 0
    assert_merged(out1 / "rank_0/network_rank_0-0_1_dp_merged.ckpt", truth[0][1])


def test_dry_run_shows_slices_and_writes_nothing(tmp_path, capsys):
    src, out = tmp_path / "run", tmp_path / "merged"
    build_run(src, tp_size=1, pp_size=1, dp=4)
    assert combine(src, out, "--dry-run", "--full") == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert "rank_0/network_rank_0-0_1_dp_merged.ckpt" in printed
    row = next(line for line in printed.splitlines()
               if line.strip().startswith("exp_avg.language_model.encoder.layers.0.mlp.mapping.weight "))
    assert "exp_avg.buffer_0_bucket_" in row and " + dp" in row  # spans two ranks' shards
    assert "moe.experts.weight: dim 0 of dp0..dp3 4+3+3+3" in printed


def test_multiprocess_run(tmp_path):
    src, out = tmp_path / "run", tmp_path / "merged"
    truth = build_run(src, tp_size=2, pp_size=2, dp=2)
    assert main(["combine", "--strategy-dir", str(src / "opt_shard_info"), "--checkpoint-dir", str(src),
                 "--output-dir", str(out), "--max-proccess-limit", "3", "--copy-to-all-dp-ranks",
                 "--no-progress"]) == 0
    for g, by_step in truth.items():
        assert_merged(out / f"rank_{g}/network_rank_{g}-0_1_dp_merged.ckpt", by_step[1])
    assert len(list(out.rglob("*.ckpt"))) == 8
    assert not [p for p in out.rglob("*") if "ckptmap-tmp" in p.name]


# ------------------------------------------------------------------------------------------------
# Refused inputs: exit code 2, a message naming the problem, nothing in --output-dir


def _refused(src, out, capsys, *words, extra=()):
    assert combine(src, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckptmap combine: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    assert not out.exists()
    return err


def test_error_ranks_disagree_on_steps(tmp_path, capsys):
    src = tmp_path / "run"
    build_run(src, tp_size=1, pp_size=1, dp=2, rank_steps={0: (2,), 1: (1,)})
    _refused(src, tmp_path / "out", capsys, "disagree", "rank_0: 0_2", "rank_1: 0_1")
    _refused(src, tmp_path / "out", capsys, "rank_1", "--iteration 2", extra=("--iteration", "2"))


def test_error_shard_of_wrong_length(tmp_path, capsys):
    src = tmp_path / "run"
    build_run(src, tp_size=1, pp_size=1, dp=2)
    path = src / "rank_1/network_rank_1-0_1.ckpt"
    tensors = load_ms(path)
    n = len(tensors["exp_avg.buffer_0_bucket_1"])
    tensors["exp_avg.buffer_0_bucket_1"] = tensors["exp_avg.buffer_0_bucket_1"][:-1]
    save_ms(path, tensors, "ckpt")
    _refused(src, tmp_path / "out", capsys, str(path), "exp_avg.buffer_0_bucket_1", f"[{n - 1}]", f"[{n}]")


def test_error_json_range_overruns_buffer(tmp_path, capsys):
    src = tmp_path / "run"
    build_run(src, tp_size=1, pp_size=1, dp=2)
    path = src / "opt_shard_info/rank_0/dist_opt_shard_info_rank_0-0_0.json"
    info = json.loads(path.read_text())
    size = info["buffer_info"]["0"]["buffer_size"]
    name = "language_model.embedding.word_embeddings.weight"
    b, j, start, end = info["param_info"][name]["range_map"]
    info["param_info"][name]["range_map"] = [b, j, size - 10, size - 10 + (end - start)]
    path.write_text(json.dumps(info))
    _refused(src, tmp_path / "out", capsys, str(path), name, "overruns buffer 0", str(size))


def test_error_missing_rank_folder(tmp_path, capsys):
    src = tmp_path / "run"
    build_run(src, tp_size=2, pp_size=1, dp=2)
    shutil.rmtree(src / "rank_3")
    _refused(src, tmp_path / "out", capsys, "rank_3", "missing", "[1, 3]")


def test_error_v2_shard_missing_for_the_asked_iteration(tmp_path, capsys):
    src = tmp_path / "run"
    build_run(src, tp_size=1, pp_size=1, dp=2, layout="v2", steps=(3, 5))
    (src / "iter_0000005/mp_rank_00/model_optim_rng_001.ckpt").unlink()
    out = tmp_path / "out"
    assert combine(src, out) == 0  # latest common iteration: 3
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "3"
    _refused(src, tmp_path / "out5", capsys, "mp_rank_00 dp 1 (rank 1)", "--iteration 5",
             extra=("--iteration", "5"))


def test_error_string_value_refused_before_writing(tmp_path, capsys):
    src = tmp_path / "run"
    build_run(src, tp_size=1, pp_size=1, dp=1)
    path = src / "rank_0/network_rank_0-0_1.ckpt"
    obj = {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in load_ms(path).items()}
    obj["note"] = "trained on cluster A"
    ms.save_checkpoint(obj, str(path))
    _refused(src, tmp_path / "out", capsys, str(path), "note", "string")


def test_error_json_of_other_dp_size(tmp_path, capsys):
    src = tmp_path / "run"
    build_run(src, tp_size=1, pp_size=1, dp=2)
    other = tmp_path / "other"
    build_run(other, tp_size=1, pp_size=1, dp=4)
    shutil.rmtree(src / "opt_shard_info")
    shutil.copytree(other / "opt_shard_info", src / "opt_shard_info")
    _refused(src, tmp_path / "out", capsys, "missing", "rank_2")


# ------------------------------------------------------------------------------------------------
# ckptmap's engine and JSON writer agree with the independent description


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_engine_and_writer_reproduce_the_layout(dp, tmp_path):
    from ckptmap.formats.opt_shard_info import read_opt_shard_info, write_opt_shard_info
    from ckptmap.mapping.buckets import ParamEntry, build_buffer, layout_env
    from ckptmap.mapping.rules import bundled_rules, load_rules

    rule = load_rules(bundled_rules()["megatron_legacy_gpt"]).bucket_layout("mindspeed")
    for pp in range(2):
        params = model_params(2, pp, 2)
        ranks = [1 + 2 * (d + dp * pp) for d in range(dp)]
        expected = shard_info_json(ranks, mindspeed_buffers(params, dp), [])
        env = layout_env(rule, {"dp": dp, "bucket_size": BUCKET_SIZE, "pp": 2,
                                "untie_embeddings_and_output_weights": True})
        layouts = []
        for dtype in dict.fromkeys(d for _, _, d in params):
            layouts.append(build_buffer(rule, [ParamEntry(n, s, d) for n, s, d in params if d == dtype], env))
        path = tmp_path / f"pp{pp}" / "info.json"
        path.parent.mkdir()
        path.write_text("stale content that is longer than the new file " * 1000)
        write_opt_shard_info(path, ranks, layouts)
        assert json.loads(path.read_text()) == expected
        assert list(path.parent.iterdir()) == [path]
        back = read_opt_shard_info(path)
        assert back.dp_ranks == tuple(ranks)
        assert [b.per_bucket_numel for _, b in sorted(back.buffers.items())] == [x.per_bucket_numel for x in layouts]
        assert [s.name for s in back.buffers[0].slots] == [s.name for s in layouts[0].slots]


def test_formats_md_example_reads(tmp_path):
    from ckptmap.formats.opt_shard_info import read_opt_shard_info

    path = tmp_path / "ex.json"
    path.write_text(json.dumps({
        "dp_rank_list": [0, 2],
        "param_info": {"language_model.output_layer.weight":
                       {"range_map": [0, 0, 0, 160], "shape": [20, 8], "dtype": "bfloat16"}},
        "zero3_params": [],
        "buffer_info": {"0": {"buckets": {"0": [1536, 1280]}, "buffer_size": 1536,
                              "buffer_numel_unpadded": 1280, "bucket_num": 1}}}))
    info = read_opt_shard_info(path)
    assert info.dp == 2 and info.buffers[0].buckets[0].numel == 1536
    assert info.buffers[0].slots[0].shape == (20, 8)


# ------------------------------------------------------------------------------------------------
# MindSpeed training shards -> combine -> ms2pt -> Megatron, against the fixture's live-optimizer truth


def test_combine_then_ms2pt_reproduces_megatron(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from conftest import fixture_dir

    fixture = fixture_dir("legacy_tp2pp2dp2")
    cfg = json.loads((fixture / "truth" / "config.json").read_text())
    TP, PP, DP = cfg["tp"], cfg["pp"], cfg["dp"]
    ms_dir = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(fixture), "--ms-path", str(ms_dir),
                 "--param-map-path", str(fixture / "param_map"), "--no-progress", "--multiprocess-off"]) == 0
    capsys.readouterr()

    # a MindSpeed run saves the same state as distributed-optimizer shards (dp DP, step 1)
    run = tmp_path / "run"
    for pp in range(PP):
        for tp in range(TP):
            named = load_ms(ms_dir / f"rank_{pp * DP * TP + tp}" / "network.ckpt")
            weights = [k for k in named if not k.startswith("exp_avg") and named[k].ndim >= 1
                       and named[k].shape != (1,)]
            params = [(k, named[k].shape, "bfloat16") for k in reversed(weights)]  # registration order
            ranks = [tp + TP * (d + DP * pp) for d in range(DP)]
            buffers = mindspeed_buffers(params, DP)
            info = shard_info_json(ranks, buffers, [])
            p = run / "opt_shard_info" / f"rank_{ranks[0]}" / f"dist_opt_shard_info_rank_{ranks[0]}-0_0.json"
            p.parent.mkdir(parents=True)
            p.write_text(json.dumps(info))
            shards = [dict() for _ in range(DP)]
            for i, (slots, buckets) in buffers.items():
                starts = np.cumsum([0] + [b[0] for b in buckets])
                for s in STATES:
                    for j, (padded, _) in enumerate(buckets):
                        full = np.zeros(padded, np.float32)
                        for name, _, _, start, end, bucket in slots:
                            if bucket == j:
                                full[start - starts[j]:end - starts[j]] = named[key_of(s, name)].reshape(-1)
                        n = padded // DP
                        for d in range(DP):
                            shards[d][key_of(s, f"buffer_{i}_bucket_{j}")] = full[d * n:(d + 1) * n]
            scalars = {k: v for k, v in named.items() if k not in weights and not k.startswith("exp_avg")}
            for d, g in enumerate(ranks):
                save_ms(run / f"rank_{g}" / f"network_rank_{g}-0_1.ckpt", {**shards[d], **scalars}, "ckpt")
    merged = tmp_path / "merged"
    assert combine(run, merged) == 0
    for g in [pp * DP * TP + tp for pp in range(PP) for tp in range(TP)]:
        assert_merged(merged / f"rank_{g}/network_rank_{g}-0_1_dp_merged.ckpt",
                      load_ms(ms_dir / f"rank_{g}" / "network.ckpt"))

    mega = tmp_path / "megatron"
    assert main(["ms2pt", "--ms-path", str(merged), "--megatron-path", str(mega),
                 "--param-map-path", str(ms_dir / "pt_meta"), "--num-layers", str(cfg["num_layers"]),
                 "--dp-size", str(DP), "--cp-size", "1", "--tp-size", str(TP), "--pp-size", str(PP),
                 "--vpp-size", "1", "--no-progress"]) == 0
    for pp in range(PP):
        for tp in range(TP):
            truth = load_file(str(fixture / "truth" / f"tp{tp}_pp{pp}.safetensors"))
            rank_dir = next(mega.rglob(f"mp_rank_{tp:02d}_{pp:03d}"))
            optim = torch.load(rank_dir / "distrib_optim.pt", weights_only=False)
            pmap = json.loads((fixture / "param_map" / f"param_map_buffer0_dp0tp{tp}pp{pp}vpp0.json").read_text())
            padded = list(optim["per_bucket_numel"][0].values())[0]
            starts = np.cumsum([0] + padded)
            states = list(optim[0].values())[0]
            for name, (_, _, start, end, bucket) in pmap.items():
                for s in ("param", "exp_avg", "exp_avg_sq"):
                    got = states[s][bucket][start - starts[bucket]:end - starts[bucket]]
                    assert torch.equal(got.view(torch.int32), truth[f"{s}.{name}"].reshape(-1).view(torch.int32)), name
