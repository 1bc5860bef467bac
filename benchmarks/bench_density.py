"""Density PDE vs particles at equal Wasserstein accuracy, t = 10 (tokens on the circle).

    python benchmarks/bench_density.py            # about 5-10 minutes on 2 CPU cores
    python benchmarks/bench_density.py --quick    # n = 10^4 instead of 10^5

1. Reference: `simulate_density` in float64, tail_tol 1e-9, rtol 1e-12, to t = 10.
2. Particle error at n tokens: mean over seeds of W1(particles(t=10), reference), particles sampled
   i.i.d. from rho0 and run with `simulate_angles` (the particle field in O(nP), same field as
   `simulate_particles` to rounding).
3. The smallest fixed N (no refinement) whose PDE solution has W1(rho_N, reference) <= that error.
4. Timings in this process (compile excluded, median of rounds): the PDE at that N to t = 10;
   `simulate_particles` (the library's O(n^2) path, blocked attention) measured for ONE field
   evaluation at n tokens and scaled to a full RK4 run (4 evaluations per step, dt = 0.1, 100 steps:
   a scaled estimate, not a full run); `simulate_angles` at n measured in full.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import meanfield as mf  # noqa: E402
from meanfield.density import (sample_density, simulate_angles, simulate_density, von_mises_mixture,  # noqa: E402
                               w1_densities, w1_samples_density)
from meanfield.density import grid as G  # noqa: E402

T = 10.0


def model():
    # general (non-symmetric) Q, K, repulsive V: the density spreads and drifts but stays smooth to
    # t = 10 (attractive models concentrate and need N > 4096 by then, see the README)
    Q = np.array([[1.0, 0.3], [-0.2, 0.8]])
    K = np.array([[0.9, -0.4], [0.1, 1.1]])
    V = -0.5 * np.array([[1.0, 0.2], [-0.3, 0.7]])
    return mf.Model(Q=Q, K=K, V=V, beta=1.0, norm="sphere", dtype=jnp.float64)


DENSITY0 = von_mises_mixture([0.5, 2.5], [2.0, 4.0], [0.6, 0.4])


def timed(fn, rounds=3):
    fn()  # warm-up / compile
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return statistics.median(out), min(out), max(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 10_000 if args.quick else 100_000
    seeds = 2 if args.quick else 3
    m = model()
    print(f"load average at start: {os.getloadavg()}")
    ref = simulate_density(m, DENSITY0, T, n_save=2, tail_tol=1e-9, rtol=1e-12, atol=1e-14)
    density_ref = ref.density[-1]
    print(f"reference: N = {ref.modes.tolist()}, resolved = {ref.resolved}, tail = {ref.tail[-1]:.1e}, "
          f"mass error = {abs(ref.mass[-1] - 1):.1e}, peaks = {ref.peaks()[-1]}")
    ws = []
    for s in range(seeds):
        th0 = sample_density(jax.random.key(s), DENSITY0, n, dtype=jnp.float64)
        _, th, steps_angles = simulate_angles(m, th0, T, n_save=2)
        ws.append(float(w1_samples_density(th[-1], density_ref)))
    w_target = float(np.mean(ws))
    print(f"particles n = {n}: W1 to the reference at t = {T:g}: {w_target:.3e} (seeds: {np.round(ws, 5).tolist()})")
    chosen = None
    for N in (8, 12, 16, 20, 24, 32, 48, 64, 96, 128):
        sol = simulate_density(m, DENSITY0, T, n_save=2, modes=N, on_underresolved="warn", tail_tol=1.0, rtol=1e-6,
                               atol=1e-8)
        w = float(w1_densities(sol.density[-1], density_ref))
        print(f"  PDE N = {N:4d}: W1 to reference = {w:.3e}, steps = {sol.num_steps}")
        if w <= w_target:
            chosen = N
            break
    run_pde = lambda: simulate_density(m, DENSITY0, T, n_save=2, modes=chosen, on_underresolved="warn",  # noqa: E731
                                       tail_tol=1.0, rtol=1e-6, atol=1e-8).density
    t_pde = timed(run_pde)
    th0 = sample_density(jax.random.key(0), DENSITY0, n, dtype=jnp.float64)
    run_angles = lambda: simulate_angles(m, th0, T, n_save=2)[1]  # noqa: E731
    t_ang = timed(run_angles, rounds=2)
    X0 = G.to_tokens(th0)
    field = jax.jit(lambda X: mf.token_velocity(m, X, attention=mf.Blocked(block_size=2048)))
    t_eval = timed(lambda: field(X0), rounds=1)
    steps = 100
    t_part = 4 * steps * t_eval[0]
    print(f"PDE at N = {chosen} to t = {T:g}: median {t_pde[0]:.3f} s (min {t_pde[1]:.3f}, max {t_pde[2]:.3f})")
    print(f"simulate_angles n = {n} to t = {T:g}: median {t_ang[0]:.2f} s ({int(steps_angles)} Tsit5 steps)")
    print(f"simulate_particles n = {n}: one field evaluation {t_eval[0]:.2f} s -> RK4 dt = 0.1 (100 steps, "
          f"400 evaluations) estimated {t_part:.0f} s")
    print(f"ratio particles (simulate_particles, scaled) / PDE: {t_part / t_pde[0]:.3g}")
    print(f"ratio particles (simulate_angles, measured) / PDE: {t_ang[0] / t_pde[0]:.3g}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
