import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield as mf
from meanfield import metrics


def test_rank_metrics_against_numpy(key):
    X = np.asarray(jax.random.normal(key, (40, 5)) * jnp.array([3.0, 2.0, 1.0, 0.5, 0.1]))
    s = np.linalg.svd(X.astype(np.float64), compute_uv=False)
    p = s**2 / np.sum(s**2)
    np.testing.assert_allclose(metrics.effective_rank(X), np.exp(-np.sum(p * np.log(p))), rtol=1e-5)
    np.testing.assert_allclose(metrics.stable_rank(X), 1 / p[0], rtol=1e-5)
    # Eckart-Young: distance to the truncated SVD.
    U, s_, Vt = np.linalg.svd(X.astype(np.float64), full_matrices=False)
    X1 = s_[0] * np.outer(U[:, 0], Vt[0])
    np.testing.assert_allclose(metrics.rank_one_distance(X), np.linalg.norm(X - X1) / np.linalg.norm(X), rtol=1e-5)
    np.testing.assert_allclose(
        metrics.consensus_distance(X), np.linalg.norm(X - X.mean(0)) / np.linalg.norm(X), rtol=1e-5
    )
    U_ = X / np.linalg.norm(X, axis=1, keepdims=True)
    C = U_ @ U_.T
    np.testing.assert_allclose(metrics.mean_cosine(X), (C.sum() - np.trace(C)) / (40 * 39), rtol=1e-4, atol=1e-6)
    D = np.linalg.norm(X[:, None] - X[None], axis=-1)
    np.testing.assert_allclose(metrics.diameter(X, block_size=7), D.max(), rtol=1e-5)


def test_rank_extremes():
    assert abs(float(metrics.effective_rank(jnp.eye(4))) - 4.0) < 1e-5
    X = jnp.outer(jnp.arange(1.0, 6.0), jnp.array([1.0, -2.0, 0.5]))
    assert abs(float(metrics.effective_rank(X)) - 1.0) < 1e-5
    assert float(metrics.rank_one_distance(X)) < 1e-3
    assert float(metrics.consensus_distance(jnp.ones((5, 3)))) == 0.0


def test_cluster_count(key):
    centres = jnp.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    X = jnp.repeat(centres, 10, axis=0) + 1e-4 * jax.random.normal(key, (30, 3))
    X = jax.random.permutation(jax.random.key(3), X)
    assert int(metrics.cluster_count(X, tol=1e-2)) == 3
    # A chain of tokens 0.005 apart is one cluster by single linkage.
    chain = jnp.stack([jnp.linspace(0, 1, 201), jnp.zeros(201), jnp.ones(201)], axis=1)
    assert int(metrics.cluster_count(chain, tol=1e-2)) == 1
    assert int(metrics.cluster_count(chain, tol=1e-4)) == 201


def test_covariance_statistics(x64, key):
    A = np.asarray(jax.random.normal(key, (4, 4), jnp.float64))
    S = A @ A.T + 0.1 * np.eye(4)
    lam = np.linalg.eigvalsh(S)
    np.testing.assert_allclose(metrics.cov_trace(S), lam.sum())
    np.testing.assert_allclose(metrics.cov_logdet(S), np.log(lam).sum())
    np.testing.assert_allclose(metrics.cov_condition(S), lam[-1] / lam[0], rtol=1e-10)
    assert int(metrics.numerical_rank(S)) == 4
    B = A[:, :2]
    assert int(metrics.numerical_rank(B @ B.T)) == 2
    assert float(metrics.cov_logdet(B @ B.T)) == -np.inf and float(metrics.cov_condition(B @ B.T)) == np.inf


def test_gaussian_observables_are_the_large_n_limit(x64, key):
    m = jnp.array([1.0, -0.5, 0.2])
    S = jnp.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.2]])
    X = mf.gaussian_tokens(key, 200_000, m, S, dtype=jnp.float64)
    np.testing.assert_allclose(metrics.effective_rank(X), metrics.gaussian_effective_rank(m, S), rtol=5e-3)
    np.testing.assert_allclose(metrics.rank_one_distance(X), metrics.gaussian_rank_one_distance(m, S), rtol=5e-3)
    np.testing.assert_allclose(metrics.empirical_covariance(X), S, atol=1e-2)


def test_initial_conditions(key):
    X = mf.hemisphere(key, 500, 3, direction=[0.0, 0.0, 1.0])
    np.testing.assert_allclose(jnp.linalg.norm(X, axis=1), 1.0, atol=1e-6)
    assert float(jnp.min(X[:, 2])) > 0
    np.testing.assert_array_equal(mf.sphere_uniform(key, 5, 3), mf.sphere_uniform(key, 5, 3))


def test_classify_particles(key):
    I = jnp.eye(3)
    consensus = mf.Model(Q=I, K=I, V=I, norm="sphere")
    X0 = mf.hemisphere(key, 16, 3)
    assert int(mf.classify(mf.simulate_particles(consensus, X0, 20.0, n_save=2))) == mf.REGIMES.index("collapse")
    rotation = mf.Model(attention="none", W=jnp.array([[0, 1.0, 0], [-1.0, 0, 0], [0, 0, 0]]), mlp="affine")
    X = jax.random.normal(key, (16, 3))
    assert int(mf.classify(mf.simulate_particles(rotation, X, 5.0, n_save=2))) == mf.REGIMES.index("stable")
    growth = mf.Model(attention="none", W=3.0 * I, mlp="affine")
    assert int(mf.classify(mf.simulate_particles(growth, X, 6.0, n_save=2))) == mf.REGIMES.index("blowup")


def test_classify_rejects_observable_runs(key):
    model = mf.Model.random(key, 2)
    sol = mf.simulate_particles(model, jnp.ones((3, 2)), 1.0, n_save=2, save_fn=metrics.rms_norm)
    with pytest.raises(ValueError, match="observables"):
        mf.classify(sol)


def test_mean_cosine_beyond_int32_pair_counts():
    """n (n - 1) > 2^31 (n = 50,000): the pair count must not overflow (it did as a Python int)."""
    X = jnp.tile(jnp.asarray([[0.6, 0.8]], jnp.float32), (50_000, 1))
    assert abs(float(mf.metrics.mean_cosine(X)) - 1.0) < 1e-3


def test_observable_registry_is_the_one_list(key):
    """Every observable has CF attributes and a function for each simulator it names; the sweep
    config's choices and `particle_observables` are read from it."""
    from meanfield.sweep.config import DEFAULT_OBSERVABLES

    X = jax.random.normal(key, (12, 3))
    m, S = jnp.array([0.3, -0.1, 0.2]), jnp.diag(jnp.array([1.0, 0.5, 0.1]))
    for name, o in metrics.OBSERVABLES.items():
        assert o.long_name and o.units and o.kinds, name
        if o.particles is not None:
            assert jnp.shape(o.particles(X)) == ()
        if o.gaussian is not None:
            assert jnp.shape(o.gaussian(m, S)) == ()
    for kind, names in DEFAULT_OBSERVABLES.items():
        assert set(names) <= set(metrics.observable_names(kind)), kind
    assert metrics.OBSERVABLES["effective_rank"].gaussian(m, S) == metrics.gaussian_effective_rank(m, S)
    assert set(metrics.particle_observables(X)) == set(metrics.observable_names("particles")) - {"cluster_count"}


def test_particle_regime_is_the_rule_of_classify(key):
    """The sweep's particle rule (`particle_regime` on saved observables) equals `classify` on the tokens."""
    from meanfield.regimes.observed import judged_save, particle_regime

    model = mf.Model.random(key, 2, norm="sphere")
    X0 = mf.sphere_uniform(jax.random.fold_in(key, 1), 8, 2)
    sol = mf.simulate_particles(model, X0, 2.0, n_save=5)
    reached = jnp.all(jnp.isfinite(sol.xs), axis=(-2, -1))
    last = judged_save(reached, sol.blown_up)
    r1 = jax.vmap(metrics.rank_one_distance)(sol.xs)
    rms = jax.vmap(metrics.rms_norm)(sol.xs)
    code = particle_regime(r1[last], rms[last], rms[0], sol.blown_up, failed=~sol.success)
    assert int(code) == int(mf.classify(sol))
