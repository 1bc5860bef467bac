r"""Attention as pure functions of one token matrix X (n, d).

With logits $\ell_{ij} = \beta \langle Q x_i, K x_j\rangle$ and values $v_j = V x_j$:

- softmax:       $A_i = \sum_j e^{\ell_{ij}} v_j / \sum_j e^{\ell_{ij}}$
- unnormalised:  $A_i = \frac1n \sum_j e^{\ell_{ij}} v_j$
- shaped:        $A_i = v_i + \sum_j (\mathrm{softmax}_j(\ell_{ij}) - c_{ij}) v_j$, where
  $c_{ij} = 1/n$ (or $1/i$ on $j\le i$ when causal): the matrix $I + \mathrm{softmax} - C$.
- causal: every sum runs over $j \le i$ only.

Two evaluations give the same numbers up to float rounding:
`dense_attention` materialises the (n, n) logits; `blocked_attention` streams key blocks
with an online (running-max) softmax, one query block at a time, so its memory is
O(block_q * block_k + n d) instead of O(n^2) (FlashAttention's recurrence, Dao et al. 2022):

    m' = max(m, max_j l_ij),  s' = s e^{m - m'} + sum_j e^{l_ij - m'},  a' = a e^{m - m'} + sum_j e^{l_ij - m'} v_j.

Evaluators (small frozen equinox Modules, like diffrax's solvers; hashable, so they are static
arguments under jit): `Dense()`, `Blocked(block_size)` and `LowRank(orders, rtol, fallback)`
(separable Chebyshev features, `meanfield.model.lowrank`). Each is called as
`evaluator(model, X) -> (n, d)`; `attention(model, X, evaluator)` is the one entry point. The
policy `Auto` that picks one for a solve lives with the simulators
(`meanfield.simulate.attention_policy`).
"""

from __future__ import annotations

import abc
import numbers

import equinox as eqx
import jax
import jax.numpy as jnp

from .._linalg import matmul
from .._types import Tokens
from .lowrank import lowrank_attention

DENSE_MAX_TOKENS = 4096
"""`direct_evaluator` (and so `attention` without an evaluator, and `Auto`) evaluates densely up to
this many tokens (n^2 floats = 64 MiB), blocked above."""


def _project(model, X):
    q = matmul(X, model.Q.T) * model.beta
    k = matmul(X, model.K.T)
    v = matmul(X, model.V.T)
    return q, k, v


def _logits(model, X):
    r"""(n, n): $\ell_{ij} = \beta\langle Q x_i, K x_j\rangle$, as $X (\beta Q^\top K) X^\top$ when the key width is
    at least d (one d x d product instead of two projections), else $(\beta X Q^\top)(X K^\top)^\top$."""
    if model.Q.shape[0] >= model.Q.shape[1]:
        A = model.beta * matmul(model.Q.T, model.K)
        return matmul(matmul(X, A), X.T)
    q = matmul(X, model.Q.T) * model.beta
    return matmul(q, matmul(X, model.K.T).T)


def dense_attention(model, X: Tokens) -> Tokens:
    r"""Returns (n, d): the attention output of every token with the (n, n) logit matrix materialised,
    e.g. softmax $\sum_j \mathrm{softmax}_j(\beta\langle Q x_i, K x_j\rangle) V x_j$ (variants as in `attention`).

    Evaluated as $(\sum_j e^{\ell_{ij} - m_i} x_j)\, V^\top / \sum_j e^{\ell_{ij} - m_i}$ with the row maximum
    $m_i$: the values are projected after the sum and divided once per row, not once per weight.
    (A 64-token, d = 8 softmax field in a 256-lane batch: 3.1-3.3 -> 2.6-2.9 us per lane; benchmarks/README.md.)
    """
    n = X.shape[0]
    logits = _logits(model, X)
    if model.causal:
        mask = jnp.tril(jnp.ones((n, n), dtype=bool))
        logits = jnp.where(mask, logits, -jnp.inf)
    # Every row holds a finite logit (its own token), so the shifted exponentials are finite.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - row_max)
    summed = matmul(e, X)
    if model.attention == "unnormalised":
        # (1/n) sum_j e^{l_ij} v_j = e^{m_i} sum_j e^{l_ij - m_i} v_j / n, computed so for range.
        return jnp.exp(row_max) * matmul(summed, model.V.T) / n
    mixed = summed / jnp.sum(e, axis=-1, keepdims=True)
    if model.attention == "shaped":  # (softmax + I - C) X V^T: C is linear, so one projection serves all three
        mixed = mixed + X - _centring(X, model.causal)
    return matmul(mixed, model.V.T)


def _centring(v, causal: bool):
    """C v with C = (1/n) 1 1^T, or the uniform-causal matrix (row i: 1/i on j <= i)."""
    n = v.shape[0]
    if causal:
        return jnp.cumsum(v, axis=0) / jnp.arange(1, n + 1, dtype=v.dtype)[:, None]
    return jnp.broadcast_to(jnp.mean(v, axis=0), v.shape)


def _key_blocks(k, v, block_size: int):
    """Keys and values padded to whole blocks, (nb, b, .), with each key's index (nb, b)."""
    n = k.shape[0]
    b = int(min(block_size, n))
    nb = -(-n // b)
    pad = nb * b - n
    kb = jnp.pad(k, ((0, pad), (0, 0))).reshape(nb, b, -1)
    vb = jnp.pad(v, ((0, pad), (0, 0))).reshape(nb, b, v.shape[1])
    return kb, vb, jnp.arange(nb * b).reshape(nb, b)


def _online_softmax(q, kb, vb, kidx, n: int, unnormalised: bool, qidx=None):
    r"""$\sum_j \mathrm{softmax}_j(q_i\cdot k_j) v_j$ (or $\frac1n\sum_j e^{q_i\cdot k_j} v_j$) for the
    queries q (m, .) by one scan over key blocks with the running-max recurrence of the module
    docstring; keys with index >= n are padding; with `qidx` (the queries' token indices) key j counts
    for query i only when j <= i (causal)."""
    neg = jnp.asarray(-jnp.inf, q.dtype)

    def step(carry, kv):
        m, s, acc = carry
        k_blk, v_blk, kj = kv
        logits = q @ k_blk.T
        valid = (kj < n)[None, :]
        if qidx is not None:
            valid = valid & (kj[None, :] <= qidx[:, None])
        logits = jnp.where(valid, logits, neg)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        # Rows with no valid key yet keep m = -inf; shift by 0 there to avoid inf - inf.
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        scale = jnp.exp(m - shift)
        p = jnp.exp(logits - shift[:, None])
        s = s * scale + p.sum(-1)
        acc = acc * scale[:, None] + p @ v_blk
        return (m_new, s, acc), None

    mq, dv = q.shape[0], vb.shape[-1]
    init = (jnp.full((mq,), neg), jnp.zeros((mq,), q.dtype), jnp.zeros((mq, dv), q.dtype))
    (m, s, acc), _ = jax.lax.scan(step, init, (kb, vb, kidx))
    m = jax.lax.stop_gradient(m)
    if unnormalised:
        return acc * jnp.exp(m)[:, None] / n
    return acc / s[:, None]


def blocked_attention(model, X: Tokens, *, block_size: int = 1024) -> Tokens:
    """Returns (n, d): the same output as `dense_attention` without the (n, n) matrix (online softmax over key blocks).

    Memory O(block_size^2 + n d); `n` need not be a multiple of `block_size` (the tail is
    padded with masked keys). Agrees with `dense_attention` to float rounding.
    """
    n = X.shape[0]
    q, k, v = _project(model, X)
    kb, vb, idx = _key_blocks(k, v, block_size)
    nb, b = idx.shape
    qb = jnp.pad(q, ((0, nb * b - n), (0, 0))).reshape(nb, b, -1)
    unnormalised = model.attention == "unnormalised"

    def one_query_block(args):
        q_blk, qi = args
        return _online_softmax(q_blk, kb, vb, idx, n, unnormalised, qi if model.causal else None)

    out = jax.lax.map(one_query_block, (qb, idx)).reshape(nb * b, v.shape[1])[:n]
    if model.attention == "shaped":
        out = out + v - _centring(v, model.causal)
    return out


def attention_rows(model, Xq: Tokens, X: Tokens, *, block_size: int = 4096) -> Tokens:
    r"""Returns (m, d): non-causal softmax (or unnormalised) attention of m query tokens `Xq`
    against all n tokens `X`, $\sum_j \mathrm{softmax}_j(\beta\langle Q x^q_i, K x_j\rangle) V x_j$,
    by the online softmax over key blocks (O(m n) time, O((m + n) d) memory).

    The exact reference for checking a fast evaluator on a query subsample when the full n x n sum
    is too slow (`meanfield figures million_tokens`, `benchmarks/bench_lowrank_attention.py`).
    """
    if model.causal or model.attention not in ("softmax", "unnormalised"):
        raise ValueError("attention_rows: non-causal softmax or unnormalised attention only; "
                         f"got attention={model.attention!r}, causal={model.causal}.")
    q = matmul(Xq, model.Q.T) * model.beta
    _, k, v = _project(model, X)
    kb, vb, idx = _key_blocks(k, v, block_size)
    return _online_softmax(q, kb, vb, idx, X.shape[0], model.attention == "unnormalised")


class AbstractAttention(eqx.Module):
    """An attention evaluator: `evaluator(model, X) -> (n, d)`, the attention output of every token
    of X for a depth-constant `model` (what `attention` returns). Frozen and hashable."""

    @abc.abstractmethod
    def __call__(self, model, X: Tokens) -> Tokens:
        ...


class Dense(AbstractAttention):
    r"""The direct sum $A_i = \sum_j \mathrm{softmax}_j(\beta\langle Qx_i, Kx_j\rangle) Vx_j$ (and its variants)
    with the (n, n) logit matrix materialised (`dense_attention`): O(n^2) memory. Returns (n, d)."""

    def __call__(self, model, X: Tokens) -> Tokens:
        return dense_attention(model, X)


class Blocked(AbstractAttention):
    r"""The direct sum by the online softmax over key blocks (`blocked_attention`), running max $m$ and sum $s$:
    $m' = \max(m, \max_j \ell_{ij})$, $s' = s e^{m - m'} + \sum_j e^{\ell_{ij} - m'}$. O(block_size^2 + n d)
    memory, the same numbers as `Dense` to float rounding. Returns (n, d)."""

    block_size: int = eqx.field(default=1024, static=True)

    def __check_init__(self):
        if not (isinstance(self.block_size, numbers.Integral) and self.block_size >= 1):
            raise ValueError(f"Blocked: `block_size` must be an integer >= 1; got {self.block_size!r}.")

    def __call__(self, model, X: Tokens) -> Tokens:
        return blocked_attention(model, X, block_size=self.block_size)


class LowRank(AbstractAttention):
    """Separable Chebyshev features (`meanfield.model.lowrank.lowrank_attention`), O(n F) for
    F = prod_k N_k: softmax and unnormalised attention, causal or not, for small d (or rank Q^T K).

    Attributes:
        orders: static Chebyshev orders (N_1, ..., N_d), e.g. from `choose_orders`; None: planned
            from the initial tokens by the simulators (`resolve_attention`), which must run first.
        rtol: error bound to meet, relative to max_j |V x_j| (softmax); every call rechecks the a
            priori bound on the current tokens and evaluates `fallback` where it fails. None:
            the simulators fill in `default_rtol` (1e-6 float32, 1e-12 float64); called directly,
            None means no check (always the low-rank sum).
        fallback: the direct evaluator used where the bound fails, and for attention types the
            low-rank sum does not cover (shaped).
        chunk: causal chunk length (the direct sum inside a chunk).
    """

    orders: tuple[int, ...] | None = eqx.field(default=None, static=True, converter=lambda o: (
        None if o is None else tuple(int(a) for a in o)))
    rtol: float | None = eqx.field(default=None, static=True, converter=lambda r: None if r is None else float(r))
    fallback: AbstractAttention = Blocked()
    chunk: int = eqx.field(default=256, static=True)

    def __check_init__(self):
        if self.orders is not None and (len(self.orders) == 0 or min(self.orders) < 1):
            raise ValueError(f"LowRank: `orders` must be positive integers; got {self.orders}.")
        if self.rtol is not None and not self.rtol > 0:
            raise ValueError(f"LowRank: `rtol` must be > 0; got {self.rtol}.")

    def __call__(self, model, X: Tokens) -> Tokens:
        if model.attention not in ("softmax", "unnormalised"):
            return self.fallback(model, X)
        if self.orders is None:
            raise ValueError(
                "LowRank(orders=None): the orders are static shapes planned from concrete tokens; pass "
                "`orders` (e.g. `choose_orders(model, X, rtol=...)`) or let `simulate_particles` / "
                "`resolve_attention` plan them."
            )
        return lowrank_attention(model, X, orders=self.orders, rtol=self.rtol, fallback=self.fallback,
                                 chunk=self.chunk)


def direct_evaluator(n: int) -> Dense | Blocked:
    """The direct sum for n tokens: `Dense()` up to `DENSE_MAX_TOKENS`, else `Blocked()`."""
    return Dense() if n <= DENSE_MAX_TOKENS else Blocked()


def attention(model, X: Tokens, evaluator: AbstractAttention | None = None) -> Tokens:
    """`Attn(x_i; X)` for every token of X (n, d) with the model's attention type.

    `evaluator`: `Dense()`, `Blocked(block_size)`, `LowRank(orders, rtol, fallback)` (or any
    `AbstractAttention`); None: `direct_evaluator(n)` (dense up to `DENSE_MAX_TOKENS` tokens).
    """
    if model.attention == "none":
        return jnp.zeros_like(X)
    if evaluator is None:
        evaluator = direct_evaluator(X.shape[0])
    if not callable(evaluator):
        raise ValueError(f"attention: `evaluator` must be an attention evaluator such as Dense() or Blocked(); "
                         f"got {evaluator!r} of type {type(evaluator).__name__}.")
    return evaluator(model, X)
