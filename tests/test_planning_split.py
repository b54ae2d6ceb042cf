"""Planning split over processes by pipeline stage (issue 16: a 16,384-rank dry run on 2 cores). The
converted values are checked against truth in test_pt2ms_optimizer (real r0.6.0 fixtures) and
test_scale_moe (the MoE builder's own values) with the split forced; here: how stages are split, that
what only all parts together can tell is still told (a rule no stage matched, bucket layouts no single
version explains, a bad file in another process's stages, a planning process that dies), and that the
directories a planning process read reach the writing workers."""

from __future__ import annotations

import os
import shutil
import signal
import time

import numpy as np
import pytest

from ckptmap.cli import main
from ckptmap.errors import CkptmapError
from ckptmap.formats import torch_zip_reader
from ckptmap.mapping import planning_split
from ckptmap.mapping.compiler import Pt2MsOptions, compile_pt2ms
from ckptmap.mapping.megatron_source import MegatronSource, PartFacts, SourceOptions
from conftest import fixture_dir

PP2 = "legacy_tp2pp2dp2"      # real Megatron r0.6.0: TP 2 x PP 2, DP 2
PP3 = "legacy_tp1pp3vpp2dp1"  # PP 3, two model chunks a stage


def test_stages_are_split_into_contiguous_parts(monkeypatch):
    monkeypatch.setattr(planning_split, "available_cpus", lambda: 2)
    assert planning_split.OWN_SHARE == 1.2   # the command's part: it hands nothing back
    assert planning_split.stage_parts(64, 16_384, None) == [(0, 35), (35, 64)]
    assert planning_split.stage_parts(64, planning_split.SPLIT_FROM_RANKS - 1, None) == [(0, 64)]
    assert planning_split.stage_parts(64, 16_384, 1) == [(0, 64)]
    assert planning_split.stage_parts(3, 3, 2) == [(0, 2), (2, 3)]
    assert planning_split.stage_parts(4, 4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]   # a stage each, at least
    assert planning_split.stage_parts(2, 4, 5) == [(0, 1), (1, 2)]   # never more parts than stages
    monkeypatch.setattr(planning_split, "available_cpus", lambda: 64)
    parts = planning_split.stage_parts(100, 16_384, None)
    assert len(parts) == planning_split.MAX_PROCESSES
    assert parts[0][0] == 0 and parts[-1][1] == 100 and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert [b - a for a, b in parts] == [15, 12, 12, 12, 12, 13, 12, 12]
    with pytest.raises(CkptmapError, match="--planning-processes 0"):
        planning_split.stage_parts(4, 8, 0)
    assert planning_split.stage_parts(64, 16_384, None, limit=1) == [(0, 64)]
    assert len(planning_split.stage_parts(64, 16_384, None, limit=3)) == 3
    assert len(planning_split.stage_parts(64, 16_384, 5, limit=1)) == 5   # asked for: the limit is the default's


def test_the_command_splits_by_default_from_many_ranks_but_not_under_multiprocess_off(tmp_path, monkeypatch, forks):
    monkeypatch.setattr(planning_split, "available_cpus", lambda: 2)
    monkeypatch.setattr(planning_split, "SPLIT_FROM_RANKS", 4)   # the fixture's 4 ranks count as many
    argv = ["plan", "pt2ms", "--megatron-path", str(fixture_dir(PP2)), "--ms-path", str(tmp_path / "ms"), "--dry-run"]
    assert main(argv) == 0 and forks == ["pipeline stage 1"]
    assert main(argv + ["--process-limit", "1"]) == 0 and forks == ["pipeline stage 1"]
    assert main(["pt2ms"] + argv[2:-1] + ["--multiprocess-off", "--no-progress"]) == 0
    assert forks == ["pipeline stage 1"] and (tmp_path / "ms" / "rank_0" / "network.ckpt").is_file()


@pytest.mark.parametrize("name", [PP2, PP3])
def test_split_plan_is_the_single_process_plan(name, tmp_path, forks):
    """Same files, same order, same JSON (a multi-machine run's digest) as planning in one process."""
    whole = compile_pt2ms(Pt2MsOptions(str(fixture_dir(name)), str(tmp_path / "ms"), planning_processes=1))
    assert forks == []
    split = compile_pt2ms(Pt2MsOptions(str(fixture_dir(name)), str(tmp_path / "ms"), planning_processes=3))
    assert forks == (["pipeline stage 1"] if name == PP2 else ["pipeline stage 1", "pipeline stage 2"])
    assert split.to_json() == whole.to_json()
    assert whole.info["bucket_layout"] == "param_map"


def _refused_in_one_and_two_processes(capsys, argv: list, out_flag: str, out_of) -> dict:
    """{planning processes: the error printed} of ``argv`` planned in 1 and in 2 processes, each refused
    before writing anything (its output ``out_of(n)``, given with ``out_flag``, never made)."""
    errors = {}
    for n in (1, 2):
        out = out_of(n)
        assert main(argv + [out_flag, str(out), "--no-progress", "--planning-processes", str(n)]) != 0
        errors[n] = capsys.readouterr().err
        assert not out.exists()
    return errors


def test_a_bad_file_in_another_process_stages_is_refused_as_in_one_process(tmp_path, capsys, forks):
    src = tmp_path / "megatron"
    shutil.copytree(fixture_dir(PP2), src, ignore=shutil.ignore_patterns("truth"))
    damaged = src / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt"   # the last stage: a forked planner's
    damaged.write_bytes(damaged.read_bytes()[:-100])
    messages = _refused_in_one_and_two_processes(capsys, ["pt2ms", "--megatron-path", str(src)], "--ms-path",
                                                 lambda n: tmp_path / f"ms{n}")
    assert forks == ["pipeline stage 1"]
    assert str(damaged) in messages[2] and "truncated or corrupt" in messages[2]
    assert messages[1] == messages[2]


def test_a_rule_no_stage_matches_is_refused_and_one_only_later_stages_match_is_not(tmp_path, capsys, forks):
    """The output layer and final norm exist only in the last stage (another process's): their rules are
    used; a rule no stage's tensors match is named, whichever process planned what."""
    from ckptmap.rules import __file__ as rules_init

    rules = tmp_path / "with_unmatched.rules"
    bundled = os.path.join(os.path.dirname(rules_init), "megatron_legacy_gpt.rules")
    rules.write_text(open(bundled).read() + "\nparam language_model.no_such_module.weight\n"
                                            "   => language_model.no_such_module.weight\n   tp: replicated\n")
    argv = ["pt2ms", "--megatron-path", str(fixture_dir(PP2)), "--no-progress", "--planning-processes", "2"]
    assert main(argv + ["--ms-path", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    assert main(argv + ["--ms-path", str(tmp_path / "refused"), "--rules", str(rules)]) != 0
    err = capsys.readouterr().err
    assert forks == ["pipeline stage 1"] * 2
    assert "matched no tensor" in err and "language_model.no_such_module.weight" in err
    assert not (tmp_path / "refused").exists()


def test_bucket_layouts_must_fit_in_every_part(tmp_path):
    """The Megatron versions whose bucket layout fits every buffer: those that fit in this process's stages
    and in the others'; none -> refused, with what to do. (Coalesced buffers: several versions' layouts fit
    a small model's buffers alike.)"""
    from ckptmap.demo import DemoMoEModel, build_megatron_checkpoint

    src = tmp_path / "megatron"
    build_megatron_checkpoint(src, DemoMoEModel(tp=2, pp=2, dp=2, ep=2, experts=4, layers=4, hidden=16, heads=4,
                                                groups=2, kv=4, ffn=16, vocab=64, swiglu=True, norm_bias=False),
                              iteration=3, keep_truth=False)
    source = MegatronSource(SourceOptions(str(src), pp_part=(0, 1))).with_optimizer()
    fitting = [b.label for b in source.chosen["candidates"]]
    assert len(fitting) >= 3 and source.info()["bucket_layout"] == "derived"
    facts = PartFacts(frozenset(), frozenset({"torch"}), frozenset({"derived"}), tuple(fitting[1:]), ())
    source.absorb(facts, "pipeline stage 1")
    assert [b.label for b in source.chosen["candidates"]] == fitting[1:]
    assert source.chosen["block"].label == fitting[1]
    assert source.info()["megatron_layout"] == " / ".join(fitting[1:])
    other = PartFacts(frozenset(), frozenset(), frozenset(), (fitting[0],), ())
    with pytest.raises(CkptmapError, match="no Megatron version wrote them all.*--megatron-version"):
        source.absorb(other, "pipeline stage 1")


def test_directories_read_by_a_planning_process_reach_the_writers(tmp_path, forks):
    """The forked planner hands back the zip directories it read: the workers writing its stages' files
    find them remembered (not parsed again), as those of the command's own stages."""
    with torch_zip_reader.remembering(True):
        torch_zip_reader._DIRECTORIES.clear()
        compile_pt2ms(Pt2MsOptions(str(fixture_dir(PP2)), str(tmp_path / "ms"), planning_processes=2))
        known = set(torch_zip_reader.remembered_directories())
    assert forks == ["pipeline stage 1"]
    files = {str(p) for p in (fixture_dir(PP2) / "iter_0000001").rglob("*.pt")}
    assert len(files) == 8 and files <= known


def test_a_planning_process_that_fails_or_dies_is_reported():
    def refuses():
        raise CkptmapError("/x/mp_rank_00_001/model_optim_rng.pt is truncated")

    def has_a_bug():
        return {}["no such key"]

    def is_killed():
        os.kill(os.getpid(), signal.SIGKILL)

    with planning_split.Forked(lambda: {"stages": (1, 2)}, "pipeline stage 1") as ok:
        assert ok.result() == {"stages": (1, 2)}
    with planning_split.Forked(refuses, "pipeline stage 1") as child, \
            pytest.raises(CkptmapError, match=r"^/x/mp_rank_00_001/model_optim_rng.pt is truncated$"):
        child.result()
    with planning_split.Forked(has_a_bug, "pipeline stages 2-3") as child, \
            pytest.raises(CkptmapError, match=r"(?s)internal error in the process planning pipeline stages 2-3.*"
                                              r"KeyError: 'no such key'.*--planning-processes 1"):
        child.result()
    with planning_split.Forked(is_killed, "pipeline stage 1") as child, \
            pytest.raises(CkptmapError, match="planning pipeline stage 1 was killed by SIGKILL.*--planning-processes 1"):
        child.result()


def test_a_failure_in_the_command_stops_the_other_planners():
    with pytest.raises(CkptmapError, match="stage 0 refused"):
        with planning_split.Forked(lambda: time.sleep(60), "pipeline stage 1") as child:
            pid = child.pid
            raise CkptmapError("stage 0 refused")
    with pytest.raises(ChildProcessError):   # killed and reaped: no such child any more
        os.waitpid(pid, os.WNOHANG)


def test_ms2pt_iterations_are_compared_across_the_planning_processes(tmp_path, capsys, forks):
    """ms2pt planned by stage: a MindSpore file of the last stage at another iteration is refused with the same
    words as when one process reads every rank, though each process saw one iteration only."""
    import mindspore as ms

    ms_dir = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(fixture_dir(PP2)), "--ms-path", str(ms_dir), "--no-progress"]) == 0
    last = ms_dir / "rank_4" / "network.ckpt"   # tp 0, pp 1 (TP 2, DP 2): the second stage's first rank
    params = ms.load_checkpoint(str(last))
    assert int(params["step_num"].asnumpy()) == 1
    params["step_num"] = ms.Parameter(ms.Tensor(np.array(5, dtype=params["step_num"].asnumpy().dtype)), name="step_num")
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], str(last))
    capsys.readouterr()
    errors = _refused_in_one_and_two_processes(capsys, ["ms2pt", "--ms-path", str(ms_dir)], "--megatron-path",
                                               lambda n: tmp_path / f"back{n}")
    assert forks == ["pipeline stage 1"]
    assert "different iterations (['1', '5'])" in errors[2]
    assert errors[1] == errors[2]
