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
import shutil
import socket
import stat
import threading
from pathlib import Path

TMP_MARK = ".ckptmap-tmp-"
_counter = itertools.count()
_HOST = socket.gethostname().replace("-", "_") or "host"


def current_umask() -> int:
    """The process's umask now (a training script may change it after importing ckptmap), read from
    /proc/self/status without touching it; only without /proc is it read by setting it and back
    (which, for that instant, applies umask 0 to files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


_run = threading.local()


@contextlib.contextmanager
def umask_of_run():
    """Within the block, in this thread, :func:`file_mode` uses the umask in effect when the block
    began: a run writing thousands of files reads /proc/self/status once, not per file (~0.15 ms a
    read in a process with many mappings)."""
    previous = getattr(_run, "umask", None)
    _run.umask = current_umask()
    try:
        yield
    finally:
        _run.umask = previous


def file_mode() -> int:
    """What open() gives a new plain file: 0666 minus the umask (0644 under the usual 022)."""
    mask = getattr(_run, "umask", None)
    return 0o666 & ~(current_umask() if mask is None else mask)


def temp_name(final):
    """The temporary name beside ``final`` (a str for a str: thousands of small files are named without
    pathlib's parsing, ~30 us a file)."""
    if isinstance(final, str):
        head, name = os.path.split(final)
        return os.path.join(head, f".{name}{TMP_MARK}{_HOST}-{os.getpid()}-{next(_counter)}")
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
    permissions a plain new file gets under the umask in effect now), optionally fsync, and rename it to ``final``. On any
    exception (KeyboardInterrupt and SystemExit included) the temporary file is removed and
    ``final`` is left as it was. The caller writes the temporary path however it likes: a str for a str
    ``final``, else a Path."""
    final = final if isinstance(final, str) else Path(final)
    tmp = temp_name(final)
    try:
        yield tmp
        try:
            os.chmod(tmp, file_mode() if mode is None else mode)
        except FileNotFoundError:
            raise FileNotFoundError(f"internal error: nothing was written to {tmp} for {final}") from None
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
        if fsync:
            fsync_directory(os.path.dirname(final) or ".")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(final, data: bytes, *, fsync: bool = False) -> None:
    with atomic_output(final, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(final, text: str, *, fsync: bool = False) -> None:
    write_bytes(final, text.encode("utf-8"), fsync=fsync)


def is_temp(name: str) -> bool:
    return TMP_MARK in name


def temp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process that made the ckptmap temporary file ``name``; None if it is not one."""
    if not is_temp(name):
        return None
    tail = name.rpartition(TMP_MARK)[2]
    parts = tail.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1])



def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie nobody reaped has finished)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True



def temp_state(name: str) -> str | None:
    """For a ckptmap temporary file: ``"stale"`` (its process, on this host, is gone), ``"live"``
    (it runs on this host), ``"other-host"`` (made on another machine: nobody here can tell).
    None if ``name`` is not a ckptmap temporary file."""
    owner = temp_owner(name)
    if owner is None:
        return None
    if owner[0] != _HOST:
        return "other-host"
    return "live" if pid_alive(owner[1]) else "stale"


def remove_stale_temps(root, *, recursive: bool = True) -> list[Path]:
    """Remove ckptmap temporary files under ``root`` (only in ``root`` itself unless ``recursive``)
    left by processes of this host that no longer run (a killed run); returns what was removed.
    Files of live processes, of other hosts (a shared folder written by several machines) and
    anything not named like ckptmap's temporaries stay. Symbolic links are not followed."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    walk = os.walk(root) if recursive else [(str(root), [], [e.name for e in os.scandir(root)])]
    for dirpath, dirnames, filenames in walk:
        for name in filenames + dirnames:
            if temp_state(name) != "stale":
                continue
            path = Path(dirpath) / name
            try:
                if stat.S_ISDIR(path.lstat().st_mode):
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed
