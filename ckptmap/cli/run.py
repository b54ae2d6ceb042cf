"""Show a plan, then run it: what every converting command ends with."""

from __future__ import annotations

from ckptmap.cli.printing import print_plan, print_report

EXIT_FAILED = 1


def run(plan, ns) -> int:
    from ckptmap.execute import run_plan

    report = run_plan(plan, processes=ns.process_limit, multiprocess=not ns.multiprocess_off,
                      timeout=ns.process_timeout, progress=not ns.no_progress, fsync=ns.fsync,
                      world_size=ns.world_size, rank=ns.rank, wait_timeout=ns.wait_timeout,
                      overwrite=ns.overwrite, notify=print)
    print_report(report, full=getattr(ns, "full", False))
    return EXIT_FAILED if report.failed else 0


def print_target(plan, out=None) -> None:
    """Whether the output folder exists and what --overwrite would replace or remove."""
    from ckptmap import target

    print("", file=out)
    for line in target.describe(target.inspect(plan)):
        print(line, file=out)


def show_or_run(plan, ns) -> int:
    """--dry-run: print the plan by pattern (every tensor with --full) and the state of its output
    folder; else one line per file (every tensor with --debug), then run it."""
    if ns.dry_run:
        print_plan(plan, detail=getattr(ns, "full", False), summary=True)
        print_target(plan)
        return 0
    print_plan(plan, detail=ns.debug)
    return run(plan, ns)
