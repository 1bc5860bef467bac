"""Run a planned sweep: one jit-compiled, vmapped function per group, chunked, sharded, resumable.

For each group (points that share shapes and options) the point function

    numbers -> build Model and initial state -> simulate -> observables over depth, regime

runs a chunk of a group's points at once (`make_chunk_function`: the ensemble integrator for particles
and moments; a vmap for the rest) and is compiled once per group. `schedule.run_plan` decides which
process computes which chunk (claim files; chunks sharded over the local devices along a `points`
mesh axis) and writes each finished chunk atomically; `run_experiment` is the run's lifecycle:
validate, check the output directory, compute, merge (process 0), run.json, figures.
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

from .. import metrics
from ..regimes import FAILED, REGIMES, classify, regime_code
from ..simulate.gaussian import simulate_gaussian
from ..simulate.particles import simulate_particles
from .build import build_model, initial_moments, initial_tokens, point_keys
from .config import ExperimentConfig
from .plan import ConfigError, Plan, config_hash, load_config, make_plan, memory_estimate, set_path
from .store import (
    RUN_FILES, ChunkIndex, atomic_write_dataset, atomic_write_text, coordinate_array, git_commit, merge_chunks,
    read_run_info, read_tokens_file,
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
    dataset: xr.Dataset | None
    """The merged results (None in a process other than 0 of a distributed run: process 0 merges)."""
    run_dir: Path
    figures: list[Path]
    seconds: float
    computed: int
    compute_seconds: float = 0.0
    """Wall time of the computation alone (planning done; chunks computed and written), without
    the merge and the figures."""
    stats: object = None
    """This process's `schedule.WorkStats`: points and chunks computed, busy and wall seconds."""


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


def _chunk_dataset(plan: Plan, cfg: ExperimentConfig, idx: np.ndarray, out: dict, h: str) -> xr.Dataset:
    """One chunk's outputs as a dataset over its points, stamped with the run's config hash `h`."""
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
    return xr.Dataset(data, coords=coords, attrs={"config_hash": h})


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


def _register_run(run_dir: Path, h: str, info: dict) -> None:
    """Create run.json exclusively (a hard link of a finished temporary file: atomic, fails if it
    exists), so two configs started at once on one directory cannot both pass `check_run_dir`; if it
    exists, its config must be ours. Process 0 then marks the run as running."""
    from .claims import HOST

    target = run_dir / "run.json"
    tmp = run_dir / f".run.json.{HOST}-{os.getpid()}"
    tmp.write_text(json.dumps({**info, "status": "running"}, indent=1))
    try:
        try:
            os.link(tmp, target)
            return
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive creation, written in place
            try:
                fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(tmp.read_text())
                return
            except FileExistsError:
                pass
    finally:
        tmp.unlink(missing_ok=True)
    try:
        prev = read_run_info(run_dir) or {}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if prev.get("config_hash") != h:
        raise ConfigError(f"{run_dir}: another process started a run of a different config here (hash "
                          f"{prev.get('config_hash')}, {h} now); pass another --out")
    if jax.process_index() == 0:
        atomic_write_text(json.dumps({**prev, **info, "status": "running"}, indent=1), target)


def _run_info(cfg: ExperimentConfig, plan: Plan, h: str, source_dir: Path | None) -> dict:
    import importlib.metadata

    try:
        version = importlib.metadata.version("meanfield")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "config_hash": h, "name": cfg.name, "n_points": plan.n_points, "meanfield_version": version,
        "jax_version": jax.__version__, "devices": [str(d) for d in jax.devices()],
        "git_commit": git_commit(source_dir or Path.cwd()),
    }


def run_experiment(
    source: str | Path | ExperimentConfig,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    plots: bool = True,
) -> RunResult:
    """Validate, plan, run (resuming), merge, plot; returns a `RunResult` (dataset, run_dir, figures, seconds,
    computed). The library call behind `meanfield run`.

    Under `jax.distributed` (or with several commands on one shared directory) every process computes
    the chunks it can claim (`schedule.run_plan`) until every point is stored; process 0 then merges,
    writes run.json (with each process's busy time) and draws the figures, and the others return a
    `RunResult` without a dataset."""
    from . import distributed
    from .schedule import run_plan

    t_start = time.perf_counter()
    source_dir = None
    if isinstance(source, ExperimentConfig):
        cfg, src = source, "<config>"
    else:
        cfg, src = load_config(source), str(source)
        source_dir = Path(source).resolve().parent
    plan = make_plan(cfg, source=src)  # every point validated before anything is written
    tokens = {gi: group_file_tokens(g.config, source_dir)  # and every initial-token file read and checked
              for gi, g in enumerate(plan.groups)}
    run_dir = Path(out or cfg.output.dir or Path("runs") / cfg.name)
    proc = jax.process_index()
    h = (prepare_run_dir if proc == 0 else check_run_dir)(cfg, run_dir, overwrite=overwrite)
    distributed.barrier("meanfield-prepared")  # process 0 has removed what --overwrite replaces
    try:
        (run_dir / "chunks").mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{run_dir}: cannot write the output directory ({exc.strerror or exc}); pass another --out") from None
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    info = _run_info(cfg, plan, h, source_dir)
    _register_run(run_dir, h, info)
    if proc == 0:
        atomic_write_text(config_yaml, run_dir / "config.yaml")
    launch = distributed.launch_id()
    index = ChunkIndex(run_dir, h, plan.n_points)
    n_done_before = index.n_done
    if n_done_before and not quiet:
        _log(f"resuming {run_dir}: {n_done_before} of {plan.n_points} points already done", quiet)
    t_compute = time.perf_counter()
    try:
        stats = run_plan(plan, run_dir, index, tokens, quiet=quiet, launch=launch)
    except KeyboardInterrupt:
        if proc == 0:
            prev = read_run_info(run_dir) or info
            atomic_write_text(json.dumps({**prev, "status": "interrupted"}, indent=1), run_dir / "run.json")
        raise RunInterrupted(run_dir, index.refresh().n_done, plan.n_points) from None
    compute_seconds = time.perf_counter() - t_compute
    stats_dir = run_dir / "processes" / launch
    stats_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(stats.record()), stats_dir / f"process-{proc}.json")
    if proc != 0:  # process 0 merges (it must leave last: it hosts JAX's coordination service)
        return RunResult(None, run_dir, [], time.perf_counter() - t_start, stats.points, compute_seconds, stats)
    ds, figures, procs = finish_run(run_dir, cfg, plan, info, config_yaml, launch=launch, n_proc=jax.process_count(),
                                    plots=plots)
    computed = sum(p["points"] for p in procs) if len(procs) > 1 else stats.points  # by every process of the launch
    return RunResult(ds, run_dir, figures, time.perf_counter() - t_start, computed, compute_seconds, stats)


STATS_WAIT_SECONDS = 5.0


def _gather_stats(run_dir: Path, launch: str | None, n_proc: int) -> list[dict]:
    """The launch's per-process records (waiting briefly for peers that are still writing theirs)."""
    if launch is None:
        return []
    d = run_dir / "processes" / launch
    deadline = time.perf_counter() + STATS_WAIT_SECONDS
    while len(list(d.glob("process-*.json"))) < n_proc and time.perf_counter() < deadline:
        time.sleep(0.2)
    out = []
    for f in sorted(d.glob("process-*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            pass
    return sorted(out, key=lambda r: r.get("process", 0))


def finish_run(run_dir: Path, cfg: ExperimentConfig, plan: Plan, info: dict, config_yaml: str, *,
               launch: str | None = None, n_proc: int = 1, plots: bool = True):
    """Merge every chunk into results.nc, complete run.json (with the processes' busy times) and draw
    the figures; (dataset, figure paths, per-process records). Done once, by one process, after every
    point is stored."""
    import shutil

    h = info["config_hash"]
    ds = merge_chunks(run_dir, h)
    ds.attrs.update({
        "name": cfg.name, "description": cfg.description, "config_yaml": config_yaml, "config_hash": h,
        "meanfield_version": info["meanfield_version"], "jax_version": info["jax_version"],
        "devices": ", ".join(info["devices"]), "git_commit": info["git_commit"] or "none",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "simulator": cfg.simulator.kind, "grid_axes": " ".join(plan.grid_axes()),
        "sweep_axes": " ".join(plan.axes),
    })
    atomic_write_dataset(ds, run_dir / "results.nc")
    record = {**info, "status": "complete"}
    procs = _gather_stats(run_dir, launch, n_proc)
    if procs:
        walls = [p["wall_seconds"] for p in procs]
        busy = [p["busy_seconds"] for p in procs]
        record["processes"] = procs
        record["load_balance"] = {
            "processes": len(procs), "processes_launched": n_proc, "slowest_wall_seconds": max(walls),
            "mean_busy_seconds": round(sum(busy) / len(busy), 3),
            "idle_fraction_of_slowest": round(1 - busy[walls.index(max(walls))] / max(walls), 4) if max(walls) > 0 else 0.0,
        }
    atomic_write_text(json.dumps(record, indent=1), run_dir / "run.json")
    shutil.rmtree(run_dir / "claims", ignore_errors=True)
    shutil.rmtree(run_dir / "processes", ignore_errors=True)
    figures: list[Path] = []
    if plots:
        from .plots import plot_run

        figures = plot_run(ds, cfg, run_dir / "figures")
    return ds, figures, procs


def merge_run(run_dir: str | Path, *, plots: bool = True) -> RunResult:
    """Finish a run whose workers stopped after computing every chunk (e.g. preempted before the
    merge): merge, run.json, figures. Refuses (ConfigError) a directory with missing points, saying
    how to compute them. The library call behind `meanfield merge DIR`."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    try:
        info = read_run_info(run_dir)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if info is None or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a meanfield run directory (no run.json and config.yaml)")
    source = str(run_dir / "config.yaml")
    cfg = load_config(source, check_files=False)
    h = config_hash(cfg)
    if info.get("config_hash") != h:
        raise ConfigError(f"{run_dir}: config.yaml (hash {h}) is not the config of run.json ({info.get('config_hash')})")
    plan = make_plan(cfg, source=source)
    missing = plan.n_points - ChunkIndex(run_dir, h, plan.n_points).n_done
    if missing:
        raise ConfigError(f"{run_dir}: {missing} of {plan.n_points} points are not computed yet; compute them with "
                          f"`meanfield run {source} --out {run_dir}` (any number of processes), which also merges")
    info = {**info, **{k: v for k, v in _run_info(cfg, plan, h, None).items() if k not in info}}
    ds, figures, _ = finish_run(run_dir, cfg, plan, info, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
                                plots=plots)
    return RunResult(ds, run_dir, figures, time.perf_counter() - t0, 0, 0.0)


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
