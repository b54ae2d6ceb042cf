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


def v2_path(iteration, tp: int, pp: int, pp_size: int, fmt: str, ep: int | None = None) -> str:
    return (f"{megatron_folders.iter_dir_name(iteration)}/"
            f"{megatron_folders.mp_rank_dir_name(tp, pp, pp_size, ep)}/{V2_FILE_STEM}.{fmt}")


def v2_tracker_path() -> str:
    return megatron_folders.TRACKER


def pt_meta_args_path(tp: int, pp: int, ep: int | None = None) -> str:
    """``args_tpTT_ppPPP.pt``, ``args_tpTT_ppPPP_epEEE.pt`` under expert parallelism."""
    return f"{PT_META_DIR}/args_tp{tp:02d}_pp{pp:03d}{'' if ep is None else f'_ep{ep:03d}'}.pt"


def pt_meta_path(name: str) -> str:
    return f"{PT_META_DIR}/{name}"


def parse_pt_meta_args_name(name: str) -> tuple[int, int, int | None] | None:
    """(tp, pp, ep or None) from ``args_tpTT_ppPPP[_epEEE].pt``; None if it is not one."""
    if not (name.startswith("args_tp") and name.endswith(".pt")):
        return None
    tp, sep, rest = name[len("args_tp"):-len(".pt")].partition("_pp")
    pp, esep, ep = rest.partition("_ep")
    if not (sep and tp.isdigit() and pp.isdigit()) or (esep and not ep.isdigit()):
        return None
    return int(tp), int(pp), int(ep) if esep else None


def detect_layout(root) -> str:
    """``v2`` when the folder looks like ``iter_*/mp_rank_*`` (or has the tracker file), else ``v1``."""
    from pathlib import Path

    root = Path(root)
    return "v2" if (root / megatron_folders.TRACKER).is_file() or any(root.glob("iter_*")) else "v1"


# -------------------------------------------------------------------------------------------------
# Scalar keys of a converted MindSpore checkpoint (formats.md §3.3), as the reference converter
# (MindSpeed-Core-MS r0.1.0 convert_pt2ckpt.py) writes them. Each row is (name, dtype, shape, value).

LR_DECAY_STYLES = ("constant", "WSD", "linear", "cosine", "inverse-square-root")
WD_INCR_STYLES = ("constant", "linear", "cosine")
SCHEDULER_STYLES = {"lr_decay_style": LR_DECAY_STYLES, "wd_incr_style": WD_INCR_STYLES}
_SCHEDULER_FLOATS = ("max_lr", "min_lr", "start_wd", "end_wd")                        # Float64
_SCHEDULER_COUNTS = ("lr_warmup_steps", "num_steps", "lr_decay_steps", "wd_incr_steps")  # Int32
_INT32 = range(-2 ** 31, 2 ** 31)


def step_scalars(iteration: int, layout: str) -> list[tuple]:
    out = [("step_num", "int64", (), iteration), ("epoch_num", "int64", (), 0)]
    if layout == "v2":
        out += [("iteration", "int64", (), iteration), ("checkpoint_version", "float32", (), 2.0)]
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalar_fields(root: dict) -> list[tuple[list, str, tuple | None]]:
    """Which value of Megatron's ``model_optim_rng.pt`` (``root``) each optimizer and scheduler key of
    the MindSpore file holds: ``[(path from root, MindSpeed key, style names or None)]``. Per param group
    ``i``: ``lr`` → ``learning_rate_group_i``, ``step`` → ``state_step`` (one key for all groups),
    every other number or flag ``key`` → ``key_group_i`` (tuples such as ``betas`` and None have no
    key); scheduler numbers under their own names; ``lr_decay_style`` / ``wd_incr_style`` as the
    index of the style name in ``styles``."""
    fields = []
    state = root.get("optimizer")
    # a ChainedOptimizer (MoE: dense, expert) saves a list of optimizer states; their groups are
    # numbered on, one after the other
    parts = [(["optimizer", k], x) for k, x in enumerate(state)] if isinstance(state, list) else [(["optimizer"], state)]
    groups = []
    for prefix, part in parts:
        for j, group in enumerate(((part or {}).get("optimizer") or {}).get("param_groups") or []):
            groups.append((prefix + ["optimizer", "param_groups", j], group))
    for i, (where, group) in enumerate(groups):
        for key, value in group.items():
            path = where + [key]
            if key == "step":
                if _is_number(value):
                    fields.append((path, OPTIMIZER_STEP_KEY, None))
            elif key == "lr":
                if _is_number(value):
                    fields.append((path, f"learning_rate_group_{i}", None))
            elif isinstance(value, (bool, int, float)):   # a flag is a number to MindSpeed (1.0 / 0.0)
                fields.append((path, f"{key}_group_{i}", None))
    for key, value in (root.get("opt_param_scheduler") or {}).items():
        path = ["opt_param_scheduler", key]
        if key in SCHEDULER_STYLES:
            if value is not None:
                fields.append((path, key, SCHEDULER_STYLES[key]))
        elif key in _SCHEDULER_FLOATS + _SCHEDULER_COUNTS and _is_number(value):
            fields.append((path, key, None))
    return fields


def optimizer_scalars(optimizer: dict | None, scheduler: dict | None, origin: str) -> list[tuple]:
    """Megatron's optimizer param groups and scheduler state as MindSpeed keys (``scalar_fields``), with
    the reference's dtypes: group values Float32 (flags 1.0 / 0.0), ``state_step`` Float32 [1] (the
    first group's ``step``), scheduler ``max_lr``/``min_lr``/``start_wd``/``end_wd`` Float64, step
    counts and style indices Int32 — what MindSpore makes of the reference's ``Parameter(int(v))``. A
    count outside Int32's range is written as Int64 (the reference's Int32 would wrap it)."""
    root = {"optimizer": optimizer, "opt_param_scheduler": scheduler}
    groups, step, sched = [], None, []
    for path, key, styles in scalar_fields(root):
        value = root[path[0]]
        for part in path[1:]:
            value = value[part]
        if key == OPTIMIZER_STEP_KEY:
            step = value if step is None else step
        elif path[0] == "optimizer":
            groups.append((key, "float32", (), float(value)))
        elif styles is not None:
            if value not in styles:
                raise CkptmapError(f"{origin}: opt_param_scheduler {key} = {value!r} has no MindSpeed index; "
                                   f"known styles: {', '.join(styles)}")
            sched.append((key, "int32", (), styles.index(value)))
        elif key in _SCHEDULER_COUNTS and isinstance(value, int):
            sched.append((key, "int32" if value in _INT32 else "int64", (), value))
        else:
            sched.append((key, "float64", (), float(value)))
    return groups + ([(OPTIMIZER_STEP_KEY, "float32", (1,), [float(step)])] if step is not None else []) + sched


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
