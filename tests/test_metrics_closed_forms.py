"""Observables against closed forms, each run with and without `jax.jit` (chex.variants): tokens
X = U diag(s) V^T with chosen singular values s, and Gaussian moments with a chosen spectrum."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import meanfield as mf

S = np.array([3.0, 2.0, 1.0, 0.5])


def _tokens_with_spectrum(s, n=12, seed=0):
    """An (n, d) matrix with singular values `s` (random orthonormal U (n, d) and V (d, d))."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    V, _ = np.linalg.qr(rng.standard_normal((len(s), len(s))))
    return jnp.asarray((U * s) @ V.T, jnp.float32)


def _entropy_rank(p):
    p = p / p.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


class TokenObservables(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_rank_measures_of_a_known_spectrum(self):
        X = _tokens_with_spectrum(S)
        got = self.variant(lambda X: {"effective_rank": mf.metrics.effective_rank(X),
                                      "stable_rank": mf.metrics.stable_rank(X),
                                      "rank_one_distance": mf.metrics.rank_one_distance(X)})(X)
        p = S**2 / np.sum(S**2)
        want = {"effective_rank": _entropy_rank(p), "stable_rank": float(np.sum(S**2) / S[0] ** 2),
                "rank_one_distance": float(np.sqrt(1.0 - p[0]))}
        chex.assert_trees_all_close(got, jax.tree.map(lambda v: jnp.float32(v), want), rtol=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_consensus_and_orthogonal_tokens(self):
        same = jnp.tile(jnp.array([[1.0, -2.0, 0.5]]), (7, 1))
        ortho = jnp.eye(5, dtype=jnp.float32)
        got = self.variant(lambda A, B: (mf.metrics.consensus_distance(A), mf.metrics.rank_one_distance(A),
                                         mf.metrics.mean_cosine(B), mf.metrics.effective_rank(B)))(same, ortho)
        chex.assert_trees_all_close((got[0], got[2], got[3]), (0.0, 0.0, 5.0), atol=1e-6, rtol=1e-6)
        # sqrt(1 - s_1^2 / sum s^2) of a rank-one matrix sits at sqrt(float32 rounding), ~3e-4, far below
        # the collapse threshold 1e-2.
        chex.assert_trees_all_close(got[1], 0.0, atol=1e-3)

    @parameterized.parameters((1e-20,), (1.0,), (1e20,))
    def test_scale_free_across_float32_range(self, scale):
        """Rank measures do not depend on the tokens' scale, far past where X^T X would overflow."""
        X = _tokens_with_spectrum(S) * jnp.float32(scale)
        p = S**2 / np.sum(S**2)
        chex.assert_trees_all_close(
            (mf.metrics.effective_rank(X), mf.metrics.rank_one_distance(X)),
            (jnp.float32(_entropy_rank(p)), jnp.float32(np.sqrt(1 - p[0]))), rtol=2e-5)


class GaussianObservables(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_second_moment_spectrum(self):
        """G = m m^T + S with m = a e_1 and S = diag(lam): eigenvalues (lam_1 + a^2, lam_2, ...)."""
        lam = np.array([1.0, 0.5, 0.25])
        a = 2.0
        m = jnp.array([a, 0.0, 0.0], jnp.float32)
        got = self.variant(lambda m, S: (mf.metrics.gaussian_effective_rank(m, S),
                                         mf.metrics.gaussian_rank_one_distance(m, S)))(m, jnp.diag(lam).astype(jnp.float32))
        g = np.array([lam[0] + a**2, lam[1], lam[2]])
        p = g / g.sum()
        chex.assert_trees_all_close(got, (jnp.float32(_entropy_rank(p)), jnp.float32(np.sqrt(1 - p[0]))), rtol=2e-5)
        chex.assert_shape(got, ((), ()))
