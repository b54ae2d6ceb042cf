"""`ckptmap combine` (MindSpeed distributed-optimizer shards -> named tensors): flags and command.

Every flag of MindSpeed-Core-MS ``combine_ckpt_dp_zero.py`` with the same meaning, plus ckptmap's
own (``--no-save-optim``, ``--iteration``/``--epoch``, ``--layout``, ``--dry-run``, the run flags).
"""

from __future__ import annotations

import argparse


def _add_combine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("combine_ckpt_dp_zero.py")
    g.add_argument("--strategy-dir", default="output/opt_shard_info",
                   help="The run's opt_shard_info folder (bucket layout of every DP group; default "
                        "output/opt_shard_info).")
    g.add_argument("--checkpoint-dir", default="output",
                   help="Folder holding the ranks' checkpoints: rank_*/ (V1) or iter_*/ (V2) (default output).")
    g.add_argument("--output-dir", default="output",
                   help="Where the merged files go, in rank_*/ folders (V1) or iter_*/mp_rank_*/ (V2) "
                        "(default output).")
    g.add_argument("--src-format", choices=("ckpt", "safetensors"), default="ckpt",
                   help="Format of the ranks' checkpoints (default ckpt).")
    g.add_argument("--dst-format", choices=("ckpt", "safetensors"), default="ckpt",
                   help="Format of the merged files (default ckpt).")
    g.add_argument("--copy-to-all-dp-ranks", action="store_true",
                   help="Put the merged file in every DP rank's folder, not only in the DP-rank-0 folder (V1).")
    g.add_argument("--max-proccess-limit", "--max-process-limit", dest="process_limit", type=int, default=8,
                   metavar="N",
                   help="Maximum worker processes (default 8); each holds one output tensor in memory.")
    g.add_argument("--rank-section", nargs=2, type=int, metavar=("A", "B"), default=None,
                   help="Only global ranks A <= r < B: DP groups whose lowest rank is in the section (with "
                        "--copy-to-all-dp-ranks: the section's rank folders). For splitting work across nodes.")
    c = p.add_argument_group("ckptmap")
    c.add_argument("--no-save-optim", action="store_true",
                   help="Weights only: leave out the optimizer keys — every {state}.<name> of a state found in the "
                        "shards (exp_avg., exp_avg_sq.), state_step, and every <key>_group_<i> "
                        "(learning_rate_group_i, weight_decay_group_i, …). Weights, RNG states, scheduler keys "
                        "and iteration/step_num/epoch_num are kept.")
    c.add_argument("--iteration", type=int, default=None,
                   help="Combine this step (V1: the <step> of <prefix>-<epoch>_<step>; V2: the iter_* number) "
                        "instead of the latest step present on every rank.")
    c.add_argument("--epoch", type=int, default=None, help="V1: the <epoch> of the step to combine.")
    c.add_argument("--layout", choices=("auto", "v1", "v2"), default="auto",
                   help="v1: opt_shard_info/rank_*/ + rank_*/<prefix>-<epoch>_<step>.<fmt>; v2: opt_shard_info/"
                        "mp_rank_*/ + iter_*/mp_rank_*/model_optim_rng_<dp>.<fmt> (default: from --strategy-dir).")
    c.add_argument("--crc", action="store_true",
                   help="Append MindSpore's CRC-32 trailer to merged .ckpt files.")
    c.add_argument("--dry-run", action="store_true",
                   help="Print the plan (a summary by pattern of which shard slices make which tensor) and "
                        "write nothing.")
    c.add_argument("--full", action="store_true", help="With --dry-run: list every file and tensor of the plan.")
    c.add_argument("--debug", action="store_true", help="Show tracebacks.")
    from ckptmap.cli.flags import add_run_flags
    add_run_flags(p.add_argument_group("execution"))


def combine_options(ns):
    from ckptmap.mapping.combine import CombineOptions

    return CombineOptions(
        strategy_dir=ns.strategy_dir, checkpoint_dir=ns.checkpoint_dir, output_dir=ns.output_dir,
        src_format=ns.src_format, dst_format=ns.dst_format, copy_to_all_dp_ranks=ns.copy_to_all_dp_ranks,
        rank_section=tuple(ns.rank_section) if ns.rank_section else None, save_optim=not ns.no_save_optim,
        iteration=ns.iteration, epoch=ns.epoch, layout=ns.layout, crc=ns.crc)


def cmd_combine(ns) -> int:
    from ckptmap.cli.run import show_or_run
    from ckptmap.mapping.combine import compile_combine

    plan = compile_combine(combine_options(ns))
    info = plan.info
    print(f"combine: step {info['step']} ({info['step_choice']})"
          + (f"; newer steps not on every rank were ignored: {info['newer_steps_ignored']}"
             if "newer_steps_ignored" in info else ""))
    return show_or_run(plan, ns)


def register(sub) -> None:
    """Add the `combine` sub-command to the ckptmap argument parser."""
    p = sub.add_parser(
        "combine",
        help="MindSpeed distributed-optimizer shards -> named full tensors (flags of combine_ckpt_dp_zero.py).",
        description="Merge the per-rank flat bucket shards of a MindSpeed run with the distributed optimizer "
                    "into named tensors with their real shapes (…_dp_merged.{fmt}), loadable under any DP size "
                    "and convertible with `ckptmap ms2pt`.")
    _add_combine_flags(p)
    p.set_defaults(func=cmd_combine)
