"""ms2pt plans the TP ranks of a pipeline stage (and expert rank) once: they share one tuple of storages
whose slices name ``@ms`` / ``@meta``, each rank's FileTask naming its own files. A rank whose MindSpore
file, param_map or pt_meta differs from its neighbour's is planned from its own — its faults are its own."""

import json
from pathlib import Path

import attrs
import mindspore as ms
import numpy as np
import pytest

from ckptmap.cli import main
from ckptmap.formats import pt_meta, torch_zip_reader
from ckptmap.mapping.ms2pt import META_INPUT, MS_INPUT, Ms2PtOptions, compile_ms2pt
from conftest import fixture_dir, pt2ms_into, refused_ms2pt

REPO_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "msadapter"


@pytest.fixture
def tp2pp2(tmp_path):
    """legacy_tp2pp2dp2 in MindSpore v1 folders (rank = tp + 2 * (dp + 2 * pp): tp 1 of stage 0 is rank_1)."""
    return pt2ms_into(tmp_path / "B", fixture_dir("legacy_tp2pp2dp2"))


def test_a_stages_tp_ranks_share_their_storages_and_name_their_own_files(tp2pp2, tmp_path, capsys):
    plan = compile_ms2pt(Ms2PtOptions(str(tp2pp2), str(tmp_path / "C"), planning_processes=1))
    by_path = {f.path: f for f in plan.files}
    for pp, first_rank in ((0, 0), (1, 4)):
        for name in ("model_optim_rng.pt", "distrib_optim.pt"):
            tp0, tp1 = (by_path[f"iter_0000001/mp_rank_{tp:02d}_{pp:03d}/{name}"] for tp in (0, 1))
            assert tp0.storages is tp1.storages
            for tp, f in ((0, tp0), (1, tp1)):
                assert f.inputs == {MS_INPUT: str(tp2pp2 / f"rank_{first_rank + tp}" / "network.ckpt"),
                                    META_INPUT: str(tp2pp2 / "pt_meta" / f"args_tp{tp:02d}_pp{pp:03d}.pt")}
                assert f.source == f.inputs[META_INPUT]
                files = {s.file for st in f.bound().storages for p in st.pieces
                         for s in ((p.tensor.sources if p.tensor else ()) + ((p.padding,) if p.padding else ()))}
                assert files <= set(f.inputs.values()) and str(tp2pp2 / f"rank_{first_rank + tp}" / "network.ckpt") in files
    # the plan file is still json.dumps of the whole plan (its storages' text made once per tuple)
    assert plan.to_json() == json.dumps(attrs.asdict(plan, recurse=True), indent=1)
    # the listing names each rank's own files, never an input's name
    assert main(["plan", "ms2pt", "--ms-path", str(tp2pp2), "--megatron-path", str(tmp_path / "C"), "--dry-run",
                 "--full", "--multiprocess-off"]) == 0
    out = capsys.readouterr().out
    assert "@ms" not in out and "@meta" not in out
    for rank in (0, 1, 4, 5):
        assert f"rank_{rank}/network.ckpt" in out


def test_a_tp_rank_missing_a_tensor_is_refused_by_its_own_file(tp2pp2, tmp_path, capsys):
    path = tp2pp2 / "rank_1" / "network.ckpt"
    params = ms.load_checkpoint(str(path))
    name = next(k for k in params if k.startswith("exp_avg.") and "layers.0.mlp" in k)
    del params[name]
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], str(path))
    refused_ms2pt(["ms2pt", "--ms-path", str(tp2pp2)], capsys, tmp_path / "C", f"{path} has no tensor {name}")


def test_a_tp_rank_with_another_shape_is_refused_by_its_own_file(tp2pp2, tmp_path, capsys):
    path = tp2pp2 / "rank_5" / "network.ckpt"
    params = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}
    name = next(k for k in params if k.endswith("attention.out_proj.weight") and not k.startswith("exp_avg"))
    params[name] = np.zeros((params[name].shape[0], params[name].shape[1] + 1), params[name].dtype)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], str(path))
    refused_ms2pt(["ms2pt", "--ms-path", str(tp2pp2)], capsys, tmp_path / "C", str(path), name,
            str(list(params[name].shape)))


def test_a_tp_rank_whose_param_map_differs_is_planned_from_its_own(tp2pp2, tmp_path, capsys):
    path = tp2pp2 / "pt_meta" / "param_map_buffer0_dp0tp1pp0vpp0.json"
    entries = json.loads(path.read_text())
    first = next(iter(entries))
    entries = {("renamed." + k if k == first else k): v for k, v in entries.items()}
    path.write_text(json.dumps(entries))
    refused_ms2pt(["ms2pt", "--ms-path", str(tp2pp2)], capsys, tmp_path / "C", path.name, first, "args_tp01_pp000.pt")


def test_a_tp_rank_whose_kept_numel_differs_is_planned_from_its_own(tmp_path, capsys):
    """MindSpeed-LLM on MindSpore keeps numel_unpadded as a 0-d int64 tensor, which pt_meta keeps as bytes:
    tp 1's value is read from tp 1's pt_meta even where the rest of its layout equals tp 0's."""
    b = pt2ms_into(tmp_path / "B", REPO_FIXTURES / "tiny-gqa-tp2pp1-numel-tensor")
    path = b / "pt_meta" / "args_tp01_pp000.pt"
    meta = torch_zip_reader.read_objects(path)[pt_meta.META_KEY]
    numel_ref = meta["distrib_optim"][0][next(iter(meta["distrib_optim"][0]))]["numel_unpadded"]
    kept = meta["distrib_optim_padding"][pt_meta.ref_from_fields(meta["distrib_optim_tensors"][numel_ref[1]]).storage]
    with torch_zip_reader.TorchZipFile(path) as zf:
        record = zf._archive.record(f"data/{kept[0][2].storage}")
    data = bytearray(path.read_bytes())
    numel = int(np.frombuffer(bytes(data[record.offset:record.offset + 8]), "<i8")[0])
    data[record.offset:record.offset + 8] = np.array([numel - 64], "<i8").tobytes()
    path.write_bytes(bytes(data))
    refused_ms2pt(["ms2pt", "--ms-path", str(b)], capsys, tmp_path / "C", str(path), f"[{numel}]", f"[{numel - 64}]")


def test_a_tp_rank_whose_learning_rate_differs_gets_its_own(tp2pp2, tmp_path):
    """The scalars of a stage's MindSpore files are decoded once while their bytes agree, and a model file's
    updates are made once for ranks reading them from one optimizer state object (stage 1's tp 1 reads its
    pt_meta from tp 0's tree): a TP rank whose learning rate differs from its neighbour's
    gets its own in its model_optim_rng.pt (read back by torch.load); the neighbour's file is the original."""
    import torch

    a = fixture_dir("legacy_tp2pp2dp2")
    path = tp2pp2 / "rank_5" / "network.ckpt"
    params = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}
    params["learning_rate_group_0"] = np.array(0.125, np.float32)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], str(path))
    c = tmp_path / "C"
    assert main(["ms2pt", "--ms-path", str(tp2pp2), "--megatron-path", str(c), "--no-progress",
                 "--multiprocess-off"]) == 0
    rel = "iter_0000001/mp_rank_{:02d}_001/model_optim_rng.pt"
    assert (c / rel.format(0)).read_bytes() == (a / rel.format(0)).read_bytes()
    orig = torch.load(a / rel.format(1), map_location="cpu", weights_only=False)
    got = torch.load(c / rel.format(1), map_location="cpu", weights_only=False)
    assert orig["optimizer"]["optimizer"]["param_groups"][0]["lr"] != 0.125
    assert got["optimizer"]["optimizer"]["param_groups"][0]["lr"] == 0.125
    got["optimizer"]["optimizer"]["param_groups"][0]["lr"] = orig["optimizer"]["optimizer"]["param_groups"][0]["lr"]
    assert str(got["optimizer"]) == str(orig["optimizer"]) and got["iteration"] == orig["iteration"]


def test_a_stages_pt_meta_files_read_from_one_tree_share_their_tensor_list(tp2pp2):
    """Stage 1's tp 1 pt_meta is read from tp 0's tree: its model tensors list is tp 0's (walked once) and
    equals the list a plain read of the file gives; stage 0's file, another skeleton, gets its own."""
    from ckptmap.formats import torch_zip_reader
    from ckptmap.mapping.ms2pt import _read_meta

    meta_dir = tp2pp2 / "pt_meta"
    walked: list = []
    with torch_zip_reader.shared_trees({}):
        tp0, tp1, other = (_read_meta(meta_dir, tp, pp, None, walked) for tp, pp in ((0, 1), (1, 1), (0, 0)))
    assert tp1.tensors is tp0.tensors and other.tensors is not tp0.tensors
    for meta, tp, pp in ((tp1, 1, 1), (other, 0, 0)):
        alone = _read_meta(meta_dir, tp, pp)
        assert meta.tensors == alone.tensors and meta.root["args"].rank == alone.root["args"].rank


def test_the_executor_names_the_rank_file_of_a_shared_storage(tp2pp2, tmp_path):
    """A MindSpore file changed after planning (a tensor of another shape under its name) fails the rank's
    files at execution, with the rank's real file named — not the @ms input its shared storages name."""
    from ckptmap import execute

    plan = compile_ms2pt(Ms2PtOptions(str(tp2pp2), str(tmp_path / "C"), planning_processes=1))
    path = tp2pp2 / "rank_5" / "network.ckpt"
    params = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}
    name = next(k for k in params if k.endswith("attention.out_proj.weight") and not k.startswith("exp_avg"))
    params[name] = np.zeros((params[name].shape[0], params[name].shape[1] + 1), params[name].dtype)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], str(path))
    report = execute.run_plan(plan, processes=1, multiprocess=False, progress=False)
    failed = {r.path: r.error for r in report.failed}
    assert sorted(failed) == ["iter_0000001/mp_rank_01_001/distrib_optim.pt",
                              "iter_0000001/mp_rank_01_001/model_optim_rng.pt"], sorted(failed)
    for error in failed.values():
        assert str(path) in error and name.split(".", 1)[-1] in error and "@ms" not in error, error
    assert not (tmp_path / "C" / "iter_0000001/mp_rank_01_001/model_optim_rng.pt").exists()
    assert (tmp_path / "C" / "iter_0000001/mp_rank_00_001/model_optim_rng.pt").exists()
