"""``pt2ms`` / ``ms2pt`` with ``--target-*`` sizes: a reshard composed with the conversion.

* ``pt2ms --target-…``: reshard the Megatron checkpoint into a temporary folder beside the output
  (in the output's parent), then pt2ms of that folder into the output.
* ``ms2pt --target-…``: ms2pt into a temporary folder beside the output, then reshard that folder
  into the output.
* ``ms2pt --ckpt-format torch_dist``: ms2pt (with its reshard, if ``--target-…``) into a temporary folder
  beside the output, then ``convert --from torch --to torch_dist`` of that folder into the output.
* ``convert --from torch --to torch_dist --sharding-type dp_reshardable`` (megatron-core 0.15+'s default):
  ``fully_sharded_model_space`` into a temporary folder, then the offline upgrade of that folder
  (``formats/megatron_dist.py``) into the output.

Why two steps and not one plan: pt2ms keeps the Megatron files' skeletons in ``pt_meta`` and both
pt2ms and reshard plan from what the files say (metadata, bucket layouts); planning the second step
from the first step's plan instead of its files would be a second planner for each. The price is
one extra write + read of the resharded checkpoint's bytes (said in ``--dry-run``).

The temporary folder is named like every ckptmap temporary (``.<output>.ckptmap-tmp-<host>-<pid>-<n>``)
and removed whatever happens — success, refusal, a failed file, Ctrl-C, SIGTERM. Only SIGKILL can
leave it; the next composed run into the same parent folder removes it (``atomic.remove_stale_temps``,
which touches only temporaries of dead ckptmap processes of this host).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import attrs

from ckptmap import atomic
from ckptmap.errors import CkptmapError

TARGET_DESTS = ("target_tp_size", "target_pp_size", "target_vpp_size", "target_dp_size", "target_ep_size",
                "target_stage_list", "target_noop", "target_megatron_version")
COST = ("one extra write + read of the resharded checkpoint ({size}) compared with a conversion at the source's "
        "layout: the reshard is written to a temporary folder ({tmp}) and read back, which is removed at the end "
        "(also on failure and on Ctrl-C / SIGTERM)")


def wants_reshard(ns) -> bool:
    """Whether any --target-* flag was given (each defaults to the source's)."""
    return any(getattr(ns, d, None) is not None for d in TARGET_DESTS)


def _targets(ns) -> dict:
    from ckptmap.mapping.layout import parse_stage_list

    return dict(target_tp_size=ns.target_tp_size, target_pp_size=ns.target_pp_size,
                target_vpp_size=ns.target_vpp_size, target_dp_size=ns.target_dp_size,
                target_ep_size=ns.target_ep_size,
                target_stage_list=parse_stage_list(ns.target_stage_list) if ns.target_stage_list else None,
                target_noop=None if ns.target_noop is None else tuple(ns.target_noop),
                target_megatron_version=ns.target_megatron_version, vocab_size=ns.vocab_size)


def _refuse_composed_plan_file(ns, kind: str) -> None:
    if getattr(ns, "output", None):
        raise CkptmapError(f"plan {kind} -o: a plan file holds one conversion, and --target-* makes this two (a reshard "
                           f"and a {kind}); save the reshard's plan with `ckptmap plan reshard … -o FILE`, or drop -o "
                           f"to see both steps")
    if getattr(ns, "world_size", 1) > 1:
        raise CkptmapError(f"{kind} --target-* with --world-size {ns.world_size}: the composed conversion goes through "
                           f"a temporary folder of this machine; run `ckptmap reshard` and then `ckptmap {kind}` as two "
                           f"commands across machines")


def _check_final(final: Path, overwrite: bool) -> None:
    """Refuse an output that the last step would refuse, before the first step spends its time."""
    from ckptmap import target
    from ckptmap.mapping.plan import Plan

    t = target.inspect(Plan("check", str(final), (), {}))
    if t.impossible or (not t.empty and not overwrite):
        raise CkptmapError(target.refusal(t) if not t.impossible else f"{final}: refused even with --overwrite")


def _temp_folder(final: Path) -> Path:
    parent = final.resolve().parent
    atomic.remove_stale_temps(parent, recursive=False)   # a SIGKILLed composed run's folder (none if no parent)
    return atomic.temp_name(parent / final.name)


def _header(step1: str, step2: str, plan, tmp: Path) -> list[str]:
    from ckptmap.cli.printing import human_bytes

    return [f"composed conversion: step 1 {step1}, step 2 {step2}",
            "  cost: " + COST.format(size=human_bytes(plan.nbytes), tmp=tmp)]


def _print_composition(lines, plan1, second: str, final: Path) -> None:
    from ckptmap import target
    from ckptmap.cli.printing import print_plan
    from ckptmap.mapping.plan import Plan

    for line in lines:
        print(line)
    print()
    print_plan(plan1)
    print(f"\nstep 2: {second} — planned once step 1 is written (it plans from the files' metadata)")
    for line in target.describe(target.inspect(Plan("check", str(final), (), {}))):
        print(line)


def pt2ms(ns) -> int:
    """pt2ms with --target-*: reshard into a temporary folder, then pt2ms of it."""
    from ckptmap.cli.flags import pt2ms_options
    from ckptmap.mapping.compiler import compile_pt2ms
    from ckptmap.mapping.reshard import ReshardOptions, compile_reshard

    _refuse_composed_plan_file(ns, "pt2ms")
    final = Path(ns.ms_path)
    tmp = _temp_folder(final)
    rplan = compile_reshard(ReshardOptions(
        megatron_path=ns.megatron_path, output_path=str(tmp), param_map_path=ns.param_map_path, rules=ns.rules,
        megatron_version=ns.megatron_version, main_param_check=ns.main_param_check, noop=tuple(ns.noop),
        parallel_init_order=ns.parallel_init_order, convert_param_only=ns.convert_param_only, intermediate=True,
        **_targets(ns)))
    if rplan.info.get("layout_change") == "none" and ns.target_megatron_version is None:
        print("the --target-* sizes are the source's: plain pt2ms, no reshard")
        from ckptmap.cli.run import show_or_run
        return show_or_run(compile_pt2ms(pt2ms_options(ns)), ns)
    second = f"pt2ms {tmp} -> {final}"
    lines = _header(f"reshard {rplan.info.get('source')} -> {tmp} ({rplan.info.get('layout_change')})", second, rplan,
                    tmp)
    if ns.dry_run or getattr(ns, "plan_command", None):
        _print_composition(lines, rplan, second, final)
        return 0
    _check_final(final, ns.overwrite)

    def then_pt2ms():
        return compile_pt2ms(attrs.evolve(
            pt2ms_options(ns), megatron_path=str(tmp), param_map_path=None, tp_size=None, pp_size=None, ep_size=None,
            vpp_size=None, stage_list=_targets(ns)["target_stage_list"],
            num_layers=None if ns.target_noop is not None else ns.num_layers, noop=tuple(rplan.info["target_noop"]),
            dp_size=ns.target_dp_size or ns.dp_size,
            megatron_version=ns.target_megatron_version or ns.megatron_version))

    return _run_two_steps(ns, tmp, lines, rplan, then_pt2ms)


def _run_two_steps(ns, tmp: Path, lines, first, compile_second) -> int:
    """Run ``first`` into the temporary folder ``tmp``, then the plan ``compile_second()`` makes of what
    it wrote; ``tmp`` is removed whatever happens (errors and signals included)."""
    from ckptmap.cli.printing import print_plan
    from ckptmap.cli.run import run

    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        for line in lines:
            print(line)
        print_plan(first, detail=ns.debug)
        rc = run(first, ns)
        if rc:
            return rc
        second = compile_second()
        print()
        print_plan(second, detail=ns.debug)
        return run(second, ns)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ms2pt(ns) -> int:
    """ms2pt with --target-*: ms2pt into a temporary folder, then reshard it."""
    from ckptmap.cli.flags import ms2pt_options
    from ckptmap.mapping.ms2pt import compile_ms2pt
    from ckptmap.mapping.reshard import ReshardOptions, compile_reshard

    _refuse_composed_plan_file(ns, "ms2pt")
    final = Path(ns.megatron_path)
    tmp = _temp_folder(final)
    plan1 = compile_ms2pt(attrs.evolve(ms2pt_options(ns), megatron_path=str(tmp)))
    if "msadapter" in str(plan1.info.get("dialect", "")):
        raise CkptmapError(f"{ns.ms_path}: ms2pt would write MSAdapter-dialect files, which reshard does not read; add "
                           f"--dialect torch (stock PyTorch files; see --drop-rng), and convert the result back with "
                           f"`ckptmap convert --to msadapter` if needed")
    second = f"reshard {tmp} -> {final}"
    lines = _header(f"ms2pt {ns.ms_path} -> {tmp}", second, plan1, tmp)
    if ns.dry_run or getattr(ns, "plan_command", None):
        _print_composition(lines, plan1, second, final)
        return 0
    _check_final(final, ns.overwrite)

    def then_reshard():
        return compile_reshard(ReshardOptions(
            megatron_path=str(tmp), output_path=str(final), rules=ns.rules, noop=tuple(ns.noop),
            parallel_init_order=ns.parallel_init_order, convert_param_only=ns.convert_param_only, **_targets(ns)))

    return _run_two_steps(ns, tmp, lines, plan1, then_reshard)


def _legacy_step(ns, legacy_ns):
    from ckptmap.cli.flags import ms2pt_options
    from ckptmap.mapping.ms2pt import compile_ms2pt

    plan = compile_ms2pt(ms2pt_options(legacy_ns))
    if "msadapter" in str(plan.info.get("dialect", "")):
        raise CkptmapError(f"{ns.ms_path}: ms2pt would write MSAdapter-dialect files, and torch_dist is written from "
                           f"stock PyTorch ones; add --dialect torch (see --drop-rng)")
    return plan


def ms2pt_torch_dist(ns) -> int:
    """ms2pt --ckpt-format torch_dist: legacy files (resharded if --target-*) into a temporary folder, then
    torch -> torch_dist of them (``mapping/legacy_torch_dist.py``) into --megatron-path."""
    import argparse

    from ckptmap.cli.printing import print_plan
    from ckptmap.cli.run import run
    from ckptmap.mapping import legacy_torch_dist as ltd

    if ns.ckpt_format != "torch_dist":
        raise CkptmapError(f"--sharding-type {ns.sharding_type} applies to --ckpt-format torch_dist; add it, or drop "
                           f"--sharding-type for legacy files")
    sharding = ns.sharding_type or "fully_reshardable"
    if sharding not in ltd.TARGET_TYPES + ("dp_reshardable",):
        raise CkptmapError(f"--sharding-type {sharding}: ms2pt writes torch_dist as fully_reshardable, dp_reshardable "
                           f"(megatron-core 0.15+), fully_sharded_model_space (0.8 - 0.14) or dp_zero_gather_scatter")
    target_version = getattr(ns, "target_megatron_version", None)
    if sharding == "dp_zero_gather_scatter" and target_version is None:   # refused before step 1, not after
        raise CkptmapError("--sharding-type dp_zero_gather_scatter: megatron-core 0.8 - 0.14 and 0.15+ save it "
                           "differently; say which will load it with --target-megatron-version (e.g. 0.12.1 or 0.16.1)")
    if getattr(ns, "output", None):
        raise CkptmapError("plan ms2pt -o with --ckpt-format torch_dist: a plan file holds one conversion, and this is "
                           "two (ms2pt to legacy files, then torch -> torch_dist); drop -o to see the steps")
    if getattr(ns, "world_size", 1) > 1:
        raise CkptmapError(f"ms2pt --ckpt-format torch_dist with --world-size {ns.world_size}: the conversion goes "
                           f"through a temporary folder of this machine; run ms2pt (legacy files) across machines, "
                           f"then `ckptmap convert --from torch --to torch_dist` on one")
    final = Path(ns.megatron_path)
    if final.exists() and not ns.dry_run and not getattr(ns, "plan_command", None):
        raise CkptmapError(f"--megatron-path {final} already exists; a torch_dist checkpoint is never written into an "
                           f"existing folder (also not with --overwrite): remove it or choose another path")
    tmp = _temp_folder(final)
    legacy_ns = argparse.Namespace(**{**vars(ns), "megatron_path": str(tmp), "overwrite": False})
    second = f"convert --from torch --to torch_dist {tmp} -> {final} ({sharding})"
    if ns.dry_run or getattr(ns, "plan_command", None):
        print(f"composed conversion: step 1 ms2pt {ns.ms_path} -> {tmp} (legacy files), step 2 {second}")
        print("  cost: one extra write + read of the checkpoint's bytes (the legacy files in the temporary folder, "
              "removed at the end, also on failure and on Ctrl-C / SIGTERM)\n")
        if wants_reshard(ns):
            legacy_ns.dry_run = True
            ms2pt(legacy_ns)
        else:
            print_plan(_legacy_step(ns, legacy_ns), detail=getattr(ns, "full", False), summary=True)
            print(f"\nstep 2: {second} — planned once step 1 is written (it plans from the legacy files)")
        return 0
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        if wants_reshard(ns):
            rc = ms2pt(legacy_ns)
        else:
            plan1 = _legacy_step(ns, legacy_ns)
            print(f"composed conversion: step 1 ms2pt {ns.ms_path} -> {tmp}, step 2 {second}")
            print_plan(plan1, detail=ns.debug)
            rc = run(plan1, legacy_ns)
        if rc:
            return rc
        print()
        return legacy_to_torch_dist(ns, tmp, final, sharding, ns.rules, target_version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def legacy_to_torch_dist(ns, src, final: Path, sharding: str, rules: str, target_version: str | None = None) -> int:
    """torch -> torch_dist: the model-space types directly (``mapping/legacy_torch_dist.py``); dp_reshardable
    as fully_sharded_model_space into a temporary folder, then the offline upgrade of it into ``final``."""
    import sys

    from ckptmap.cli.convert import run_torch_dist_plan
    from ckptmap.formats import megatron_dist as M
    from ckptmap.mapping import legacy_torch_dist as ltd

    dry = getattr(ns, "dry_run", False) or getattr(ns, "plan_command", None)
    if sharding != "dp_reshardable":
        plan = ltd.plan_legacy_to_dist(src, final, sharding, rules, target_version=target_version)
        ltd.print_plan(plan, sys.stdout)
        if not dry:
            print(f"\ntorch_dist checkpoint written in {ltd.run(plan, fsync=ns.fsync, no_progress=ns.no_progress):.2f} s")
        return 0
    if final.exists():
        raise CkptmapError(f"--dst {final} already exists; ckptmap never writes into an existing checkpoint folder")
    tmp = _temp_folder(final)
    try:
        plan = ltd.plan_legacy_to_dist(src, tmp, "fully_sharded_model_space", rules, rank_objects_as="dp_reshardable")
        print(f"composed conversion: step 1 torch -> torch_dist (fully_sharded_model_space) {src} -> {tmp}, step 2 "
              f"the offline upgrade to dp_reshardable {tmp} -> {final}")
        print("  cost: one extra write + read of the checkpoint's bytes (the temporary folder, removed at the end, "
              "also on failure and on Ctrl-C / SIGTERM)")
        ltd.print_plan(plan, sys.stdout)
        if dry:
            print(f"\nstep 2: convert --from torch_dist --to torch_dist --sharding-type dp_reshardable {tmp} -> {final} "
                  f"— planned once step 1 is written")
            return 0
        print(f"  written in {ltd.run(plan, fsync=ns.fsync, no_progress=ns.no_progress):.2f} s\n")
        return run_torch_dist_plan(ns, M.plan_folder(tmp, final, "dp_reshardable"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
