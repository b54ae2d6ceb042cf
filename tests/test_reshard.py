"""Resharding against the real megatron-core 0.12.1 (and the MoE case of 0.8/0.16): a checkpoint
trained at one layout is resharded by ckptmap, then the real library builds DDP + the
DistributedOptimizer at the *target* layout and loads it (load_checkpoint + load_parameter_state);
the loaded weights, fp32 main params and both Adam moments, gathered to full tensors with
megatron's own sharded_state_dict metadata, equal the source's live values gathered the same way, and
every rank's optimizer param groups as loaded equal the ones the library built at the target layout."""
import dataclasses

import pytest
import torch

from ckptmap.cli import main
from mcore_versions import Case, assemble, run_jobs
from mcore_versions.fixtures import mcore_standard  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.mcore_versions, pytest.mark.slow]
STATES = ("weight", "param", "exp_avg", "exp_avg_sq")
VERSION = "0.12.1"
# TP 2 x PP 2 (interleaved, VPP 2) x DP 2; 12 layers (PP 3 x VPP 2 possible), 8 heads in 4 query groups
# (TP 4), SwiGLU, tied embeddings across the pipeline, overlap-grad-reduce with several buckets, hidden
# 48 (not a multiple of 64: alignment gaps)
SOURCE = Case(version=VERSION, tp=2, pp=2, vpp=2, dp=2, num_layers=12, hidden=48, ffn=56, heads=8, query_groups=4,
              swiglu=True, bias=True, tied_embeddings=True, overlap_grad_reduce=True, bucket_size=800, seed=3)


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def same_values(truth, got):
    """Every state of every parameter, gathered to full tensors, is bit-identical."""
    for state in STATES:
        a, b = assemble(truth, state), assemble(got, state)
        assert set(a) == set(b), set(a) ^ set(b)
        for k in a:
            assert a[k].shape == b[k].shape and torch.equal(_bits(a[k]), _bits(b[k])), (state, k)


def same_groups(got):
    """Each rank's optimizer param groups after the load — the settings (wd_mult, weight_decay, lr_mult,
    ...) and which parameters each group optimizes — equal those the real library built at that layout
    before loading (0.8 - 0.13 apply the saved groups by position: a wrong order swaps weight decay)."""
    for key, r in got["ranks"].items():
        assert r["param_groups"] == r["built_param_groups"], (key, [[g["settings"] for g in o]
                                                                    for o in r["param_groups"]])


def reshard(src, out, target_version=None, **target):
    flags = [x for k, v in target.items() for x in (f"--target-{k.replace('_', '-')}-size", str(v))]
    if target_version:
        flags += ["--target-megatron-version", target_version]
    assert main(["reshard", "--megatron-path", str(src), "--output-path", str(out), "--no-progress", *flags]) == 0


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard-source")
    (truth,) = run_jobs(VERSION, [("generate", SOURCE, root)])
    return root / "legacy", truth if "ranks" in truth else torch.load(root / "truth.pt", weights_only=False)


TARGETS = {  # name: (target sizes, the Case that loads it, from the source or from the TP1 PP1 one)
    "tp2-to-1": (dict(tp=1), dict(tp=1), "A"),
    "tp2-to-4-pp2-to-1": (dict(tp=4, pp=1), dict(tp=4, pp=1, vpp=None), "A"),
    "tp1-to-2": (dict(tp=2), dict(tp=2, pp=1, vpp=None), "B"),
    "pp1-to-3-vpp2": (dict(pp=3, vpp=2), dict(tp=1, pp=3, vpp=2), "B"),
    # DP 3 with a tied embedding on the first stage: 0.9 - 0.12 pad the bucket before it differently from
    # 0.13+ (and 0.8 cannot lay it out), so the target's version must be named
    "tp2-pp2-dp2-to-tp1-pp3-dp3": (dict(tp=1, pp=3, dp=3, target_version=VERSION), dict(tp=1, pp=3, vpp=None, dp=3),
                                   "A"),
    "back-to-the-source-layout": (dict(tp=2, pp=2, vpp=2, dp=2), dict(), "B"),
}


def test_resharded_checkpoints_load_in_real_megatron(source, tmp_path):
    src, truth = source
    mid = tmp_path / "B"          # TP 1 PP 1: the source of the 1 -> n cases
    reshard(src, mid, tp=1, pp=1)
    jobs, names = [("load", dataclasses.replace(SOURCE, tp=1, pp=1, vpp=None), [(mid, "legacy", None)])], ["B"]
    for name, (target, case, frm) in TARGETS.items():
        out = tmp_path / name
        reshard(src if frm == "A" else mid, out, **target)
        jobs.append(("load", dataclasses.replace(SOURCE, **case), [(out, "legacy", None)]))
        names.append(name)
    later_stage_starts_without_decay = False
    for name, got in zip(names, run_jobs(VERSION, jobs)):
        got = got[0] if isinstance(got, list) else got
        same_values(truth, got)
        same_groups(got)
        for (tp, pp, ep), r in got["ranks"].items():
            if name == "pp1-to-3-vpp2" and pp > 0:   # the case a copied stage-0 order got wrong
                later_stage_starts_without_decay |= r["built_param_groups"][0][0]["settings"]["wd_mult"] == 0.0
    assert later_stage_starts_without_decay


@pytest.mark.parametrize("version", ["0.8.0", "0.12.1", "0.16.1"])
def test_moe_expert_parallel_2_to_1(mcore_standard, tmp_path, version):
    run = mcore_standard(version, "moe")
    out = tmp_path / "ep1"
    reshard(run.dir / "legacy", out, ep=1, dp=2)
    (got,) = run_jobs(version, [("load", dataclasses.replace(run.case, ep=1, dp=2), [(out, "legacy", None)])])
    got = got[0] if isinstance(got, list) else got
    same_values(run.truth, got)
    same_groups(got)


def test_sizes_that_do_not_divide_are_named(source, tmp_path, capsys):
    src, _ = source
    assert main(["reshard", "--megatron-path", str(src), "--output-path", str(tmp_path / "x"),
                 "--target-tp-size", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "query groups" in err and "--target-tp-size" in err and not (tmp_path / "x").exists()
    assert main(["reshard", "--megatron-path", str(src), "--output-path", str(tmp_path / "y"),
                 "--target-pp-size", "5", "--no-progress"]) == 2
    assert "--num-layers 12 is not divisible by --pp-size 5" in capsys.readouterr().err
    # DP 3: which Megatron loads it decides where the tied embedding's bucket starts
    assert main(["reshard", "--megatron-path", str(src), "--output-path", str(tmp_path / "z"),
                 "--target-tp-size", "1", "--target-pp-size", "3", "--target-dp-size", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--target-megatron-version" in err and "0.13 - 0.16" in err and not (tmp_path / "z").exists()
    assert main(["reshard", "--megatron-path", str(src), "--output-path", str(tmp_path / "z"),
                 "--target-tp-size", "1", "--target-pp-size", "3", "--target-dp-size", "3",
                 "--target-megatron-version", "0.8.0", "--no-progress"]) == 2
    assert "no faithful checkpoint exists for this layout" in capsys.readouterr().err


def test_uneven_stages_load_in_real_megatron(source, tmp_path):
    """--target-stage-list 3,5,4 (TP 1, PP 3, 12 layers): megatron-core 0.12.1 built with
    num_layers_in_first / last_pipeline_stage 3 / 4 (Megatron-LM's --decoder-first/last-pipeline-num-layers)
    loads it; every weight, main param and moment bit-exact where megatron's own sharded metadata puts
    each layer, and each rank's param groups as the library built them."""
    src, truth = source
    out = tmp_path / "uneven"
    assert main(["reshard", "--megatron-path", str(src), "--output-path", str(out), "--target-tp-size", "1",
                 "--target-pp-size", "3", "--target-vpp-size", "1", "--target-stage-list", "3,5,4",
                 "--no-progress"]) == 0
    case = dataclasses.replace(SOURCE, tp=1, pp=3, vpp=None, first_stage_layers=3, last_stage_layers=4)
    (got,) = run_jobs(VERSION, [("load", case, [(out, "legacy", None)])])
    got = got[0] if isinstance(got, list) else got
    same_values(truth, got)
    same_groups(got)
    layers = {pp: sum(1 for n in r["chunks"][0]["shapes"] if n.endswith("input_layernorm.weight"))
              for (_, pp, _), r in got["ranks"].items()}
    assert layers == {0: 3, 1: 5, 2: 4}


@pytest.mark.parametrize("flags,words", [
    (["--target-pp-size", "4", "--target-vpp-size", "1", "--target-stage-list", "2,3,4,3"],
     ["--decoder-first-pipeline-num-layers", "middle stages here hold 3, 4"]),
    (["--target-pp-size", "3", "--target-vpp-size", "1", "--target-stage-list", "3,5,4", "--target-megatron-version",
      "0.8.0"], ["megatron for 0.8", "num_layers / PP layers on every pipeline"]),
    (["--target-pp-size", "2", "--target-vpp-size", "2", "--target-stage-list", "2,4,2,4"],
     ["--target-vpp-size 1", "without interleaving"]),
])
def test_stage_lists_megatron_cannot_build_are_named(source, tmp_path, capsys, flags, words):
    src, _ = source
    assert main(["reshard", "--megatron-path", str(src), "--output-path", str(tmp_path / "x"), "--no-progress",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "x").exists()


def test_runs_of_source_tensors_are_copied_as_byte_runs(source, tmp_path, byte_runs):
    """A PP change moves whole tensors and whole parameter ranges of the buckets: the plan makes every such run
    of a source tensor a byte copy (one source, no reads) and the executor copies exactly those bytes with
    copy_file_range (or one buffered read with the CRC, for .pt records); the real library loads the result to
    the live values."""
    from ckptmap.mapping.reshard import ReshardOptions, compile_reshard

    src, truth = source
    plan = compile_reshard(ReshardOptions(megatron_path=str(src), output_path=str(tmp_path / "plan"),
                                          target_pp_size=1, target_vpp_size=1))
    tensors = [pc.tensor for f in plan.files for st in f.storages for pc in st.pieces
               if pc.tensor is not None and (pc.tensor.sources or pc.tensor.reads)]
    copied = sum(t.nbytes for t in tensors if not t.reads)
    assert copied > 0.9 * sum(t.nbytes for t in tensors), [t.name for t in tensors if t.reads][:10]
    out = tmp_path / "pp1"
    assert main(["reshard", "--megatron-path", str(src), "--output-path", str(out), "--no-progress",
                 "--multiprocess-off", "--target-pp-size", "1", "--target-vpp-size", "1"]) == 0
    assert sum(byte_runs) == copied
    (got,) = run_jobs(VERSION, [("load", dataclasses.replace(SOURCE, pp=1, vpp=None), [(out, "legacy", None)])])
    same_values(truth, got[0] if isinstance(got, list) else got)


def test_assembled_shards_stream_in_slabs(source, tmp_path, monkeypatch):
    """A target shard assembled from boxes of several sources (TP merges and splits along dim 1, vocabulary
    padding rows) is assembled a slab of rows at a time into one reused buffer, never whole: with slabs of
    one row (byte_io.CHUNK patched to 64 bytes), every such shard spans many slabs, and the real library loads
    the results of TP 2 -> 1 and TP 2 -> 4 to the live values."""
    from ckptmap import execute
    from ckptmap.formats import byte_io

    src, truth = source
    monkeypatch.setattr(byte_io, "CHUNK", 64)
    spans, real = [], execute._slab_chunks

    def counted(task, views):
        n = 0
        for chunk in real(task, views):
            n += 1
            yield chunk
        spans.append((n, any(r.dst_lengths for r in task.reads)))
    monkeypatch.setattr(execute, "_slab_chunks", counted)
    monkeypatch.setattr(execute._Sources, "_assemble", lambda self, task: pytest.fail(f"{task.name} assembled whole"))
    jobs = []
    for name, target in (("tp1", dict(tp=1, pp=1)), ("tp4", dict(tp=4, pp=1))):
        out = tmp_path / name
        flags = [x for k, v in target.items() for x in (f"--target-{k}-size", str(v))]
        assert main(["reshard", "--megatron-path", str(src), "--output-path", str(out), "--no-progress",
                     "--multiprocess-off", *flags]) == 0
        jobs.append(("load", dataclasses.replace(SOURCE, tp=target["tp"], pp=1, vpp=None), [(out, "legacy", None)]))
    assert spans and min(n for n, _ in spans) > 1, spans[:5]
    for got in run_jobs(VERSION, jobs):
        same_values(truth, got[0] if isinstance(got, list) else got)
