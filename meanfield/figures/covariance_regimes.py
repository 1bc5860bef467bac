r"""Covariance regimes with time-invariant parameters (Alcalde, Ji, Zuazua 2026; `meanfield.regimes.predicted`).

tr S(t) on a log axis for four parameter sets in d = 2 (V = vI, so P = S^{-1} obeys a linear
Lyapunov ODE): an equilibrium (Re lambda(W) > 0, beta v Ms negative definite; dotted line: the
predicted level tr (P*)^{-1}), a collapse (W Hurwitz, small S0), a blow-up with W = 0 and one with
W Hurwitz and large S0 (the threshold case); vertical lines: predicted blow-up times.
Key check: relative error of the simulated blow-up time (`simulate_gaussian`) against the
predicted one for the W != 0 matrix case, expected 0, tolerance 1e-3.
"""

from __future__ import annotations

import jax
import numpy as np

from .style import FigureResult, save_figure

CASES = {
    "equilibrium": dict(Q=[[1.0, 0.3], [0.0, 1.0]], K=[[-1.0, -0.3], [0.0, -1.0]], v=0.7,
                        W=[[0.5, 0.4], [-0.2, 0.8]], S0=np.eye(2)),
    "collapse": dict(Q=np.eye(2), K=np.eye(2), v=1.0, W=[[-1.0, 0.3], [0.0, -0.5]], S0=0.05 * np.eye(2)),
    "blowup (W = 0)": dict(Q=[[1.0, 0.2], [0.0, 0.5]], K=np.eye(2), v=1.0, W=np.zeros((2, 2)),
                           S0=np.array([[1.0, 0.2], [0.2, 0.5]])),
    "blowup (W Hurwitz, large S0)": dict(Q=np.eye(2), K=np.eye(2), v=1.0, W=[[-1.0, 0.3], [0.0, -0.5]],
                                         S0=3.0 * np.eye(2)),
}


def render(out_dir, quick: bool = False) -> FigureResult:
    import matplotlib.pyplot as plt

    from ..regimes.predicted import predict_regime
    from ..model.params import Model
    from ..simulate.gaussian import simulate_gaussian

    t1 = 10.0
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    data, key_err = {}, None
    with jax.enable_x64(True):
        for j, (name, c) in enumerate(CASES.items()):
            model = Model(Q=c["Q"], K=c["K"], V=c["v"] * np.eye(2), W=c["W"], mlp="affine", dtype="float64")
            label, det = predict_regime(model, np.zeros(2), c["S0"])
            sol = simulate_gaussian(model, np.zeros(2), c["S0"], t1, n_save=401 if not quick else 201,
                                    rtol=1e-10, atol=1e-13)
            ok = np.asarray(sol.valid)
            tr = np.trace(np.asarray(sol.covs), axis1=1, axis2=2)
            color = f"C{j}"
            ax.semilogy(np.asarray(sol.ts)[ok], tr[ok], color=color, label=f"{name}: predicted {label}")
            entry = {"predicted": label, "ts": np.asarray(sol.ts)[ok], "trace": tr[ok],
                     "t_sim": float(sol.blowup_time)}
            if det.get("blowup_time"):
                ax.axvline(det["blowup_time"], color=color, ls="--", lw=1)
                entry["t_pred"] = det["blowup_time"]
                entry["rel_err"] = abs(float(sol.blowup_time) - det["blowup_time"]) / det["blowup_time"]
                if "Hurwitz" in name:
                    key_err = entry["rel_err"]
            if label == "equilibrium":
                level = float(np.trace(det["limit"]))
                ax.axhline(level, color=color, ls=":", lw=1)
                entry["predicted_level"] = level
            data[name] = entry
    ax.set_xlabel("depth t")
    ax.set_ylabel("tr S(t)")
    ax.set_title("Gaussian covariance regimes (dashed: predicted blow-up, dotted: predicted level)")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, "covariance_regimes", data,
                       key="relative error of simulated vs predicted blow-up time (W Hurwitz, large S0)",
                       value=key_err, expected=0.0, tolerance=1e-3, quick=quick)
