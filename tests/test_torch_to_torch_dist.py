"""Legacy Megatron files -> torch_dist (``ckptmap convert --from torch --to torch_dist``) against the real
megatron-core 0.16.1: the legacy save of the harness's standard ``dense`` case (TP 2 x PP 2 x VPP 2 x DP 2,
SwiGLU, GQA, bias, tied embeddings, several buckets, one real Adam step) written as a fully_reshardable
torch_dist folder, then loaded by 0.16.1's own ``dist_checkpointing.load`` into a model and optimizer
poisoned with NaN -- at the saving layout and at TP 1 -- every weight, fp32 main param and Adam moment must
equal the saving run's live values bit for bit. Converted back to legacy files, distrib_optim.pt is
byte-identical to Megatron's own legacy save. The ``moe`` case (EP 2 x DP 4, 4 experts, [dense, expert]
ChainedOptimizer) the same way in 0.12.1 (fully_sharded_model_space, equal to its own save) and 0.16.1
(fully_reshardable, loaded)."""
import dataclasses
import filecmp

import pytest

from ckptmap.cli import main
from mcore_versions import run_jobs
from mcore_versions.fixtures import mcore_standard  # noqa: F401  (session fixture)
from test_torch_dist_legacy import same_values

pytestmark = [pytest.mark.mcore_versions, pytest.mark.slow]


def test_legacy_to_fully_reshardable_loads_in_megatron_0_16_1(mcore_standard, tmp_path):
    run = mcore_standard("0.16.1", "dense")
    out = tmp_path / "dist"
    assert main(["convert", "--from", "torch", "--to", "torch_dist", "--src", str(run.dir / "legacy"),
                 "--dst", str(out), "--no-progress"]) == 0
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "1"
    _back_to_megatrons_own_distrib_optim(run, out, tmp_path / "back", "0.16.1")
    jobs = [("load", run.case, [(out, "torch_dist", "fully_reshardable")]),
            ("load", dataclasses.replace(run.case, tp=1), [(out, "torch_dist", "fully_reshardable")])]
    for got in run_jobs("0.16.1", jobs):
        same_values(run.truth, got[0] if isinstance(got, list) else got)


def _back_to_megatrons_own_distrib_optim(run, dist, back, version):
    """Converted back to legacy files, every distrib_optim.pt is byte-identical to Megatron's own legacy save."""
    assert main(["convert", "--from", "torch_dist", "--to", "torch", "--src", str(dist), "--dst", str(back),
                 "--target-megatron-version", version, "--no-progress", "--multiprocess-off"]) == 0
    legacy = run.dir / "legacy" / "iter_0000001"
    for rank in sorted(p.name for p in legacy.iterdir()):
        assert filecmp.cmp(legacy / rank / "distrib_optim.pt", back / "iter_0000001" / rank / "distrib_optim.pt",
                           shallow=False), rank


def test_torch_to_torch_dist_refusals(mcore_standard, tmp_path, capsys):
    """A layout flag, another sharding type: exit 2, the reason named, nothing written."""
    out = tmp_path / "x"
    for src, flags, want in ((mcore_standard("0.16.1", "dense").dir / "legacy", ["--target-tp-size", "1"],
                              "ckptmap reshard"),
                             (mcore_standard("0.16.1", "dense").dir / "legacy", ["--sharding-type", "fully_sharded_bucket_space"],
                              "fully_reshardable")):
        assert main(["convert", "--from", "torch", "--to", "torch_dist", "--src", str(src), "--dst", str(out),
                     "--no-progress", *flags]) == 2
        err = capsys.readouterr().err
        assert want in err, err
        assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, want", [
    (dict(moe_grouped_gemm=True), "args.moe_grouped_gemm set (GroupedMLP experts)"),
    (dict(expert_tensor_parallel_size=2), "args.expert_tensor_parallel_size 2 but tensor_model_parallel_size 1"),
])
def test_moe_torch_to_torch_dist_refuses_unsupported_layouts(mcore_standard, tmp_path, capsys, monkeypatch, args,
                                                             want):
    """MoE layouts the conversion does not write (GroupedMLP experts, expert TP != TP; the args are patched as
    the real library cannot save them on CPU): refused before writing, the file and what to do named."""
    import copy

    from ckptmap.mapping import legacy_torch_dist as ltd

    class Patched(ltd.MegatronSource):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.args = copy.copy(self.args)
            for k, v in args.items():
                setattr(self.args, k, v)

    monkeypatch.setattr(ltd, "MegatronSource", Patched)
    out = tmp_path / "x"
    src = mcore_standard("0.16.1", "moe").dir / "legacy"
    assert main(["convert", "--from", "torch", "--to", "torch_dist", "--src", str(src), "--dst", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert want in err and "model_optim_rng.pt" in err and "--ckpt-format torch_dist" in err, err
    assert not out.exists()


def test_legacy_to_fully_sharded_model_space_loads_in_megatron_0_12_1(mcore_standard, tmp_path, byte_runs):
    """--sharding-type fully_sharded_model_space (the 0.8 - 0.14 default): every tensor key, stored (nd-flattened)
    shape and value, every object's pickle and the mcore_data equal 0.12.1's own torch_dist save of the same
    step; 0.12.1's dist_checkpointing.load at the saving layout and at TP 1 gives the live values. Most item
    bytes (whole TP shards, SwiGLU halves, parameters' ranges of the fp32 buffers) are copied from the legacy
    files as byte runs, not assembled in memory."""
    from ckptmap.formats import torch_dist as td

    run = mcore_standard("0.12.1", "dense")
    out = tmp_path / "dist"
    assert main(["convert", "--from", "torch", "--to", "torch_dist", "--sharding-type", "fully_sharded_model_space",
                 "--src", str(run.dir / "legacy"), "--dst", str(out), "--no-progress"]) == 0
    with td.TorchDistCheckpoint(out / "iter_0000001") as r:
        total = sum(r.chunk_range(c).nbytes for k in r.keys() for c in r.chunks(k))
    assert sum(byte_runs) > 0.9 * total, (sum(byte_runs), total)
    _same_files(run.dir / "torch_dist_fully_sharded_model_space" / "iter_0000001", out / "iter_0000001")
    jobs = [("load", run.case, [(out, "torch_dist", "fully_sharded_model_space")]),
            ("load", dataclasses.replace(run.case, tp=1), [(out, "torch_dist", "fully_sharded_model_space")])]
    for got in run_jobs("0.12.1", jobs):
        same_values(run.truth, got[0] if isinstance(got, list) else got)


def test_legacy_to_dp_zero_gather_scatter_equals_megatron_0_12_1_and_loads_in_0_16_1(mcore_standard, tmp_path):
    """--sharding-type dp_zero_gather_scatter (--no-ckpt-fully-parallel-save; the per-DP-group objects holding the
    legacy coalesced state), which 0.8 - 0.14 and 0.15+ save differently (--target-megatron-version): every tensor,
    every object's pickle, the mcore_data and common.pt equal 0.12.1's / 0.16.1's own dp_zero_gather_scatter save
    of the same step, and each loads it to the live values; back to legacy files, distrib_optim.pt is Megatron's."""
    run = mcore_standard("0.12.1", "dense")
    out = tmp_path / "dist"
    flags = ["convert", "--from", "torch", "--to", "torch_dist", "--sharding-type", "dp_zero_gather_scatter",
             "--src", str(run.dir / "legacy"), "--no-progress"]
    assert main(flags + ["--dst", str(out)]) == 2   # the two version ranges save it differently: say which
    assert not out.exists()
    assert main(flags + ["--dst", str(out), "--target-megatron-version", "0.12.1"]) == 0
    _same_files(run.dir / "torch_dist_dp_zero_gather_scatter" / "iter_0000001", out / "iter_0000001")
    (got,) = run_jobs("0.12.1", [("load", run.case, [(out, "torch_dist", "dp_zero_gather_scatter")])])
    same_values(run.truth, got[0])
    run = mcore_standard("0.16.1", "dense")
    out16 = tmp_path / "dist16"
    flags[flags.index("--src") + 1] = str(run.dir / "legacy")
    assert main(flags + ["--dst", str(out16), "--target-megatron-version", "0.16.1"]) == 0
    _same_files(run.dir / "torch_dist_dp_zero_gather_scatter" / "iter_0000001", out16 / "iter_0000001")
    (got,) = run_jobs("0.16.1", [("load", run.case, [(out16, "torch_dist", "dp_zero_gather_scatter")])])
    same_values(run.truth, got[0])
    back = tmp_path / "back"   # and back to legacy files: distrib_optim.pt byte-identical to Megatron's own
    _back_to_megatrons_own_distrib_optim(run, out16, back, "0.16.1")


@pytest.mark.parametrize("version", ["0.12.1", "0.16.1"])
def test_moe_legacy_to_dp_zero_gather_scatter_equals_megatrons_own(mcore_standard, tmp_path, version):
    """MoE (EP 2, [dense, expert] ChainedOptimizer) as dp_zero_gather_scatter: ``chained_0.`` objects per model-parallel
    rank, ``chained_1.`` per expert-model-parallel rank (0.16: the RNG sharded over DP); every tensor, object pickle,
    the mcore_data and common.pt equal the version's own save of the same step, and it loads to the live values."""
    run = mcore_standard(version, "moe")
    out = tmp_path / "dist"
    assert main(["convert", "--from", "torch", "--to", "torch_dist", "--sharding-type", "dp_zero_gather_scatter",
                 "--target-megatron-version", version, "--src", str(run.dir / "legacy"), "--dst", str(out),
                 "--no-progress"]) == 0
    _same_files(run.dir / "torch_dist_dp_zero_gather_scatter" / "iter_0000001", out / "iter_0000001")
    (got,) = run_jobs(version, [("load", run.case, [(out, "torch_dist", "dp_zero_gather_scatter")])])
    same_values(run.truth, got[0])


@pytest.mark.parametrize("version,sharding_type", [("0.12.1", "fully_sharded_model_space"),
                                                   ("0.16.1", "fully_reshardable")])
def test_moe_at_ep_1_to_torch_dist_loads_in_megatron(mcore_standard, tmp_path, version, sharding_type):
    """MoE at EP 1: one optimizer with the experts in the dense buffers (megatron-core's layout there). The real
    EP 2 legacy save resharded to EP 1 (ckptmap reshard), then written as torch_dist: the states unprefixed, no
    expert optimizer; the real library loads it at EP 1 to the saving run's live values. (Loading it at EP 2 fails in
    Megatron itself, as for its own EP 1 saves: common.pt holds one optimizer's state where a ChainedOptimizer
    expects two.)"""
    run = mcore_standard(version, "moe")
    ep1, out = tmp_path / "ep1", tmp_path / "dist"
    assert main(["reshard", "--megatron-path", str(run.dir / "legacy"), "--output-path", str(ep1),
                 "--target-ep-size", "1", "--target-megatron-version", version, "--no-progress"]) == 0
    assert main(["convert", "--from", "torch", "--to", "torch_dist", "--sharding-type", sharding_type,
                 "--src", str(ep1), "--dst", str(out), "--no-progress"]) == 0
    from ckptmap.formats import torch_dist as td
    with td.TorchDistCheckpoint(out / "iter_0000001") as r:
        assert not [k for k in r.keys() if k.startswith("chained_")]
        assert any(k.startswith("decoder.layers.mlp.experts.experts.") for k in r.keys())
    (got,) = run_jobs(version, [("load", dataclasses.replace(run.case, ep=1), [(out, "torch_dist", sharding_type)])])
    same_values(run.truth, got[0])


def test_legacy_to_dp_reshardable_loads_in_megatron_0_16_1(mcore_standard, tmp_path, capsys):
    """--sharding-type dp_reshardable (0.15+'s default) is composed: fully_sharded_model_space into a temporary
    folder, then the offline upgrade. 0.16.1's own dist_checkpointing.load gives the live values, and the
    bucket sizes recorded equal those 0.16.1's own dp_reshardable save of the same step records."""
    from ckptmap.formats import megatron_dist as M

    run = mcore_standard("0.16.1", "dense")
    out = tmp_path / "dist"
    assert main(["convert", "--from", "torch", "--to", "torch_dist", "--sharding-type", "dp_reshardable",
                 "--src", str(run.dir / "legacy"), "--dst", str(out), "--no-progress"]) == 0
    assert "offline upgrade to dp_reshardable" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]      # the temporary folder is gone
    with M.MegatronDist(out / "iter_0000001") as mine, \
            M.MegatronDist(run.dir / "torch_dist_dp_reshardable" / "iter_0000001") as own:
        assert mine.sharding_type.name == own.sharding_type.name == "dp_reshardable"
        numel = sorted(o for o in own.reader.objects() if "per_bucket_numel" in o)
        assert numel and numel == sorted(o for o in mine.reader.objects() if "per_bucket_numel" in o)
        for o in numel:
            assert own.reader.read_object(o).root == mine.reader.read_object(o).root, o
    (got,) = run_jobs("0.16.1", [("load", run.case, [(out, "torch_dist", "dp_reshardable")])])
    same_values(run.truth, got[0])


def _same_files(own_dir, mine_dir, *, values=True):
    """Every tensor key, stored shape and (``values``) byte, every object's pickle, the mcore_data and common.pt
    of two torch_dist folders equal."""
    import numpy as np

    from ckptmap.formats import torch_dist as td
    from ckptmap.formats import torch_zip_reader as tzr

    with td.TorchDistCheckpoint(own_dir) as own, td.TorchDistCheckpoint(mine_dir) as mine:
        assert sorted(own.keys()) == sorted(mine.keys()) and sorted(own.objects()) == sorted(mine.objects())
        for k in own.keys():
            assert own.spec(k) == mine.spec(k), k
            if values or not k.startswith("optimizer."):
                assert np.array_equal(own.array(k).view(np.uint8), mine.array(k).view(np.uint8)), k
        for o in own.objects():
            assert bytes(own.read_object(o)._archive.read_record("data.pkl")) == \
                bytes(mine.read_object(o)._archive.read_record("data.pkl")), o
        if values:
            assert own.meta.mcore_data == mine.meta.mcore_data
    own_common, mine_common = tzr.read_objects(own_dir / "common.pt"), tzr.read_objects(mine_dir / "common.pt")
    assert list(own_common) == list(mine_common)
    for k in own_common:
        got, want = mine_common[k], own_common[k]
        assert (vars(got) == vars(want)) if k == "args" else (got == want), k


def test_moe_legacy_to_fully_sharded_model_space_equals_megatron_0_12_1(mcore_standard, tmp_path):
    """MoE (EP 2 x DP 4, 4 experts, [dense, expert] ChainedOptimizer), --sharding-type fully_sharded_model_space:
    every tensor (the experts on their global axis, the optimizers' ``chained_0.`` / ``chained_1.`` states), every
    object (expert extra states, RNG), the mcore_data and common.pt equal 0.12.1's own torch_dist save of the same
    step; 0.12.1's dist_checkpointing.load at the saving layout and at DP 2 (EP 2) gives the live values.
    Converted back, distrib_optim.pt is Megatron's."""
    run = mcore_standard("0.12.1", "moe")
    out = tmp_path / "dist"
    assert main(["convert", "--from", "torch", "--to", "torch_dist", "--sharding-type", "fully_sharded_model_space",
                 "--src", str(run.dir / "legacy"), "--dst", str(out), "--no-progress"]) == 0
    _same_files(run.dir / "torch_dist_fully_sharded_model_space" / "iter_0000001", out / "iter_0000001")
    back = tmp_path / "back"
    assert main(["convert", "--from", "torch_dist", "--to", "torch", "--src", str(out), "--dst", str(back),
                 "--target-megatron-version", "0.12.1", "--no-progress", "--multiprocess-off"]) == 0
    legacy = run.dir / "legacy" / "iter_0000001"
    ranks = sorted(p.name for p in legacy.iterdir())
    assert ranks == ["mp_rank_00_000", "mp_rank_00_001"]
    for rank in ranks:
        assert filecmp.cmp(legacy / rank / "distrib_optim.pt", back / "iter_0000001" / rank / "distrib_optim.pt",
                           shallow=False), rank
    jobs = [("load", run.case, [(out, "torch_dist", "fully_sharded_model_space")]),
            ("load", dataclasses.replace(run.case, dp=2), [(out, "torch_dist", "fully_sharded_model_space")])]
    for got in run_jobs("0.12.1", jobs):
        same_values(run.truth, got[0] if isinstance(got, list) else got)


def test_moe_legacy_to_fully_reshardable_loads_in_megatron_0_16_1(mcore_standard, tmp_path):
    """MoE, fully_reshardable (no chained prefixes; the RNG sharded over DP, as 0.16 saves it under EP): 0.16.1's
    dist_checkpointing.load at the saving layout, at DP 2 (EP 2) and at EP 4 (one expert per rank) gives the live
    values, and converted back to legacy files distrib_optim.pt is
    byte-identical to Megatron's own legacy save. Against 0.16.1's own fully_reshardable save of the step: the
    same keys, shapes, weights, objects and common.pt; its optimizer values are not compared (0.16.1 saves them
    shifted when a buffer has several buckets -- megatron_dist.FULLY_RESHARDABLE_BUG -- as in this case)."""
    run = mcore_standard("0.16.1", "moe")
    out = tmp_path / "dist"
    assert main(["convert", "--from", "torch", "--to", "torch_dist", "--src", str(run.dir / "legacy"),
                 "--dst", str(out), "--no-progress"]) == 0
    _same_files(run.dir / "torch_dist_fully_reshardable" / "iter_0000001", out / "iter_0000001", values=False)
    _back_to_megatrons_own_distrib_optim(run, out, tmp_path / "back", "0.16.1")
    jobs = [("load", run.case, [(out, "torch_dist", "fully_reshardable")]),
            ("load", dataclasses.replace(run.case, dp=2), [(out, "torch_dist", "fully_reshardable")]),
            ("load", dataclasses.replace(run.case, ep=4), [(out, "torch_dist", "fully_reshardable")])]
    for got in run_jobs("0.16.1", jobs):
        same_values(run.truth, got[0] if isinstance(got, list) else got)


def test_moe_legacy_to_dp_reshardable_loads_in_megatron_0_16_1(mcore_standard, tmp_path):
    """MoE (EP 2) to 0.15+'s default type, composed through fully_sharded_model_space and the offline upgrade:
    the optimizer keys, shapes and objects of 0.16.1's own dp_reshardable save of the same step, and 0.16.1
    loads it to the live values."""
    from ckptmap.formats import megatron_dist as M

    run = mcore_standard("0.16.1", "moe")
    out = tmp_path / "dist"
    assert main(["convert", "--from", "torch", "--to", "torch_dist", "--sharding-type", "dp_reshardable",
                 "--src", str(run.dir / "legacy"), "--dst", str(out), "--no-progress"]) == 0
    with M.MegatronDist(out / "iter_0000001") as mine, \
            M.MegatronDist(run.dir / "torch_dist_dp_reshardable" / "iter_0000001") as own:
        keys = sorted(k for k in own.reader.keys() if "optimizer" in k)
        assert keys == sorted(k for k in mine.reader.keys() if "optimizer" in k)
        assert all(own.reader.spec(k).shape == mine.reader.spec(k).shape for k in keys)
        assert sorted(own.reader.objects()) == sorted(mine.reader.objects())
        for o in own.reader.objects():   # RNG over DP (each DP rank its expert rank's), param groups, bucket sizes
            if not o.startswith("chained_") or "per_bucket" in o:
                assert bytes(own.reader.read_object(o)._archive.read_record("data.pkl")) == \
                    bytes(mine.reader.read_object(o)._archive.read_record("data.pkl")), o
    (got,) = run_jobs("0.16.1", [("load", run.case, [(out, "torch_dist", "dp_reshardable")])])
    same_values(run.truth, got[0])
