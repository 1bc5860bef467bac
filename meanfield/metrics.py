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

The registry. `OBSERVABLES` maps each name a sweep may record to an `Observable`: its function of
tokens and/or of Gaussian moments (or a statistic of the shaped SDE), and its CF `long_name` and
`units`; `observable_names(kind)` lists those of a simulator. Sweep configs, the sweep's point
functions and the results' attributes all read it.

Non-finite input. Every observable returns NaN when its input holds a NaN, and also for inf
except where the value is meaningful: `rms_norm` and `cov_trace` (an infinite variance on the
diagonal) give inf, `empirical_mean` gives inf in an infinite coordinate. The check is a
`jnp.where` on an all-finite mask (no Python branching: jit / vmap as before), and finite inputs
give bit-identical numbers. Counts (`cluster_count`, `numerical_rank`) are returned as floats (in
the input's float dtype, exact for counts below 2^24 in float32) so that they can be NaN.

Scale. The scale-free observables (ranks, distances relative to |X|, cosines, cluster counts)
and `rms_norm` / `diameter` first rescale X by a power of two (exact) when its largest entry is
so large or small that sums of squares would overflow or underflow (outside [2^-32, 2^32] in
float32, [2^-256, 2^256] in float64); inside that band X is used as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import chex
import jax
import jax.numpy as jnp

from ._symeig import eigvalsh
from ._types import Cov, Mean, Tokens


def _finite(*arrays) -> jax.Array:
    """True when every entry of every array is finite (a scalar bool, traceable)."""
    ok = jnp.array(True)
    for a in arrays:
        ok = ok & jnp.all(jnp.isfinite(a))
    return ok


def _nan_unless(ok, value) -> jax.Array:
    """`value` where `ok`, NaN elsewhere (same dtype; bit-identical where ok)."""
    return jnp.where(ok, value, jnp.asarray(jnp.nan, value.dtype))


def _zeroed(X) -> jax.Array:
    """X with non-finite entries set to 0, so no linear-algebra kernel ever sees NaN / inf (the
    result is masked to NaN afterwards); X itself, bit for bit, when finite."""
    return jnp.where(jnp.isfinite(X), X, jnp.zeros((), X.dtype))


def _pow2_exponent(big, dtype) -> jax.Array:
    """k such that big * 2^-k lies in [0.5, 1), when `big` (a max |entry|, or its square root for
    a second moment) is outside the band [2^(minexp/4), 2^(maxexp/4)] where sums of squares are
    safe; 0 inside it (and for 0)."""
    fi = jnp.finfo(dtype)
    lo, hi = 2.0 ** (int(fi.minexp) // 4), 2.0 ** (int(fi.maxexp) // 4)
    _, e = jnp.frexp(big)
    return jnp.where((big > hi) | ((big < lo) & (big > 0)), e, 0)


def _scaled(X) -> tuple[jax.Array, jax.Array]:
    """(X 2^-k, k): an exact power-of-two rescaling when X is outside the safe band, else (X, 0)."""
    k = _pow2_exponent(jnp.max(jnp.abs(X)), X.dtype)
    return jnp.ldexp(X, -k), k


def _tokens(X) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(X with non-finite entries zeroed and rescaled by 2^-k, all-finite flag, k)."""
    X = jnp.asarray(X)
    chex.assert_rank(X, 2)  # one unbatched (n, d) state; vmap for more
    ok = _finite(X)
    Xs, k = _scaled(_zeroed(X))
    return Xs, ok, k


def _squared_spectrum(X: Tokens) -> jax.Array:
    """p_k = s_k^2 / sum s^2: eigenvalues of the smaller Gram matrix (X^T X or X X^T), normalised.

    O(n d min(n, d)) time and O(min(n, d)^2) memory, so n = 10^6 tokens are fine. X must be
    finite (callers zero non-finite entries and mask the result).
    """
    G = X.T @ X if X.shape[0] >= X.shape[1] else X @ X.T
    s2 = jnp.clip(eigvalsh(G), 0.0, None)
    return s2 / jnp.maximum(jnp.sum(s2), jnp.finfo(X.dtype).tiny)


def entropy_rank(p: jax.Array) -> jax.Array:
    r"""$\exp(-\sum_k p_k\log p_k)$ of a probability vector p (last axis; entries clipped to [0, 1], 0 log 0 = 0)."""
    p = jnp.clip(p, 0.0, 1.0)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.exp(-jnp.sum(plogp, axis=-1))


def effective_rank(X: Tokens) -> jax.Array:
    r"""$\exp(-\sum_k p_k\log p_k)$, $p_k = s_k^2/\sum_j s_j^2$ (Roy & Vetterli on squared singular values).
    NaN for X holding NaN or inf."""
    Xs, ok, _ = _tokens(X)
    return _nan_unless(ok, entropy_rank(_squared_spectrum(Xs)))


def stable_rank(X: Tokens) -> jax.Array:
    r"""$\lVert X\rVert_F^2/\lVert X\rVert_2^2$ (NaN for non-finite X)."""
    Xs, ok, _ = _tokens(X)
    return _nan_unless(ok, 1.0 / jnp.max(_squared_spectrum(Xs)))


def rank_one_distance(X: Tokens) -> jax.Array:
    r"""Relative Frobenius distance to the nearest rank-one matrix, $\sqrt{1 - s_1^2/\sum s^2}$
    (NaN for non-finite X)."""
    Xs, ok, _ = _tokens(X)
    return _nan_unless(ok, jnp.sqrt(jnp.clip(1.0 - jnp.max(_squared_spectrum(Xs)), 0.0, 1.0)))


def consensus_distance(X: Tokens) -> jax.Array:
    r"""$\lVert X - \mathbf 1 \bar x^\top\rVert_F/\lVert X\rVert_F$: 0 when every token is the same
    (NaN for non-finite X)."""
    X, ok, _ = _tokens(X)
    dev = X - jnp.mean(X, axis=0)
    return _nan_unless(ok, jnp.sqrt(jnp.sum(dev * dev) / jnp.maximum(jnp.sum(X * X), jnp.finfo(X.dtype).tiny)))


def mean_cosine(X: Tokens) -> jax.Array:
    r"""$\frac{1}{n(n-1)}\sum_{i\ne j}\cos(x_i,x_j)$, in O(nd) via $\lVert\sum_i u_i\rVert^2 = \sum_{ij}\langle u_i,u_j\rangle$
    (NaN for non-finite X)."""
    X, ok, _ = _tokens(X)
    n = X.shape[0]
    norms = jnp.linalg.norm(X, axis=-1, keepdims=True)
    U = X / jnp.maximum(norms, jnp.finfo(X.dtype).tiny)
    total = jnp.sum(jnp.sum(U, axis=0) ** 2)
    diag = jnp.sum(U * U)
    return _nan_unless(ok, (total - diag) / float(max(n * (n - 1), 1)))  # a Python int overflows int32 past n ~ 46341


def _pairwise_sq_dists(A, B):
    sq = jnp.sum(A * A, -1)[:, None] + jnp.sum(B * B, -1)[None, :] - 2.0 * A @ B.T
    return jnp.maximum(sq, 0.0)


def diameter(X: Tokens, *, block_size: int = 2048) -> jax.Array:
    r"""$\max_{i,j}\lVert x_i - x_j\rVert$, computed in row blocks (O(n^2 d) time, O(n * block) memory).

    Uses $\lVert x\rVert^2 + \lVert y\rVert^2 - 2\langle x,y\rangle$ on centred tokens; its absolute
    rounding error is about eps * max|x|^2, so in float32 distances below ~1e-3 |x| are
    resolved only to a few digits. NaN for X holding NaN or inf.
    """
    X, ok, k = _tokens(X)
    X = X - jnp.mean(X, axis=0)
    n = X.shape[0]
    b = min(block_size, n)
    nb = -(-n // b)
    Xp = jnp.pad(X, ((0, nb * b - n), (0, 0)))
    Xp = jnp.where((jnp.arange(nb * b) < n)[:, None], Xp, X[0])  # pad with a real token
    blocks = Xp.reshape(nb, b, -1)
    per_block = jax.lax.map(lambda blk: jnp.max(_pairwise_sq_dists(blk, X)), blocks)
    return _nan_unless(ok, jnp.ldexp(jnp.sqrt(jnp.max(per_block)), k))


def cluster_count(X: Tokens, tol: float = 1e-2) -> jax.Array:
    r"""Number of clusters: connected components of the graph linking tokens closer than
    `tol` times the RMS token norm (single linkage). Dense O(n^2) memory; meant for n up to a
    few thousand. On the sphere (RMS norm 1) `tol` is an absolute chordal distance.

    Returned as a float (X's float dtype; exact for counts below 2^24 in float32) so that it can
    be NaN: for X holding NaN or inf.
    """
    X0 = jnp.asarray(X)
    X, ok, _ = _tokens(X0)
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
    count = jnp.sum(labels == labels0).astype(jnp.promote_types(X0.dtype, jnp.float32))
    return _nan_unless(ok, count)


def empirical_mean(X: Tokens) -> Mean:
    """Mean token (d,); every entry NaN when X holds a NaN (an inf coordinate gives inf there)."""
    X = jnp.asarray(X)
    mean = jnp.mean(X, axis=0)
    return jnp.where(jnp.any(jnp.isnan(X)), jnp.asarray(jnp.nan, mean.dtype), mean)


def empirical_covariance(X: Tokens) -> Cov:
    r"""$\frac1n\sum_i (x_i-\bar x)(x_i-\bar x)^\top$ (the empirical measure's covariance, no Bessel
    factor); every entry NaN when X holds NaN or inf."""
    X = jnp.asarray(X)
    ok = _finite(X)
    Xz = _zeroed(X)
    dev = Xz - jnp.mean(Xz, axis=0)
    return _nan_unless(ok, dev.T @ dev / X.shape[0])


def cov_trace(S: Cov) -> jax.Array:
    r"""$\operatorname{tr} S$: NaN when S holds a NaN, or an inf anywhere but as +inf on the
    diagonal (an infinite variance, for which it is +inf)."""
    S = jnp.asarray(S)
    tr = jnp.trace(S)
    infinite_variance = ~jnp.any(jnp.isnan(S)) & (tr == jnp.inf)
    return jnp.where(_finite(S) | infinite_variance, tr, jnp.asarray(jnp.nan, tr.dtype))


def _cov(S) -> tuple[jax.Array, jax.Array]:
    """(S with non-finite entries zeroed, all-finite flag)."""
    S = jnp.asarray(S)
    return _zeroed(S), _finite(S)


def cov_logdet(S: Cov) -> jax.Array:
    r"""$\log\det S$ (-inf when S is singular to rounding; NaN when S holds NaN or inf)."""
    S, ok = _cov(S)
    lam = eigvalsh(S)
    return _nan_unless(ok, jnp.where(jnp.all(lam > 0), jnp.sum(jnp.log(jnp.where(lam > 0, lam, 1.0))), -jnp.inf))


def cov_condition(S: Cov) -> jax.Array:
    r"""$\lambda_\max/\lambda_\min$ of S (inf when singular; NaN when S holds NaN or inf)."""
    S, ok = _cov(S)
    lam = eigvalsh(S)
    return _nan_unless(ok, jnp.where(lam[0] > 0, lam[-1] / jnp.where(lam[0] > 0, lam[0], 1.0), jnp.inf))


def numerical_rank(S: Cov, rtol: float | None = None) -> jax.Array:
    r"""Number of eigenvalues of S above `rtol` * lambda_max (default 100 d eps), as a float in S's
    dtype (NaN when S holds NaN or inf)."""
    S, ok = _cov(S)
    d = S.shape[-1]
    lam = eigvalsh(S)
    rtol = 100 * d * jnp.finfo(S.dtype).eps if rtol is None else rtol
    count = jnp.sum(lam > rtol * jnp.max(jnp.abs(lam))).astype(jnp.promote_types(S.dtype, jnp.float32))
    return _nan_unless(ok, count)


def _second_moment_spectrum(m: Mean, S: Cov) -> tuple[jax.Array, jax.Array]:
    """(normalised eigenvalues of G = mm^T + S, all-finite flag of (m, S)); G is rescaled by an
    exact power of two (m by 2^-k, S by 2^-2k) when its entries would over/underflow."""
    m, S = jnp.asarray(m), jnp.asarray(S)
    chex.assert_shape([m, S], [(m.shape[-1],), (m.shape[-1], m.shape[-1])])  # one unbatched (d,), (d, d) state
    ok = _finite(m, S)
    m, S = _zeroed(m), _zeroed(S)
    big = jnp.maximum(jnp.max(jnp.abs(m)), jnp.sqrt(jnp.max(jnp.abs(S))))
    k = _pow2_exponent(big, S.dtype)
    m, S = jnp.ldexp(m, -k), jnp.ldexp(S, -2 * k)
    lam = jnp.clip(eigvalsh(S + jnp.outer(m, m)), 0.0, None)
    return lam / jnp.maximum(jnp.sum(lam), jnp.finfo(S.dtype).tiny), ok


def gaussian_effective_rank(m: Mean, S: Cov) -> jax.Array:
    r"""Effective rank of $G = mm^\top + S$ (the n -> inf limit of `effective_rank` for i.i.d. tokens);
    NaN when m or S holds NaN or inf."""
    p, ok = _second_moment_spectrum(m, S)
    return _nan_unless(ok, entropy_rank(p))


def gaussian_rank_one_distance(m: Mean, S: Cov) -> jax.Array:
    r"""$\sqrt{1 - \lambda_1(G)/\operatorname{tr}G}$, $G = mm^\top + S$ (limit of `rank_one_distance`);
    NaN when m or S holds NaN or inf."""
    p, ok = _second_moment_spectrum(m, S)
    return _nan_unless(ok, jnp.sqrt(jnp.clip(1.0 - jnp.max(p), 0.0, 1.0)))


def rms_norm(X: Tokens) -> jax.Array:
    r"""$\sqrt{\frac1n\sum_i |x_i|^2}$: the token scale, used for growth / blow-up. NaN when X holds
    a NaN, inf when it holds an inf (and no NaN)."""
    X = jnp.asarray(X)
    Xs, ok, k = _tokens(X)
    r = jnp.ldexp(jnp.sqrt(jnp.mean(jnp.sum(Xs * Xs, axis=-1))), k)
    bad = jnp.where(jnp.any(jnp.isnan(X)), jnp.asarray(jnp.nan, r.dtype), jnp.asarray(jnp.inf, r.dtype))
    return jnp.where(ok, r, bad)


def mean_norm(m: Mean) -> jax.Array:
    r"""$\lVert m\rVert$: the norm of a Gaussian's mean."""
    return jnp.linalg.norm(m, axis=-1)


@dataclass(frozen=True)
class Observable:
    """One scalar observable: how to compute it per state kind, and its CF `long_name` / `units`.

    `particles`: X (n, d) -> scalar; `gaussian`: (m, S) -> scalar; `shaped_sde`: a statistic of the
    shaped SDE's kernel paths (computed by its sweep point function, `meanfield.sweep.points`).
    """

    long_name: str
    units: str
    particles: Callable[[Tokens], jax.Array] | None = None
    gaussian: Callable[[Mean, Cov], jax.Array] | None = None
    shaped_sde: bool = False

    @property
    def kinds(self) -> tuple[str, ...]:
        """The simulators (`particles`, `gaussian`, `shaped_sde`) that can record it."""
        return tuple(k for k, v in (("particles", self.particles), ("gaussian", self.gaussian),
                                    ("shaped_sde", self.shaped_sde)) if v)


def _of_cov(f):
    return lambda m, S: f(S)


OBSERVABLES: dict[str, Observable] = {
    "effective_rank": Observable("effective rank exp(H(s^2/sum s^2))", "1", effective_rank, gaussian_effective_rank),
    "stable_rank": Observable("stable rank ||X||_F^2/||X||_2^2", "1", stable_rank),
    "rank_one_distance": Observable("relative distance to rank one", "1", rank_one_distance, gaussian_rank_one_distance),
    "consensus_distance": Observable("relative distance to consensus", "1", consensus_distance),
    "mean_cosine": Observable("mean pairwise cosine", "1", mean_cosine),
    "diameter": Observable("token diameter max |x_i - x_j|", "token units", diameter),
    "rms_norm": Observable("RMS token norm", "token units", rms_norm),
    "cov_trace": Observable("tr S", "token units^2", lambda X: cov_trace(empirical_covariance(X)), _of_cov(cov_trace)),
    "cov_logdet": Observable("log det S", "1", gaussian=_of_cov(cov_logdet)),
    "cov_condition": Observable("condition number of S", "1", gaussian=_of_cov(cov_condition)),
    "numerical_rank": Observable("numerical rank of S", "1", gaussian=_of_cov(numerical_rank)),
    "mean_norm": Observable("|m|", "token units", gaussian=lambda m, S: mean_norm(m)),
    "cluster_count": Observable("number of clusters", "1", cluster_count),
    "corr_mean": Observable("mean correlation rho_ab", "1", shaped_sde=True),
    "corr_q10": Observable("10% quantile of rho_ab", "1", shaped_sde=True),
    "corr_q90": Observable("90% quantile of rho_ab", "1", shaped_sde=True),
    "min_eig": Observable("smallest kernel eigenvalue over paths (< 0: Euler-Maruyama left the PSD cone)", "1",
                          shaped_sde=True),
    "exploded_fraction": Observable("fraction of SDE paths exploded (tr V > threshold) by t1", "1", shaped_sde=True),
}
"""Name -> `Observable`: the one list of observables a sweep may record (and their CF attributes)."""


def observable_names(kind: str) -> tuple[str, ...]:
    """The observables the simulator `kind` (`particles`, `gaussian`, `shaped_sde`) can record."""
    return tuple(name for name, o in OBSERVABLES.items() if kind in o.kinds)


PARTICLE_OBSERVABLES = {name: o.particles for name, o in OBSERVABLES.items()
                        if o.particles is not None and name != "cluster_count"}
"""Name -> scalar observable of tokens X: the particle observables of `OBSERVABLES` but
`cluster_count` (a dense O(n^2) while-loop): `particle_observables`' default set."""


def particle_observables(X: Tokens, names=tuple(PARTICLE_OBSERVABLES)) -> dict:
    """A dict of the named scalar observables of X (a ready `save_fn`)."""
    return {name: OBSERVABLES[name].particles(X) for name in names}
