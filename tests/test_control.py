import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield as mf
from meanfield.control import bures_wasserstein, psd_rank, steer, transport_flow


def test_bures_wasserstein_closed_forms(x64):
    m, m1 = jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0])
    S, S1 = jnp.diag(jnp.array([1.0, 4.0])), jnp.diag(jnp.array([4.0, 1.0]))
    # commuting covariances: |m - m1|^2 + sum (sqrt(a) - sqrt(b))^2 = 1 + 1 + 1
    assert abs(float(bures_wasserstein(m, S, m1, S1, squared=True)) - 3.0) < 1e-12
    assert float(bures_wasserstein(m, S, m, S)) < 1e-7
    # rank-deficient: S1 = u u^T, S = v v^T: W2^2 = |u|^2 + |v|^2 - 2 |<u, v>|
    u, v = jnp.array([1.0, 2.0]), jnp.array([2.0, -0.5])
    w2 = bures_wasserstein(m, jnp.outer(v, v), m, jnp.outer(u, u), squared=True)
    assert abs(float(w2) - (5.0 + 4.25 - 2 * 1.0)) < 1e-12
    assert float(bures_wasserstein(m, jnp.outer(u, u), m, jnp.outer(u, u))) < 1e-7
    g = jax.grad(lambda S: bures_wasserstein(m, S, m, jnp.outer(u, u), squared=True))(jnp.outer(v, v))
    assert bool(jnp.all(jnp.isfinite(g)))


def test_transport_flow_maps_covariances(x64):
    rng = np.random.default_rng(0)
    for r in (3, 2, 1):
        A, B = rng.normal(size=(3, r)), rng.normal(size=(3, r))
        S0, S1 = A @ A.T, B @ B.T
        G, T = transport_flow(S0, S1, r)
        np.testing.assert_allclose(T @ G @ S0 @ G.T @ T.T, S1, atol=1e-10)
        assert np.linalg.det(G) > 0 and np.all(np.linalg.eigvalsh(T) > 0)


def test_rank_change_refused_before_optimising(x64):
    with pytest.raises(ValueError, match="rank"):
        steer(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, 0.0]), 1.0)


@pytest.mark.slow
def test_steer_reaches_target_and_verifies(x64):
    m0, S0 = np.array([0.0, 0.0]), np.array([[1.0, 0.3], [0.3, 0.5]])
    m1, S1 = np.array([1.0, -0.5]), np.array([[0.4, -0.2], [-0.2, 1.2]])
    res = steer(m0, S0, m1, S1, 1.0, K=4)
    assert res.distance < 1e-3 and res.optimiser_distance < 1e-4
    # independent check of the returned piecewise model
    sol = mf.simulate_gaussian(res.model, m0, S0, 1.0, rtol=1e-9, atol=1e-11)
    assert float(bures_wasserstein(sol.means[-1], sol.covs[-1], m1, S1)) < 1e-3
    assert res.model.n_layers == 4 and res.covs.shape == (101, 2, 2)
    assert res.history[-1] <= res.history[0]


@pytest.mark.slow
def test_steer_rank_deficient_and_3d(x64):
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(3, 2)) / 2, rng.normal(size=(3, 2)) / 2
    res = steer(rng.normal(size=3), A @ A.T, rng.normal(size=3), B @ B.T, 1.0, K=4)
    assert res.distance < 1e-3
    assert psd_rank(res.covs[-1]) == 2
    C, D = rng.normal(size=(3, 3)) / 2, rng.normal(size=(3, 3)) / 2
    res = steer(np.zeros(3), C @ C.T + 0.1 * np.eye(3), np.ones(3), D @ D.T + 0.1 * np.eye(3), 1.0,
                controls=("W", "b"))
    assert res.distance < 1e-3
