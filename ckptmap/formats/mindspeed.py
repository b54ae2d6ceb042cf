"""MindSpeed-Core-MS checkpoint directory layouts (formats.md §3.1, §3.3).

    V1: <ms>/rank_{global rank}/{prefix}.{ckpt|safetensors}       (ckptmap's default)
    V2: <ms>/iter_{it:07d}/mp_rank_{tp:02d}[_{pp:03d} if PP > 1]/model_optim_rng.{fmt}
        <ms>/latest_checkpointed_iteration.txt
    both: <ms>/pt_meta/args_tp{tp:02d}_pp{pp:03d}.pt + the param_map JSONs
"""

from __future__ import annotations

from ckptmap.formats import megatron

DEFAULT_PREFIX = "network"
PT_META_DIR = "pt_meta"
V2_FILE_STEM = "model_optim_rng"
LAYOUTS = ("v1", "v2")


def v1_path(rank: int, prefix: str, fmt: str) -> str:
    return f"rank_{rank}/{prefix}.{fmt}"


def v2_path(iteration, tp: int, pp: int, pp_size: int, fmt: str) -> str:
    return (f"{megatron.iter_dir_name(iteration)}/{megatron.mp_rank_dir_name(tp, pp, pp_size)}/"
            f"{V2_FILE_STEM}.{fmt}")


def v2_tracker_path() -> str:
    return megatron.TRACKER


def pt_meta_args_path(tp: int, pp: int) -> str:
    return f"{PT_META_DIR}/args_tp{tp:02d}_pp{pp:03d}.pt"


def pt_meta_path(name: str) -> str:
    return f"{PT_META_DIR}/{name}"
