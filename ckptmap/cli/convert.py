"""`ckptmap convert --from msadapter --to torch` (and back): translate a Megatron checkpoint folder
between MindSpeed-Core-MS's MSAdapter ``.pt`` dialect and stock PyTorch ``.pt`` files — weights,
distributed-optimizer state, args, scheduler — without torch or MindSpore
(``formats/dialect_translate.py``). ``ckptmap plan convert … --dry-run`` shows each file's dialect and
what will happen to it.

`ckptmap convert --from torch_dist --to torch [--target-tp-size …]`: a Megatron ``torch_dist`` checkpoint as legacy
``model_optim_rng.pt`` + ``distrib_optim.pt`` files (``mapping/torch_dist_legacy.py``), through the executor like
``reshard`` (``--overwrite``, ``--process-limit``; ``plan convert`` shows every file).

`ckptmap convert --from torch_dist --to torch_dist [--sharding-type fully_reshardable]`: rewrite a
Megatron ``torch_dist`` checkpoint (``formats/megatron_dist.py``): as it is (every item re-written,
``.metadata`` / ``common.pt`` re-pickled), or with the distributed optimizer's
``fully_sharded_model_space`` state (megatron-core <= 0.14) stored as ``fully_reshardable``
(0.15+), the upgrade megatron-core itself only does by loading on GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ckptmap.errors import CkptmapError

EXIT_FAILED = 1
_DIALECT_CHOICES = ("msadapter", "torch", "torch_dist")
_TORCH_DIST = "torch_dist"


def _add_flags(p: argparse.ArgumentParser, plan: bool = False) -> None:
    p.add_argument("--from", dest="source", choices=_DIALECT_CHOICES, required=True,
                   help="Dialect of the source files: msadapter (MindSpeed-Core-MS r0.2+ trained through MSAdapter), "
                        "torch (stock PyTorch / Megatron-LM) or torch_dist (Megatron --ckpt-format torch_dist folders). "
                        "Every file's dialect is detected and checked.")
    p.add_argument("--to", dest="target", choices=_DIALECT_CHOICES, required=True,
                   help="Dialect to write (msadapter <-> torch; torch_dist -> torch_dist; torch_dist -> torch: legacy "
                        "Megatron files with the distributed optimizer's state, at any --target-* layout).")
    p.add_argument("--src", required=True,
                   help="The training run's --save folder (tracker + every iter_*), one iter_* folder, or one .pt file.")
    p.add_argument("--dst", required=True, help="Output folder (or .pt file when --src is a file).")
    # no argparse choices: they would import formats.megatron_dist (0.3 s) for every command's start-up;
    # megatron_dist refuses an unknown name, listing the known ones
    p.add_argument("--sharding-type", default=None, metavar="TYPE",
                   help="torch_dist only: the distributed optimizer's sharding type to write (default: the source's). "
                        "fully_reshardable or dp_reshardable from fully_sharded_model_space is the offline upgrade from megatron-core "
                        "<= 0.14 to 0.15+.")
    add_rng_flags(p)
    t = p.add_argument_group("torch_dist -> torch (legacy Megatron files)")
    t.add_argument("--target-tp-size", type=int, help="Tensor parallel size of the legacy files (default: the saving "
                                                      "run's, from common.pt's args).")
    t.add_argument("--target-pp-size", type=int, help="Pipeline parallel size (default: the saving run's).")
    t.add_argument("--target-vpp-size", type=int,
                   help="Model chunks per pipeline stage (default: the saving run's if PP is unchanged, else 1).")
    t.add_argument("--target-dp-size", type=int,
                   help="Data parallel size the distrib_optim.pt buckets are laid out for (default: the saving run's).")
    t.add_argument("--target-ep-size", type=int,
                   help="MoE: expert parallel size (one folder per expert rank; default: the saving run's).")
    t.add_argument("--target-megatron-version",
                   help="megatron-core version that will load the files: its bucket layout and distrib_optim.pt form "
                        "(asked for when the candidate versions lay the target out differently); torch -> torch_dist "
                        "with --sharding-type dp_zero_gather_scatter: 0.8 - 0.14 or 0.15+ form.")
    t.add_argument("--convert-param-only", action="store_true", help="Weights only (no distrib_optim.pt).")
    t.add_argument("--rules", default=None, help="Bundled rules name or a .rules path (default: megatron_core_gpt).")
    t.add_argument("--overwrite", action="store_true",
                   help="Replace the output folder's content (default: a non-empty output folder is refused).")
    t.add_argument("--process-limit", type=int, default=min(4, os.cpu_count() or 1), help="Worker processes.")
    t.add_argument("--multiprocess-off", action="store_true", help="Run in this process only.")
    if not plan:
        p.add_argument("--dry-run", action="store_true", help="Check every file and print the plan; write nothing.")
    else:
        p.add_argument("--dry-run", action="store_true", help="Print the plan (the default for `plan`).")
    p.add_argument("--fsync", action="store_true", help="Make every file durable before it is renamed into place.")
    p.add_argument("--no-progress", action="store_true", help="Do not print a line per written file.")
    p.add_argument("--debug", action="store_true", help="Show tracebacks.")


def add_rng_flags(p) -> None:
    """--drop-rng / --keep-foreign-rng: what to do with RNG states when a file changes dialect (also
    `ckptmap ms2pt --dialect torch`); without either, such states are refused (dialect_translate)."""
    rng = p.add_mutually_exclusive_group()
    rng.add_argument("--drop-rng", action="store_true",
                     help="Leave the RNG states out (MindSpore's and PyTorch's generators are not interchangeable). "
                          "Resume with --no-load-rng.")
    rng.add_argument("--keep-foreign-rng", action="store_true",
                     help="Copy the RNG states unchanged although the target framework cannot use them — only so that "
                          "converting back restores them; the target must still resume with --no-load-rng.")


def rng_policy(ns) -> str:
    """The dialect_translate RNG policy the flags of add_rng_flags chose."""
    return "drop" if ns.drop_rng else "keep" if ns.keep_foreign_rng else "refuse"


def _plan(ns):
    from ckptmap.formats.dialect_translate import plan_folder

    if _TORCH_DIST in (ns.source, ns.target):
        raise CkptmapError("internal error: torch_dist is planned by _plan_torch_dist")
    if ns.sharding_type is not None:
        raise CkptmapError("--sharding-type applies to torch_dist checkpoints (--from torch_dist --to torch_dist)")
    if ns.source == ns.target:
        raise CkptmapError(f"--from and --to are both {ns.source}; convert translates between msadapter and torch")
    return plan_folder(ns.src, ns.dst, source=ns.source, target=ns.target, rng=rng_policy(ns))


def print_conversion_plan(ns, jobs, skipped, out=None) -> None:
    from ckptmap.cli.printing import human_bytes

    out = out or sys.stdout
    rng = rng_policy(ns)
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


_TO_LEGACY_ONLY = ("target_tp_size", "target_pp_size", "target_vpp_size", "target_dp_size", "target_ep_size",
                   "target_megatron_version",
                   "convert_param_only", "rules")


def _is_to_legacy(ns) -> bool:
    """--from torch_dist --to torch: legacy Megatron files (mapping/torch_dist_legacy.py)."""
    if (ns.source, ns.target) == (_TORCH_DIST, "torch"):
        if ns.drop_rng or ns.keep_foreign_rng or ns.sharding_type:
            raise CkptmapError("--drop-rng / --keep-foreign-rng / --sharding-type do not apply to torch_dist -> torch "
                               "(the RNG states stay PyTorch's; legacy files have no sharding type)")
        return True
    given = [f"--{k.replace('_', '-')}" for k in _TO_LEGACY_ONLY if getattr(ns, k, None)]
    if given:
        raise CkptmapError(f"{', '.join(given)} apply to --from torch_dist --to torch only")
    return False


def _legacy_plan(ns):
    from ckptmap.mapping.torch_dist_legacy import DEFAULT_RULES, DistToLegacyOptions, compile_torch_dist_to_legacy

    return compile_torch_dist_to_legacy(DistToLegacyOptions(
        ns.src, ns.dst, target_tp_size=ns.target_tp_size, target_pp_size=ns.target_pp_size,
        target_vpp_size=ns.target_vpp_size, target_dp_size=ns.target_dp_size, target_ep_size=ns.target_ep_size,
        target_megatron_version=ns.target_megatron_version, convert_param_only=ns.convert_param_only,
        rules=ns.rules or DEFAULT_RULES))


def _run_ns(ns):
    """What cli.run expects of a converting command's flags (one machine)."""
    for k, v in (("process_timeout", None), ("world_size", 1), ("rank", 0), ("wait_timeout", 600.0)):
        if not hasattr(ns, k):
            setattr(ns, k, v)
    return ns


def _is_to_dist(ns) -> bool:
    """--from torch --to torch_dist: legacy Megatron files as a torch_dist folder (mapping/legacy_torch_dist.py)."""
    return (ns.source, ns.target) == ("torch", _TORCH_DIST)


def _to_dist(ns) -> int:
    from pathlib import Path

    from ckptmap.cli.compose import legacy_to_torch_dist
    from ckptmap.mapping.torch_dist_legacy import DEFAULT_RULES

    if ns.drop_rng or ns.keep_foreign_rng:
        raise CkptmapError("--drop-rng / --keep-foreign-rng do not apply to torch -> torch_dist (the RNG states stay "
                           "PyTorch's)")
    given = [f"--{k.replace('_', '-')}" for k in _TO_LEGACY_ONLY
             if k not in ("rules", "target_megatron_version") and getattr(ns, k, None)]
    if given:
        raise CkptmapError(f"{', '.join(given)} apply to --from torch_dist --to torch only; torch -> torch_dist keeps "
                           f"the saving layout (reshard the legacy files first with `ckptmap reshard`)")
    return legacy_to_torch_dist(ns, ns.src, Path(ns.dst), ns.sharding_type or "fully_reshardable",
                                ns.rules or DEFAULT_RULES, ns.target_megatron_version)


def _is_torch_dist(ns) -> bool:
    if _TORCH_DIST not in (ns.source, ns.target):
        return False
    if ns.source != ns.target:
        raise CkptmapError(f"--from {ns.source} --to {ns.target}: torch_dist checkpoints convert to torch_dist (a "
                           f"rewrite, or another --sharding-type) or to torch (legacy Megatron files: --from torch_dist "
                           f"--to torch); for Megatron -> MindSpore use `ckptmap pt2ms`")
    if ns.drop_rng or ns.keep_foreign_rng:
        raise CkptmapError("--drop-rng / --keep-foreign-rng apply to msadapter <-> torch; a torch_dist rewrite keeps "
                           "the RNG states (they stay PyTorch's)")
    return True


def _plan_torch_dist(ns):
    from ckptmap.formats.megatron_dist import plan_folder

    return plan_folder(ns.src, ns.dst, ns.sharding_type)


def print_torch_dist_plan(ns, plan, out=None) -> None:
    from ckptmap.cli.printing import human_bytes

    out = out or sys.stdout
    print(f"plan convert: {plan.src} (torch_dist) -> {plan.dst} (torch_dist)", file=out)
    for it in plan.iterations:
        print(f"  {it.src.name} -> {it.dst}: optimizer sharding {it.source_type or 'none (no optimizer state)'} -> "
              f"{it.target_type or 'none'}; {len(it.tensors)} tensors ({human_bytes(it.nbytes)}), "
              f"{len(it.objects)} objects", file=out)
        for note in it.notes:
            print(f"    {note}", file=out)
        for path, value in it.common_edits:
            print(f"    common.pt[{']['.join(repr(k) for k in path)}] = {value!r}", file=out)
        rows = [("file", "tensor chunks", "objects", "tensor bytes")]
        for name, items in sorted(it.files().items()):
            rows.append((name, str(sum(1 for k, _, _ in items if k == "tensor")),
                         str(sum(1 for k, _, _ in items if k == "object")), human_bytes(sum(n for _, _, n in items))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("    " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if getattr(ns, "debug", False):
            for t, s in zip(it.tensors, it.sources):
                how = f"from {s.key}" if s.key != t.key else "copied"
                if s.global_tensor is not None and s.global_tensor.nd_flattened:
                    how += f" (un-flattened from {list(s.global_tensor.stored_shape)})"
                print(f"      {t.key}  {t.dtype} {list(t.shape)}  {len(t.chunks)} chunks  {how}", file=out)
    if plan.tracker is not None:
        print(f"  latest_checkpointed_iteration.txt copied ({plan.tracker.strip()!r})", file=out)
    if plan.skipped:
        print(f"  not part of a checkpoint, not converted: {', '.join(plan.skipped)}", file=out)
    total = sum(it.nbytes for it in plan.iterations)
    print(f"total: {len(plan.iterations)} checkpoint folder(s), {human_bytes(total)} of tensor data", file=out)


def cmd_torch_dist_convert(ns) -> int:
    return run_torch_dist_plan(ns, _plan_torch_dist(ns))


def run_torch_dist_plan(ns, plan) -> int:
    """Print a torch_dist -> torch_dist plan and (unless --dry-run) write it."""
    from ckptmap.formats.megatron_dist import write_folder

    print_torch_dist_plan(ns, plan)
    if ns.dry_run:
        return 0
    started = time.perf_counter()

    def progress(name, nbytes):
        if not ns.no_progress:
            print(f"  wrote {name}", flush=True)

    write_folder(plan, fsync=ns.fsync, progress=progress)
    print(f"\n{len(plan.iterations)} checkpoint folder(s) written in {time.perf_counter() - started:.2f} s")
    return 0


def cmd_dialect_convert(ns) -> int:
    from ckptmap.formats.dialect_translate import run_jobs

    if _is_to_dist(ns):
        return _to_dist(ns)
    if _is_to_legacy(ns):
        from ckptmap.cli.run import show_or_run
        return show_or_run(_legacy_plan(ns), _run_ns(ns))
    if _is_torch_dist(ns):
        return cmd_torch_dist_convert(ns)
    jobs, skipped = _plan(ns)
    print_conversion_plan(ns, jobs, skipped)
    if ns.dry_run:
        return 0
    started = time.perf_counter()

    def progress(job):
        if not ns.no_progress:
            print(f"  wrote {job.rel or ns.dst}", flush=True)

    results = run_jobs(jobs, ns.dst, source=ns.source, target=ns.target, rng=rng_policy(ns), fsync=ns.fsync,
                       progress=progress)
    failed = [(j, e) for j, e in results if e]
    for j, e in failed:
        print(f"\nFAILED {j.rel or ns.dst}:\n  {e}")
    print(f"\n{len(results) - len(failed)} of {len(results)} files written successfully in "
          f"{time.perf_counter() - started:.2f} s")
    return EXIT_FAILED if failed else 0


def cmd_plan_dialect_convert(ns) -> int:
    if _is_to_dist(ns):
        return _to_dist(ns)
    if _is_to_legacy(ns):
        from ckptmap.cli.printing import print_plan
        from ckptmap.cli.run import print_target
        plan = _legacy_plan(ns)
        print_plan(plan)
        print_target(plan)
        return 0
    if _is_torch_dist(ns):
        print_torch_dist_plan(ns, _plan_torch_dist(ns))
        return 0
    jobs, skipped = _plan(ns)
    print_conversion_plan(ns, jobs, skipped)
    return 0


def register(sub, plan_sub) -> None:
    """Add `convert` and `plan convert` to the ckptmap argument parser."""
    p = sub.add_parser(
        "convert",
        help="Translate a Megatron checkpoint between MSAdapter .pt files (MindSpeed-Core-MS) and stock PyTorch "
             ".pt files, optimizer state included (--from msadapter --to torch, or back); rewrite a torch_dist "
             "checkpoint, e.g. as fully_reshardable (--from torch_dist --to torch_dist --sharding-type ...).",
        description="Translate every file of a Megatron checkpoint folder between the MSAdapter dialect of the "
                    "torch zip format (written by MindSpeed-Core-MS through its PyTorch shim; stock torch.load cannot "
                    "read it) and stock PyTorch files: tensors, dtypes (args.params_dtype, distrib_optim keys), "
                    "Parameters, state-dict metadata. RNG states are refused unless --drop-rng or "
                    "--keep-foreign-rng. Streaming; every file is written under a temporary name and renamed. "
                    "--from torch_dist --to torch_dist rewrites Megatron torch_dist folders (same layout), optionally "
                    "storing fully_sharded_model_space optimizer state as fully_reshardable (--sharding-type).")
    _add_flags(p)
    p.set_defaults(func=cmd_dialect_convert)
    pc = plan_sub.add_parser("convert", help="Plan a convert (msadapter <-> torch, torch_dist -> torch_dist): each "
                                             "file's dialect and action.")
    _add_flags(pc, plan=True)
    pc.set_defaults(func=cmd_plan_dialect_convert)
