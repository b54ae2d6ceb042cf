"""`ckptmap convert --from msadapter --to torch` (and back): translate a Megatron checkpoint folder
between MindSpeed-Core-MS's MSAdapter ``.pt`` dialect and stock PyTorch ``.pt`` files — weights,
distributed-optimizer state, args, scheduler — without torch or MindSpore
(``formats/dialect_translate.py``). ``ckptmap plan convert … --dry-run`` shows each file's dialect and
what will happen to it.
"""

from __future__ import annotations

import argparse
import sys
import time

from ckptmap.errors import CkptmapError

EXIT_FAILED = 1
_DIALECT_CHOICES = ("msadapter", "torch")


def _add_flags(p: argparse.ArgumentParser, plan: bool = False) -> None:
    p.add_argument("--from", dest="source", choices=_DIALECT_CHOICES, required=True,
                   help="Dialect of the source files: msadapter (MindSpeed-Core-MS r0.2+ trained through MSAdapter) "
                        "or torch (stock PyTorch / Megatron-LM). Every file's dialect is detected and checked.")
    p.add_argument("--to", dest="target", choices=_DIALECT_CHOICES, required=True,
                   help="Dialect to write (the other one).")
    p.add_argument("--src", required=True,
                   help="The training run's --save folder (tracker + every iter_*), one iter_* folder, or one .pt file.")
    p.add_argument("--dst", required=True, help="Output folder (or .pt file when --src is a file).")
    rng = p.add_mutually_exclusive_group()
    rng.add_argument("--drop-rng", action="store_true",
                     help="Leave the RNG states out (MindSpore's and PyTorch's generators are not interchangeable). "
                          "Resume with --no-load-rng.")
    rng.add_argument("--keep-foreign-rng", action="store_true",
                     help="Copy the RNG states unchanged although the target framework cannot use them — only so that "
                          "converting back restores them; the target must still resume with --no-load-rng.")
    if not plan:
        p.add_argument("--dry-run", action="store_true", help="Check every file and print the plan; write nothing.")
    else:
        p.add_argument("--dry-run", action="store_true", help="Print the plan (the default for `plan`).")
    p.add_argument("--fsync", action="store_true", help="Make every file durable before it is renamed into place.")
    p.add_argument("--no-progress", action="store_true", help="Do not print a line per written file.")
    p.add_argument("--debug", action="store_true", help="Show tracebacks.")


def _rng(ns) -> str:
    return "drop" if ns.drop_rng else "keep" if ns.keep_foreign_rng else "refuse"


def _plan(ns):
    from ckptmap.formats.dialect_translate import plan_folder

    if ns.source == ns.target:
        raise CkptmapError(f"--from and --to are both {ns.source}; convert translates between msadapter and torch")
    return plan_folder(ns.src, ns.dst, source=ns.source, target=ns.target, rng=_rng(ns))


def print_conversion_plan(ns, jobs, skipped, out=None) -> None:
    from ckptmap.cli.printing import human_bytes

    out = out or sys.stdout
    rng = _rng(ns)
    print(f"plan convert: {ns.src} ({ns.source}) -> {ns.dst} ({ns.target}); RNG states: "
          f"{ {'refuse': 'none found', 'drop': 'dropped', 'keep': 'kept unchanged (foreign)'}[rng] }", file=out)
    rows = [("file", "dialect", "action", "tensors", "bytes", "note")]
    for j in jobs:
        if j.action == "copy":
            rows.append((j.rel or ns.dst, "-", "copy", "-", "-", j.note))
        else:
            rows.append((j.rel or ns.dst, j.source_dialect, f"-> {ns.target}", str(j.tensors), human_bytes(j.nbytes),
                         j.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
    if skipped:
        print(f"  not part of a checkpoint, not converted: {', '.join(skipped)}", file=out)
    total = sum(j.nbytes for j in jobs)
    print(f"total: {len(jobs)} files, {sum(j.tensors for j in jobs)} tensors, {human_bytes(total)} of tensor data",
          file=out)
    if rng == "drop" and any(j.note for j in jobs):
        who = "Megatron-LM" if ns.target == "torch" else "MindSpeed"
        print(f"RNG states are left out: resume {who} with --no-load-rng.", file=out)
    if rng == "keep" and any(j.note for j in jobs):
        print("warning: the RNG states are the source framework's and unusable by the target; resume with "
              "--no-load-rng (they are kept only so that converting back restores them).", file=out)


def cmd_dialect_convert(ns) -> int:
    from ckptmap.formats.dialect_translate import run_jobs

    jobs, skipped = _plan(ns)
    print_conversion_plan(ns, jobs, skipped)
    if ns.dry_run:
        return 0
    started = time.perf_counter()

    def progress(job):
        if not ns.no_progress:
            print(f"  wrote {job.rel or ns.dst}", flush=True)

    results = run_jobs(jobs, ns.dst, source=ns.source, target=ns.target, rng=_rng(ns), fsync=ns.fsync,
                       progress=progress)
    failed = [(j, e) for j, e in results if e]
    for j, e in failed:
        print(f"\nFAILED {j.rel or ns.dst}:\n  {e}")
    print(f"\n{len(results) - len(failed)} of {len(results)} files written successfully in "
          f"{time.perf_counter() - started:.2f} s")
    return EXIT_FAILED if failed else 0


def cmd_plan_dialect_convert(ns) -> int:
    jobs, skipped = _plan(ns)
    print_conversion_plan(ns, jobs, skipped)
    return 0


def register(sub, plan_sub) -> None:
    """Add `convert` and `plan convert` to the ckptmap argument parser."""
    p = sub.add_parser(
        "convert",
        help="Translate a Megatron checkpoint between MSAdapter .pt files (MindSpeed-Core-MS) and stock PyTorch "
             ".pt files, optimizer state included (--from msadapter --to torch, or back).",
        description="Translate every file of a Megatron checkpoint folder between the MSAdapter dialect of the "
                    "torch zip format (written by MindSpeed-Core-MS through its PyTorch shim; stock torch.load cannot "
                    "read it) and stock PyTorch files: tensors, dtypes (args.params_dtype, distrib_optim keys), "
                    "Parameters, state-dict metadata. RNG states are refused unless --drop-rng or "
                    "--keep-foreign-rng. Streaming; every file is written under a temporary name and renamed.")
    _add_flags(p)
    p.set_defaults(func=cmd_dialect_convert)
    pc = plan_sub.add_parser("convert", help="Plan a convert (msadapter <-> torch): each file's dialect and action.")
    _add_flags(pc, plan=True)
    pc.set_defaults(func=cmd_plan_dialect_convert)
