"""Signals: SIGTERM (what schedulers send first) behaves like Ctrl-C, and workers die with their parent.

In the main process (``interruptible()``, installed by the command line) SIGINT and SIGTERM raise
:class:`Interrupted` — a ``KeyboardInterrupt`` — in the main thread: every ``atomic_output`` block
being written removes its temporary file on the way out, the executor stops its workers (which do
the same) and removes what a hard-killed worker left, and the command exits with 128 + the signal
number (130 for SIGINT, 143 for SIGTERM). Further SIGINT/SIGTERM during that clean-up are ignored
(it is bounded: workers get 10 s before SIGKILL). SIGKILL cannot be handled: the temporary files it
leaves are removed by the next run into the folder (``atomic.remove_stale_temps``).

Worker processes (``worker_setup``) handle SIGINT/SIGTERM the same way, then exit; on Linux they ask
the kernel for SIGTERM when their parent dies (``prctl(PR_SET_PDEATHSIG)``), and while idle they
also check ``os.getppid()``, so a SIGKILLed main process leaves no workers behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; unwinding removes unfinished files."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _ignore(signum, frame):
    pass


def _raise(signum, frame):
    # The clean-up that follows is short; do not interrupt it. (A Python no-op rather than SIG_IGN: a
    # second signal already pending would otherwise be reported as "ignored due to race condition".)
    for s in HANDLED:
        signal.signal(s, _ignore)
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible():
    """While inside, SIGINT and SIGTERM raise :class:`Interrupted` (once). Outside the main thread
    (signals cannot be handled there) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    for s in HANDLED:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Linux: have the kernel send ``signum`` to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def held():
    """SIGINT/SIGTERM wait while inside (delivered on the way out). Around a worker's fork: a Ctrl-C
    to the process group landing in the child before it reached :func:`worker_setup` would raise
    inside Python's after-fork code, which prints an "Exception ignored" traceback."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def worker_setup(parent_pid: int) -> None:
    """First thing in a forked worker (started under :func:`held`): SIGINT/SIGTERM raise
    Interrupted -- one that arrived during the fork right here --, the parent's death sends SIGTERM;
    if the parent died before that was set up, stop at once."""
    for s in HANDLED:
        signal.signal(s, _raise)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:
        raise Interrupted(signal.SIGTERM)
