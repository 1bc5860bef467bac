"""A watchdog for chunk computations that stop using the CPU (a wedged XLA thread pool)."""

from __future__ import annotations

import os
import sys
import time


STALL_SECONDS = float(os.environ.get("MEANFIELD_STALL_SECONDS", "300"))


class StallWatch:
    """Warn (once per chunk) when a chunk's computation uses no CPU for `STALL_SECONDS`.

    XLA's CPU thread pool can deadlock (all threads parked, 0% CPU) when batched LAPACK calls wait on
    it from inside it: jaxlib's `eigvalsh` splits its batch over the pool and blocks a pool thread
    until the pieces are done (`gdb` on a hung Gaussian sweep; eigenvalues up to 4 x 4 now avoid
    LAPACK, `meanfield._symeig`). Seen too in a 1200-point Lyapunov sweep (batched QR). Finished
    chunks are on disk, so the remedy is to stop and rerun (the run resumes).
    """

    def __init__(self, label: str):
        import threading

        self.label = label
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        last_cpu, last_wall = time.process_time(), time.perf_counter()
        while not self._stop.wait(min(30.0, STALL_SECONDS / 4)):
            cpu, wall = time.process_time(), time.perf_counter()
            if cpu - last_cpu > 0.01 * (wall - last_wall):
                last_cpu, last_wall = cpu, wall
            elif wall - last_wall >= STALL_SECONDS:
                print(f"\nwarning: {self.label}: no CPU progress for {wall - last_wall:.0f} s; XLA's CPU thread pool "
                      "may be wedged. Finished chunks are saved: stop (Ctrl-C) and rerun the same command to resume; "
                      "XLA_FLAGS=--xla_cpu_multi_thread_eigen=false avoids this.", file=sys.stderr, flush=True)
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
