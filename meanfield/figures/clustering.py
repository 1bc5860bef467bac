r"""Clustering and metastability of self-attention on the circle and the sphere
(Geshkovski, Letrouit, Polyanskiy, Rigollet 2023, arXiv 2305.05465 / 2312.10794).

$V = Q = K = I$, softmax attention projected on the sphere, tokens i.i.d. uniform at depth 0,
$\beta \in \{1, 4, 9\}$. Top: on the circle ($d = 2$) every token's angle over depth — tokens gather
into a few clusters fast, which then merge on much longer, $\beta$-dependent time scales. Bottom left:
number of clusters (single-linkage at chordal distance 1e-2) vs depth on a log axis, circle and
sphere ($d = 3$): plateaus are the metastable states. Bottom right: the sphere's tokens at the final depth
(longitude/latitude), one colour per beta.

Key check: number of clusters on the circle at the final depth for beta = 1, expected 1 (consensus
from almost every initial condition, Geshkovski et al.; tolerance 0).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from .style import FigureResult, save_figure

BETAS = (1.0, 4.0, 9.0)
SETTINGS = {"full": dict(n_circle=64, n_sphere=128, t1=60.0, n_save=241),
            "quick": dict(n_circle=24, n_sphere=32, t1=30.0, n_save=61)}


def run(quick: bool = False) -> dict:
    from ..initial_tokens import sphere_uniform
    from ..metrics import cluster_count
    from ..model.params import Model
    from ..simulate.particles import simulate_particles

    cfg = SETTINGS["quick" if quick else "full"]
    out = {}
    for d, n in ((2, cfg["n_circle"]), (3, cfg["n_sphere"])):
        X0 = sphere_uniform(jax.random.key(11 + d), n, d)
        I = jnp.eye(d)
        for beta in BETAS:
            model = Model(attention="softmax", Q=I, K=I, V=I, beta=beta, mlp="none", norm="sphere")
            sol = simulate_particles(model, X0, cfg["t1"], n_save=cfg["n_save"],
                                     save_fn=lambda X: {"X": X, "clusters": cluster_count(X)})
            out[(d, beta)] = dict(t=np.asarray(sol.ts), X=np.asarray(sol.xs["X"]),
                                  clusters=np.asarray(sol.xs["clusters"]))
    return out


def render(out_dir, quick: bool = False) -> FigureResult:
    import matplotlib.pyplot as plt

    t0 = time.time()
    res = run(quick)
    seconds = time.time() - t0
    fig = plt.figure(figsize=(15, 8.5))
    gs = fig.add_gridspec(2, 3, height_ratios=[1.0, 1.0])
    for j, beta in enumerate(BETAS):
        ax = fig.add_subplot(gs[0, j])
        r = res[(2, beta)]
        theta = np.unwrap(np.arctan2(r["X"][:, :, 1], r["X"][:, :, 0]), axis=0)
        ax.plot(r["t"], theta, lw=0.6, color="tab:blue", alpha=0.7)
        ax.set_xlabel("depth t")
        ax.set_ylabel(r"token angle $\theta_i(t)$ (unwrapped)")
        ax.set_title(f"circle, beta = {beta:g}: {int(r['clusters'][-1])} cluster(s) at t = {r['t'][-1]:g}", fontsize=10)
    ax = fig.add_subplot(gs[1, :2])
    colors = dict(zip(BETAS, ("tab:blue", "tab:orange", "tab:red")))
    for (d, beta), r in res.items():
        ax.step(np.maximum(r["t"], r["t"][1] / 2), r["clusters"], where="post", color=colors[beta],
                ls="-" if d == 2 else "--", lw=1.5, label=f"{'circle' if d == 2 else 'sphere'} (n = {r['X'].shape[1]}), beta = {beta:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("depth t (log)")
    ax.set_ylabel("number of clusters")
    ax.set_title("metastability: clusters form fast, then merge on beta-dependent time scales", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax = fig.add_subplot(gs[1, 2])
    for beta in BETAS:
        X = res[(3, beta)]["X"][-1]
        lon, lat = np.degrees(np.arctan2(X[:, 1], X[:, 0])), np.degrees(np.arcsin(np.clip(X[:, 2], -1, 1)))
        ax.scatter(lon, lat, s=18, color=colors[beta], alpha=0.7,
                   label=f"beta = {beta:g}: {int(res[(3, beta)]['clusters'][-1])} cluster(s)")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xlabel("longitude (deg)")
    ax.set_ylabel("latitude (deg)")
    ax.set_title(f"sphere: tokens at t = {res[(3, 1.0)]['t'][-1]:g}", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle("Self-attention dynamics on the circle and the sphere (V = Q = K = I)")
    fig.tight_layout()
    counts = {f"{'circle' if d == 2 else 'sphere'}_beta{beta:g}": r["clusters"] for (d, beta), r in res.items()}
    print(f"clustering ({seconds:.0f} s): final cluster counts "
          + ", ".join(f"{k} {int(v[-1])}" for k, v in counts.items()))
    data = {"t": res[(2, 1.0)]["t"], "clusters": counts, "seconds": seconds}
    return save_figure(fig, out_dir, "clustering_quick" if quick else "clustering", data,
                       key="clusters on the circle at the final depth, beta = 1",
                       value=float(res[(2, 1.0)]["clusters"][-1]), expected=1.0, tolerance=0.0, quick=quick)
