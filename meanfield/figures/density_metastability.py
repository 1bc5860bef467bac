r"""Metastable clustering in the mean-field limit: density peaks vs particle clusters, beta = 1, 4, 9.

Q = K = V = I, softmax, tokens on the circle. density0 = (1 + sum_{k=1..8} 0.1 cos(k theta + phi_k)) / 2pi
(random phases). The uniform density is unstable; mode k grows at
lambda_k = k^2 I_k(beta) / (beta I_0(beta)) (`meanfield.density.theory`), so about
k* = argmax lambda_k clusters form first (k* = 1, 3, 4 for beta = 1, 4, 9) and then merge only on
much longer (metastable) time scales. The PDE (`simulate_density`, adaptive N) is followed until the
clusters are too narrow for `max_modes` (it stops there with an UnderResolvedWarning: the time
reached is shown); particles with the same initial law (`simulate_particles`, n tokens, several
seeds) are run longer and their clusters counted with `metrics.cluster_count`.
Key value: max over beta of |PDE peaks at the last resolved time - k*(beta)|, expected 0, tolerance 1
(with random phases the nonlinear stage can merge or split one cluster).
"""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ..density import fastest_mode, sample_density, simulate_density, uniform_perturbed
from ..density import grid as G
from .style import save_figure

NAME = "density_metastability"
BETAS = (1.0, 4.0, 9.0)


def experiment(*, t_pde: float, t_particles: float, n: int, seeds: int, max_modes: int, modes=None,
               n_save: int = 41, tail_tol: float | None = None):
    import meanfield as mf
    from meanfield.metrics import cluster_count

    density0 = uniform_perturbed([0.1] * 8, key=jax.random.key(7))
    res = {}
    for beta in BETAS:
        model = mf.Model(Q=np.eye(2), K=np.eye(2), V=np.eye(2), beta=beta, norm="sphere", dtype=jnp.float64)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pde = simulate_density(model, density0, t_pde, n_save=n_save, modes=modes, max_modes=max_modes,
                                   tail_tol=tail_tol,
                                   on_underresolved="refine" if modes is None else "stop")
        t_run = time.perf_counter() - t0
        peaks = pde.peaks()
        ok = peaks >= 0
        ts_p = np.linspace(0.0, t_particles, 2 * n_save - 1)
        clusters = []
        for s in range(seeds):
            th0 = sample_density(jax.random.key(100 + s), density0, n, dtype=jnp.float64)
            sol = mf.simulate_particles(model, G.to_tokens(th0), t_particles, ts=ts_p,
                                        save_fn=lambda X: cluster_count(X, 1e-2))
            clusters.append(np.asarray(sol.xs))
        res[beta] = dict(ts=pde.ts, peaks=peaks, t_end=pde.t_end, resolved=pde.resolved, modes=pde.modes,
                         theta=pde.theta, rho=pde.density, ts_particles=ts_p, clusters=np.array(clusters),
                         k_star=fastest_mode(beta), last_peaks=int(peaks[ok][-1]), seconds=t_run,
                         warnings=[str(w.message) for w in caught])
    return res


def render(out_dir, quick: bool = False):
    import matplotlib.pyplot as plt

    with jax.enable_x64(True):
        if quick:
            # adaptive N up to 1024 with a looser spectral tail (1e-5): peak counts need the cluster
            # shapes, not 1e-8 accuracy; a fixed small N stops before the clusters form (beta = 4, 9).
            res = experiment(t_pde=8.0, t_particles=16.0, n=256, seeds=1, max_modes=1024, n_save=17, tail_tol=1e-5)
        else:
            res = experiment(t_pde=15.0, t_particles=40.0, n=1000, seeds=3, max_modes=2048, n_save=61)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    summary = {}
    for j, beta in enumerate(BETAS):
        r = res[beta]
        ok = r["peaks"] >= 0
        idx = np.nonzero(ok)[0]
        picks = np.unique(np.linspace(0, idx[-1], 4).round().astype(int))
        ax = axes[0, j]
        for i in picks:
            ax.plot(r["theta"], r["rho"][i], label=f"t = {r['ts'][i]:.1f}")
        ax.set_yscale("log")
        ax.set_ylim(1e-3, None)
        ax.set_title(f"beta = {beta:g}: density (k* = {r['k_star']})")
        ax.set_xlabel(r"$\theta$")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        ax.plot(r["ts"][ok], r["peaks"][ok], "o-", label="PDE peaks")
        for s, c in enumerate(r["clusters"]):
            ax.plot(r["ts_particles"], c, "-", alpha=0.7, label=f"particles (seed {s}) clusters")
        ax.axhline(r["k_star"], color="k", ls=":", label="k* (fastest linear mode)")
        ax.axvline(r["t_end"], color="gray", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("depth t")
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
        summary[beta] = dict(k_star=r["k_star"], pde_last_peaks=r["last_peaks"], pde_t_end=r["t_end"],
                             particle_final_clusters=r["clusters"][:, -1].tolist())
        print(f"beta={beta:g}: k*={r['k_star']}, PDE peaks at t={r['t_end']:.2f}: {r['last_peaks']}, "
              f"particle clusters at t={r['ts_particles'][-1]:g}: {r['clusters'][:, -1].tolist()}, "
              f"max N={int(r['modes'].max())}, {r['seconds']:.1f}s")
    fig.suptitle("Metastability in the mean-field limit: density peaks (PDE) and particle clusters")
    fig.tight_layout()
    value = max(abs(res[b]["last_peaks"] - res[b]["k_star"]) for b in BETAS)
    data = {"summary": summary, **{f"beta_{b:g}": {k: v for k, v in res[b].items() if k != "rho"} for b in BETAS}}
    name = NAME + ("_quick" if quick else "")
    return save_figure(fig, out_dir, name, data, key="max |PDE peaks - k*(beta)|", value=value, expected=0.0,
                       tolerance=1.0, quick=quick)
