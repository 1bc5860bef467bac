"""Compiled chunk programs kept on disk for the processes that JAX's persistent cache does not serve.

JAX writes its persistent compilation cache only from process 0 (`_cache_write` in
`jax/_src/compiler.py`), and on CPU a program's cache key holds its device assignment (it is stripped
on GPU only, `jax/_src/cache_key.py`). So under `jax.distributed` every process other than 0 compiled
its chunk program again at every launch: 13.5 s of a 30 s two-process benchmark (issue #15).

`compile_lowered` fills that gap. A process other than 0 serialises its compiled program
(`jax.experimental.serialize_executable`) into `<JAX cache dir>/meanfield-executables/`, keyed by
the lowered program's text, its devices, the XLA flags and the JAX build; a later launch loads it
instead of compiling. Process 0, and any run without JAX's cache directory, compiles as before
(and JAX's own cache serves it). An entry that cannot be read (damaged, another build) is compiled
again and replaced. Like JAX's cache, the directory is the user's own: loading an entry runs what
it holds, so it must not be shared with untrusted users.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import jax

from .store import atomic_write_bytes

SUBDIR = "meanfield-executables"


def store_dir() -> Path | None:
    """Where this process keeps its programs, or None when JAX's own cache serves it (process 0)
    or no cache directory is set (the cache is off)."""
    base = jax.config.jax_compilation_cache_dir
    if not base or jax.process_index() == 0:
        return None
    return Path(base) / SUBDIR


def program_key(lowered, devices) -> str:
    """sha256 of everything the compiled program depends on: the lowered program, the devices it
    runs on, the XLA flags, and the JAX / jaxlib / backend builds."""
    import jaxlib

    backend = devices[0].client
    h = hashlib.sha256()
    for part in (lowered.as_text(), repr([(d.id, d.process_index, d.device_kind) for d in devices]),
                 os.environ.get("XLA_FLAGS", ""), jax.__version__, jaxlib.__version__, backend.platform,
                 backend.platform_version):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def compile_lowered(lowered, devices, directory: Path | None = None):
    """`lowered.compile()`, through this process's store of compiled programs (see the module
    docstring). `devices`: the devices the program runs on (this process's local devices)."""
    from jax.experimental.serialize_executable import deserialize_and_load, serialize

    directory = store_dir() if directory is None else directory
    if directory is None:
        return lowered.compile()
    path = directory / f"{program_key(lowered, devices)}.bin"
    if path.is_file():
        try:
            exe, in_tree, out_tree = pickle.loads(path.read_bytes())
            return deserialize_and_load(exe, in_tree, out_tree, execution_devices=devices)
        except Exception:  # noqa: BLE001 -- damaged or foreign entry: compile and replace it
            pass
    compiled = lowered.compile()
    try:
        blob = pickle.dumps(serialize(compiled))
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(blob, path)  # removes its temporary file if the write fails
    except Exception:  # noqa: BLE001 -- a program that cannot be serialised, or a full disk: run without storing
        pass
    return compiled
