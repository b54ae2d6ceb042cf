"""Legacy checkpoints of the real megatron-core 0.8.0 / 0.12.1 / 0.16.1 (coalesced distrib_optim.pt,
64-element parameter alignment, lcm(dp, 128) bucket padding, several buckets, VPP, tied embeddings
across the pipeline; and MoE with 4 experts on EP 2: mp_rank_TT_EEE folders, a ChainedOptimizer's
[dense, expert] state list, expert buffers padded for the expert data-parallel group): pt2ms gives the live optimizer's values (read back with MindSpore's own
loader), the layout ckptmap derives equals the live param_index_map, ms2pt rebuilds every file byte
for byte, and each version's own load_parameter_state loads what ms2pt wrote to the live values."""
import json
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch

from ckptmap.cli import main
from mcore_versions import VERSIONS, run_jobs
from mcore_versions.fixtures import mcore_standard  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.mcore_versions, pytest.mark.slow]
STATES = ("param", "exp_avg", "exp_avg_sq")


def global_layer(case, pp, chunk, local):
    """Megatron's interleaved layer numbering (independent of ckptmap's layout.py)."""
    vpp = case.vpp or 1
    per_chunk = case.num_layers // (case.pp * vpp)
    return chunk * (case.num_layers // vpp) + pp * per_chunk + local


def ms_name(case, pp, chunk, ep, ddp_name):
    """MindSpeed's name: global layer, and global expert (Megatron gives EP rank e experts e*E/EP ...)."""
    name = ddp_name[len("module."):]
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(global_layer(case, pp, chunk, int(parts[2])))
    if "local_experts" in parts:
        i = parts.index("local_experts") + 1
        parts[i] = str(ep * (case.num_experts // case.ep) + int(parts[i]))
    return ".".join(parts)


def ms_rank(case, tp, pp, ep):
    """Global rank of (tp, pp, ep) with cp = 0 and the rest of the data-parallel rank 0, rank order
    tp-cp-ep-dp-pp (Megatron's RankGenerator; fastest first)."""
    return tp + case.tp * (ep + case.ep * (case.dp // case.ep) * pp)


CASES = [(v, n) for v in VERSIONS for n in ("dense", "moe")]
IDS = [f"{v}-{n}" for v, n in CASES]


@pytest.fixture(scope="module")
def converted(mcore_standard, tmp_path_factory):
    out = {}
    for version, name in CASES:
        run = mcore_standard(version, name)
        work = tmp_path_factory.mktemp(f"legacy-{version}-{name}")
        src = run.dir / "legacy"
        assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(work / "ms"), "--no-progress"]) == 0
        assert main(["ms2pt", "--ms-path", str(work / "ms"), "--megatron-path", str(work / "back"),
                     "--no-progress"]) == 0
        out[(version, name)] = (run, src, work)
    return out


@pytest.mark.parametrize("key", CASES, ids=IDS)
def test_pt2ms_values_equal_the_live_optimizer(converted, key):
    run, _, work = converted[key]
    case = run.case
    compared = 0
    for (tp, pp, ep), rank in run.truth["ranks"].items():
        got = ms.load_checkpoint(str(work / "ms" / f"rank_{ms_rank(case, tp, pp, ep)}" / "network.ckpt"))
        for chunk, ch in enumerate(rank["chunks"]):
            for ddp, live in ch["live"].items():
                name = ms_name(case, pp, chunk, ep, ddp)   # in optimizer mode the parameter holds the fp32 main param
                for state, prefix in zip(STATES, ("", "exp_avg.", "exp_avg_sq.")):
                    assert np.array_equal(got[prefix + name].asnumpy(), live[state].numpy()), (state, name)
                compared += 1
    assert compared > 50


@pytest.mark.parametrize("key", CASES, ids=IDS)
def test_derived_layout_equals_live_param_index_map(converted, key):
    run, _, work = converted[key]
    case = run.case
    checked = 0
    for (tp, pp, ep), rank in run.truth["ranks"].items():
        for chunk, ch in enumerate(rank["chunks"]):
            # the file of an expert rank > 0 holds only the expert buffer (the dense state is in expert rank 0's)
            kept = [b for b in ch["buffers"] if ep == 0 or b["kind"] == "expert"]
            for number, buf in enumerate(kept):
                tag = f"ep{ep}" if case.ep > 1 else ""
                derived = json.loads((work / "ms" / "pt_meta" /
                                      f"param_map_buffer{number}_dp0tp{tp}pp{pp}{tag}vpp{chunk}.json").read_text())
                assert list(derived) == list(buf["param_index_map"])
                for name, (_, shape, start, end, bucket) in derived.items():
                    assert (start, end, bucket) == tuple(buf["param_index_map"][name]), name
                checked += 1
    assert checked == (8 if case.num_experts is None else 3)


@pytest.mark.parametrize("key", CASES, ids=IDS)
def test_round_trip_is_byte_identical(converted, key):
    _, src, work = converted[key]
    files = sorted(p.relative_to(src) for p in src.rglob("*.pt"))
    assert len(files) in (4, 8)
    for rel in files:
        assert (work / "back" / rel).read_bytes() == (src / rel).read_bytes(), rel


def test_real_megatron_loads_what_ms2pt_wrote(converted, tmp_path):
    """Each version's own load_checkpoint + load_parameter_state on ms2pt's output (a copy, with the
    original removed, so nothing else can be read) gives back every live value."""
    for version in VERSIONS:
        jobs, runs = [], []
        for name in ("dense", "moe"):
            run, _, work = converted[(version, name)]
            target = tmp_path / f"{version}-{name}"
            shutil.copytree(work / "back", target)
            jobs.append(("load", run.case, [(target, "legacy", None)]))
            runs.append(run)
        for run, got in zip(runs, run_jobs(version, jobs)):   # one launcher (one megatron import) per version
            _same_as_live(version, run, got[0] if isinstance(got, list) else got)


def _same_as_live(version, run, got):
    for key, rank in run.truth["ranks"].items():
        for chunk, ch in enumerate(rank["chunks"]):
            live_back = got["ranks"][key]["chunks"][chunk]["live"]
            for name, live in ch["live"].items():
                for state in STATES + ("weight",):
                    a, b = live_back[name][state], live[state]
                    assert a.dtype == b.dtype and torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16
                                                              else a, b.view(torch.int16) if
                                                              b.dtype == torch.bfloat16 else b), (version, name,
                                                                                                   state)


def test_an_unknown_version_is_named(converted, tmp_path, capsys):
    _, src, _ = converted[("0.12.1", "dense")]
    assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(tmp_path / "x"), "--megatron-version",
                 "0.6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--megatron-version 0.6" in err and "coalesced" in err and not (tmp_path / "x").exists()


def test_a_missing_expert_folder_is_named(converted, tmp_path, capsys):
    _, src, _ = converted[("0.12.1", "moe")]
    broken = tmp_path / "ckpt"
    shutil.copytree(src, broken)
    shutil.rmtree(broken / "iter_0000001" / "mp_rank_00_001")
    assert main(["pt2ms", "--megatron-path", str(broken), "--ms-path", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "EP size disagrees" in err and "Missing: mp_rank_00_001" in err and not (tmp_path / "x").exists()


def test_expert_parallel_param_maps_are_not_silently_ignored(converted, tmp_path, capsys):
    """pt2ms derives the bucket layout of an EP > 1 checkpoint: a --param-map-path would not be read, so
    it is refused rather than ignored."""
    _, src, _ = converted[("0.12.1", "moe")]
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "param_map_buffer0_dp0tp0pp0vpp0.json").write_text("{}")
    assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(tmp_path / "x"), "--param-map-path",
                 str(maps), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "expert-parallel" in err and "--param-map-path" in err and not (tmp_path / "x").exists()
