"""torch_dist -> legacy Megatron files (``ckptmap convert --from torch_dist --to torch``) against the real
megatron-core: saves of the harness's standard ``dense`` case (TP 2 x PP 2 x VPP 2 x DP 2, one real Adam
step, SwiGLU, GQA, tied embeddings, several buckets) and of the ``moe`` case (EP 2, ChainedOptimizer, at
the saving layout) are converted, then loaded by the real library
(``load_checkpoint``'s model ``load_state_dict`` + ``optimizer.load_parameter_state``) into a model and
optimizer poisoned with NaN; every weight, fp32 main param and Adam moment, gathered with megatron's own
sharded metadata, must equal the saving run's live values (bit for bit). At the saving layout the files
are also compared with the same run's own legacy save: distrib_optim.pt byte for byte."""
import dataclasses
import filecmp

import pytest
import torch

from ckptmap.cli import main
from mcore_versions import Case, STANDARD_CASES, assemble, pickles, run_jobs
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


def _model_tensors(obj, prefix=""):
    """{dotted path: tensor} of a legacy model file's model chunks (``model``, ``model0``, …)."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if prefix or str(k).startswith("model"):
                out.update(_model_tensors(v, f"{prefix}{k}."))
    elif isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    return out


@pytest.mark.parametrize("version,sharding_type", [("0.12.1", "fully_sharded_model_space"),
                                                   ("0.16.1", "dp_reshardable")])
def test_runs_of_saved_chunks_are_copied_as_byte_runs(mcore_standard, tmp_path, byte_runs, version,
                                                       sharding_type):
    """At the saving layout most bytes of the legacy files are runs of one saved chunk (a stacked layer's TP
    fragment, an nd-flattened fragment, a parameter's range of a bucket, each half of a SwiGLU shard): the
    plan makes them byte copies of that chunk (one source, a chunk key, no reads) and the executor copies
    them as byte runs (copy_file_range, or one buffered read with the CRC for .pt records). The files stay what
    Megatron's own legacy save of the same step wrote: distrib_optim.pt byte for byte, every model weight bit for
    bit."""
    from ckptmap.formats import torch_dist as td
    from ckptmap.mapping import torch_dist_legacy as ltd

    run = mcore_standard(version, "dense")
    src = run.dir / f"torch_dist_{sharding_type}"
    plan = ltd.compile_torch_dist_to_legacy(ltd.DistToLegacyOptions(str(src), str(tmp_path / "plan"),
                                                                    target_megatron_version=version))
    tensors = [pc.tensor for f in plan.files for st in f.storages for pc in st.pieces
               if pc.tensor is not None and (pc.tensor.sources or pc.tensor.reads)]
    copies = [t for t in tensors if not t.reads]
    assert copies and all(len(t.sources) == 1 and td.CHUNK_AT in t.sources[0].key for t in copies)
    copied, total = sum(t.nbytes for t in copies), sum(t.nbytes for t in tensors)
    assert copied > 0.9 * total, (copied, total, [t.name for t in tensors if t.reads][:10])

    out = tmp_path / "out"
    convert(src, out, "--target-megatron-version", version)
    assert sum(byte_runs) == copied

    legacy = run.dir / "legacy" / "iter_0000001"
    for rank in sorted(p.name for p in legacy.iterdir()):
        assert filecmp.cmp(legacy / rank / "distrib_optim.pt", out / "iter_0000001" / rank / "distrib_optim.pt",
                           shallow=False), rank
        want = _model_tensors(pickles.load(legacy / rank / "model_optim_rng.pt")[0])
        got = _model_tensors(pickles.load(out / "iter_0000001" / rank / "model_optim_rng.pt")[0])
        assert set(want) == set(got), (rank, set(want) ^ set(got))
        for k in want:
            assert want[k].dtype == got[k].dtype and want[k].shape == got[k].shape and \
                torch.equal(_bits(want[k]), _bits(got[k])), (rank, k)


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


def test_bucket_space_to_legacy_loads_in_megatron_0_16_1(mcore_standard, tmp_path):
    """dp_reshardable (0.16.1's default) and dp_zero_gather_scatter saves: the saving run's buffers rebuilt
    at its own sizes and checked against the sizes the checkpoint records. At the saving layout
    distrib_optim.pt is byte-identical to the same run's own legacy save; at TP 1 and at PP 1 x DP 4
    0.16.1's own loader gets the live values (one launcher for the three loads)."""
    run = mcore_standard("0.16.1", "dense")
    legacy = run.dir / "legacy" / "iter_0000001"
    jobs = []
    for st in ("dp_reshardable", "dp_zero_gather_scatter"):
        same = tmp_path / f"{st}-same"
        convert(run.dir / f"torch_dist_{st}", same, "--target-megatron-version", "0.16.1")
        for rank in sorted(p.name for p in legacy.iterdir()):
            assert filecmp.cmp(legacy / rank / "distrib_optim.pt", same / "iter_0000001" / rank / "distrib_optim.pt",
                               shallow=False), (st, rank)
            # param groups (from the DP group's optimizer object, 0.16's global order) as Megatron's legacy save
            mine = pickles.load(same / "iter_0000001" / rank / "model_optim_rng.pt")[0]
            assert mine["optimizer"] == pickles.load(legacy / rank / "model_optim_rng.pt")[0]["optimizer"], (st, rank)
    # 0.8 - 0.14 write dp_zero_gather_scatter too: the same check on 0.12.1's save
    old = mcore_standard("0.12.1", "dense")
    out = tmp_path / "0.12.1-dp-zero"
    convert(old.dir / "torch_dist_dp_zero_gather_scatter", out, "--target-megatron-version", "0.12.1")
    for rank in sorted(p.name for p in (old.dir / "legacy" / "iter_0000001").iterdir()):
        assert filecmp.cmp(old.dir / "legacy" / "iter_0000001" / rank / "distrib_optim.pt",
                           out / "iter_0000001" / rank / "distrib_optim.pt", shallow=False), rank
    for st, name, flags, case in (
            ("dp_reshardable", "tp1", ["--target-tp-size", "1"], dict(tp=1)),
            ("dp_zero_gather_scatter", "pp1-dp4", ["--target-pp-size", "1", "--target-dp-size", "4"],
             dict(pp=1, vpp=None, dp=4))):
        out = tmp_path / f"{st}-{name}"
        convert(run.dir / f"torch_dist_{st}", out, "--target-megatron-version", "0.16.1", *flags)
        jobs.append(("load", dataclasses.replace(run.case, **case), [(out, "legacy", None)]))
    jobs.append(("load", run.case, [(tmp_path / "dp_reshardable-same", "legacy", None)]))
    for got in run_jobs("0.16.1", jobs):
        same_values(run.truth, got[0] if isinstance(got, list) else got)


def test_bucket_space_of_another_run_and_bad_targets_are_refused(mcore_standard, tmp_path, capsys):
    """Bucket-space state needs the saving run's buffer layout: args that do not rebuild the recorded
    bucket sizes (here another ddp_bucket_size) are refused, naming the buffer and both sizes; a TP size
    that does not divide the heads is refused. Nothing written either time."""
    import shutil

    from ckptmap.formats import torch_zip_reader as tzr
    from ckptmap.formats import torch_zip_writer as tzw

    run = mcore_standard("0.16.1", "dense")
    bad = shutil.copytree(run.dir / "torch_dist_dp_reshardable" / "iter_0000001", tmp_path / "other-args")
    common = tzr.TorchZipFile(bad / "common.pt").root
    common["args"].ddp_bucket_size = 900
    tzw.save(common, bad / "common.pt")
    out = tmp_path / "x"
    assert main(["convert", "--from", "torch_dist", "--to", "torch", "--src", str(bad), "--dst", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "dp_group_idx_0" in err and "per-bucket sizes" in err and "[1280, 2304, 1792, 896, 128, 1280]" in err, err
    assert "Nothing was written" in err and not out.exists()
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


@pytest.mark.parametrize("version,sharding_type,case,flags", [
    ("0.12.1", "fully_sharded_model_space", "dense", []), ("0.16.1", "dp_reshardable", "dense", []),
    ("0.16.1", "dp_reshardable", "moe", []), ("0.16.1", "dp_reshardable", "moe", ["--target-ep-size", "4"]),
    ("0.12.1", "fully_sharded_model_space", "dense", ["--target-tp-size", "1"])])
def test_pt2ms_reads_torch_dist(mcore_standard, tmp_path, monkeypatch, version, sharding_type, case, flags):
    """pt2ms of a torch_dist save (planned from legacy files' object trees in a temporary folder, the tensors
    read from the torch_dist files) gives exactly the MindSpore files pt2ms makes of the same run's own legacy
    save (every key, dtype and value, read by mindspore.load_checkpoint), writes no tensor bytes into the
    temporary folder at the saving layout, and leaves no temporary folder behind. MoE too (EP 2: one rank_N
    per expert rank, ChainedOptimizer state), also at --target-ep-size 4 and, dense, at --target-tp-size 1 (the
    legacy save resharded by pt2ms): there the dim-1 TP shards are assembled and written into the temporary folder,
    their states and the weights the main-param check reads (every fp32 main param must round to them)."""
    import mindspore as ms
    import numpy as np

    from ckptmap.mapping import torch_dist_pt2ms

    run = mcore_standard(version, case)
    seen = {}
    real_direct = torch_dist_pt2ms.direct

    def direct(plan, inter, *args, **kwargs):   # the plan that is run
        seen["plan"] = out = real_direct(plan, inter, *args, **kwargs)
        seen["root"] = str(inter.root)
        return out

    monkeypatch.setattr(torch_dist_pt2ms, "direct", direct)
    outs = {}
    for name, src in (("dist", run.dir / f"torch_dist_{sharding_type}"), ("legacy", run.dir / "legacy")):
        outs[name] = tmp_path / name
        assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(outs[name]), "--megatron-version", version,
                     "--no-progress", "--multiprocess-off", *flags]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "legacy"]
    # every byte written once: the tensors are read from the torch_dist files, not from legacy files written first
    # (those are object trees whose byte-copied tensors are holes)
    slices = [s for f in seen["plan"].files for t in f.tensors for s in t.sources]
    from_legacy = [s for s in slices if s.file.startswith(seen["root"])]
    if not flags:   # the saving layout: every tensor is a byte copy of chunks
        assert slices and not from_legacy, from_legacy[:3]
        assert ", 0 tensor bytes written there" in seen["plan"].info["intermediate"]
    else:           # a new layout: only pieces assembled from several chunks are written there, if read there
        assert len(from_legacy) < len(slices) / 4, (len(from_legacy), len(slices))
    if flags[:1] == ["--target-tp-size"]:
        written = int(seen["plan"].info["intermediate"].split(" tensor bytes written there")[0].rpartition(" ")[2])
        assert 0 < written < sum(s.count * 4 for s in slices)   # the dim-1 shards: states, and weights to check
    files = sorted(p.relative_to(outs["legacy"]) for p in outs["legacy"].rglob("*.ckpt"))
    assert files and files == sorted(p.relative_to(outs["dist"]) for p in outs["dist"].rglob("*.ckpt"))
    for f in files:
        a, b = ms.load_checkpoint(str(outs["legacy"] / f)), ms.load_checkpoint(str(outs["dist"] / f))
        assert list(a) == list(b), f
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k].asnumpy().reshape(-1).view(np.uint8),
                                                                b[k].asnumpy().reshape(-1).view(np.uint8)), (f, k)


def test_plan_pt2ms_of_torch_dist_shows_the_byte_copies(mcore_standard, tmp_path, capsys):
    """`plan pt2ms --dry-run` of a torch_dist save plans the whole conversion: the tensors read from the
    torch_dist folder as byte copies (fp32 weights and states) or streamed casts, no tensor bytes written into
    the temporary folder, which is gone afterwards, and nothing written at --ms-path; -o is refused."""
    run = mcore_standard("0.12.1", "dense")
    src = run.dir / "torch_dist_fully_sharded_model_space"
    out = tmp_path / "ms"
    assert main(["plan", "pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "--megatron-version", "0.12.1",
                 "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"plan pt2ms: {src / 'iter_0000001'} -> {out}" in text, text[:600]
    assert "0 tensor bytes written there" in text and "source_format torch_dist" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("  exp_avg.decoder.layers.N.")]
    assert rows and all(r[1:3] == ["byte", "copy"] for r in rows), rows
    assert list(tmp_path.iterdir()) == []
    assert main(["plan", "pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "-o", str(tmp_path / "p.json")]) == 2
    assert "plan pt2ms -o" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def _deep_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_deep_equal(x, y) for x, y in zip(a, b))
    return repr(a) == repr(b)


MOE_SAVES = {"0.12.1": ("fully_sharded_model_space", "dp_zero_gather_scatter"),
             "0.16.1": ("dp_reshardable", "dp_zero_gather_scatter")}
# another layout per sharding type (TP stays: megatron-core needs sequence parallelism for TP > 1 with EP)
MOE_LAYOUTS = (("pp2-dp2", ["--target-pp-size", "2", "--target-dp-size", "2"], dict(pp=2, dp=2)),
               ("dp2", ["--target-dp-size", "2"], dict(dp=2)))
MOE_EP4 = ("ep4-pp2", ["--target-ep-size", "4", "--target-pp-size", "2"], dict(ep=4, pp=2))   # 1 expert per rank
MOE_EP1 = ("ep1", ["--target-ep-size", "1"], dict(ep=1))   # no expert optimizer: one optimizer, every parameter


@pytest.mark.parametrize("version", sorted(MOE_SAVES))
def test_moe_torch_dist_to_legacy_loads_in_megatron(mcore_standard, tmp_path, version):
    """The ``moe`` case (TP 1, DP 4, EP 2, 4 experts; ChainedOptimizer [dense, expert]) at the saving layout,
    from each sharding type the version writes for it (and 0.12.1's upgraded to fully_reshardable): one
    folder per expert rank (``mp_rank_00_00E``, its experts renumbered local). distrib_optim.pt is
    byte-identical to Megatron's own legacy save of the same step (dense state in expert rank 0's file,
    expert state in each); the model files hold the same entries (weights, extra states, the chained
    optimizer's param groups as a list, RNG states) -- except the 0.12.1 RNG state of expert rank 1, which
    that version's torch_dist save does not keep (one ShardedObject per (pp, tp), data-parallel rank 0's);
    and the version's own loader gets the live values, also at PP 2 x DP 2 (one sharding type), DP 2 (the
    other), EP 4 x PP 2, EP 1 (the [dense, expert] state merged into one optimizer, as megatron-core builds
    it there) and, for 0.16.1, from 0.12.1's save written as 0.16.1 files."""
    run = mcore_standard(version, "moe")
    legacy = run.dir / "legacy" / "iter_0000001"
    ranks = sorted(p.name for p in legacy.iterdir())
    assert ranks == ["mp_rank_00_000", "mp_rank_00_001"]
    jobs = []
    for st in MOE_SAVES[version]:
        out = tmp_path / st
        convert(run.dir / f"torch_dist_{st}", out, "--target-megatron-version", version)
        assert sorted(p.name for p in (out / "iter_0000001").glob("mp_rank_*")) == ranks
        for rank in ranks:
            assert filecmp.cmp(legacy / rank / "distrib_optim.pt", out / "iter_0000001" / rank / "distrib_optim.pt",
                               shallow=False), (st, rank)
            theirs = pickles.load(legacy / rank / "model_optim_rng.pt")[0]
            mine = pickles.load(out / "iter_0000001" / rank / "model_optim_rng.pt")[0]
            assert list(mine) == list(theirs), (st, rank)
            assert isinstance(mine["optimizer"], list) and len(mine["optimizer"]) == 2
            skip = {"args"} | ({"rng_state"} if version == "0.12.1" and rank != ranks[0] else set())
            for key in theirs:
                if key not in skip:
                    assert _deep_equal(mine[key], theirs[key]), (st, rank, key)
        jobs.append(("load", run.case, [(out, "legacy", None)]))
    for st, (name, flags, case) in [*zip(MOE_SAVES[version], MOE_LAYOUTS), (MOE_SAVES[version][0], MOE_EP4),
                                    (MOE_SAVES[version][1], MOE_EP1)]:
        out = tmp_path / f"{st}-{name}"
        convert(run.dir / f"torch_dist_{st}", out, "--target-megatron-version", version, *flags)
        jobs.append(("load", dataclasses.replace(run.case, **case), [(out, "legacy", None)]))
    if version == "0.12.1":   # fully_reshardable (0.16.1's own MoE save is shifted): 0.12.1's, upgraded offline
        up = tmp_path / "fully_reshardable"
        assert main(["convert", "--from", "torch_dist", "--to", "torch_dist", "--sharding-type", "fully_reshardable",
                     "--src", str(run.dir / "torch_dist_fully_sharded_model_space"), "--dst", str(up),
                     "--no-progress"]) == 0
        convert(up, tmp_path / "fr-legacy", "--target-megatron-version", version)
        for rank in ranks:
            assert filecmp.cmp(legacy / rank / "distrib_optim.pt",
                               tmp_path / "fr-legacy" / "iter_0000001" / rank / "distrib_optim.pt", shallow=False), rank
    # EP 1 as `ckptmap reshard` writes it from Megatron's own legacy save (optimizer merged the same way)
    ep1 = tmp_path / "reshard-ep1"
    assert main(["reshard", "--megatron-path", str(run.dir / "legacy"), "--output-path", str(ep1),
                 "--target-ep-size", "1", "--target-megatron-version", version, "--no-progress",
                 "--multiprocess-off"]) == 0
    mine = tmp_path / f"{MOE_SAVES[version][1]}-ep1" / "iter_0000001" / "mp_rank_00"
    assert filecmp.cmp(ep1 / "iter_0000001" / "mp_rank_00" / "distrib_optim.pt", mine / "distrib_optim.pt",
                       shallow=False)
    assert pickles.load(mine / "model_optim_rng.pt")[0]["optimizer"] == \
        pickles.load(ep1 / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")[0]["optimizer"]
    truths = [run.truth] * len(jobs)
    if version == "0.16.1":   # another version's save written as this version's files (its bucket layout)
        old = mcore_standard("0.12.1", "moe")
        out = tmp_path / "0.12.1-as-0.16.1"
        convert(old.dir / "torch_dist_fully_sharded_model_space", out, "--target-megatron-version", version,
                "--target-dp-size", "2")
        jobs.append(("load", dataclasses.replace(run.case, dp=2), [(out, "legacy", None)]))
        truths.append(old.truth)
    for truth, got in zip(truths, run_jobs(version, jobs)):
        same_values(truth, got[0] if isinstance(got, list) else got)


def test_moe_unsupported_is_refused_before_writing(mcore_standard, tmp_path, capsys):
    """MoE: another TP size, a DP size that EP does not divide, an EP that does not divide the experts are
    refused, naming the checkpoint, what was found and what to do; nothing written."""
    run = mcore_standard("0.12.1", "moe")
    src = run.dir / "torch_dist_fully_sharded_model_space"
    out = tmp_path / "out"
    for argv, want in (
            (["--from", "torch_dist", "--to", "torch", "--target-tp-size", "2"],
             ("4 experts", "EP2", "--target-tp-size 2", "Convert at TP 1", "ckptmap reshard --target-tp-size 2")),
            (["--from", "torch_dist", "--to", "torch", "--target-dp-size", "3"],
             ("expert-parallel size 2", "--target-dp-size 3", "multiple of 2")),
            (["--from", "torch_dist", "--to", "torch", "--target-ep-size", "3"],
             ("--target-ep-size 3", "4 experts", "divisor of 4"))):
        s = run.dir / "legacy" if argv[1] == "torch" else src
        assert main(["convert", *argv, "--src", str(s), "--dst", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(s) in err and all(w in err for w in want) and "Nothing was written" in err, err
        assert not out.exists() and not list(tmp_path.glob(".out*"))


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
