"""Show a plan, then run it: what every converting command ends with."""

from __future__ import annotations

from ckptmap.cli.printing import print_plan, print_report

EXIT_FAILED = 1


def run(plan, ns) -> int:
    from ckptmap.execute import run_plan

    report = run_plan(plan, processes=ns.process_limit, multiprocess=not ns.multiprocess_off,
                      timeout=ns.process_timeout, progress=not ns.no_progress, fsync=ns.fsync,
                      world_size=ns.world_size, rank=ns.rank)
    print_report(report)
    return EXIT_FAILED if report.failed else 0


def show_or_run(plan, ns) -> int:
    """--dry-run: print the whole plan; else a summary (every tensor with --debug), then run it."""
    if ns.dry_run:
        print_plan(plan)
        return 0
    print_plan(plan, detail=ns.debug)
    return run(plan, ns)
