"""Which process computes which chunk: a fixed grid of chunks per group, taken by claim files.

Every process of a run (one, or N under `jax.distributed`, or several `meanfield run` commands on one
shared directory) cuts each group's points into the same grid of chunks, from the plan alone. It then
walks the grid, starting at its own offset, and computes every chunk that still has missing points
and that it can claim (`claims.py`). When none is left to claim it waits for the chunks its peers
hold, taking over any whose holder died, until every point of the run is on disk.

Balance. Under P processes a group is cut into at least P chunks, each a random sample of the group
(a fixed permutation), so that chunks cost about the same although points do not (stiff regions
take 10-100x the steps of others). Chunks are not cut finer: the ensemble integrator needs a queue
to hide each point's tail, and 8 chunks of 32 points cost 1.6x one chunk of 256 (measured,
a 1-core run of the benchmark workload, before the tail's pool was halved step by step). Fast
processes still take more chunks when there are more.

Compiling. Each process compiles a group's chunk program once per machine: a later launch loads it,
without tracing, from `executables.compile_traced`'s store (keyed by what the program is traced
from); on a miss it is traced and compiled, process 0 through JAX's persistent cache, the others
through `executables.compile_lowered`'s store (JAX writes its cache from process 0 only).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._xla_flags import program_options
from .claims import Claims
from .executables import compile_traced, store_dir, traced_entry
from .plan import Plan
from .points import auto_chunk_size, make_chunk_function, make_point_function, plan_group_attention, uses_ensemble
from .store import ChunkIndex, atomic_write_dataset, chunk_dataset, chunk_path
from .watchdog import StallWatch

CHUNKS_PER_PROCESS = 1
POLL_SECONDS = 1.0
POINT_INDEX = "__point__"
"""Key of a chunk's global point indices among its traced values: every chunk function gets a batch
axis from it even when no number varies (the point functions ignore it)."""


def log(msg: str, quiet: bool) -> None:
    """A progress line: on stdout, or on stderr when `quiet` (stdout then stays for results)."""
    print(msg, file=sys.stderr if quiet else sys.stdout, flush=True)


@dataclass
class Chunk:
    """One cell of a group's chunk grid: `positions` into the group's points."""

    group: int
    positions: np.ndarray
    size: int  # the compiled batch size of the group

    def name(self, plan: Plan) -> str:
        idx = plan.groups[self.group].indices[self.positions]
        return f"g{self.group:03d}-{int(idx.min()):07d}-{int(idx.max()):07d}"


@dataclass
class WorkStats:
    """What one process did: written to run.json (`processes`) by the merging process."""

    process: int
    processes: int
    points: int = 0
    chunks: int = 0
    busy_seconds: float = 0.0
    compile_seconds: float = 0.0  # part of busy_seconds: compiling (or loading from the persistent cache)
    wall_seconds: float = 0.0

    def record(self) -> dict:
        from .claims import HOST

        idle = 1.0 - self.busy_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
        return {"process": self.process, "host": HOST, "pid": os.getpid(), "points": self.points,
                "chunks": self.chunks, "busy_seconds": round(self.busy_seconds, 3),
                "compile_seconds": round(self.compile_seconds, 3),
                "wall_seconds": round(self.wall_seconds, 3), "idle_fraction": round(max(idle, 0.0), 4)}


def group_attention(plan: Plan, tokens: dict) -> dict:
    """Group index -> its planned `LowRank` evaluator, or None for the direct sum
    (`plan_group_attention`, under the group's dtype): deterministic, so the same in every process."""
    out = {}
    for gi, group in enumerate(plan.groups):
        with jax.enable_x64(group.config.dtype == "float64"):
            out[gi] = plan_group_attention(group.config, group, tokens.get(gi))
    return out


def point_by_point(cfg, lowrank) -> bool:
    """Whether a group runs one point at a time: planned low-rank attention, or `attention: lowrank`
    whose planning fell back to the direct sum (a vmap of the point function, as before planning)."""
    return lowrank is not None or (cfg.simulator.kind == "particles" and cfg.simulator.attention.kind == "lowrank")


def chunk_grid(plan: Plan, n_dev: int, n_proc: int, attention: dict) -> list[Chunk]:
    """Every group's chunks, from the plan and its `group_attention` (the same in every process of a launch)."""
    grid = []
    for gi, group in enumerate(plan.groups):
        cfg = group.config
        n = len(group.indices)
        if point_by_point(cfg, attention[gi]):
            size = n_dev  # one point per device and chunk (see make_point_function)
        else:
            size = auto_chunk_size(cfg, n_dev, group.traced_paths)
            if n_proc > 1:  # several short chunks per process: the last one finishing sets the wall time
                size = min(size, -(-n // (CHUNKS_PER_PROCESS * n_proc)))
            # Equal chunks (one compiled shape) that pad by fewer than one point per chunk and device.
            n_chunks = -(-n // size)
            size = -(-n // (n_chunks * n_dev)) * n_dev
        # Chunks are drawn from a fixed permutation of the group (seeded by the group's index): every
        # chunk samples the whole sweep, cheap and expensive regions alike, so chunks cost about the
        # same. Contiguous chunks of a grid sweep alternate between fast and stiff regions (measured
        # 0.3 s vs 4 s), and strided ones split it by its innermost axis (seeds: 7.2 s vs 1.8 s).
        n_chunks = -(-n // size)
        order = np.random.default_rng(gi).permutation(n)
        for k in range(n_chunks):
            grid.append(Chunk(gi, np.sort(order[k::n_chunks]), size))
    return grid


class _CallsLapack(Exception):
    """A chunk program sharded over several CPU devices would call LAPACK (`_Compiled`)."""


def calls_lapack(lowered) -> bool:
    """Whether a lowered program calls jaxlib's CPU LAPACK kernels (SVD, eigh, QR, Cholesky, ...)."""
    return "lapack_" in lowered.as_text()


class _OnDevice:
    """A compiled program that runs on one device: its inputs are moved there first."""

    def __init__(self, compiled, device):
        self.compiled, self.device = compiled, device

    def __call__(self, values):
        return self.compiled(jax.device_put(values, self.device))


class _Compiled:
    """The compiled function of each group and batch size, built on first use; compiling (ahead of
    the first call, or loading it untraced from `executables.compile_traced`'s store, or from JAX's
    persistent cache) is timed apart in `seconds`.

    Several CPU devices (`meanfield run` makes one per core): a group's chunk is split over them (one
    ensemble pool each) unless its program calls LAPACK. jaxlib 0.10's CPU LAPACK kernels split a
    batch over XLA's intra-op thread pool and block their pool thread until the pieces are done
    (`meanfield._symeig`); with one such call per device running at once, every pool thread waits and
    the run hangs at 0% CPU (`gdb` on a 2-device particle sweep: both pool threads in
    `lapack_sgesdd_ffi` -> `ParallelBatchMap` -> `BlockingCounter::Wait`). Such a group runs on the
    first device; the choice is remembered next to the stored programs (`.one-device`), so a later
    launch loads it untraced. (Symmetric eigenvalues up to 16 x 16 and the spectral norms behind
    `spectral_ratio` use Jacobi rotations, `meanfield._symeig`, so most groups call no LAPACK.)

    A group compiled with YNNPACK reduce fusions (`_options`: token states above 256 numbers) also
    runs on the first device: those kernels already keep XLA's thread pool busy, and 256 particle
    points (n = 64, d = 8, max_steps 5,000) took 89.8 / 110.4 s split over 2 CPU devices against
    82.2 / 75.7 s on one (alternating processes, benchmarks/README.md)."""

    def __init__(self, plan: Plan, tokens: dict, attention: dict, mesh, quiet: bool, devices):
        self.plan, self.tokens, self.attention, self.mesh, self.quiet = plan, tokens, attention, mesh, quiet
        self.devices = devices
        self.fns: dict[int, tuple] = {}
        self.executables: dict[tuple[int, int], object] = {}
        self.loaded: dict[tuple[int, int], Path] = {}  # programs loaded untraced: their store entries
        self.seconds = 0.0

    def __call__(self, gi: int, values: dict):
        """The function to call on `values` (a chunk of group `gi`)."""
        fn, single = self.fns[gi] if gi in self.fns else self._build(gi)
        if not hasattr(fn, "lower"):  # the low-rank path: a Python loop over jitted points
            return fn
        key = (gi, len(values[POINT_INDEX]))
        if key not in self.executables:
            t0 = time.perf_counter()
            self.executables[key], entry = self._compile(gi, fn, single, values)
            if entry is not None:
                self.loaded[key] = entry
            self.seconds += time.perf_counter() - t0
        return self.executables[key]

    def _options(self, gi: int) -> dict:
        """XLA compile options of group `gi` (`meanfield._xla_flags.program_options`: YNNPACK reduce
        fusions back on CPU for large token states)."""
        cfg = self.plan.groups[gi].config
        if self.devices[0].platform != "cpu" or cfg.model is None:  # no model: the shaped SDE
            return {}
        d = cfg.model.d
        tokens = self.tokens.get(gi)
        n = int(np.shape(tokens)[-2]) if tokens is not None else cfg.initial.n
        return program_options(d + d * d if cfg.simulator.kind == "gaussian" else n * d)

    def _compile(self, gi: int, fn, single, values: dict):
        parts = self._traced_from(gi, values, self.mesh)
        options = self._options(gi)
        if self.mesh is None or self.devices[0].platform != "cpu":
            return compile_traced(lambda: fn.lower(values), parts, self.devices, options=options)
        if options:  # YNNPACK reduce fusions (large token states): faster on one device, measured
            why = "its YNNPACK kernels share XLA's thread pool, and a split over devices measured slower"
        else:
            why = "its program calls LAPACK, which hangs when run on several CPU devices at once"
            base = store_dir(every_process=True)
            marker = None if base is None else traced_entry(base, parts, self.devices, ".one-device")
            if marker is None or not marker.exists():

                def lower():
                    lowered = fn.lower(values)
                    if calls_lapack(lowered):
                        raise _CallsLapack
                    return lowered

                try:
                    return compile_traced(lower, parts, self.devices, options=options)
                except _CallsLapack:
                    if marker is not None:
                        try:
                            marker.parent.mkdir(parents=True, exist_ok=True)
                            marker.touch()
                        except OSError:
                            pass
        log(f"[{self.plan.config.name}] group {gi} runs on one CPU device: {why}", self.quiet)
        device = self.devices[0]
        on_one = jax.device_put(values, device)
        exe, entry = compile_traced(lambda: single.lower(on_one), self._traced_from(gi, on_one, None), [device],
                                    options=options)
        return _OnDevice(exe, device), entry

    def discard(self, gi: int, values: dict) -> bool:
        """Forget the program of group `gi` at this chunk size if it was loaded from the store, and
        delete its entry: the next call traces and compiles it again. False when it was compiled in
        this process (then its failure is the computation's own)."""
        key = (gi, len(values[POINT_INDEX]))
        entry = self.loaded.pop(key, None)
        if entry is None:
            return False
        self.executables.pop(key, None)
        entry.unlink(missing_ok=True)
        return True

    def _traced_from(self, gi: int, values: dict, mesh) -> list:
        """What group `gi`'s program is traced from (`executables.traced_key`'s parts): `_build`'s
        inputs (the group's configuration and numbered paths, its initial tokens, its attention plan,
        the mesh) and the chunk's shapes, dtypes and shardings."""
        group = self.plan.groups[gi]
        tokens = self.tokens.get(gi)
        parts = [group.config.model_dump_json(), repr(sorted(group.traced_paths)), repr(self.attention[gi]),
                 repr(mesh)]
        if tokens is not None:
            tokens = np.asarray(tokens)
            parts += [f"{tokens.shape} {tokens.dtype}", np.ascontiguousarray(tokens).tobytes()]
        for p in sorted(values):
            v = values[p]
            parts.append(f"{p}: {np.shape(v)} {v.dtype} {getattr(v, 'sharding', None)!r}")
        return parts

    def _build(self, gi: int):
        group = self.plan.groups[gi]
        cfg = group.config
        tokens = self.tokens.get(gi)
        lowrank = self.attention[gi]
        single = None  # the program on one device (`_compile`)
        if uses_ensemble(cfg, group.traced_paths, point_by_point(cfg, lowrank)):
            # The ensemble integrator: each device runs its own pool over its share of the chunk.
            chunk = make_chunk_function(cfg, group.traced_paths, tokens, lanes=cfg.output.lanes)
            fn = single = jax.jit(chunk)
            if self.mesh is not None:
                fn = jax.jit(jax.shard_map(chunk, mesh=self.mesh, in_specs=PartitionSpec("points"),
                                           out_specs=PartitionSpec("points"), check_vma=False))
        elif lowrank is None:
            fn = single = jax.jit(jax.vmap(make_point_function(cfg, group.traced_paths, tokens)))
        else:
            # One point at a time, unvmapped: the in-jit fallback of the low-rank attention stays a real branch.
            one = jax.jit(make_point_function(cfg, group.traced_paths, tokens, attention=lowrank))

            def fn(values):
                outs = [one({p: v[i] for p, v in values.items()}) for i in range(len(values[POINT_INDEX]))]
                return jax.tree.map(lambda *a: jnp.stack(a), *outs)

            log(f"[{self.plan.config.name}] low-rank attention, Chebyshev orders {lowrank.orders} "
                 f"({int(np.prod(lowrank.orders))} features), one point per chunk", self.quiet)
        self.fns[gi] = fn, single
        return fn, single


def run_plan(plan: Plan, run_dir: Path, index: ChunkIndex, tokens: dict, *, quiet: bool = False,
             launch: str = "local") -> WorkStats:
    """Compute, in this process, chunks of the plan until every point of the run is stored under
    `run_dir/chunks` (by this process or its peers). `index`: the run's chunk files (refreshed here);
    `tokens`: group index -> its initial tokens from a file (`run.group_file_tokens`), where it has
    one. Returns what this process did."""
    t_start = time.perf_counter()
    n_proc, proc = jax.process_count(), jax.process_index()
    devices = jax.local_devices()
    n_dev = len(devices)
    mesh = Mesh(np.array(devices), ("points",)) if n_dev > 1 else None
    h = index.config_hash
    attention = group_attention(plan, tokens)
    grid = chunk_grid(plan, n_dev, n_proc, attention)
    compiled = _Compiled(plan, tokens, attention, mesh, quiet, devices)
    stats = WorkStats(proc, n_proc)
    pause = float(os.environ.get("MEANFIELD_CHUNK_PAUSE", "0"))
    tag = f"[{plan.config.name}{f' p{proc}' if n_proc > 1 else ''}]"

    def missing(c: Chunk) -> np.ndarray:
        return c.positions[~index.done[plan.groups[c.group].indices[c.positions]]]

    remaining = sum(len(missing(c)) for c in grid)
    bar = None
    if not quiet and remaining:
        from tqdm.auto import tqdm

        bar = tqdm(total=remaining, unit="pt", desc=plan.config.name + (f" p{proc}" if n_proc > 1 else ""),
                   dynamic_ncols=True)

    def compute(c: Chunk, todo: np.ndarray):
        group = plan.groups[c.group]
        cfg = group.config
        # Pad to the group's compiled size (no recompile); a remainder under half of it (a resume with
        # another chunk grid) gets its own, smaller shape rather than computing padding.
        size = c.size if len(todo) > c.size // 2 else -(-len(todo) // n_dev) * n_dev
        sel = np.concatenate([todo, np.repeat(todo[-1:], size - len(todo))])
        values = {p: np.asarray(v[sel]) for p, v in group.values.items()}
        values[POINT_INDEX] = group.indices[sel]  # a batch axis even when no number varies
        t0 = time.perf_counter()
        with jax.enable_x64(cfg.dtype == "float64"):
            if mesh is not None:
                sharding = NamedSharding(mesh, PartitionSpec("points"))
                values = {p: jax.device_put(v, sharding) for p, v in values.items()}

            def run(fn):
                with StallWatch(f"{plan.config.name} chunk {c.name(plan)}"):
                    return jax.tree.map(lambda a: np.asarray(a)[: len(todo)], fn(values))

            try:
                out = run(compiled(c.group, values))
            except jax.errors.JaxRuntimeError as exc:
                # A stored program that loads but cannot run (e.g. written by a build that serialised
                # it wrongly): drop its entry and compute with a freshly compiled one; never a failed run.
                if not compiled.discard(c.group, values):
                    raise
                print(f"warning: {tag} a stored compiled program failed to run ({str(exc).splitlines()[0][:200]}); "
                      "its cache entry was deleted and the program is compiled again", file=sys.stderr, flush=True)
                out = run(compiled(c.group, values))
        idx = group.indices[todo]
        atomic_write_dataset(chunk_dataset(plan, idx, out, h), chunk_path(run_dir, int(idx.min()), int(idx.max())))
        index.add(idx)
        dt = time.perf_counter() - t0
        stats.points += len(todo)
        stats.chunks += 1
        stats.busy_seconds += dt
        if bar is not None:
            bar.update(len(todo))
        else:
            log(f"{tag} chunk of {len(todo)} points in {dt:.2f} s ({stats.points}/{remaining})", quiet)
        if pause:
            time.sleep(pause)

    claims = Claims(Path(run_dir) / "claims", owner={"process": proc, "launch": launch})
    start = (proc * len(grid)) // max(n_proc, 1)  # processes start apart: fewer claim collisions
    order = grid[start:] + grid[:start]
    try:
        # Claim and compute what is free; then wait for the chunks peers hold, taking over those whose
        # holder died (`claims.take` succeeds on a stale claim), until every point is on disk.
        while True:
            index.refresh()
            pending = [c for c in order if len(missing(c))]
            if not pending:
                break
            took = False
            for c in pending:
                if claims.take(c.name(plan)):
                    index.refresh()
                    todo = missing(c)
                    if len(todo):
                        compute(c, todo)
                        took = True
            if not took:
                time.sleep(POLL_SECONDS)
    finally:
        claims.close()
        if bar is not None:
            bar.close()
    stats.compile_seconds = compiled.seconds
    stats.wall_seconds = time.perf_counter() - t_start
    return stats
