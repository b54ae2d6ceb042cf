"""The tiny-MoE checkpoint builder of the scale bench (``ckptmap.demo.DemoMoEModel``) against the real
thing: its folders, keys, tensor views of the DDP buffers and distrib_optim.pt layout equal those of
the legacy checkpoint the real megatron-core 0.8.0 / 0.12.1 / 0.16.1 writes for the same model
(tests/mcore_versions' ``moe`` case); and a converted builder checkpoint holds the builder's values
bit for bit (read back with the real MindSpore) and comes back byte-identical."""

from __future__ import annotations

import collections
import filecmp

import pytest
import torch

from ckptmap import execute
from ckptmap.demo import DemoMoEModel, build_megatron_checkpoint
from ckptmap.mapping.compiler import Pt2MsOptions, compile_pt2ms
from ckptmap.mapping.ms2pt import Ms2PtOptions, compile_ms2pt
from mcore_versions import STANDARD_CASES
from mcore_versions.fixtures import mcore_standard  # noqa: F401  (session fixture)
from mcore_versions.pickles import load as load_pickle

# 0.12.1 always stores the rerun state machine's state (0.16.1 only when non-empty, 0.8.0 never);
# it is not something a conversion reads, and the builder leaves it out
OPTIONAL_TOP_KEYS = {"rerun_state_machine"}


def _model_signature(path):
    """Top-level keys, and per model entry: name, and for a tensor its shape, dtype, which storage (by
    order of first use), offset in it and that storage's size -- the DDP buffer layout as Megatron
    saved it; optimizer: per (dense, expert) optimizer its param groups' (wd_mult, is_expert_parallel)."""
    obj, _ = load_pickle(path)
    storages: dict = {}
    model = []
    for name, v in obj["model"].items():
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            ident = storages.setdefault(st.data_ptr(), len(storages))
            model.append((name, tuple(v.shape), v.dtype, ident, v.storage_offset(), st.nbytes()))
        else:
            model.append((name, v))
    groups = [[(g["wd_mult"], g["is_expert_parallel"]) for g in o["optimizer"]["param_groups"]]
              for o in obj["optimizer"]]
    a = obj["args"]
    sizes = {k: getattr(a, k) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                        "expert_model_parallel_size", "data_parallel_size", "num_experts",
                                        "num_layers", "hidden_size", "ffn_hidden_size", "untie_embeddings_and_output_weights",
                                        "use_distributed_optimizer")}
    return {"keys": [k for k in obj if k not in OPTIONAL_TOP_KEYS], "model_type": type(obj["model"]),
            "model": model, "param_groups": groups, "args": sizes}


def _optim_signature(path):
    obj = torch.load(path, map_location="cpu", weights_only=False)
    out = [type(obj), len(obj)]
    for entry in obj:
        if entry is None:
            out.append(None)
            continue
        out.append([(k, {dk: [(s, tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else (s, t)
                               for s, t in states.items()] for dk, states in v.items()} if isinstance(v, dict) else v)
                    for k, v in entry.items()])
    return out


def _builder_model(case) -> DemoMoEModel:
    return DemoMoEModel(tp=case.tp, pp=case.pp, dp=case.dp, ep=case.ep, experts=case.num_experts, layers=case.num_layers,
                        hidden=case.hidden, heads=case.heads, groups=case.query_groups, kv=case.hidden // case.heads,
                        ffn=case.ffn, vocab=case.vocab, swiglu=case.swiglu, norm_bias=True,
                        overlap_grad_reduce=case.overlap_grad_reduce, bucket_size=case.bucket_size,
                        version=".".join(case.version.split(".")[:2]))


@pytest.mark.mcore_versions
@pytest.mark.slow   # runs the real megatron-core the first time (then cached in .venv/mcore-cache)
@pytest.mark.parametrize("version", ["0.8.0", "0.12.1", "0.16.1"])
def test_moe_builder_writes_what_megatron_core_writes(mcore_standard, tmp_path, version):
    run = mcore_standard(version, "moe")
    case = run.case
    assert case.num_experts and case.ep > 1 and not case.bias, STANDARD_CASES["moe"]
    real_iter = run.dir / "legacy" / "iter_0000001"
    build_megatron_checkpoint(tmp_path / "built", _builder_model(case), iteration=1, keep_truth=False)
    built_iter = tmp_path / "built" / "iter_0000001"

    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*.pt"))
    assert files(built_iter) == files(real_iter)   # mp_rank_00_000 / _001, each with both files
    for rank in sorted(p.name for p in real_iter.iterdir()):
        real = _model_signature(real_iter / rank / "model_optim_rng.pt")
        built = _model_signature(built_iter / rank / "model_optim_rng.pt")
        for key in ("keys", "model_type", "param_groups", "args"):
            assert built[key] == real[key], (version, rank, key)
        # names, order, shapes, dtypes, which buffer, offset in it, buffer sizes: the bucket layout
        assert built["model"] == real["model"], (version, rank)
        assert (_optim_signature(built_iter / rank / "distrib_optim.pt")
                == _optim_signature(real_iter / rank / "distrib_optim.pt")), (version, rank)


@pytest.mark.parametrize("planning_processes", [1, 2])
def test_moe_builder_converts_bit_exactly_and_back(tmp_path, planning_processes):
    """TP 2 x PP 2 x EP 2 (DP 4), SwiGLU, 2 local experts per EP rank: every MindSpore tensor equals the
    builder's own value (weights, fp32 main params, moments; experts numbered globally, layers
    globally), read with the real MindSpore; ms2pt gives back the builder's files byte for byte. Planned
    in one process, and by stage in two (issue 16: the second stage's ranks read in a forked process)."""
    ms = pytest.importorskip("mindspore")
    model = DemoMoEModel(tp=2, pp=2, dp=4, ep=2, experts=4, layers=4, hidden=32, heads=4, groups=2, kv=8, ffn=32,
                         vocab=64, swiglu=True, norm_bias=False)
    src, dst, back = tmp_path / "megatron", tmp_path / "ms", tmp_path / "back"
    truth = build_megatron_checkpoint(src, model, iteration=7)
    plan = compile_pt2ms(Pt2MsOptions(str(src), str(dst), planning_processes=planning_processes))
    assert not execute.run_plan(plan, processes=2, progress=False).failed
    local = model.experts // model.ep
    checked = collections.Counter()
    for (tp, pp, ep), rank in truth.items():
        # MindSpeed's rank of (tp, pp, ep), order tp-cp-ep-dp-pp: expert rank ep is data-parallel rank ep
        g = tp + model.tp * (ep + model.dp * pp)
        loaded = {k: torch.from_numpy(v.asnumpy())
                  for k, v in ms.load_checkpoint(str(dst / f"rank_{g}" / "network.ckpt")).items()}
        for name, values in rank.items():
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(pp * (model.layers // model.pp) + int(parts[2]))
            if "local_experts" in parts:
                i = parts.index("local_experts") + 1
                parts[i] = str(ep * local + int(parts[i]))
            ms_name = ".".join(parts)
            for state, prefix in (("param", ""), ("exp_avg", "exp_avg."), ("exp_avg_sq", "exp_avg_sq.")):
                assert torch.equal(loaded[prefix + ms_name], values[state]), (tp, pp, ep, prefix + ms_name)
                checked[state] += 1
            # the bf16 weight is the fp32 main param rounded (what the conversion checks, here from torch)
            assert torch.equal(values["param"].to(torch.bfloat16), values["weight"])
    assert checked["param"] == sum(len(r) for r in truth.values()) > 0
    assert not execute.run_plan(compile_ms2pt(Ms2PtOptions(str(dst), str(back))), processes=2, progress=False).failed
    originals = sorted(p.relative_to(src) for p in src.rglob("*.pt"))
    assert len(originals) == 16
    for rel in originals:
        assert filecmp.cmp(src / rel, back / rel, shallow=False), rel


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """TP 2 x PP 4 x EP 2 (DP 2): 16 mp_rank folders; the two middle stages' pickles repeat over TP and EP."""
    root = tmp_path_factory.mktemp("moe") / "megatron"
    build_megatron_checkpoint(root, DemoMoEModel(tp=2, pp=4, dp=2, ep=2, experts=4, layers=4, hidden=16, heads=4,
                                                 groups=2, kv=4, ffn=16, vocab=64, swiglu=True, norm_bias=False),
                              iteration=3, keep_truth=False)
    return root


def test_planning_unpickles_each_distinct_pickle_once_and_plans_the_same(moe_checkpoint, tmp_path, monkeypatch):
    """Planning shares the object tree of files whose pickles and records are byte-identical (issue 16:
    at 16,384 ranks the distrib_optim.pt files repeat a few dozen pickles) and reads a model file whose
    pickle differs from the last one of its length only in plain numbers (its args' rank, as Megatron's
    do) from that one's tree (pickle_delta): it unpickles each distinct distrib_optim.pt pickle once and
    one model file per pipeline stage, and the plan is the one planning without sharing makes, JSON text
    for JSON text."""
    import contextlib
    import hashlib
    import os

    from ckptmap.formats import torch_zip_reader as tzr

    pickles = {}
    for f in sorted(moe_checkpoint.rglob("*.pt")):
        with tzr.TorchZipFile(f) as zf:
            pickles[f] = hashlib.sha256(zf._archive.read_record("data.pkl")).hexdigest()
    unpickled = []
    original = tzr._unpickle

    def counting(archive, *a, **kw):
        unpickled.append(archive.path)
        return original(archive, *a, **kw)

    monkeypatch.setattr(tzr, "_unpickle", counting)
    shared = compile_pt2ms(Pt2MsOptions(str(moe_checkpoint), str(tmp_path / "out")))
    models = {f: h for f, h in pickles.items() if f.name == "model_optim_rng.pt"}
    assert len(pickles) == 32 and len(set(models.values())) == 16
    optims = {h for f, h in pickles.items() if f.name == "distrib_optim.pt"}
    stages = {f.parent.name.split("_")[3] for f in models}
    assert [os.path.basename(p) for p in unpickled].count("model_optim_rng.pt") == len(stages) == 4
    assert len(unpickled) == len(optims) + len(stages) < 32, (len(unpickled), len(pickles))

    monkeypatch.setattr(tzr, "shared_trees", contextlib.nullcontext)
    unpickled.clear()
    alone = compile_pt2ms(Pt2MsOptions(str(moe_checkpoint), str(tmp_path / "out")))
    assert len(unpickled) == len(pickles)
    assert shared.to_json() == alone.to_json()


def test_ranks_of_one_structure_share_one_tensor_list(moe_checkpoint, tmp_path, monkeypatch):
    """Issue 16: the plan holds one tensor list per distinct rank structure, not one per rank. The two
    TP ranks of each (stage, expert rank) read equal pickles with equal bucket layouts, so their
    rank_N/network.ckpt tasks share one tuple and name their files through FileTask.inputs; bound, each
    reads its own folder (the dense state from the expert-rank-0 folder of its TP rank and stage), and
    equals what planning without shared object trees makes (where nothing is shared). The plan JSON
    keeps the inputs; a slice naming an input the file does not have is refused, naming both."""
    import contextlib
    import json
    import os

    from ckptmap.errors import CkptmapError
    from ckptmap.formats import torch_zip_reader as tzr
    from ckptmap.mapping.plan import Plan

    import hashlib
    import zipfile

    def pickle_digest(path):
        with zipfile.ZipFile(path) as zf:
            return hashlib.sha256(zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))).hexdigest()

    tp_size, dp_size = 2, 2
    # the structures, found independently: ranks of one stage and expert rank whose optimizer files' pickles
    # are equal (the builder's first-stage ones differ between TP ranks; its other stages' do not). Their
    # model files' pickles all differ (each rank's args name it), their tensors do not
    structures = {(d.name[-7:], pickle_digest(d / "distrib_optim.pt")) for d in moe_checkpoint.glob("iter_*/mp_rank_*")}
    assert len({pickle_digest(d / "model_optim_rng.pt") for d in moe_checkpoint.glob("iter_*/mp_rank_*")}) == 16
    plan = compile_pt2ms(Pt2MsOptions(str(moe_checkpoint), str(tmp_path / "out")))
    ckpts = [f for f in plan.files if f.format == "ckpt"]
    assert len(ckpts) == 16
    assert len({id(f.tensors) for f in ckpts}) == len(structures) < 16, len(structures)
    for f in ckpts:
        g = int(f.path.split("/")[0].split("_")[1])
        # MindSpeed's rank g, order tp-cp-ep-dp-pp: expert rank ep is data-parallel rank ep
        tp, ep, pp = g % tp_size, g // tp_size % dp_size, g // (tp_size * dp_size)
        folder = lambda e: f"mp_rank_{tp:02d}_{pp:03d}_{e:03d}"   # noqa: E731
        assert {k: os.path.basename(os.path.dirname(v)) for k, v in f.inputs.items()} == \
            {"@model": folder(ep), "@optim": folder(ep), "@dense": folder(0)}, f.path
        files = {s.file for t in f.bound().tensors for s in t.sources + ((t.rounds_to,) if t.rounds_to else ())}
        assert files and all(os.path.basename(os.path.dirname(x)) in (folder(ep), folder(0)) for x in files)
        assert any(folder(ep) in x and x.endswith("distrib_optim.pt") for x in files) or ep == 0

    monkeypatch.setattr(tzr, "shared_trees", contextlib.nullcontext)
    alone = compile_pt2ms(Pt2MsOptions(str(moe_checkpoint), str(tmp_path / "out")))
    assert len({id(f.tensors) for f in alone.files if f.format == "ckpt"}) == 16
    assert [f.bound() for f in plan.files] == [f.bound() for f in alone.files]

    again = Plan.from_json(plan.to_json())
    assert [f.bound() for f in again.files] == [f.bound() for f in plan.files]
    raw = json.loads(plan.to_json())
    damaged = next(f for f in raw["files"] if f["format"] == "ckpt")
    del damaged["inputs"]["@dense"]
    with pytest.raises(CkptmapError) as err:
        [f.bound() for f in Plan.from_json(json.dumps(raw)).files]
    assert "@dense" in str(err.value) and damaged["path"] in str(err.value)


def test_shared_trees_never_hide_a_damaged_file(moe_checkpoint, tmp_path):
    """A file whose pickle equals another's but whose storage record is cut short is read on its own
    (the record sizes are part of what must be equal) and refused, naming it."""
    import shutil

    from ckptmap.errors import CkptmapError
    from ckptmap.formats import torch_zip_reader as tzr

    first, second = sorted(moe_checkpoint.rglob("mp_rank_0*_001_001/distrib_optim.pt"))[:2]
    with tzr.TorchZipFile(first) as a, tzr.TorchZipFile(second) as b:
        assert a._archive.read_record("data.pkl") == b._archive.read_record("data.pkl")
    damaged = tmp_path / "damaged.pt"
    shutil.copy(second, damaged)
    # shrink the largest storage record's size in its central directory entry (offset 20: compressed and
    # uncompressed size): a record 4 bytes short, the same pickle
    import struct
    import zipfile
    with zipfile.ZipFile(damaged) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(damaged.read_bytes())
    central = data.find(info.filename.encode(), data.find(b"PK\x01\x02")) - 46   # 46: fixed part of an entry
    assert data[central:central + 4] == b"PK\x01\x02"
    struct.pack_into("<LL", data, central + 20, info.compress_size - 4, info.file_size - 4)
    damaged.write_bytes(bytes(data))
    with tzr.shared_trees():
        tzr.TorchZipFile(first)
        with pytest.raises(CkptmapError, match="damaged.pt"):
            tzr.TorchZipFile(damaged)


def test_the_dry_run_summary_counts_every_ranks_tensors(moe_checkpoint, tmp_path):
    """The summary tallies the tensors of files sharing one tensor list once per file: its totals are the
    plan's own counts (every file's tensors and storage pieces), by pattern and by how they are made."""
    import io
    import re

    from ckptmap.cli.printing import print_plan

    plan = compile_pt2ms(Pt2MsOptions(str(moe_checkpoint), str(tmp_path / "out")))
    ckpts = [f for f in plan.files if f.format == "ckpt"]
    assert len({id(f.tensors) for f in ckpts}) < len(ckpts)   # shared lists: the case in question
    want = sum(len(f.tensors) for f in plan.files) + sum(
        1 for f in plan.files for s in f.storages for p in s.pieces if p.tensor is not None)
    out = io.StringIO()
    print_plan(plan, out, detail=False, summary=True)
    text = out.getvalue()
    assert f"tensors by pattern ({want} tensors)" in text
    made = text[text.index("how the bytes are made: "):].splitlines()[0]
    assert sum(int(n) for n in re.findall(r" (\d+) tensors", made)) == want
    # and every file's bytes: its tensors' elements times their item sizes, summed here
    import math

    import numpy as np

    from ckptmap.cli.printing import human_bytes

    itemsize = {"bfloat16": 2}
    total = sum(math.prod(t.shape) * (itemsize.get(t.dtype) or np.dtype(t.dtype).itemsize)
                for f in plan.files for t in f.tensors)
    assert f"tensors, {human_bytes(total)} of tensor data" in text


def test_the_listing_before_a_run_names_each_files_tensors_bytes_and_source(moe_checkpoint, tmp_path):
    """One line per file before a run: a .ckpt's tensor count and bytes (summed here from numpy item sizes,
    once per file although ranks share their tensor lists), a pt_meta's model file relative to the source
    root (os.path.relpath), and the total."""
    import io
    import math
    import os

    import numpy as np

    from ckptmap.cli.printing import human_bytes, print_plan

    plan = compile_pt2ms(Pt2MsOptions(str(moe_checkpoint), str(tmp_path / "out")))
    out = io.StringIO()
    print_plan(plan, out, detail=False)
    lines = out.getvalue().splitlines()
    root = str(moe_checkpoint / "iter_0000003")
    total = 0
    itemsize = {"bfloat16": 2, "float32": 4, "float16": 2}
    for f in plan.files:
        if f.format == "ckpt":
            nbytes = sum(math.prod(t.shape) * (itemsize.get(t.dtype) or np.dtype(t.dtype).itemsize) for t in f.tensors)
            total += nbytes
            assert f"{f.path}  (ckpt, {len(f.tensors)} tensors, {human_bytes(nbytes)})" in lines
        elif f.format == "torch_meta":
            assert any(line.startswith(f"{f.path}  (entries ") and f" of {os.path.relpath(f.source, root)} + " in line
                       for line in lines), f.path
    assert any(f"(source root {root})" in line for line in lines)
    assert lines[-1].startswith(f"total: {len(plan.files)} files, ") and f" {human_bytes(total)} of tensor data" in lines[-1]
