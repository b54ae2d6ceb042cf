"""`ckptmap` command line: plan, apply, pt2ms, ms2pt, combine, convert, verify, inspect, rules, demo.

``flags`` declares the arguments, ``printing`` prints plans and reports, ``combine`` adds the
combine command, ``convert`` the MSAdapter <-> torch dialect translation; this module dispatches and turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from pathlib import Path

from ckptmap.cli.flags import (add_ms2pt_flags, add_pt2ms_flags, add_reshard_flags, add_run_flags, ms2pt_options,
                               pt2ms_options, reshard_options)
from ckptmap.cli.printing import print_plan
from ckptmap.cli.run import EXIT_FAILED, print_target, run, show_or_run
from ckptmap import atomic
from ckptmap.errors import CkptmapError

EXIT_BAD_INPUT = 2


def _composed(ns):
    """pt2ms / ms2pt with --target-* sizes (a reshard) or ms2pt --ckpt-format torch_dist: the composed
    command (``compose``), else None."""
    kind = getattr(ns, "plan_command", None) or ns.command
    if kind in ("pt2ms", "ms2pt"):
        from ckptmap.cli import compose
        if kind == "ms2pt" and (ns.ckpt_format == "torch_dist" or ns.sharding_type is not None):
            return compose.ms2pt_torch_dist
        if compose.wants_reshard(ns):
            return getattr(compose, kind)
    return None


def _is_torch_dist(path) -> bool:
    from ckptmap.formats.megatron_folders import may_hold_torch_dist

    if not may_hold_torch_dist(path):
        return False
    from ckptmap.mapping.torch_dist_legacy import is_torch_dist_source
    return is_torch_dist_source(path)


def cmd_convert(ns) -> int:
    if ns.command == "pt2ms" and _is_torch_dist(ns.megatron_path):
        return _pt2ms_from_torch_dist(ns)
    composed = _composed(ns)
    if composed is not None:
        return composed(ns)
    return show_or_run(_compile(ns), ns)


def _pt2ms_from_torch_dist(ns) -> int:
    """pt2ms of a torch_dist checkpoint (``mapping/torch_dist_pt2ms.py``): the checkpoint's legacy Megatron
    files at its own layout (or the --target-* sizes) are written into a temporary folder beside --ms-path
    as intermediates -- object trees, with the tensors that are byte copies of torch_dist chunks left as
    holes --, pt2ms plans from them, and its plan reads those tensors from the chunks: every byte is read
    and written once. The folder is removed afterwards (also on failure and on Ctrl-C / SIGTERM)."""
    import shutil

    import attrs

    from ckptmap.mapping import torch_dist_pt2ms
    from ckptmap.mapping.compiler import compile_pt2ms
    from ckptmap.mapping.torch_dist_legacy import DistToLegacyOptions, compile_torch_dist_to_legacy

    out, source = Path(ns.ms_path), ns.megatron_path
    atomic.remove_stale_temps(out.parent, recursive=False)   # a SIGKILLed run's folder (see cli/compose.py)
    tmp = atomic.temp_name(out.parent / f"{out.name}-torch-dist-as-legacy")
    # --target-* sizes are the legacy step's (it writes any layout, EP for MoE); noop layers and stage lists are not
    unsupported = [f"--{d.replace('_', '-')}" for d in ("target_stage_list", "target_noop")
                   if getattr(ns, d, None) is not None]
    if unsupported:
        raise CkptmapError(f"{', '.join(unsupported)} cannot be used with a torch_dist source ({ns.megatron_path}); "
                           f"convert it with `ckptmap convert --from torch_dist --to torch` first, then `ckptmap "
                           f"reshard` / pt2ms the legacy files")
    if getattr(ns, "output", None):
        raise CkptmapError(f"plan pt2ms -o of a torch_dist source ({ns.megatron_path}): the plan reads object trees "
                           f"from a temporary folder that is gone once the command ends; run pt2ms directly, or save "
                           f"`ckptmap plan convert --from torch_dist --to torch … -o FILE` and pt2ms its result")
    legacy = compile_torch_dist_to_legacy(DistToLegacyOptions(
        ns.megatron_path, str(tmp), target_tp_size=getattr(ns, "target_tp_size", None),
        target_pp_size=getattr(ns, "target_pp_size", None), target_vpp_size=getattr(ns, "target_vpp_size", None),
        target_dp_size=getattr(ns, "target_dp_size", None), target_ep_size=getattr(ns, "target_ep_size", None),
        convert_param_only=ns.convert_param_only,
        target_megatron_version=getattr(ns, "target_megatron_version", None) or ns.megatron_version))
    print(f"{ns.megatron_path} is a torch_dist checkpoint: its legacy Megatron files' object trees are written into "
          f"{tmp} (tensors that are byte copies of torch_dist chunks left as holes; removed afterwards), pt2ms plans "
          f"from them and reads those tensors from the chunks")
    if getattr(ns, "plan_command", None):
        ns.dry_run = True
    try:
        tmp.mkdir(parents=True)
        inter = torch_dist_pt2ms.write_intermediates(legacy)
        ns.megatron_path = str(tmp)
        for d in ("tp", "pp", "vpp", "dp"):   # the legacy files are at the target sizes now
            if getattr(ns, f"target_{d}_size", None) is not None:
                setattr(ns, f"{d}_size", None)
        # planning would spot-check the holes' zeros: the direct plan is checked instead
        planned = compile_pt2ms(attrs.evolve(pt2ms_options(ns), defer_spot_check=True))
        return show_or_run(torch_dist_pt2ms.direct(planned, inter, str(legacy.info.get("source", source)),
                                                   main_param_check=ns.main_param_check), ns)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compile(ns):
    if (getattr(ns, "plan_command", None) or ns.command) == "reshard":
        from ckptmap.mapping.reshard import compile_reshard
        return compile_reshard(reshard_options(ns))
    if (getattr(ns, "plan_command", None) or ns.command) == "ms2pt":
        from ckptmap.mapping.ms2pt import compile_ms2pt
        return compile_ms2pt(ms2pt_options(ns))
    from ckptmap.mapping.compiler import compile_pt2ms
    return compile_pt2ms(pt2ms_options(ns))


def cmd_plan(ns) -> int:
    if ns.plan_command == "pt2ms" and _is_torch_dist(ns.megatron_path):
        return _pt2ms_from_torch_dist(ns)
    composed = _composed(ns)
    if composed is not None:
        return composed(ns)
    plan = _compile(ns)
    from ckptmap.cli.run import keep_out_of_collections

    keep_out_of_collections()
    if ns.output:
        out = Path(ns.output)
        with atomic.atomic_output(out) as tmp, open(tmp, "w") as f:
            plan.write_json(f)   # streamed, record by record: a 4,096-rank plan never sits in memory as text
        print(f"plan written to {out} ({len(plan.files)} files); run it with `ckptmap apply {out}`")
    if ns.dry_run or not ns.output:
        print_plan(plan, detail=getattr(ns, "full", False), summary=True)
        print_target(plan)
    return 0


def cmd_apply(ns) -> int:
    from ckptmap.mapping.plan import Plan

    path = Path(ns.plan)
    try:
        text = path.read_text()
    except OSError as e:
        raise CkptmapError(f"cannot read plan {path}: {e.strerror}") from None
    plan = Plan.from_json(text, str(path))
    print_plan(plan, detail=False)
    return run(plan, ns)


def cmd_verify(ns) -> int:
    from ckptmap import verify

    if ns.md5:
        same, lines = verify.md5_report(ns.paths)
        print("\n".join(lines))
        return 0 if same else EXIT_FAILED
    if len(ns.paths) != 2:
        raise CkptmapError(f"verify compares two paths (files or checkpoint directories), got {len(ns.paths)}; "
                           f"use --md5 to compare the md5 sums of several files")
    reports = verify.verify(ns.paths[0], ns.paths[1], rules=ns.rules)
    ok, lines = verify.report_lines(reports)
    print("\n".join(lines))
    return 0 if ok else EXIT_FAILED


def cmd_inspect(ns) -> int:
    from ckptmap.inspect import inspect_path

    inspect_path(ns.path, sys.stdout)
    return 0


def cmd_rules(ns) -> int:
    from ckptmap.mapping.rules import bundled_rules, load_rules

    if ns.rules_command == "list":
        for name, path in bundled_rules().items():
            rules = load_rules(path)
            print(f"{name:24s} {len(rules.params):3d} param rules  {rules.description}")
        return 0
    rules = load_rules(ns.file)
    print(f"{ns.file}: ok — rules {rules.name}, {len(rules.params)} param rules, "
          f"{len(rules.states)} optimizer states, bucket layouts: "
          f"{', '.join(b.label for b in rules.buckets) or 'none'}"
          + "".join(f"; torch_dist {t.name}: sharding types {', '.join(t.sharding_types)}, {len(t.stacked)} stacked keys"
                    for t in rules.torch_dist))
    return 0


def cmd_demo(ns) -> int:
    from ckptmap.demo import run_demo

    return run_demo(Path(ns.workdir) if ns.workdir else None)


def _memoize_argparse_gettext() -> None:
    """argparse translates its own strings with gettext, which normalises the locale and looks for
    catalogues on every call (54 calls for our 18 parsers, a tenth of the start-up); the answers do
    not change within a process."""
    if not hasattr(argparse._, "cache_info"):
        argparse._ = functools.lru_cache(maxsize=None)(argparse._)


def build_parser() -> argparse.ArgumentParser:
    _memoize_argparse_gettext()
    parser = argparse.ArgumentParser(
        prog="ckptmap",
        description="Move training checkpoints between Megatron-LM and MindSpeed-Core-MS, streaming and bit-exact.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pt2ms", help="Megatron checkpoint -> MindSpore checkpoint (flags of convert_pt2ckpt.py).",
                       description="Megatron checkpoint -> MindSpore checkpoint.")
    add_pt2ms_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("plan", help="Compile a conversion plan; --dry-run prints it, -o saves it for `apply`.")
    plan_sub = p.add_subparsers(dest="plan_command", required=True, metavar="CONVERSION")
    pp = plan_sub.add_parser("pt2ms", help="Plan a pt2ms conversion.")
    add_pt2ms_flags(pp)
    pp.add_argument("-o", "--output", help="Write the plan as JSON to this file.")
    pp.set_defaults(func=cmd_plan)
    pm = plan_sub.add_parser("ms2pt", help="Plan an ms2pt conversion.")
    add_ms2pt_flags(pm)
    pm.add_argument("-o", "--output", help="Write the plan as JSON to this file.")
    pm.set_defaults(func=cmd_plan)

    from ckptmap.cli.convert import register as register_convert
    register_convert(sub, plan_sub)

    p = sub.add_parser("ms2pt", help="MindSpore checkpoint -> Megatron checkpoint (flags of convert_ckpt2pt.py).",
                       description="MindSpore checkpoint -> Megatron checkpoint.")
    add_ms2pt_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("reshard", help="Megatron checkpoint -> the same at another TP/PP/VPP/DP/EP layout, optimizer "
                                       "state included.",
                       description="Reshard a Megatron legacy checkpoint: weights and the distributed optimizer's state "
                                   "at a new tensor/pipeline/data/expert-parallel layout.")
    add_reshard_flags(p)
    p.set_defaults(func=cmd_convert)
    pr = plan_sub.add_parser("reshard", help="Plan a reshard.")
    add_reshard_flags(pr)
    pr.add_argument("-o", "--output", help="Write the plan as JSON to this file.")
    pr.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="Run a plan written by `ckptmap plan … -o FILE`.")
    p.add_argument("plan")
    p.add_argument("--debug", action="store_true")
    add_run_flags(p)
    p.set_defaults(func=cmd_apply)

    from ckptmap.cli.combine import register as register_combine
    register_combine(sub)

    p = sub.add_parser("verify", help="Compare two checkpoints value by value (files or directories, "
                                      "Megatron vs MindSpore too); --md5 prints whole-file md5 sums.")
    p.add_argument("paths", nargs="+", help="Two files or directories (or, with --md5, any number of files).")
    p.add_argument("--md5", action="store_true", help="Compare whole-file md5 sums (the conversion guide's check).")
    p.add_argument("--rules", default="auto", help="Rules pairing Megatron and MindSpore names (default: auto).")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="List keys, shapes and dtypes of a checkpoint file or directory.")
    p.add_argument("path")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("rules", help="List bundled rules or check a .rules file.")
    rsub = p.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    rsub.add_parser("list", help="List the bundled rules.")
    rc = rsub.add_parser("check", help="Validate a .rules file.")
    rc.add_argument("file")
    p.set_defaults(func=cmd_rules, debug=False)

    p = sub.add_parser("demo", help="Build a small Megatron checkpoint, convert it, and show the result.")
    p.add_argument("--workdir", help="Where to put the demo files (default: a temporary directory).")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    from ckptmap import signals

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        from ckptmap.formats import torch_zip_reader

        planning_only = ns.command == "plan" or getattr(ns, "dry_run", False)
        # SIGTERM (a scheduler) is handled like Ctrl-C; source directories are kept for the workers to reuse
        with signals.interruptible(), torch_zip_reader.remembering(not planning_only):
            return ns.func(ns)
    except signals.Interrupted as e:
        what = "interrupted" if e.signum == signal.SIGINT else "terminated"
        print(f"ckptmap: {what} ({e.name}); finished files are complete, unfinished ones were removed "
              f"(exit code {e.exit_code})", file=sys.stderr)
        return e.exit_code
    except CkptmapError as e:
        if getattr(ns, "debug", False):
            import traceback
            traceback.print_exc()
        print(f"ckptmap {ns.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("ckptmap: interrupted; finished files are complete, unfinished ones were removed", file=sys.stderr)
        return 130
