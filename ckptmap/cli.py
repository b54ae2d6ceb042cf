"""`ckptmap` command line: plan, apply, pt2ms, inspect, rules, demo."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from ckptmap.errors import CkptmapError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -------------------------------------------------------------------------------------------------
# pt2ms flags: every flag of MindSpeed-Core-MS convert_pt2ckpt.py, same meaning, plus ckptmap's own.


def _add_pt2ms_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("File Path/Location")
    g.add_argument("--megatron-path", required=True,
                   help="Megatron checkpoint: the --save directory (uses latest_checkpointed_iteration.txt) "
                        "or an iter_* directory.")
    g.add_argument("--ms-path", required=True, help="Directory for the MindSpore checkpoint.")
    g.add_argument("--param-map-path", help="Directory with param_map_*.json files (default: "
                                            "<save>/param_map when present).")
    d = p.add_argument_group("distributed")
    d.add_argument("--pp-size", type=int, help="Pipeline parallel size (default: from the mp_rank directories).")
    d.add_argument("--tp-size", type=int, help="Tensor parallel size (default: from the mp_rank directories).")
    d.add_argument("--dp-size", type=int, help="Data parallel size of the MindSpore run (default: from args).")
    d.add_argument("--cp-size", type=int, help="Context parallel size (default: from args, else 1).")
    d.add_argument("--parallel-init-order", default="tp-cp-ep-dp-pp",
                   help="Rank order, fastest first (default tp-cp-ep-dp-pp).")
    d.add_argument("--vpp-size", type=int, help="Virtual pipeline chunks per stage (default: from the checkpoint).")
    d.add_argument("--stage-list", nargs="+", help="Layers per pipeline stage (with VPP: per virtual stage, "
                                                   "PP*VPP values in execution order).")
    d.add_argument("--num-layers", type=int, help="Number of layers on the MindSpeed side, noop layers "
                                                  "included (default: args.num_layers + number of --noop).")
    d.add_argument("--noop", nargs="+", type=int, default=[],
                   help="MindSpeed global layer ids that are identity (noop) layers.")
    a = p.add_argument_group("Advanced feature")
    a.add_argument("--generate-all-dp-cp", action="store_true",
                   help="Write a copy for every (dp, cp) rank, not only dp = cp = 0.")
    a.add_argument("--convert-param-only", action="store_true",
                   help="Convert model weights only (no optimizer state).")
    a.add_argument("--file-prefix", default="network", help="File name prefix in V1 layout (default network).")
    a.add_argument("--format", choices=("ckpt", "safetensors"), default="ckpt")
    a.add_argument("--dist-opt-content", nargs="+", default=["param", "exp_avg", "exp_avg_sq"],
                   help="Optimizer states to write (optimizer mode).")
    a.add_argument("--debug", action="store_true", help="Show tracebacks and per-tensor detail.")
    _add_run_flags(a)
    c = p.add_argument_group("ckptmap")
    c.add_argument("--rules", default="auto",
                   help="Bundled rules name or a .rules path (default: the bundled rules that fit the model).")
    c.add_argument("--layout", choices=("v1", "v2"), default="v1",
                   help="v1: rank_{g}/{prefix}.{fmt} (default); v2: iter_*/mp_rank_*/model_optim_rng.{fmt}.")
    c.add_argument("--dtype", default="float32",
                   help="Output dtype of floating-point weights: float32 (default, like the reference), "
                        "keep (the source dtype), bfloat16, float16.")
    c.add_argument("--crc", action="store_true",
                   help="Append MindSpore's CRC-32 trailer to .ckpt files (checked by load_checkpoint(crc_check=True)).")
    c.add_argument("--dry-run", action="store_true", help="Print the plan and write nothing.")


def _add_run_flags(g) -> None:
    g.add_argument("--multiprocess-off", action="store_true", help="Run in this process only.")
    g.add_argument("--process-limit", type=int, default=min(8, os.cpu_count() or 1),
                   help="Maximum worker processes (default min(8, CPUs)).")
    g.add_argument("--process_timeout", "--process-timeout", dest="process_timeout", type=float, default=None,
                   help="Seconds allowed per output file; a file that takes longer fails.")
    g.add_argument("--no-progress", action="store_true", help="No progress bar.")
    g.add_argument("--fsync", action="store_true",
                   help="fsync every file before renaming it into place (durable against power loss; slower).")
    g.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="Machines sharing the work (default $WORLD_SIZE, as set by torchrun, else 1); each "
                        "writes a disjoint part of the plan into the same (shared) output folder.")
    g.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)),
                   help="This machine's rank among --world-size (default $RANK, else 0); rank 0 writes "
                        "ckptmap_manifest.json when every rank has finished.")


def _add_ms2pt_flags(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("distributed")
    d.add_argument("--num-layers", type=int, help="Layers on the MindSpeed side, noop layers included "
                                                  "(default: from pt_meta args + number of --noop).")
    d.add_argument("--dp-size", type=int, help="Data parallel size of the MindSpore checkpoint (rank numbering; "
                                               "default: from pt_meta args).")
    d.add_argument("--cp-size", type=int, help="Context parallel size (default: from pt_meta args).")
    d.add_argument("--tp-size", type=int, help="Tensor parallel size (checked against pt_meta).")
    d.add_argument("--pp-size", type=int, help="Pipeline parallel size (checked against pt_meta).")
    d.add_argument("--vpp-size", type=int, help="Virtual pipeline chunks per stage (checked against pt_meta).")
    d.add_argument("--src-model-format", choices=("ckpt", "safetensors"),
                   help="Format of the MindSpore files (default: whichever is present).")
    d.add_argument("--noop", nargs="+", type=int, default=[],
                   help="MindSpeed global layer ids that are identity (noop) layers; Megatron gets the rest.")
    d.add_argument("--stage-list", nargs="+", help="Layers per pipeline stage on the MindSpeed side.")
    d.add_argument("--parallel-init-order", default="tp-cp-ep-dp-pp")
    f = p.add_argument_group("File Path/Location")
    f.add_argument("--ms-path", required=True, help="MindSpore checkpoint folder (rank_*/ or iter_*/ inside).")
    f.add_argument("--param-map-path", help="The pt_meta folder written by pt2ms (default: <ms-path>/pt_meta).")
    f.add_argument("--megatron-path", required=True, help="Where to write the Megatron checkpoint.")
    f.add_argument("--convert-param-only", action="store_true",
                   help="Write model_optim_rng.pt only (weights in the training dtype), no distrib_optim.pt.")
    f.add_argument("--debug", action="store_true")
    _add_run_flags(f)
    c = p.add_argument_group("ckptmap")
    c.add_argument("--rules", default="auto", help="Bundled rules name or a .rules path (default: auto).")
    c.add_argument("--layout", choices=("auto", "v1", "v2"), default="auto",
                   help="Layout of the MindSpore checkpoint (default: detect).")
    c.add_argument("--file-prefix", default="network", help="File name prefix in V1 layout (default network).")
    c.add_argument("--dry-run", action="store_true", help="Print the plan and write nothing.")


def _ms2pt_options(ns):
    from ckptmap.mapping.layout import parse_stage_list
    from ckptmap.mapping.ms2pt import Ms2PtOptions

    return Ms2PtOptions(
        ms_path=ns.ms_path, megatron_path=ns.megatron_path, param_map_path=ns.param_map_path,
        num_layers=ns.num_layers, dp_size=ns.dp_size, cp_size=ns.cp_size, tp_size=ns.tp_size, pp_size=ns.pp_size,
        vpp_size=ns.vpp_size, src_model_format=ns.src_model_format, noop=tuple(ns.noop),
        stage_list=parse_stage_list(ns.stage_list) if ns.stage_list else None,
        parallel_init_order=ns.parallel_init_order, convert_param_only=ns.convert_param_only, rules=ns.rules,
        layout=ns.layout, file_prefix=ns.file_prefix)


def _pt2ms_options(ns):
    from ckptmap.mapping.compiler import Pt2MsOptions
    from ckptmap.mapping.layout import parse_stage_list

    return Pt2MsOptions(
        megatron_path=ns.megatron_path, ms_path=ns.ms_path, param_map_path=ns.param_map_path,
        tp_size=ns.tp_size, pp_size=ns.pp_size, dp_size=ns.dp_size, cp_size=ns.cp_size,
        parallel_init_order=ns.parallel_init_order, vpp_size=ns.vpp_size,
        stage_list=parse_stage_list(ns.stage_list) if ns.stage_list else None,
        num_layers=ns.num_layers, noop=tuple(ns.noop), generate_all_dp_cp=ns.generate_all_dp_cp,
        convert_param_only=ns.convert_param_only, file_prefix=ns.file_prefix, format=ns.format,
        dist_opt_content=tuple(ns.dist_opt_content), rules=ns.rules, layout=ns.layout, dtype=ns.dtype,
        crc=ns.crc)


# -------------------------------------------------------------------------------------------------
# Printing


def _tensor_row(t, common, prefix=""):
    src_file = os.path.relpath(t.sources[0].file, common) if t.sources else "-"
    return (prefix + t.name, t.note or t.source_label, src_file, "x".join(map(str, t.shape)) or "scalar", t.dtype,
            ", ".join(map(str, t.ops)) or "-", str(t.nbytes))


def _print_rows(rows, out) -> None:
    rows = [("tensor", "from", "file", "shape", "dtype", "ops", "bytes")] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def print_plan(plan, out=None, detail: bool = True) -> None:
    out = out or sys.stdout
    info = plan.info
    files = [t.sources[0].file for f in plan.files for t in f.tensors if t.sources]
    files += [p.tensor.sources[0].file for f in plan.files for s in f.storages for p in s.pieces if p.tensor]
    common = os.path.commonpath(files or [plan.output_root])
    print(f"plan {plan.kind}: {info.get('source', '')} -> {plan.output_root}", file=out)
    print("  " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("source", "rules_path")), file=out)
    n_tensors = 0
    for f in plan.files:
        if f.format in ("ckpt", "safetensors"):
            print(f"\n{f.path}  ({f.format}, {len(f.tensors)} tensors, {_human(f.nbytes)})", file=out)
            n_tensors += len(f.tensors)
            if detail:
                _print_rows([_tensor_row(t, common) for t in f.tensors], out)
        elif f.format == "torch_stream":
            pieces = [p for s in f.storages for p in s.pieces]
            n_tensors += sum(1 for p in pieces if p.tensor)
            print(f"\n{f.path}  (torch file: {len(f.storages)} storages, {sum(1 for p in pieces if p.tensor)} "
                  f"tensors, {_human(f.nbytes)})", file=out)
            if detail:
                rows = []
                for s in f.storages:
                    for p in s.pieces:
                        if p.tensor:
                            rows.append(_tensor_row(p.tensor, common, f"[{s.key}@{p.offset}] "))
                        else:
                            rows.append((f"[{s.key}@{p.offset}] padding", p.padding.key,
                                         os.path.relpath(p.padding.file, common), "-", "bytes", "-",
                                         str(p.padding.shape[0])))
                _print_rows(rows, out)
        elif f.format == "copy":
            print(f"\n{f.path}  (copy of {f.source})", file=out)
        elif f.format == "torch_meta":
            print(f"\n{f.path}  (entries {', '.join(f.keys)} of {os.path.relpath(f.source, common)}"
                  f" + {', '.join(f.extra)} + layout skeletons)", file=out)
        else:
            print(f"\n{f.path}  ({f.format})", file=out)
    print(f"\ntotal: {len(plan.files)} files, {n_tensors} tensors, {_human(plan.nbytes)} of tensor data "
          f"(source root {common})", file=out)


def print_report(report, out=None) -> None:
    out = out or sys.stdout
    width = max((len(r.path) for r in report.results), default=4)
    for r in report.results:
        status = "ok" if r.ok else "FAILED"
        print(f"  {r.path.ljust(width)}  {_human(r.nbytes):>10}  {r.seconds:7.2f} s  {status}", file=out)
    for r in report.failed:
        print(f"\nFAILED {r.path}:\n" + textwrap.indent(r.error, "  "), file=out)
    rate = report.nbytes / report.seconds / 2**20 if report.seconds else 0
    print(f"\n{len(report.results) - len(report.failed)} of {len(report.results)} files written "
          f"successfully, {_human(report.nbytes)} in {report.seconds:.2f} s ({rate:.0f} MiB/s)", file=out)


def _run(plan, ns) -> int:
    from ckptmap.execute import run_plan

    report = run_plan(plan, processes=ns.process_limit, multiprocess=not ns.multiprocess_off,
                      timeout=ns.process_timeout, progress=not ns.no_progress, fsync=ns.fsync,
                      world_size=ns.world_size, rank=ns.rank)
    print_report(report)
    return EXIT_FAILED if report.failed else 0


# -------------------------------------------------------------------------------------------------
# Commands


def show_or_run(plan, ns) -> int:
    """--dry-run: print the whole plan; else a summary (every tensor with --debug), then run it."""
    if ns.dry_run:
        print_plan(plan)
        return 0
    print_plan(plan, detail=ns.debug)
    return _run(plan, ns)


def cmd_convert(ns) -> int:
    return show_or_run(_compile(ns), ns)


def _compile(ns):
    if (getattr(ns, "plan_command", None) or ns.command) == "ms2pt":
        from ckptmap.mapping.ms2pt import compile_ms2pt
        return compile_ms2pt(_ms2pt_options(ns))
    from ckptmap.mapping.compiler import compile_pt2ms
    return compile_pt2ms(_pt2ms_options(ns))


def cmd_plan(ns) -> int:
    plan = _compile(ns)
    if ns.output:
        out = Path(ns.output)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(plan.to_json())
        os.replace(tmp, out)
        print(f"plan written to {out} ({len(plan.files)} files); run it with `ckptmap apply {out}`")
    if ns.dry_run or not ns.output:
        print_plan(plan)
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
    return _run(plan, ns)


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
    ok = True
    for r in reports:
        ok &= r.identical
        status = "identical" if r.identical else "DIFFERENT"
        print(f"{status:9s}  {r.left}  <->  {r.right}  ({r.compared} values compared)")
        for k in r.only_left[:20]:
            print(f"    only in the first:  {k}")
        for k in r.only_right[:20]:
            print(f"    only in the second: {k}")
        for k, what in r.differing[:20]:
            print(f"    differs: {k}: {what}")
        hidden = max(0, len(r.only_left) - 20) + max(0, len(r.only_right) - 20) + max(0, len(r.differing) - 20)
        if hidden:
            print(f"    … and {hidden} more")
    n_bad = sum(not r.identical for r in reports)
    print(f"\n{len(reports) - n_bad} of {len(reports)} file pairs identical")
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
          f"{', '.join(b.name for b in rules.buckets) or 'none'}")
    return 0


def cmd_demo(ns) -> int:
    from ckptmap.demo import run_demo

    return run_demo(Path(ns.workdir) if ns.workdir else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptmap",
        description="Move training checkpoints between Megatron-LM and MindSpeed-Core-MS, streaming and bit-exact.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pt2ms", help="Megatron checkpoint -> MindSpore checkpoint (flags of convert_pt2ckpt.py).",
                       description="Megatron checkpoint -> MindSpore checkpoint.")
    _add_pt2ms_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("plan", help="Compile a conversion plan; --dry-run prints it, -o saves it for `apply`.")
    plan_sub = p.add_subparsers(dest="plan_command", required=True, metavar="CONVERSION")
    pp = plan_sub.add_parser("pt2ms", help="Plan a pt2ms conversion.")
    _add_pt2ms_flags(pp)
    pp.add_argument("-o", "--output", help="Write the plan as JSON to this file.")
    pp.set_defaults(func=cmd_plan)
    pm = plan_sub.add_parser("ms2pt", help="Plan an ms2pt conversion.")
    _add_ms2pt_flags(pm)
    pm.add_argument("-o", "--output", help="Write the plan as JSON to this file.")
    pm.set_defaults(func=cmd_plan)

    p = sub.add_parser("ms2pt", help="MindSpore checkpoint -> Megatron checkpoint (flags of convert_ckpt2pt.py).",
                       description="MindSpore checkpoint -> Megatron checkpoint.")
    _add_ms2pt_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("apply", help="Run a plan written by `ckptmap plan … -o FILE`.")
    p.add_argument("plan")
    p.add_argument("--debug", action="store_true")
    _add_run_flags(p)
    p.set_defaults(func=cmd_apply)

    from ckptmap.cli_combine import register as register_combine
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
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
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


if __name__ == "__main__":
    sys.exit(main())
