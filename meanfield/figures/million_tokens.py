r"""A million tokens clustering on the sphere S^2, through the fast low-rank attention.

$\dot x_i = P_{x_i}\big(\sum_j \mathrm{softmax}_j(\beta\langle x_i, x_j\rangle)\, x_j\big)$ on $S^2$
(Q = K = V = I, `norm="sphere"`), $n = 10^6$ tokens i.i.d. uniform, integrated to depth t = 20 with
fixed-step RK4. Each field evaluation uses `lowrank_attention` (separable Chebyshev features,
O(n F) instead of O(n^2)) with orders chosen by `simulate_particles(attention=LowRank(rtol=RTOL))` for
the a priori bound `RTOL`; the direct sum would take hours per evaluation at this n on 2 cores.
Panels: token density on the sphere (Mollweide projection of a lat/lon histogram, per unit solid
angle, log scale) at several depths, titled with the order parameter |mean token| (0 uniform, 1
consensus) and, once there are few, the cluster count of a token subsample.

Key value: max over a subsample of queries of |fast - direct| / max_j |V x_j| for the field at the
initial state (direct: the exact sum over all n keys), expected 0 with tolerance the a priori bound
the evaluator reports (the bound is rigorous up to the rounding estimate it contains).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..model.attention import attention_rows
from .style import save_figure

NAME = "million_tokens"
BETA = 1.0
RTOL = 1e-4
DTYPE = jnp.float32


def _histogram(X, n_lon=72, n_lat=36):
    """Token density per unit solid angle on a lat/lon grid (uniform density = 1 / (4 pi))."""
    X = np.asarray(X, np.float64)
    lon = np.arctan2(X[:, 1], X[:, 0])
    lat = np.arcsin(np.clip(X[:, 2], -1, 1))
    le = np.linspace(-np.pi, np.pi, n_lon + 1)
    ae = np.linspace(-np.pi / 2, np.pi / 2, n_lat + 1)
    H, _, _ = np.histogram2d(lon, lat, bins=(le, ae))
    area = np.outer(np.diff(le), np.diff(np.sin(ae)))
    return le, ae, H / (X.shape[0] * area)


def experiment(*, n: int, t1: float, dt: float, save_times, n_check: int, n_cluster: int):
    import meanfield as mf
    from meanfield.metrics import cluster_count
    from meanfield.model.lowrank import choose_orders, lowrank_attention

    I = np.eye(3)
    model = mf.Model(Q=I, K=I, V=I, beta=BETA, norm="sphere", dtype=DTYPE)
    X0 = mf.sphere_uniform(jax.random.key(0), n, 3, dtype=DTYPE)

    # Key check: fast vs direct attention at the initial state, on a query subsample.
    orders = choose_orders(model, X0, rtol=RTOL)
    fast, info = jax.jit(lambda X: lowrank_attention(model, X, orders=orders, rtol=RTOL, fallback=mf.Blocked(),
                                                     return_info=True))(X0)
    ref = jax.jit(lambda Xq, X: attention_rows(model, Xq, X, block_size=8192))(X0[:n_check], X0)
    check = float(jnp.max(jnp.abs(fast[:n_check] - ref))) / float(jnp.max(jnp.abs(X0)))

    t0 = time.perf_counter()
    sol = mf.simulate_particles(model, X0, t1, ts=jnp.asarray(save_times, DTYPE), solver="rk4", dt0=dt,
                                attention=mf.LowRank(rtol=RTOL))
    xs = np.asarray(jax.block_until_ready(sol.xs))
    seconds = time.perf_counter() - t0
    sub = np.random.default_rng(0).choice(n, size=min(n_cluster, n), replace=False)
    clusters = [int(cluster_count(jnp.asarray(x[sub]), 0.05)) for x in xs]
    hists = [_histogram(x) for x in xs]
    order = [float(np.linalg.norm(np.mean(x.astype(np.float64), axis=0))) for x in xs]  # |mean token|: 0 uniform, 1 consensus
    return dict(n=n, t1=t1, dt=dt, steps=int(round(t1 / dt)), orders=list(orders), features=int(info.features),
                bound=float(info.bound), bound_post=float(info.bound_post), fallback=bool(info.fallback),
                check=check, n_check=n_check, seconds=seconds, ts=np.asarray(save_times), clusters=clusters, order=order,
                lon_edges=hists[0][0], lat_edges=hists[0][1], density=[h[2] for h in hists],
                norm_drift=float(np.max(np.abs(np.linalg.norm(xs[-1], axis=-1) - 1.0))))


def render(out_dir, quick: bool = False):
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    if quick:
        res = experiment(n=4096, t1=20.0, dt=0.5, save_times=[0.0, 5.0, 10.0, 20.0], n_check=1000,
                         n_cluster=1000)
    else:
        res = experiment(n=1_000_000, t1=20.0, dt=0.4, save_times=[0.0, 8.0, 11.2, 13.2, 15.2, 20.0],
                         n_check=1000, n_cluster=2000)
    print(f"{NAME}: n={res['n']}, orders={res['orders']} (F={res['features']}), bound={res['bound']:.2e}, "
          f"check={res['check']:.2e}, run {res['seconds']:.1f}s for {res['steps']} RK4 steps, "
          f"clusters={res['clusters']}")
    ts = res["ts"]
    cols = min(len(ts), 3)
    rows = -(-len(ts) // cols)
    fig = plt.figure(figsize=(4.4 * cols, 2.4 * rows + 0.9))
    le, ae = res["lon_edges"], res["lat_edges"]
    vmax = max(float(np.max(h)) for h in res["density"])
    norm = LogNorm(vmin=1e-3, vmax=max(vmax, 1.0))
    for j, (t, H) in enumerate(zip(ts, res["density"])):
        ax = fig.add_subplot(rows, cols, j + 1, projection="mollweide")
        mesh = ax.pcolormesh(le, ae, np.maximum(H.T, 1e-3), norm=norm, cmap="magma", shading="flat")
        ax.set_xticklabels([])
        ax.set_yticklabels([])
        c = res["clusters"][j]
        clusters = f", {c} cluster{'s' if c > 1 else ''}" if c <= 20 else ""
        ax.set_title(f"t = {t:g}: |mean x| = {res['order'][j]:.3f}{clusters}", fontsize=10)
    fig.colorbar(mesh, ax=fig.axes, shrink=0.7, label="tokens per steradian / n  (uniform: 0.08)")
    fig.suptitle(f"{res['n']:,} tokens on S$^2$, softmax Q = K = V = I, beta = {BETA:g}: low-rank attention "
                 f"F = {res['features']}, bound {res['bound']:.1e}\nRK4 dt = {res['dt']:g}, {res['steps']} steps in "
                 f"{res['seconds']:.0f} s on {os.cpu_count()} CPU cores", fontsize=10)
    data = {k: v for k, v in res.items()}
    name = NAME + ("_quick" if quick else "")
    return save_figure(fig, out_dir, name, data, key="max |fast - direct| / max|Vx| at t = 0 (query subsample)",
                       value=res["check"], expected=0.0, tolerance=res["bound"], quick=quick)
