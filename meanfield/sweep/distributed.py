"""Starting `jax.distributed` for `meanfield run --distributed`, and leaving it without a hang.

    meanfield run FILE --distributed                                   # SLURM, Open MPI, TPU pod: detected
    meanfield run FILE --distributed --coordinator HOST:PORT --num-processes N --process-id I

or the environment variables MEANFIELD_COORDINATOR, MEANFIELD_NUM_PROCESSES, MEANFIELD_PROCESS_ID
(and MEANFIELD_INIT_TIMEOUT, default 120 s) for batch scripts; flags win over the environment. On CPU
the collectives are gloo's (`jax_cpu_collectives_implementation`), so processes on one machine or
several work without an accelerator.

What JAX's coordination service does with failures, measured on jax 0.10 (and why this module is
shaped the way it is):

- a coordinator that does not answer makes `initialize` abort the process (a C++ fatal error, no
  Python exception) when `initialization_timeout` ends; a watchdog here prints one line naming the
  coordinator and exits with status 2 a little before that;
- with the default heartbeat timeout, a dead peer makes every other process abort; meanfield's work
  sharing needs no collective after the start (`claims.py`), so the heartbeat is set to a day and the
  survivors finish the dead process's chunks;
- the `shutdown` barrier at exit aborts when a peer is dead, and process 0 hosts the service: other
  processes leave with `os._exit` once every point is done, process 0 (the merger) last.
"""

from __future__ import annotations

import os
import sys
import threading
import time

ENV = {"coordinator": "MEANFIELD_COORDINATOR", "num_processes": "MEANFIELD_NUM_PROCESSES",
       "process_id": "MEANFIELD_PROCESS_ID", "timeout": "MEANFIELD_INIT_TIMEOUT"}
DEFAULT_TIMEOUT = 120
HEARTBEAT_SECONDS = 86_400  # a day: peers' deaths are handled by stale claims, not by aborting everyone


class DistributedError(Exception):
    """A bad `--distributed` setting or an unreachable cluster: one line for the user."""


def settings(coordinator=None, num_processes=None, process_id=None, timeout=None) -> dict:
    """The flags, completed from the environment and checked. Explicit mode needs all three of
    coordinator, num_processes, process_id; none of them means auto-detection."""
    vals = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id, "timeout": timeout}
    for key, var in ENV.items():
        if vals[key] is None and os.environ.get(var, "").strip():
            vals[key] = os.environ[var].strip()
    for key in ("num_processes", "process_id", "timeout"):
        if vals[key] is not None:
            try:
                vals[key] = int(vals[key])
            except (TypeError, ValueError):
                raise DistributedError(f"--{key.replace('_', '-')} (or {ENV[key]}): not an integer: {vals[key]!r}") from None
    vals["timeout"] = DEFAULT_TIMEOUT if vals["timeout"] is None else vals["timeout"]
    if vals["timeout"] < 1:
        raise DistributedError(f"--init-timeout (or {ENV['timeout']}): must be >= 1 s; got {vals['timeout']}")
    given = [k for k in ("coordinator", "num_processes", "process_id") if vals[k] is not None]
    if given and len(given) < 3:
        missing = [f"--{k.replace('_', '-')}" for k in ("coordinator", "num_processes", "process_id") if k not in given]
        raise DistributedError(f"--distributed: {', '.join(missing)} missing (an explicit start needs --coordinator "
                               "HOST:PORT, --num-processes N and --process-id I; none of them auto-detects the cluster)")
    if given:
        host, _, port = str(vals["coordinator"]).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedError(f"--coordinator: expected HOST:PORT; got {vals['coordinator']!r}")
        if vals["num_processes"] < 1:
            raise DistributedError(f"--num-processes: must be >= 1; got {vals['num_processes']}")
        if not 0 <= vals["process_id"] < vals["num_processes"]:
            raise DistributedError(f"--process-id: must be in [0, {vals['num_processes']}); got {vals['process_id']}")
    return vals


def start(coordinator=None, num_processes=None, process_id=None, timeout=None) -> None:
    """`jax.distributed.initialize` with gloo CPU collectives, a bounded wait and no abort-on-peer-death.
    Raises DistributedError; a coordinator that never answers ends the process with status 2."""
    import jax

    s = settings(coordinator, num_processes, process_id, timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = (f"the coordinator {s['coordinator']} (process {s['process_id']} of {s['num_processes']})"
             if s["coordinator"] else "the auto-detected cluster's coordinator")
    done = threading.Event()

    def watchdog():  # JAX aborts (SIGABRT, a C++ stack) when its own timeout ends; say it in one line first
        if not done.wait(s["timeout"]):
            print(f"error: --distributed: no answer from {where} within {s['timeout']} s; check the address, "
                  "that process 0 runs, and --num-processes", file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    kwargs = dict(initialization_timeout=s["timeout"] + 30, heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
                  shutdown_timeout_seconds=30)
    try:
        if s["coordinator"]:
            jax.distributed.initialize(s["coordinator"], s["num_processes"], s["process_id"], **kwargs)
        else:
            jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        hint = ("" if s["coordinator"] else "; no cluster was detected (SLURM, Open MPI, TPU pod): pass --coordinator "
                "HOST:PORT --num-processes N --process-id I")
        raise DistributedError(f"--distributed: cannot start ({detail}){hint}") from None
    finally:
        done.set()


def launch_id() -> str:
    """One id shared by the processes of this launch (process 0 draws it; a collective at the start,
    while every process is alive)."""
    import jax
    import numpy as np

    local = np.asarray([int.from_bytes(os.urandom(7), "little"), int(time.time())], dtype=np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        local = np.asarray(multihost_utils.broadcast_one_to_all(local))
    return f"{int(local[1]):x}-{int(local[0]):x}"


def barrier(name: str) -> None:
    """Every process waits here (only at the start of a run, while all are alive)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def leave(code: int) -> None:
    """Exit without JAX's shutdown barrier (it aborts when a peer is dead): flush, then `os._exit`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
