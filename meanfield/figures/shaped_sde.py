"""Shaped transformer vs its kernel SDE at depth-to-width ratio T = 1 (Noci et al. 2023, arXiv 2306.17759).

    meanfield figures shaped_sde            # m = 2 at widths 32..256, m = 3 at 32..128 (a few minutes, 2 cores)
    meanfield figures shaped_sde --quick    # widths 32, 64, m = 2 only (under a minute)

For each width n, finite networks with L = T n blocks (`meanfield.shaped.shaped_network_kernels`,
exact in law) are compared with Euler–Maruyama paths of the SDE (`simulate_shaped_sde`):
rho12 over depth t = l/n (mean and 10-90% band), the histogram of the output correlation, and the
two-sample Kolmogorov–Smirnov distance between finite-net and SDE output correlations per width.
The KS distance should shrink with width. Reference values for m = 2, rho0 = .3 (NumPy reference
simulation, docs/shaped_sde.md §5):
.043 at n = 64 and .0135 at n = 256. The unshaped baseline (standard softmax attention,
tau = sqrt(n_k), no centring) collapses rho12 to 1. SDE paths that explode (tr V > 1e4; the
attention drift is cubic, docs/shaped_sde.md §4) are dropped from every SDE statistic, as in the reference;
their fraction is reported.

Writes figures/shaped_sde[_quick].png, .pdf and .json. Every number comes from the simulation.
Key check: the KS distance (m = 2, rho12) at the largest width, expected below the two-sample 5%
critical value (i.e. |KS - 0| <= critical value: the finite nets are indistinguishable from the SDE).
"""

from __future__ import annotations

import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np  # noqa: E402

from meanfield.shaped import ks_distance, offdiag_correlations, shaped_network_kernels, simulate_shaped_sde  # noqa: E402

HYPER = dict(gamma_attn2=0.3, gamma_mlp2=0.2, tau0=0.5, c_plus=1.0, c_minus=-1.0)
N_K = 16
T = 1.0
KERNELS = {
    2: np.array([[1.0, 0.3], [0.3, 1.0]]),
    3: np.array([[1.0, 0.6, 0.2], [0.6, 1.3, -0.1], [0.2, -0.1, 0.8]]),
}
REFERENCE_KS_M2 = {64: 0.043, 256: 0.0135}  # docs/shaped_sde.md §5 (NumPy reference simulation), for comparison only
SETTINGS = {
    "quick": dict(widths=(32, 64), ms=(2,), n_nets=600, n_paths=2000, dt=1e-2, n_unshaped=32, chunk=600),
    "full": dict(widths=(32, 64, 128, 256), ms=(2, 3), widths_m3=(32, 64, 128), n_nets=2000, n_paths=5000, dt=2e-3,
                 n_unshaped=200, chunk=1000),
}


def network_correlations(key, V0, n, n_nets, *, chunk, shaped=True, hyper=HYPER):
    """(n_nets, L + 1, p) correlations of n_nets finite networks at width n (vmapped in chunks)."""
    run = jax.jit(jax.vmap(lambda k: offdiag_correlations(shaped_network_kernels(
        k, V0, n=n, depth_ratio=T, n_k=N_K, shaped=shaped, **hyper))))
    keys = jax.random.split(key, n_nets)
    return np.concatenate([np.asarray(run(keys[i : i + chunk])) for i in range(0, n_nets, chunk)])


def ks_critical(n1, n2, alpha=0.05):
    """Asymptotic two-sample KS critical value c(alpha) sqrt((n1 + n2)/(n1 n2)), c(.05) = 1.358."""
    c = np.sqrt(-0.5 * np.log(alpha / 2))
    return float(c * np.sqrt((n1 + n2) / (n1 * n2)))


def run_m(m, cfg, key, log):
    V0 = jnp.asarray(KERNELS[m], jnp.float32)
    pairs = [f"{i + 1}{j + 1}" for i, j in zip(*np.triu_indices(m, 1))]
    k_sde, k_ctrl, k_net, k_uns = jax.random.split(key, 4)
    t0 = time.time()
    sol = simulate_shaped_sde(k_sde, V0, T, dt=cfg["dt"], n_paths=cfg["n_paths"], n_save=101, **HYPER,
                              batch_size=cfg["chunk"] * 5)
    keep = ~np.asarray(sol.exploded)
    rho_sde = np.asarray(sol.correlations)[keep]  # (paths, 101, p)
    ctrl = simulate_shaped_sde(k_ctrl, V0, T, dt=cfg["dt"], n_paths=cfg["n_paths"], n_save=2,
                               **{**HYPER, "tau0": np.inf}, batch_size=cfg["chunk"] * 5)
    rho_ctrl = np.asarray(ctrl.correlations[:, -1])[~np.asarray(ctrl.exploded)]
    log(f"m={m}: SDE {cfg['n_paths']} paths, dt={cfg['dt']}: exploded {1 - keep.mean():.3f} "
        f"(control tau0=inf: {np.asarray(ctrl.exploded).mean():.3f}); {time.time() - t0:.1f}s")
    out = dict(m=m, V0=KERNELS[m].tolist(), pairs=pairs, sde=dict(
        n_paths=cfg["n_paths"], dt=cfg["dt"], exploded_fraction=float(1 - keep.mean()),
        mean_rho_out=rho_sde[:, -1].mean(0).tolist(), sd_rho_out=rho_sde[:, -1].std(0).tolist()),
        widths={}, curves={"sde_t": np.asarray(sol.ts).tolist()})
    nets = {}
    widths = cfg.get(f"widths_m{m}", cfg["widths"])
    for n in widths:
        t0 = time.time()
        rho = network_correlations(jax.random.fold_in(k_net, n), V0, n, cfg["n_nets"], chunk=cfg["chunk"])
        nets[n] = rho
        ks = [ks_distance(rho[:, -1, p], rho_sde[:, -1, p]) for p in range(len(pairs))]
        ks_ctrl = [ks_distance(rho[:, -1, p], rho_ctrl[:, p]) for p in range(len(pairs))]
        uns = network_correlations(jax.random.fold_in(k_uns, n), V0, n, cfg["n_unshaped"],
                                   chunk=cfg["chunk"], shaped=False)
        nets[("unshaped", n)] = uns[:, :, 0].mean(0)
        uns = uns[:, -1]
        out["widths"][n] = dict(
            n_blocks=rho.shape[1] - 1, n_nets=cfg["n_nets"], ks=ks, ks_control_no_logit_terms=ks_ctrl,
            ks_critical_5pct=ks_critical(cfg["n_nets"], int(keep.sum())),
            mean_rho_out=rho[:, -1].mean(0).tolist(), sd_rho_out=rho[:, -1].std(0).tolist(),
            unshaped=dict(n_nets=cfg["n_unshaped"], min_rho_out=uns.min(0).tolist(), mean_rho_out=uns.mean(0).tolist()),
            seconds=time.time() - t0,
        )
        log(f"m={m} n={n:4d} L={rho.shape[1] - 1:4d}: KS " + " ".join(f"rho{p}={k:.4f}" for p, k in zip(pairs, ks))
            + f" | unshaped min rho{pairs[0]} = {uns[:, 0].min():.5f}; {time.time() - t0:.1f}s")
    return out, nets, rho_sde


def plot(results, data, quick):
    rows = len(results)
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.2 * rows), squeeze=False)
    for r, res in enumerate(results):
        m = res["m"]
        nets, rho_sde = data[m]
        widths = sorted(n for n in nets if isinstance(n, int))
        colors = plt.cm.viridis(np.linspace(0.1, 0.85, len(widths)))
        ax = axes[r, 0]
        t_sde = np.asarray(res["curves"]["sde_t"])
        q = np.quantile(rho_sde[:, :, 0], [0.1, 0.9], axis=0)
        ax.fill_between(t_sde, q[0], q[1], color="0.8", label="SDE 10-90%")
        ax.plot(t_sde, rho_sde[:, :, 0].mean(0), "k-", lw=2, label="SDE mean")
        for c, n in zip(colors, widths):
            rho = nets[n][:, :, 0]
            t = np.arange(rho.shape[1]) / n
            ax.plot(t, rho.mean(0), color=c, lw=1.3, label=f"net n={n}")
            if n == widths[-1]:
                qn = np.quantile(rho, [0.1, 0.9], axis=0)
                ax.plot(t, qn[0], color=c, ls="--", lw=1)
                ax.plot(t, qn[1], color=c, ls="--", lw=1, label=f"net n={n} 10-90%")
        n_u = widths[-1]
        ax.plot(np.arange(n_u + 1) / n_u, nets[("unshaped", n_u)], color="tab:red", ls=":", lw=2,
                label=f"unshaped softmax, mean (n={n_u}); min at t=1: "
                      f"{res['widths'][n_u]['unshaped']['min_rho_out'][0]:.4f}")
        ax.set(xlabel="depth t = l/n", ylabel=rf"$\rho_{{{res['pairs'][0]}}}$", title=f"m = {m}: correlation over depth (T = 1)")
        ax.legend(fontsize=7, loc="lower right")

        ax = axes[r, 1]
        bins = np.linspace(-1, 1, 41)
        ax.hist(rho_sde[:, -1, 0], bins=bins, density=True, color="0.75", label="SDE")
        for c, n in zip(colors, widths):
            ax.hist(nets[n][:, -1, 0], bins=bins, density=True, histtype="step", color=c, lw=1.5, label=f"net n={n}")
        ax.set(xlabel=rf"output $\rho_{{{res['pairs'][0]}}}$ at t = 1", ylabel="density", title="output correlation")
        ax.legend(fontsize=7)

        ax = axes[r, 2]
        for p, pair in enumerate(res["pairs"]):
            ax.loglog(widths, [res["widths"][n]["ks"][p] for n in widths], "o-", label=rf"KS $\rho_{{{pair}}}$")
        ax.loglog(widths, [res["widths"][n]["ks_control_no_logit_terms"][0] for n in widths], "x:", color="0.4",
                  label=rf"control SDE ($\tau_0=\infty$), $\rho_{{{res['pairs'][0]}}}$")
        ax.axhline(res["widths"][widths[-1]]["ks_critical_5pct"], color="tab:red", ls="--", lw=1, label="KS 5% critical value")
        if m == 2:
            ref = sorted(REFERENCE_KS_M2)
            ax.loglog(ref, [REFERENCE_KS_M2[n] for n in ref], "s", mfc="none", color="k", label="NumPy reference")
        ax.set(xlabel="width n", ylabel="KS distance (net vs SDE)", title="distance to the SDE")
        ax.legend(fontsize=7)
    fig.suptitle(r"Shaped transformer vs kernel SDE: $\gamma_a^2=.3$, $\gamma_f^2=.2$, $\tau_0=.5$, $c_\pm=\pm1$"
                 + (" (quick)" if quick else ""))
    fig.tight_layout()
    return fig


def render(out_dir, quick: bool = False, seed: int = 0):
    """Run the comparison and write shaped_sde[_quick].png/.pdf/.json into out_dir."""
    from .style import save_figure

    cfg = SETTINGS["quick" if quick else "full"]
    start = time.time()
    log = lambda s: print(f"[{time.time() - start:6.1f}s] {s}", flush=True)  # noqa: E731
    key = jax.random.key(seed)
    results, data = [], {}
    for m in cfg["ms"]:
        res, nets, rho_sde = run_m(m, cfg, jax.random.fold_in(key, m), log)
        results.append(res)
        data[m] = (nets, rho_sde)
    fig = plot(results, data, quick)

    print("\nKS distance, finite nets vs SDE (output correlations at T = 1):")
    for res in results:
        head = " ".join(f"{'rho' + p:>9s}" for p in res["pairs"])
        print(f"  m = {res['m']}     n     L  {head}  control(tau0=inf)  crit5%  mean rho{res['pairs'][0]} net/SDE")
        for n, w in res["widths"].items():
            print(f"          {n:4d}  {w['n_blocks']:4d}  " + " ".join(f"{k:9.4f}" for k in w["ks"])
                  + f"  {w['ks_control_no_logit_terms'][0]:17.4f}  {w['ks_critical_5pct']:6.4f}"
                  + f"  {w['mean_rho_out'][0]:.3f}/{res['sde']['mean_rho_out'][0]:.3f}")
    if any(r["m"] == 2 for r in results):
        print(f"  reference (docs/shaped_sde.md §5, m = 2): {REFERENCE_KS_M2}")
    meta = dict(
        description=__doc__.splitlines()[0], mode="quick" if quick else "full", seed=seed, T=T, n_k=N_K,
        hyper=HYPER, settings=cfg, reference_ks_m2=REFERENCE_KS_M2, results=json.loads(json.dumps(results, default=str)),
        seconds=time.time() - start, versions=dict(jax=jax.__version__, numpy=np.__version__, python=platform.python_version()),
    )
    res2 = next(r for r in results if r["m"] == 2)
    n_max = max(res2["widths"])
    w = res2["widths"][n_max]
    return save_figure(fig, pathlib.Path(out_dir), "shaped_sde_quick" if quick else "shaped_sde", meta,
                       key=f"KS distance net vs SDE, m = 2, n = {n_max} (tolerance: 5% critical value)",
                       value=w["ks"][0], expected=0.0, tolerance=w["ks_critical_5pct"], quick=quick)
