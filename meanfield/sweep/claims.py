"""Claim files: how processes that share one run directory split its chunks without talking.

A process that wants to compute a chunk creates `RUN_DIR/claims/NAME.claim.0` with `O_CREAT | O_EXCL`
(atomic on POSIX file systems, NFS v3+ included): exactly one process succeeds. While it computes, a
heartbeat thread touches every claim it holds; a claim whose owner is gone is *stale* and may be taken
over:

- the owner ran on this host and its pid no longer exists (immediately), or
- the claim has not been touched for `timeout` seconds (`MEANFIELD_CLAIM_TIMEOUT`, default 60 s;
  owners touch every `timeout / 6`).

A take-over creates the claim's next generation (`NAME.claim.1`, ...) with the same O_EXCL, so of
several processes that find a claim stale at once exactly one wins. A SIGKILLed, preempted or
vanished process never makes another wait forever: its chunks are recomputed by whoever finds them
stale, in this launch or the next. Claims are kept after the chunk is
written (a finished chunk is known by its chunk file, not its claim) and removed with the run's merge.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

HOST = socket.gethostname()


def claim_timeout() -> float:
    return float(os.environ.get("MEANFIELD_CLAIM_TIMEOUT", "60"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Claims:
    """The claims one process holds in `directory`, kept fresh by a heartbeat thread."""

    def __init__(self, directory: Path, owner: dict | None = None, timeout: float | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timeout = claim_timeout() if timeout is None else timeout
        self.owner = {"host": HOST, "pid": os.getpid(), **(owner or {})}
        self.held: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _generation(self, name: str) -> int | None:
        """The newest generation of claim `name` (a take-over creates the next one), None if unclaimed."""
        gens = [int(p.suffix[1:]) for p in self.dir.glob(f"{name}.claim.*") if p.suffix[1:].isdigit()]
        return max(gens) if gens else None

    def path(self, name: str, generation: int = 0) -> Path:
        return self.dir / f"{name}.claim.{generation}"

    def take(self, name: str) -> bool:
        """Claim `name` if nobody holds it, or take it over if its holder is gone (stale): the claim's
        next generation is created with O_EXCL, so of several processes that find it stale at once,
        exactly one wins. True if it is now ours."""
        g = self._generation(name)
        if g is None:
            return self._create(self.path(name, 0))
        if not self._stale_file(self.path(name, g)):
            return False
        return self._create(self.path(name, g + 1))

    def _create(self, p: Path) -> bool:
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.owner, "time": time.time()}, f)
        with self._lock:
            self.held.add(p)
        return True

    def exists(self, name: str) -> bool:
        return self._generation(name) is not None

    def stale(self, name: str) -> bool:
        """Whether claim `name` exists and its (newest) owner is gone."""
        g = self._generation(name)
        return g is not None and self._stale_file(self.path(name, g))

    def _stale_file(self, p: Path) -> bool:
        try:
            age = time.time() - p.stat().st_mtime
        except FileNotFoundError:
            return False
        try:
            info = json.loads(p.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError):  # a claim interrupted while being written, or damaged: by its age
            return age > self.timeout
        if info.get("host") == HOST and isinstance(info.get("pid"), int) and info["pid"] != os.getpid():
            if not pid_alive(info["pid"]):
                return True
        return age > self.timeout

    def _beat(self):
        while not self._stop.wait(max(0.5, self.timeout / 6)):
            with self._lock:
                held = list(self.held)
            for p in held:
                try:
                    os.utime(p)
                except OSError:  # taken over (we were presumed dead) or removed by the merge
                    with self._lock:
                        self.held.discard(p)

    def close(self):
        self._stop.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
