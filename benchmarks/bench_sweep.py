"""Sweep engine vs a Python loop over the same per-point library call (issue: >= 20x).

Two workloads, each timed in this one process:

- 10,000 Gaussian-moment points (d = 4, random Q, K, V, W per seed, beta swept), t1 = 4;
- 1,024 particle points (n = 64, d = 8, softmax + GELU MLP, spectral ratio swept), t1 = 5.

Engine: `run_experiment` on a YAML-equivalent config, wall time including planning, compilation,
chunk I/O and the final merge (plots off). Loop: for each point, build the Model with the
documented seeding (`Model.random(fold_in(key(seed), 0), ...)`), call `simulate_gaussian` /
`simulate_particles`, compute the final observable and the regime, as a user would in a notebook.
The loop is timed on a subset (after one warm-up call, so its compile is not counted against it) and
reported as points/s.

    python benchmarks/bench_sweep.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import meanfield as mf
from meanfield.sweep.plan import config_from_dict
from meanfield.sweep.run import run_experiment


def gaussian_config(n_beta: int, n_seed: int) -> dict:
    return {
        "name": "bench_gaussian",
        "model": {"d": 4, "attention": "softmax", "mlp": "affine"},
        "initial": {"kind": "gaussian", "mean": 0.2, "cov": 0.5},
        "simulator": {"kind": "gaussian", "t1": 4.0, "n_save": 11},
        "observables": ["cov_trace", "effective_rank"],
        "sweep": {"grid": {"model.beta": {"lin": [0.1, 2.0, n_beta]}, "seed": {"range": [0, n_seed, 1]}}},
        "plots": {"curves": None},
    }


def particle_config(n_rho: int, n_seed: int) -> dict:
    return {
        "name": "bench_particles",
        "model": {"d": 8, "attention": "softmax", "mlp": "two_layer", "activation": "gelu"},
        "initial": {"kind": "gaussian", "n": 64, "cov": 0.125},
        "simulator": {"kind": "particles", "t1": 5.0, "n_save": 11},
        "observables": ["effective_rank"],
        "sweep": {"grid": {"model.spectral_ratio": {"log": [0.05, 20.0, n_rho]}, "seed": {"range": [0, n_seed, 1]}}},
        "plots": {"curves": None},
    }


def loop_gaussian(points: list[tuple[float, int]]) -> None:
    d = 4
    for beta, seed in points:
        key = jax.random.key(seed)
        model = mf.Model.random(jax.random.fold_in(key, 0), d, mlp="affine", beta=beta)
        sol = mf.simulate_gaussian(model, jnp.full((d,), 0.2), 0.5 * jnp.eye(d), 4.0, n_save=11)
        float(mf.metrics.cov_trace(sol.covs[-1]))
        int(mf.classify(sol))


def particle_point(rho: float, seed: int, d: int = 8, n: int = 64):
    """(Model, X0) of one point of `particle_config`'s sweep, seeded as the sweep seeds it."""
    key = jax.random.key(seed)
    model = mf.with_spectral_ratio(mf.Model.random(jax.random.fold_in(key, 0), d), rho)
    return model, mf.gaussian_tokens(jax.random.fold_in(key, 1), n, jnp.zeros(d), 0.125 * jnp.eye(d))


def loop_particles(points: list[tuple[float, int]]) -> None:
    for rho, seed in points:
        model, X0 = particle_point(rho, seed)
        sol = mf.simulate_particles(model, X0, 5.0, n_save=11)
        float(mf.metrics.effective_rank(sol.xs[-1]))
        int(mf.classify(sol))


def measure(name, raw, loop_fn, loop_points, n_points) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run_experiment(config_from_dict(raw), out=Path(tmp) / "run", quiet=True, plots=False)
        engine_s = time.perf_counter() - t0
        assert res.dataset.sizes["point"] == n_points
    loop_fn(loop_points[:1])  # warm-up: compile the per-point path once
    t0 = time.perf_counter()
    loop_fn(loop_points)
    loop_s = time.perf_counter() - t0
    engine_rate = n_points / engine_s
    loop_rate = len(loop_points) / loop_s
    return {"workload": name, "points": n_points, "engine_s": engine_s, "engine_points_per_s": engine_rate,
            "loop_points_timed": len(loop_points), "loop_s": loop_s, "loop_points_per_s": loop_rate,
            "ratio": engine_rate / loop_rate, "target": 20.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 Gaussian and 128 particle points")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.quick:
        g_beta, g_seed, p_rho, p_seed, g_loop, p_loop = 10, 100, 8, 16, 50, 16
    else:
        g_beta, g_seed, p_rho, p_seed, g_loop, p_loop = 100, 100, 32, 32, 200, 64
    rng = np.random.default_rng(0)
    g_pts = [(float(b), int(s)) for b, s in zip(rng.uniform(0.1, 2.0, g_loop), rng.integers(0, g_seed, g_loop))]
    p_pts = [(float(r), int(s)) for r, s in zip(np.exp(rng.uniform(np.log(0.05), np.log(20), p_loop)), rng.integers(0, p_seed, p_loop))]
    print(f"jax {jax.__version__} on {jax.devices()}")
    print(f"{'workload':22} {'points':>7} {'engine s':>9} {'engine pt/s':>12} {'loop pt/s':>10} {'ratio':>7} {'target':>7}  met",
          flush=True)
    rows = []
    for args_ in (("gaussian d=4", gaussian_config(g_beta, g_seed), loop_gaussian, g_pts, g_beta * g_seed),
                  ("particles n=64 d=8", particle_config(p_rho, p_seed), loop_particles, p_pts, p_rho * p_seed)):
        r = measure(*args_)
        rows.append(r)
        print(f"{r['workload']:22} {r['points']:>7} {r['engine_s']:>9.2f} {r['engine_points_per_s']:>12.1f} "
              f"{r['loop_points_per_s']:>10.1f} {r['ratio']:>7.1f} {r['target']:>7.0f}  {'yes' if r['ratio'] >= r['target'] else 'NO'}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
