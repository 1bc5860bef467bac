r"""Reachability of Gaussian moments (Alcalde, Ji, Zuazua 2026): `meanfield.control.steer` in 2-D.

Left: the covariance ellipses (1 sigma) of N(m(t), S(t)) at several depths under the optimised
piecewise-constant controls (K = 4 segments of V, W, b; Q = K = I, beta = 1), verified by an
independent `simulate_gaussian` run, the mean path, the start and the target (dashed).
Right: the Bures-Wasserstein distance to the target after each L-BFGS iteration.
Key check: the verified final distance W2(N(m(T), S(T)), N(m1, S1)), expected 0, tolerance 1e-3.
"""

from __future__ import annotations

import jax
import numpy as np

from .style import FigureResult, save_figure

M0, S0 = np.array([-1.0, 0.0]), np.array([[0.6, 0.25], [0.25, 0.3]])
M1, S1 = np.array([1.0, 0.5]), np.array([[0.25, -0.15], [-0.15, 0.8]])
T = 1.0


def _ellipse(ax, m, S, **kw):
    lam, U = np.linalg.eigh(S)
    th = np.linspace(0, 2 * np.pi, 100)
    pts = m[:, None] + U @ (np.sqrt(np.maximum(lam, 0))[:, None] * np.stack([np.cos(th), np.sin(th)]))
    ax.plot(pts[0], pts[1], **kw)


def render(out_dir, quick: bool = False) -> FigureResult:
    import matplotlib.pyplot as plt

    from ..control import steer

    with jax.enable_x64(True):
        res = steer(M0, S0, M1, S1, T, K=4, tol=1e-5)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    idx = np.linspace(0, len(res.ts) - 1, 6).astype(int)
    cmap = plt.get_cmap("viridis")
    for j, i in enumerate(idx):
        _ellipse(ax, res.means[i], res.covs[i], color=cmap(j / (len(idx) - 1)), lw=1.5, label=f"t = {res.ts[i]:.2f}")
    _ellipse(ax, M1, S1, color="k", ls="--", lw=1.5, label="target")
    ax.plot(res.means[:, 0], res.means[:, 1], color="grey", lw=1, label="mean path")
    ax.set_aspect("equal")
    ax.set_title(f"N(m0, S0) -> N(m1, S1) at depth T = {T} (K = 4 layers)")
    ax.legend(fontsize=7, loc="best")
    ax = axes[1]
    ax.semilogy(np.arange(len(res.history)), res.history, "o-", ms=3)
    ax.axhline(1e-3, color="r", ls=":", label="1e-3")
    ax.set_xlabel("L-BFGS iteration")
    ax.set_ylabel("Bures-Wasserstein distance to target")
    ax.set_title(f"verified W2 = {res.distance:.2e}, {res.iterations} its, {res.seconds:.1f} s")
    ax.legend()
    data = {"ts": res.ts, "means": res.means, "covs": res.covs, "history": res.history,
            "iterations": res.iterations, "seconds": res.seconds, "distance": res.distance,
            "optimiser_distance": res.optimiser_distance, "initial_distance": res.initial_distance,
            "homotopy": list(res.homotopy), "m0": M0, "S0": S0, "m1": M1, "S1": S1, "T": T}
    return save_figure(fig, out_dir, "reachability", data, key="final BW distance (verified)",
                       value=res.distance, expected=0.0, tolerance=1e-3, quick=quick)
