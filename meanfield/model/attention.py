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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._linalg import matmul
from .._types import Tokens

DENSE_MAX_TOKENS = 4096
"""`attention_impl="auto"` evaluates densely up to this many tokens (n^2 floats = 64 MiB)."""


def _project(model, X):
    q = matmul(X, model.Q.T) * model.beta
    k = matmul(X, model.K.T)
    v = matmul(X, model.V.T)
    return q, k, v


def dense_attention(model, X: Tokens) -> Tokens:
    r"""Returns (n, d): the attention output of every token with the (n, n) logit matrix materialised,
    e.g. softmax $\sum_j \mathrm{softmax}_j(\beta\langle Q x_i, K x_j\rangle) V x_j$ (variants as in `attention`)."""
    n = X.shape[0]
    q, k, v = _project(model, X)
    logits = matmul(q, k.T)
    if model.causal:
        mask = jnp.tril(jnp.ones((n, n), dtype=bool))
        logits = jnp.where(mask, logits, -jnp.inf)
    if model.attention == "unnormalised":
        # (1/n) sum_j e^{l_ij} v_j, computed as e^{m_i} sum_j e^{l_ij - m_i} v_j / n for range.
        row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        return jnp.exp(row_max) * matmul(jnp.exp(logits - row_max), v) / n
    weights = jax.nn.softmax(logits, axis=-1)
    out = matmul(weights, v)
    if model.attention == "shaped":
        out = out + v - _centring(v, model.causal)
    return out


def _centring(v, causal: bool):
    """C v with C = (1/n) 1 1^T, or the uniform-causal matrix (row i: 1/i on j <= i)."""
    n = v.shape[0]
    if causal:
        return jnp.cumsum(v, axis=0) / jnp.arange(1, n + 1, dtype=v.dtype)[:, None]
    return jnp.broadcast_to(jnp.mean(v, axis=0), v.shape)


def blocked_attention(model, X: Tokens, *, block_size: int = 1024) -> Tokens:
    """Returns (n, d): the same output as `dense_attention` without the (n, n) matrix (online softmax over key blocks).

    Memory O(block_size^2 + n d); `n` need not be a multiple of `block_size` (the tail is
    padded with masked keys). Agrees with `dense_attention` to float rounding.
    """
    n, d = X.shape
    b = int(min(block_size, n))
    nb = -(-n // b)
    pad = nb * b - n
    q, k, v = _project(model, X)
    dv = v.shape[1]
    qb = jnp.pad(q, ((0, pad), (0, 0))).reshape(nb, b, -1)
    kb = jnp.pad(k, ((0, pad), (0, 0))).reshape(nb, b, -1)
    vb = jnp.pad(v, ((0, pad), (0, 0))).reshape(nb, b, dv)
    idx = jnp.arange(nb * b).reshape(nb, b)
    neg = jnp.asarray(-jnp.inf, q.dtype)

    def one_query_block(args):
        q_blk, qi = args

        def step(carry, kv):
            m, s, acc = carry
            k_blk, v_blk, kj = kv
            logits = q_blk @ k_blk.T
            valid = (kj < n)[None, :]
            if model.causal:
                valid = valid & (kj[None, :] <= qi[:, None])
            logits = jnp.where(valid, logits, neg)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            # Rows with no valid key yet keep m = -inf; shift by 0 there to avoid inf - inf.
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            scale = jnp.exp(m - shift)
            p = jnp.exp(logits - shift[:, None])
            s = s * scale + p.sum(-1)
            acc = acc * scale[:, None] + p @ v_blk
            return (m_new, s, acc), None

        init = (jnp.full((b,), neg), jnp.zeros((b,), q.dtype), jnp.zeros((b, dv), q.dtype))
        (m, s, acc), _ = jax.lax.scan(step, init, (kb, vb, idx))
        m = jax.lax.stop_gradient(m)
        if model.attention == "unnormalised":
            return acc * jnp.exp(m)[:, None] / n
        return acc / s[:, None]

    out = jax.lax.map(one_query_block, (qb, idx)).reshape(nb * b, dv)[:n]
    if model.attention == "shaped":
        out = out + v - _centring(v, model.causal)
    return out


def attention_rows(model, Xq: Tokens, X: Tokens, *, block_size: int = 4096) -> Tokens:
    r"""Returns (m, d): non-causal softmax (or unnormalised) attention of m query tokens `Xq`
    against all n tokens `X`, $\sum_j \mathrm{softmax}_j(\beta\langle Q x^q_i, K x_j\rangle) V x_j$,
    by the online softmax over key blocks (O(m n) time, O((m + n) d) memory).

    The exact reference for checking a fast evaluator on a query subsample when the full n x n sum
    is too slow (`meanfield figures million_tokens`, `benchmarks/bench_fast_attention.py`).
    """
    if model.causal or model.attention not in ("softmax", "unnormalised"):
        raise ValueError("attention_rows: non-causal softmax or unnormalised attention only; "
                         f"got attention={model.attention!r}, causal={model.causal}.")
    q = matmul(Xq, model.Q.T) * model.beta
    _, k, v = _project(model, X)
    n = X.shape[0]
    b = int(min(block_size, n))
    nb = -(-n // b)
    pad = nb * b - n
    kb = jnp.pad(k, ((0, pad), (0, 0))).reshape(nb, b, -1)
    vb = jnp.pad(v, ((0, pad), (0, 0))).reshape(nb, b, -1)
    ok = (jnp.arange(nb * b) < n).reshape(nb, b)

    def step(carry, kv):
        m, s, acc = carry
        k_blk, v_blk, valid = kv
        logits = jnp.where(valid[None, :], q @ k_blk.T, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        scale = jnp.exp(m - m_new)
        p = jnp.exp(logits - m_new[:, None])
        return (m_new, s * scale + p.sum(-1), acc * scale[:, None] + p @ v_blk), None

    mq, dt = Xq.shape[0], X.dtype
    init = (jnp.full((mq,), -jnp.inf, dt), jnp.zeros((mq,), dt), jnp.zeros((mq, v.shape[1]), dt))
    (m, s, acc), _ = jax.lax.scan(step, init, (kb, vb, ok))
    if model.attention == "unnormalised":
        return acc * jnp.exp(m)[:, None] / n
    return acc / s[:, None]


def attention(model, X: Tokens, *, impl: str = "auto", block_size: int = 1024, orders=None,
              rtol: float | None = None) -> Tokens:
    """`Attn(x_i; X)` for every token of X (n, d) with the model's attention type.

    `impl`: `"dense"`, `"blocked"`, or `"auto"` (dense up to `DENSE_MAX_TOKENS` tokens): the
    direct sum. With `orders` (a static tuple from `choose_orders`), softmax and unnormalised
    attention use `lowrank_attention` (separable Chebyshev features, O(n F)) with its a priori
    error bound checked against `rtol` on the current tokens, falling back to `impl` otherwise.
    """
    if model.attention == "none":
        return jnp.zeros_like(X)
    if orders is not None and model.attention in ("softmax", "unnormalised"):
        from .fast_attention import lowrank_attention

        direct_impl = "blocked" if impl == "auto" else impl
        return lowrank_attention(model, X, orders=orders, rtol=rtol, block_size=block_size, direct_impl=direct_impl)
    if impl == "auto":
        impl = "dense" if X.shape[0] <= DENSE_MAX_TOKENS else "blocked"
    if impl == "dense":
        return dense_attention(model, X)
    if impl == "blocked":
        return blocked_attention(model, X, block_size=block_size)
    raise ValueError(f"attention: `impl` must be one of ['auto', 'dense', 'blocked']; got {impl!r}.")
