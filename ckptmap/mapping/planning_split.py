"""Planning a large checkpoint in several processes, each reading the ranks of some pipeline stages.

At thousands of ranks planning is reading: two small files a rank, ~0.5 ms of Python each, on one
core. The stages are independent up to a few facts (which rules matched, which Megatron bucket layout
fits every buffer), so the stages are split into contiguous parts: the command's process plans the
first, a forked process each of the others, which hands back its files' tasks (plain attrs data,
pickled: ranks of one structure share their tasks, so 8,192 ranks' tasks are ~4 MB) with those facts
and the zip directories it read (the writing workers reuse them). The plan is the one a single
process makes — the same files in the same order, its JSON byte for byte.

A planning process that fails hands back its error (a CkptmapError's text), which the command raises
as its own; one that dies (killed, out of memory) is reported with how it ended. The command's own
failure or Ctrl-C stops the others (SIGKILL; they write nothing), and they stop if it dies.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import signal
import traceback

from ckptmap import signals
from ckptmap.errors import CkptmapError

SPLIT_FROM_RANKS = 1024   # below this a plan takes under ~0.5 s: a fork and the hand-back would not pay
MAX_PROCESSES = 8
# The command's own part, in stages, against another's: a forked part also pickles what it hands back and
# the command unpickles it while the others wait (16,384 MoE ranks in 2 parts: pt2ms 0.6 + 0.4 s, ms2pt
# 2.0 + 1.4 s, against ~5.6 and ~12.6 s of planning a part)
OWN_SHARE = 1.2


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def stage_parts(pp_size: int, n_ranks: int, processes: int | None, limit: int | None = None) -> list[tuple[int, int]]:
    """Contiguous [first, end) ranges of pipeline stages, one per planning process, the first (the command's
    own) OWN_SHARE times the others'. ``processes``: None decides (one per available CPU, up to MAX_PROCESSES
    and ``limit``, from SPLIT_FROM_RANKS ranks on), a number asks for that many (never more than there are
    stages)."""
    if processes is None:
        cap = min(available_cpus(), MAX_PROCESSES, limit or MAX_PROCESSES)
        processes = max(1, cap) if n_ranks >= SPLIT_FROM_RANKS else 1
    if processes < 1:
        raise CkptmapError(f"--planning-processes {processes}: give 1 or more")
    n = max(1, min(processes, pp_size))
    total = OWN_SHARE + n - 1
    bounds = [0]
    for i in range(1, n):   # each part at least one stage, and enough left for the rest
        at = round(pp_size * (OWN_SHARE + i - 1) / total)
        bounds.append(min(max(at, bounds[-1] + 1), pp_size - (n - i)))
    bounds.append(pp_size)
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


def stages_text(part: tuple[int, int]) -> str:
    first, end = part
    return f"pipeline stage {first}" if end - first == 1 else f"pipeline stages {first}-{end - 1}"


def in_parts(parts: list, here, there=None) -> list:
    """``[here(None)]`` for one part (all stages); else ``here(parts[0])`` in this process while forked
    processes run ``there(part)`` (default ``here``) for the others, in parallel: the results in part order."""
    if len(parts) == 1:
        return [here(None)]
    there = there or here
    with contextlib.ExitStack() as forks:
        others = [forks.enter_context(Forked(functools.partial(there, part), stages_text(part))) for part in parts[1:]]
        mine = here(parts[0])
        return [mine] + [other.result() for other in others]


class Forked:
    """``work()`` run in a forked process; :meth:`result` is what it returned (picklable), or raises its
    error. Used as a context manager: leaving it without a result kills the process."""

    def __init__(self, work, what: str):
        self.what = what
        parent = os.getpid()
        read_end, write_end = os.pipe()
        with signals.held():   # a Ctrl-C landing during the fork is taken by worker_setup, not by after-fork code
            pid = os.fork()
        if pid == 0:   # pragma: no cover - the child; its outcome is checked by the parent's tests
            os.close(read_end)
            status = 0
            try:
                signals.worker_setup(parent)
                try:
                    payload = pickle.dumps(("done", work()), protocol=pickle.HIGHEST_PROTOCOL)
                except CkptmapError as e:
                    payload = pickle.dumps(("refused", str(e)))
                except KeyboardInterrupt:
                    payload, status = b"", 130
                except BaseException as e:   # a bug: its traceback goes to the command's error
                    payload = pickle.dumps(("failed", "".join(traceback.format_exception(e)).rstrip()))
                with os.fdopen(write_end, "wb") as out:
                    out.write(payload)
            except BaseException:
                status = status or 1
            finally:
                os._exit(status)   # no atexit handlers, no flush of buffers copied from the parent
        os.close(write_end)
        self.pid, self.fd = pid, read_end

    def result(self):
        with os.fdopen(self.fd, "rb") as f:
            self.fd = None
            data = f.read()
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if not data:
            ended = (f"was killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
                     else f"exited with status {os.WEXITSTATUS(status)}")
            raise CkptmapError(f"the process planning {self.what} {ended} without handing back its part of the "
                               f"plan (out of memory? killed?); run again, or plan in one process with "
                               f"--planning-processes 1")
        kind, value = pickle.loads(data)
        if kind == "done":
            return value
        if kind == "refused":
            raise CkptmapError(value)
        raise CkptmapError(f"internal error in the process planning {self.what}:\n{value}\nplease report it; "
                           f"--planning-processes 1 plans in one process")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.pid = None
        return False
