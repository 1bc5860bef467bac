r"""Particles converge to the density PDE: W1(empirical measure of n particles, rho(t)) ~ n^-1/2.

Tokens on the circle, general (non-symmetric) Q, K, V, softmax attention, beta = 1. density0 is a
von Mises mixture; n tokens are sampled i.i.d. from it and run with the particle ODE (angle form,
`meanfield.density.simulate_angles`, the same field as `simulate_particles` to rounding, checked
here at n = 300); the PDE is solved by `simulate_density`. At t = T we measure the exact circle
W1 distance (`w1_samples_density`) for n = 10^2 .. 10^5, R seeds each, and fit
log W1 = a + b log n. Expected b = -1/2 (the i.i.d. fluctuations of the initial sample, carried
by a Lipschitz flow). Tolerance 0.1: W1 of one run fluctuates by ~35% (it is the L1 norm of a
Brownian-bridge-like process), the mean of R = 8 by ~12%, which over three decades and 7 points
gives a slope standard error of about 0.025; 0.1 is four of those.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..density import grid as G
from ..density import sample_density, simulate_angles, simulate_density, von_mises_mixture, w1_samples_density
from .style import save_figure

NAME = "density_convergence"
Q = np.array([[1.0, 0.3], [-0.2, 0.8]])
K = np.array([[0.9, -0.4], [0.1, 1.1]])
V = np.array([[1.0, 0.2], [-0.3, 0.7]])


def experiment(ns, seeds: int, T: float = 1.0, shared: int | None = None):
    """W1 at t = 0 and t = T for each n (mean, std over seeds), the PDE solution, timings.

    n <= `shared` run as the first n of `shared` tokens (the rest zero-weight tracers) so they
    share one compiled solve."""
    import meanfield as mf

    model = mf.Model(Q=Q, K=K, V=V, beta=1.0, norm="sphere", dtype=jnp.float64)
    density0 = von_mises_mixture([0.0, 2.5], [2.0, 4.0], [0.6, 0.4])
    t = time.perf_counter()
    pde = simulate_density(model, density0, T, n_save=5)
    t_pde = time.perf_counter() - t
    density_T = pde.density[-1]
    density_init = density0(G.grid(256, jnp.float64))
    out = {"n": [], "w1_T": [], "w1_T_std": [], "w1_0": [], "w1_0_std": []}
    key = jax.random.key(2026)
    for n in ns:
        wT, w0 = [], []
        for s in range(seeds):
            k = jax.random.fold_in(key, 1000 * n + s)
            size = shared if (shared is not None and n <= shared) else n
            th0 = sample_density(k, density0, size, dtype=jnp.float64)
            w = None if size == n else jnp.where(jnp.arange(size) < n, 1.0 / n, 0.0)
            _, th, _ = simulate_angles(model, th0, T, n_save=2, weights=w)
            w0.append(float(w1_samples_density(th0[:n], density_init)))
            wT.append(float(w1_samples_density(th[-1][:n], density_T)))
        out["n"].append(n)
        out["w1_T"].append(np.mean(wT))
        out["w1_T_std"].append(np.std(wT))
        out["w1_0"].append(np.mean(w0))
        out["w1_0_std"].append(np.std(w0))
    out = {k: np.asarray(v) for k, v in out.items()}
    b, a = np.polyfit(np.log(out["n"]), np.log(out["w1_T"]), 1)
    # cross-check: the O(nP) angle particles are simulate_particles' tokens
    th0 = sample_density(jax.random.fold_in(key, 7), density0, 300, dtype=jnp.float64)
    _, th, _ = simulate_angles(model, th0, T, n_save=2)
    ps = mf.simulate_particles(model, G.to_tokens(th0), T, n_save=2)
    gap = float(jnp.max(jnp.abs(jnp.angle(jnp.exp(1j * (G.to_angles(ps.xs[-1]) - th[-1]))))))
    return dict(out, slope=b, intercept=a, T=T, theta=pde.theta, rho_T=density_T, rho_0=np.asarray(density0(jnp.asarray(pde.theta))),
                pde_modes=pde.modes, pde_tail=pde.tail, pde_mass_error=float(np.max(np.abs(pde.mass - 1))),
                pde_seconds=t_pde, particles_vs_simulate_particles=gap)


def table(res) -> str:
    lines = [f"{'n':>8} {'W1(t=0)':>10} {'W1(t=T)':>10} {'std':>9} {'W1*sqrt(n)':>11}"]
    for n, w0, w, s in zip(res["n"], res["w1_0"], res["w1_T"], res["w1_T_std"]):
        lines.append(f"{n:>8d} {w0:>10.3e} {w:>10.3e} {s:>9.2e} {w * math.sqrt(n):>11.3f}")
    lines.append(f"fitted W1(T) ~ n^{res['slope']:.3f}")
    return "\n".join(lines)


def render(out_dir, quick: bool = False):
    import matplotlib.pyplot as plt

    with jax.enable_x64(True):
        if quick:
            res = experiment([100, 316, 1000, 3162], seeds=4, shared=3162)
        else:
            res = experiment([100, 316, 1000, 3162, 10000, 31623, 100000], seeds=8, shared=10000)
    print(table(res))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax0.plot(res["theta"], res["rho_0"], label="rho(0)")
    ax0.plot(res["theta"], res["rho_T"], label=f"rho(T={res['T']:g}) (PDE)")
    ax0.set_xlabel(r"$\theta$")
    ax0.set_ylabel("density")
    ax0.legend()
    n = res["n"]
    ax1.errorbar(n, res["w1_T"], yerr=res["w1_T_std"], fmt="o", label=f"particles vs PDE at t = {res['T']:g}")
    ax1.plot(n, res["w1_0"], "s", mfc="none", label="initial samples vs rho0")
    fit = np.exp(res["intercept"]) * n ** res["slope"]
    ax1.plot(n, fit, "-", label=f"fit: n^{res['slope']:.3f}")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("particles n")
    ax1.set_ylabel("W1 on the circle")
    ax1.legend(fontsize=8)
    fig.suptitle("Mean-field limit on the circle: particles -> density PDE")
    name = NAME + ("_quick" if quick else "")
    data = {k: v for k, v in res.items()}
    return save_figure(fig, out_dir, name, data, key="fitted exponent of W1 vs n", value=res["slope"],
                       expected=-0.5, tolerance=0.1, quick=quick)
