"""Hostile numbers through the Python API: a number that is not a valid input is refused with a
ValueError naming the argument; non-finite values arising during a solve are a recorded failure
(`success` False), never a blow-up; every observable returns NaN on NaN input.

Tiny sizes (n <= 4 tokens, d = 2) and few shapes: every solve shape is a JIT compile."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield as mf
from meanfield import metrics
from meanfield.density import simulate_density
from meanfield.shaped import simulate_shaped_sde

NAN, INF = float("nan"), float("inf")
I2 = jnp.eye(2)
X0 = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
HUGE = mf.Model(W=I2, a_mlp=1e30, attention="none")  # the state overflows within the first step


@pytest.fixture(scope="module")
def model():
    return mf.Model(Q=I2, K=I2, V=I2)


# ------------------------------------------------------------------------------------------ observables

TOKEN_METRICS = {name: getattr(metrics, name) for name in (
    "effective_rank", "stable_rank", "rank_one_distance", "consensus_distance", "mean_cosine", "diameter",
    "rms_norm", "cluster_count")}
TOKEN_METRICS["cov_trace(empirical_covariance)"] = metrics.PARTICLE_OBSERVABLES["cov_trace"]
COV_METRICS = ["cov_trace", "cov_logdet", "cov_condition", "numerical_rank"]
GAUSS_METRICS = ["gaussian_effective_rank", "gaussian_rank_one_distance"]


def _is_nan(x):
    return bool(np.all(np.isnan(np.asarray(x, np.float64))))


def test_every_sweep_observable_is_covered():
    assert set(metrics.PARTICLE_OBSERVABLES) <= set(TOKEN_METRICS) | {"cov_trace"}


@pytest.mark.parametrize("name", list(TOKEN_METRICS))
def test_token_observables_nan_in_nan_out(name):
    fn = jax.jit(TOKEN_METRICS[name])  # one compile per observable: every input has X0's shape
    assert _is_nan(fn(jnp.full(X0.shape, NAN))), name  # effective_rank used to say 1.0
    assert _is_nan(fn(X0.at[1, 0].set(NAN))), name
    with_inf = fn(X0.at[1, 0].set(INF))
    assert (float(with_inf) == INF) if name == "rms_norm" else _is_nan(with_inf), name  # a token at infinity
    assert np.isfinite(float(fn(X0))), name


def test_observables_under_vmap():
    batch = jnp.stack([X0, X0.at[0, 1].set(NAN)])
    for fn in (metrics.effective_rank, metrics.cluster_count):
        out = np.asarray(jax.jit(jax.vmap(fn))(batch))
        assert np.isfinite(out[0]) and np.isnan(out[1])


def test_counts_are_floats_that_can_be_nan():
    count = jax.jit(metrics.cluster_count)(X0)
    assert float(count) == 3.0 and count.dtype == X0.dtype
    rank = jax.jit(metrics.numerical_rank)
    assert float(rank(I2)) == 2.0 and _is_nan(rank(I2.at[0, 0].set(NAN)))


@pytest.mark.parametrize("name", COV_METRICS)
def test_covariance_observables_nan_in_nan_out(name):
    fn = getattr(metrics, name)
    assert _is_nan(fn(I2.at[0, 1].set(NAN))), name
    assert _is_nan(fn(I2.at[0, 1].set(INF))), name  # an infinite covariance off the diagonal is no covariance
    diag_inf = fn(I2.at[0, 0].set(INF))
    assert (float(diag_inf) == INF) if name == "cov_trace" else _is_nan(diag_inf), name


@pytest.mark.parametrize("name", GAUSS_METRICS)
def test_gaussian_observables_nan_in_nan_out(name):
    fn = getattr(metrics, name)
    assert _is_nan(fn(jnp.array([NAN, 0.0]), I2)), name
    assert _is_nan(fn(jnp.zeros(2), I2.at[0, 1].set(NAN))), name
    assert _is_nan(fn(jnp.zeros(2), I2.at[0, 0].set(INF))), name


def test_empirical_moments_nan_in_nan_out():
    bad = X0.at[0, 0].set(NAN)
    assert _is_nan(metrics.empirical_mean(bad)) and _is_nan(metrics.empirical_covariance(bad))
    assert _is_nan(metrics.empirical_covariance(X0.at[0, 0].set(INF)))


def test_scale_free_observables_survive_extreme_scales():
    """Tokens at 1e25 (sums of squares overflow float32) or 1e-25 (underflow) keep their ranks."""
    ref = {n: float(getattr(metrics, n)(X0)) for n in ("effective_rank", "rank_one_distance", "mean_cosine")}
    for scale in (1e25, 1e-25):
        for n, v in ref.items():
            np.testing.assert_allclose(float(getattr(metrics, n)(scale * X0)), v, rtol=1e-5, atol=1e-6, err_msg=n)
        np.testing.assert_allclose(float(metrics.rms_norm(scale * X0)), scale * float(metrics.rms_norm(X0)), rtol=1e-5)


# ------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("kwargs, word", [
    (dict(t1=NAN), "`t1`"), (dict(t1=INF), "`t1`"), (dict(t1=0.0), "`t1` must be > `t0`"),
    (dict(t1=1.0, t0=NAN), "`t0`"), (dict(t1=1.0, t0=2.0), "`t1` must be > `t0`"),
    (dict(t1=1.0, n_save=1), "`n_save`"), (dict(t1=1.0, n_save=2.5), "`n_save`"),
    (dict(t1=1.0, ts=[0.0, NAN]), "`ts`"), (dict(t1=1.0, ts=[0.0, 2.0]), "`ts` must lie in"),
    (dict(t1=1.0, ts=[0.5, 0.0]), "`ts` must be non-decreasing"),
    (dict(t1=1.0, dt0=NAN, solver="rk4"), "`dt0`"), (dict(t1=1.0, rtol=-1e-6), "`rtol`"),
    (dict(t1=1.0, atol=INF), "`atol`"), (dict(t1=1.0, max_steps=0), "`max_steps`"),
])
def test_simulators_refuse_bad_numbers(model, kwargs, word):
    with pytest.raises(ValueError, match="simulate_particles: .*" + _re(word)):
        mf.simulate_particles(model, X0, **kwargs)
    with pytest.raises(ValueError, match="simulate_gaussian: .*" + _re(word)):
        mf.simulate_gaussian(model, jnp.zeros(2), I2, **kwargs)


def _re(word):
    import re

    return re.escape(word)


def test_simulate_particles_refuses_bad_tokens_and_options(model):
    with pytest.raises(ValueError, match=r"`X0` must be finite; it holds 1 NaN and 0 inf of 6 entries \(first at index \(1, 0\)\)"):
        mf.simulate_particles(model, X0.at[1, 0].set(NAN), 1.0)
    with pytest.raises(ValueError, match="`X0` must be finite; it holds 0 NaN and 1 inf"), np.errstate(over="ignore"):
        mf.simulate_particles(model, np.asarray(X0, np.float64) + np.array([[0.0, 0.0], [0.0, 0.0], [1e39, 0.0]]), 1.0)
    with pytest.raises(ValueError, match="`X0`"):
        mf.simulate_particles(model, jnp.stack([X0, X0.at[0, 0].set(INF)]), 1.0)  # a batch
    with pytest.raises(ValueError, match="`blowup_growth`"):
        mf.simulate_particles(model, X0, 1.0, blowup_growth=NAN)
    with pytest.raises(ValueError, match="`blowup_growth`"):
        mf.simulate_particles(model, X0, 1.0, blowup_growth=0.5)


def test_simulate_gaussian_refuses_bad_moments(model):
    with pytest.raises(ValueError, match="simulate_gaussian: `m0` must be finite"):
        mf.simulate_gaussian(model, [NAN, 0.0], I2, 1.0)
    with pytest.raises(ValueError, match="simulate_gaussian: `S0` must be finite"):
        mf.simulate_gaussian(model, [0.0, 0.0], I2.at[1, 1].set(INF), 1.0)
    with pytest.raises(ValueError, match="`blowup_threshold`"):
        mf.simulate_gaussian(model, [0.0, 0.0], I2, 1.0, blowup_threshold=NAN)


def test_simulate_gaussian_refuses_what_is_not_a_covariance(model):
    """S0 used to be symmetrised and its negative eigenvalues clipped: another problem's regime."""
    with pytest.raises(ValueError, match=r"`S0` must be a symmetric covariance; max \|S - S\^T\| = 0\.5"):
        mf.simulate_gaussian(model, [0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]], 1.0)
    with pytest.raises(ValueError, match=r"`S0` must be positive semidefinite; its smallest eigenvalue is -1 "):
        mf.simulate_gaussian(model, [0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]], 1.0)
    with pytest.raises(ValueError, match=r"positive semidefinite.*\(batch index 1\)"):
        mf.simulate_gaussian(model, jnp.zeros((2, 2)), jnp.stack([I2, -I2]), 1.0)


def test_rank_deficient_and_rounded_covariances_are_accepted():
    v = jnp.array([0.6, 0.8])
    low = jnp.outer(v, v)  # rank one: a valid, singular covariance
    rounded = low + jnp.array([[0.0, 1e-7], [0.0, 0.0]])  # asymmetric at rounding level only
    calm = HUGE.replace(a_mlp=0.1)  # the compile of the adaptive solve below
    for S0 in (low, rounded):
        sol = mf.simulate_gaussian(calm, jnp.zeros(2), S0, 1.0, n_save=2)
        assert bool(sol.success) and float(jax.jit(metrics.numerical_rank)(sol.covs[-1])) == 1.0


def test_model_refuses_non_finite_arrays(model):
    with pytest.raises(ValueError, match="Model: `V` must be finite"):
        mf.Model(Q=I2, K=I2, V=I2.at[0, 1].set(NAN))
    with pytest.raises(ValueError, match="Model: `beta` must be finite.*inf"):
        mf.Model(Q=I2, K=I2, V=I2, beta=INF)
    with pytest.raises(ValueError, match="Model: `a_mlp` must be finite"):  # 1e39 overflows float32
        mf.Model(W=I2, a_mlp=1e39, attention="none")
    with pytest.raises(ValueError, match="Model.replace: `beta` must be finite"):
        model.replace(beta=NAN)
    with pytest.raises(ValueError, match="Model.piecewise: `times` must be finite"):
        mf.Model.piecewise([model, model], times=[NAN])
    # Arrays set behind the constructor's back are refused by the simulators, naming the field.
    bad = eqx.tree_at(lambda m: m.K, model, I2.at[1, 1].set(NAN))
    with pytest.raises(ValueError, match="simulate_particles: model field `K` must be finite"):
        mf.simulate_particles(bad, X0, 1.0)
    with pytest.raises(ValueError, match="simulate_gaussian: model field `K` must be finite"):
        mf.simulate_gaussian(bad, jnp.zeros(2), I2, 1.0)


def test_shaped_sde_refuses_bad_numbers(key):
    kw = dict(dt=0.1, gamma_attn2=0.3, gamma_mlp2=0.2, tau0=0.5, n_paths=2, n_save=2)
    V0 = jnp.array([[1.0, 0.5], [0.5, 1.0]])
    with pytest.raises(ValueError, match="simulate_shaped_sde: `V0` must be finite"):
        simulate_shaped_sde(key, V0.at[0, 1].set(NAN), 1.0, **kw)
    with pytest.raises(ValueError, match="simulate_shaped_sde: `V0` must be positive semidefinite"):
        simulate_shaped_sde(key, jnp.array([[1.0, 2.0], [2.0, 1.0]]), 1.0, **kw)
    with pytest.raises(ValueError, match="simulate_shaped_sde: `T`"):
        simulate_shaped_sde(key, V0, INF, **kw)
    with pytest.raises(ValueError, match="simulate_shaped_sde: `c_plus`"):
        simulate_shaped_sde(key, V0, 1.0, c_plus=NAN, **kw)
    with pytest.raises(ValueError, match="simulate_shaped_sde: `explode_threshold`"):
        simulate_shaped_sde(key, V0, 1.0, explode_threshold=NAN, **kw)


def test_density_refuses_bad_numbers():
    circle = mf.Model(Q=I2, K=I2, V=I2, norm="sphere")
    rho = np.full(16, 1 / (2 * np.pi))
    with pytest.raises(ValueError, match="simulate_density: `density0` must be finite"):
        simulate_density(circle, np.where(np.arange(16) == 3, np.nan, rho), 1.0)
    with pytest.raises(ValueError, match="simulate_density: `density0` must give finite values"):
        simulate_density(circle, lambda th: jnp.full_like(th, NAN), 1.0, modes=16)
    with pytest.raises(ValueError, match="simulate_density: `t1`"):
        simulate_density(circle, rho, NAN)
    with pytest.raises(ValueError, match="simulate_density: `t1` must be > `t0`"):
        simulate_density(circle, rho, -1.0)


def test_lyapunov_refuses_bad_numbers(model):
    with pytest.raises(ValueError, match="particle_lyapunov: `X0` must be finite"):
        mf.particle_lyapunov(model, X0.at[0, 0].set(NAN), 1.0, k=2)
    with pytest.raises(ValueError, match="lyapunov_spectrum: `t1`"):
        mf.particle_lyapunov(model, X0, NAN, k=2)
    with pytest.raises(ValueError, match="lyapunov_spectrum: `t1` must be > `t0`"):
        mf.particle_lyapunov(model, X0, 0.0, k=2)
    with pytest.raises(ValueError, match="lyapunov_spectrum: `interval`"):
        mf.particle_lyapunov(model, X0, 1.0, k=2, interval=NAN)
    with pytest.raises(ValueError, match="lyapunov_spectrum: `discard`"):
        mf.particle_lyapunov(model, X0, 1.0, k=2, discard=1.0)
    with pytest.raises(ValueError, match="gaussian_lyapunov: `S0` must be a symmetric covariance"):
        mf.gaussian_lyapunov(model, jnp.zeros(2), jnp.array([[1.0, 0.3], [0.0, 1.0]]), 1.0, k=2)
    with pytest.raises(ValueError, match="gaussian_lyapunov: `m0` must be finite"):
        mf.gaussian_lyapunov(model, jnp.array([0.0, INF]), I2, 1.0, k=2)


def test_traced_inputs_are_not_checked(model):
    """Inside jit / vmap (the sweep engine) the checks are skipped, not failed (traced only: no compile)."""
    def run(beta, t1, S0):
        m = mf.Model(Q=I2, K=I2, V=I2, beta=beta)
        return mf.simulate_gaussian(m, jnp.zeros(2), S0, t1, n_save=2).covs[-1]

    jax.make_jaxpr(run)(1.0, 0.5, I2)


# ------------------------------------------------------------------------------------------ non-finite during a solve

def test_gaussian_non_finite_state_is_a_failure_not_a_blowup():
    # A fixed step accepts the overflowing step: the state becomes NaN / inf.
    g = mf.simulate_gaussian(HUGE, jnp.ones(2), I2, 1.0, n_save=2, solver="rk4", dt0=0.5)
    assert not bool(g.success) and float(g.blowup_time) == INF and not bool(jnp.any(g.valid))
    assert not np.all(np.isfinite(np.asarray(g.covs[-1])))  # nothing finite-looking is reported
    # The adaptive solver sees tr S cross its threshold with finite values: a genuine blow-up.
    a = mf.simulate_gaussian(HUGE, jnp.ones(2), I2, 1.0, n_save=2)
    assert bool(a.success) and np.isfinite(float(a.blowup_time))


def test_particle_non_finite_state_is_a_failure_not_a_blowup():
    fixed = dict(n_save=2, solver="rk4", dt0=0.5)
    for growth in (1e8, None):  # the blow-up event also fires on a non-finite state: still a failure
        s = mf.simulate_particles(HUGE, X0, 1.0, blowup_growth=growth, **fixed)
        assert not bool(s.success) and not bool(s.blown_up), growth
        assert not np.all(np.isfinite(np.asarray(s.xs[-1])))
    # The ensemble integrator (a batch) records the same failure per point.
    b = mf.simulate_particles(HUGE, jnp.stack([X0, 2 * X0]), 1.0, blowup_growth=1e8, **fixed)
    assert not np.any(np.asarray(b.success)) and not np.any(np.asarray(b.blown_up))
