r"""The 1:1 rule's synthetic experiment, re-run with its own construction (MISSION §5; `meanfield.rule`).

d = 512, 24 layers, $\| W_\text{attn}\|_2 = 5$, bulk singular values 0.5, one spike at the target
norm, shared random orthogonal bases with the attention spike's left vector sign-flipped; $\rho$
log-spaced over [0.1, 20] (50 values), 5 seeds; float32 as its script. Left: min effective rank over
layers vs $\rho$ (mean and spread over seeds) with the 0.5-2 band, the erank-10 threshold and the
appendix's claimed values; grey, right axis: $\sigma_1(W_\text{mlp} + W_\text{attn})$, measured and the
closed form $\max(5|\rho - 1|, 1)$, which shows the dip at $\rho = 1$ is built into the matrices.
Right: erank vs layer at $\rho \in \{0.1, 0.5, 1, 2, 5, 10, 20\}$ (mean over seeds).

Key check: $\max_{\rho,\text{seed}} |\sigma_1(W_\text{mlp} + W_\text{attn})/\max(5|\rho-1|, 1) - 1|$,
expected 0 (float32 tolerance 1e-4).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from .. import rule
from ..rule.band import BAND
from .style import FigureResult, save_figure

SETTINGS = {
    "full": dict(d=512, n_rho=50, n_seeds=5, num_layers=24),
    "quick": dict(d=48, n_rho=12, n_seeds=2, num_layers=24),
}


def _nearest(rhos, target):
    return int(np.argmin(np.abs(np.asarray(rhos) - target)))


def render(out_dir, quick: bool = False) -> FigureResult:
    """Run the sweep, draw the two panels, print the key numbers; write rule_synthetic[_quick].png/.pdf/.json."""
    import matplotlib.pyplot as plt

    cfg = SETTINGS["quick" if quick else "full"]
    name = "rule_synthetic_quick" if quick else "rule_synthetic"
    t0 = time.time()
    key = jax.random.key(0)
    rhos = np.logspace(-1, np.log10(20.0), cfg["n_rho"])
    kw = dict(d=cfg["d"], num_layers=cfg["num_layers"], n_seeds=cfg["n_seeds"])
    sweep = rule.synthetic_sweep(key, rhos, **kw)
    sel = rule.synthetic_sweep(key, rule.SELECT_RHOS, **kw)
    seconds = time.time() - t0

    min_er = sweep["erank"].min(axis=-1)  # (R, seeds)
    mean, std = min_er.mean(axis=1), min_er.std(axis=1)
    dev = float(np.max(np.abs(sweep["sigma_sum"] / sweep["sigma_sum_expected"][:, None] - 1.0)))
    cond_floor = 1.0 / (np.finfo(np.float32).eps * cfg["d"])

    key_numbers = {}
    for target in (0.1, 0.5, 0.97, 1.0, 2.0, 5.0, 10.0, 20.0):
        i = _nearest(rhos, target)
        key_numbers[f"{target:g}"] = {"rho_grid": float(rhos[i]), "min_erank_mean": float(mean[i]),
                                      "min_erank_std": float(std[i]),
                                      "final_erank_mean": float(sweep["erank"][i, :, -1].mean()),
                                      "max_cond_mean": float(sweep["cond"][i].max(axis=-1).mean())}
    print(f"rule_synthetic ({'quick' if quick else 'full'}: d={cfg['d']}, {cfg['n_rho']} rho, {cfg['n_seeds']} seeds, "
          f"{cfg['num_layers']} layers, float32; {seconds:.0f} s)")
    print(f"{'rho target':>10} {'rho grid':>9} {'min erank':>16} {'appendix':>9} {'sigma1(sum)':>12}")
    for target, v in key_numbers.items():
        claim = rule.APPENDIX_CLAIMS.get(float(target))
        print(f"{target:>10} {v['rho_grid']:9.3f} {v['min_erank_mean']:9.2f} ± {v['min_erank_std']:5.2f} "
              f"{'' if claim is None else f'{claim:g}':>9} {rule.sum_top_singular_value(v['rho_grid']):12.3f}")
    print(f"max condition number {sweep['cond'].max():.4g} (floor 1/(eps d) = {cond_floor:.4g}); "
          f"max |sigma1(W_mlp+W_attn)/max(5|rho-1|,1) - 1| = {dev:.2e}")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    ax.axvspan(*BAND, color="tab:green", alpha=0.12, lw=0, label=r"rule's stable band $0.5\leq\rho\leq2$")
    ax.axhline(10, color="crimson", ls=":", lw=1.2, label="collapse threshold (erank 10)")
    ax.plot(rhos, mean, "o-", ms=3, color="tab:blue", label="min erank over layers (mean over seeds)")
    ax.fill_between(rhos, mean - std, mean + std, color="tab:blue", alpha=0.2, lw=0)
    cr = np.array(list(rule.APPENDIX_CLAIMS.keys()))
    ax.plot(cr, list(rule.APPENDIX_CLAIMS.values()), "x", color="crimson", ms=8, mew=2,
            label="appendix's claimed values")
    ax.set_xscale("log")
    ax.set_xlabel(r"$\rho = \| W_\mathrm{mlp}\|_2/\| W_\mathrm{attn}\|_2$")
    ax.set_ylabel(f"min effective rank over {cfg['num_layers']} layers")
    ax.set_ylim(0, None)
    tx = ax.twinx()
    tx.plot(rhos, sweep["sigma_sum"].mean(axis=1), ".", color="0.5", ms=3)
    fine = np.logspace(-1, np.log10(20.0), 400)
    tx.plot(fine, rule.sum_top_singular_value(fine), "-", color="0.5", lw=0.8,
            label=r"$\sigma_1(W_\mathrm{mlp}+W_\mathrm{attn}) = \max(5|\rho-1|, 1)$")
    tx.set_yscale("log")
    tx.set_ylabel(r"$\sigma_1(W_\mathrm{mlp}+W_\mathrm{attn})$ (grey)", color="0.4")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = tx.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.set_title(f"The rule's construction, d = {cfg['d']}, {cfg['n_seeds']} seeds (float32)", fontsize=10)

    colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(rule.SELECT_RHOS)))
    layers = np.arange(1, cfg["num_layers"] + 1)
    for c, r, er in zip(colors, rule.SELECT_RHOS, sel["erank"]):
        bx.plot(layers, er.mean(axis=0), "-", color=c, lw=1.8, label=rf"$\rho$ = {r:g}")
    bx.axhline(10, color="crimson", ls=":", lw=1.2)
    bx.set_yscale("log")
    bx.set_xlabel(r"layer $l$")
    bx.set_ylabel(r"effective rank of $C_l$")
    bx.legend(fontsize=8, ncol=2)
    bx.set_title(r"$C_{l+1} = A C_l A^\top/\|\cdot\|_2$, $A = I + W_\mathrm{mlp} + W_\mathrm{attn}$", fontsize=10)
    fig.tight_layout()

    data = {"settings": cfg, "rho": rhos, "min_erank_mean": mean, "min_erank_std": std,
            "final_erank_mean": sweep["erank"][:, :, -1].mean(axis=1),
            "max_cond_mean": sweep["cond"].max(axis=-1).mean(axis=1), "cond_floor": cond_floor,
            "sigma_sum_mean": sweep["sigma_sum"].mean(axis=1), "sigma_sum_expected": sweep["sigma_sum_expected"],
            "select_rho": rule.SELECT_RHOS, "select_erank_mean": sel["erank"].mean(axis=1),
            "key_numbers": key_numbers, "appendix_claims": {f"{k:g}": v for k, v in rule.APPENDIX_CLAIMS.items()},
            "seconds": seconds}
    return save_figure(fig, out_dir, name, data,
                       key="max |sigma1(W_mlp+W_attn) / max(5|rho-1|, 1) - 1| over rho and seeds",
                       value=dev, expected=0.0, tolerance=1e-4, quick=quick)
