r"""Which attention evaluator a solve uses: the `Auto` policy, and resolving an evaluator for a solve.

`Auto(rtol)` picks, from the model and the initial tokens X0 (n tokens of dimension d):

- the low-rank sum `LowRank(orders, rtol, fallback=Blocked())` when the planner finds Chebyshev
  orders whose a priori bound meets `rtol` (for the ranges of X0 widened by `SIMULATE_MARGIN`) and
  `lowrank_is_faster(n, d, orders)` (never below `AUTO_MIN_TOKENS` tokens);
- otherwise the direct sum, `Dense()` up to `DENSE_MAX_TOKENS` tokens, else `Blocked()`.

`resolve_attention` turns an evaluator into the concrete one a solve runs with: `Auto` as above,
`LowRank(orders=None)` with planned orders, and a missing `rtol` filled with `default_rtol`. The
orders are static shapes, so planning needs concrete `model` and `X0`: under an outer jit or vmap
`Auto` is the direct sum and `LowRank(orders=None)` is refused.
"""

from __future__ import annotations

import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Tokens
from ..model.attention import DENSE_MAX_TOKENS, AbstractAttention, Blocked, LowRank, direct_evaluator
from ..model.lowrank import MAX_FEATURES, choose_orders

__all__ = ["Auto", "AUTO_MIN_TOKENS", "DENSE_MAX_TOKENS", "SIMULATE_MARGIN", "default_rtol", "lowrank_is_faster",
           "plan_orders", "resolve_attention"]

AUTO_MIN_TOKENS = 2048
"""`Auto` never uses the low-rank path below this many tokens."""

SIMULATE_MARGIN = 1.1
"""Planning margin of `plan_orders` (tokens move during a solve; see `choose_orders`)."""

_LOWRANK_ATTENTION = ("softmax", "unnormalised")


class Auto(AbstractAttention):
    """The policy: low-rank attention where its bound meets `rtol` and it is faster, else the
    direct sum (dense up to `DENSE_MAX_TOKENS` tokens, blocked above). Resolved per solve by
    `resolve_attention` (the simulators do it); called unresolved it is the direct sum.

    Attributes:
        rtol: error bound of the low-rank path, relative to max_j |V x_j| (softmax); None:
            `default_rtol` (1e-6 float32, 1e-12 float64).
    """

    rtol: float | None = eqx.field(default=None, static=True, converter=lambda r: None if r is None else float(r))

    def __check_init__(self):
        if self.rtol is not None and not self.rtol > 0:
            raise ValueError(f"Auto: `rtol` must be > 0; got {self.rtol}.")

    def __call__(self, model, X: Tokens) -> Tokens:
        return direct_evaluator(X.shape[0])(model, X)


def default_rtol(dtype) -> float:
    """Default attention tolerance: 1e-6 in float32, 1e-12 in float64 (near the solver's own)."""
    return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-6


def lowrank_is_faster(n: int, d: int, orders) -> bool:
    """Cost model: low-rank ~ n (8F(d+1) + 40 sum N_k) flops against direct ~ n^2 (2 d + 25)
    (an exponential counted as ~20 flops), with a safety factor 4 for the direct sum's better
    constant (large fused matmuls)."""
    F = int(np.prod(orders))
    lowrank = n * (8.0 * F * (d + 1) + 40.0 * sum(orders))
    direct = float(n) * n * (2.0 * d + 25.0)
    return n >= AUTO_MIN_TOKENS and 4.0 * lowrank < direct


def _is_traced(model, X0) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in [X0] + jax.tree.leaves(model))


def plan_orders(model, X0: Tokens, rtol: float, *, margin: float = SIMULATE_MARGIN) -> tuple[int, ...] | None:
    """Static Chebyshev orders for a solve starting at X0 (concrete), or None when the bound cannot
    meet `rtol`. Piecewise models get the elementwise maximum of the layers' orders; on the sphere
    the tokens are normalised first (as the field sees them)."""
    X = jnp.asarray(X0, model.dtype)
    if model.norm == "sphere":
        X = X / jnp.linalg.norm(X, axis=-1, keepdims=True)
    orders = None
    for layer in range(model.n_layers):
        o = choose_orders(model.layer(layer) if model.n_layers > 1 else model, X, rtol=rtol, margin=margin)
        if o is None:
            return None
        orders = o if orders is None else tuple(max(a, b) for a, b in zip(orders, o))
    return orders


def resolve_attention(attention: AbstractAttention, model, X0: Tokens) -> AbstractAttention:
    """The concrete evaluator a solve of `model` from `X0` (n, d) runs with.

    `Auto(rtol)`: `LowRank(orders, rtol, fallback=Blocked())` when the planned orders meet `rtol`
    and `lowrank_is_faster`, else `direct_evaluator(n)`; traced inputs give the direct sum.
    `LowRank`: `orders=None` planned from X0 (where the bound cannot be met: a warning and its
    `fallback`); given orders checked against d; `rtol=None` becomes `default_rtol`. For attention
    types without a low-rank form (shaped, none) both become the direct sum. Other evaluators are
    returned as they are.

    Raises:
        ValueError: `LowRank(orders=None)` with traced `model` or `X0`; `orders` not of length d;
            `LowRank` orders given for attention other than softmax / unnormalised.
    """
    if not callable(attention):
        raise ValueError(f"`attention` must be an evaluator (Auto(), Dense(), Blocked(...), LowRank(...)); "
                         f"got {attention!r} of type {type(attention).__name__}.")
    n, d = X0.shape[-2], X0.shape[-1]
    if not isinstance(attention, (Auto, LowRank)):
        return attention
    rtol = default_rtol(model.dtype) if attention.rtol is None else attention.rtol
    if isinstance(attention, Auto):
        if model.attention not in _LOWRANK_ATTENTION or _is_traced(model, X0):
            return direct_evaluator(n)
        orders = plan_orders(model, X0, rtol)
        if orders is None or not lowrank_is_faster(n, d, orders):
            return direct_evaluator(n)
        return LowRank(orders=orders, rtol=rtol, fallback=Blocked())
    if attention.orders is not None:
        if len(attention.orders) != d or model.attention not in _LOWRANK_ATTENTION:
            raise ValueError(
                f"LowRank: `orders` must hold d = {d} positive integers and needs softmax or unnormalised "
                f"attention; got {attention.orders} with {model.attention!r}."
            )
        return dataclasses.replace(attention, rtol=rtol)
    if model.attention not in _LOWRANK_ATTENTION:
        return attention.fallback
    if _is_traced(model, X0):
        raise ValueError(
            "LowRank(orders=None) needs concrete `model` and `X0` to choose its static orders; got traced "
            "values (call outside jit/vmap, pass `orders`, or use Auto())."
        )
    orders = plan_orders(model, X0, rtol)
    if orders is None:
        warnings.warn(
            f"LowRank: the a priori bound cannot meet rtol={rtol:g} within {MAX_FEATURES} features (beta times "
            f"the token radius too large); using its fallback {attention.fallback!r}.",
            stacklevel=3,
        )
        return attention.fallback
    return dataclasses.replace(attention, orders=orders, rtol=rtol)
