r"""Low-rank attention for low-dimensional tokens: separable Chebyshev features of the kernel.

With logits $\ell_{ij} = x_i^\top B x_j$, $B = \beta Q^\top K = U \operatorname{diag}(s) W^\top$ (SVD),
put $p_i = \operatorname{diag}(s)^{1/2} U^\top x_i$ and $q_j = \operatorname{diag}(s)^{1/2} W^\top x_j$, so
$\ell_{ij} = \sum_k p_{ik} q_{jk}$ and the kernel separates,
$e^{\ell_{ij}} = \prod_k e^{p_{ik} q_{jk}}$. Each factor is interpolated in the key coordinate at
$N_k$ first-kind Chebyshev points of the key box $[c_k - b_k, c_k + b_k]$ ($c_k$, $b_k$: centre and
half-width of $\{q_{jk}\}_j$), and the whole product is shifted by its maximum over the box,

$$ m_i = \sum_k \big(p_{ik} c_k + |p_{ik}| b_k\big), \qquad
   e^{\ell_{ij} - m_i} = \prod_k f_{ik}(\tau_{jk}), \quad f_{ik}(\tau) = e^{\gamma_{ik}(\tau - \operatorname{sgn})},\
   \gamma_{ik} = p_{ik} b_k,\ \tau_{jk} = (q_{jk} - c_k)/b_k \in [-1, 1], $$

so every factor is at most 1 and the features are well conditioned. The interpolant
$f_{ik} \approx \sum_{m<N_k} a_{ikm} T_m(\tau)$ (query side: Chebyshev coefficients $a_{ikm}$ of
$e^{\gamma_{ik}\tau}$, from $N_k$ exponentials; key side: $T_m(\tau_{jk})$, no exponential) turns both
sums over keys into two passes of small matrix products,
$\sum_j e^{\ell_{ij} - m_i} [v_j, 1] \approx \sum_{\mathbf m} \prod_k a_{ikm_k}\, M_{\mathbf m}$ with moments
$M_{\mathbf m} = \sum_j \prod_k T_{m_k}(\tau_{jk}) [v_j, 1]$: O(n F) work for $F = \prod_k N_k$
features, contracted one coordinate at a time (the (n, F) feature matrix is never formed).
Causal attention scans key chunks with a running (prefix) sum of the moments; keys of a query's own
chunk are summed directly (exactly).

Error bound (derivation). Interpolating $g(\tau) = e^{\gamma\tau}$ at the $N$ roots of $T_N$ leaves
$g(\tau) - p(\tau) = g^{(N)}(\xi)\,\omega(\tau)/N!$ with $|\omega| = |T_N|/2^{N-1} \le 2^{1-N}$ and
$|g^{(N)}| \le |\gamma|^N e^{|\gamma|}$; after the shift ($f = e^{-|\gamma|} g \le 1$),

$$ |f - \tilde f| \le \varepsilon_N(|\gamma|) = 2\,(|\gamma|/2)^N / N!. $$

For the product of factors bounded by 1, $|\prod_k \tilde f_k - \prod_k f_k| \le \prod_k (1 + \varepsilon_k) - 1
=: \eta_i$, uniformly over the key box. So the shifted denominator $D_i = \sum_j e^{\ell_{ij} - m_i}$
and numerator $N_i = \sum_j e^{\ell_{ij} - m_i} v_j$ over $n_i$ approximated keys carry errors at most
$n_i\eta_i$ and $n_i\eta_i V_\infty$ ($V_\infty = \max_j \|v_j\|_\infty$). For softmax,
$\tilde A - A = (\tilde N - N)/\tilde D - A(\tilde D - D)/\tilde D$ and $\|A\|_\infty \le V_\infty$ give

$$ \|\tilde A_i - A_i\|_\infty \le \frac{2 n_i \eta_i}{\tilde D_i} V_\infty
   \le \frac{2\eta_i}{J_i - \eta_i} V_\infty, \qquad J_i = e^{p_i\cdot\bar q - m_i} \le D_i / n_i, $$

the last step by Jensen ($\frac1n\sum_j e^{p_i\cdot q_j} \ge e^{p_i\cdot\bar q}$, $\bar q$ the key mean; the
prefix mean when causal). The right-hand side uses only the data range (a priori bound, O(n r)
work): it picks the orders $N_k$ and decides the fallback; the middle one (a posteriori, from the
computed $\tilde D_i$) is reported as well. For unnormalised attention the error in units of the
output scale $\frac1n\sum_j e^{\ell_{ij}}\,V_\infty$ has the same bounds without the factor 2.
Rounding: a shifted kernel value is a sum of Chebyshev terms whose absolute values sum to about 1
(the coefficients are $2 I_m(\gamma) e^{-\gamma}$), so it carries an absolute rounding error of order
$u$ (unit roundoff) however small the value; both bounds add the estimate $(2\text{ or }1)\,u\,C/J_i$
(a priori) and $(2\text{ or }1)\,u\,C\,n_i/\tilde D_i$ (a posteriori), $C = 4 + 2r$ for $r$ active
coordinates (measured rounding errors stayed below 0.4 $u\,n_i/D_i$). This term is what makes
float32 fail large `beta` times radius: the kernel's dynamic range $1/J_i$ times $u$.

Static orders under jit: the number of features is a shape, so the orders are chosen outside jit
from concrete data (`choose_orders`, with a range margin for tokens that move) and passed as a
static tuple; inside jit the a priori bound is recomputed from the current tokens at O(n r) cost,
and `lax.cond` switches to a direct sum (the caller's `fallback`) when it exceeds `rtol` (under `vmap` the cond
becomes a select and both branches run: correct, but no faster than the direct sum).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._types import Tokens

MAX_ORDER = 64
"""Largest number of Chebyshev points per coordinate `choose_orders` considers."""

MAX_FEATURES = 32768
"""Largest feature count F = prod_k N_k `choose_orders` accepts (memory: F (d+1) floats of moments)."""

DEFAULT_MARGIN = 1.0
"""Planning margin of `choose_orders`: orders are chosen for the ranges scaled by this factor."""

_PLAN_QUERIES = 8192


class LowRankInfo(NamedTuple):
    """Diagnostics of one `lowrank_attention` call.

    Attributes:
        bound: a priori bound (max over queries) on the output error relative to
            `max_j |V x_j|` (softmax) or to the output scale (unnormalised); from the data range.
        bound_post: a posteriori bound from the computed denominators (<= `bound` up to rounding).
        fallback: True where the direct sum was used because `bound > rtol`.
        features: F = prod_k N_k (static).
    """

    bound: jax.Array
    bound_post: jax.Array
    fallback: jax.Array
    features: int


def _factors(model, dtype):
    """SVD of B = beta Q^T K as (Up, Wq) with p = x @ Up, q = x @ Wq (balanced sqrt(s) scaling)."""
    B = model.beta * (model.Q.T @ model.K)
    U, s, Wt = jnp.linalg.svd(B.astype(dtype))
    r = jnp.sqrt(s)
    return U * r[None, :], Wt.T * r[None, :]


def _geometry(model, X, causal):
    """p (n, d), q (n, d), key box centre c and half-width b (d,), Jensen exponent per query."""
    Up, Wq = _factors(model, X.dtype)
    p = X @ Up
    q = X @ Wq
    lo, hi = jnp.min(q, axis=0), jnp.max(q, axis=0)
    c = 0.5 * (lo + hi)
    tiny = jnp.finfo(X.dtype).tiny ** 0.5
    b = jnp.maximum(0.5 * (hi - lo), tiny * (1.0 + jnp.max(jnp.abs(q))))
    if causal:
        n = X.shape[0]
        qbar = jnp.cumsum(q, axis=0) / jnp.arange(1, n + 1, dtype=X.dtype)[:, None]
        expo = jnp.sum(jnp.abs(p) * b, axis=-1) + jnp.sum(p * (c - qbar), axis=-1)
    else:
        qbar = jnp.mean(q, axis=0)
        expo = jnp.sum(jnp.abs(p) * b, axis=-1) + p @ (c - qbar)
    return p, q, c, b, jnp.maximum(expo, 0.0)


def chebyshev_error(gamma, order, xp=jnp):
    r"""$\varepsilon_N(\gamma) = 2(\gamma/2)^N/N!$: sup error on [-1, 1] of the N-point Chebyshev
    interpolant of $e^{\gamma(\tau-1)}$ (gamma >= 0; `order` may be an array).

    The one truncation-error formula of this module: `xp=jnp` inside jit, `xp=np` (float64) for
    the planner (`choose_orders`)."""
    if xp is np:
        order = np.asarray(order, np.float64)
        lgamma = np.vectorize(math.lgamma, otypes=[np.float64])(order + 1.0)
    else:
        gamma = jnp.asarray(gamma)
        order = jnp.asarray(order, gamma.dtype)
        lgamma = jax.lax.lgamma(order + 1.0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        logr = xp.log(2.0) + order * xp.log(xp.maximum(gamma, 1e-300) / 2) - lgamma
        return xp.where(gamma > 0, xp.exp(xp.minimum(logr, 50.0)), 0.0)


def _eta(g, orders, xp=jnp):
    """eta_i = prod_k (1 + eps_{N_k}(g_ik)) - 1, per query (g_ik = |p_ik| b_k)."""
    return xp.expm1(xp.sum(xp.log1p(chebyshev_error(g, orders, xp)), axis=-1))


def _unit_roundoff(dtype) -> float:
    return float(jnp.finfo(dtype).eps) / 2.0


def _rounding_constant(orders) -> float:
    """C in the rounding term u C n_i / D_i (u: unit roundoff): 4 + 2 r, r active coordinates."""
    return 4.0 + 2.0 * sum(1 for o in orders if o > 1)


def _prior_bound(g, expo, frac, orders, softmax, rounding=None, xp=jnp):
    """Per-query a priori bound (2 or 1) [eta / (J - eta) + rounding / J], J = exp(-expo),
    eta scaled by the approximated fraction `frac` of the keys; `xp` as in `chebyshev_error`."""
    tiny = 1e-300 if xp is np else jnp.finfo(g.dtype).tiny
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        eta = _eta(g, orders, xp) * frac
        J = xp.exp(-expo)
        bound = xp.where(J > eta, eta / xp.maximum(J - eta, tiny), xp.inf)
        if rounding is not None:
            bound = bound + rounding / xp.maximum(J, tiny)
    return (2.0 if softmax else 1.0) * bound


def _prev_fraction(n, chunk, dtype):
    """Causal: fraction n_prev / i of a query's keys that lie in earlier chunks (approximated)."""
    i = jnp.arange(n)
    chunk = min(chunk, n)
    return ((i // chunk) * chunk / (i + 1)).astype(dtype)


def truncation_bound(model, X: Tokens, orders, *, chunk: int = 256) -> jax.Array:
    r"""Returns the a priori error bound (max over queries) of `lowrank_attention` with `orders` on tokens X:
    $\max_i 2\eta_i/(J_i - \eta_i)$ plus a rounding term $u(4 + 2r)/J_i$ for softmax, $\eta_i = \prod_k(1 + \varepsilon_{ik}) - 1$, $\varepsilon = 2(\gamma/2)^N/N!$ (`chebyshev_error`).

    Relative to `max_j |V x_j|_inf` for softmax, to the output scale for unnormalised attention
    (see the module docstring). jit-compatible; `orders` may be traced here.
    """
    X = jnp.asarray(X)
    p, q, c, b, expo = _geometry(model, X, model.causal)
    frac = _prev_fraction(X.shape[0], chunk, X.dtype) if model.causal else jnp.ones((X.shape[0],), X.dtype)
    rounding = _unit_roundoff(X.dtype) * _rounding_constant(orders) if not isinstance(orders, jax.Array) else None
    return jnp.max(_prior_bound(jnp.abs(p) * b, expo, frac, orders, model.attention == "softmax", rounding))


def choose_orders(model, X: Tokens, *, rtol: float, margin: float = DEFAULT_MARGIN,
                  max_features: int = MAX_FEATURES, chunk: int = 256) -> tuple[int, ...] | None:
    """Smallest-cost Chebyshev orders (N_1, ..., N_d) whose a priori bound meets `rtol`.

    Runs outside jit on concrete `model` and `X` (the orders are static shapes). The bound is
    evaluated for the token ranges scaled by `margin` (all |gamma_ik| and the Jensen exponent
    multiplied by `margin`), so it keeps holding while tokens move a little; inside jit the bound
    is rechecked on the current tokens. Start: per coordinate, the smallest N_k meeting
    rtol / (2d) alone; then greedily lower orders (largest cost saving first) while the bound
    holds. Above 8192 tokens the search runs on the likely maximisers (largest exponent and
    |gamma_ik|) plus a strided sample, and the result is verified (and raised) on all tokens.
    Returns None when the bound cannot be met within `max_features` and `MAX_ORDER` (large beta
    times the token radius): use the direct sum.
    """
    if model.attention not in ("softmax", "unnormalised"):
        return None
    if isinstance(X, jax.core.Tracer) or any(isinstance(a, jax.core.Tracer) for a in (model.Q, model.K, model.beta)):
        raise ValueError("choose_orders: needs concrete `model` and `X` (it picks static shapes); got traced values.")
    X = jnp.asarray(X)
    p, q, c, b, expo = (np.asarray(a, np.float64) for a in _geometry(model, X, model.causal))
    n, d = p.shape
    frac = np.asarray(_prev_fraction(n, chunk, jnp.float64 if X.dtype == jnp.float64 else jnp.float32), np.float64) \
        if model.causal else np.ones((n,))
    u = _unit_roundoff(X.dtype)
    g_all = np.abs(p) * b * margin
    expo_all = expo * margin
    softmax = model.attention == "softmax"
    if n > _PLAN_QUERIES:  # plan on the likely maximisers plus a strided sample; verify on all below
        top = [np.argsort(-expo_all)[:256]] + [np.argsort(-g_all[:, k])[:256] for k in range(d)]
        idx = np.concatenate(top + [np.arange(0, n, n // _PLAN_QUERIES)])
        g, ex, fr = g_all[idx], expo_all[idx], frac[idx]
    else:
        g, ex, fr = g_all, expo_all, frac

    def bound(o, full=False):
        if full:
            return float(np.max(_prior_bound(g_all, expo_all, frac, o, softmax, u * _rounding_constant(o), np)))
        return float(np.max(_prior_bound(g, ex, fr, o, softmax, u * _rounding_constant(o), np)))

    def fits(o):
        return o.max() <= MAX_ORDER and np.prod(o) <= max_features

    # Start from a per-coordinate split of the tolerance (sufficient up to the coupling of the
    # factors), then lower orders greedily, largest cost saving first, while the bound holds.
    with np.errstate(over="ignore"):
        w = 2.0 * fr * np.exp(ex)
    orders = np.full(d, MAX_ORDER + 1, dtype=np.int64)
    for k in range(d):
        for N in range(1, MAX_ORDER + 1):
            r = chebyshev_error(g[:, k], N, np)
            with np.errstate(over="ignore", invalid="ignore"):
                worst = np.max(w * r)
            if worst <= rtol / (2.0 * d):
                orders[k] = N
                break
    if not fits(orders) or not bound(orders) <= rtol:
        return None
    while True:
        best, best_saving = None, 1.0
        for k in range(d):
            if orders[k] > 1:
                cand = orders.copy()
                cand[k] -= 1
                saving = orders[k] / cand[k]
                if saving > best_saving and bound(cand) <= rtol:
                    best, best_saving = cand, saving
        if best is None:
            break
        orders = best
    while n > _PLAN_QUERIES and not bound(orders, full=True) <= rtol:  # the sample missed a maximiser
        gmax = g_all.max(axis=0)
        orders = orders + np.eye(d, dtype=np.int64)[int(np.argmax(chebyshev_error(gmax, orders, np)))]
        if not fits(orders):
            return None
    return tuple(int(o) for o in orders)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

def _cheb_T(tau, N):
    """T_0..T_{N-1} at tau (m,) -> (m, N) by the three-term recurrence (stable on [-1, 1])."""
    cols = [jnp.ones_like(tau)]
    if N > 1:
        cols.append(tau)
    for _ in range(2, N):
        cols.append(2.0 * tau * cols[-1] - cols[-2])
    return jnp.stack(cols, axis=-1)


def _cheb_matrix(N, dtype):
    """C (N, N): Chebyshev coefficients a = f(t) @ C of the interpolant at the roots t of T_N."""
    t = np.cos(np.pi * (2 * np.arange(N) + 1) / (2 * N))
    C = (2.0 / N) * np.cos(np.outer(np.arccos(t), np.arange(N)))
    C[:, 0] *= 0.5
    return jnp.asarray(t, dtype), jnp.asarray(C, dtype)


def _query_coeffs(p, b, orders):
    """Per query and coordinate, Chebyshev coefficients of tau -> exp(gamma (tau - sgn)), gamma = p b."""
    out = []
    for k, N in enumerate(orders):
        if N == 1:
            continue
        t, C = _cheb_matrix(N, p.dtype)
        g = p[:, k:k + 1] * b[k]
        E = jnp.exp(g * t[None, :] - jnp.abs(g))  # (m, N) values at the nodes, <= 1
        out.append(E @ C)
    return out


def _dropped_factor(p, b, orders):
    """Coordinates with N_k = 1 are replaced by their box centre: factor exp(-|gamma_ik|)."""
    drop = jnp.asarray([o == 1 for o in orders])
    return jnp.exp(-jnp.sum(jnp.where(drop[None, :], jnp.abs(p) * b, 0.0), axis=-1))


def _key_features(tau, orders):
    return [_cheb_T(tau[:, k], N) for k, N in enumerate(orders) if N > 1]


def _split(orders):
    """Active coordinates (N_k > 1) as (kronecker part, GEMM coordinate = the largest N_k)."""
    act = [N for N in orders if N > 1]
    if not act:
        return [], None
    g = int(np.argmax(act))
    return [i for i in range(len(act)) if i != g], g


def _kron(feats, idx, m, dtype):
    """Row-wise Kronecker product of feats[i] for i in idx: (m, prod N_i)."""
    out = jnp.ones((m, 1), dtype)
    for i in idx:
        out = (out[:, :, None] * feats[i][:, None, :]).reshape(m, -1)
    return out


def _moments(Tk, vals, orders):
    """Moments sum_j prod_k T_k[j, m_k] vals[j, c], laid out as (prod_{k != g} N_k, N_g * c).

    One GEMM with the keys as the long inner dimension: (kron of T_k, k != g)^T @ (T_g (x) vals).
    """
    m, w = vals.shape
    rest, g = _split(orders)
    if g is None:
        return jnp.sum(vals, axis=0)[None, :]
    head = _kron(Tk, rest, m, vals.dtype)
    tail = (Tk[g][:, :, None] * vals[:, None, :]).reshape(m, -1)
    return head.T @ tail


def _contract(A, M, orders):
    """out[i, c] = sum_m prod_k A_k[i, m_k] M[m, c]: one GEMM over the Kronecker part (long inner
    dimension prod_{k != g} N_k), then the GEMM coordinate g elementwise."""
    rest, g = _split(orders)
    if g is None:
        return jnp.broadcast_to(M, (A[0].shape[0] if A else 1, M.shape[1])) if A else M
    m = A[0].shape[0]
    head = _kron(A, rest, m, M.dtype)
    Ng = A[g].shape[1]
    G = (head @ M).reshape(m, Ng, -1)
    return jnp.sum(G * A[g][:, :, None], axis=1)


def _block(n, F_rest, width, target=1 << 22):
    """Rows per block so that a (rows, F_rest * width) intermediate holds ~`target` floats."""
    rows = target // max(1, F_rest * width)
    rows = int(min(max(rows, 256), 8192, n))
    return max(rows, 1)


def _pad_rows(a, rows, value=0.0):
    pad = (-a.shape[0]) % rows
    return jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1), constant_values=value), pad


def _lowrank_full(p, tau, vals, b, orders):
    """Non-causal shifted sums S_i = sum_j e^{l_ij - m_i} vals_j (approximated), all queries."""
    n, w = vals.shape
    act = [N for N in orders if N > 1]
    F = int(np.prod(act)) if act else 1
    F_rest = F // max(act) if act else 1
    rk = _block(n, F_rest + F // F_rest * w, 1)
    tau_p, _ = _pad_rows(tau, rk)
    vals_p, _ = _pad_rows(vals, rk)  # padded keys carry zero weight
    nb = tau_p.shape[0] // rk

    def key_step(M, blk):
        t_b, v_b = blk
        return M + _moments(_key_features(t_b, orders), v_b, orders), None

    M0 = jnp.zeros((F_rest, F // F_rest * w), vals.dtype)
    M, _ = jax.lax.scan(key_step, M0, (tau_p.reshape(nb, rk, -1), vals_p.reshape(nb, rk, w)))

    rq = _block(n, F_rest + F // F_rest * w, 1)
    p_p, pad = _pad_rows(p, rq)
    nq = p_p.shape[0] // rq

    def query_block(p_b):
        A = _query_coeffs(p_b, b, orders)
        return _contract(A, M, orders) * _dropped_factor(p_b, b, orders)[:, None]

    S = jax.lax.map(query_block, p_p.reshape(nq, rq, -1)).reshape(nq * rq, w)
    return S[:n]


def _lowrank_causal(p, q, tau, vals, c, b, orders, chunk):
    """Causal shifted sums: moments of earlier chunks (prefix sum) + direct sum inside the chunk."""
    n, w = vals.shape
    act = [N for N in orders if N > 1]
    C = int(min(chunk, n))
    p_p, pad = _pad_rows(p, C)
    q_p, _ = _pad_rows(q, C)
    tau_p, _ = _pad_rows(tau, C)
    vals_p, _ = _pad_rows(vals, C)
    nb = p_p.shape[0] // C
    shift_const = c  # m_i = p_i . c + sum_k |p_ik| b_k
    mask = jnp.tril(jnp.ones((C, C), dtype=bool))

    def step(M, blk):
        p_b, q_b, t_b, v_b = blk
        A = _query_coeffs(p_b, b, orders)
        prev = _contract(A, M, orders) * _dropped_factor(p_b, b, orders)[:, None]
        m_b = p_b @ shift_const + jnp.abs(p_b) @ b
        logits = p_b @ q_b.T - m_b[:, None]
        wts = jnp.where(mask, jnp.exp(jnp.minimum(logits, 0.0)), 0.0)
        own = wts @ v_b
        M = M + _moments(_key_features(t_b, orders), v_b, orders)
        return M, prev + own

    F = int(np.prod(act)) if act else 1
    F_rest = F // max(act) if act else 1
    M0 = jnp.zeros((F_rest, F // F_rest * w), vals.dtype)
    blocks = tuple(a.reshape(nb, C, -1) for a in (p_p, q_p, tau_p, vals_p))
    _, S = jax.lax.scan(step, M0, blocks)
    return S.reshape(nb * C, w)[:n]


def lowrank_attention(model, X: Tokens, *, orders, rtol: float | None = None,
                      fallback: Callable[[Any, Tokens], Tokens] | None = None, chunk: int = 256,
                      return_info: bool = False):
    r"""Softmax or unnormalised attention (causal or not) through separable Chebyshev features.

    $A_i = \sum_j w_{ij} V x_j$ as in `attention`, evaluated in O(n F) with $F = \prod_k N_k$
    (`orders`, a static tuple of length d, e.g. from `choose_orders`); error bounds in the module
    docstring. With `rtol` and a `fallback`, the a priori bound is computed first from the
    current tokens (O(n d)) and, where it exceeds `rtol`, `lax.cond` evaluates `fallback(model, X)`
    (the direct sum, e.g. `meanfield.Blocked()`) instead. jit- and vmap-compatible (orders static).
    The evaluator `meanfield.LowRank(orders, rtol, fallback)` calls this.

    Arguments:
        model: depth-constant `Model` with attention "softmax" or "unnormalised".
        X: tokens (n, d).
        orders: Chebyshev points per SVD coordinate (1 drops the coordinate: kernel factor
            replaced by its value at the box centre, error included in the bound).
        rtol: bound to meet (None: no fallback). `chunk`: causal chunk length (direct inside).
        fallback: `fallback(model, X) -> (n, d)`, the direct evaluation used where the bound exceeds
            `rtol` (None: always the low-rank sum; `LowRankInfo.bound` says how good it is).
        return_info: also return a `LowRankInfo`.

    Returns:
        (n, d) attention output, and `LowRankInfo` if `return_info`.
    """
    if model.attention not in ("softmax", "unnormalised"):
        raise ValueError(
            f"lowrank_attention: `model.attention` must be 'softmax' or 'unnormalised'; got {model.attention!r}."
        )
    n, d = X.shape
    orders = tuple(int(o) for o in orders)
    if len(orders) != d or min(orders) < 1:
        raise ValueError(f"lowrank_attention: `orders` must hold d = {d} positive integers; got {orders}.")
    softmax = model.attention == "softmax"
    p, q, c, b, expo = _geometry(model, X, model.causal)
    frac = _prev_fraction(n, min(chunk, n), X.dtype) if model.causal else jnp.ones((n,), X.dtype)
    u = _unit_roundoff(X.dtype)
    prior = _prior_bound(jnp.abs(p) * b, expo, frac, orders, softmax, u * _rounding_constant(orders))
    bound = jnp.max(prior)
    v = X @ model.V.T
    vals = jnp.concatenate([v, jnp.ones((n, 1), X.dtype)], axis=1)
    tau = jnp.clip((q - c) / b, -1.0, 1.0)

    def fast(_):
        if model.causal:
            S = _lowrank_causal(p, q, tau, vals, c, b, orders, chunk)
            n_i = jnp.floor(jnp.arange(n, dtype=X.dtype) / min(chunk, n)) * min(chunk, n)
        else:
            S = _lowrank_full(p, tau, vals, b, orders)
            n_i = jnp.full((n,), n, X.dtype)
        num, den = S[:, :d], S[:, d]
        eta = _eta(jnp.abs(p) * b, orders)
        n_all = jnp.arange(1, n + 1, dtype=X.dtype) if model.causal else n_i
        post = (2.0 if softmax else 1.0) * (n_i * eta + u * _rounding_constant(orders) * n_all) \
            / jnp.maximum(den, jnp.finfo(X.dtype).tiny)
        if softmax:
            out = num / den[:, None]
        else:
            m = p @ c + jnp.abs(p) @ b
            out = jnp.exp(m)[:, None] * num / n
        return out, jnp.max(post), jnp.asarray(False)

    def direct(_):
        return fallback(model, X), jnp.asarray(0.0, X.dtype), jnp.asarray(True)

    if rtol is not None and fallback is not None:
        out, post, fell = jax.lax.cond(bound <= rtol, fast, direct, None)
    else:
        out, post, fell = fast(None)
    if return_info:
        F = int(np.prod(orders))
        return out, LowRankInfo(bound=bound, bound_post=post, fallback=fell, features=F)
    return out
