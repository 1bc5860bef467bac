"""Low-rank (separable Chebyshev) attention against the direct sum, and its a priori error bound."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield as mf
from meanfield.model.lowrank import chebyshev_error, choose_orders, lowrank_attention, truncation_bound
from meanfield.simulate.attention_policy import resolve_attention

N = 4096


def _model(key, d, beta, *, attention="softmax", causal=False, norm="none", dtype=None):
    return mf.Model.random(key, d, beta=beta, attention=attention, causal=causal, mlp="none", norm=norm, dtype=dtype)


def _tokens(key, d, norm, dtype):
    if norm == "sphere":
        return mf.sphere_uniform(key, N, d, dtype=dtype)
    return 0.4 * jax.random.normal(key, (N, d), dtype)


def _reference(model, X):
    """Direct sum in float64 NumPy: output and the per-query scale the bound refers to."""
    X = np.asarray(X, np.float64)
    Q, K, V, beta = (np.asarray(a, np.float64) for a in (model.Q, model.K, model.V, model.beta))
    logits = beta * (X @ Q.T) @ (X @ K.T).T
    if model.causal:
        logits = np.where(np.tril(np.ones(logits.shape, bool)), logits, -np.inf)
    mx = logits.max(axis=1, keepdims=True)
    w = np.exp(logits - mx)
    v = X @ V.T
    vinf = np.abs(v).max()
    if model.attention == "softmax":
        return (w @ v) / w.sum(1, keepdims=True), np.full((X.shape[0], 1), vinf)
    mass = np.exp(mx) * w.sum(1, keepdims=True) / X.shape[0]
    return np.exp(mx) * (w @ v) / X.shape[0], mass * vinf


def _check(model, X, rtol, rounding):
    orders = choose_orders(model, X, rtol=rtol)
    assert orders is not None
    out, info = lowrank_attention(model, X, orders=orders, rtol=rtol, fallback=mf.Blocked(), return_info=True)
    ref, scale = _reference(model, X)
    err = float(np.max(np.abs(np.asarray(out, np.float64) - ref) / scale))
    bound = float(info.bound)
    assert not bool(info.fallback)
    assert bound <= rtol
    assert float(info.bound_post) <= bound * (1 + 1e-6) + rounding
    assert err <= bound + rounding, (orders, err, bound)
    return err, bound, orders


# Few distinct shapes: each (d, orders) pair is one compile.
CASES_F64 = [
    # d, beta, norm, attention, causal
    (2, 0.5, "none", "softmax", False),
    (2, 4.0, "sphere", "unnormalised", True),
    (3, 1.0, "sphere", "softmax", True),
    (3, 9.0, "sphere", "softmax", False),
]


@pytest.mark.parametrize("d, beta, norm, attention, causal", CASES_F64)
def test_lowrank_matches_direct_float64(x64, key, d, beta, norm, attention, causal):
    """Measured error (relative to max |V x_j|) never exceeds the reported a priori bound."""
    k1, k2 = jax.random.split(key)
    model = _model(k1, d, beta, attention=attention, causal=causal, norm=norm, dtype=jnp.float64)
    _check(model, _tokens(k2, d, norm, jnp.float64), 1e-6, rounding=0.0)


CASES_F32 = [(3, 0.5, "none", "softmax", False), (2, 1.0, "sphere", "softmax", True)]


@pytest.mark.parametrize("d, beta, norm, attention, causal", CASES_F32)
def test_lowrank_matches_direct_float32(key, d, beta, norm, attention, causal):
    """float32: the bound includes the rounding estimate u C / J (kernel range times roundoff)."""
    k1, k2 = jax.random.split(key)
    model = _model(k1, d, beta, attention=attention, causal=causal, norm=norm)
    _check(model, _tokens(k2, d, norm, jnp.float32), 1e-4, rounding=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("beta", [0.5, 1.0, 4.0, 9.0])
@pytest.mark.parametrize("norm", ["sphere", "none"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lowrank_grid(key, d, beta, norm, dtype):
    """The full grid (softmax, non-causal); where the bound cannot be met, the planner says so."""
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        k1, k2 = jax.random.split(key)
        model = _model(k1, d, beta, norm=norm, dtype=dt)
        X = _tokens(k2, d, norm, dt)
        rtol = 1e-6 if dtype == "float64" else 1e-4
        if choose_orders(model, X, rtol=rtol) is None:
            # Only large beta times radius^2 fails: truncation in float64, roundoff times the
            # kernel's dynamic range in float32.
            assert (norm == "none" and beta >= 4.0) or (dtype == "float32" and beta >= 1.0)
            return
        _check(model, X, rtol, rounding=0.0)


def test_causal_equals_direct_causal(x64, key):
    """Causal low-rank attention equals the causal direct sum (token 1 sees only itself)."""
    k1, k2 = jax.random.split(key)
    model = _model(k1, 3, 2.0, causal=True, norm="sphere", dtype=jnp.float64)
    X = _tokens(k2, 3, "sphere", jnp.float64)
    orders = choose_orders(model, X, rtol=1e-9)
    out = lowrank_attention(model, X, orders=orders, rtol=1e-9, fallback=mf.Blocked(), chunk=128)
    direct = mf.blocked_attention(model, X)
    np.testing.assert_allclose(out, direct, atol=1e-9 * float(jnp.max(jnp.abs(X @ model.V.T))))
    np.testing.assert_allclose(out[0], X[0] @ model.V.T, atol=1e-12)


def test_causal_float32_model_under_x64(x64, key):
    """A float32 causal model with x64 enabled stays float32 (the causal key counts were int64-derived
    float64, and `lax.cond`'s branches then disagreed in dtype)."""
    k1, k2 = jax.random.split(key)
    model = _model(k1, 3, 2.0, causal=True, norm="sphere", dtype=jnp.float32)
    X = _tokens(k2, 3, "sphere", jnp.float32)
    orders = choose_orders(model, X, rtol=1e-3)
    out = lowrank_attention(model, X, orders=orders, rtol=1e-3, fallback=mf.Blocked(), chunk=128)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, mf.blocked_attention(model, X), atol=1e-3 * float(jnp.max(jnp.abs(X @ model.V.T))))


def test_fallback_where_bound_fails(x64, key):
    """Large beta times radius: no orders meet the bound; too-low orders trigger the direct sum."""
    k1, k2 = jax.random.split(key)
    model = _model(k1, 3, 9.0, dtype=jnp.float64)
    X = 2.0 * jax.random.normal(k2, (N, 3), jnp.float64)
    assert choose_orders(model, X, rtol=1e-6) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resolve_attention(mf.LowRank(rtol=1e-6), model, X) == mf.Blocked()  # its fallback
    small = mf.sphere_uniform(k2, 512, 3, dtype=jnp.float64)
    orders = (3, 3, 3)
    assert float(truncation_bound(model, small, orders)) > 1e-6
    out, info = jax.jit(lambda X: lowrank_attention(model, X, orders=orders, rtol=1e-6, fallback=mf.Blocked(),
                                                       return_info=True))(small)
    assert bool(info.fallback)
    np.testing.assert_allclose(out, mf.blocked_attention(model, small), rtol=1e-12, atol=1e-12)
    assert resolve_attention(mf.Auto(), model.replace(beta=0.5), small) == mf.Dense()  # too few tokens to pay


def test_jit_and_vmap(key):
    """vmap over token sets (static orders) equals one call per set."""
    k1, k2 = jax.random.split(key)
    model = _model(k1, 3, 1.0, norm="sphere")
    Xs = jnp.stack([mf.sphere_uniform(k, 256, 3) for k in jax.random.split(k2, 2)])
    orders = choose_orders(model, Xs.reshape(-1, 3), rtol=1e-5)
    batched = jax.jit(jax.vmap(lambda X: lowrank_attention(model, X, orders=orders, rtol=1e-5, fallback=mf.Blocked())))(Xs)
    for i in range(2):
        np.testing.assert_allclose(batched[i], lowrank_attention(model, Xs[i], orders=orders), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(batched[i], mf.dense_attention(model, Xs[i]), atol=3e-5)


def test_simulate_particles_lowrank_equals_direct(x64, key):
    """A short clustering run on S^2: the low-rank path equals the direct one within tolerance."""
    I = jnp.eye(3)
    model = mf.Model(Q=I, K=I, V=I, beta=2.0, norm="sphere", dtype=jnp.float64)
    X0 = mf.sphere_uniform(key, 300, 3, dtype=jnp.float64)
    kw = dict(solver="rk4", dt0=0.125, n_save=3)
    fast = mf.simulate_particles(model, X0, 1.0, attention=mf.LowRank(rtol=1e-9), **kw)
    direct = mf.simulate_particles(model, X0, 1.0, attention=mf.Dense(), **kw)
    err = float(jnp.max(jnp.abs(fast.xs - direct.xs)))
    assert err < 1e-8, err
    assert float(jnp.max(jnp.abs(fast.xs - X0))) > 0.05  # the tokens did move


def test_chebyshev_error_one_formula(x64):
    """The interpolation error 2 (gamma/2)^N / N!, the same in jnp and in the planner's NumPy."""
    gamma = np.array([0.0, 0.3, 1.0, 4.0])
    for N in (1, 3, 8):
        expect = np.where(gamma > 0, 2 * (gamma / 2) ** N / math.factorial(N), 0.0)
        np.testing.assert_allclose(chebyshev_error(gamma, N, np), expect, rtol=1e-13)
        np.testing.assert_allclose(chebyshev_error(jnp.asarray(gamma), N), expect, rtol=1e-13)


def test_resolve_lowrank(key):
    """Given orders keep, a missing rtol becomes the default; LowRank(orders=None) called unresolved, or
    with orders of the wrong length, is refused; Auto plans low-rank at 4096 tokens on S^2."""
    I = jnp.eye(3)
    model = mf.Model(Q=I, K=I, V=I, beta=1.0, norm="sphere")
    X = mf.sphere_uniform(key, N, 3)
    assert resolve_attention(mf.LowRank((4, 4, 4)), model, X) == mf.LowRank((4, 4, 4), rtol=1e-6)
    with pytest.raises(ValueError, match="d = 3"):
        resolve_attention(mf.LowRank((4, 4)), model, X)
    with pytest.raises(ValueError, match="orders=None"):
        mf.attention(model, X, mf.LowRank())
    auto = resolve_attention(mf.Auto(rtol=1e-4), model, X)
    assert isinstance(auto, mf.LowRank) and auto.rtol == 1e-4 and auto.fallback == mf.Blocked()
    shaped = mf.Model(Q=I, K=I, V=I, beta=1.0, norm="sphere", attention="shaped")
    assert resolve_attention(mf.Auto(), shaped, X) == mf.Dense()
