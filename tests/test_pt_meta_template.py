"""pt_meta of a stage's ranks written from the first one's pickle (pt_meta._Written): the same bytes as each
written alone, and what torch.load reads back is each rank's own numbers. Truth: torch.load of the
source files and of the written ones; the full writer's bytes (tests/test_pickler_c.py holds those to
torch.save's)."""

import argparse
import pickle
import pickletools
from pathlib import Path

import pytest
import torch

from ckptmap.formats import pickle_delta, pt_meta, torch_zip_reader, torch_zip_writer
from ckptmap.mapping.compiler import Pt2MsOptions, compile_pt2ms

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.mark.parametrize("value", [0, 1, 255, 256, 65535, 65536, -1, -256, 2 ** 31 - 1, -2 ** 31, 2 ** 31, 0.0, -0.0,
                                   1.5, float("inf"), 1e-310, True])
def test_pickled_as_names_the_opcode_the_stock_pickler_writes(value):
    ops = [op.name for op, _, _ in pickletools.genops(pickle.dumps(value, protocol=2))]
    written = ops[1]   # after PROTO
    for name in ("BININT1", "BININT2", "BININT", "BINFLOAT"):
        assert pickle_delta.pickled_as(value, name) == (name == written), (value, name, written)


def _count_full_writes(monkeypatch) -> list:
    full = []
    real = torch_zip_writer.save_streaming

    def counting(obj, path, *a, **kw):
        full.append(Path(path).name)
        return real(obj, path, *a, **kw)
    monkeypatch.setattr(torch_zip_writer, "save_streaming", counting)
    return full


def _write_all(tasks, out: Path, shared: bool) -> None:
    out.mkdir()
    if shared:
        with torch_zip_reader.shared_trees({}):
            for source, aux, keys, extra, name in tasks:
                pt_meta.write_pt_meta(source, aux, keys, extra, out / name)
    else:
        for source, aux, keys, extra, name in tasks:
            pt_meta.write_pt_meta(source, aux, keys, extra, out / name)


def test_real_megatron_stage_ranks_get_their_neighbours_pickle_with_their_own_numbers(tmp_path, monkeypatch):
    """Megatron core_r0.6.0, TP 2 x PP 2 with the distributed optimizer: the pt_meta tasks of pt2ms, written
    in stage order inside shared_trees, pickle once per stage; every file equals its own full write, and
    torch.load of it gives the source file's args (rank included)."""
    src = FIXTURES / "megatron-r0.6.0/legacy_tp2pp2dp2"
    plan = compile_pt2ms(Pt2MsOptions(megatron_path=str(src), ms_path=str(tmp_path / "ms")))
    tasks = [(f.source, f.aux_source, f.keys, f.extra, Path(f.path).name) for f in plan.files
             if f.format == "torch_meta"]
    assert len(tasks) == 4 and all(t[1] for t in tasks)
    _write_all(tasks, tmp_path / "alone", shared=False)
    full = _count_full_writes(monkeypatch)
    _write_all(tasks, tmp_path / "shared", shared=True)
    assert len(full) == 2, full   # one per stage: the second TP rank is its neighbour's pickle, patched
    for source, _, _, _, name in tasks:
        assert (tmp_path / "shared" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes(), name
        got = torch.load(tmp_path / "shared" / name, weights_only=False)
        want = torch.load(source, map_location="cpu", weights_only=False)
        assert vars(got["args"]) == vars(want["args"])
        assert got["ckptmap"]["model_optim_rng"]["args"].rank == want["args"].rank
    assert sorted(torch.load(tmp_path / "shared" / t[4], weights_only=False)["args"].rank for t in tasks) == [0, 1, 4, 5]


def _rank_file(folder: Path, rank: int) -> Path:
    """A rank's file; one name in every rank's folder (the archive prefix is the file's stem, as in Megatron's)."""
    folder.mkdir()
    path = folder / "model_optim_rng.pt"
    w = torch.arange(6, dtype=torch.float32)
    torch.save({"args": argparse.Namespace(rank=rank, lr=0.5 + rank, world=8, name="gpt"), "iteration": 7,
                "model": {"w": w, "step": 300 + rank}, "rng": {"seed": 70000 + rank, "state": torch.arange(4)},
                "checkpoint_version": 3.0}, path)
    return path


@pytest.mark.parametrize("keys", [("args", "iteration", "checkpoint_version"),
                                  ("args", "model", "iteration")],   # "model" twice: in out and in the skeleton
                         ids=["entries", "a model chunk kept whole too"])
def test_numbers_anywhere_in_the_pt_meta_object_are_the_ranks_own(tmp_path, monkeypatch, keys):
    """Ranks differing in an args int and float, an int inside the model chunk (copied into the skeleton)
    and one under a key pt_meta does not keep at the top (kept in the skeleton only): after the first,
    each is written from its pickle, byte for byte its own full write, each number its own."""
    paths = [_rank_file(tmp_path / f"r{rank}", rank) for rank in (0, 1, 3)]
    assert len({p.stat().st_size for p in paths}) == 1
    tasks = [(str(p), None, keys, {"param_name_list": [["w"]]}, f"meta{i}.pt") for i, p in enumerate(paths)]
    _write_all(tasks, tmp_path / "alone", shared=False)
    full = _count_full_writes(monkeypatch)
    _write_all(tasks, tmp_path / "shared", shared=True)
    assert full == ["meta0.pt"]
    for (source, _, _, _, name), rank in zip(tasks, (0, 1, 3)):
        assert (tmp_path / "shared" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes(), name
        got = torch.load(tmp_path / "shared" / name, weights_only=False)
        skeleton = got["ckptmap"]["model_optim_rng"]
        assert got["args"].rank == rank and got["args"].lr == 0.5 + rank
        assert skeleton["rng"]["seed"] == 70000 + rank and skeleton["model"]["step"] == 300 + rank
        if "model" in keys:
            assert got["model"]["step"] == 300 + rank


def test_a_rank_with_other_extra_is_written_in_full(tmp_path, monkeypatch):
    """The plan's extra is part of what is pickled: another extra (an int where the first had a float of
    equal value) is never taken from the first rank's pickle."""
    paths = [_rank_file(tmp_path / f"r{rank}", rank) for rank in (0, 1)]
    keys = ("args", "iteration")
    tasks = [(str(paths[0]), None, keys, {"scale": 1.0}, "meta0.pt"), (str(paths[1]), None, keys, {"scale": 1}, "meta1.pt")]
    full = _count_full_writes(monkeypatch)
    _write_all(tasks, tmp_path / "shared", shared=True)
    assert full == ["meta0.pt", "meta1.pt"]
    assert type(torch.load(tmp_path / "shared" / "meta1.pt", weights_only=False)["scale"]) is int


def test_a_workers_stage_of_eight_ranks_converts_and_comes_back_byte_for_byte(tmp_path, monkeypatch):
    """pt2ms of a TP-8 stage in one process, as a worker gets a run of a stage's files: the ranks after the
    first get their pt_meta from its kept pickle; every pt_meta equals its full write, and ms2pt gives
    back Megatron's files byte for byte."""
    from ckptmap import execute
    from ckptmap.demo import DemoModel, build_megatron_checkpoint
    from ckptmap.mapping.ms2pt import Ms2PtOptions, compile_ms2pt

    src, dst, back, alone = tmp_path / "megatron", tmp_path / "ms", tmp_path / "back", tmp_path / "alone"
    build_megatron_checkpoint(src, DemoModel(tp=8, pp=1, dp=1, layers=2, hidden=64, heads=8, groups=2, kv=8,
                                             ffn=128, vocab=256), iteration=5, keep_truth=False)
    plan = compile_pt2ms(Pt2MsOptions(str(src), str(dst)))
    metas = [f for f in plan.files if f.format == "torch_meta"]
    assert len(metas) == 8
    execute._READ_TREES.clear()
    full = _count_full_writes(monkeypatch)
    assert not execute.run_plan(plan, processes=1, multiprocess=False, progress=False).failed
    assert len(full) == 1, full   # the stage's first
    monkeypatch.undo()
    alone.mkdir()
    for f in metas:   # outside shared_trees: each written in full
        pt_meta.write_pt_meta(f.source, f.aux_source, f.keys, f.extra, alone / Path(f.path).name)
        assert (dst / f.path).read_bytes() == (alone / Path(f.path).name).read_bytes(), f.path
    assert not execute.run_plan(compile_ms2pt(Ms2PtOptions(str(dst), str(back))), processes=1, multiprocess=False,
                                progress=False).failed
    originals = sorted(p.relative_to(src) for p in src.rglob("*.pt"))
    assert len(originals) == 16
    for rel in originals:
        assert (src / rel).read_bytes() == (back / rel).read_bytes(), rel


def test_ms2pt_binds_copies_so_a_shared_pt_meta_tree_stays_as_read(tmp_path):
    """ms2pt writes each Megatron file from a pt_meta tree that other ranks' files may share (read from
    one template, torch_zip_reader.shared_trees): what it binds and updates are copies — containers and
    the args Namespace — so the tree equals torch.load of the pt_meta file afterwards."""
    from ckptmap.cli import main
    ms = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(FIXTURES / "megatron-r0.6.0/legacy_tp2pp2dp2"), "--ms-path", str(ms),
                 "--no-progress"]) == 0
    path = ms / "pt_meta" / "args_tp01_pp000.pt"
    with torch_zip_reader.shared_trees({}):
        meta = torch_zip_reader.TorchZipFile(path).root["ckptmap"]
    bound = pt_meta.bind_skeleton(meta, "model_optim_rng")
    assert bound["args"] is not meta["model_optim_rng"]["args"] and type(bound["args"]) is argparse.Namespace
    for where in (["args", "rank"], ["iteration"], ["optimizer", "optimizer", "param_groups", 0, "lr"]):
        pt_meta._set_path(bound, where, 12345)
    want = torch.load(path, map_location="cpu", weights_only=False)["ckptmap"]["model_optim_rng"]
    skeleton = meta["model_optim_rng"]
    assert skeleton["args"].rank == want["args"].rank == 1 and skeleton["iteration"] == want["iteration"] != 12345
    assert skeleton["optimizer"]["optimizer"]["param_groups"][0]["lr"] == want["optimizer"]["optimizer"]["param_groups"][0]["lr"]
    assert bound["args"].rank == bound["iteration"] == 12345
