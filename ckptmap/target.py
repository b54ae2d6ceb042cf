"""The output folder of a run: what is already there, checked before the first byte is written.

ckptmap never overwrites silently. A plan's output root is one of two kinds:

* **its own** (pt2ms, ms2pt, apply, combine into a separate folder): anything already in it — a
  file the plan writes or anything else — makes the run refuse, unless ``--overwrite``, which
  replaces the plan's files and removes everything else in the root (listed), so that the folder
  ends up holding exactly the new conversion. A root that holds one of the plan's own sources is
  refused even with ``--overwrite``.
* **shared** (``Plan.output_shared``: combine writing its merged files into the rank folders of
  the shards it reads, ``--output-dir`` = ``--checkpoint-dir``, the reference's default): only the
  plan's own paths count. An existing file at one of them is refused unless ``--overwrite``, which
  replaces exactly those files; nothing else in the folder is looked at or removed.

Either way ckptmap's own leftovers never count: temporary files of dead runs on this host are
removed first (``atomic.remove_stale_temps``), temporary files made on other hosts are left to
them, and a ckptmap temporary file of a process that still runs on this host means another run is
writing here now, which is refused. A ``text`` file already holding exactly the plan's text (a
tracker naming the same iteration) is not a change.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import attrs

from ckptmap import atomic
from ckptmap.coordinate import RUN_DIR   # multi-machine coordination; rank 0 owns it
from ckptmap.errors import CkptmapError
from ckptmap.mapping.plan import INPUT_PREFIX

OWN_LEFTOVERS = (RUN_DIR, ".ckptmap-done")
LISTED = 8


@attrs.frozen
class Target:
    root: Path
    shared: bool
    exists: bool
    is_dir: bool
    replaced: tuple[str, ...] = ()        # the plan's paths that hold a file now
    unchanged: tuple[str, ...] = ()       # text files already holding the plan's text
    foreign: tuple[str, ...] = ()         # not written by the plan ("dir/" for a directory); own roots only
    foreign_files: int = 0                # files inside ``foreign``
    busy: tuple[str, ...] = ()            # "path (pid N)": temporary files of live ckptmap processes here
    sources_inside: tuple[str, ...] = ()  # the plan's sources under an own root
    blocked: tuple[str, ...] = ()         # the plan's paths that are directories (shared roots)

    @property
    def empty(self) -> bool:
        return not self.replaced and not self.foreign

    @property
    def impossible(self) -> bool:
        """Refused even with --overwrite."""
        return bool(self.busy or self.sources_inside or self.blocked) or (self.exists and not self.is_dir)


def _plan_sources(plan) -> set[str]:
    files = set()
    seen: set = set()   # ranks of one structure share their tensors (storages) tuple (FileTask.inputs)
    for f in plan.files:
        if id(f.tensors) not in seen:   # the plan holds the tuples: their ids stay theirs
            seen.add(id(f.tensors))
            files.update(s.file for t in f.tensors for s in t.sources)
        files.update(f.inputs.values())
        if id(f.storages) not in seen:
            seen.add(id(f.storages))
            for st in f.storages:
                for p in st.pieces:
                    if p.tensor is not None:
                        files.update(s.file for s in p.tensor.sources)
                    if p.padding is not None:
                        files.add(p.padding.file)
        if not f.source_is_output:
            files.add(f.source)
        files.add(f.aux_source)
    return {os.path.realpath(x) for x in files if x and not x.startswith(INPUT_PREFIX)}


def _count_files(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return 1
    return sum(len(files) for _, _, files in os.walk(path))


def _text_unchanged(path: Path, task) -> bool:
    if task.format != "text" or task.text is None:
        return False
    try:
        return path.stat().st_size < 1 << 20 and path.read_bytes() == task.text.encode("utf-8")
    except OSError:
        return False


def _busy(directory: Path, names) -> list[str]:
    out = []
    for name in names:
        if atomic.temp_state(name) == "live":
            out.append(f"{directory / name} (pid {atomic.temp_owner(name)[1]})")
    return out


def inspect(plan, extra_paths=()) -> Target:
    """What the output root of ``plan`` holds, against what the plan writes (``extra_paths``: other
    files the run writes, e.g. the manifest of a multi-machine run). Reads, never writes."""
    root = Path(plan.output_root)
    shared = bool(getattr(plan, "output_shared", False))
    if not os.path.lexists(root):
        return Target(root, shared, False, False)
    if not root.is_dir():
        return Target(root, shared, True, False)
    tasks = {Path(f.path).as_posix(): f for f in plan.files}
    paths = set(tasks) | {Path(p).as_posix() for p in extra_paths}
    replaced, unchanged, foreign, busy, blocked = [], [], [], [], []
    foreign_files = 0
    if shared:
        dirs = set()
        for rel in sorted(paths):
            full = root / rel
            dirs.add(full.parent)
            if full.is_dir() and not full.is_symlink():
                blocked.append(rel)
            elif os.path.lexists(full):
                (unchanged if rel in tasks and _text_unchanged(full, tasks[rel]) else replaced).append(rel)
        for d in sorted(dirs):
            if d.is_dir():
                busy += _busy(d, os.listdir(d))
        sources_inside = ()
    else:
        ancestors = {p.as_posix() for rel in paths for p in Path(rel).parents if p.as_posix() != "."}

        def walk(rel_dir: str):
            nonlocal foreign_files
            directory = root / rel_dir if rel_dir else root
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
            busy.extend(_busy(directory, [e.name for e in entries]))
            for e in entries:
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                if atomic.is_temp(e.name) or (not rel_dir and e.name in OWN_LEFTOVERS):
                    continue
                is_dir = e.is_dir(follow_symlinks=False)
                if is_dir and rel in ancestors:
                    walk(rel)
                elif not is_dir and rel in paths:
                    (unchanged if rel in tasks and _text_unchanged(Path(e.path), tasks[rel]) else replaced).append(rel)
                else:
                    foreign.append(rel + "/" if is_dir else rel)
                    foreign_files += _count_files(Path(e.path)) if is_dir else 1

        walk("")
        real_root = os.path.realpath(root)
        sources_inside = tuple(sorted(s for s in _plan_sources(plan)
                                      if s == real_root or s.startswith(real_root.rstrip(os.sep) + os.sep)))
    return Target(root, shared, True, True, tuple(replaced), tuple(unchanged), tuple(foreign), foreign_files,
                  tuple(busy), tuple(sources_inside), tuple(blocked))


def _listing(items, limit=LISTED) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def _foreign_text(t: Target) -> str:
    return (f"{len(t.foreign)} entr{'y' if len(t.foreign) == 1 else 'ies'} this run does not write "
            f"({t.foreign_files} file{'s' * (t.foreign_files != 1)}): {_listing(t.foreign)}")


def _impossible_reason(t: Target) -> str:
    if t.exists and not t.is_dir:
        return f"output {t.root} is a file, not a folder; choose a folder (new or empty)"
    if t.busy:
        return (f"another ckptmap process may be writing into {t.root} right now: temporary files of processes "
                f"that still run on this host ({_listing(t.busy, 4)}); wait for it to finish or stop it — two runs "
                f"into one folder would mix their files (if that pid is no ckptmap process, the number was reused: "
                f"delete the file)")
    if t.sources_inside:
        return (f"output folder {t.root} holds source files of this conversion ({_listing(t.sources_inside, 3)}); "
                f"ckptmap never writes over or removes what it reads — choose a separate output folder")
    return (f"output folder {t.root}: {_listing(t.blocked, 4)} {'is a directory' if len(t.blocked) == 1 else 'are directories'} "
            f"where this plan writes a file; --overwrite replaces only files in a folder shared with other data — "
            f"move {'it' if len(t.blocked) == 1 else 'them'} away or choose another --output-dir")


def refusal(t: Target) -> str:
    """The error for a run without --overwrite into a non-empty target."""
    held = []
    if t.replaced:
        held.append(f"{len(t.replaced)} file{'s' * (len(t.replaced) != 1)} this run writes "
                    f"({_listing(t.replaced)})")
    if t.foreign:
        held.append(_foreign_text(t))
    if t.shared:
        todo = ("pass --overwrite to replace exactly those files (nothing else in the folder is touched: it also "
                "holds other data, e.g. the shards being merged), or write elsewhere")
    else:
        todo = ("choose a new or empty folder, or pass --overwrite to replace those files and remove everything "
                "else in it, so that it holds exactly this conversion")
    return (f"output folder {t.root} is not empty: it holds {' and '.join(held)}; ckptmap never overwrites "
            f"silently — {todo}")


def describe(t: Target) -> list[str]:
    """Lines for a dry run: does the target exist, and what would --overwrite replace / remove."""
    kind = " (shared with other data: only this plan's files count)" if t.shared else ""
    if not t.exists:
        return [f"output {t.root}{kind}: does not exist; it will be created"]
    if t.impossible:
        return [f"output {t.root}{kind}: refused even with --overwrite: {_impossible_reason(t)}"]
    lines = []
    if t.empty:
        lines.append(f"output {t.root}{kind}: exists, holds nothing this run would replace")
    else:
        lines.append(f"output {t.root}{kind}: not empty — the run is refused unless --overwrite is given")
        if t.replaced:
            lines.append(f"  --overwrite would replace {len(t.replaced)} file{'s' * (len(t.replaced) != 1)}: "
                         f"{_listing(t.replaced)}")
        if t.shared:
            lines.append("  --overwrite would remove nothing else: the folder also holds data this plan does not own")
        elif t.foreign:
            lines.append(f"  --overwrite would remove {len(t.foreign)} entr{'y' if len(t.foreign) == 1 else 'ies'} "
                         f"this plan does not write ({t.foreign_files} file{'s' * (t.foreign_files != 1)}):")
            lines.extend(f"    {name}" for name in t.foreign)
    if t.unchanged:
        lines.append(f"  already as this plan writes them: {_listing(t.unchanged)}")
    return lines


def prepare(plan, overwrite: bool, notify, extra_paths=()) -> Target:
    """Run before anything is written: refuse (CkptmapError) a target that holds anything this run
    would replace — or, for an own root, anything at all — unless ``overwrite``; with it, remove
    what the plan does not write from an own root, telling ``notify`` every entry removed."""
    t = inspect(plan, extra_paths)
    if t.impossible:
        raise CkptmapError(_impossible_reason(t))
    if t.empty:
        return t
    if not overwrite:
        raise CkptmapError(refusal(t))
    if t.replaced:
        notify(f"--overwrite: replacing {len(t.replaced)} existing file{'s' * (len(t.replaced) != 1)} in {t.root}")
    if t.foreign:
        notify(f"--overwrite: removing {_foreign_text(t).split(':')[0]} from {t.root}:")
        for name in t.foreign:
            path = t.root / name.rstrip("/")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            notify(f"  removed {name}")
    return t
