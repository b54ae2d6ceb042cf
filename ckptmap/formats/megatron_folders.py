"""Megatron-LM legacy ("torch") checkpoint folders: names and the iteration tracker.

    <save>/latest_checkpointed_iteration.txt     "1000" or "release"
    <save>/iter_{it:07d}/mp_rank_{tp:02d}[_{pp:03d} when PP > 1][_{ep:03d} under expert parallelism]/
        model_optim_rng.pt    model, optimizer scalars, scheduler, args, RNG (``megatron_files.ModelFile``)
        distrib_optim.pt      distributed optimizer buckets, DP rank 0 only (``megatron_files.OptimFile``)
    <save>/param_map/param_map_buffer{B}_dp{d}tp{t}pp{p}vpp{v}.json   (``param_map``)
"""

from __future__ import annotations

from pathlib import Path

import attrs

from ckptmap import atomic
from ckptmap.errors import CkptmapError

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
PARAM_MAP_DIR = "param_map"


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def mp_rank_dir_name(tp: int, pp: int, pp_size: int) -> str:
    return f"mp_rank_{tp:02d}" if pp_size == 1 else f"mp_rank_{tp:02d}_{pp:03d}"


def parse_mp_rank_dir_name(name: str) -> tuple[int, ...] | None:
    """(tp,) / (tp, pp) / (tp, pp, ep) from ``mp_rank_TT[_PPP[_EEE]]``; None if it is not one."""
    if not name.startswith("mp_rank_"):
        return None
    parts = name[len("mp_rank_"):].split("_")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


# -------------------------------------------------------------------------------------------------
# Directories


@attrs.frozen
class CheckpointDir:
    root: Path             # the iteration directory
    iteration: int | str
    ranks: dict            # (tp, pp) -> rank directory Path
    has_pp_suffix: bool
    save_root: Path | None  # the --save directory, when known

    @property
    def tp_size(self) -> int:
        return 1 + max(tp for tp, _ in self.ranks)

    @property
    def pp_size(self) -> int:
        return 1 + max(pp for _, pp in self.ranks)


def read_tracker(save_root) -> int | str:
    """The iteration named by ``latest_checkpointed_iteration.txt``: a number or ``"release"``."""
    tracker = Path(save_root) / TRACKER
    try:
        raw = tracker.read_bytes()
    except OSError as e:
        raise CkptmapError(f"cannot read {tracker}: {e.strerror or e}") from None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        shown = raw[:64]
        raise CkptmapError(
            f"{tracker} is not text: it holds the bytes {shown!r}{' …' if len(raw) > 64 else ''} ({len(raw)} bytes); "
            f"Megatron writes an iteration number or 'release' there — the file is damaged: write the iteration "
            f"you want into it, or pass that iter_* directory instead") from None
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise CkptmapError(f"{tracker} holds {text!r}; expected an iteration number or 'release'") from None


def latest_iteration(save_root) -> int | str:
    """The tracker's iteration, or the only ``iter_*`` folder's when there is no tracker."""
    save_root = Path(save_root)
    if (save_root / TRACKER).is_file():
        return read_tracker(save_root)
    iters = sorted(p.name for p in save_root.glob("iter_*") if p.name[len("iter_"):].isdigit())
    if len(iters) != 1:
        raise CkptmapError(f"{save_root} has no {TRACKER} and {len(iters)} iter_* folders; keep one or add "
                           f"the tracker file")
    return int(iters[0][len("iter_"):])


def looks_like_checkpoint(path) -> bool:
    """A save root or iteration folder of a Megatron checkpoint (it has mp_rank_* folders)."""
    path = Path(path)
    return path.is_dir() and (any(path.glob("iter_*/mp_rank_*")) or any(path.glob("mp_rank_*")))


def open_checkpoint_dir(path) -> CheckpointDir:
    """Accept an ``iter_*`` directory, or a save root holding the tracker file."""
    path = Path(path)
    if not path.exists():
        raise CkptmapError(f"Megatron checkpoint path {path} does not exist; pass the training run's "
                           f"--save directory or one of its iter_* directories")
    if not path.is_dir():
        raise CkptmapError(f"Megatron checkpoint path {path} is a file; pass the directory that holds "
                           f"{TRACKER} or an iter_* directory")
    save_root = None
    if (path / TRACKER).is_file():
        save_root = path
        iteration = read_tracker(path)
        iter_dir = path / iter_dir_name(iteration)
        if not iter_dir.is_dir():
            raise CkptmapError(f"{path / TRACKER} names iteration {iteration}, but {iter_dir} does not exist; "
                               f"pass the iter_* directory you want explicitly")
    elif path.name.startswith("iter_") or path.name == "release":
        iter_dir = path
        save_root = path.parent if (path.parent / TRACKER).is_file() else None
        if path.name == "release":
            iteration = "release"
        else:
            try:
                iteration = int(path.name[len("iter_"):])
            except ValueError:
                raise CkptmapError(f"{path}: cannot read the iteration from the directory name; expected "
                                   f"iter_NNNNNNN") from None
    else:
        iters = sorted(p.name for p in path.glob("iter_*") if p.is_dir())
        if iters:
            raise CkptmapError(f"{path} has {len(iters)} iter_* directories ({', '.join(iters[:4])}"
                               f"{', …' if len(iters) > 4 else ''}) but no {TRACKER}; pass the one you "
                               f"want, e.g. {path / iters[-1]}")
        iter_dir, iteration = path, None
    ranks, suffixes = {}, set()
    for child in sorted(iter_dir.iterdir()):
        if not child.is_dir() or not child.name.startswith("mp_rank_"):
            continue
        parts = parse_mp_rank_dir_name(child.name)
        if parts is None:
            raise CkptmapError(f"{child}: unexpected directory name; Megatron writes mp_rank_TT or "
                               f"mp_rank_TT_PPP")
        if len(parts) == 3:
            raise CkptmapError(f"{child}: expert-parallel checkpoints (mp_rank_TT_PPP_EEE) are not "
                               f"supported yet by ckptmap; convert a checkpoint saved without expert "
                               f"parallelism, or open an issue with your layout")
        tp = parts[0]
        pp = parts[1] if len(parts) == 2 else 0
        suffixes.add(len(parts) == 2)
        ranks[(tp, pp)] = child
    if not ranks:
        raise CkptmapError(f"no mp_rank_* directories in {iter_dir}; this is not a Megatron checkpoint "
                           f"iteration directory (expected mp_rank_TT or mp_rank_TT_PPP inside)")
    if len(suffixes) > 1:
        raise CkptmapError(f"{iter_dir} mixes mp_rank_TT and mp_rank_TT_PPP directories; remove the stale ones")
    tps = {tp for tp, _ in ranks}
    pps = {pp for _, pp in ranks}
    missing = [(t, p) for t in range(max(tps) + 1) for p in range(max(pps) + 1) if (t, p) not in ranks]
    if missing:
        t, p = missing[0]
        raise CkptmapError(f"{iter_dir} lacks the directory of tp rank {t}, pp rank {p} "
                           f"({mp_rank_dir_name(t, p, 2 if suffixes == {True} else 1)}); the checkpoint "
                           f"is incomplete")
    if iteration is None:
        raise CkptmapError(f"{path}: cannot tell the iteration; pass an iter_NNNNNNN directory or the save "
                           f"root holding {TRACKER}")
    return CheckpointDir(iter_dir, iteration, ranks, suffixes == {True}, save_root)


def write_tracker(save_root, iteration) -> None:
    atomic.write_text(Path(save_root) / TRACKER, str(iteration))
