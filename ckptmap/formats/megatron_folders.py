"""Megatron-LM legacy ("torch") checkpoint folders: names and the iteration tracker.

    <save>/latest_checkpointed_iteration.txt     "1000" or "release"
    <save>/iter_{it:07d}/mp_rank_{tp:02d}[_{pp:03d} when PP > 1][_{ep:03d} under expert parallelism]/
        model_optim_rng.pt    model, optimizer scalars, scheduler, args, RNG (``megatron_files.ModelFile``)
        distrib_optim.pt      distributed optimizer buckets, DP rank 0 only (``megatron_files.OptimFile``)
    <save>/param_map/param_map_buffer{B}_dp{d}tp{t}pp{p}vpp{v}.json   (``param_map``)
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from ckptmap import atomic
from ckptmap.errors import CkptmapError

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
PARAM_MAP_DIR = "param_map"
# what marks a --ckpt-format torch_dist iter folder (torch.distributed.checkpoint's metadata file)
DCP_METADATA = ".metadata"


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def mp_rank_dir_name(tp: int, pp: int, pp_size: int, ep: int | None = None) -> str:
    """Megatron's ``get_checkpoint_name``: ``_PPP`` with pipeline parallelism, ``_EEE`` (``ep`` not
    None) with expert parallelism."""
    name = f"mp_rank_{tp:02d}" if pp_size == 1 else f"mp_rank_{tp:02d}_{pp:03d}"
    return name if ep is None else f"{name}_{ep:03d}"


def _sizes_from_args(model_file: Path) -> tuple[int, int]:
    """(pipeline, expert) parallel sizes from the args pickled in a model_optim_rng.pt."""
    from ckptmap.formats.torch_zip_reader import read_objects

    if not model_file.is_file():
        raise CkptmapError(f"{model_file} is missing; it is needed to tell whether mp_rank_TT_XXX folders are "
                           f"pipeline stages or expert ranks")
    root = read_objects(model_file)
    args = root.get("args") if isinstance(root, dict) else None
    if args is None:
        raise CkptmapError(f"{model_file} has no args; cannot tell whether mp_rank_TT_XXX folders are pipeline "
                           f"stages or expert ranks")
    return (getattr(args, "pipeline_model_parallel_size", 1) or 1, getattr(args, "expert_model_parallel_size", 1) or 1)


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
    ranks: dict            # (tp, pp, ep) -> rank directory Path
    has_pp_suffix: bool
    save_root: Path | None  # the --save directory, when known
    has_ep_suffix: bool = False

    @property
    def tp_size(self) -> int:
        return 1 + max(k[0] for k in self.ranks)

    @property
    def pp_size(self) -> int:
        return 1 + max(k[1] for k in self.ranks)

    @property
    def ep_size(self) -> int:
        return 1 + max(k[2] for k in self.ranks)


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
    named = {}
    with os.scandir(iter_dir) as listing:   # the entries' types come with the listing: no stat per folder
        entries = sorted((e.name, e.is_dir()) for e in listing)
    for name, is_dir in entries:
        if not is_dir or not name.startswith("mp_rank_"):
            continue
        child = iter_dir / name
        parts = parse_mp_rank_dir_name(child.name)
        if parts is None:
            raise CkptmapError(f"{child}: unexpected directory name; Megatron writes mp_rank_TT, mp_rank_TT_PPP "
                               f"or, under expert parallelism, mp_rank_TT[_PPP]_EEE")
        named[child.name] = (parts, child)
    if not named:
        raise CkptmapError(f"no mp_rank_* directories in {iter_dir}; this is not a Megatron checkpoint "
                           f"iteration directory (expected mp_rank_TT or mp_rank_TT_PPP inside)")
    lengths = {len(parts) for parts, _ in named.values()}
    if len(lengths) > 1:
        raise CkptmapError(f"{iter_dir} mixes mp_rank directory names of different forms "
                           f"({', '.join(sorted(named)[:6])}); remove the stale ones")
    (n,) = lengths
    has_pp = has_ep = False
    if n == 3:
        has_pp = has_ep = True
    elif n == 2:
        # mp_rank_TT_XXX: a pipeline stage or an expert rank — only the run's args tell
        first = next(iter(named.values()))[1] / MODEL_FILE
        pp_size, ep_size = _sizes_from_args(first)
        if pp_size > 1 and ep_size > 1:
            raise CkptmapError(f"{first} says PP {pp_size} and EP {ep_size}, so Megatron names its folders "
                               f"mp_rank_TT_PPP_EEE, but {iter_dir} holds {sorted(named)[0]}")
        has_ep = ep_size > 1
        has_pp = not has_ep
    ranks = {}
    for parts, child in named.values():
        tp = parts[0]
        pp = parts[1] if has_pp else 0
        ep = parts[-1] if has_ep else 0
        ranks[(tp, pp, ep)] = child
    sizes = [1 + max(k[i] for k in ranks) for i in range(3)]
    missing = [(t, p, e) for t in range(sizes[0]) for p in range(sizes[1]) for e in range(sizes[2])
               if (t, p, e) not in ranks]
    if missing:
        t, p, e = missing[0]
        raise CkptmapError(f"{iter_dir} lacks the directory of tp rank {t}, pp rank {p}"
                           f"{f', ep rank {e}' if has_ep else ''} "
                           f"({mp_rank_dir_name(t, p, 2 if has_pp else 1, e if has_ep else None)}); the checkpoint "
                           f"is incomplete" + (" (a missing expert-parallel folder)" if has_ep else ""))
    if iteration is None:
        raise CkptmapError(f"{path}: cannot tell the iteration; pass an iter_NNNNNNN directory or the save "
                           f"root holding {TRACKER}")
    return CheckpointDir(iter_dir, iteration, ranks, has_pp, save_root, has_ep)


def write_tracker(save_root, iteration) -> None:
    atomic.write_text(Path(save_root) / TRACKER, str(iteration))


def may_hold_torch_dist(path) -> bool:
    """Necessary for a torch_dist source: a ``.metadata`` in the folder, or a tracker and a ``.metadata``
    one level down. Cheap (stats only), so legacy sources skip importing the torch_dist modules."""
    try:
        root = Path(path)
        return (root / DCP_METADATA).is_file() or ((root / TRACKER).is_file() and any(
            (c / DCP_METADATA).is_file() for c in root.iterdir()))
    except OSError:
        return False
