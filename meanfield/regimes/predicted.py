r"""Spectral criteria for the Gaussian moment ODE with time-invariant parameters.

For $N(m, S)$ tokens, softmax attention and an affine MLP (MISSION section 2; Alcalde, Ji, Zuazua
2026), with $\tilde V = a_\text{attn} V$, $\tilde W = a_\text{mlp} W$, $B = K^\top Q$,
$M_s = \operatorname{sym}(Q^\top K)$:

$$ \dot S = \beta(\tilde V S B S + S B^\top S \tilde V^\top) + \tilde W S + S \tilde W^\top. $$

The paper's own statements were not readable (only its abstract is stored); the conditions below
are derived here and every one is checked against `simulate_gaussian` (tests/test_criteria.py,
docs/criteria.md):

- d = 1 ($c = \beta v a$, $w$): $1/s$ obeys $p' = -2wp - 2c$, closed form, exact regime and time.
- $\tilde V = vI$, S0 positive definite: $P = S^{-1}$ obeys the LINEAR Lyapunov ODE
  $\dot P = -(\tilde W^\top P + P\tilde W) - 2\beta v M_s$, solved in closed form (one `expm` of the
  vectorised system); blow-up is the first zero of $\lambda_\min(P(t))$ (root-found, exact up to
  the root finder), so $T^*$ is predicted for any W. W = 0: $T^* = 1/(2\lambda_\max(\beta v
  S_0^{1/2}M_sS_0^{1/2}))$. Long-time labels from the spectrum of W: $\mathrm{Re}\,\lambda(W) > 0$:
  $P \to P^*$, $W^\top P^* + P^*W = -2\beta vM_s$, equilibrium iff $P^* \succ 0$ (e.g. $\beta vM_s
  \prec 0$); W Hurwitz: $P(t) - P^* = e^{-W^\top t}(P_0 - P^*)e^{-Wt}$ grows, so collapse iff
  $P_0 \succ P^*$, else blow-up (the threshold: with $\beta vM_s \succ 0$, $P^* \succ 0$ and small
  $S_0$ collapses, large $S_0$ blows up); mixed spectra: blow-up if P(t) turns singular within the
  scanned depth, otherwise unknown.
- general V (sufficient conditions only): with
  $\kappa = \lambda_\min(\beta\operatorname{sym}(B\tilde V)) > 0$,
  $\frac{d}{dt}\log\det S = 2\operatorname{tr}M \ge 2\kappa\operatorname{tr}S + 2\operatorname{tr}
  \tilde W \ge 2\kappa d\det S^{1/d} + 2\operatorname{tr}\tilde W$, so $D = \det S^{1/d}$ is a
  supersolution of the scalar Riccati with $(c, w) = (\kappa, \operatorname{tr}\tilde W/d)$: blow-up
  no later than that scalar's $t^*$ (an upper bound, reported as `blowup_time_upper`).
  With $c = |\beta|\,\|\tilde V\|_2\|B\|_2$ and $w = \lambda_\max(\operatorname{sym}\tilde W)$,
  $\lambda_\max(S)' \le 2c\lambda_\max^2 + 2w\lambda_\max$: if $w < 0$ and $\lambda_\max(S_0) <
  -w/c$ the covariance collapses. Anything else: "unknown".
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
from scipy.optimize import brentq

LABELS = ("equilibrium", "collapse", "blowup", "unknown")


def _effective(model):
    from ..model.field import gaussian_closure_error

    why = gaussian_closure_error(model)
    if why is not None:
        raise ValueError(f"predict_regime: no exact Gaussian closure for this model: {why}.")
    if model.layer_times is not None:
        raise ValueError("predict_regime: `model` must be depth-constant (time-invariant parameters); got a piecewise one.")
    d = model.d
    if model.attention == "none":
        V, Q, K, beta = np.zeros((d, d)), np.zeros((d, d)), np.zeros((d, d)), 0.0
    else:
        V = float(model.a_attn) * np.asarray(model.V, float)
        Q, K, beta = np.asarray(model.Q, float), np.asarray(model.K, float), float(model.beta)
    W = float(model.a_mlp) * np.asarray(model.W, float) if model.mlp == "affine" else np.zeros((d, d))
    return V, Q, K, beta, W


# ------------------------------------------------------------------------------------------------
# d = 1
# ------------------------------------------------------------------------------------------------
def scalar_regime(c: float, w: float, s0: float):
    r"""Regime of $s' = 2cs^2 + 2ws$ from $s_0 \ge 0$ (c = beta v a): exact closed form.

    $1/s(t) = (1/s_0 + c/w)e^{-2wt} - c/w$ ($w \ne 0$), $1/s_0 - 2ct$ ($w = 0$); blow-up at the
    first positive zero: $t^* = \ln(1 + w/(cs_0))/(2w)$, resp. $1/(2cs_0)$.
    Returns (label, blow-up time or inf, limit of s or None).
    """
    if s0 <= 0:
        return "collapse", np.inf, 0.0
    p0 = 1.0 / s0
    if w == 0:
        if c > 0:
            return "blowup", 1.0 / (2 * c * s0), None
        if c < 0:
            return "collapse", np.inf, 0.0
        return "equilibrium", np.inf, s0
    A, p_inf = p0 + c / w, -c / w          # p(t) = A e^{-2wt} + p_inf
    if A != 0 and p_inf / A < 0 and 0 < -p_inf / A:
        r = -p_inf / A                      # e^{-2wt} = r
        t = -np.log(r) / (2 * w)
        if t > 0:
            return "blowup", t, None
    if w > 0:                               # p -> p_inf
        if p_inf > 0:
            return "equilibrium", np.inf, 1.0 / p_inf
        if p_inf == 0:
            return "unknown", np.inf, None  # c = 0: exponential growth, no finite-time blow-up
        return "blowup", np.inf, None       # unreachable: p_inf < 0 always crosses
    if A > 0:                               # w < 0: p -> +inf
        return "collapse", np.inf, 0.0
    if A == 0:
        return "equilibrium", np.inf, 1.0 / p_inf  # sitting exactly on the unstable equilibrium
    return "blowup", np.inf, None           # unreachable: A < 0 crosses zero


# ------------------------------------------------------------------------------------------------
# V = v I: linear Lyapunov ODE for P = S^{-1}
# ------------------------------------------------------------------------------------------------
def precision_flow(W, G, P0):
    r"""Closed form of $\dot P = -(W^\top P + PW) - G$: a function t -> P(t) (vectorised expm)."""
    d = W.shape[0]
    I = np.eye(d)
    # row-major vec: vec(W^T P) = (W^T kron I) vec P, vec(P W) = (I kron W^T) vec P
    A = -(np.kron(W.T, I) + np.kron(I, W.T))
    aug = np.zeros((d * d + 1, d * d + 1))
    aug[: d * d, : d * d] = A
    aug[: d * d, -1] = -G.reshape(-1)
    y0 = np.concatenate([P0.reshape(-1), [1.0]])

    def P(t):
        with np.errstate(over="ignore", invalid="ignore"):
            y = sla.expm(aug * t) @ y0
            Pt = y[:-1].reshape(d, d)
            return 0.5 * (Pt + Pt.T)

    return P


def _first_singular_time(P, t_max, n_grid=1200):
    """First t in (0, t_max] with lambda_min(P(t)) = 0 (grid scan + brentq), or inf.

    A sign change counts only when it is significant, lambda_min < -1e3 d eps lambda_max: once
    P(t) has grown to ~1e16 its smallest eigenvalue is rounding noise of that size (measured:
    false zeros at lambda_max ~ 1e23).
    """
    d = P(0.0).shape[0]
    lmin = lambda t: np.linalg.eigvalsh(P(t))[0]  # noqa: E731
    ts = np.unique(np.concatenate([np.geomspace(1e-6 * t_max, t_max, n_grid // 2), np.linspace(0, t_max, n_grid // 2)]))
    prev_t = 0.0
    for t in ts[1:]:
        Pt = P(t)
        if not np.all(np.isfinite(Pt)):
            return np.inf
        lam = np.linalg.eigvalsh(Pt)
        noise = 1e3 * d * np.finfo(float).eps * np.max(np.abs(lam))
        if lam[0] < -noise:
            return brentq(lmin, prev_t, t, xtol=1e-14 * max(t, 1.0), rtol=1e-14, maxiter=200)
        if lam[0] > 0:
            prev_t = t
    return np.inf


def _psd_class(X, rtol=1e-10):
    lam = np.linalg.eigvalsh(0.5 * (X + X.T))
    tol = rtol * max(np.max(np.abs(lam)), 1e-300)
    if lam[0] > tol:
        return "pd"
    if lam[0] >= -tol:
        return "psd_singular"
    return "indefinite"


def _scalar_value_regime(v, Q, K, beta, W, S0, horizon):
    d = W.shape[0]
    Ms = 0.5 * (Q.T @ K + K.T @ Q)
    G = 2 * beta * v * Ms
    P0 = np.linalg.inv(S0)
    details = {"case": "V = vI (linear Lyapunov ODE for P = S^-1)", "v": v}
    if np.allclose(W, 0, atol=1e-14):
        h = sla.sqrtm(S0).real
        mu = np.linalg.eigvalsh(h @ (0.5 * G) @ h)
        details["case"] = "V = vI, W = 0: P(t) = P0 - 2 beta v Ms t"
        details["mu"] = mu
        if mu[-1] > 0:
            return "blowup", {**details, "blowup_time": 1.0 / (2 * mu[-1])}
        if mu[-1] < 0:
            return "collapse", details
        if np.allclose(G, 0, atol=1e-14):
            return "equilibrium", {**details, "limit": S0}
        return "unknown", {**details, "reason": "beta v Ms negative semi-definite and singular: S tends to a singular non-zero limit"}
    lam = np.linalg.eigvals(W)
    re = lam.real
    details["eig_W"] = lam
    P = precision_flow(W, G, P0)
    scales = [abs(x) for x in re if abs(x) > 1e-12]
    t_max = horizon if horizon is not None else min(60.0 / min(scales) if scales else 1e3, 1e4)
    t_star = _first_singular_time(P, t_max)
    details["scanned_depth"] = t_max
    if np.isfinite(t_star):
        return "blowup", {**details, "blowup_time": t_star}
    solvable = np.min(np.abs(lam[:, None] + lam[None, :])) > 1e-10
    Pstar = sla.solve_continuous_lyapunov(W.T, -G) if solvable else None
    details["P_star"] = Pstar
    if solvable and np.all(re > 0):
        cls = _psd_class(Pstar)
        if cls == "pd":
            return "equilibrium", {**details, "limit": np.linalg.inv(Pstar)}
        if cls == "indefinite":  # P -> P* indefinite: crosses beyond the scanned depth
            return "blowup", {**details, "blowup_time": None, "reason": "P* indefinite; zero beyond scanned depth"}
        return "unknown", {**details, "reason": "P* singular"}
    if solvable and np.all(re < 0):
        cls = _psd_class(P0 - Pstar)
        if cls == "pd":
            return "collapse", details
        if cls == "indefinite":
            return "blowup", {**details, "blowup_time": None, "reason": "P0 - P* indefinite; zero beyond scanned depth"}
        return "unknown", {**details, "reason": "P0 - P* singular (threshold)"}
    return "unknown", {**details, "reason": "W has eigenvalues on both sides of (or on) the imaginary axis and P(t) stays positive definite over the scanned depth"}


# ------------------------------------------------------------------------------------------------
# general V: sufficient conditions
# ------------------------------------------------------------------------------------------------
def _general_regime(V, Q, K, beta, W, S0):
    d = W.shape[0]
    B = K.T @ Q
    details = {"case": "general V (sufficient conditions)"}
    kappa = np.linalg.eigvalsh(beta * 0.5 * (B @ V + (B @ V).T))[0]
    det0 = np.linalg.det(S0)
    details["kappa"] = kappa
    if kappa > 0 and det0 > 0:
        label, t_up, _ = scalar_regime(kappa, np.trace(W) / d, det0 ** (1.0 / d))
        if label == "blowup":
            return "blowup", {**details, "blowup_time": None, "blowup_time_upper": t_up}
    c = abs(beta) * np.linalg.norm(V, 2) * np.linalg.norm(B, 2)
    w = np.linalg.eigvalsh(0.5 * (W + W.T))[-1]
    s0 = np.linalg.eigvalsh(S0)[-1]
    details["collapse_bound"] = (c, w, s0)
    if w < 0 and (c == 0 or s0 < -w / c):
        return "collapse", details
    return "unknown", {**details, "reason": "no sufficient condition applies"}


def predict_regime(model, m0, S0, *, horizon: float | None = None):
    r"""Predicted long-depth regime of $N(m_0, S_0)$ under a depth-constant `model`.

    Returns (label, details): label in `LABELS` -- "equilibrium" (S tends to a bounded positive-
    definite limit, `details["limit"]`), "collapse" (S -> 0), "blowup" (finite depth;
    `details["blowup_time"]` when predicted exactly, `details["blowup_time_upper"]` for a bound),
    "unknown" (no criterion applies; `details["reason"]`). `details["case"]` names the criterion
    used (module docstring). `horizon`: depth scanned for a zero of det P (default 60 / the
    smallest |Re lambda(W)|). The mean does not enter (it follows S; with b = 0 it blows up with S).
    """
    V, Q, K, beta, W = _effective(model)
    S0 = np.asarray(S0, float)
    d = S0.shape[0]
    if d == 1:
        c, w = beta * V[0, 0] * (K.T @ Q)[0, 0], W[0, 0]
        label, t, lim = scalar_regime(c, w, S0[0, 0])
        det = {"case": "d = 1 closed form", "c": c, "w": w, "limit": lim}
        if label == "blowup":
            det["blowup_time"] = t if np.isfinite(t) else None
        return label, det
    v = np.trace(V) / d
    pd = np.linalg.eigvalsh(0.5 * (S0 + S0.T))[0] > 1e-12 * np.linalg.eigvalsh(S0)[-1]
    if np.allclose(V, v * np.eye(d), atol=1e-12 * max(1.0, abs(v))) and pd:
        return _scalar_value_regime(v, Q, K, beta, W, S0, horizon)
    return _general_regime(V, Q, K, beta, W, S0)


def simulated_regime(model, m0, S0, t1: float, *, n_save: int = 201, max_steps: int = 200_000):
    """The regime `simulate_gaussian` shows on [0, t1] (float64), labelled like `predict_regime`.

    blowup: the solve hit its blow-up event (`blowup_time` < inf); collapse: lambda_max(S) at t1
    is below 5e-2 of its start and fell by at least 40% over the second half of the run (1/t decay
    halves it) or is below 1e-12 of its start (the solver's rounding floor); equilibrium: S(t1) positive definite (lambda_min > 1e-3 lambda_max) and its
    relative change over the last 10% of the run below 1e-3; otherwise (a solver failure
    without blow-up included) "unknown".
    Returns (label, GaussianSolution).
    """
    from ..simulate.gaussian import simulate_gaussian

    sol = simulate_gaussian(model, m0, S0, float(t1), n_save=n_save, rtol=1e-10, atol=1e-13, max_steps=max_steps)
    if np.isfinite(float(sol.blowup_time)):
        return "blowup", sol
    if not bool(sol.success):
        return "unknown", sol
    covs = np.asarray(sol.covs)
    top = lambda S: np.linalg.eigvalsh(S)[-1]  # noqa: E731
    sT, sh, s0 = top(covs[-1]), top(covs[n_save // 2]), top(covs[0])
    if sT < 5e-2 * s0 and (sT < 0.6 * sh or sT < 1e-12 * s0):
        return "collapse", sol
    lam = np.linalg.eigvalsh(covs[-1])
    change = np.linalg.norm(covs[-1] - covs[int(0.9 * (n_save - 1))]) / np.linalg.norm(covs[-1])
    if lam[0] > 1e-3 * lam[-1] and change < 1e-3:
        return "equilibrium", sol
    return "unknown", sol


# ------------------------------------------------------------------------------------------------
# Validation grid (docs/criteria.md)
# ------------------------------------------------------------------------------------------------
CLASSES = {
    "A": "V = vI, W = 0",
    "B": "V = vI, W = A + aI with Re lambda(W) > 0",
    "C": "V = vI, W = A - aI Hurwitz",
    "D": "V = vI, W random (mixed spectrum)",
    "E": "V random, W random",
    "F": "V = 0.5 x random, W = A - aI with sym(W) negative definite",
    "G": "V = |v| I, K = -Q(I + 0.3 R R^T) (beta v Ms negative definite), Re lambda(W) > 0",
}


def validation_grid(seed: int = 1, n_per: int = 25, dims=(2, 3), classes: str = "ABCDEFG"):
    """Random parameter sets (`CLASSES`), predicted vs simulated regime for each: list of dicts.

    Q, K, A, R, random V and W: i.i.d. N(0, 1/d) entries; v = +-U(0.3, 1.5); a puts the spectrum
    of W where the class says (margin U(0.2, 1)); S0 = (G G^T / d + 0.1 I) U(0.2, 2), G N(0, 1);
    beta = 1, b = 0. Simulated to depth 200 (2 T* when a later blow-up is predicted; 10 / |mu| for
    the slow W = 0 collapse), float64 (call under `jax.enable_x64`).
    """
    from ..model.params import Model

    rng = np.random.default_rng(seed)
    rows = []

    def rand(d):
        return rng.normal(size=(d, d)) / np.sqrt(d)

    for d in dims:
        for cls in classes:
            for i in range(n_per):
                Q, K = rand(d), rand(d)
                v = rng.choice([-1, 1]) * rng.uniform(0.3, 1.5)
                V = v * np.eye(d)
                if cls == "A":
                    W = np.zeros((d, d))
                elif cls in "BC":
                    A = rand(d)
                    a = np.max(np.abs(np.linalg.eigvals(A).real)) + rng.uniform(0.2, 1.0)
                    W = A + (a if cls == "B" else -a) * np.eye(d)
                elif cls == "D":
                    W = rand(d)
                elif cls == "E":
                    V, W = rand(d), rand(d)
                elif cls == "F":
                    V = 0.5 * rand(d)
                    A = rand(d)
                    W = A - (np.max(np.linalg.eigvalsh(0.5 * (A + A.T))) + rng.uniform(0.5, 2)) * np.eye(d)
                else:  # G
                    V = abs(v) * np.eye(d)
                    K = -Q @ (np.eye(d) + 0.3 * rand(d) @ rand(d).T)
                    A = rand(d)
                    W = A + (np.max(np.abs(np.linalg.eigvals(A).real)) + rng.uniform(0.2, 1.0)) * np.eye(d)
                G = rng.normal(size=(d, d))
                S0 = (G @ G.T / d + 0.1 * np.eye(d)) * rng.uniform(0.2, 2.0)
                m0 = rng.normal(size=d)
                model = Model(Q=Q, K=K, V=V, W=W, mlp="affine", dtype="float64")
                label, det = predict_regime(model, m0, S0)
                tb = det.get("blowup_time")
                t1 = 200.0 if not tb else max(200.0, 2 * tb)
                mu = det.get("mu")
                if mu is not None and mu[-1] < 0:
                    t1 = max(t1, 10.0 / abs(mu[-1]))
                sim, sol = simulated_regime(model, m0, S0, t1)
                rows.append(dict(d=d, cls=cls, index=i, predicted=label, simulated=sim, t_pred=tb,
                                 t_upper=det.get("blowup_time_upper"), t_sim=float(sol.blowup_time),
                                 case=det["case"], reason=det.get("reason"), t1=t1,
                                 Q=Q, K=K, V=V, W=W, S0=S0, m0=m0, mu=mu))
    return rows
