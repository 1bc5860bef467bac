r"""The 1:1 rule tested where it was never tested: nonlinear token dynamics and real forward passes.

Top row, the continuous-depth particle model (experiment `one_to_one_rule`: softmax attention + GELU
MLP, $\rho = \lVert a_\text{mlp} W_2 W_1\rVert_2 / \lVert a_\text{attn} V\rVert_2$ over [0.05, 20], 3 beta,
5 seeds, with and without layer norm): regime fractions vs $\rho$, final effective rank, and the
leading finite-time Lyapunov exponent (QR method) — with the rule's band $0.5 \le \rho \le 2$ shaded.

Bottom row, the discrete NNX decoder (`meanfield.nets.Decoder`, pre-LN or no norm, GELU MLP, causal
4-head attention, d = 64, 12 layers, random Gaussian weights with $\lVert W_o\rVert_2 = s$, s in
{0.5, 1, 2}, and $W_\text{down}$ scaled to set $\rho$): on the same weights, the rule's linear proxy
(min erank of the propagated $C_l$) and the forward pass on 512 random tokens (min erank of the residual
stream's second moment), vs $\rho$; and the forward erank against the proxy.

The printed table scores predictors: for the particle model, how often "stable iff the band" is right
and how often the best single threshold on $\rho$ (fitted to the data, so optimistic) is; for the
decoder, the Spearman rank correlation of each predictor with the forward-pass min erank.

Key check: the largest relative deviation between `rule.propagate` (JAX, float64) and a direct NumPy
transcription of the rule's propagation, over every decoder of the study (expected 0, tolerance 1e-6).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from ..regimes.observed import REGIMES
from ..rule.band import BAND
from .style import FigureResult, save_figure

PROXY = "rule's linear proxy (W_o)"
DECODER = {
    "full": dict(d=64, layers=12, heads=4, n_tokens=512, rhos=np.logspace(np.log10(0.05), np.log10(20), 16),
                 seeds=(0, 1, 2), scales=(0.5, 1.0, 2.0)),
    "quick": dict(d=16, layers=4, heads=2, n_tokens=64, rhos=np.logspace(np.log10(0.05), np.log10(20), 5),
                  seeds=(0,), scales=(1.0,)),
}


def _spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties), NaN pairs dropped."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]

    def rank(x):
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            m = x == v
            r[m] = r[m].mean()
        return r

    ra, rb = rank(a), rank(b)
    return float(np.corrcoef(ra, rb)[0, 1])


# ----------------------------------------------------------------------------- particle model


def particle_sweep(quick: bool, out_dir: Path):
    """Run (or resume) the `one_to_one_rule` experiment; quick: 8 rho x beta 1 x seed 0."""
    import yaml

    from ..sweep.plan import config_from_dict, find_experiment
    from ..sweep.run import run_experiment

    path = Path(find_experiment("one_to_one_rule"))
    if not path.is_file():
        raise FileNotFoundError("experiments/one_to_one_rule.yaml not found (run from the repository root)")
    raw = yaml.safe_load(path.read_text())
    run_dir = Path("runs") / "one_to_one_rule"
    if quick:
        raw["sweep"]["grid"].update({"model.spectral_ratio": {"log": [0.05, 20, 8]}, "model.beta": [1.0], "seed": [0]})
        raw["name"] = "one_to_one_rule_quick"
        run_dir = out_dir / "runs" / "one_to_one_rule_quick"
    cfg = config_from_dict(raw, source=str(path))
    return run_experiment(cfg, out=run_dir, quiet=True, plots=False).dataset


def particle_summary(ds) -> dict:
    """Per norm and rho: regime fractions, final erank (median, IQR over beta and seeds), leading exponent."""
    rho = ds["model.spectral_ratio"].values
    norm = ds["model.norm"].values.astype(str)
    reg = ds["regime"].values
    er = ds["effective_rank"].values
    lam = np.nanmax(ds["lyapunov"].values, axis=1) if "lyapunov" in ds else np.full(len(rho), np.nan)
    out = {}
    for nm in sorted(set(norm)):
        rows = {"rho": [], "frac": [], "final_erank": [], "final_erank_q": [], "min_erank": [], "lambda1": [],
                "lambda1_q": [], "lambda1_finite": []}
        for r in np.unique(rho):
            s = (rho == r) & (norm == nm)
            fin = er[s][:, -1]
            rows["rho"].append(float(r))
            rows["frac"].append([float(np.mean(reg[s] == k)) for k in range(len(REGIMES))])
            rows["final_erank"].append(float(np.nanmedian(fin)) if np.isfinite(fin).any() else np.nan)
            rows["final_erank_q"].append([float(np.nanquantile(fin, q)) if np.isfinite(fin).any() else np.nan
                                          for q in (0.25, 0.75)])
            rows["min_erank"].append(float(np.nanmedian(np.nanmin(er[s], axis=1))))
            ls = lam[s]
            rows["lambda1"].append(float(np.nanmedian(ls)) if np.isfinite(ls).any() else np.nan)
            rows["lambda1_q"].append([float(np.nanquantile(ls, q)) if np.isfinite(ls).any() else np.nan
                                      for q in (0.25, 0.75)])
            rows["lambda1_finite"].append(float(np.mean(np.isfinite(ls))))
        out[nm] = {k: np.asarray(v) for k, v in rows.items()}
    return out


def band_scores(ds) -> dict:
    """Accuracy of 'stable iff 0.5 <= rho <= 2' and of the best threshold rule on rho, per norm."""
    rho = ds["model.spectral_ratio"].values
    norm = ds["model.norm"].values.astype(str)
    stable = ds["regime"].values == REGIMES.index("stable")
    scores = {}
    for nm in sorted(set(norm)):
        s = norm == nm
        in_band = (rho[s] >= BAND[0]) & (rho[s] <= BAND[1])
        acc_band = float(np.mean(in_band == stable[s]))
        best = (0.0, None, None)
        for c in np.unique(rho[s]):
            for side in ("below", "above"):
                pred = rho[s] <= c if side == "below" else rho[s] >= c
                acc = float(np.mean(pred == stable[s]))
                if acc > best[0]:
                    best = (acc, float(c), side)
        scores[nm] = {"n": int(s.sum()), "stable_fraction": float(stable[s].mean()), "band_accuracy": acc_band,
                      "best_threshold_accuracy": best[0], "best_threshold": best[1], "best_side": best[2],
                      "constant_accuracy": float(max(stable[s].mean(), 1 - stable[s].mean()))}
    return scores


def growth_rate_scores(ds, t1: float = 10.0, growth_limit: float = 1e6) -> dict:
    r"""Blow-up predicted by the linearised field's growth rate, without norm.

    $\alpha = \max\operatorname{Re}\operatorname{eig}(a_\text{attn} V + a_\text{mlp} W_2\,\mathrm{gelu}'(0)\,W_1)$,
    $\mathrm{gelu}'(0) = 1/2$ (the field's Jacobian at the origin for uniform attention weights); the a-priori
    rule is blow-up iff $\alpha t_1 > \log(\text{growth limit})$. Models rebuilt as the sweep built them:
    `sweep.build.build_model` of the run's config with each point's swept values. Also the best fitted threshold.
    """
    s = ds["model.norm"].values.astype(str) == "none"
    if not s.any():
        return {}
    rho = ds["model.spectral_ratio"].values[s]
    blow = ds["regime"].values[s] == REGIMES.index("blowup")
    alpha = np.empty(len(rho))
    for i, m in enumerate(sweep_models(ds, np.flatnonzero(s))):
        J = np.asarray(m.a_attn * m.V, np.float64) + 0.5 * np.asarray(m.a_mlp * (m.W2 @ m.W1), np.float64)
        alpha[i] = np.max(np.linalg.eigvals(J).real)
    thr = np.log(growth_limit) / t1
    fitted = max((float(np.mean((alpha >= c) == blow)), float(c)) for c in np.unique(alpha))
    return {"n": int(s.sum()), "blowup_fraction": float(blow.mean()), "a_priori_threshold": float(thr),
            "a_priori_accuracy": float(np.mean((alpha > thr) == blow)), "fitted_accuracy": fitted[0],
            "fitted_threshold": fitted[1], "band_upper_edge_accuracy": float(np.mean((rho > BAND[1]) == blow)),
            "alpha": alpha}


def sweep_models(ds, points):
    """The `Model` of each of the run's `points` (positions along ds's point dimension), built the
    sweep's way: `build_model` of the run's config (`ds.attrs["config_yaml"]`) with the point's swept
    values, weights from `point_keys(seed)`."""
    import jax.numpy as jnp
    import yaml

    from ..sweep.build import build_model, point_config, point_keys
    from ..sweep.plan import config_from_dict

    cfg = config_from_dict(yaml.safe_load(ds.attrs["config_yaml"]), check_files=False)
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    axes = ds.attrs["sweep_axes"].split()
    for i in points:
        pc = point_config(cfg, {a: ds[a].values[i].item() for a in axes})
        yield build_model(pc.model, point_keys(pc.seed)[0], dtype)


# ----------------------------------------------------------------------------- decoder


def _make_decoder(seed, rho, scale, norm, cfg):
    from flax import nnx

    from ..nets import Decoder, DecoderConfig

    d = cfg["d"]
    dcfg = DecoderConfig(d_model=d, n_layers=cfg["layers"], num_heads=cfg["heads"], head_dim=d // cfg["heads"],
                         hidden=4 * d, norm=norm)
    dec = Decoder(dcfg, rngs=nnx.Rngs(seed), std=1.0 / np.sqrt(d))
    for b in dec.blocks:
        o = np.asarray(b.o.kernel[...], np.float64)
        b.o.kernel[...] = b.o.kernel[...] * (scale / np.linalg.norm(o, 2))
        m = np.asarray(b.up.kernel[...], np.float64) @ np.asarray(b.down.kernel[...], np.float64)
        b.down.kernel[...] = b.down.kernel[...] * (rho * scale / np.linalg.norm(m, 2))
    return dec


def _direct_propagation_erank(W_mlp, W_attn):
    """The rule's propagation in float64 NumPy, written out independently (for the key check)."""
    d = W_mlp.shape[-1]
    C = np.eye(d)
    out = []
    for Wm, Wa in zip(W_mlp, W_attn):
        A = np.eye(d) + Wm + Wa
        C = A @ C @ A.T
        C = C / np.linalg.norm(C, 2)
        lam = np.clip(np.linalg.eigvalsh(C), 0, None)
        p = lam / lam.sum()
        p = p[p > 0]
        out.append(np.exp(-np.sum(p * np.log(p))))
    return np.asarray(out)


def decoder_study(quick: bool) -> dict:
    """Min erank of the rule's linear proxy and of the forward pass for random decoders over rho, scale, norm."""
    from ..nets.decoder import decoder_layer_matrices, rule_vs_forward

    cfg = DECODER["quick" if quick else "full"]
    X = jax.random.normal(jax.random.key(7), (cfg["n_tokens"], cfg["d"]))
    rows = []
    dev = 0.0
    for norm in ("layernorm", "none"):
        for scale in cfg["scales"]:
            for seed in cfg["seeds"]:
                for rho in cfg["rhos"]:
                    dec = _make_decoder(seed, float(rho), scale, norm, cfg)
                    r = rule_vs_forward(dec, X)
                    val = rule_vs_forward(dec, X, attention="value")
                    W_mlp, W_attn = decoder_layer_matrices(dec)
                    direct = _direct_propagation_erank(W_mlp, W_attn)
                    dev = max(dev, float(np.max(np.abs(direct / r["linear_erank"] - 1))))
                    fwd = r["forward_erank"]
                    rows.append({
                        "norm": norm, "scale": scale, "seed": seed, "rho": float(np.mean(r["rho"])),
                        "rho_value": float(np.mean(val["rho"])),
                        "mlp_norm": float(np.mean(np.linalg.norm(W_mlp, 2, axis=(1, 2)))),
                        "linear_min_erank": float(np.min(r["linear_erank"])),
                        "value_min_erank": float(np.min(val["linear_erank"])),
                        "forward_min_erank": float(np.nanmin(fwd)) if np.isfinite(fwd).any() else np.nan,
                        "forward_final_erank": float(fwd[-1]),
                    })
    cols = {k: np.asarray([row[k] for row in rows]) for k in rows[0]}
    cols["propagation_deviation"] = dev
    return cols


def decoder_scores(dec: dict) -> dict:
    """Spearman correlation of each predictor with the forward-pass min erank, per norm."""
    out = {}
    for norm in ("layernorm", "none"):
        s = dec["norm"] == norm
        y = dec["forward_min_erank"][s]
        band_distance = np.maximum(0, np.maximum(np.log(BAND[0] / dec["rho"][s]), np.log(dec["rho"][s] / BAND[1])))
        out[norm] = {
            "rule band (-distance of rho to [0.5, 2])": _spearman(-band_distance, y),
            "-|log rho| (balance)": _spearman(-np.abs(np.log(dec["rho"][s])), y),
            "-rho": _spearman(-dec["rho"][s], y),
            "-||W_mlp||": _spearman(-dec["mlp_norm"][s], y),
            PROXY: _spearman(dec["linear_min_erank"][s], y),
            "linear proxy, value-aware (W_o W_v)": _spearman(dec["value_min_erank"][s], y),
        }
    return out


# ----------------------------------------------------------------------------- figure


def render(out_dir, quick: bool = False) -> FigureResult:
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    name = "one_to_one_rule_quick" if quick else "one_to_one_rule"
    t0 = time.time()
    ds = particle_sweep(quick, out_dir)
    t_particles = time.time() - t0
    summ = particle_summary(ds)
    scores = band_scores(ds)
    growth = growth_rate_scores(ds)
    t1 = time.time()
    dec = decoder_study(quick)
    t_decoder = time.time() - t1
    dscores = decoder_scores(dec)

    print(f"{name}: particle sweep {ds.sizes['point']} points ({t_particles:.0f} s), "
          f"{len(dec['rho'])} decoders ({t_decoder:.0f} s)")
    print("particle model: 'stable iff 0.5 <= rho <= 2' vs the simulated regime")
    for nm, sc in scores.items():
        print(f"  norm={nm:6}: n={sc['n']}, stable {sc['stable_fraction']:.2f}; band accuracy {sc['band_accuracy']:.2f}; "
              f"best threshold rho {'<=' if sc['best_side'] == 'below' else '>='} {sc['best_threshold']:.3g}: "
              f"{sc['best_threshold_accuracy']:.2f}; always-majority {sc['constant_accuracy']:.2f}")
    if growth:
        print(f"  no norm, blow-up: a-priori alpha t1 > log(1e6) (alpha > {growth['a_priori_threshold']:.3f}) right "
              f"{growth['a_priori_accuracy']:.3f}; fitted alpha >= {growth['fitted_threshold']:.3f}: "
              f"{growth['fitted_accuracy']:.3f}; 'rho > 2' {growth['band_upper_edge_accuracy']:.3f} "
              f"(blow-up fraction {growth['blowup_fraction']:.2f})")
    print("decoder: Spearman correlation with the forward-pass min erank")
    for norm, sc in dscores.items():
        print(f"  {norm}: " + "; ".join(f"{k} {v:+.2f}" for k, v in sc.items()))

    colors = {"collapse": "tab:purple", "stable": "tab:green", "blowup": "tab:red", "failed": "0.6"}
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for col, nm in enumerate(("sphere", "none")):
        ax = axes[0, col]
        if nm not in summ:
            ax.set_visible(False)
            continue
        s = summ[nm]
        bottom = np.zeros(len(s["rho"]))
        for k, reg in enumerate(REGIMES):
            ax.fill_between(s["rho"], bottom, bottom + s["frac"][:, k], step="mid", color=colors[reg], alpha=0.55,
                            lw=0, label=reg)
            bottom = bottom + s["frac"][:, k]
        ax.axvspan(*BAND, color="k", alpha=0.08, lw=0)
        ax.axvline(BAND[0], color="k", ls="--", lw=0.8)
        ax.axvline(BAND[1], color="k", ls="--", lw=0.8, label="rule's band 0.5-2")
        bx = ax.twinx()
        bx.plot(s["rho"], s["final_erank"], "k.-", lw=1.2, label="final erank (median)")
        q = s["final_erank_q"]
        bx.fill_between(s["rho"], q[:, 0], q[:, 1], color="k", alpha=0.15, lw=0)
        bx.set_ylabel("final effective rank of X (median, IQR)")
        bx.set_ylim(1, max(2.0, float(np.nanmax(q[:, 1])) * 1.05 if np.isfinite(q).any() else 2.0))
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel(r"$\rho = \|a_{mlp} W_2 W_1\|_2 / \|a_{attn} V\|_2$")
        ax.set_ylabel("fraction of runs")
        ax.set_title(f"particles, norm = {nm}: band acc. {scores[nm]['band_accuracy']:.2f}, "
                     f"best threshold {scores[nm]['best_threshold_accuracy']:.2f}", fontsize=9.5)
        if col == 0:
            ax.legend(loc="lower left", fontsize=8)
    ax = axes[0, 2]
    for nm, c in (("sphere", "tab:blue"), ("none", "tab:orange")):
        if nm not in summ:
            continue
        s = summ[nm]
        ax.plot(s["rho"], s["lambda1"], "o-", ms=3, color=c, label=f"norm = {nm}")
        q = s["lambda1_q"]
        ax.fill_between(s["rho"], q[:, 0], q[:, 1], color=c, alpha=0.2, lw=0)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvspan(*BAND, color="k", alpha=0.08, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel(r"$\rho$")
    ax.set_ylabel(r"leading finite-time Lyapunov exponent $\lambda_1$ over [0, 10]")
    ax.set_title("QR method on the tangent flow (median, IQR; nan = blow-up)", fontsize=9.5)
    ax.legend(fontsize=8)

    for col, norm in enumerate(("layernorm", "none")):
        ax = axes[1, col]
        s = dec["norm"] == norm
        for scale, mk in zip(sorted(set(dec["scale"][s])), ("v", "o", "^")):
            m = s & (dec["scale"] == scale)
            order = np.argsort(dec["rho"][m])
            ax.plot(dec["rho"][m][order], dec["forward_min_erank"][m][order], mk, ms=3.5, color="tab:blue",
                    alpha=0.7, label=f"forward pass, $\\|W_o\\|$ = {scale:g}")
            ax.plot(dec["rho"][m][order], dec["linear_min_erank"][m][order], mk, ms=3.5, color="tab:gray",
                    alpha=0.7, mfc="none", label=f"rule's linear proxy, $\\|W_o\\|$ = {scale:g}")
        ax.axvspan(*BAND, color="k", alpha=0.08, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(r"rule's $\rho = \|W_{down} W_{up}\|_2 / \|W_o\|_2$ (mean over layers)")
        ax.set_ylabel("min effective rank over layers")
        title = "pre-LN" if norm == "layernorm" else "no norm"
        ax.set_title(f"NNX decoder, {title}: Spearman(proxy, forward) "
                     f"{dscores[norm][PROXY]:+.2f}", fontsize=9.5)
        ax.legend(fontsize=7, ncol=2)
    ax = axes[1, 2]
    for norm, c in (("layernorm", "tab:blue"), ("none", "tab:orange")):
        s = dec["norm"] == norm
        ax.plot(dec["linear_min_erank"][s], dec["forward_min_erank"][s], "o", ms=3.5, color=c, alpha=0.7,
                label="pre-LN" if norm == "layernorm" else "no norm")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rule's linear proxy: min erank of propagated C")
    ax.set_ylabel("forward pass: min erank of residual stream")
    ax.set_title("same weights, proxy vs forward pass", fontsize=9.5)
    ax.legend(fontsize=8)
    fig.suptitle("The 1:1 rule in nonlinear dynamics: continuous-depth particles (top) and a discrete decoder (bottom)")
    fig.tight_layout()

    data = {
        "particles": {nm: {k: v for k, v in s.items()} for nm, s in summ.items()},
        "band_scores": scores,
        "growth_rate_scores": growth,
        "decoder": {k: (v if not isinstance(v, np.ndarray) or v.dtype.kind != "U" else v.tolist()) for k, v in dec.items()},
        "decoder_spearman": dscores,
        "seconds": {"particles": t_particles, "decoder": t_decoder},
    }
    return save_figure(fig, out_dir, name, data, key="max relative deviation of rule.propagate from a direct NumPy "
                       "propagation over the study's decoders", value=dec["propagation_deviation"], expected=0.0,
                       tolerance=1e-6, quick=quick)
