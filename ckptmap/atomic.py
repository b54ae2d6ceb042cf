"""The one way ckptmap puts a file in place: written under a temporary name beside it, renamed when
complete. A final name therefore never holds a partial file; ``fsync`` adds durability against power
loss (the file, then its directory) at the cost of waiting for the disk.

Temporary names are ``.<name>.ckptmap-tmp-<host>-<pid>-<n>``: hidden, recognisable as ckptmap's own,
and telling which process made them, so a later run can remove the leftovers of dead runs
(:func:`remove_stale_temps`) without touching a live run's files or anybody else's.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import stat
from pathlib import Path

TMP_MARK = ".ckptmap-tmp-"
_counter = itertools.count()
_HOST = socket.gethostname().replace("-", "_") or "host"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()   # what open() would give a new file: 0644 under the usual umask 022


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{_HOST}-{os.getpid()}-{next(_counter)}")


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(final, *, fsync: bool = False, mode: int | None = None):
    """Yield a temporary path beside ``final``; when the block completes, set ``mode`` (default: the
    permissions a plain new file gets), optionally fsync, and rename it to ``final``. On any
    exception (KeyboardInterrupt and SystemExit included) the temporary file is removed and
    ``final`` is left as it was. The caller writes the temporary path however it likes."""
    final = Path(final)
    tmp = temp_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"internal error: nothing was written to {tmp} for {final}")
        os.chmod(tmp, FILE_MODE if mode is None else mode)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
        if fsync:
            fsync_directory(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(final, data: bytes, *, fsync: bool = False) -> None:
    with atomic_output(final, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(final, text: str, *, fsync: bool = False) -> None:
    write_bytes(final, text.encode("utf-8"), fsync=fsync)


def is_temp(name: str) -> bool:
    return TMP_MARK in name


def _owner(name: str) -> tuple[str, int] | None:
    tail = name.rpartition(TMP_MARK)[2]
    parts = tail.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(root) -> list[Path]:
    """Remove ckptmap temporary files under ``root`` left by processes of this host that no longer
    run (a killed run); returns what was removed. Files of live processes, of other hosts (a shared
    folder written by several machines) and anything not named like ckptmap's temporaries stay."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            if not is_temp(name):
                continue
            owner = _owner(name)
            if owner is None or owner[0] != _HOST or _alive(owner[1]):
                continue
            path = Path(dirpath) / name
            try:
                if stat.S_ISDIR(path.lstat().st_mode):
                    import shutil
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed
