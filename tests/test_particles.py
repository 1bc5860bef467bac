import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import expm

import meanfield as mf


def _linear_model(A, dtype=None):
    """dx/dt = A x: attention off, affine MLP with W = A, b = 0."""
    return mf.Model(attention="none", W=A, mlp="affine", dtype=dtype)


def test_rk4_fourth_order_on_linear_flow(x64, key):
    """Global error of RK4 on dx/dt = A x scales as dt^4: halving dt divides it by ~16."""
    A = jax.random.normal(key, (3, 3), jnp.float64)
    model = _linear_model(A, "float64")
    X0 = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    exact = X0 @ expm(A * 1.0).T
    errs = []
    for dt in (0.1, 0.05, 0.025):
        sol = mf.simulate_particles(model, X0, 1.0, solver="rk4", dt0=dt, n_save=2)
        errs.append(float(jnp.max(jnp.abs(sol.xs[-1] - exact))))
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(12.0 < r < 20.0 for r in ratios), (errs, ratios)


def test_adaptive_solver_matches_matrix_exponential(x64, key):
    A = jax.random.normal(key, (3, 3), jnp.float64)
    X0 = jax.random.normal(jax.random.key(2), (5, 3), jnp.float64)
    sol = mf.simulate_particles(_linear_model(A, "float64"), X0, 2.0, ts=jnp.array([0.0, 0.7, 2.0]))
    for t, X in zip(sol.ts, sol.xs):
        np.testing.assert_allclose(X, X0 @ expm(A * t).T, rtol=1e-7, atol=1e-8)
    assert sol.xs.dtype == jnp.float64 and bool(sol.success)


def test_piecewise_depth_schedule_is_a_product_of_exponentials(x64, key):
    A1, A2 = jax.random.normal(key, (2, 3, 3), jnp.float64)
    model = mf.Model.piecewise([_linear_model(A1, "float64"), _linear_model(A2, "float64")], times=[0.6])
    X0 = jax.random.normal(jax.random.key(3), (4, 3), jnp.float64)
    sol = mf.simulate_particles(model, X0, 1.5, n_save=2)
    exact = X0 @ (expm(A2 * 0.9) @ expm(A1 * 0.6)).T
    np.testing.assert_allclose(sol.xs[-1], exact, rtol=1e-7, atol=1e-8)


def test_sphere_norm_is_preserved_float32(key):
    """|x| stays 1 up to the solver's local error (rtol 3e-6 per step).

    The Runge-Kutta stages are tangent at their own points, not at x, so each step moves |x| by
    its truncation error: 0.7-1.6e-5 after 56-177 steps to t = 50 over six model seeds (float32)."""
    model = mf.Model.random(key, 3, norm="sphere", beta=2.0)
    X0 = mf.sphere_uniform(jax.random.key(5), 32, 3)
    sol = mf.simulate_particles(model, X0, 50.0, n_save=51)
    assert sol.xs.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(jnp.linalg.norm(sol.xs, axis=-1) - 1.0))) < 2e-5


@pytest.mark.parametrize("causal, T", [(False, 15.0), (True, 30.0)])
def test_consensus_on_sphere(causal, T):
    """V = Q = K = I on S^2, tokens in an open hemisphere: all tokens meet (Abella et al. 2024).

    Diameter below 1e-3 by t = 15 (full attention) and t = 30 (causal, token 1 leads).
    """
    I = jnp.eye(3)
    model = mf.Model(Q=I, K=I, V=I, norm="sphere", causal=causal)
    X0 = mf.hemisphere(jax.random.key(0), 32, 3)
    assert float(jnp.min(X0[:, 0])) > 0
    sol = mf.simulate_particles(model, X0, T, n_save=2)
    assert float(mf.metrics.diameter(sol.xs[-1])) < 1e-3
    if causal:  # the leader never moves: its velocity is P_x1(V x1) = 0
        np.testing.assert_allclose(sol.xs[-1][0], X0[0], atol=1e-5)


def test_vmap_over_models_and_initial_conditions(key):
    keys = jax.random.split(key, 3)
    models = [mf.Model.random(k, 3, beta=1.0 + i) for i, k in enumerate(keys)]
    X0s = [jax.random.normal(k, (8, 3)) for k in jax.random.split(jax.random.key(7), 3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
    batched = jax.vmap(lambda m, x: mf.simulate_particles(m, x, 1.0, n_save=3).xs)(stacked, jnp.stack(X0s))
    for i in range(3):
        single = mf.simulate_particles(models[i], X0s[i], 1.0, n_save=3).xs
        np.testing.assert_allclose(batched[i], single, rtol=1e-5, atol=1e-6)


def test_save_fn_and_unpacking(key):
    model = mf.Model.random(key, 3, norm="sphere")
    X0 = mf.sphere_uniform(key, 16, 3)
    ts, obs = mf.simulate_particles(model, X0, 2.0, n_save=5, save_fn=mf.metrics.particle_observables)
    assert ts.shape == (5,) and obs["effective_rank"].shape == (5,)
    full = mf.simulate_particles(model, X0, 2.0, n_save=5)
    np.testing.assert_allclose(obs["effective_rank"], jax.vmap(mf.metrics.effective_rank)(full.xs), rtol=1e-5)


def test_dense_output(key):
    model = mf.Model.random(key, 2)
    X0 = jax.random.normal(key, (4, 2))
    sol = mf.simulate_particles(model, X0, 1.0, ts=jnp.array([0.0, 0.5, 1.0]), dense=True)
    np.testing.assert_allclose(sol.evaluate(0.5), sol.xs[1], rtol=1e-4, atol=1e-5)


def test_input_validation(key):
    model = mf.Model.random(key, 3)
    with pytest.raises(ValueError, match="X0"):
        mf.simulate_particles(model, jnp.ones((4, 2)), 1.0)
    with pytest.raises(ValueError, match="dt0"):
        mf.simulate_particles(model, jnp.ones((4, 3)), 1.0, solver="rk4")
    with pytest.raises(ValueError, match="solver"):
        mf.simulate_particles(model, jnp.ones((4, 3)), 1.0, solver="rk45")


def test_blowup_event_stops_an_exploding_run(key):
    """dx/dt = 5x: the RMS norm crosses 1e8 x its start at t = ln(1e8)/5 = 3.684; the solve stops
    there (end of that step) instead of overflowing until max_steps."""
    model = _linear_model(5.0 * jnp.eye(2))
    X0 = jax.random.normal(key, (6, 2))
    sol = mf.simulate_particles(model, X0, 20.0, n_save=201)
    assert bool(sol.blown_up) and bool(sol.success)
    assert np.log(1e8) / 5 <= float(sol.t_end) < np.log(1e8) / 5 + 0.2
    reached = np.asarray(sol.ts) <= float(sol.t_end)
    assert np.all(np.isfinite(sol.xs[reached])) and np.all(np.isinf(sol.xs[~reached]))
    assert int(sol.num_steps) < 200
    assert int(mf.classify(sol)) == mf.REGIMES.index("blowup")
    free = mf.simulate_particles(model, X0, 2.0, n_save=3, blowup_growth=None)
    np.testing.assert_allclose(free.xs[-1], X0 * np.exp(10.0), rtol=1e-4)


def test_failure_is_reported_not_raised(key):
    model = mf.Model.random(key, 3)
    sol = mf.simulate_particles(model, jax.random.normal(key, (4, 3)), 10.0, max_steps=2)
    assert not bool(sol.success)


@pytest.mark.slow
def test_65536_tokens_take_an_rk4_step(key):
    """n = 65,536, d = 16: blocked attention keeps memory O(n); one RK4 step completes.

    The first rows of the blocked field are checked against the dense formula on those rows.
    """
    n, d = 65_536, 16
    model = mf.Model.random(key, d, beta=0.5)
    X0 = jax.random.normal(jax.random.key(1), (n, d)) / np.sqrt(d)
    F = mf.token_velocity(model, X0)
    assert F.shape == (n, d) and bool(jnp.all(jnp.isfinite(F)))
    rows = X0[:64]
    w = jax.nn.softmax(model.beta * (rows @ model.Q.T) @ (X0 @ model.K.T).T, axis=-1)
    dense_rows = w @ (X0 @ model.V.T) + mf.mlp(model, rows)
    np.testing.assert_allclose(F[:64], dense_rows, rtol=1e-4, atol=1e-5)
    sol = mf.simulate_particles(model, X0, 0.05, solver="rk4", dt0=0.05, n_save=2)
    assert bool(sol.success) and bool(jnp.all(jnp.isfinite(sol.xs[-1])))
