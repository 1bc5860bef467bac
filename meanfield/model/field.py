r"""Velocity fields built from one `Model`: tokens, sphere projection, Gaussian moments.

Token field (MISSION section 1):

$$ F(t, X)_i = a_\text{attn}\,\mathrm{Attn}(x_i; X) + a_\text{mlp}\,\mathrm{MLP}(x_i), $$

projected row-wise by $P_x v = v - \langle x, v\rangle x$ when `norm="sphere"`. On the sphere the
field is evaluated at the normalised tokens $\hat x = x/|x|$ and projected with $P_{\hat x}$: the
same field on $S^{d-1}$, and off it $\frac{d}{dt}|x| = \langle \hat x, P_{\hat x} v\rangle = 0$ exactly, so
the integrator's rounding cannot be amplified away from the sphere (with the plain projection,
$\frac{d}{dt}(|x|^2-1) = -2\langle x,v\rangle(|x|^2-1)$ grows wherever $\langle x,v\rangle<0$).

Moment field (Gaussian closure, MISSION section 2): for $X \sim N(m, S)$ and softmax attention,
$E[e^{\beta x^\top Q^\top K y} y]/E[e^{\beta x^\top Q^\top K y}] = m + \beta S K^\top Q x$, so with an
affine (or no) MLP the field is affine, $F(x) = c + M x$ with

$$ M = a_\text{attn}\beta V S K^\top Q + a_\text{mlp} W, \qquad c = a_\text{attn} V m + a_\text{mlp} b, $$

and $\dot m = c + M m$, $\dot S = M S + S M^\top$.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from .._linalg import matmul
from .._types import Mean, Cov, Tokens
from .attention import AbstractAttention
from .attention import attention as evaluate_attention
from .mlp import mlp


def sphere_project(X: Tokens, V: Tokens) -> Tokens:
    r"""Row-wise tangent projection $P_{x_i} v_i = v_i - \langle x_i, v_i\rangle x_i$."""
    return V - jnp.sum(X * V, axis=-1, keepdims=True) * X


def token_velocity(model, X: Tokens, *, attention: AbstractAttention | None = None) -> Tokens:
    """$F(X)_i = a_attn Attn(x_i; X) + a_mlp MLP(x_i)$, sphere-projected if `norm='sphere'`.

    `model` must be depth-constant (use `model.at(t)` for a piecewise one). `attention`: the
    evaluator (`Dense()`, `Blocked(...)`, `LowRank(...)`; None: dense up to 4096 tokens, else
    blocked; see `meanfield.model.attention.attention`).
    """
    chex.assert_shape(X, (None, model.d))  # static: checked once per trace, free at run time
    if model.norm == "sphere":
        X = X / jnp.linalg.norm(X, axis=-1, keepdims=True)
    attn = evaluate_attention(model, X, attention)
    v = model.a_attn * attn + model.a_mlp * mlp(model, X)
    if model.norm == "sphere":
        v = sphere_project(X, v)
    return v


def particle_field(t, X: Tokens, model, *, attention: AbstractAttention | None = None) -> Tokens:
    """$F(t, X)$, the token ODE's right-hand side at depth t: `token_velocity(model.at(t), X)`; returns (n, d)."""
    return token_velocity(model.at(t), X, attention=attention)


def gaussian_closure_error(model) -> str | None:
    """Why the Gaussian moment ODE is not exact for `model`. Returns None when it is, else the reasons (str)."""
    reasons = []
    if model.attention not in ("softmax", "none"):
        reasons.append(
            f"attention={model.attention!r}: only softmax attention tilts a Gaussian into a Gaussian "
            "(the unnormalised and shaped kernels change the mass/centring and break the affine form)"
        )
    if model.causal:
        reasons.append("causal=True: a token distribution has no order, so a causal mask has no mean-field closure")
    if model.mlp == "two_layer":
        reasons.append("mlp='two_layer': a nonlinear MLP maps a Gaussian to a non-Gaussian")
    if model.norm == "sphere":
        reasons.append("norm='sphere': the sphere projection is nonlinear, and tokens on a sphere are not Gaussian")
    if not reasons:
        return None
    return "; ".join(reasons)


def moment_matrices(model, m: Mean, S: Cov) -> tuple[Cov, Mean]:
    r"""$(M, c)$ of the affine field $F(x) = c + Mx$ for $N(m, S)$ (depth-constant model)."""
    chex.assert_shape([m, S], [(model.d,), (model.d, model.d)])
    d = m.shape[-1]
    M = jnp.zeros((d, d), m.dtype)
    c = jnp.zeros((d,), m.dtype)
    if model.attention != "none":
        M = M + model.a_attn * model.beta * matmul(matmul(matmul(model.V, S), model.K.T), model.Q)
        c = c + model.a_attn * (model.V @ m)
    if model.mlp == "affine":
        M = M + model.a_mlp * model.W
        c = c + model.a_mlp * model.b
    return M, c


def moment_field(model, m: Mean, S: Cov) -> tuple[Mean, Cov]:
    r"""$(\dot m, \dot S) = (c + M m,\ M S + S M^\top)$."""
    M, c = moment_matrices(model, m, S)
    MS = matmul(M, S)
    return c + M @ m, MS + MS.T
