"""MindSpore -> Megatron torch_dist in one command (``ckptmap ms2pt --ckpt-format torch_dist``), against
the real megatron-core: the harness's standard ``dense`` case (TP 2 x PP 2 x VPP 2 x DP 2, one real Adam
step) converted to MindSpore by pt2ms, then back as a torch_dist folder. Truth is Megatron's own
torch_dist save of the same step and the live optimizer values its own ``dist_checkpointing.load``
gives back -- never ckptmap's output."""
import dataclasses

import pytest

from ckptmap.cli import main
from mcore_versions import run_jobs
from mcore_versions.fixtures import mcore_standard  # noqa: F401  (session fixture)
from test_torch_dist_legacy import same_values

pytestmark = [pytest.mark.mcore_versions, pytest.mark.slow]


def _to_mindspore(run, tmp_path):
    ms = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(run.dir / "legacy"), "--ms-path", str(ms), "--no-progress"]) == 0
    return ms


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_equals_megatrons_own_torch_dist_save_and_loads_in_megatron_0_12_1(mcore_standard, tmp_path, name):
    """Through MindSpore and back as fully_sharded_model_space (``moe``: EP 2 x DP 4, 4 experts, a [dense, expert]
    ChainedOptimizer): every tensor, object, the mcore_data and common.pt equal 0.12.1's own torch_dist save of
    the same step, and 0.12.1 loads it to the live values."""
    from test_torch_to_torch_dist import _same_files

    run = mcore_standard("0.12.1", name)
    ms = _to_mindspore(run, tmp_path)
    out = tmp_path / "dist"
    assert main(["ms2pt", "--ms-path", str(ms), "--megatron-path", str(out), "--ckpt-format", "torch_dist",
                 "--sharding-type", "fully_sharded_model_space", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "ms"]     # the temporary folder is gone
    _same_files(run.dir / "torch_dist_fully_sharded_model_space" / "iter_0000001", out / "iter_0000001")
    (got,) = run_jobs("0.12.1", [("load", run.case, [(out, "torch_dist", "fully_sharded_model_space")])])
    same_values(run.truth, got[0])


def test_with_a_target_layout_loads_in_megatron_0_16_1(mcore_standard, tmp_path, capsys):
    """--target-tp-size 1 composes ms2pt, a reshard and torch -> torch_dist (default fully_reshardable); the
    dry run shows the steps and writes nothing."""
    run = mcore_standard("0.16.1", "dense")
    ms = _to_mindspore(run, tmp_path)
    out = tmp_path / "dist"
    argv = ["ms2pt", "--ms-path", str(ms), "--megatron-path", str(out), "--ckpt-format", "torch_dist",
            "--target-tp-size", "1", "--no-progress"]
    capsys.readouterr()
    assert main(argv + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "convert --from torch --to torch_dist" in printed and "fully_reshardable" in printed and "reshard" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ms"]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "ms"]
    (got,) = run_jobs("0.16.1", [("load", dataclasses.replace(run.case, tp=1), [(out, "torch_dist", "fully_reshardable")])])
    same_values(run.truth, got[0])


def test_refusals_name_the_reason_and_write_nothing(mcore_standard, tmp_path, capsys):
    run = mcore_standard("0.12.1", "dense")
    ms = _to_mindspore(run, tmp_path)
    out = tmp_path / "dist"
    base = ["ms2pt", "--ms-path", str(ms), "--megatron-path", str(out), "--no-progress"]
    for flags, want in ((["--sharding-type", "fully_reshardable"], "--ckpt-format torch_dist"),
                        (["--ckpt-format", "torch_dist", "--sharding-type", "fully_sharded_bucket_space"],
                         "fully_sharded_model_space"),
                        (["--ckpt-format", "torch_dist", "--sharding-type", "dp_zero_gather_scatter"],
                         "--target-megatron-version")):
        assert main(base + flags) == 2
        err = capsys.readouterr().err
        assert want in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ms"]
    out.mkdir()
    assert main(base + ["--ckpt-format", "torch_dist", "--overwrite"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["dist", "ms"]
