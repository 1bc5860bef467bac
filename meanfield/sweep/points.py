"""Point functions of a sweep group: numbers -> Model and initial state -> simulate -> outputs.

For each group (points that share shapes and options) the point function

    numbers -> build Model and initial state -> simulate -> observables over depth, regime

is compiled once. `make_chunk_function` runs a chunk of a group's points at once (the ensemble
integrator for particles and moments, swept depths included); `make_point_function` is the unbatched
reference (vmapped for the shaped SDE, called point by point for low-rank attention).
`auto_chunk_size` sizes a group's chunks from the memory budget.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import metrics
from ..regimes import FAILED, classify, judged_save, particle_regime, regime_code
from ..model.attention import LowRank, direct_evaluator
from ..simulate.attention_policy import AUTO_MIN_TOKENS, lowrank_is_faster, resolve_attention
from ..simulate.gaussian import simulate_gaussian
from ..simulate.particles import simulate_particles
from .build import build_model, initial_moments, initial_tokens, point_config, point_keys
from .config import ExperimentConfig, SimulatorConfig
from .plan import memory_estimate


def _dtype(cfg: ExperimentConfig):
    """float32, or float64 (the caller runs the group inside `jax.enable_x64(True)`)."""
    return jnp.float64 if cfg.dtype == "float64" else jnp.float32


def _gaussian_observables(names, means, covs):
    """The named observables (`metrics.OBSERVABLES[name].gaussian`) of saved moments (T, d), (T, d, d)."""
    return {n: jax.vmap(metrics.OBSERVABLES[n].gaussian)(means, covs).astype(means.dtype) for n in names}


def _shaped_point_function(cfg: ExperimentConfig, traced_paths):
    """Kernel SDE of the shaped transformer: correlation statistics over depth for one point."""
    from ..shaped.sde import simulate_shaped_sde

    dtype = _dtype(cfg)
    sim, sh, reg = cfg.simulator, cfg.shaped, cfg.regimes
    names = cfg.observable_names()

    def point(values):
        pc = point_config(cfg, {p: values[p] for p in traced_paths})
        t = pc.shaped
        m = sh.m
        V0 = (1.0 - t.corr0) * jnp.eye(m, dtype=dtype) + t.corr0 * jnp.ones((m, m), dtype)
        _, key = point_keys(pc.seed)
        sol = simulate_shaped_sde(
            key, V0, sim.t1, dt=sim.dt0, gamma_attn2=t.gamma_attn2, gamma_mlp2=t.gamma_mlp2,
            tau0=t.tau0, c_plus=t.c_plus, c_minus=t.c_minus, n_paths=sh.n_paths, n_save=sim.n_save,
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


def _point_model(cfg: ExperimentConfig, traced_paths, values, dtype):
    """One point's typed config, its `Model` and its initial-condition key: the group's config with
    the point's numbers (traced or concrete) in place (`build.point_config`), weights from key(seed)
    folded with 0."""
    pc = point_config(cfg, {p: values[p] for p in traced_paths})
    wkey, ikey = point_keys(pc.seed)
    return pc, build_model(pc.model, wkey, dtype), ikey


def may_use_lowrank(cfg: ExperimentConfig) -> bool:
    """Whether a particle group's `simulator.attention` may plan the low-rank sum (from the config
    alone): `lowrank`, or `auto` with at least `AUTO_MIN_TOKENS` tokens and softmax or unnormalised
    attention. Such a group runs point by point (`plan_group_attention` decides)."""
    sim = cfg.simulator
    if sim.kind != "particles" or cfg.model is None:
        return False
    if sim.attention.kind == "lowrank":
        return True
    return (sim.attention.kind == "auto" and cfg.initial.n >= AUTO_MIN_TOKENS
            and cfg.model.attention not in ("shaped", "none"))


def plan_group_attention(cfg: ExperimentConfig, group, file_tokens=None) -> LowRank | None:
    """The low-rank evaluator of a whole group, or None for the direct sum: every point's concrete model
    and initial tokens resolved (`resolve_attention` of `simulator.attention`), the orders the
    elementwise maximum (all points, not only missing ones, so a resumed run compiles the same
    function). None (for `lowrank`, with the planner's warning) when some point does not resolve to
    the low-rank sum, or, for `auto`, when the group's orders are not faster than the direct sum."""
    if not may_use_lowrank(cfg):
        return None
    spec = cfg.simulator.attention
    dtype = _dtype(cfg)
    orders, chosen, n = None, None, None
    for i in range(len(group.indices)):
        values = {p: np.asarray(group.values[p])[i] for p in group.traced_paths}
        pc, model, ikey = _point_model(cfg, group.traced_paths, values, dtype)
        X0 = initial_tokens(pc.initial, cfg.model.d, ikey, dtype, file_tokens)
        chosen = resolve_attention(spec.evaluator(), model, X0)
        if not isinstance(chosen, LowRank):
            return None
        n = X0.shape[0]
        orders = chosen.orders if orders is None else tuple(max(a, b) for a, b in zip(orders, chosen.orders))
    if chosen is None or (spec.kind == "auto" and not lowrank_is_faster(n, cfg.model.d, orders)):
        return None
    return LowRank(orders=orders, rtol=chosen.rtol, fallback=chosen.fallback)


def _direct_attention(sim: SimulatorConfig, n: int):
    """The direct-sum evaluator of a group that runs no low-rank sum (n tokens)."""
    return sim.attention.evaluator() if sim.attention.kind in ("dense", "blocked") else direct_evaluator(n)


def _particle_outputs(names, reg, ts, xs, success, blown_up, t_end):
    """One point's sweep outputs from its saved tokens xs (T, n, d): observables over depth, regime, blow-up depth.

    A failed solve (neither t1 nor a blow-up event reached, or a non-finite final state) gets the
    FAILED regime and NaN observables and blow-up depth: its numbers describe the numerics, not the model."""
    wanted = list(dict.fromkeys(names + ["rank_one_distance", "rms_norm"]))
    reached = jnp.all(jnp.isfinite(xs), axis=(-2, -1))
    safe = jnp.where(reached[:, None, None], xs, 0.0)

    def observe(X):
        return {n: metrics.OBSERVABLES[n].particles(X).astype(X.dtype) for n in wanted}

    o = {k: jnp.where(reached, v, jnp.nan) for k, v in jax.vmap(observe)(safe).items()}
    growth = o["rms_norm"] / o["rms_norm"][0]
    over = reached & (growth > reg.growth_limit)  # unreached saves are not a blow-up
    first_over = jnp.where(jnp.any(over), ts[jnp.argmax(over)], jnp.inf)
    blowup_time = jnp.where(blown_up, jnp.minimum(first_over, t_end), first_over)
    last = judged_save(reached, blown_up)  # the rule of `classify`, on the saved observables
    regime = particle_regime(o["rank_one_distance"][last], o["rms_norm"][last], o["rms_norm"][0], blown_up,
                             failed=~success, collapse_tol=reg.collapse_tol, growth_limit=reg.growth_limit)
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


def _solver_kwargs(s: SimulatorConfig) -> dict:
    return dict(n_save=s.n_save, solver=s.solver, dt0=s.dt0, rtol=s.rtol, atol=s.atol, max_steps=s.max_steps)


def _group_context(cfg: ExperimentConfig):
    """(dtype, observable names, simulator, regimes, d) of a particle/Gaussian group."""
    return _dtype(cfg), cfg.observable_names(), cfg.simulator, cfg.regimes, cfg.model.d


def make_point_function(cfg: ExperimentConfig, traced_paths, file_tokens=None, attention=None):
    """The per-point function `numbers -> outputs` for one group (unbatched). `make_chunk_function`
    runs a whole chunk through the ensemble integrator instead; this one is what the low-rank
    attention path (`attention` from `plan_group_attention`) calls point by point, and the
    reference the batched path is tested against. Without `attention`, the direct sum."""
    if cfg.simulator.kind == "shaped_sde":
        return _shaped_point_function(cfg, traced_paths)
    dtype, names, sim, reg, d = _group_context(cfg)

    def point(values):
        pc, model, ikey = _point_model(cfg, traced_paths, values, dtype)
        s = pc.simulator
        if sim.kind == "gaussian":
            m0, S0 = initial_moments(pc.initial, d, dtype)
            sol = simulate_gaussian(model, m0, S0, s.t1, blowup_threshold=s.blowup_threshold, **_solver_kwargs(s))
            out = _gaussian_outputs(names, reg, sol)
            if sim.lyapunov is not None:
                from ..lyapunov import gaussian_lyapunov

                out["lyapunov"] = _lyapunov_values(gaussian_lyapunov(model, m0, S0, sim.t1, **_lyapunov_kwargs(sim, ikey)))
            return out
        X0 = initial_tokens(pc.initial, d, ikey, dtype, file_tokens)
        evaluator = _direct_attention(s, X0.shape[0]) if attention is None else attention
        sol = simulate_particles(model, X0, s.t1, attention=evaluator,
                                 blowup_growth=100 * reg.growth_limit, **_solver_kwargs(s))
        out = _particle_outputs(names, reg, sol.ts, sol.xs, sol.success, sol.blown_up, sol.t_end)
        if sim.lyapunov is not None:
            from ..lyapunov import particle_lyapunov

            out["lyapunov"] = _lyapunov_values(particle_lyapunov(
                model, X0, sim.t1, attention=evaluator, **_lyapunov_kwargs(sim, ikey)))
        return out

    return point


def make_chunk_function(cfg: ExperimentConfig, traced_paths, file_tokens=None, lanes: int | None = None):
    """`numbers (B,) -> outputs (B, ...)` for a chunk of one group: every point's Model and initial
    state built in one vmap, then ONE batched solve on the ensemble integrator (each point steps on
    its own; finished points are replaced from the chunk's queue), then the observables of the saved
    states. Particles and Gaussian moments; the numbers equal `make_point_function`'s up to the
    rounding of batched arithmetic. Lyapunov exponents (a QR solve of their own) stay vmapped."""
    dtype, names, sim, reg, d = _group_context(cfg)
    s = cfg.simulator
    per_point_t1 = "simulator.t1" in traced_paths  # a swept depth: each point solves to its own t1

    def setup(values):
        pc, model, ikey = _point_model(cfg, traced_paths, values, dtype)
        if sim.kind == "gaussian":
            return model, initial_moments(pc.initial, d, dtype), ikey, pc.simulator.t1
        return model, initial_tokens(pc.initial, d, ikey, dtype, file_tokens), ikey, pc.simulator.t1

    def chunk(values):
        models, init, ikeys, t1s = jax.vmap(setup)(values)
        t1 = t1s if per_point_t1 else sim.t1
        if sim.kind == "gaussian":
            m0, S0 = init
            sol = simulate_gaussian(models, m0, S0, t1, blowup_threshold=s.blowup_threshold, lanes=lanes,
                                    **_solver_kwargs(s))
            sol = eqx.tree_at(lambda g: g.ts, sol, jnp.broadcast_to(sol.ts, sol.means.shape[:2]))
            out = jax.vmap(lambda g: _gaussian_outputs(names, reg, g))(sol)
            if sim.lyapunov is not None:
                from ..lyapunov import gaussian_lyapunov

                out["lyapunov"] = jax.vmap(lambda m, a, b, k: _lyapunov_values(
                    gaussian_lyapunov(m, a, b, sim.t1, **_lyapunov_kwargs(sim, k))))(models, m0, S0, ikeys)
            return out
        attention = _direct_attention(s, init.shape[-2])
        sol = simulate_particles(models, init, t1, attention=attention,
                                 blowup_growth=100 * reg.growth_limit, lanes=lanes, **_solver_kwargs(s))
        # Observables of the saved states, 256 points at a time (some are O(n^2) per state).
        ts = jnp.broadcast_to(sol.ts, sol.t_end.shape + sol.ts.shape[-1:])
        out = jax.lax.map(lambda a: _particle_outputs(names, reg, *a),
                          (ts, sol.xs, sol.success, sol.blown_up, sol.t_end), batch_size=256)
        if sim.lyapunov is not None:
            from ..lyapunov import particle_lyapunov

            out["lyapunov"] = jax.vmap(lambda m, x, k: _lyapunov_values(particle_lyapunov(
                m, x, sim.t1, attention=attention, **_lyapunov_kwargs(sim, k))))(models, init, ikeys)
        return out

    return chunk


MAX_AUTO_CHUNK = 256
"""Points per chunk for vmapped (lockstep) groups: the shaped SDE, low-rank attention."""
MAX_ENSEMBLE_CHUNK = 8192
"""Points per chunk on the ensemble integrator: the queue a pool of lanes works through (bigger
queues shorten the tail after it empties; chunks stay small enough to be crash-safe)."""


def uses_ensemble(cfg: ExperimentConfig, traced_paths=(), point_by_point: bool = False) -> bool:
    """Whether a group runs on the ensemble integrator (`make_chunk_function`) rather than a vmap of
    `make_point_function`: particles and moments (a swept depth too: each point solves to its own t1),
    except groups run point by point (low-rank attention, `schedule.point_by_point`)."""
    return cfg.simulator.kind in ("particles", "gaussian") and not point_by_point


def auto_chunk_size(cfg: ExperimentConfig, n_devices: int, traced_paths=()) -> int:
    """Points per batch from `output.memory_budget_gb` and a per-point memory estimate."""
    if cfg.output.chunk_size:
        size = cfg.output.chunk_size
    else:
        budget = cfg.output.memory_budget_gb * 2**30
        ensemble = uses_ensemble(cfg, traced_paths)
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
