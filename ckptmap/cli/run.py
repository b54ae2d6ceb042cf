"""Show a plan, then run it: what every converting command ends with."""

from __future__ import annotations

import gc

from ckptmap.cli.printing import print_plan, print_report

EXIT_FAILED = 1


def keep_out_of_collections() -> None:
    """After planning, in a command's process: the plan stays alive until the process ends, so it is
    moved out of the cyclic GC's reach (``gc.freeze``) instead of being rescanned by every later
    collection while it is printed or run (a full pass over a 16,384-rank plan is ~1 s). Planning
    itself runs without the cyclic GC (``megatron_source._no_collections``)."""
    gc.freeze()


def run(plan, ns) -> int:
    from ckptmap.execute import run_plan

    keep_out_of_collections()   # the workers fork from here: the frozen plan is not rescanned (nor touched) by GC

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
    keep_out_of_collections()
    if ns.dry_run:
        print_plan(plan, detail=getattr(ns, "full", False), summary=True)
        print_target(plan)
        return 0
    print_plan(plan, detail=ns.debug)
    return run(plan, ns)
