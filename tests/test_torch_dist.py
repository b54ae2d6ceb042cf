"""torch_dist checkpoints (formats/torch_dist.py, formats/megatron_dist.py): reading every save the real
megatron-core 0.8.0 / 0.12.1 / 0.16.1 write (equal to the live truth, bit for bit), rewriting them
(byte-identical .distcp files), the fully_sharded_model_space -> fully_reshardable upgrade loaded by
the real megatron-core 0.16.1, the 0.16.1 fully_reshardable bug refused, and bad input.

The fast tests use a small synthetic checkpoint written by ckptmap and checked against torch's own
DCP reader (an independent implementation); the ``mcore_versions`` tests use the harness's cached
real saves (``mcore_standard`` session fixture) and its live truth."""
from __future__ import annotations

import argparse
import filecmp
import itertools
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_dist as M
from ckptmap.formats import registry
from ckptmap.formats import torch_dist as td
from ckptmap.formats import torch_zip_writer as tzw
from ckptmap.formats.safe_unpickler import Refused
from ckptmap.mapping import ops
from ckptmap.mapping.sharding import Box

STATES = ("param", "exp_avg", "exp_avg_sq")

# -------------------------------------------------------------------------------------------------
# A small synthetic Megatron torch_dist checkpoint (fully_sharded_model_space, nd-flattened, chained)


def _torch_save_bytes(obj, tmp: Path) -> bytes:
    f = tmp / "archive.pt"   # torch.save into a stream names the archive "archive"
    tzw.save(obj, f)
    data = f.read_bytes()
    f.unlink()
    return data


def _nd_flatten(g: np.ndarray, frags) -> np.ndarray:
    """Independent of ckptmap: (*frags, block numel) with fragment idx = C-order flattening of its block."""
    block = [s // f for s, f in zip(g.shape, frags)]
    out = np.empty(tuple(frags) + (int(np.prod(block)),), dtype=g.dtype)
    for idx in itertools.product(*(range(f) for f in frags)):
        out[idx] = g[tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))].reshape(-1)
    return out


def _bf16(x: np.ndarray) -> np.ndarray:
    return ops.cast(x.astype(np.float32), "float32", "bfloat16")


class Synthetic:
    """Global tensors of a 2-layer model (TP 2 along dim 1 of the SwiGLU fc1, DP 2 ranges of the
    flattened fragments), written as fully_sharded_model_space by ckptmap's writer."""

    def __init__(self, root: Path, sharding_type="fully_sharded_model_space", chained=False, shift=False):
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        self.weights = {}   # name -> (bf16 bits, fp32 param, exp_avg, exp_avg_sq)
        self.params = {"decoder.layers.mlp.linear_fc1.weight": ((2, 8, 6), (2, 4, 1)),
                       "decoder.layers.mlp.linear_fc1.layer_norm_weight": ((2, 6), (2, 1)),
                       "decoder.final_layernorm.weight": ((6,), (1,)),
                       "embedding.word_embeddings.weight": ((10, 6), (2, 1))}
        for name, (shape, _) in self.params.items():
            p = rng.standard_normal(shape).astype(np.float32)
            self.weights[name] = (_bf16(p), p, rng.standard_normal(shape).astype(np.float32),
                                  rng.random(shape).astype(np.float32))
        self.stored = {}
        tensors, mcore = [], {}
        objects = []
        files = ["__0_0.distcp", "__1_0.distcp"]
        for i, (name, (shape, frags)) in enumerate(self.params.items()):
            w = self.weights[name][0]
            boxes = M._fragments(shape, tuple(frags) + (0,))
            tensors.append(td.OutTensor(name, "bfloat16", shape, [td.OutChunk(b, files[j % 2])
                                                                  for j, b in enumerate(boxes)]))
            self.stored[name] = w
            for s, spelled in zip((1, 2, 3), ("fp32_param" if sharding_type != "fully_reshardable" else "param",
                                              "exp_avg", "exp_avg_sq")):
                opt = f"chained_{i % 2}." if chained else ""
                key = f"{opt}optimizer.state.{spelled}.{name}"
                g = self.weights[name][s]
                if shift and s == 1 and i == 0:
                    g = np.roll(g, 1)
                if sharding_type == "fully_sharded_model_space":
                    flat = _nd_flatten(g, frags)
                    n = flat.shape[-1]
                    chunks = []
                    for idx in itertools.product(*(range(f) for f in frags)):
                        cut = n // 3   # DP 2: two ranges of the fragment
                        chunks += [td.OutChunk(Box(idx + (0,), (1,) * len(idx) + (cut,)), files[0]),
                                   td.OutChunk(Box(idx + (cut,), (1,) * len(idx) + (n - cut,)), files[1])]
                    tensors.append(td.OutTensor(key, "float32", flat.shape, chunks))
                    mcore[key] = {"nd_reformulated_orig_global_shape": shape}
                    self.stored[key] = flat
                else:
                    tensors.append(td.OutTensor(key, "float32", shape, [td.OutChunk(Box((0,) * len(shape), shape),
                                                                                    files[i % 2])]))
                    self.stored[key] = g
        self.rng_obj = [{"random_rng_state": (3, tuple(range(5)), None), "np_rng_state": ("MT19937", 7)}]
        self.objects = {"rng_state/shard_0.0_1.1": _torch_save_bytes(self.rng_obj, root)}
        objects.append(td.OutObject("rng_state/shard_0.0_1.1", files[0]))
        groups = [{"lr": 0.1, "weight_decay": 0.01, "betas": (0.9, 0.95), "step": 3}]
        opt_common = {"optimizer": {"param_groups": groups}, "param_state_sharding_type": sharding_type}
        self.common = {"args": argparse.Namespace(ckpt_format="torch_dist", hidden_size=6), "checkpoint_version": 3.0,
                       "iteration": 3, "optimizer": {0: opt_common, 1: dict(opt_common)} if chained else opt_common}
        self.run = root / "run"
        self.dir = self.run / "iter_0000003"
        self.run.mkdir(parents=True)
        (self.run / "latest_checkpointed_iteration.txt").write_text("3")
        td.write_checkpoint(self.dir, tensors, objects, read_box=self._box, read_object=self.objects.__getitem__,
                            common=self.common, mcore_data=mcore)

    def _box(self, key, box):
        return np.ascontiguousarray(self.stored[key][tuple(slice(o, o + n) for o, n in zip(box.offsets, box.lengths))])


@pytest.fixture
def synthetic(tmp_path):
    return Synthetic(tmp_path)


def _eq(a, b) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize and a.tobytes() == b.tobytes()


# -------------------------------------------------------------------------------------------------
# Fast tests


def test_synthetic_checkpoint_loads_with_torch_dcp(synthetic):
    """torch's own DCP reader (FileSystemReader + _load_state_dict) reads what ckptmap wrote."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(synthetic.dir), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    assert set(sd) == set(synthetic.stored) | set(synthetic.objects)
    for key, want in synthetic.stored.items():
        t = sd[key]
        got = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert _eq(got, want), key
    assert sd["rng_state/shard_0.0_1.1"] == synthetic.rng_obj
    common = torch.load(synthetic.dir / "common.pt", weights_only=False)
    assert common["iteration"] == 3 and common["args"].hidden_size == 6


def test_reader_api(synthetic):
    r = registry.open_reader(synthetic.dir)
    assert isinstance(r, td.TorchDistCheckpoint)
    assert r.keys() == list(synthetic.stored)
    fc1 = "optimizer.state.fp32_param.decoder.layers.mlp.linear_fc1.weight"
    assert r.spec(fc1) == ("float32", (2, 4, 1, 12))
    assert len(r.chunks(fc1)) == 16 and {c.file for c in r.chunks(fc1)} == {"__0_0.distcp", "__1_0.distcp"}
    for key, want in synthetic.stored.items():
        assert _eq(r.array(key), want), key
    box = Box((1, 0, 0, 2), (1, 3, 1, 9))   # crosses both DP ranges and three fragments
    assert _eq(r.read_box(fc1, box), synthetic.stored[fc1][1:2, 0:3, 0:1, 2:11])
    # a single-chunk tensor lies contiguous in its file
    fr = r.byte_range("decoder.final_layernorm.weight")
    data = (synthetic.dir / Path(fr.path).name).read_bytes()[fr.offset:fr.offset + fr.nbytes]
    assert data == synthetic.stored["decoder.final_layernorm.weight"].tobytes()
    assert r.objects() == ["rng_state/shard_0.0_1.1"]
    assert r.read_object("rng_state/shard_0.0_1.1").root == synthetic.rng_obj
    assert r.common().root["iteration"] == 3
    r.close()


def test_megatron_view_unflattens(synthetic):
    with M.MegatronDist(synthetic.dir) as md:
        assert md.sharding_type.name == "fully_sharded_model_space"
        fc1 = md.tensor("decoder.layers.mlp.linear_fc1.weight", "param")
        assert fc1.shape == (2, 8, 6) and fc1.stored_shape == (2, 4, 1, 12) and len(fc1.boxes) == 8
        for name in synthetic.params:
            for s, state in enumerate(STATES, 1):
                assert _eq(md.array(md.tensor(name, state)), synthetic.weights[name][s]), (name, state)
            assert _eq(md.array(md.tensor(name)), synthetic.weights[name][0])
        assert _eq(md.read_box(fc1, Box((0, 1, 2), (2, 5, 3))), synthetic.weights[fc1.name][1][:, 1:6, 2:5])
        items = M.unstack(md.layout, md.tensor("decoder.layers.mlp.linear_fc1.weight"), None)
        assert [n for n, _, _ in items] == ["decoder.layers.0.mlp.linear_fc1.weight",
                                            "decoder.layers.1.mlp.linear_fc1.weight"]


def test_rewrite_is_byte_identical(synthetic, tmp_path):
    plan = M.plan_rewrite(synthetic.dir, tmp_path / "out")
    M.write_rewrite(plan)
    for f in synthetic.dir.glob("*.distcp"):
        assert filecmp.cmp(f, tmp_path / "out" / f.name, shallow=False), f.name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in synthetic.dir.iterdir())


def test_upgrade_to_fully_reshardable(tmp_path):
    syn = Synthetic(tmp_path, chained=True)
    M.write_folder(M.plan_folder(syn.run, tmp_path / "up", "fully_reshardable"))
    assert (tmp_path / "up" / "latest_checkpointed_iteration.txt").read_text() == "3"
    with M.MegatronDist(tmp_path / "up" / "iter_0000003") as md:
        assert md.sharding_type.name == "fully_reshardable"
        assert md.common["content_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"
        assert [o["param_state_sharding_type"] for o in md.common["optimizer"].values()] == ["fully_reshardable"] * 2
        keys = set(md.reader.keys())
        for name in syn.params:
            for s, state in enumerate(STATES, 1):
                key = f"optimizer.state.{state}.{name}"   # no chained_ prefix, fp32_param -> param
                assert key in keys
                assert md.reader.spec(key) == ("float32", syn.params[name][0])
                assert _eq(md.reader.array(key), syn.weights[name][s]), key
        assert not md.reader.meta.mcore_data
        md.check_fully_reshardable()
        assert md.reader.read_object("rng_state/shard_0.0_1.1").root == syn.rng_obj


def test_shifted_fully_reshardable_is_refused(tmp_path):
    syn = Synthetic(tmp_path, sharding_type="fully_reshardable", shift=True)
    with pytest.raises(CkptmapError, match="PR 5077") as e:
        M.plan_rewrite(syn.dir, tmp_path / "out")
    assert "decoder.layers.mlp.linear_fc1.weight" in str(e.value)
    assert not (tmp_path / "out").exists()
    ok = Synthetic(tmp_path / "ok", sharding_type="fully_reshardable")
    M.plan_rewrite(ok.dir, tmp_path / "out2")   # the unshifted one passes


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_distcp_file(synthetic, tmp_path):
    bad = _copy(synthetic.dir, tmp_path / "bad")
    (bad / "__1_0.distcp").unlink()
    with pytest.raises(CkptmapError, match=r"__1_0\.distcp is missing"):
        M.plan_rewrite(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_metadata_that_does_not_match_the_files(synthetic, tmp_path):
    bad = _copy(synthetic.dir, tmp_path / "bad")
    with open(bad / "__0_0.distcp", "r+b") as f:   # truncated
        f.truncate(100)
    with pytest.raises(CkptmapError, match="truncated or does not belong"):
        td.TorchDistCheckpoint(bad)
    other = Synthetic(tmp_path / "other", sharding_type="fully_reshardable")
    bad2 = _copy(synthetic.dir, tmp_path / "bad2")
    shutil.copy(other.dir / ".metadata", bad2 / ".metadata")   # metadata of another checkpoint
    with pytest.raises(CkptmapError, match="the .metadata does not match the .distcp files"):
        M.plan_rewrite(bad2, tmp_path / "out")
    # an item overwritten with garbage of another length
    bad3 = _copy(synthetic.dir, tmp_path / "bad3")
    r = td.TorchDistCheckpoint(bad3)
    c = r.chunks("decoder.final_layernorm.weight")[0]
    r.close()
    data = bytearray((bad3 / c.file).read_bytes())
    data[c.offset:c.offset + c.length] = b"\0" * c.length
    (bad3 / c.file).write_bytes(bytes(data))
    with pytest.raises(CkptmapError, match="neither a torch.save archive nor the raw"):
        M.plan_rewrite(bad3, tmp_path / "out")
    # an item whose archive is intact but whose bytes were swapped with another item of the same size:
    # found while writing; the output folder never appears
    bad4 = _copy(synthetic.dir, tmp_path / "bad4")
    r = td.TorchDistCheckpoint(bad4)
    w = r.chunks("decoder.layers.mlp.linear_fc1.weight")[0]
    o = r.chunks("optimizer.state.exp_avg.decoder.final_layernorm.weight")[0]
    r.close()
    plan = M.plan_rewrite(bad4, tmp_path / "out")
    data = bytearray((bad4 / w.file).read_bytes())
    other = (bad4 / o.file).read_bytes()[o.offset:o.offset + o.length]
    data[w.offset:w.offset + min(w.length, o.length)] = other[:min(w.length, o.length)]
    (bad4 / w.file).write_bytes(bytes(data))
    with pytest.raises(CkptmapError):
        M.write_rewrite(plan)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_unknown_sharding_type(tmp_path):
    syn = Synthetic(tmp_path, sharding_type="fully_sharded_model_space")
    common = dict(syn.common, optimizer=dict(syn.common["optimizer"], param_state_sharding_type="sharded_by_magic"))
    tzw.save(common, syn.dir / "common.pt")
    with pytest.raises(CkptmapError, match="unknown optimizer sharding type 'sharded_by_magic'"):
        M.plan_rewrite(syn.dir, tmp_path / "out")
    common["optimizer"]["param_state_sharding_type"] = "fully_sharded_bucket_space"
    tzw.save(common, syn.dir / "common.pt")
    with pytest.raises(CkptmapError, match="fully_sharded_bucket_space"):
        M.plan_rewrite(syn.dir, tmp_path / "out")
    common["optimizer"]["param_state_sharding_type"] = "dp_reshardable"   # the keys say otherwise
    tzw.save(common, syn.dir / "common.pt")
    with pytest.raises(CkptmapError, match="do not have that type's form"):
        M.plan_rewrite(syn.dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_conversion(synthetic, tmp_path):
    with pytest.raises(CkptmapError, match="cannot convert optimizer sharding type"):
        M.plan_rewrite(synthetic.dir, tmp_path / "out", "dp_zero_gather_scatter")
    # the dp_reshardable upgrade lays buckets out from the run's args: a checkpoint without them is refused
    with pytest.raises(CkptmapError, match="has no Megatron args"):
        M.plan_rewrite(synthetic.dir, tmp_path / "out", "dp_reshardable")
    assert not (tmp_path / "out").exists()


def test_metadata_pickle_cannot_run_code(synthetic, tmp_path):
    bad = _copy(synthetic.dir, tmp_path / "bad")

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    (bad / ".metadata").write_bytes(pickle.dumps(Evil(), protocol=4))
    with pytest.raises(Refused):
        td.TorchDistCheckpoint(bad)
    assert not (tmp_path / "pwned").exists()


def test_cli_plan_and_convert(synthetic, tmp_path, capsys):
    from ckptmap.cli import main

    args = ["--from", "torch_dist", "--to", "torch_dist", "--sharding-type", "fully_reshardable",
            "--src", str(synthetic.run), "--dst", str(tmp_path / "out")]
    assert main(["plan", "convert", *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "fully_sharded_model_space -> fully_reshardable" in out and "__0_0.distcp" in out
    assert not (tmp_path / "out").exists()
    assert main(["convert", *args, "--no-progress"]) == 0
    assert M.MegatronDist(tmp_path / "out" / "iter_0000003").sharding_type.name == "fully_reshardable"
    assert main(["convert", *args]) == 2   # the output exists: refused, nothing touched
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--from", "torch_dist", "--to", "torch", "--src", str(synthetic.run), "--dst",
                 str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------------------------------------
# The real megatron-core 0.8.0 / 0.12.1 / 0.16.1 saves (tests/mcore_versions)

from mcore_versions import SHARDING_TYPES, STANDARD_CASES, Case, assemble, run_jobs  # noqa: E402
from mcore_versions.fixtures import mcore_standard  # noqa: E402,F401  (session fixture)

SAVES = [(v, n, st) for v in SHARDING_TYPES for n in STANDARD_CASES for st in SHARDING_TYPES[v]]
SAVE_IDS = [f"{v}-{n}-{st}" for v, n, st in SAVES]


def _np(t) -> np.ndarray:
    import torch
    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _iter_dir(run, st) -> Path:
    return run.dir / f"torch_dist_{st}" / "iter_0000001"


def _expected_groups(truth, space):
    """Per truth (tp, pp, ep) rank and optimizer: the bucket tensors (bucket space: {(gbuf, bucket, state):
    (values, covered)}) or coalesced buffers (coalesced: {(gbuf, state): values, gaps zero}) its DP group's
    optimizer saves, from the live fp32 state and the live buffer layout."""
    out = {}
    for key, rk in truth["ranks"].items():
        for oi, opt in enumerate(rk["optimizers"]):
            exp = {}
            for gi, (ci, kind, bi) in enumerate(opt["buffers"]):
                ch = rk["chunks"][ci]
                buf = [b for b in ch["buffers"] if b["kind"] == kind][bi]
                starts = [s for s, _ in buf["bucket_indices"]]
                coalesced = np.cumsum([0] + buf["bucket_numel_unpadded"])
                for state in STATES:
                    if space == "coalesced":
                        vals = np.zeros(buf["numel_unpadded"], np.float32)
                    else:
                        vals = [np.zeros(n, np.float32) for n in buf["bucket_numel_unpadded"]]
                        cov = [np.zeros(n, bool) for n in buf["bucket_numel_unpadded"]]
                    for n, (s, e, b) in buf["param_index_map"].items():
                        v = _np(ch["live"][n][state]).reshape(-1)
                        if space == "coalesced":
                            o = coalesced[b] + s - starts[b]
                            vals[o:o + e - s] = v
                        else:
                            vals[b][s - starts[b]:e - starts[b]] = v
                            cov[b][s - starts[b]:e - starts[b]] = True
                    if space == "coalesced":
                        exp[(gi, state)] = vals
                    else:
                        for b in range(len(vals)):
                            exp[(gi, b, state)] = (vals[b], cov[b])
            out[(key, oi)] = exp
    return out


def _match_groups(found: dict, expected: dict, space, where):
    """Every file group equals the expectation of at least one truth rank's optimizer; every truth
    optimizer is matched by exactly one file group (the DP group idx is the model-parallel rank)."""
    def fits(got, exp):
        if set(got) != set(exp):
            return False
        for k, g in got.items():
            if space == "coalesced":
                if not _eq(g, exp[k]):
                    return False
            else:
                v, cov = exp[k]
                if g.shape != v.shape or not _eq(g[cov], v[cov]):
                    return False
        return True

    matched = {k: [] for k in expected}
    for gk, got in found.items():
        opt = gk[0] or 0
        hits = [ek for ek, exp in expected.items() if ek[1] == opt and fits(got, exp)]
        assert hits, f"{where}: {gk} matches no truth optimizer"
        for h in hits:
            matched[h].append(gk)
    assert all(len(v) == 1 for v in matched.values()), (where, matched)


@pytest.mark.parametrize("version,name,sharding_type", SAVES, ids=SAVE_IDS)
@pytest.mark.mcore_versions
@pytest.mark.slow
def test_every_tensor_equals_live_truth(mcore_standard, version, name, sharding_type):
    """Every model weight, and the optimizer state of every sharding type (model space: global tensors;
    bucket space: bucket tensors; coalesced: the legacy dict per DP group), read by ckptmap equals the
    live values of the run that saved it (bit for bit)."""
    run = mcore_standard(version, name)
    with M.MegatronDist(_iter_dir(run, sharding_type)) as md:
        assert md.sharding_type.name == sharding_type
        weights = assemble(run.truth, "weight")
        assert sorted(t.name for t in md.tensors("weight")) == sorted(weights)
        for t in md.tensors("weight"):
            assert _eq(md.array(t), _np(weights[t.name])), t.name
        space = md.sharding_type.space
        if space == "model":
            chained = {t.optimizer for t in md.tensors() if t.state != "weight"}
            assert chained == ({0, 1} if run.case.num_experts and sharding_type != "fully_reshardable" else {None})
            shifted = {p.name for p in md.shifted_parameters()[0]}
            assert bool(shifted) == (sharding_type == "fully_reshardable")   # the 0.16.1 bug (test below)
            for state in STATES:
                want = assemble(run.truth, state)
                assert sorted(t.name for t in md.tensors(state)) == sorted(want)
                for t in md.tensors(state):
                    assert _eq(md.array(t), _np(want[t.name])) == (t.name not in shifted), (t.name, state)
        elif space == "bucket":
            found = {}
            for b in md.buckets():
                found.setdefault((b.optimizer, b.group), {})[(b.gbuf, b.bucket, b.state)] = \
                    md.reader.array(b.key)
            for (opt, group), got in found.items():
                padded, unpadded = md.per_bucket_numel(opt, group)
                for gi, per in enumerate(unpadded):
                    (sizes,) = per.values()
                    assert sizes == [got[(gi, b, "param")].size for b in range(len(sizes))]
            _match_groups(found, _expected_groups(run.truth, "bucket"), "bucket", _iter_dir(run, sharding_type))
        else:
            found = {}
            for (opt, group, what) in md.optimizer_objects:
                if what != "param_state":
                    continue
                item, state = md.dp_zero_state(opt, group)
                found[(opt, group)] = {(gi, s): item.array(v[s]) for gi, per in state.items() if gi != "buckets_coalesced"
                                       for v in per.values() for s in STATES}
            _match_groups(found, _expected_groups(run.truth, "coalesced"), "coalesced",
                          _iter_dir(run, sharding_type))


@pytest.mark.parametrize("version,name", [(v, n) for v in SHARDING_TYPES for n in STANDARD_CASES])
@pytest.mark.mcore_versions
@pytest.mark.slow
def test_every_stored_tensor_equals_torchs_own_reader(mcore_standard, version, name):
    """Every tensor key of the version's default save, as stored (nd-flattened, bucket padding included),
    equals what torch's dcp_to_torch_save made of it in that version's launcher."""
    from mcore_versions.pickles import load as load_pickle

    run = mcore_standard(version, name)
    flat = load_pickle(run.flat_torch_dist)[0]
    with td.TorchDistCheckpoint(_iter_dir(run, SHARDING_TYPES[version][0])) as r:
        assert set(r.keys()) == {k for k, v in flat.items() if hasattr(v, "dtype")}
        for k in r.keys():
            assert _eq(r.array(k), _np(flat[k])), k


REWRITES = [s for s in SAVES if s[2] != "fully_reshardable"]


@pytest.mark.parametrize("version,name,sharding_type", REWRITES, ids=[f"{v}-{n}-{st}" for v, n, st in REWRITES])
@pytest.mark.mcore_versions
@pytest.mark.slow
def test_rewrite_reproduces_the_files(mcore_standard, tmp_path, version, name, sharding_type):
    """A same-layout rewrite re-serializes every item: 0.12.1 / 0.16.1 .distcp files come out
    byte-identical (their items are exactly torch.save of each chunk); 0.8.0's items (on CPU) pickle
    the rank's whole parameter buffer behind each chunk view, so its rewrite is value-identical and
    smaller."""
    run = mcore_standard(version, name)
    src = _iter_dir(run, sharding_type)
    M.write_rewrite(M.plan_rewrite(src, tmp_path / "out"))
    files = sorted(p.name for p in src.glob("*.distcp"))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.distcp")) == files
    if version != "0.8.0":
        for f in files:
            assert filecmp.cmp(src / f, tmp_path / "out" / f, shallow=False), f
    a, b = td.TorchDistCheckpoint(src), td.TorchDistCheckpoint(tmp_path / "out")
    assert a.keys() == b.keys() and a.objects() == b.objects()
    for k in a.keys():
        assert [c.box for c in a.chunks(k)] == [c.box for c in b.chunks(k)]
        assert _eq(a.array(k), b.array(k)), k
    for k in a.objects():
        assert bytes(a.object_bytes(k)) == bytes(b.object_bytes(k))


def _shifted_by_truth(truth) -> set:
    """Sharded keys of parameters the 0.16.1 fully_reshardable bug shifts: those behind a bucket whose
    padding the coalesced tensors drop (any rank, any chunk)."""
    out = set()
    for rk in truth["ranks"].values():
        for ch in rk["chunks"]:
            for buf in ch["buffers"]:
                pads = np.cumsum([0] + [(e - s) - u for (s, e), u in zip(buf["bucket_indices"],
                                                                          buf["bucket_numel_unpadded"])])
                for n, (_, _, b) in buf["param_index_map"].items():
                    if pads[b]:
                        meta = ch["sharded"][n[len("module."):]]
                        out.add(meta["pieces"][0]["key"] if meta["type"] == "ShardedTensorFactory" else meta["key"])
    return out


@pytest.mark.parametrize("name", list(STANDARD_CASES))
@pytest.mark.mcore_versions
@pytest.mark.slow
def test_buggy_fully_reshardable_save_is_refused(mcore_standard, tmp_path, name):
    """megatron-core 0.16.1's fully_reshardable save shifts the optimizer state behind padded buckets:
    ckptmap finds exactly the parameters the truth's buffer layout says are shifted and refuses."""
    run = mcore_standard("0.16.1", name)
    src = _iter_dir(run, "fully_reshardable")
    with M.MegatronDist(src) as md:
        shifted, checked = md.shifted_parameters()
        assert {p.name for p in shifted} == _shifted_by_truth(run.truth)
        assert checked == len(md.tensors("param"))
    with pytest.raises(CkptmapError, match="PR 5077"):
        M.plan_folder(src.parent, tmp_path / "out", "fully_reshardable")
    assert not (tmp_path / "out").exists()


UPGRADES = [("0.12.1", "dense"), ("0.12.1", "moe"), ("0.8.0", "dense")]


@pytest.mark.mcore_versions
@pytest.mark.slow
def test_upgraded_and_rewritten_checkpoints_load_in_megatron_0_16_1(mcore_standard, tmp_path):
    """fully_sharded_model_space saves of 0.12.1 (dense, MoE with chained optimizers) and 0.8.0, upgraded
    offline to fully_reshardable, and a 0.16.1 dp_reshardable save rewritten as it is, loaded by the real
    megatron-core 0.16.1 (dist_checkpointing.load into a model and optimizer poisoned with NaN): every
    weight, fp32 param and Adam moment equals the saving run's live value."""
    jobs, truths = [], []
    for version, name in UPGRADES:
        run = mcore_standard(version, name)
        out = tmp_path / f"{version}-{name}"
        M.write_folder(M.plan_folder(run.dir / "torch_dist_fully_sharded_model_space", out, "fully_reshardable"))
        jobs.append(("load", Case(version="0.16.1", **STANDARD_CASES[name]), [(out, "torch_dist", "fully_reshardable")]))
        truths.append(run.truth)
    run = mcore_standard("0.16.1", "dense")
    out = tmp_path / "0.16.1-dense-rewrite"
    M.write_folder(M.plan_folder(run.dir / "torch_dist_dp_reshardable", out))
    jobs.append(("load", run.case, [(out, "torch_dist", "dp_reshardable")]))
    truths.append(run.truth)
    t0 = time.monotonic()
    results = run_jobs("0.16.1", jobs)
    print(f"\n0.16.1 launcher with {len(jobs)} loads: {time.monotonic() - t0:.1f} s")
    _assert_loaded(jobs, truths, results)


def _assert_loaded(jobs, truths, results):
    for (job, truth, res) in zip(jobs, truths, results):
        loaded = res[0]
        for state in ("weight", *STATES):
            want, got = assemble(truth, state), assemble(loaded, state)
            assert sorted(got) == sorted(want), (job[2], state)
            for k in want:
                assert _eq(_np(got[k]), _np(want[k])), (job[2], state, k)


@pytest.mark.mcore_versions
@pytest.mark.slow
def test_rewritten_nd_flattened_checkpoints_load_in_megatron_0_12_1(mcore_standard, tmp_path):
    """ckptmap's .metadata carries Megatron's mcore_data (the nd-flattened tensors' global shapes):
    0.12.1's own loader reads fully_sharded_model_space checkpoints ckptmap rewrote (dense, and MoE with
    chained optimizers) back into exactly the live values."""
    jobs, truths = [], []
    for name in STANDARD_CASES:
        run = mcore_standard("0.12.1", name)
        out = tmp_path / name
        M.write_folder(M.plan_folder(run.dir / "torch_dist_fully_sharded_model_space", out))
        jobs.append(("load", run.case, [(out, "torch_dist", "fully_sharded_model_space")]))
        truths.append(run.truth)
    _assert_loaded(jobs, truths, run_jobs("0.12.1", jobs))


@pytest.mark.mcore_versions
@pytest.mark.slow
def test_upgraded_to_dp_reshardable_loads_in_megatron_0_16_1(mcore_standard, tmp_path, capsys):
    """0.12.1's fully_sharded_model_space save upgraded offline to dp_reshardable (0.15+'s default: the state in
    the DDP buckets 0.16.1 builds at the saving sizes, per_bucket_numel objects, param groups per DP group),
    loaded by the real megatron-core 0.16.1 at the saving layout and at DP 1 (dp_reshardable reshards DP):
    every weight, fp32 param and Adam moment equals the 0.12.1 run's live value."""
    import dataclasses

    from ckptmap.cli import main

    run = mcore_standard("0.12.1", "dense")
    out = tmp_path / "up"
    assert main(["convert", "--from", "torch_dist", "--to", "torch_dist", "--sharding-type", "dp_reshardable",
                 "--src", str(run.dir / "torch_dist_fully_sharded_model_space"), "--dst", str(out),
                 "--no-progress"]) == 0
    with M.MegatronDist(out / "iter_0000001") as md:
        assert md.sharding_type.name == "dp_reshardable" and md.common["content_metadata"][
            "distrib_optim_sharding_type"] == "dp_reshardable"
        # the bucket sizes 0.16.1 lays this model out with (its own save of the same case records the same)
        own = M.MegatronDist(_iter_dir(mcore_standard("0.16.1", "dense"), "dp_reshardable"))
        with own:
            for g in range(4):
                assert repr(md.per_bucket_numel(None, g)) == repr(own.per_bucket_numel(None, g)), g
    case = Case(version="0.16.1", **STANDARD_CASES["dense"])
    jobs = [("load", case, [(out, "torch_dist", "dp_reshardable")]),
            ("load", dataclasses.replace(case, dp=1), [(out, "torch_dist", "dp_reshardable")])]
    _assert_loaded(jobs, [run.truth, run.truth], run_jobs("0.16.1", jobs))


@pytest.mark.mcore_versions
@pytest.mark.slow
def test_upgraded_moe_to_dp_reshardable_loads_in_megatron_0_16_1(mcore_standard, tmp_path):
    """The same upgrade of 0.12.1's MoE save (EP 2, ChainedOptimizer: dense state per model-parallel rank
    under chained_0, expert state per expert-model-parallel rank under chained_1): the keys, objects and
    bucket sizes are those 0.16.1's own dp_reshardable save of the same case has, and 0.16.1 loads it to the
    0.12.1 run's live values."""
    from ckptmap.cli import main

    run = mcore_standard("0.12.1", "moe")
    out = tmp_path / "up"
    assert main(["convert", "--from", "torch_dist", "--to", "torch_dist", "--sharding-type", "dp_reshardable",
                 "--src", str(run.dir / "torch_dist_fully_sharded_model_space"), "--dst", str(out),
                 "--no-progress"]) == 0
    with M.MegatronDist(out / "iter_0000001") as md, \
            M.MegatronDist(_iter_dir(mcore_standard("0.16.1", "moe"), "dp_reshardable")) as own:
        assert md.common["optimizer"] == own.common["optimizer"]
        mine_keys = sorted(k for k in md.reader.keys() if "optimizer" in k)
        assert mine_keys == sorted(k for k in own.reader.keys() if "optimizer" in k)
        for k in mine_keys:
            assert md.reader.spec(k).shape == own.reader.spec(k).shape, k
        # the RNG over DP as 0.16.1 keeps it with EP (0.12.1's one per (pp, tp) on every DP rank); the rerun
        # machine's state, which 0.10 - 0.14 save and 0.16 does not, stays as saved
        assert sorted(o for o in md.reader.objects() if not o.startswith("rerun_state_machine")) == \
            sorted(own.reader.objects())
        for opt, groups in ((0, [0]), (1, [0, 1])):
            for g in groups:
                assert repr(md.per_bucket_numel(opt, g)) == repr(own.per_bucket_numel(opt, g)), (opt, g)
    case = Case(version="0.16.1", **STANDARD_CASES["moe"])
    jobs = [("load", case, [(out, "torch_dist", "dp_reshardable")])]
    _assert_loaded(jobs, [run.truth], run_jobs("0.16.1", jobs))
