"""Several machines running one plan into one shared output folder (``--world-size N --rank R``).

Everything goes through files in ``<output>/.ckptmap-run/`` (the folder is shared anyway; no
network rendezvous is needed):

``rank0.json``       rank 0's marker: plan digest, world size, a fresh ``nonce`` per run, its
                     ``state`` (checking → writing; or refused / failed with a ``message``) and a
                     ``beat`` counter it rewrites every second while it runs.
``alive-rankR.json`` rank R's heartbeat (the nonce it joined, a counter).
``rankR.json``       rank R's report: its file results, or that it was interrupted.

Rank 0 alone checks the output folder (``ckptmap.target``), before any rank writes: it removes
the coordination folder of an earlier run, writes its marker in state ``checking``, checks (and with
``--overwrite`` cleans) the target, then switches to ``writing``. A rank R > 0 writes nothing until
it has *seen rank 0's marker change* (a marker that does not change is a dead run's leftover) in
state ``writing`` for the same plan and world size — so it never checks the folder itself and never
refuses files rank 0's run has already written; if rank 0 refuses, ranks R see it within seconds
and stop. Nobody waits forever: a rank R gives up when rank 0's marker has not changed for
``wait_timeout`` seconds; rank 0, after its own part, gives up on a rank whose report is missing and
whose heartbeat has not changed for ``wait_timeout`` seconds (counting from when rank 0 started
writing for a rank never seen), writes a manifest with ``"complete": false`` and names the ranks.

Liveness is judged only by a value *changing while watched*, never by comparing clocks or
modification times of different machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

from ckptmap import atomic
from ckptmap.errors import CkptmapError

RUN_DIR = ".ckptmap-run"   # rank 0 owns it; here, not in target.py, so that the CLI's flags need no attrs

BEAT = 1.0          # seconds between heartbeats
POLL = 0.2
DEFAULT_WAIT_TIMEOUT = 600.0


def plan_digest(plan) -> str:
    class _Hasher:
        def __init__(self):
            self.h = hashlib.sha256()

        def write(self, text):
            self.h.update(text.encode("utf-8"))
    sink = _Hasher()
    plan.write_json(sink)   # streamed into the hash: no whole-plan string
    return sink.h.hexdigest()[:16]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class _Beat:
    """Rewrites ``path`` with ``fields`` + an increasing ``beat`` every BEAT seconds, in a thread."""

    def __init__(self, path: Path, **fields):
        self.path = path
        self.fields = dict(fields, beat=0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._run, name="ckptmap-heartbeat", daemon=True)
        self._thread.start()

    def _write(self):
        with self._lock:
            self.fields["beat"] += 1
            text = json.dumps(self.fields)
        try:
            atomic.write_text(self.path, text)
        except OSError:
            pass   # the folder was removed (the run is over) or the disk is full: nothing to tell

    def _run(self):
        while not self._stop.wait(BEAT):
            self._write()

    def set(self, **fields):
        with self._lock:
            self.fields.update(fields)
        self._write()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)


class Rank0:
    def __init__(self, root: Path, plan, world_size: int):
        self.root, self.world_size = root, world_size
        self.dir = root / RUN_DIR
        import uuid   # imports platform (a dozen regexes): only multi-machine runs need it

        self.nonce = uuid.uuid4().hex
        self.digest = plan_digest(plan)
        self.beat = None
        self.writing_since = None

    def start(self, notify) -> None:
        """Clear an earlier run's coordination folder and announce this run (state ``checking``)."""
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            notify(f"removed {self.dir}: the coordination folder of an earlier run that did not finish")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.beat = _Beat(self.dir / "rank0.json", nonce=self.nonce, plan=self.digest, world_size=self.world_size,
                          state="checking", message="")

    def writing(self) -> None:
        self.writing_since = time.monotonic()
        self.beat.set(state="writing")

    def refused(self, message: str) -> None:
        """Tell waiting ranks that rank 0 refused (they see it within a few beats), then stop."""
        self.beat.set(state="refused", message=message)
        time.sleep(3 * BEAT + POLL)
        self.beat.stop()

    def close(self, remove: bool = True) -> None:
        if self.beat is not None:
            self.beat.stop()
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def gather(self, wait_timeout: float) -> tuple[dict, list[int], dict]:
        """{rank: report} of every rank > 0 that reported; the ranks given up on; and why."""
        reports: dict[int, dict] = {}
        seen: dict[int, object] = {}
        changed: dict[int, float] = {}
        start = self.writing_since or time.monotonic()
        pending = set(range(1, self.world_size))
        while pending:
            now = time.monotonic()
            for r in sorted(pending):
                report = _read(self.dir / f"rank{r}.json")
                if report is not None and report.get("nonce") == self.nonce:
                    reports[r] = report
                    pending.discard(r)
                    continue
                alive = _read(self.dir / f"alive-rank{r}.json")
                key = (alive.get("beat"), alive.get("nonce")) if alive and alive.get("nonce") == self.nonce else None
                if r not in seen or key != seen[r]:
                    if key is not None or r not in changed:
                        changed[r] = now if key is not None else start
                    seen[r] = key
            late = {r: now - changed[r] for r in pending if now - changed[r] > wait_timeout}
            if late:
                why = {r: ("never started (no heartbeat)" if seen.get(r) is None else
                           f"stopped: no heartbeat for {late[r]:.0f} s") for r in late}
                return reports, sorted(late), why
            if pending:
                time.sleep(POLL)
        return reports, [], {}


class RankN:
    def __init__(self, root: Path, plan, world_size: int, rank: int):
        self.root, self.world_size, self.rank = root, world_size, rank
        self.dir = root / RUN_DIR
        self.digest = plan_digest(plan)
        self.nonce = None
        self.beat = None

    def wait_for_rank0(self, wait_timeout: float) -> None:
        """Block until a live rank 0 of this plan has checked the output folder and is writing."""
        marker = self.dir / "rank0.json"
        first = _read(marker)
        last_key = None if first is None else (first.get("nonce"), first.get("beat"))
        last_change = time.monotonic()
        live = False
        while True:
            m = _read(marker)
            key = None if m is None else (m.get("nonce"), m.get("beat"))
            now = time.monotonic()
            if key != last_key:
                live = key is not None
                last_key, last_change = key, now
            if live and m is not None:
                if m.get("plan") != self.digest or m.get("world_size") != self.world_size:
                    raise CkptmapError(
                        f"rank 0 is writing another plan into {self.root} (plan {m.get('plan')}, world size "
                        f"{m.get('world_size')}; this rank: plan {self.digest}, world size {self.world_size}); "
                        f"run the same command, with the same paths, on every rank")
                state = m.get("state")
                if state == "writing":
                    self.nonce = m["nonce"]
                    return
                if state == "refused":
                    raise CkptmapError(f"rank 0 refused the run, so rank {self.rank} writes nothing: "
                                       f"{m.get('message', '')}")
                if state == "failed":
                    raise CkptmapError(f"rank 0 stopped before writing: {m.get('message', '')}")
            if now - last_change > wait_timeout:
                last = (f" (the marker there is an earlier run's, state {m.get('state')}"
                        f"{': ' + m['message'] if m.get('message') else ''})" if m is not None else "")
                raise CkptmapError(
                    f"rank {self.rank} waited {wait_timeout:g} s (--wait-timeout) for rank 0 to check {self.root} and "
                    f"start writing, but saw no live rank 0{last}; rank 0 checks the output folder before any rank "
                    f"writes — start rank 0 with the same command (every rank, same --world-size {self.world_size})")
            time.sleep(POLL)

    def start_beating(self) -> None:
        self.beat = _Beat(self.dir / f"alive-rank{self.rank}.json", nonce=self.nonce)

    def report(self, results: list[dict], interrupted: str | None = None) -> bool:
        """Leave this rank's report for rank 0; False if rank 0's run is gone (nobody would read it)."""
        if self.beat is not None:
            self.beat.stop()
        m = _read(self.dir / "rank0.json")
        if m is None or m.get("nonce") != self.nonce:
            return False
        atomic.write_text(self.dir / f"rank{self.rank}.json",
                          json.dumps({"nonce": self.nonce, "results": results, "interrupted": interrupted}))
        return True

    def close(self) -> None:
        if self.beat is not None:
            self.beat.stop()
        path = self.dir / f"alive-rank{self.rank}.json"
        if path.exists():
            try:
                os.unlink(path)
            except OSError:
                pass
