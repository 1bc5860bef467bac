"""Compiled chunk programs kept on disk, so a later launch neither traces nor compiles them.

Two gaps of JAX's persistent compilation cache, both measured on `meanfield run`:

1. **Processes other than 0 compiled at every launch.** JAX writes its cache only from process 0
   (`_cache_write` in `jax/_src/compiler.py`), and on CPU a program's cache key holds its device
   assignment (stripped on GPU only, `jax/_src/cache_key.py`): under `jax.distributed` process 1
   compiled its chunk program again every time (13.5 s of a 30 s two-process benchmark, issue #15).
   `compile_lowered` serialises the compiled program (`jax.experimental.serialize_executable`) into
   `<JAX cache dir>/meanfield-executables/`, keyed by the lowered program's text, the devices, the XLA
   flags and the JAX build, and loads it at the next launch.
2. **Every launch traced and lowered its programs again** before JAX's cache could be asked (its key
   is the lowered program): 1.5-2.5 s per launch for an ensemble chunk program, the largest fixed cost
   of a second `meanfield run` after importing. `compile_traced` keys the same store by what the program
   is traced from instead (`traced_key`): the package's own source, the versions of every library that
   takes part in tracing, Python, JAX's configuration, the XLA flags, the devices, and what the caller
   passes (the group's configuration, the initial-token arrays, the input shapes). On a hit nothing is
   traced; on a miss the program is traced, lowered and compiled (through 1.), and stored if XLA
   compiled it here (`compile_here`): a program that JAX's cache supplied cannot be serialised again.

An entry that cannot be loaded (damaged, another build) is compiled again and replaced; writes are
atomic. Without JAX's cache directory (the cache is off) nothing is stored. Like JAX's cache, the
directory is the user's own: loading an entry runs what it holds, so it must not be shared with
untrusted users.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from pathlib import Path

import jax
import jax.monitoring

from .store import atomic_write_bytes

SUBDIR = "meanfield-executables"


def store_dir(*, every_process: bool = False) -> Path | None:
    """Where this process keeps its programs, or None when no cache directory is set (the cache is
    off) or, unless `every_process`, in process 0 (JAX's own cache serves its lowered programs)."""
    base = jax.config.jax_compilation_cache_dir
    if not base or (jax.process_index() == 0 and not every_process):
        return None
    return Path(base) / SUBDIR


def _environment(devices) -> tuple[str, ...]:
    """The devices, XLA flags and JAX / jaxlib / backend builds a compiled program belongs to."""
    import jaxlib

    backend = devices[0].client
    return (repr([(d.id, d.process_index, d.device_kind) for d in devices]), os.environ.get("XLA_FLAGS", ""),
            jax.__version__, jaxlib.__version__, backend.platform, backend.platform_version)


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def program_key(lowered, devices) -> str:
    """sha256 of everything the compiled program depends on: the lowered program, the devices it
    runs on, the XLA flags, and the JAX / jaxlib / backend builds."""
    return _digest((lowered.as_text(), *_environment(devices)))


TRACING_LIBRARIES = ("jax", "jaxlib", "numpy", "ml_dtypes", "diffrax", "equinox", "lineax", "optimistix", "chex",
                     "jaxtyping", "flax", "optax")
"""Distributions whose code runs while a chunk program is traced (their versions enter `traced_key`)."""

_PACKAGE_DIGEST: list[str] = []


def package_digest() -> str:
    """sha256 of every Python file of the installed `meanfield` package (names and contents), computed
    once per process: any change to the code that builds a program changes the key."""
    if not _PACKAGE_DIGEST:
        root = Path(__file__).resolve().parents[1]
        files = sorted(root.rglob("*.py"))
        _PACKAGE_DIGEST.append(_digest([b for p in files for b in (str(p.relative_to(root)).encode(), p.read_bytes())]))
    return _PACKAGE_DIGEST[0]


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in TRACING_LIBRARIES:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} absent")
    return ",".join(out)


def traced_key(parts, devices) -> str:
    """sha256 of what a program is traced from, without tracing it: `parts` (strings or bytes from the
    caller: everything its function closes over and the input shapes) plus the package source
    (`package_digest`), the versions of `TRACING_LIBRARIES`, Python, JAX's configuration (x64 as it
    is in effect here) and `program_key`'s environment."""
    import jax.numpy as jnp

    config = repr(sorted((k, repr(v)) for k, v in jax.config.values.items()))
    return _digest((package_digest(), _versions(), sys.version, config, str(jnp.result_type(float)),
                    *_environment(devices), *parts))


def _initialize_custom_calls() -> None:
    """Fill in jaxlib's LAPACK kernel table, as lowering a linear-algebra op (or `jax.export`'s
    deserialisation) does. A loaded program calls LAPACK through it (e.g. the SVD of
    `with_spectral_ratio`); loaded in a process that has lowered no such op, the call would jump
    through an empty table (a segmentation fault, seen on a second `meanfield run` of a spectral-ratio
    sweep)."""
    try:
        from jax._src.lax import linalg

        linalg.initialize_lapack()
    except (ImportError, AttributeError):  # another JAX: its lowering path
        from jaxlib import lapack

        lapack.prepare_lapack_call("syevd_ffi", jax.numpy.dtype("float32"))


def _load(path: Path, devices):
    """The program stored at `path`, or None (absent, damaged, or from another build)."""
    from jax.experimental.serialize_executable import deserialize_and_load

    if not path.is_file():
        return None
    _initialize_custom_calls()
    try:
        exe, in_tree, out_tree = pickle.loads(path.read_bytes())
        return deserialize_and_load(exe, in_tree, out_tree, execution_devices=devices)
    except Exception:  # noqa: BLE001 -- damaged or foreign entry: the caller compiles and replaces it
        return None


def _store(compiled, paths) -> None:
    """Serialise `compiled` once and write it to every path of `paths`."""
    from jax.experimental.serialize_executable import serialize

    try:
        blob = pickle.dumps(serialize(compiled))
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(blob, path)  # removes its temporary file if the write fails
    except Exception:  # noqa: BLE001 -- a program that cannot be serialised, or a full disk: run without storing
        pass


CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
"""What JAX records (`jax.monitoring`) when its persistent cache supplies a program."""


def compile_here(lowered, options=None):
    """(`lowered.compile()`, whether XLA compiled it in this call). False when JAX's persistent cache
    supplied the program: such a program must not be serialised again. Its blob loads, and then fails
    in a fresh process with `NOT_FOUND: Function <fusion> not found` (measured: jaxlib 0.10.2 on CPU),
    so only programs compiled here are stored."""
    events = []

    def listen(event, **kwargs):
        events.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        compiled = lowered.compile(compiler_options=options or None)
    finally:
        jax.monitoring.unregister_event_listener(listen)
    return compiled, CACHE_HIT_EVENT not in events


def _options_part(options: dict) -> str:
    """XLA compile options as they enter a store key (`compile_lowered`, `compile_traced`)."""
    return repr(sorted(options.items()))


def compile_lowered(lowered, devices, directory: Path | None = None, *, also=(), options=None):
    """`lowered.compile(compiler_options=options)`, through this process's store of compiled programs (1. of the module
    docstring). `devices`: the devices the program runs on (this process's local devices). A program
    compiled here is also written to the paths `also` (`compile_traced`'s entry); one loaded from a
    store or supplied by JAX's cache is not (see `compile_here`)."""
    directory = store_dir() if directory is None else directory
    paths = list(also)
    if directory is not None:
        key = program_key(lowered, devices)
        key = _digest((key, _options_part(options))) if options else key
        path = directory / f"{key}.bin"
        loaded = _load(path, devices)
        if loaded is not None:
            return loaded
        paths.insert(0, path)
    compiled, fresh = compile_here(lowered, options)
    if fresh and paths:
        _store(compiled, paths)
    return compiled


def traced_entry(directory: Path, parts, devices, suffix: str = ".bin") -> Path:
    """The store's file for what a program is traced from (`traced_key`): its program (`.bin`), or a
    note beside it (`schedule` keeps `.one-device` there)."""
    return directory / f"traced-{traced_key(parts, devices)}{suffix}"


def compile_traced(lower, parts, devices, directory: Path | None = None, options=None):
    """(compiled program, the entry it was loaded from or None). The program of `lower()` (a function
    returning a `jax.stages.Lowered`) is loaded without tracing when the store holds one under
    `traced_key(parts, devices)` (2. of the module docstring); otherwise it is lowered and compiled
    through `compile_lowered`, which stores it there too if it was compiled here (a program that came
    from a cache is not: see `compile_here`; the next launch traces it again and loads it from that
    cache, as before). A loaded program that then fails to run is the caller's to discard (delete the
    entry, call again). `options`: XLA compile options (part of both keys)."""
    directory = store_dir(every_process=True) if directory is None else directory
    if directory is None:
        return compile_lowered(lower(), devices, options=options), None
    parts = list(parts) + [_options_part(options)] if options else parts
    path = traced_entry(directory, parts, devices)
    loaded = _load(path, devices)
    if loaded is not None:
        return loaded, path
    return compile_lowered(lower(), devices, also=(path,), options=options), None
