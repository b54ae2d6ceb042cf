"""torch_dist -> legacy Megatron files (``ckptmap convert --from torch_dist --to torch``) against the real
megatron-core: saves of the harness's standard ``dense`` case (TP 2 x PP 2 x VPP 2 x DP 2, one real Adam
step, SwiGLU, GQA, tied embeddings, several buckets) are converted, then loaded by the real library
(``load_checkpoint``'s model ``load_state_dict`` + ``optimizer.load_parameter_state``) into a model and
optimizer poisoned with NaN; every weight, fp32 main param and Adam moment, gathered with megatron's own
sharded metadata, must equal the saving run's live values (bit for bit). At the saving layout the files
are also compared with the same run's own legacy save: distrib_optim.pt byte for byte."""
import dataclasses
import filecmp

import pytest
import torch

from ckptmap.cli import main
from mcore_versions import Case, STANDARD_CASES, assemble, run_jobs
from mcore_versions.fixtures import mcore_standard  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.mcore_versions, pytest.mark.slow]
STATES = ("weight", "param", "exp_avg", "exp_avg_sq")


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def same_values(truth, got):
    for state in STATES:
        a, b = assemble(truth, state), assemble(got, state)
        assert set(a) == set(b), (state, set(a) ^ set(b))
        for k in a:
            assert a[k].shape == b[k].shape and torch.equal(_bits(a[k]), _bits(b[k])), (state, k)


def convert(src, dst, *flags):
    assert main(["convert", "--from", "torch_dist", "--to", "torch", "--src", str(src), "--dst", str(dst),
                 "--no-progress", "--multiprocess-off", *flags]) == 0


def test_0_12_1_torch_dist_to_legacy_loads_in_megatron(mcore_standard, tmp_path):
    run = mcore_standard("0.12.1", "dense")
    src = run.dir / "torch_dist_fully_sharded_model_space"
    jobs = []
    # the saving layout: the same files Megatron's own legacy save wrote (optimizer state byte for byte)
    same = tmp_path / "same"
    convert(src, same, "--target-megatron-version", "0.12.1")
    legacy = run.dir / "legacy" / "iter_0000001"
    for rank in sorted(p.name for p in legacy.iterdir()):
        assert filecmp.cmp(legacy / rank / "distrib_optim.pt", same / "iter_0000001" / rank / "distrib_optim.pt",
                           shallow=False), rank
    jobs.append(("load", run.case, [(same, "legacy", None)]))
    # other layouts: TP 2 -> 1; PP 2 VPP 2 -> PP 1 with TP 2 and DP 4 (bucket padding for DP 4)
    for name, flags, case in (("tp1", ["--target-tp-size", "1"], dict(tp=1)),
                              ("pp1-dp4", ["--target-pp-size", "1", "--target-dp-size", "4"],
                               dict(pp=1, vpp=None, dp=4))):
        out = tmp_path / name
        convert(src, out, "--target-megatron-version", "0.12.1", *flags)
        jobs.append(("load", dataclasses.replace(run.case, **case), [(out, "legacy", None)]))
    for got in run_jobs("0.12.1", jobs):
        same_values(run.truth, got[0] if isinstance(got, list) else got)


def test_fully_reshardable_to_legacy_loads_in_megatron_0_16_1(mcore_standard, tmp_path):
    """A fully_reshardable checkpoint (0.12.1's save upgraded offline by ckptmap: 0.16.1's own
    fully_reshardable saves are refused, see test_torch_dist.py) written as 0.16.1 legacy files."""
    run = mcore_standard("0.12.1", "dense")
    up = tmp_path / "upgraded"
    assert main(["convert", "--from", "torch_dist", "--to", "torch_dist", "--sharding-type", "fully_reshardable",
                 "--src", str(run.dir / "torch_dist_fully_sharded_model_space"), "--dst", str(up),
                 "--no-progress"]) == 0
    out = tmp_path / "legacy"
    convert(up, out, "--target-tp-size", "1", "--target-megatron-version", "0.16.1")
    case = dataclasses.replace(Case(version="0.16.1", **STANDARD_CASES["dense"]), tp=1)
    (got,) = run_jobs("0.16.1", [("load", case, [(out, "legacy", None)])])
    same_values(run.truth, got[0] if isinstance(got, list) else got)


def test_bucket_space_and_bad_targets_are_refused(mcore_standard, tmp_path, capsys):
    run = mcore_standard("0.16.1", "dense")
    out = tmp_path / "x"
    assert main(["convert", "--from", "torch_dist", "--to", "torch", "--src", str(run.dir / "torch_dist_dp_reshardable"),
                 "--dst", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'dp_reshardable'" in err and "--convert-param-only" in err and "Nothing was written" in err
    assert not out.exists()
    src = mcore_standard("0.12.1", "dense").dir / "torch_dist_fully_sharded_model_space"
    assert main(["convert", "--from", "torch_dist", "--to", "torch", "--src", str(src), "--dst", str(out),
                 "--target-tp-size", "3", "--no-progress"]) == 2
    assert "--target-tp-size 3" in capsys.readouterr().err and not out.exists()


def test_weights_only_from_bucket_space(mcore_standard, tmp_path):
    """--convert-param-only reads any sharding type: 0.16.1's default dp_reshardable save, weights loaded by 0.16.1."""
    run = mcore_standard("0.16.1", "dense")
    out = tmp_path / "w"
    convert(run.dir / "torch_dist_dp_reshardable", out, "--convert-param-only")
    assert not list(out.rglob("distrib_optim.pt")) and len(list(out.rglob("model_optim_rng.pt"))) == 4


def test_pt2ms_reads_torch_dist(mcore_standard, tmp_path):
    """pt2ms of a torch_dist save (composed through legacy files in a temporary folder) gives exactly the
    MindSpore files pt2ms makes of the same run's own legacy save (every key, dtype and value, read by
    mindspore.load_checkpoint), and leaves no temporary folder behind."""
    import mindspore as ms
    import numpy as np

    run = mcore_standard("0.12.1", "dense")
    outs = {}
    for name, src in (("dist", run.dir / "torch_dist_fully_sharded_model_space"), ("legacy", run.dir / "legacy")):
        outs[name] = tmp_path / name
        assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(outs[name]), "--megatron-version", "0.12.1",
                     "--no-progress", "--multiprocess-off"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "legacy"]
    files = sorted(p.relative_to(outs["legacy"]) for p in outs["legacy"].rglob("*.ckpt"))
    assert files and files == sorted(p.relative_to(outs["dist"]) for p in outs["dist"].rglob("*.ckpt"))
    for f in files:
        a, b = ms.load_checkpoint(str(outs["legacy"] / f)), ms.load_checkpoint(str(outs["dist"] / f))
        assert list(a) == list(b), f
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k].asnumpy().reshape(-1).view(np.uint8),
                                                                b[k].asnumpy().reshape(-1).view(np.uint8)), (f, k)


def test_bad_input_is_refused_before_writing(mcore_standard, tmp_path, capsys):
    """A missing .distcp, a .metadata of another checkpoint, an unknown sharding type: exit 2, the file and
    what to do named, no output folder."""
    import shutil

    from ckptmap.formats import torch_zip_reader as tzr
    from ckptmap.formats import torch_zip_writer as tzw

    run = mcore_standard("0.12.1", "dense")
    src = run.dir / "torch_dist_fully_sharded_model_space" / "iter_0000001"

    def attempt(bad, *want):
        out = tmp_path / "out"
        assert main(["convert", "--from", "torch_dist", "--to", "torch", "--src", str(bad), "--dst", str(out),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in want), err
        assert not out.exists() and not list(tmp_path.glob(".out*"))

    bad = shutil.copytree(src, tmp_path / "missing")
    (bad / "__1_0.distcp").unlink()
    attempt(bad, "__1_0.distcp is missing")
    bad = shutil.copytree(src, tmp_path / "other-metadata")
    shutil.copy(run.dir / "torch_dist_dp_zero_gather_scatter" / "iter_0000001" / ".metadata", bad / ".metadata")
    attempt(bad, str(bad))
    bad = shutil.copytree(src, tmp_path / "unknown-type")
    common = tzr.TorchZipFile(bad / "common.pt").root
    common["optimizer"]["param_state_sharding_type"] = "sharded_by_magic"
    tzw.save(common, bad / "common.pt")
    attempt(bad, "unknown optimizer sharding type 'sharded_by_magic'")
