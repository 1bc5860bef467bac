"""Run a planned sweep: one jit-compiled, vmapped function per group, chunked, sharded, resumable.

For each group (points that share shapes and options) the point function

    numbers -> build Model and initial state -> simulate -> observables over depth, regime

is `jax.vmap`-ed over the group's traced numbers and compiled once. Points are fed in chunks of
`chunk_size` (the last chunk padded, so no recompile), each chunk's arrays sharded over the local
devices along the point axis (`NamedSharding(Mesh(devices, ("points",)), P("points"))`), and each
finished chunk written atomically. With several processes (`jax.distributed`), process p runs
chunks p, p + P, p + 2P, ... and process 0 merges.
"""

from __future__ import annotations

import copy
import json
import datetime as _dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import metrics
from ..regimes import FAILED, REGIMES, classify, regime_code
from ..simulate.gaussian import simulate_gaussian
from ..simulate.particles import simulate_particles
from .build import build_model, initial_moments, initial_tokens, point_keys
from .config import ExperimentConfig
from .plan import ConfigError, Group, Plan, config_hash, load_config, make_plan, memory_estimate, set_path
from .store import (
    RUN_FILES, atomic_write_dataset, atomic_write_text, chunk_path, coordinate_array, done_points, git_commit,
    merge_chunks, read_run_info, read_tokens_file,
)

OBSERVABLE_ATTRS = {
    "effective_rank": ("effective rank exp(H(s^2/sum s^2))", "1"),
    "stable_rank": ("stable rank ||X||_F^2/||X||_2^2", "1"),
    "rank_one_distance": ("relative distance to rank one", "1"),
    "consensus_distance": ("relative distance to consensus", "1"),
    "mean_cosine": ("mean pairwise cosine", "1"),
    "diameter": ("token diameter max |x_i - x_j|", "token units"),
    "rms_norm": ("RMS token norm", "token units"),
    "cov_trace": ("tr S", "token units^2"),
    "cov_logdet": ("log det S", "1"),
    "cov_condition": ("condition number of S", "1"),
    "numerical_rank": ("numerical rank of S", "1"),
    "mean_norm": ("|m|", "token units"),
    "cluster_count": ("number of clusters", "1"),
    "lyapunov": ("leading Lyapunov exponents over [discard, t1] (QR method; nan: the state left float range)", "1/depth"),
    "corr_mean": ("mean correlation rho_ab", "1"),
    "corr_q10": ("10% quantile of rho_ab", "1"),
    "corr_q90": ("90% quantile of rho_ab", "1"),
    "min_eig": ("smallest kernel eigenvalue over paths (< 0: Euler-Maruyama left the PSD cone)", "1"),
    "exploded_fraction": ("fraction of SDE paths exploded (tr V > threshold) by t1", "1"),
}


def _dtype(cfg: ExperimentConfig):
    """float32, or float64 (the caller runs the group inside `jax.enable_x64(True)`)."""
    return jnp.float64 if cfg.dtype == "float64" else jnp.float32


def _gaussian_observables(names, means, covs):
    out = {}
    for name in names:
        if name == "mean_norm":
            out[name] = jnp.linalg.norm(means, axis=-1)
        elif name == "effective_rank":
            out[name] = jax.vmap(metrics.gaussian_effective_rank)(means, covs)
        elif name == "rank_one_distance":
            out[name] = jax.vmap(metrics.gaussian_rank_one_distance)(means, covs)
        else:
            out[name] = jax.vmap(getattr(metrics, name))(covs).astype(means.dtype)
    return out


def _shaped_point_function(cfg: ExperimentConfig, traced_paths):
    """Kernel SDE of the shaped transformer: correlation statistics over depth for one point."""
    from ..shaped.sde import simulate_shaped_sde

    base = cfg.model_dump(mode="python", exclude={"sweep"})
    dtype = _dtype(cfg)
    sim, sh, reg = cfg.simulator, cfg.shaped, cfg.regimes
    names = cfg.observable_names()

    def point(values):
        tree = copy.deepcopy(base)
        for p in traced_paths:
            set_path(tree, p, values[p])
        t = tree["shaped"]
        m = sh.m
        V0 = (1.0 - t["rho0"]) * jnp.eye(m, dtype=dtype) + t["rho0"] * jnp.ones((m, m), dtype)
        _, key = point_keys(tree["seed"])
        sol = simulate_shaped_sde(
            key, V0, sim.t1, dt=sim.dt0, gamma_attn2=t["gamma_attn2"], gamma_mlp2=t["gamma_mlp2"],
            tau0=t["tau0"], c_plus=t["c_plus"], c_minus=t["c_minus"], n_paths=sh.n_paths, n_save=sim.n_save,
            explode_threshold=sh.explode_threshold,
        )
        corr = jnp.where(sol.exploded[:, None, None], jnp.nan, sol.correlations)  # (paths, T, pairs)
        flat = jnp.moveaxis(corr, 1, 0).reshape(corr.shape[1], -1)
        stats = {
            "corr_mean": jnp.nanmean(flat, axis=1),
            "corr_q10": jnp.nanquantile(flat, 0.1, axis=1),
            "corr_q90": jnp.nanquantile(flat, 0.9, axis=1),
            "min_eig": jnp.min(sol.min_eig, axis=0),
            "exploded_fraction": jnp.mean(sol.exploded.astype(dtype)),
        }
        # Rank collapse of the kernel = correlations -> 1; a majority of exploded paths = blow-up.
        regime = regime_code(1.0 - stats["corr_mean"][-1], jnp.ones((), dtype), stats["exploded_fraction"] > 0.5,
                             collapse_tol=reg.collapse_tol, growth_limit=reg.growth_limit)
        out = {k: v for k, v in stats.items() if k in names}
        return dict(out, t=sol.ts.astype(dtype), regime=regime.astype(jnp.int8),
                    blowup_time=jnp.asarray(jnp.inf, dtype), success=jnp.ones((), jnp.int8))

    return point


def _lyapunov_kwargs(sim, ikey) -> dict:
    ly = sim.lyapunov
    return dict(k=ly.k, interval=ly.interval, discard=ly.discard, solver=ly.solver, dt0=ly.dt0,
                key=jax.random.fold_in(ikey, 2), max_steps=sim.max_steps)


def _lyapunov_values(res):
    """Exponents, nan where the tangent solve left float range (e.g. a blowing-up run)."""
    return jnp.where(res.finite & jnp.all(jnp.isfinite(res.exponents)), res.exponents, jnp.nan)


def _point_model(base: dict, traced_paths, values, dtype):
    """One point's resolved config tree, its `Model` and its initial-condition key: the base config
    with the point's numbers (traced or concrete) set, weights from key(seed) folded with 0."""
    tree = copy.deepcopy(base)
    for p in traced_paths:
        set_path(tree, p, values[p])
    wkey, ikey = point_keys(tree["seed"])
    return tree, build_model(tree["model"], wkey, dtype), ikey


def plan_group_orders(cfg: ExperimentConfig, group, file_tokens=None):
    """Static Chebyshev orders of the low-rank attention for a whole group: the elementwise maximum of
    `plan_attention(model, X0, method="lowrank")` over every point's concrete model and initial tokens
    (all points, not only missing ones, so a resumed run compiles the same function). None (with the
    planner's warning) when the a priori bound cannot meet `simulator.attention_rtol` at some point:
    the group then runs the direct sum."""
    from ..model.fast_attention import plan_attention

    base = cfg.model_dump(mode="python", exclude={"sweep"})
    dtype = _dtype(cfg)
    orders = None
    for i in range(len(group.indices)):
        values = {p: np.asarray(group.values[p])[i] for p in group.traced_paths}
        tree, model, ikey = _point_model(base, group.traced_paths, values, dtype)
        X0 = initial_tokens(tree["initial"], cfg.model.d, ikey, dtype, file_tokens)
        o = plan_attention(model, X0, method="lowrank", rtol=cfg.simulator.attention_rtol)
        if o is None:
            return None
        orders = o if orders is None else tuple(max(a, b) for a, b in zip(orders, o))
    return orders


def _particle_outputs(names, reg, ts, xs, success, blown_up, t_end):
    """One point's sweep outputs from its saved tokens xs (T, n, d): observables over depth, regime, blow-up depth.

    A failed solve (neither t1 nor a blow-up event reached, or a non-finite final state) gets the
    FAILED regime and NaN observables and blow-up depth: its numbers describe the numerics, not the model."""
    wanted = list(dict.fromkeys(names + ["rank_one_distance", "rms_norm"]))
    reached = jnp.all(jnp.isfinite(xs), axis=(-2, -1))
    safe = jnp.where(reached[:, None, None], xs, 0.0)

    def observe(X):
        return {n: (metrics.cluster_count(X) if n == "cluster_count" else metrics.PARTICLE_OBSERVABLES[n](X)).astype(X.dtype)
                for n in wanted}

    o = {k: jnp.where(reached, v, jnp.nan) for k, v in jax.vmap(observe)(safe).items()}
    growth = o["rms_norm"] / o["rms_norm"][0]
    over = reached & (growth > reg.growth_limit)  # unreached saves are not a blow-up
    first_over = jnp.where(jnp.any(over), ts[jnp.argmax(over)], jnp.inf)
    blowup_time = jnp.where(blown_up, jnp.minimum(first_over, t_end), first_over)
    # A blow-up event stops the solve: judge it on its last reached save; every other run on X(t1).
    last = jnp.where(blown_up, jnp.max(jnp.where(reached, jnp.arange(growth.shape[0]), 0)), growth.shape[0] - 1)
    regime = regime_code(o["rank_one_distance"][last], growth[last], blown_up, failed=~success,
                         collapse_tol=reg.collapse_tol, growth_limit=reg.growth_limit)
    failed = regime == FAILED
    keep = {k: jnp.where(failed, jnp.nan, v) for k, v in o.items() if k in names}
    return dict(keep, t=ts, regime=regime.astype(jnp.int8),
                blowup_time=jnp.where(failed, jnp.nan, blowup_time).astype(ts.dtype), success=success.astype(jnp.int8))


def _gaussian_outputs(names, reg, sol):
    """One point's sweep outputs from its `GaussianSolution` (a failed solve: FAILED, NaN observables)."""
    obs = _gaussian_observables(names, sol.means, sol.covs)
    regime = classify(sol, collapse_tol=reg.collapse_tol, growth_limit=reg.growth_limit)
    failed = regime == FAILED
    obs = {k: jnp.where(sol.valid & ~failed, v, jnp.nan) for k, v in obs.items()}
    return dict(obs, t=sol.ts, regime=regime.astype(jnp.int8), blowup_time=jnp.where(failed, jnp.nan, sol.blowup_time),
                success=sol.success.astype(jnp.int8))


def _solver_kwargs(s: dict) -> dict:
    return dict(n_save=s["n_save"], solver=s["solver"], dt0=s["dt0"], rtol=s["rtol"], atol=s["atol"],
                max_steps=s["max_steps"])


def _group_context(cfg: ExperimentConfig):
    """(base config tree, dtype, observable names, simulator, regimes, d) of a particle/Gaussian group."""
    return (cfg.model_dump(mode="python", exclude={"sweep"}), _dtype(cfg), cfg.observable_names(), cfg.simulator,
            cfg.regimes, cfg.model.d)


def make_point_function(cfg: ExperimentConfig, traced_paths, file_tokens=None, attention_orders=None):
    """The per-point function `numbers -> outputs` for one group (unbatched). `make_chunk_function`
    runs a whole chunk through the ensemble integrator instead; this one is what the low-rank
    attention path (`attention_orders` from `plan_group_orders`) calls point by point, and the
    reference the batched path is tested against."""
    if cfg.simulator.kind == "shaped_sde":
        return _shaped_point_function(cfg, traced_paths)
    base, dtype, names, sim, reg, d = _group_context(cfg)

    def point(values):
        tree, model, ikey = _point_model(base, traced_paths, values, dtype)
        s = tree["simulator"]
        if sim.kind == "gaussian":
            m0, S0 = initial_moments(tree["initial"], d, dtype)
            sol = simulate_gaussian(model, m0, S0, s["t1"], blowup_threshold=s["blowup_threshold"], **_solver_kwargs(s))
            out = _gaussian_outputs(names, reg, sol)
            if sim.lyapunov is not None:
                from ..lyapunov import gaussian_lyapunov

                out["lyapunov"] = _lyapunov_values(gaussian_lyapunov(model, m0, S0, sim.t1, **_lyapunov_kwargs(sim, ikey)))
            return out
        X0 = initial_tokens(tree["initial"], d, ikey, dtype, file_tokens)
        fast = {} if attention_orders is None else dict(attention_orders=attention_orders,
                                                         attention_rtol=s["attention_rtol"])
        sol = simulate_particles(model, X0, s["t1"], attention_impl=s["attention_impl"],
                                 blowup_growth=100 * reg.growth_limit, **fast, **_solver_kwargs(s))
        out = _particle_outputs(names, reg, sol.ts, sol.xs, sol.success, sol.blown_up, sol.t_end)
        if sim.lyapunov is not None:
            from ..lyapunov import particle_lyapunov

            out["lyapunov"] = _lyapunov_values(particle_lyapunov(
                model, X0, sim.t1, attention_impl=s["attention_impl"], **_lyapunov_kwargs(sim, ikey)))
        return out

    return point


def make_chunk_function(cfg: ExperimentConfig, traced_paths, file_tokens=None, lanes: int | None = None):
    """`numbers (B,) -> outputs (B, ...)` for a chunk of one group: every point's Model and initial
    state built in one vmap, then ONE batched solve on the ensemble integrator (each point steps on
    its own; finished points are replaced from the chunk's queue), then the observables of the saved
    states. Particles and Gaussian moments; the numbers equal `make_point_function`'s up to the
    rounding of batched arithmetic. Lyapunov exponents (a QR solve of their own) stay vmapped."""
    base, dtype, names, sim, reg, d = _group_context(cfg)
    s = base["simulator"]
    if "simulator.t1" in traced_paths:  # per-point depth: the batch shares one t1
        raise ConfigError("sweeping simulator.t1 runs the per-point path")

    def setup(values):
        tree, model, ikey = _point_model(base, traced_paths, values, dtype)
        if sim.kind == "gaussian":
            return model, initial_moments(tree["initial"], d, dtype), ikey
        return model, initial_tokens(tree["initial"], d, ikey, dtype, file_tokens), ikey

    def chunk(values):
        models, init, ikeys = jax.vmap(setup)(values)
        if sim.kind == "gaussian":
            m0, S0 = init
            sol = simulate_gaussian(models, m0, S0, sim.t1, blowup_threshold=s["blowup_threshold"], lanes=lanes,
                                    **_solver_kwargs(s))
            sol = eqx.tree_at(lambda g: g.ts, sol, jnp.broadcast_to(sol.ts, sol.means.shape[:2]))
            out = jax.vmap(lambda g: _gaussian_outputs(names, reg, g))(sol)
            if sim.lyapunov is not None:
                from ..lyapunov import gaussian_lyapunov

                out["lyapunov"] = jax.vmap(lambda m, a, b, k: _lyapunov_values(
                    gaussian_lyapunov(m, a, b, sim.t1, **_lyapunov_kwargs(sim, k))))(models, m0, S0, ikeys)
            return out
        sol = simulate_particles(models, init, sim.t1, attention_impl=s["attention_impl"],
                                 blowup_growth=100 * reg.growth_limit, lanes=lanes, **_solver_kwargs(s))
        # Observables of the saved states, 256 points at a time (some are O(n^2) per state).
        out = jax.lax.map(lambda a: _particle_outputs(names, reg, sol.ts, *a),
                          (sol.xs, sol.success, sol.blown_up, sol.t_end), batch_size=256)
        if sim.lyapunov is not None:
            from ..lyapunov import particle_lyapunov

            out["lyapunov"] = jax.vmap(lambda m, x, k: _lyapunov_values(particle_lyapunov(
                m, x, sim.t1, attention_impl=s["attention_impl"], **_lyapunov_kwargs(sim, k))))(models, init, ikeys)
        return out

    return chunk


MAX_AUTO_CHUNK = 256
"""Points per chunk for vmapped (lockstep) groups: shaped SDE, swept t1, low-rank attention."""
MAX_ENSEMBLE_CHUNK = 8192
"""Points per chunk on the ensemble integrator: the queue a pool of lanes works through (bigger
queues shorten the tail after it empties; chunks stay small enough to be crash-safe)."""


def _uses_ensemble(cfg: ExperimentConfig, traced_paths=()) -> bool:
    return (cfg.simulator.kind in ("particles", "gaussian") and cfg.simulator.attention_method != "lowrank"
            and "simulator.t1" not in traced_paths)


def auto_chunk_size(cfg: ExperimentConfig, n_devices: int, traced_paths=()) -> int:
    """Points per batch from `output.memory_budget_gb` and a per-point memory estimate."""
    if cfg.output.chunk_size:
        size = cfg.output.chunk_size
    else:
        budget = cfg.output.memory_budget_gb * 2**30
        ensemble = _uses_ensemble(cfg, traced_paths)
        lane, kept = memory_estimate(cfg, ensemble)
        if ensemble:  # the lanes' working memory once, then the saved states of every point
            budget = max(budget - min(cfg.output.lanes or 256, 256) * lane, budget / 4)
            per_point = kept
        else:
            per_point = lane + kept
        size = int(budget // per_point)
        # Vmapped adaptive solves run in lockstep: a chunk costs (lanes x the slowest lane's steps), and
        # the slowest lane gets slower as the chunk grows (measured: 512 random d = 4 moment points 4 s,
        # 2048 points 64 s), so those chunks stay at 256. The ensemble integrator has no such waste.
        size = max(1, min(size, MAX_ENSEMBLE_CHUNK if ensemble else MAX_AUTO_CHUNK))
    return int(-(-size // n_devices) * n_devices)


@dataclass
class RunResult:
    dataset: xr.Dataset
    run_dir: Path
    figures: list[Path]
    seconds: float
    computed: int
    compute_seconds: float = 0.0
    """Wall time of the computation alone (planning done; chunks computed and written), without
    the merge and the figures."""


STALL_SECONDS = float(os.environ.get("MEANFIELD_STALL_SECONDS", "300"))


class _StallWatch:
    """Warn (once per chunk) when a chunk's computation uses no CPU for `STALL_SECONDS`.

    XLA's CPU runtime can wedge its Eigen thread pool on large vmapped graphs (all threads parked, 0%
    CPU; seen once here in a 1200-point Lyapunov sweep, and reported upstream, e.g. PyAutoFit #1530).
    Finished chunks are on disk, so the remedy is to stop and rerun (the run resumes); setting
    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false avoids the wedge at some cost in speed.
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


def _log(msg: str, quiet: bool) -> None:
    print(msg, file=sys.stderr if quiet else sys.stdout, flush=True)


def _chunk_dataset(plan: Plan, cfg: ExperimentConfig, idx: np.ndarray, out: dict) -> xr.Dataset:
    T = out["t"].shape[1]
    t = np.asarray(out["t"])
    depth = t[0] if np.allclose(t, t[:1]) and "simulator.t1" not in plan.axes else np.arange(T)
    data = {}
    for name, arr in out.items():
        arr = np.asarray(arr)
        dims = ("point", "exponent") if name == "lyapunov" else ("point", "depth") if arr.ndim == 2 else ("point",)
        attrs = {}
        if name in OBSERVABLE_ATTRS:
            attrs = {"long_name": OBSERVABLE_ATTRS[name][0], "units": OBSERVABLE_ATTRS[name][1]}
        elif name == "regime":
            attrs = {"long_name": "regime", "flag_values": np.arange(len(REGIMES), dtype=np.int8),
                     "flag_meanings": " ".join(REGIMES)}
        elif name == "blowup_time":
            attrs = {"long_name": "blow-up depth (inf: none; nan: the solve failed)", "units": "depth"}
        elif name == "t":
            attrs = {"long_name": "depth", "units": "depth"}
        elif name == "success":
            attrs = {"long_name": "solver reached t1 or a blow-up event (0: stopped early, e.g. max_steps, or "
                              "non-finite; regime 'failed', observables nan)", "units": "1"}
        data[name] = (dims, arr, attrs)
    coords = {"point": idx, "depth": ("depth", depth, {"long_name": "depth t", "units": "depth"})}
    for axis in plan.axes:
        coords[axis] = ("point", coordinate_array([plan.points[i].get(axis) for i in idx]))
    return xr.Dataset(data, coords=coords, attrs={"config_hash": config_hash(plan.config)})


def group_file_tokens(cfg: ExperimentConfig, source_dir: Path | None) -> np.ndarray | None:
    """The initial tokens of a group whose `initial.kind` is `file` (checked: see `read_tokens_file`), else None."""
    if cfg.initial.kind != "file":
        return None
    f = Path(cfg.initial.path)
    if not f.is_absolute() and source_dir is not None:
        f = source_dir / f
    try:
        return read_tokens_file(f, (cfg.initial.n, cfg.model.d))
    except FileNotFoundError:
        raise ConfigError(f"field `initial.path`: no such file {str(f)!r}") from None
    except ValueError as exc:
        raise ConfigError(f"field `initial.path`: {exc}") from None


def run_plan(plan: Plan, run_dir: Path, *, quiet: bool = False, source_dir: Path | None = None) -> int:
    """Compute every point not yet stored under `run_dir/chunks`; returns the number computed."""
    done = done_points(run_dir, config_hash(plan.config))
    devices = jax.local_devices()
    n_dev = len(devices)
    mesh = Mesh(np.array(devices), ("points",)) if n_dev > 1 else None
    n_proc, proc = jax.process_count(), jax.process_index()
    remaining = sum(int(np.sum(~np.isin(g.indices, list(done)))) for g in plan.groups)
    pause = float(os.environ.get("MEANFIELD_CHUNK_PAUSE", "0"))
    bar = None
    if not quiet and remaining:
        from tqdm.auto import tqdm

        bar = tqdm(total=remaining, unit="pt", desc=plan.config.name, dynamic_ncols=True)
    computed = 0
    chunk_counter = 0
    try:
        for group in plan.groups:
            todo_mask = ~np.isin(group.indices, list(done))
            if not todo_mask.any():
                continue
            cfg = group.config
            size = auto_chunk_size(cfg, n_dev, group.traced_paths)
            file_tokens = group_file_tokens(cfg, source_dir)
            with jax.enable_x64(cfg.dtype == "float64"):
                computed += _run_group(plan, group, cfg, run_dir, size, file_tokens, done, mesh, n_proc, proc,
                                       bar, quiet, pause, chunk_counter, remaining, computed)
                chunk_counter += -(-int(todo_mask.sum()) // size)
    finally:
        if bar is not None:
            bar.close()
    return computed


def _run_group(plan, group, cfg, run_dir, size, file_tokens, done, mesh, n_proc, proc, bar, quiet, pause,
               chunk_counter, remaining, computed_before) -> int:
    """Run the missing points of one group in chunks of `size`; returns the number computed."""
    todo = np.flatnonzero(~np.isin(group.indices, list(done)))
    n_dev = 1 if mesh is None else mesh.devices.size
    orders = None
    if cfg.simulator.kind == "particles" and cfg.simulator.attention_method == "lowrank":
        orders = plan_group_orders(cfg, group, file_tokens)
    if orders is None and _uses_ensemble(cfg, group.traced_paths):
        # The ensemble integrator: each device runs its own pool over its share of the chunk.
        chunk = make_chunk_function(cfg, group.traced_paths, file_tokens, lanes=cfg.output.lanes)
        if mesh is not None:
            chunk = jax.shard_map(chunk, mesh=mesh, in_specs=PartitionSpec("points"), out_specs=PartitionSpec("points"),
                                  check_vma=False)
        fn = jax.jit(chunk)
    elif orders is None:
        fn = jax.jit(jax.vmap(make_point_function(cfg, group.traced_paths, file_tokens)))
    else:
        # One point at a time, unvmapped: each point is its own (crash-safe) chunk, and the in-jit
        # fallback of the low-rank attention stays a real branch.
        one = jax.jit(make_point_function(cfg, group.traced_paths, file_tokens, attention_orders=orders))

        def fn(values):
            outs = [one({p: v[i] for p, v in values.items()}) for i in range(len(values["__point__"]))]
            return jax.tree.map(lambda *a: jnp.stack(a), *outs)

        size = n_dev
        _log(f"[{plan.config.name}] low-rank attention, Chebyshev orders {orders} "
             f"({int(np.prod(orders))} features), one point per chunk", quiet)
    # Equal chunks (one compiled shape) that pad by fewer than one point per chunk and device: a last
    # chunk padded up to the full size would recompute one point thousands of times.
    n_chunks = -(-len(todo) // size)
    size = -(-len(todo) // (n_chunks * n_dev)) * n_dev
    computed = 0
    for k, start in enumerate(range(0, len(todo), size)):
        if (chunk_counter + k) % n_proc != proc:
            continue
        sel = todo[start:start + size]
        sel_padded = np.concatenate([sel, np.repeat(sel[-1:], size - len(sel))])  # no recompile
        values = {p: np.asarray(v[sel_padded]) for p, v in group.values.items()}
        values["__point__"] = group.indices[sel_padded]  # a batch axis even when no number varies
        if mesh is not None:
            sharding = NamedSharding(mesh, PartitionSpec("points"))
            values = {p: jax.device_put(v, sharding) for p, v in values.items()}
        t0 = time.perf_counter()
        with _StallWatch(f"{plan.config.name} chunk {chunk_counter + k}"):
            out = jax.tree.map(lambda a: np.asarray(a)[: len(sel)], fn(values))
        idx = group.indices[sel]
        atomic_write_dataset(_chunk_dataset(plan, cfg, idx, out), chunk_path(run_dir, int(idx.min()), int(idx.max())))
        computed += len(sel)
        if bar is not None:
            bar.update(len(sel))
        else:
            _log(f"[{plan.config.name}] chunk of {len(sel)} points in {time.perf_counter() - t0:.2f} s "
                 f"({computed_before + computed}/{remaining})", quiet)
        if pause:
            time.sleep(pause)
    return computed


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_experiment`: finished chunks are saved in `run_dir`; the same command resumes."""

    def __init__(self, run_dir: Path, done: int, total: int):
        super().__init__(f"{run_dir}: {done} of {total} points saved")
        self.run_dir, self.done, self.total = run_dir, done, total


def check_run_dir(cfg: ExperimentConfig, run_dir: Path, *, overwrite: bool = False) -> str:
    """Refuse an output directory meanfield may not write to (nothing is written here); returns the
    config hash. Allowed: a missing or empty directory, or a run directory (it has run.json) of the
    same config, or of another config with `overwrite`. A file, or a non-empty directory that is not
    a run directory (a user's own files), is refused even with `overwrite`."""
    h = config_hash(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: the output path is a file, not a directory; pass another --out")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return h
    try:
        info = read_run_info(run_dir)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if info is None:
        raise ConfigError(f"{run_dir}: exists, is not empty and is not a meanfield run directory (no run.json); "
                          "meanfield only writes to (and --overwrite only replaces) its own run directories; "
                          "pass another --out")
    if info.get("config_hash") != h and not overwrite:
        raise ConfigError(
            f"{run_dir}: holds a run of a different config (hash {info.get('config_hash')} there, {h} now); "
            "pass --out to write elsewhere, or --overwrite to replace it"
        )
    return h


def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path, *, overwrite: bool = False) -> str:
    """`check_run_dir`, then with `overwrite` remove what meanfield wrote there (`store.RUN_FILES`)
    and nothing else."""
    h = check_run_dir(cfg, run_dir, overwrite=overwrite)
    if overwrite and (run_dir / "run.json").is_file():
        import shutil

        for name in RUN_FILES[1:] + RUN_FILES[:1]:  # run.json last: a crash here leaves a run directory
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return h


def run_experiment(
    source: str | Path | ExperimentConfig,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    plots: bool = True,
) -> RunResult:
    """Validate, plan, run (resuming), merge, plot; returns a `RunResult` (dataset, run_dir, figures, seconds,
    computed). The library call behind `meanfield run`."""
    import importlib.metadata

    t_start = time.perf_counter()
    source_dir = None
    if isinstance(source, ExperimentConfig):
        cfg, src = source, "<config>"
    else:
        cfg, src = load_config(source), str(source)
        source_dir = Path(source).resolve().parent
    plan = make_plan(cfg, source=src)  # every point validated before anything is written
    for group in plan.groups:  # and every initial-token file read and checked
        group_file_tokens(group.config, source_dir)
    run_dir = Path(out or cfg.output.dir or Path("runs") / cfg.name)
    h = prepare_run_dir(cfg, run_dir, overwrite=overwrite)
    try:
        (run_dir / "chunks").mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{run_dir}: cannot write the output directory ({exc.strerror or exc}); pass another --out") from None
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    try:
        version = importlib.metadata.version("meanfield")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    info = {
        "config_hash": h, "name": cfg.name, "n_points": plan.n_points, "meanfield_version": version,
        "jax_version": jax.__version__, "devices": [str(d) for d in jax.devices()],
        "git_commit": git_commit(source_dir or Path.cwd()),
    }
    if jax.process_index() == 0:
        atomic_write_text(config_yaml, run_dir / "config.yaml")
        prev = read_run_info(run_dir) or {}
        atomic_write_text(json.dumps({**prev, **info, "status": "running"}, indent=1), run_dir / "run.json")
    n_done_before = len(done_points(run_dir, h))
    if n_done_before and not quiet:
        _log(f"resuming {run_dir}: {n_done_before} of {plan.n_points} points already done", quiet)
    t_compute = time.perf_counter()
    try:
        computed = run_plan(plan, run_dir, quiet=quiet, source_dir=source_dir)
    except KeyboardInterrupt:
        if jax.process_index() == 0:
            atomic_write_text(json.dumps({**info, "status": "interrupted"}, indent=1), run_dir / "run.json")
        raise RunInterrupted(run_dir, len(done_points(run_dir, h)), plan.n_points) from None
    compute_seconds = time.perf_counter() - t_compute
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("meanfield-merge")
    ds = merge_chunks(run_dir, h)
    ds.attrs.update({
        "name": cfg.name, "description": cfg.description, "config_yaml": config_yaml, "config_hash": h,
        "meanfield_version": version, "jax_version": jax.__version__,
        "devices": ", ".join(info["devices"]), "git_commit": info["git_commit"] or "none",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "simulator": cfg.simulator.kind, "grid_axes": " ".join(plan.grid_axes()),
        "sweep_axes": " ".join(plan.axes),
    })
    figures: list[Path] = []
    if jax.process_index() == 0:
        atomic_write_dataset(ds, run_dir / "results.nc")
        atomic_write_text(json.dumps({**info, "status": "complete"}, indent=1), run_dir / "run.json")
        if plots:
            from .plots import plot_run

            figures = plot_run(ds, cfg, run_dir / "figures")
    return RunResult(ds, run_dir, figures, time.perf_counter() - t_start, computed, compute_seconds)


def summary_table(ds: xr.Dataset) -> str:
    """A short text summary: regime counts overall and along the first sweep axis."""
    reg = ds["regime"].values
    n = reg.size
    lines = [f"{n} points: " + ", ".join(f"{name} {int(np.sum(reg == i))}" for i, name in enumerate(REGIMES))]
    if "blowup_time" in ds and np.any(np.isfinite(ds["blowup_time"].values)):
        bt = ds["blowup_time"].values
        lines.append(f"blow-up depth: min {np.nanmin(bt[np.isfinite(bt)]):.4g}, "
                     f"median {np.median(bt[np.isfinite(bt)]):.4g} over {int(np.isfinite(bt).sum())} points")
    axes = ds.attrs.get("sweep_axes", "").split()
    if axes:
        axis = axes[0]
        vals = ds[axis].values
        uniq = list(dict.fromkeys(vals.tolist()))
        if len(uniq) <= 40:
            header = f"{axis:>24} | " + " | ".join(f"{r:>8}" for r in REGIMES) + " | final " + _final_name(ds)
            lines += [header, "-" * len(header)]
            fin = _final_values(ds)
            for u in uniq:
                sel = vals == u
                counts = " | ".join(f"{int(np.sum(reg[sel] == i)):>8}" for i in range(len(REGIMES)))
                label = f"{u:.4g}" if isinstance(u, float) else str(u)
                mean = np.mean(fin[sel][np.isfinite(fin[sel])]) if np.isfinite(fin[sel]).any() else np.nan
                lines.append(f"{label:>24} | {counts} | {mean:.4g}")
    return "\n".join(lines)


def _final_name(ds) -> str:
    for name in ("effective_rank", "cov_trace", "corr_mean"):
        if name in ds:
            return name
    return "t"


def _final_values(ds) -> np.ndarray:
    from .plots import final_values

    return final_values(ds[_final_name(ds)]).values
