r"""Observables as pure functions of one state (tokens X (n, d), or Gaussian moments (m, S)).

All functions take one unbatched state; `jax.vmap` them over saves or sweep points, or pass
them to `simulate_particles(save_fn=...)` to save observables instead of tokens.

Rank collapse (MISSION section 3), with singular values $s_k$ of X and $p_k = s_k^2/\sum s^2$:

- `effective_rank`:      $\exp(-\sum_k p_k \log p_k)$ in [1, min(n, d)]
- `stable_rank`:         $\lVert X\rVert_F^2 / \lVert X\rVert_2^2 = 1/p_1$
- `rank_one_distance`:   $\min_{\operatorname{rank}Y\le1}\lVert X-Y\rVert_F/\lVert X\rVert_F = \sqrt{1-p_1}$ (Eckart-Young)
- `consensus_distance`:  $\lVert X - \mathbf 1\bar x^\top\rVert_F / \lVert X\rVert_F$ (all tokens equal)
- `mean_cosine`:         mean of $\cos(x_i, x_j)$ over pairs $i \ne j$
- `diameter`:            $\max_{ij}\lVert x_i - x_j\rVert$
- `cluster_count`:       connected components of the graph $\lVert x_i-x_j\rVert < \text{tol}\cdot\text{rms}|x|$

For a Gaussian $N(m,S)$ the same rank observables are those of the second-moment matrix
$G = mm^\top + S$ (the limit of $X^\top X/n$ for i.i.d. tokens): `gaussian_effective_rank`,
`gaussian_rank_one_distance`. Covariance statistics: `cov_trace`, `cov_logdet`,
`cov_condition`, `numerical_rank`, and `empirical_covariance` for particles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._types import Cov, Mean, Tokens


def _squared_spectrum(X: Tokens) -> jax.Array:
    """p_k = s_k^2 / sum s^2: eigenvalues of the smaller Gram matrix (X^T X or X X^T), normalised.

    O(n d min(n, d)) time and O(min(n, d)^2) memory, so n = 10^6 tokens are fine.
    """
    G = X.T @ X if X.shape[0] >= X.shape[1] else X @ X.T
    s2 = jnp.clip(jnp.linalg.eigvalsh(G), 0.0, None)
    return s2 / jnp.maximum(jnp.sum(s2), jnp.finfo(X.dtype).tiny)


def _entropy_rank(p: jax.Array) -> jax.Array:
    p = jnp.clip(p, 0.0, 1.0)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.exp(-jnp.sum(plogp, axis=-1))


def effective_rank(X: Tokens) -> jax.Array:
    r"""$\exp(-\sum_k p_k\log p_k)$, $p_k = s_k^2/\sum_j s_j^2$ (Roy & Vetterli on squared singular values)."""
    return _entropy_rank(_squared_spectrum(X))


def stable_rank(X: Tokens) -> jax.Array:
    r"""$\lVert X\rVert_F^2/\lVert X\rVert_2^2$."""
    return 1.0 / jnp.max(_squared_spectrum(X))


def rank_one_distance(X: Tokens) -> jax.Array:
    r"""Relative Frobenius distance to the nearest rank-one matrix, $\sqrt{1 - s_1^2/\sum s^2}$."""
    return jnp.sqrt(jnp.clip(1.0 - jnp.max(_squared_spectrum(X)), 0.0, 1.0))


def consensus_distance(X: Tokens) -> jax.Array:
    r"""$\lVert X - \mathbf 1 \bar x^\top\rVert_F/\lVert X\rVert_F$: 0 when every token is the same."""
    dev = X - jnp.mean(X, axis=0)
    return jnp.sqrt(jnp.sum(dev * dev) / jnp.maximum(jnp.sum(X * X), jnp.finfo(X.dtype).tiny))


def mean_cosine(X: Tokens) -> jax.Array:
    r"""$\frac{1}{n(n-1)}\sum_{i\ne j}\cos(x_i,x_j)$, in O(nd) via $\lVert\sum_i u_i\rVert^2 = \sum_{ij}\langle u_i,u_j\rangle$."""
    n = X.shape[0]
    norms = jnp.linalg.norm(X, axis=-1, keepdims=True)
    U = X / jnp.maximum(norms, jnp.finfo(X.dtype).tiny)
    total = jnp.sum(jnp.sum(U, axis=0) ** 2)
    diag = jnp.sum(U * U)
    return (total - diag) / float(max(n * (n - 1), 1))  # a Python int overflows int32 past n ~ 46341


def _pairwise_sq_dists(A, B):
    sq = jnp.sum(A * A, -1)[:, None] + jnp.sum(B * B, -1)[None, :] - 2.0 * A @ B.T
    return jnp.maximum(sq, 0.0)


def diameter(X: Tokens, *, block_size: int = 2048) -> jax.Array:
    r"""$\max_{i,j}\lVert x_i - x_j\rVert$, computed in row blocks (O(n^2 d) time, O(n * block) memory).

    Uses $\lVert x\rVert^2 + \lVert y\rVert^2 - 2\langle x,y\rangle$ on centred tokens; its absolute
    rounding error is about eps * max|x|^2, so in float32 distances below ~1e-3 |x| are
    resolved only to a few digits.
    """
    X = X - jnp.mean(X, axis=0)
    n = X.shape[0]
    b = min(block_size, n)
    nb = -(-n // b)
    Xp = jnp.pad(X, ((0, nb * b - n), (0, 0)))
    Xp = jnp.where((jnp.arange(nb * b) < n)[:, None], Xp, X[0])  # pad with a real token
    blocks = Xp.reshape(nb, b, -1)
    per_block = jax.lax.map(lambda blk: jnp.max(_pairwise_sq_dists(blk, X)), blocks)
    return jnp.sqrt(jnp.max(per_block))


def cluster_count(X: Tokens, tol: float = 1e-2) -> jax.Array:
    r"""Number of clusters: connected components of the graph linking tokens closer than
    `tol` times the RMS token norm (single linkage). Dense O(n^2) memory; meant for n up to a
    few thousand. On the sphere (RMS norm 1) `tol` is an absolute chordal distance.
    """
    n = X.shape[0]
    scale = jnp.sqrt(jnp.mean(jnp.sum(X * X, axis=-1)))
    adj = _pairwise_sq_dists(X, X) < (tol * scale) ** 2
    labels0 = jnp.arange(n)

    def propagate(state):
        labels, _ = state
        neigh = jnp.min(jnp.where(adj, labels[None, :], n), axis=1)
        new = jnp.minimum(labels, neigh)
        new = new[new]  # pointer jumping: halves the remaining hops
        return new, jnp.any(new != labels)

    labels, _ = jax.lax.while_loop(lambda s: s[1], propagate, (labels0, jnp.array(True)))
    return jnp.sum(labels == labels0)


def empirical_mean(X: Tokens) -> Mean:
    return jnp.mean(X, axis=0)


def empirical_covariance(X: Tokens) -> Cov:
    r"""$\frac1n\sum_i (x_i-\bar x)(x_i-\bar x)^\top$ (the empirical measure's covariance, no Bessel factor)."""
    dev = X - jnp.mean(X, axis=0)
    return dev.T @ dev / X.shape[0]


def cov_trace(S: Cov) -> jax.Array:
    return jnp.trace(S)


def _sym_eigvals(S: Cov) -> jax.Array:
    return jnp.linalg.eigvalsh(0.5 * (S + S.T))


def cov_logdet(S: Cov) -> jax.Array:
    r"""$\log\det S$ (-inf when S is singular to rounding)."""
    lam = _sym_eigvals(S)
    return jnp.where(jnp.all(lam > 0), jnp.sum(jnp.log(jnp.where(lam > 0, lam, 1.0))), -jnp.inf)


def cov_condition(S: Cov) -> jax.Array:
    r"""$\lambda_\max/\lambda_\min$ of S (inf when singular)."""
    lam = _sym_eigvals(S)
    return jnp.where(lam[0] > 0, lam[-1] / jnp.where(lam[0] > 0, lam[0], 1.0), jnp.inf)


def numerical_rank(S: Cov, rtol: float | None = None) -> jax.Array:
    r"""Number of eigenvalues of S above `rtol` * lambda_max (default 100 d eps)."""
    d = S.shape[-1]
    lam = _sym_eigvals(S)
    rtol = 100 * d * jnp.finfo(S.dtype).eps if rtol is None else rtol
    return jnp.sum(lam > rtol * jnp.max(jnp.abs(lam)))


def _second_moment_spectrum(m: Mean, S: Cov) -> jax.Array:
    lam = jnp.clip(_sym_eigvals(S + jnp.outer(m, m)), 0.0, None)
    return lam / jnp.maximum(jnp.sum(lam), jnp.finfo(S.dtype).tiny)


def gaussian_effective_rank(m: Mean, S: Cov) -> jax.Array:
    r"""Effective rank of $G = mm^\top + S$ (the n -> inf limit of `effective_rank` for i.i.d. tokens)."""
    return _entropy_rank(_second_moment_spectrum(m, S))


def gaussian_rank_one_distance(m: Mean, S: Cov) -> jax.Array:
    r"""$\sqrt{1 - \lambda_1(G)/\operatorname{tr}G}$, $G = mm^\top + S$ (limit of `rank_one_distance`)."""
    return jnp.sqrt(jnp.clip(1.0 - jnp.max(_second_moment_spectrum(m, S)), 0.0, 1.0))


def rms_norm(X: Tokens) -> jax.Array:
    r"""$\sqrt{\frac1n\sum_i |x_i|^2}$: the token scale, used for growth / blow-up."""
    return jnp.sqrt(jnp.mean(jnp.sum(X * X, axis=-1)))


PARTICLE_OBSERVABLES = {
    "effective_rank": effective_rank,
    "stable_rank": stable_rank,
    "rank_one_distance": rank_one_distance,
    "consensus_distance": consensus_distance,
    "mean_cosine": mean_cosine,
    "diameter": diameter,
    "rms_norm": rms_norm,
    "cov_trace": lambda X: cov_trace(empirical_covariance(X)),
}
"""Name -> scalar observable of tokens X; the names a sweep may record."""


def particle_observables(X: Tokens, names=tuple(PARTICLE_OBSERVABLES)) -> dict:
    """A dict of the named scalar observables of X (a ready `save_fn`)."""
    return {name: PARTICLE_OBSERVABLES[name](X) for name in names}
