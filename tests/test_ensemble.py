"""The ensemble integrator: every lane of a batched call is its own single solve (same tableau,
controller, tolerance), whatever the other lanes do; closed forms hold through the batched path."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import expm

import meanfield as mf


def _stack(models):
    return jax.tree.map(lambda *a: jnp.stack(a), *models)


def _linear(A, dtype="float64"):
    """dx/dt = A x (attention off, affine MLP W = A)."""
    return mf.Model(attention="none", W=A, mlp="affine", dtype=dtype)


def _mixed_linear_batch(key, B=12):
    """Lanes of very different cost: slow decays, fast rotations (many steps), and exponential growth
    that trips the blow-up event."""
    keys = jax.random.split(key, B)
    As = []
    for i, k in enumerate(keys):
        A = 0.5 * jax.random.normal(k, (2, 2), jnp.float64)
        if i % 4 == 1:  # rotation at angular speed 10-40: hundreds of steps
            w = 10.0 * (1 + i // 4)
            A = A + jnp.array([[0.0, w], [-w, 0.0]])
        if i % 4 == 3:  # growth rate 8: RMS norm x 1e3 near t = 0.86
            A = A + 8.0 * jnp.eye(2)
        As.append(A)
    X0 = jax.random.normal(jax.random.key(1), (B, 3, 2), jnp.float64)
    return As, X0


def test_each_lane_equals_its_single_solve(x64, key):
    As, X0 = _mixed_linear_batch(key)
    kw = dict(n_save=9, blowup_growth=1e3)
    batch = mf.simulate_particles(_stack([_linear(A) for A in As]), X0, 2.0, lanes=4, **kw)
    assert batch.xs.shape == (12, 9, 3, 2) and batch.ts.shape == (9,) and batch.num_steps.shape == (12,)
    np.testing.assert_array_equal(batch.final, batch.xs[:, -1])  # every point's last save, not the last point
    steps = []
    for i, A in enumerate(As):
        single = mf.simulate_particles(_linear(A), X0[i], 2.0, **kw)
        assert bool(batch.blown_up[i]) == bool(single.blown_up) == (i % 4 == 3)
        assert bool(batch.success[i]) and bool(single.success)
        np.testing.assert_allclose(batch.t_end[i], single.t_end, rtol=1e-9)
        reached = np.isfinite(np.asarray(single.xs[:, 0, 0]))
        np.testing.assert_array_equal(np.isfinite(np.asarray(batch.xs[i, :, 0, 0])), reached)
        np.testing.assert_allclose(batch.xs[i][reached], single.xs[reached], rtol=1e-7, atol=1e-9)
        # ... and the closed form x(t) = exp(A t) x0 at every reached save.
        exact = np.stack([np.asarray(X0[i] @ expm(A * t).T) for t in np.asarray(batch.ts)[reached]])
        np.testing.assert_allclose(batch.xs[i][reached], exact, rtol=1e-6, atol=1e-8)
        steps.append((int(batch.num_steps[i]), int(single.num_steps)))
        steps.append((int(batch.num_attempts[i]), int(single.num_attempts)))
        assert int(batch.num_attempts[i]) >= int(batch.num_steps[i])
    # The same steps and attempts (measured: identical; one step of slack for rounding at an accept/reject boundary).
    for b, s in steps:
        assert abs(b - s) <= 1, steps
    counts = [s for _, s in steps[::2]]
    assert max(counts) > 5 * min(counts)  # lanes of very different cost shared the pool


def test_per_point_depths_are_refused_where_they_do_not_fit(key):
    """t1 of shape (B,): the batch's length, a batched call, no `ts`, every depth > t0; errors name them."""
    model = mf.Model.random(key, 2)
    X0 = jnp.ones((3, 4, 2))
    m0, S0 = jnp.zeros((3, 2)), jnp.broadcast_to(jnp.eye(2), (3, 2, 2))
    affine = mf.Model.random(key, 2, mlp="affine")
    for call in (lambda t1, **kw: mf.simulate_particles(model, X0, t1, **kw),
                 lambda t1, **kw: mf.simulate_gaussian(affine, m0, S0, t1, **kw)):
        with pytest.raises(ValueError, match="`t1` holds 2 depths for a batch of 3"):
            call(jnp.array([1.0, 2.0]))
        with pytest.raises(ValueError, match=r"`t1` must be > `t0` = 0 for every point.*t1\[1\] = -1"):
            call(jnp.array([1.0, -1.0, 2.0]))
        with pytest.raises(ValueError, match="`ts` cannot be given with one `t1` per point"):
            call(jnp.array([1.0, 2.0, 3.0]), ts=jnp.linspace(0.0, 0.5, 3))
        with pytest.raises(ValueError, match=r"`t1` must be one depth, or one per point.*shape \(3, 1\)"):
            call(jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="in a single solve"):
        mf.simulate_particles(model, X0[0], jnp.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="in a single solve"):
        mf.simulate_gaussian(affine, m0[0], S0[0], jnp.array([1.0, 2.0, 3.0]))


def test_max_steps_lanes_fail_alone(x64, key):
    """A lane that runs out of steps stops there (success False, later saves inf) without holding
    the others; its saves up to where it stopped equal the single solve's."""
    As, X0 = _mixed_linear_batch(key, B=8)
    kw = dict(n_save=9, blowup_growth=None, max_steps=60)
    batch = mf.simulate_particles(_stack([_linear(A) for A in As]), X0, 2.0, lanes=3, **kw)
    failed = 0
    for i, A in enumerate(As):
        single = mf.simulate_particles(_linear(A), X0[i], 2.0, **kw)
        assert bool(batch.success[i]) == bool(single.success)
        failed += not bool(single.success)
        if not bool(single.success):
            assert float(batch.t_end[i]) < 2.0
            assert abs(float(batch.t_end[i]) - float(single.t_end)) < 1e-6
            assert int(batch.num_attempts[i]) == int(single.num_attempts) == 60  # the budget, spent
        reached = np.isfinite(np.asarray(single.xs[:, 0, 0]))
        np.testing.assert_allclose(batch.xs[i][reached], single.xs[reached], rtol=1e-7, atol=1e-9)
        assert not np.any(np.isfinite(np.asarray(batch.xs[i][~reached])))
    assert 0 < failed < len(As)


def test_a_step_below_the_time_resolution_stops_every_path_alike():
    """dx/dt = -1e5 x from t0 = 1024 in float32: stability needs steps under 3.5e-5, and one ulp of t
    is 1.2e-4. Without the stall guard the solve spins (zero-length steps, accepted with zero error,
    then a grown step rejected) until max_steps; with it the solve stops within a few attempts with
    `dt_min_reached`, and each lane of a batch stops where its single solve does while the easy
    lanes finish."""
    import diffrax

    rates = [1e5, 1.0, 1e5, 2.0]
    X0 = jnp.ones((4, 3, 2), jnp.float32)
    kw = dict(t0=1024.0, n_save=3, blowup_growth=None, max_steps=100_000)
    batch = mf.simulate_particles(_stack([_linear(-r * jnp.eye(2), "float32") for r in rates]), X0, 1025.0,
                                  lanes=2, **kw)
    for i, r in enumerate(rates):
        single = mf.simulate_particles(_linear(-r * jnp.eye(2), "float32"), X0[i], 1025.0, **kw)
        stiff = r > 10
        assert bool(single.success) == bool(batch.success[i]) == (not stiff)
        assert float(batch.t_end[i]) == float(single.t_end) == (1024.0 if stiff else 1025.0)
        assert int(batch.num_steps[i]) == int(single.num_steps)
        if stiff:
            assert single.solution.result == diffrax.RESULTS.dt_min_reached
            assert int(single.solution.stats["num_steps"]) < 20  # attempts, against 100,000 without the guard
            assert not np.any(np.isfinite(np.asarray(batch.xs[i, 1:])))
        else:
            np.testing.assert_allclose(batch.xs[i, -1], np.exp(-r) * np.ones((3, 2)), rtol=1e-4)


@pytest.mark.parametrize("scaled_error, repeats", [(1.37, True), (3.0, False)])
def test_stall_guard_stops_exactly_when_the_retry_repeats_the_rejected_step(scaled_error, repeats):
    """A rejected 3-ulp step at t = 1024 (float32). At scaled error 1.37 the PID controller's smaller
    step (x 0.85) rounds back to the same end point, so the retry would be the same step from the same
    state forever: the guard stops there. At 3.0 (x 0.72) the step shrinks to 2 ulp and the guard
    stays silent."""
    import diffrax

    from meanfield.simulate.solvers import StallGuard

    pid = diffrax.PIDController(rtol=3e-6, atol=3e-8)
    guard = StallGuard(pid).wrap(1)
    term = diffrax.ODETerm(lambda t, y, a: -y)
    t0 = jnp.float32(1024.0)
    t1 = t0 + 3 * jnp.float32(2.0 ** -13)  # 3 ulp
    y = jnp.zeros(1, jnp.float32)
    _, state = guard.init(term, t0, t1, y, t1 - t0, None, None, 5)
    y_err = jnp.full(1, scaled_error * 3e-8, jnp.float32)  # |y| = 0: the scale is atol
    inner = pid.wrap(1).adapt_step_size(t0, t1, y, y, None, y_err, 5, state)
    keep, n0, n1, _, _, result = guard.adapt_step_size(t0, t1, y, y, None, y_err, 5, state)
    assert not bool(inner[0]) and not bool(keep)
    assert (float(inner[1]), float(inner[2]) == float(t1)) == (float(t0), repeats)  # the premise
    assert inner[5] == diffrax.RESULTS.successful
    assert (result == diffrax.RESULTS.dt_min_reached) == repeats
    assert (float(n0), float(n1)) == (float(inner[1]), float(inner[2]))


def _riccati(v, a, w, s0):
    """Blow-up time of ds/dt = 2 v a s^2 + 2 w s from s0 > 0 (inf when s stays bounded)."""
    if v * a <= 0 or 1 + w / (v * a * s0) <= 0:
        return np.inf
    return 1.0 / (2 * v * a * s0) if w == 0 else np.log(1 + w / (v * a * s0)) / (2 * w)


def test_riccati_blowup_times_through_the_batched_path(x64):
    """d = 1: ds/dt = 2 v a s^2 + 2 w s blows up at the closed-form time; a batch mixing blow-up,
    a stable equilibrium and decay gets each right, and equals the single solves."""
    params = [(1.0, 1.0, 0.0, 1.0), (1.0, 0.5, 0.3, 2.0), (2.0, 1.0, -0.5, 1.0), (0.5, 2.0, 1.0, 0.25),
              (-1.0, 0.5, 0.4, 0.1), (0.5, 2.0, -1.0, 0.5)]
    models = [mf.Model(Q=[[a]], K=[[1.0]], V=[[v]], W=[[w]], mlp="affine", dtype="float64") for v, a, w, _ in params]
    S0 = np.array([[[s0]] for *_, s0 in params])
    g = mf.simulate_gaussian(_stack(models), np.full((len(params), 1), 0.3), S0, 6.0, lanes=2)
    for i, (v, a, w, s0) in enumerate(params):
        single = mf.simulate_gaussian(models[i], [0.3], [[s0]], 6.0)
        t_star = _riccati(v, a, w, s0)
        if np.isfinite(t_star):
            assert abs(float(g.blowup_time[i]) - t_star) / t_star < 1e-4
        else:
            assert np.isinf(float(g.blowup_time[i]))
        np.testing.assert_allclose(g.covs[i], single.covs, rtol=1e-6)  # s ~ 1/(t* - t) amplifies rounding
        np.testing.assert_array_equal(g.valid[i], single.valid)
        assert int(mf.classify(g)[i]) == int(mf.classify(single))
    # Towards the equilibrium -w/(va): 1/s = (1/s0 + va/w) e^{-2wt} - va/w.
    v, a, w, s0 = params[4]
    assert abs(float(g.covs[4, -1, 0, 0]) - 1 / ((1 / s0 + v * a / w) * np.exp(-2 * w * 6.0) - v * a / w)) < 1e-8


def test_matrix_blowup_with_one_model_and_a_batch_of_covariances(x64, key):
    """V = vI, W = 0: T* = 1 / (2 beta v lambda_max(S0^{1/2} Ms S0^{1/2})) for each S0 of a batch
    sharing one model (MISSION section 2)."""
    k1, k2, k3 = jax.random.split(key, 3)
    d, beta, v, B = 3, 0.7, 1.3, 5
    Q = np.asarray(jax.random.normal(k1, (d, d), jnp.float64))
    K = np.asarray(jax.random.normal(k2, (d, d), jnp.float64))
    A = np.asarray(jax.random.normal(k3, (B, d, d), jnp.float64))
    S0 = A @ np.swapaxes(A, 1, 2) / d + 0.5 * np.eye(d)
    Ms = 0.5 * (Q.T @ K + K.T @ Q)
    t_star = []
    for S in S0:
        lam, U = np.linalg.eigh(S)
        R = U @ np.diag(np.sqrt(lam)) @ U.T
        t_star.append(1 / (2 * beta * v * np.linalg.eigvalsh(R @ Ms @ R)[-1]))
    t_star = np.array(t_star)
    assert np.all(t_star > 0)
    model = mf.Model(Q=Q, K=K, V=v * np.eye(d), beta=beta, dtype="float64")
    g = mf.simulate_gaussian(model, np.zeros((B, d)), S0, 3 * t_star.max())
    np.testing.assert_allclose(np.asarray(g.blowup_time), t_star, rtol=1e-4)


def test_tail_pool_shrinks_and_every_point_is_written(x64):
    """300 scalar Riccati points on 128 lanes (the pool shrinks to 16 once the queue is empty): every
    blow-up time matches its closed form, so no point was lost, duplicated or swapped."""
    rng = np.random.default_rng(0)
    B = 300
    v, a = rng.uniform(0.2, 2.0, B), rng.uniform(0.2, 2.0, B)
    w = rng.uniform(-0.5, 0.5, B)
    s0 = rng.uniform(0.2, 2.0, B)
    model = _stack([mf.Model(Q=[[a[i]]], K=[[1.0]], V=[[v[i]]], W=[[w[i]]], mlp="affine", dtype="float64")
                    for i in range(B)])
    t_star = np.array([_riccati(v[i], a[i], w[i], s0[i]) for i in range(B)])
    g = mf.simulate_gaussian(model, np.zeros((B, 1)), s0[:, None, None], 8.0, lanes=128, n_save=5)
    hit = t_star < 8.0
    assert hit.sum() > 200
    np.testing.assert_allclose(np.asarray(g.blowup_time)[hit], t_star[hit], rtol=1e-4)
    assert np.all(np.asarray(g.success))


def test_tail_pools_shrink_small_states_faster():
    """Pool sizes: small lane states (a d = 4 Gaussian: 4 + 16 numbers) cut 4-fold; mid-size states
    (compiled without YNNPACK) about halve, with a stop at 3/4 of each power of two from 256 up; large
    states (YNNPACK kernels, 64-token d = 8 particles: 512 numbers) halve; pools under 128 lanes are
    never cut; every chain ends at TAIL_MIN_LANES."""
    from meanfield._xla_flags import YNN_REDUCE_LANE_STATE
    from meanfield.simulate.core import SMALL_LANE_STATE, TAIL_MIN_LANES, tail_pools

    assert tail_pools(256, 20) == [256, 64, 16]
    assert tail_pools(256, SMALL_LANE_STATE + 1) == [256, 192, 128, 64, 32, 16]
    assert tail_pools(512, YNN_REDUCE_LANE_STATE) == [512, 384, 256, 192, 128, 64, 32, 16]
    assert tail_pools(256, YNN_REDUCE_LANE_STATE + 1) == [256, 128, 64, 32, 16]
    assert tail_pools(512, 512) == [512, 256, 128, 64, 32, 16]
    assert tail_pools(200, 512) == [200, 128, 64, 32, 16] and tail_pools(128, 512) == [128, 64, 32, 16]
    assert tail_pools(128, 2) == [128, 32, 16]
    assert tail_pools(512, 20) == [512, 128, 32, 16]
    assert tail_pools(100, 20) == [100] and tail_pools(64, 1000) == [64]
    assert all(p[-1] == TAIL_MIN_LANES for p in (tail_pools(256, 20), tail_pools(1024, 512)))


def test_fixed_step_and_piecewise_depth_in_a_batch(x64, key):
    """RK4 with dt0, and a piecewise model (shared layer times) whose lanes are products of exponentials."""
    A1, A2 = np.asarray(jax.random.normal(key, (2, 4, 2, 2), jnp.float64))
    pw = [mf.Model.piecewise([_linear(A1[i]), _linear(A2[i])], times=[0.6]) for i in range(4)]
    model = eqx.tree_at(lambda m: m.layer_times, _stack(pw), pw[0].layer_times)  # shared, unbatched
    X0 = np.asarray(jax.random.normal(jax.random.key(3), (4, 3, 2), jnp.float64))
    sol = mf.simulate_particles(model, X0, 1.5, n_save=2, lanes=2)
    for i in range(4):
        exact = X0[i] @ (expm(A2[i] * 0.9) @ expm(A1[i] * 0.6)).T
        np.testing.assert_allclose(sol.xs[i, -1], exact, rtol=1e-7, atol=1e-8)
    rk = mf.simulate_particles(_stack([_linear(A) for A in A1]), X0, 1.0, solver="rk4", dt0=0.05, n_save=3, lanes=3)
    for i in range(4):
        single = mf.simulate_particles(_linear(A1[i]), X0[i], 1.0, solver="rk4", dt0=0.05, n_save=3)
        np.testing.assert_allclose(rk.xs[i], single.xs, rtol=1e-12, atol=1e-12)
        assert int(rk.num_steps[i]) == int(single.num_steps) == 20


def test_one_model_many_initial_conditions_float32():
    """One model for all points (not copied per lane), float32 default tolerances, save_fn and progress."""
    model = mf.Model.random(jax.random.key(0), 3, norm="sphere", beta=2.0)
    X0 = jax.vmap(lambda k: mf.sphere_uniform(k, 8, 3))(jax.random.split(jax.random.key(1), 6))
    sol = mf.simulate_particles(model, X0, 3.0, n_save=4, save_fn=mf.metrics.particle_observables, progress=True)
    assert sol.xs["effective_rank"].shape == (6, 4)
    for i in (0, 5):
        single = mf.simulate_particles(model, X0[i], 3.0, n_save=4, save_fn=mf.metrics.particle_observables)
        np.testing.assert_allclose(sol.xs["effective_rank"][i], single.xs["effective_rank"], rtol=1e-4)


def test_batched_calls_refuse_what_they_cannot_do(key):
    model = mf.Model.random(key, 3)
    models = _stack([model, model])
    X0 = jnp.ones((3, 4, 3))
    with pytest.raises(ValueError, match="batch of 3 and `model` a batch of 2"):
        mf.simulate_particles(models, X0, 1.0)
    with pytest.raises(ValueError, match="dense=True"):
        mf.simulate_particles(model, X0, 1.0, dense=True)
    with pytest.raises(ValueError, match="low-rank"):
        mf.simulate_particles(model, X0, 1.0, attention=mf.LowRank())
    lin = _stack([_linear(np.eye(2), "float32")] * 2)
    with pytest.raises(ValueError, match="disagree"):
        mf.simulate_gaussian(lin, np.zeros((3, 2)), np.eye(2), 1.0)
