r"""Reachability of Gaussian moments with depth-varying parameters (Alcalde, Ji, Zuazua 2026).

With softmax attention and an affine MLP a Gaussian $N(m, S)$ stays Gaussian and (MISSION section 2)

$$ \dot m = c + Mm,\quad \dot S = MS + SM^\top,\qquad M = \beta V S K^\top Q + W,\quad c = Vm + b $$

(`a_attn`, `a_mlp` folded in, exactly as `meanfield.model.field.moment_matrices`). Since
$S(t) = \Phi(t) S_0 \Phi(t)^\top$ with $\dot\Phi = M\Phi$, $\operatorname{rank} S(t) =
\operatorname{rank} S_0$ for every t; the paper proves conversely that every target of the same
rank is reachable in finite depth with time-varying parameters. `steer` computes such parameters,
piecewise constant over `K` equal depth segments (a `Model.piecewise` schedule):

1. a constructive guess, exact for the MLP part alone (attention switched off): a symmetric
   positive-definite transport map $A$ with $A S_0' A = S_1$ (the Bures/optimal-transport map
   $A = S_0^{-1/2}(S_0^{1/2} S_1 S_0^{1/2})^{1/2} S_0^{-1/2}$, restricted to the range when S is
   singular, after a rotation $G \in SO(d)$ taking range $S_0$ to range $S_1$), realised by
   $W = \log A / T$ (and $\log G$ on the first half of the segments when a rotation is needed);
   a constant $b$ solving the linear mean equation exactly. The attention term of each segment is
   then cancelled at the reference path's segment midpoint: $W_k \mathrel{-}= \beta V_k S_\text{ref}
   K^\top Q$, $b_k \mathrel{-}= V_k m_\text{ref}$ (exact up to the variation of S in a segment);
2. refinement with `optax.lbfgs` of the squared Bures-Wasserstein distance at depth T, computed
   by differentiating through a fixed-step Tsit5 `diffrax` solve of the same moment field
   (factor form $\dot L = ML$, $S = LL^\top$, as in `simulate_gaussian`).

The controlled parameters are chosen by `controls` (default `("V", "W", "b")`: value map and MLP;
Q, K, beta stay those of `base`, default Q = K = V = I, beta = 1). The returned controls are checked
by an independent adaptive `simulate_gaussian` run; `SteerResult.distance` is that run's distance.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg as sla

from ._types import Cov, Mean
from .model.field import moment_matrices
from .model.params import Model
from .simulate.gaussian import covariance_factor, simulate_gaussian

CONTROLLABLE = ("Q", "K", "V", "W", "b")


# --------------------------------------------------------------------------------------------
# Bures-Wasserstein distance
# --------------------------------------------------------------------------------------------
def as_float(*xs) -> tuple[jax.Array, ...]:
    """JAX's casting convention for the arguments: one common float dtype, the promotion of the inputs'
    (`jnp.result_type(*xs, float)`): NumPy float64 arrays and Python lists become the default float
    (float32 unless x64 is enabled), float32 arrays stay float32, integers become the default float."""
    xs = [np.asarray(x) if isinstance(x, (list, tuple)) else x for x in xs]  # scalars stay weakly typed
    dtype = jnp.result_type(*xs, float)
    return tuple(jnp.asarray(x, dtype) for x in xs)


def resolution(m1: Mean, S1: Cov, dtype) -> float:
    r"""The smallest $W_2$ distance to $N(m_1, S_1)$ that `bures_wasserstein` resolves in `dtype`.

    $W_2^2$ is a difference of terms of size $\operatorname{tr} S_1$, rounded at $d\,\epsilon$ relative, so
    $W_2$ below $\sqrt{d\,\epsilon\,(\operatorname{tr} S_1 + |m_1|^2 + 1)}$ is rounding: about $10^{-3}$ for unit
    covariances in float32, $10^{-8}$ in float64. `steer` never aims below it.
    """
    S1 = np.asarray(S1, np.float64)
    d = S1.shape[-1]
    size = float(np.trace(S1)) + float(np.sum(np.asarray(m1, np.float64) ** 2)) + 1.0
    return float(np.sqrt(d * float(jnp.finfo(dtype).eps) * size))


@jax.custom_jvp
def trace_sqrt_psd(C: Cov) -> jax.Array:
    r"""$\operatorname{tr} C^{1/2}$ for symmetric PSD C (negative rounding eigenvalues clipped to 0).

    The derivative is $\tfrac12\operatorname{tr}(C^{+1/2}\,dC)$ with the pseudo-inverse square root
    (eigenvalues below $d\,\epsilon\,\lambda_\max$ dropped, in the value too), so it stays finite at rank-deficient C
    and at repeated eigenvalues (where differentiating `eigh` would divide by zero).
    """
    lam = jnp.linalg.eigvalsh(0.5 * (C + C.T))
    return jnp.sum(jnp.sqrt(jnp.where(lam > _eig_tol(lam, C), lam, 0.0)))


def _eig_tol(lam, C):
    return C.shape[-1] * jnp.finfo(C.dtype).eps * jnp.maximum(jnp.max(jnp.abs(lam)), jnp.finfo(C.dtype).tiny)


@trace_sqrt_psd.defjvp
def _trace_sqrt_psd_jvp(primals, tangents):
    (C,), (dC,) = primals, tangents
    lam, U = jnp.linalg.eigh(0.5 * (C + C.T))
    keep = lam > _eig_tol(lam, C)
    inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    dsym = 0.5 * (dC + dC.T)
    dlam = jnp.einsum("ia,ij,ja->a", U, dsym, U)
    return jnp.sum(jnp.where(keep, jnp.sqrt(jnp.where(keep, lam, 0.0)), 0.0)), 0.5 * jnp.sum(inv_sqrt * dlam)


def _psd_factor(S: Cov, rank_rtol) -> Cov:
    """D with D D^T = S, columns exactly zero for eigenvalues <= rank_rtol * lambda_max (clipped eigh)."""
    lam, U = jnp.linalg.eigh(0.5 * (S + S.T))
    top = jnp.maximum(jnp.max(jnp.abs(lam)), jnp.finfo(S.dtype).tiny)
    return U * jnp.sqrt(jnp.where(lam > rank_rtol * top, lam, 0.0))


def bures_wasserstein(m: Mean, S: Cov, m1: Mean, S1: Cov, *, squared: bool = False,
                      rank_rtol: float | None = None) -> jax.Array:
    r"""2-Wasserstein distance between $N(m, S)$ and $N(m_1, S_1)$ (Bures metric on the covariances).

    $$ W_2^2 = |m - m_1|^2 + \operatorname{tr}S + \operatorname{tr}S_1
       - 2\operatorname{tr}\big(S_1^{1/2} S S_1^{1/2}\big)^{1/2}, $$

    valid for any symmetric PSD S, S1 (singular ones included). Inputs are cast as JAX does
    (`as_float`: NumPy float64 arrays and lists to the default float, float32 unless x64 is enabled).
    The cross term is computed as $\operatorname{tr}(D^\top S D)^{1/2}$ with $DD^\top = S_1$ and D's columns set exactly to
    zero on the eigenvalues of S1 below `rank_rtol` (default d eps) times the largest: a square
    root of a rounding-level eigenvalue (1e-17 -> 3e-9) would otherwise enter $W_2^2$ at 1e-8 and
    $W_2$ at 1e-4 for rank-deficient targets. The squared value is clipped at 0; use float64.
    Differentiable in (m, S) (see `trace_sqrt_psd`). Returns $W_2$, or $W_2^2$ if `squared`.
    """
    m, S, m1, S1 = as_float(m, S, m1, S1)
    d = S1.shape[-1]
    rank_rtol = d * jnp.finfo(S1.dtype).eps if rank_rtol is None else rank_rtol
    D = _psd_factor(S1, rank_rtol)
    C = D.T @ S @ D
    w2 = jnp.sum((m - m1) ** 2) + jnp.trace(S) + jnp.trace(S1) - 2.0 * trace_sqrt_psd(C)
    w2 = jnp.maximum(w2, 0.0)
    return w2 if squared else jnp.sqrt(w2)


# --------------------------------------------------------------------------------------------
# Rank
# --------------------------------------------------------------------------------------------
def psd_rank(S, rtol: float = 1e-9) -> int:
    """Numerical rank of symmetric PSD S: eigenvalues above `rtol * lambda_max` (0 for S = 0)."""
    lam = np.linalg.eigvalsh(0.5 * (np.asarray(S, float) + np.asarray(S, float).T))
    top = np.max(np.abs(lam)) if lam.size else 0.0
    return 0 if top == 0 else int(np.sum(lam > rtol * top))


# --------------------------------------------------------------------------------------------
# Constructive initial guess (numpy / scipy, float64)
# --------------------------------------------------------------------------------------------
def _range_basis(S, r):
    lam, U = np.linalg.eigh(0.5 * (S + S.T))
    order = np.argsort(lam)[::-1]
    return U[:, order[:r]], U[:, order[r:]]


def _procrustes(A, B):
    """Orthogonal R minimising ||A R - B||_F."""
    u, _, vt = np.linalg.svd(A.T @ B)
    return u @ vt


def _spd_pow(C, p):
    lam, U = np.linalg.eigh(0.5 * (C + C.T))
    return (U * np.maximum(lam, 1e-300) ** p) @ U.T


def transport_flow(S0, S1, r):
    r"""(G, A): rotation G in SO(d) with G range(S0) = range(S1), SPD A with A G S0 G^T A = S1.

    A is the Bures optimal-transport map between the rank-r covariances on range(S1), the identity
    on its orthogonal complement; G is the identity when the ranges agree (always for r = d).
    """
    d = S0.shape[0]
    U0, N0 = _range_basis(S0, r)
    U1, N1 = _range_basis(S1, r)
    if r == d:
        G = np.eye(d)
        U1a = np.eye(d)
        N1a = np.zeros((d, 0))
    else:
        U1a = U1 @ _procrustes(U1, U0)
        N1a = N1 @ _procrustes(N1, N0)
        G = np.hstack([U1a, N1a]) @ np.hstack([U0, N0]).T
        if np.linalg.det(G) < 0:
            N1a = N1a.copy()
            N1a[:, 0] *= -1
            G = np.hstack([U1a, N1a]) @ np.hstack([U0, N0]).T
    C0 = U1a.T @ (G @ S0 @ G.T) @ U1a
    C1 = U1a.T @ S1 @ U1a
    h0, hi0 = _spd_pow(C0, 0.5), _spd_pow(C0, -0.5)
    Ar = hi0 @ _spd_pow(h0 @ C1 @ h0, 0.5) @ hi0
    A = U1a @ Ar @ U1a.T + N1a @ N1a.T
    return G, A


def _real_log(X):
    L = sla.logm(X)
    if np.iscomplexobj(L):
        if np.max(np.abs(L.imag)) > 1e-8 * max(1.0, np.max(np.abs(L.real))):
            return None
        L = L.real
    return np.asarray(L, float)


def _affine_flow(W, h):
    """(E, J b): the exact flow of x' = W x + b over h: x(h) = E x(0) + J b, J = int_0^h e^{Ws} ds."""
    d = W.shape[0]
    aug = np.zeros((2 * d, 2 * d))
    aug[:d, :d] = W
    aug[:d, d:] = np.eye(d)
    F = sla.expm(aug * h)
    return F[:d, :d], F[:d, d:]


def _mlp_schedule(m0, S0, m1, S1, T, K, r):
    """Per-segment (W_k, b_k), attention off, whose exact flow maps N(m0, S0) to N(m1, S1)."""
    d = S0.shape[0]
    h = T / K
    G, A = transport_flow(S0, S1, r)
    logA = np.real(_spd_log(A))
    Ws = []
    if np.linalg.norm(G - np.eye(d)) < 1e-12:
        Ws = [logA / T] * K
    elif K >= 2:
        k1 = K // 2
        logG = _real_log(G)
        logG = np.zeros((d, d)) if logG is None else logG
        Ws = [logG / (k1 * h)] * k1 + [logA / ((K - k1) * h)] * (K - k1)
    else:
        L = _real_log(A @ G)
        Ws = [np.zeros((d, d)) if L is None else L / T]
    # constant b: m(T) = Phi m0 + B b
    Phi, B = np.eye(d), np.zeros((d, d))
    for W in Ws:
        E, J = _affine_flow(W, h)
        Phi, B = E @ Phi, E @ B + J
    b, *_ = np.linalg.lstsq(B, m1 - Phi @ m0, rcond=None)
    return np.stack(Ws), np.tile(b, (K, 1))


def _spd_log(A):
    lam, U = np.linalg.eigh(0.5 * (A + A.T))
    return (U * np.log(np.maximum(lam, 1e-300))) @ U.T


def initial_controls(base: Model, m0, S0, m1, S1, T: float, K: int, r: int, alpha: float = 1.0) -> dict:
    """Constructive guess (see module docstring): stacked (K, ...) arrays for Q, K, V, W, b.

    The value map is `alpha * base.V` (alpha = 0: attention off, and the guess is exact).
    """
    Wk, bk = _mlp_schedule(m0, S0, m1, S1, T, K, r)
    h = T / K
    a_attn, a_mlp, beta = float(base.a_attn), float(base.a_mlp), float(base.beta)
    Qm, Km, Vm = (np.asarray(base.Q, float), np.asarray(base.K, float), alpha * np.asarray(base.V, float))
    Wc, bc = [], []
    m, S = np.array(m0, float), np.array(S0, float)
    for k in range(K):
        # reference path (attention off) at the segment midpoint
        E, J = _affine_flow(Wk[k], h / 2)
        m_mid, S_mid = E @ m + J @ bk[k], E @ S @ E.T
        Watt = a_attn * beta * Vm @ S_mid @ Km.T @ Qm
        Wc.append((Wk[k] - Watt) / a_mlp)
        bc.append((bk[k] - a_attn * Vm @ m_mid) / a_mlp)
        E, J = _affine_flow(Wk[k], h)
        m, S = E @ m + J @ bk[k], E @ S @ E.T
    return {"Q": np.tile(Qm, (K, 1, 1)), "K": np.tile(Km, (K, 1, 1)), "V": np.tile(Vm, (K, 1, 1)),
            "W": np.stack(Wc), "b": np.stack(bc)}


# --------------------------------------------------------------------------------------------
# Differentiable fixed-step moment solve over the K segments
# --------------------------------------------------------------------------------------------
def _factored_field(t, y, layer):
    m, L = y
    M, c = moment_matrices(layer, m, L @ L.T)
    return c + M @ m, M @ L


def _with(base: Model, arrays: dict) -> Model:
    for name, value in arrays.items():
        base = eqx.tree_at(lambda mdl, n=name: getattr(mdl, n), base, value)
    return base


def final_moments(params: dict, fixed: dict, base: Model, m0, L0, h, n_sub: int):
    """(m(T), S(T)) after the K segments: `n_sub` steps of size h / n_sub per segment.

    Each step is one `diffrax` Tsit5 step (`solver.step`) of the factored field; the steps and
    segments are `lax.scan` loops, so reverse-mode differentiation stores every step (K n_sub
    states of size d(d + 1), a few kB) and compiles far faster than a `diffeqsolve` per segment
    (2.5 s against 6-10 s for the gradient, measured). `params` / `fixed`: stacked (K, ...)
    controlled / uncontrolled arrays.
    """
    solver, term = diffrax.Tsit5(), diffrax.ODETerm(_factored_field)
    dt = h / n_sub

    def segment(y, arrays):
        layer = _with(base, arrays)

        def step(carry, i):
            y, state = carry
            t0 = i * dt
            y1, _, _, state, _ = solver.step(term, t0, t0 + dt, y, layer, state, False)
            return (y1, state), None

        state = solver.init(term, 0.0, dt, y, layer)
        (y1, _), _ = jax.lax.scan(step, (y, state), jnp.arange(n_sub, dtype=m0.dtype))
        return y1, None

    (mT, LT), _ = jax.lax.scan(segment, (m0, L0), {**fixed, **params})
    return mT, LT @ LT.T


def _loss(params, data):
    fixed, base, m0, L0, m1, S1, h, n_sub, effort = data
    mT, ST = final_moments(params, fixed, base, m0, L0, h, n_sub)
    w2 = bures_wasserstein(mT, ST, m1, S1, squared=True)
    energy = sum(jnp.sum(v ** 2) for v in jax.tree.leaves(params)) * h
    return w2 + effort * energy


_OPT = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=30, store_grad=True))


@eqx.filter_jit
def _lbfgs_step(params, state, data):
    opt = _OPT
    loss = lambda p: _loss(p, data)  # noqa: E731
    value, grad = optax.value_and_grad_from_state(loss)(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state, value


@eqx.filter_jit
def _distance(params, data):
    fixed, base, m0, L0, m1, S1, h, n_sub, _ = data
    mT, ST = final_moments(params, fixed, base, m0, L0, h, n_sub)
    return bures_wasserstein(mT, ST, m1, S1)


# --------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SteerResult:
    """Result of `steer`.

    Attributes:
        model: the controls as a `Model.piecewise` schedule of K layers (usable by
            `simulate_gaussian`).
        distance: $W_2$ between the target and `simulate_gaussian(model, m0, S0, T)` at depth T
            (independent adaptive solve, rtol 1e-10).
        optimiser_distance: $W_2$ of the fixed-step solve the optimiser differentiated.
        initial_distance: $W_2$ of the constructive guess (same fixed-step solve).
        history: $W_2$ after each L-BFGS iteration (entry 0: the guess).
        iterations: L-BFGS iterations run. seconds: wall time of guess + optimisation.
        ts, means, covs: the verified trajectory on `n_save` depths in [0, T].
        controls: names of the controlled parameters. initial_model: the constructive guess.
        homotopy: how the guess was reached: (1.0,) the attention-compensated guess refined
            directly; (0.0,) V is a control and the compensated guess was far off (blow-up
            within a segment), so the exact attention-free guess V = 0 was refined; (0.0, ..., 1.0)
            V is fixed: a continuation in the attention strength V -> alpha V, alpha 0 -> 1
            (a last entry below 1 means the continuation failed; `distance` is then that of the
            weaker attention and is reported as is).
        dtype: the float dtype computed in (that of the returned models). tol: the tolerance aimed
            at, `steer`'s `tol` raised to the dtype's `resolution` (about 1e-3 in float32).
    """

    model: Model
    distance: float
    optimiser_distance: float
    initial_distance: float
    history: np.ndarray
    iterations: int
    seconds: float
    ts: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    controls: tuple[str, ...]
    initial_model: Model
    homotopy: tuple[float, ...] = (1.0,)
    dtype: str = "float64"
    tol: float = 1e-5


def _input_eps(x) -> float:
    """Machine epsilon of an input as given (float64 for lists and integers): its own rounding."""
    dt = getattr(x, "dtype", None)
    return float(np.finfo(dt).eps) if dt is not None and np.issubdtype(dt, np.floating) else float(np.finfo(np.float64).eps)


def _check_psd(name: str, S, eps: float) -> None:
    """ValueError unless S is symmetric and PSD up to the rounding of its own dtype (100 d eps, relative)."""
    d = S.shape[0]
    rtol = 100.0 * d * eps
    scale = float(np.max(np.abs(S)))
    asym = float(np.max(np.abs(S - S.T)))
    if asym > rtol * scale:
        raise ValueError(f"steer: `{name}` must be a symmetric covariance; max |S - S^T| = {asym:.3g} exceeds "
                         f"{rtol:.1e} x max |S| = {rtol * scale:.3g}.")
    lam = np.linalg.eigvalsh(0.5 * (S + S.T))
    top = float(np.max(np.abs(lam)))
    if lam[0] < -rtol * top:
        raise ValueError(f"steer: `{name}` must be positive semidefinite; its smallest eigenvalue is {lam[0]:.3g} "
                         f"< -{rtol:.1e} x largest |eigenvalue| {top:.3g}.")


def default_base(d: int, dtype=None) -> Model:
    """The default uncontrolled layer: Q = K = V = I, beta = 1, W = 0, b = 0 (softmax + affine)."""
    eye = np.eye(d)
    return Model(Q=eye, K=eye, V=eye, W=np.zeros((d, d)), mlp="affine", beta=1.0, dtype=dtype)


def steer(
    m0: Mean,
    S0: Cov,
    m1: Mean,
    S1: Cov,
    T: float,
    *,
    K: int = 4,
    base: Model | None = None,
    controls: Sequence[str] = ("V", "W", "b"),
    tol: float = 1e-5,
    max_iters: int = 300,
    n_sub: int = 16,
    effort: float = 0.0,
    rank_rtol: float = 1e-9,
    n_save: int = 101,
) -> SteerResult:
    r"""Depth-varying parameters moving $N(m_0, S_0)$ to $N(m_1, S_1)$ at depth T.

    Minimises $W_2^2(N(m(T), S(T)), N(m_1, S_1)) + \text{effort}\int_0^T |u|^2 dt$ over the
    parameters named in `controls` (any of Q, K, V, W, b), piecewise constant on K equal depth
    segments; the others are those of `base` (default `default_base(d)`: Q = K = V = I, beta = 1).
    Starts from the constructive guess of the module docstring and refines with `optax.lbfgs`
    until the fixed-step distance is below `tol` or `max_iters` iterations.

    Precision: computed in JAX's default float (float64 with ``jax_enable_x64``, else float32), or in
    `base`'s dtype when given; the inputs (NumPy arrays of any float dtype, lists, JAX arrays) are cast
    to it, as everywhere in the API. Use float64 for accurate controls: $W_2$ is a difference of terms
    of size tr S1, so float32 resolves it only to about `resolution(m1, S1, float32)` (~1e-3 for unit
    covariances; float64: ~1e-8). In float32 `tol` is raised to that resolution (a target within it
    counts as reached), `distance` is meaningful only down to it, and the controls agree with the
    float64 ones to about that relative accuracy; the rank tests and the constructive guess run in
    NumPy float64 either way.

    Arguments:
        m0, S0, m1, S1: initial and target mean (d,) and covariance (d, d), symmetric PSD (finite;
            symmetric and PSD up to 100 d eps of their own dtype: never symmetrised or clipped).
        T: depth. K: number of segments. n_sub: Tsit5 steps per segment in the optimised solve.
        effort: weight of the control energy (0: pure reachability).
        rank_rtol: relative eigenvalue cut-off defining the ranks of S0, S1.

    Returns:
        `SteerResult` (controls as a piecewise `Model`, verified distance, history, timing,
        trajectory).

    Raises:
        ValueError: if rank S1 != rank S0 (refused before any optimisation: the rank of S(t) =
            Phi(t) S0 Phi(t)^T is invariant); on bad shapes / options; if an input holds NaN / inf or
            a covariance is not symmetric PSD (naming it); if `base` has another dimension.
    """
    t_start = time.perf_counter()
    inputs = {"m0": m0, "S0": S0, "m1": m1, "S1": S1}
    eps_in = {k: _input_eps(v) for k, v in inputs.items()}
    try:  # host float64 copies for the checks, the ranks and the constructive guess
        m0, S0, m1, S1 = (np.asarray(x, np.float64) for x in inputs.values())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"steer: `m0`, `S0`, `m1`, `S1` must be real arrays ({exc}).") from None
    d = m0.shape[0] if m0.ndim == 1 else -1
    for name, arr, shape in (("m0", m0, (d,)), ("S0", S0, (d, d)), ("m1", m1, (d,)), ("S1", S1, (d, d))):
        if arr.shape != shape or d < 1:
            raise ValueError(f"steer: `{name}` must have shape {shape if d >= 1 else '(d,)'}; got {arr.shape}.")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"steer: `{name}` must be finite; it holds {int(np.sum(~np.isfinite(arr)))} NaN/inf value(s).")
    for name, S in (("S0", S0), ("S1", S1)):
        _check_psd(name, S, eps_in[name])
    try:
        T = float(T)
    except (TypeError, ValueError):
        raise ValueError(f"steer: depth `T` must be a number > 0; got {T!r}.") from None
    if not (np.isfinite(T) and T > 0):
        raise ValueError(f"steer: depth `T` must be finite and > 0; got {T}.")
    if int(K) < 1:
        raise ValueError(f"steer: `K` must be >= 1 segment; got {K}.")
    bad = [c for c in controls if c not in CONTROLLABLE]
    if bad or not controls:
        raise ValueError(f"steer: `controls` must be a non-empty subset of {CONTROLLABLE}; got {tuple(controls)}.")
    r0, r1 = psd_rank(S0, rank_rtol), psd_rank(S1, rank_rtol)
    if r0 != r1:
        raise ValueError(
            f"steer: target unreachable: rank S1 = {r1} differs from rank S0 = {r0}. The rank of the "
            "covariance is invariant under the moment dynamics (S(t) = Phi(t) S0 Phi(t)^T with "
            "Phi' = M Phi invertible, so rank S(t) = rank S0 for all t; Alcalde, Ji, Zuazua 2026); "
            "only targets of the same rank are reachable."
        )
    K = int(K)
    base = default_base(d) if base is None else base
    if base.mlp != "affine" or base.attention not in ("softmax",) or base.layer_times is not None:
        raise ValueError("steer: `base` must be a depth-constant Model with softmax attention and mlp='affine'.")
    if base.d != d:
        raise ValueError(f"steer: `base` has dimension {base.d}; the moments have d = {d}.")
    dtype = jnp.dtype(base.dtype)
    tol = max(float(tol), resolution(m1, S1, dtype))

    h = float(T) / K
    jm0, jS0, jm1, jS1 = (jnp.asarray(x, dtype) for x in (m0, S0, m1, S1))
    L0 = covariance_factor(jS0)
    consts = (base, jm0, L0, jm1, jS1, h, int(n_sub), float(effort))
    V_step = jnp.tile(jnp.asarray(base.V), (K, 1, 1))

    def guess(alpha):
        g = {k: jnp.asarray(v, dtype) for k, v in initial_controls(base, m0, S0, m1, S1, T, K, r0, alpha).items()}
        return {k: g[k] for k in controls}, {k: v for k, v in g.items() if k not in controls}

    def lbfgs(params, fixed, tol_, iters, history):
        data = (fixed,) + consts
        state = _OPT.init(params)
        best, best_d = params, float(_distance(params, data))
        cur, it = best_d, 0
        while it < iters and cur > tol_ and np.isfinite(cur):
            new, state, _ = _lbfgs_step(params, state, data)
            it += 1
            cur = float(_distance(new, data))
            if not np.isfinite(cur):
                break
            params = new
            history.append(cur)
            if cur < best_d:
                best, best_d = params, cur
        return best, best_d, it

    # 1. the compensated guess with full attention; 2. if it is far off, a homotopy in the
    # attention strength alpha V (alpha: 0 -> 1) from the exact attention-free guess.
    params, fixed = guess(1.0)
    init_params, init_fixed = dict(params), dict(fixed)
    history = [float(_distance(params, (fixed,) + consts))]
    scale = float(bures_wasserstein(jm0, jS0, jm1, jS1))
    iterations, stages = 0, [1.0]
    if np.isfinite(history[0]) and history[0] < 0.5 * max(scale, 1e-12):
        best, best_d, it = lbfgs(params, fixed, tol, max_iters, history)
        iterations += it
    else:
        best_d = np.inf
    if not best_d <= tol and "V" in controls:
        # V is a control: the attention-free guess (V = 0) is exact; refine from it.
        params, fixed = guess(0.0)
        init_params, init_fixed = dict(params), dict(fixed)
        history.append(float(_distance(params, (fixed,) + consts)))
        best, best_d, it = lbfgs(params, fixed, tol, max_iters - iterations, history)
        iterations += it
        stages = [0.0]
    elif not best_d <= tol:
        params, fixed = guess(0.0)
        init_params, init_fixed = dict(params), dict(fixed)
        history.append(float(_distance(params, (fixed,) + consts)))
        alpha, step, stages = 0.0, 0.25, [0.0]
        best = params
        while alpha < 1.0 and iterations < max_iters and step >= 1.0 / 64:
            a1 = min(1.0, alpha + step)
            trial_p, trial_f = dict(best), dict(fixed)
            trial_f["V"] = a1 * V_step
            stage_tol = tol if a1 == 1.0 else max(tol, 1e-3 * scale)
            cand, cand_d, it = lbfgs(trial_p, trial_f, stage_tol, max_iters - iterations, history)
            iterations += it
            if np.isfinite(cand_d) and cand_d <= max(stage_tol, 1e-2 * scale):
                alpha, best, fixed, best_d = a1, cand, trial_f, cand_d
                stages.append(a1)
                step = min(2 * step, 0.5)
            else:
                step /= 2
        if alpha < 1.0:
            best_d = np.inf
    seconds = time.perf_counter() - t_start

    def build(p, fixed):
        arrays = {**fixed, **p}
        layers = [_with(base, {k: v[i] for k, v in arrays.items()}) for i in range(K)]
        return Model.piecewise(layers, times=h * np.arange(1, K)) if K > 1 else layers[0]

    model, init_model = build(best, fixed), build(init_params, init_fixed)
    rtol, atol = (1e-10, 1e-12) if dtype == jnp.float64 else (None, None)  # float32: simulate_gaussian's defaults
    sol = simulate_gaussian(model, jm0, jS0, T, n_save=n_save, rtol=rtol, atol=atol)
    dist = float(bures_wasserstein(sol.means[-1], sol.covs[-1], jm1, jS1))
    if not bool(sol.valid[-1]):
        dist = float("inf")
    return SteerResult(
        model=model, distance=dist, optimiser_distance=float(best_d), initial_distance=history[0],
        history=np.asarray(history), iterations=iterations, seconds=seconds, homotopy=tuple(stages), ts=np.asarray(sol.ts),
        means=np.asarray(sol.means), covs=np.asarray(sol.covs), controls=tuple(controls),
        initial_model=init_model, dtype=str(dtype), tol=tol,
    )
