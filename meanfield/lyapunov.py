r"""Lyapunov exponents of the continuous-depth flow by the QR (Benettin) method.

For an ODE $\dot y = f(t, y)$ the tangent vectors obey the variational equation
$\dot V = \partial_y f(t, y)\, V$. Starting from $k$ orthonormal columns $V_0$, integrate $(y, V)$
over intervals of length $\Delta$, re-orthonormalise $V = Q R$ after each, and accumulate
$\log |R_{jj}|$:

$$\lambda_j \approx \frac{1}{T} \sum_{\text{intervals}} \log |R_{jj}|, \qquad j = 1..k,$$

the $k$ leading Lyapunov exponents (ordered, for a generic $V_0$). The tangent field $\partial_y f\,V$
is a `jax.jvp` of the very field the simulators integrate, vmapped over the $k$ columns, and the
augmented system is solved with diffrax (any solver of `meanfield.simulate.solvers`), so the
exponents belong to the same dynamics as `simulate_particles` / `simulate_gaussian`.

A transformer has finite depth, so for depth $T$ these are the *finite-time* exponents over $[0, T]$
(how fast nearby token configurations separate or merge through the network); `discard` drops an
initial transient from the average when the asymptotic exponents are wanted. `running` holds the
estimate after every interval; `drift` = $\max_j |\lambda_j(T) - \lambda_j(3T/4)|$ is the convergence
diagnostic (small when the running estimate has settled).

The discrete counterpart, `layer_lyapunov`, does the same for a stack of maps $x_{l+1} = F_l(x_l)$ (one QR
per layer, exponents per layer); `decoder_lyapunov` applies it to the blocks of a `meanfield.nets.Decoder`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import _display as D
from ._display import Summarised, Summary
from .model.attention import AbstractAttention
from .model.field import moment_field, particle_field
from .simulate.attention_policy import Auto, resolve_attention
from .simulate.checks import (
    check_covariance, check_finite, check_model_finite, check_number, check_solver_options, check_span,
    concrete_scalar,
)
from .simulate.solvers import default_tolerances, make_controller, make_solver


class _LyapunovFields(NamedTuple):
    exponents: jax.Array
    running: jax.Array
    ts: jax.Array
    drift: jax.Array
    finite: jax.Array
    y1: object


class LyapunovResult(Summarised, _LyapunovFields):
    """`exponents` (k,), `running` (n_intervals, k) estimates after each interval at times `ts`,
    `drift` (k,) = |lambda(T) - lambda(3T/4)|, `finite` (whether every interval stayed finite),
    `y1` the final state (same pytree as the initial state). A NamedTuple (its fields in that order)."""

    __slots__ = ()

    def _summary(self) -> Summary:
        """What `__repr__` / `_repr_html_` show (`Summarised`): shapes and scalars only, no JAX op."""
        rows = [("exponents", D.num(self.exponents)), ("drift", D.num(self.drift)),
                ("intervals", str(self.running.shape[-2]) if getattr(self.running, "ndim", 0) >= 2 else "?"),
                ("ts", D.span(self.ts)), ("finite", D.flag(self.finite))]
        return Summary("LyapunovResult", rows,
                       "exponents in 1/depth; convergence: result.running (per interval) and result.drift")


def _check_inputs(where, t0, t1, interval, discard) -> None:
    """Finite depths with t1 > t0, interval > 0, 0 <= discard < t1 - t0 (when concrete)."""
    check_span(where, t0, t1)
    check_number(where, "interval", interval, gt=0)
    check_number(where, "discard", discard, ge=0)
    a, b, c = concrete_scalar(t0), concrete_scalar(t1), concrete_scalar(discard)
    if None not in (a, b, c) and not c < b - a:
        raise ValueError(f"{where}: `discard` must be < t1 - t0 = {b - a:g} (nothing would be averaged); got {c:g}.")


def _check_k(where: str, k, dim: int) -> int:
    """k as an int, refused unless an integer with 1 <= k <= dim (the state dimension)."""
    check_number(where, "k", k, integer=True)
    if not 1 <= k <= dim:
        raise ValueError(f"k: must be between 1 and the state dimension {dim}; got {k}")
    return int(k)


def _initial_tangents(flat0, k: int, key, project):
    """k orthonormal columns (dim, k): the first k coordinate directions, or the QR of a Gaussian draw."""
    dim, dtype = flat0.shape[0], flat0.dtype
    if key is None:
        V0 = jnp.eye(dim, k, dtype=dtype) + 0.0
    else:
        V0 = jax.random.normal(key, (dim, k), dtype)
    if project is not None:
        V0 = jax.vmap(lambda v: project(flat0, v), in_axes=1, out_axes=1)(V0)
    return jnp.linalg.qr(V0)[0]


def _reorthonormalise(V):
    """$V = Q R$ with the signs fixed so that diag(R) > 0 (QR is unique up to them): (Q, log|diag R|)."""
    Q, R = jnp.linalg.qr(V)
    r = jnp.diagonal(R)
    s = jnp.where(r < 0, -1.0, 1.0).astype(Q.dtype)
    return Q * s, jnp.log(jnp.abs(r))


def _drift(running) -> jax.Array:
    """|estimate after all steps - estimate after about 3/4 of them| (the convergence diagnostic)."""
    n = running.shape[0]
    q = min(n - 1, max(0, (3 * n) // 4 - 1))
    return jnp.abs(running[-1] - running[q])


def lyapunov_spectrum(
    field: Callable,
    y0,
    t1: float,
    k: int,
    *,
    t0: float = 0.0,
    interval: float = 0.5,
    discard: float = 0.0,
    key: jax.Array | None = None,
    solver="tsit5",
    dt0: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 16_384,
    jump_ts=None,
    project: Callable | None = None,
) -> LyapunovResult:
    r"""The k leading Lyapunov exponents of $\dot y = f(t, y)$ on $[t_0 + \text{discard}, t_1]$.

    Arguments:
        field: `f(t, y)`; `y0` any pytree of arrays (flattened internally).
        k: number of exponents (<= dimension of y).
        interval: re-orthonormalisation interval $\Delta$; the number of intervals is
            `round((t1 - t0) / interval)` (static), the last one ending exactly at t1.
        discard: initial depth whose stretching is not averaged (tangents still evolve).
        key: random orthonormal initial tangents (default: the first k coordinate directions).
        solver, dt0, rtol, atol, max_steps: as in `simulate_particles` (per interval).
        jump_ts: depths where the field jumps (a piecewise model's `layer_times`).
        project: `project(y, v) -> v` onto the tangent space of an invariant manifold (flat vectors);
            applied to the initial tangents and before every QR, so the exponents are those of the
            flow restricted to the manifold (e.g. the product of spheres under layer norm).

    Returns: `LyapunovResult`. Exponents are in units of 1/depth.

    Raises:
        ValueError: naming the argument, for concrete inputs that are not valid numbers: `y0`
            holding NaN / inf, `t0` / `t1` not finite or `t1 <= t0`, `interval` not finite and
            > 0, `discard` negative or >= t1 - t0, `dt0` / `rtol` / `atol` not finite and > 0.
    """
    where = "lyapunov_spectrum"
    flat0, unravel = ravel_pytree(y0)
    dim = flat0.shape[0]
    k = _check_k(where, k, dim)
    _check_inputs(where, t0, t1, interval, discard)
    check_finite(where, "y0", flat0)
    check_solver_options(where, dt0=dt0, rtol=rtol, atol=atol, max_steps=max_steps)
    dtype = flat0.dtype
    n_int = max(1, int(round((t1 - t0) / interval)))
    edges = jnp.linspace(t0, t1, n_int + 1, dtype=dtype)
    V0 = _initial_tangents(flat0, k, key, project)

    def f_flat(t, y):
        return ravel_pytree(field(t, unravel(y)))[0]

    def augmented(t, state, args):
        y, V = state
        dy, dV = jax.vmap(lambda v: jax.jvp(lambda z: f_flat(t, z), (y,), (v,)), in_axes=1, out_axes=(None, 1))(V)
        return dy, dV

    slv, adaptive = make_solver(solver)
    if rtol is None or atol is None:
        r0, a0 = default_tolerances(dtype)
        rtol, atol = rtol or r0, atol or a0
    h = (t1 - t0) / n_int
    controller = make_controller(adaptive, dt0=dt0, rtol=rtol, atol=atol, dtype=dtype, jump_ts=jump_ts)
    term = diffrax.ODETerm(augmented)

    def step(carry, span):
        y, V, total = carry
        ta, tb = span
        sol = diffrax.diffeqsolve(
            term, slv, ta, tb, dt0 if dt0 is not None else h / 8, (y, V),
            stepsize_controller=controller, max_steps=max_steps, throw=False,
            saveat=diffrax.SaveAt(t1=True),
        )
        y1 = sol.ys[0][-1]
        V1 = sol.ys[1][-1]
        if project is not None:
            V1 = jax.vmap(lambda v: project(y1, v), in_axes=1, out_axes=1)(V1)
        Q, logs = _reorthonormalise(V1)
        counted = (ta >= t0 + discard - 1e-6 * h).astype(dtype)
        total = total + counted * logs
        ok = jnp.all(jnp.isfinite(logs)) & jnp.all(jnp.isfinite(y1)) & (sol.result == diffrax.RESULTS.successful)
        return (y1, Q, total), (total, ok)

    spans = (edges[:-1], edges[1:])
    (y1, _, total), (totals, oks) = jax.lax.scan(step, (flat0, V0, jnp.zeros((k,), dtype)), spans)
    start = jnp.asarray(t0 + discard, dtype)
    elapsed = jnp.maximum(edges[1:] - start, h)
    running = totals / elapsed[:, None]
    return LyapunovResult(running[-1], running, edges[1:], _drift(running), jnp.all(oks), unravel(y1))


def particle_lyapunov(model, X0, t1: float, k: int, *, attention: AbstractAttention = Auto(),
                      **kwargs) -> LyapunovResult:
    r"""Leading exponents of the token flow $\dot X = F(t, X)$, `model` as in `simulate_particles`.

    In $\mathbb{R}^d$ the state has n d dimensions. With `norm="sphere"` the exponents are those of the
    flow on the product of spheres (n (d - 1) dimensions): tangents are projected row-wise with
    $P_{\hat x_i}$. Without that, the n radial directions would enter the spectrum: $|x_i|$ is
    conserved, so a tangent's radial part is too, and a random start pays $\log\sqrt d / T$ of bias
    before it aligns with them.

    `attention`: the evaluator, resolved from X0 as in `simulate_particles` (`LowRank` works: the
    tangents are `jax.jvp` of the low-rank sum, its bound check and fallback included). Other
    keyword arguments go to `lyapunov_spectrum`."""
    check_finite("particle_lyapunov", "X0", X0)
    check_model_finite("particle_lyapunov", model)
    attention = resolve_attention(attention, model, X0)
    kwargs.setdefault("jump_ts", model.layer_times)
    if model.norm == "sphere":
        n, d = X0.shape

        def project(y, v):
            Y, W = y.reshape(n, d), v.reshape(n, d)
            Yh = Y / jnp.linalg.norm(Y, axis=-1, keepdims=True)
            return (W - jnp.sum(Yh * W, axis=-1, keepdims=True) * Yh).reshape(-1)

        kwargs.setdefault("project", project)
    return lyapunov_spectrum(lambda t, X: particle_field(t, X, model, attention=attention), X0, t1, k, **kwargs)


def _vech_index(d):
    return jnp.triu_indices(d)


def gaussian_lyapunov(model, m0, S0, t1: float, k: int, **kwargs) -> LyapunovResult:
    r"""Leading exponents of the moment flow $(\dot m, \dot S) = (c + M m, M S + S M^\top)$.

    The state is $(m, \mathrm{vech}\,S)$ (d + d(d+1)/2 numbers), so tangents stay symmetric. Valid while
    S stays finite (a blow-up makes `finite` False)."""
    m0, S0 = jnp.asarray(m0), jnp.asarray(S0)
    check_finite("gaussian_lyapunov", "m0", m0)
    # vech keeps the upper triangle only: an asymmetric or indefinite S0 would silently become
    # another problem, so (like simulate_gaussian) it is refused.
    check_covariance("gaussian_lyapunov", "S0", S0)
    check_model_finite("gaussian_lyapunov", model)
    d = m0.shape[-1]
    iu = _vech_index(d)

    def to_S(v):
        S = jnp.zeros((d, d), v.dtype).at[iu].set(v)
        return S + jnp.triu(S, 1).T

    def field(t, y):
        m, v = y
        dm, dS = moment_field(model.at(t), m, to_S(v))
        return dm, dS[iu]

    kwargs.setdefault("jump_ts", model.layer_times)
    res = lyapunov_spectrum(field, (m0, S0[iu]), t1, k, **kwargs)
    m1, v1 = res.y1
    return res._replace(y1=(m1, to_S(v1)))


def layer_lyapunov(layers, x0, k: int, *, key: jax.Array | None = None, project: Callable | None = None) -> LyapunovResult:
    r"""The k leading finite-time Lyapunov exponents of a stack of maps $x_{l+1} = F_l(x_l)$, $l = 1..L$.

    The tangents are pushed through each layer's Jacobian and re-orthonormalised after every layer:

    $$J_l Q_{l-1} = Q_l R_l, \quad J_l = \partial F_l(x_l), \qquad
      \lambda_j = \frac{1}{L} \sum_{l=1}^{L} \log |(R_l)_{jj}|,$$

    so $\sum_{j \le k} \lambda_j$ is the mean log-growth per layer of k-dimensional volumes, and with
    $Q_0 = I$, k = dim, $\lambda_j = \frac1L \log |R_{jj}|$ of the QR of $J_L \cdots J_1$.

    Arguments:
        layers: a sequence of callables `F_l(x) -> x` (same pytree structure and shapes), applied in order;
            the Jacobian-vector products are `jax.jvp` of each, vmapped over the k columns. A Python loop
            over the layers (it unrolls under `jax.jit`).
        x0: the input state, any pytree of arrays (flattened internally).
        k: number of exponents (1 <= k <= dimension of x0).
        key: random orthonormal initial tangents (QR of a Gaussian draw); default: the first k
            coordinate directions.
        project: `project(x, v) -> v` onto the tangent space of an invariant manifold (flat vectors), applied
            to the initial tangents and before every QR, as in `lyapunov_spectrum`.

    Returns: `LyapunovResult` with exponents in units of 1/layer; `running` (L, k) the estimate after
    l = 1..L layers, `ts` = 1..L, `drift` = |lambda(L) - lambda(3L/4)|, `y1` = $x_L$.

    Raises:
        ValueError: naming the argument: `layers` empty, `k` not an integer in [1, dim], concrete `x0`
            holding NaN / inf.
    """
    where = "layer_lyapunov"
    layers = list(layers)
    if not layers:
        raise ValueError(f"{where}: `layers` must hold at least one map; got none.")
    flat0, unravel = ravel_pytree(x0)
    dim = flat0.shape[0]
    k = _check_k(where, k, dim)
    check_finite(where, "x0", flat0)
    V = _initial_tangents(flat0, k, key, project)
    x, total, totals, oks = flat0, jnp.zeros((k,), flat0.dtype), [], []
    for F in layers:
        def F_flat(z, F=F):
            return ravel_pytree(F(unravel(z)))[0]

        x, V = jax.vmap(lambda v: jax.jvp(F_flat, (x,), (v,)), in_axes=1, out_axes=(None, 1))(V)
        if project is not None:
            V = jax.vmap(lambda v: project(x, v), in_axes=1, out_axes=1)(V)
        V, logs = _reorthonormalise(V)
        total = total + logs
        totals.append(total)
        oks.append(jnp.all(jnp.isfinite(logs)) & jnp.all(jnp.isfinite(x)))
    n_layers = len(layers)
    ts = jnp.arange(1, n_layers + 1, dtype=total.dtype)
    running = jnp.stack(totals) / ts[:, None]
    return LyapunovResult(running[-1], running, ts, _drift(running), jnp.all(jnp.stack(oks)), unravel(x))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decoder_lyapunov_jit(graphdef, state, X, k, key):
    from flax import nnx

    decoder = nnx.merge(graphdef, state)
    return layer_lyapunov([block.__call__ for block in decoder.blocks], X, k, key=key)


def decoder_lyapunov(decoder, X, k: int, *, key: jax.Array | None = None) -> LyapunovResult:
    r"""`layer_lyapunov` of a `meanfield.nets.Decoder`'s block-to-block map on token vectors X (n, d).

    $X_{l+1} = \mathrm{Block}_l(X_l)$ on the n d-dimensional state of all tokens together (attention couples
    them), so the exponents (1/layer) say how fast nearby token configurations separate (> 0) or merge
    (< 0) through the network. Computed in X's floating dtype (the parameters are cast to it) under one
    `jax.jit` (compiled once per decoder structure, k and shape of X).

    Raises:
        ValueError: naming the argument: `X` not (n, d_model) or holding NaN / inf, `k` not in [1, n d].
    """
    from flax import nnx

    where = "decoder_lyapunov"
    X = jnp.asarray(X)
    d = decoder.cfg.d_model
    if X.ndim != 2 or X.shape[1] != d:
        raise ValueError(f"{where}: `X` must be token vectors of shape (n, d_model = {d}); got shape {tuple(X.shape)}.")
    if not jnp.issubdtype(X.dtype, jnp.floating):
        X = X.astype(jnp.result_type(float))
    k = _check_k(where, k, X.size)
    check_finite(where, "X", X)
    graphdef, state = nnx.split(decoder)
    state = jax.tree.map(lambda a: a.astype(X.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    return _decoder_lyapunov_jit(graphdef, state, X, k, key)
