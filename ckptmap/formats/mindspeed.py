"""MindSpeed-Core-MS checkpoint directory layouts (formats.md §3.1, §3.3).

    V1: <ms>/rank_{global rank}/{prefix}.{ckpt|safetensors}       (ckptmap's default)
    V2: <ms>/iter_{it:07d}/mp_rank_{tp:02d}[_{pp:03d} if PP > 1]/model_optim_rng.{fmt}
        <ms>/latest_checkpointed_iteration.txt
    both: <ms>/pt_meta/args_tp{tp:02d}_pp{pp:03d}.pt + the param_map JSONs
"""

from __future__ import annotations

import re

from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_folders

DEFAULT_PREFIX = "network"
PT_META_DIR = "pt_meta"
V2_FILE_STEM = "model_optim_rng"
LAYOUTS = ("v1", "v2")


def v1_path(rank: int, prefix: str, fmt: str) -> str:
    return f"rank_{rank}/{prefix}.{fmt}"


def v2_path(iteration, tp: int, pp: int, pp_size: int, fmt: str) -> str:
    return (f"{megatron_folders.iter_dir_name(iteration)}/{megatron_folders.mp_rank_dir_name(tp, pp, pp_size)}/"
            f"{V2_FILE_STEM}.{fmt}")


def v2_tracker_path() -> str:
    return megatron_folders.TRACKER


def pt_meta_args_path(tp: int, pp: int) -> str:
    return f"{PT_META_DIR}/args_tp{tp:02d}_pp{pp:03d}.pt"


def pt_meta_path(name: str) -> str:
    return f"{PT_META_DIR}/{name}"


def parse_pt_meta_args_name(name: str) -> tuple[int, int] | None:
    """(tp, pp) from ``args_tpTT_ppPPP.pt``; None if it is not one."""
    if not (name.startswith("args_tp") and name.endswith(".pt")):
        return None
    tp, sep, pp = name[len("args_tp"):-len(".pt")].partition("_pp")
    if not (sep and tp.isdigit() and pp.isdigit()):
        return None
    return int(tp), int(pp)


def detect_layout(root) -> str:
    """``v2`` when the folder looks like ``iter_*/mp_rank_*`` (or has the tracker file), else ``v1``."""
    from pathlib import Path

    root = Path(root)
    return "v2" if (root / megatron_folders.TRACKER).is_file() or any(root.glob("iter_*")) else "v1"


# -------------------------------------------------------------------------------------------------
# Scalar keys of a converted MindSpore checkpoint (formats.md §3.3). Each is (name, dtype, shape, value).

LR_DECAY_STYLES = ("constant", "WSD", "linear", "cosine", "inverse-square-root")
WD_INCR_STYLES = ("constant", "linear", "cosine")
_SCHEDULER_KEYS = {
    "max_lr": "float64", "min_lr": "float64", "start_wd": "float64", "end_wd": "float64",
    "lr_warmup_steps": "int64", "num_steps": "int64", "lr_decay_steps": "int64", "wd_incr_steps": "int64",
}
_SCHEDULER_STYLES = {"lr_decay_style": LR_DECAY_STYLES, "wd_incr_style": WD_INCR_STYLES}


def step_scalars(iteration: int, layout: str) -> list[tuple]:
    out = [("step_num", "int64", (), iteration), ("epoch_num", "int64", (), 0)]
    if layout == "v2":
        out += [("iteration", "int64", (), iteration), ("checkpoint_version", "float32", (), 2.0)]
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def optimizer_scalars(optimizer: dict | None, scheduler: dict | None, origin: str) -> list[tuple]:
    """Megatron's optimizer param groups and scheduler state as MindSpeed keys: per group ``i``
    ``learning_rate_group_i`` (lr) and ``{key}_group_i`` for the other numbers (Float32), one
    ``state_step`` (Float32 [1]); tuples, flags and None are dropped."""
    out = []
    groups = ((optimizer or {}).get("optimizer") or {}).get("param_groups") or []
    step = None
    for i, group in enumerate(groups):
        for key, value in group.items():
            if key == "step":
                step = value if step is None else step
            elif key == "lr" and _is_number(value):
                out.append((f"learning_rate_group_{i}", "float32", (), value))
            elif _is_number(value):
                out.append((f"{key}_group_{i}", "float32", (), value))
    if step is not None:
        out.append(("state_step", "float32", (1,), [float(step)]))
    for key, value in (scheduler or {}).items():
        if key in _SCHEDULER_KEYS and _is_number(value):
            out.append((key, _SCHEDULER_KEYS[key], (), value))
        elif key in _SCHEDULER_STYLES and value is not None:
            styles = _SCHEDULER_STYLES[key]
            if value not in styles:
                raise CkptmapError(f"{origin}: opt_param_scheduler {key} = {value!r} has no MindSpeed index; "
                                   f"known styles: {', '.join(styles)}")
            out.append((key, "int64", (), styles.index(value)))
    return out


# -------------------------------------------------------------------------------------------------
# Which keys of a MindSpeed checkpoint belong to the optimizer (`ckptmap combine --no-save-optim`).

OPTIMIZER_STEP_KEY = "state_step"
_GROUP_KEY = re.compile(r"^.+_group_\d+$")


def is_optimizer_key(key: str, state_prefixes=()) -> bool:
    """True for the optimizer's keys: the states of a parameter, ``{state}.{name}`` for every state
    prefix in ``state_prefixes`` (``exp_avg``, ``exp_avg_sq``, … — those that appear in the
    checkpoint's ``{state}.buffer_{i}_bucket_{j}`` keys); ``state_step``; and the per-parameter-group
    hyper-parameters ``{key}_group_{i}`` (``learning_rate_group_i``, ``weight_decay_group_i``, …).
    Model weights, RNG states, the LR-scheduler keys and ``iteration`` / ``step_num`` / ``epoch_num``
    are not optimizer keys."""
    if key == OPTIMIZER_STEP_KEY or _GROUP_KEY.match(key):
        return True
    return any(key.startswith(prefix + ".") for prefix in state_prefixes if prefix)
