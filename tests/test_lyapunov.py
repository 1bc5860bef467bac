"""Lyapunov spectra by the QR method, checked against closed forms (issue 4, part 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield as mf
from meanfield.lyapunov import gaussian_lyapunov, lyapunov_spectrum, particle_lyapunov
from meanfield.sweep.plan import ConfigError, config_from_dict
from meanfield.sweep.run import run_experiment

# Eigenvalues -0.5 +- 2i (a rotating, decaying pair) and 0.7, coupled (not normal).
A = np.array([[-0.5, 2.0, 0.3], [-2.0, -0.5, 0.1], [0.0, 0.4, 0.7]])


def test_linear_flow_exponents_are_real_parts_of_eigenvalues(x64, key):
    expected = np.sort(np.linalg.eigvals(A).real)[::-1]
    res = lyapunov_spectrum(lambda t, y: jnp.asarray(A) @ y, jnp.ones(3), 45.0, 3, interval=0.5, discard=5.0, key=key)
    assert bool(res.finite)
    np.testing.assert_allclose(np.asarray(res.exponents), expected, atol=1e-3)
    assert res.running.shape == (90, 3) and float(jnp.max(res.drift)) < 1e-3
    # The same flow as a Model (affine MLP only) through particle_lyapunov, two tokens: each exponent twice.
    model = mf.Model(attention="none", mlp="affine", W=jnp.asarray(A), b=jnp.zeros(3), dtype=jnp.float64)
    res2 = particle_lyapunov(model, jnp.ones((2, 3)), 45.0, 6, interval=0.5, discard=5.0, key=key)
    np.testing.assert_allclose(np.sort(np.asarray(res2.exponents))[::-1], np.repeat(expected, 2), atol=1e-3)


def test_consensus_on_the_sphere_transversal_exponents(x64, key):
    """V = Q = K = I on S^2: tokens reach consensus; linearising there, the tangential deviations from
    the tokens' mean decay as exp(-t) (the softmax weights are uniform at consensus and their
    derivative is radial), and moving the common point is neutral: exponents {0 x (d-1), -1 x (n-1)(d-1)}."""
    n, d = 4, 3
    I = jnp.eye(d)
    model = mf.Model(attention="softmax", Q=I, K=I, V=I, beta=1.0, mlp="none", norm="sphere", dtype=jnp.float64)
    X0 = mf.hemisphere(jax.random.fold_in(key, 1), n, d, [0.0, 0.0, 1.0], jnp.float64)
    res = particle_lyapunov(model, X0, 40.0, n * (d - 1), interval=1.0, discard=15.0, key=key)
    expected = np.array([0.0] * (d - 1) + [-1.0] * ((n - 1) * (d - 1)))
    np.testing.assert_allclose(np.asarray(res.exponents), expected, atol=1e-3)
    assert float(jnp.max(res.exponents[d - 1:])) < 0  # every transversal exponent negative


def test_gaussian_moment_flow_exponents(x64, key):
    """Affine field F = W x (attention off): m has exponents eig(W) and S -> W S + S W^T has
    eig(W)_i + eig(W)_j. With eig(W) = {0.2, -0.5}: leading (0.4, 0.2, -0.3)."""
    W = jnp.array([[0.2, 1.0], [0.0, -0.5]])
    model = mf.Model(attention="none", mlp="affine", W=W, b=jnp.zeros(2), dtype=jnp.float64)
    res = gaussian_lyapunov(model, jnp.ones(2), jnp.eye(2), 40.0, 3, interval=0.5, discard=10.0, key=key)
    np.testing.assert_allclose(np.asarray(res.exponents), [0.4, 0.2, -0.3], atol=5e-3)
    m1, S1 = res.y1
    assert S1.shape == (2, 2) and np.allclose(S1, S1.T)


def test_lyapunov_through_a_sweep_matches_direct_call(tmp_path):
    raw = {
        "name": "ly", "seed": 0,
        "model": {"d": 2, "beta": 1.0, "mlp": "two_layer", "activation": "tanh", "norm": "sphere"},
        "initial": {"kind": "sphere", "n": 4},
        "simulator": {"kind": "particles", "t1": 2.0, "n_save": 3, "lyapunov": {"k": 2, "interval": 0.5}},
        "observables": ["effective_rank"],
        "sweep": {"grid": {"model.beta": [1.0, 3.0]}},
        "plots": {"curves": None},
    }
    ds = run_experiment(config_from_dict(raw), out=tmp_path / "run", quiet=True).dataset
    assert ds["lyapunov"].dims == ("point", "exponent") and ds["lyapunov"].shape == (2, 2)
    key = jax.random.key(0)
    model = mf.Model.random(jax.random.fold_in(key, 0), 2, beta=3.0, activation="tanh", norm="sphere")
    X0 = mf.sphere_uniform(jax.random.fold_in(key, 1), 4, 2)
    res = particle_lyapunov(model, X0, 2.0, 2, interval=0.5, solver="rk4", dt0=0.05,
                            key=jax.random.fold_in(jax.random.fold_in(key, 1), 2))
    np.testing.assert_allclose(ds["lyapunov"].values[1], np.asarray(res.exponents), rtol=1e-4, atol=1e-5)
    raw["simulator"]["lyapunov"]["k"] = 5  # 4 tokens on S^1: a 4-dimensional state
    with pytest.raises(ConfigError, match="simulator.lyapunov.k"):
        config_from_dict(raw)


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k: must be between 1 and the state dimension 3"):
        lyapunov_spectrum(lambda t, y: y, jnp.ones(3), 1.0, 4)


@pytest.mark.slow
def test_lowrank_attention_gives_the_dense_exponents(x64, key):
    """Lyapunov exponents through the low-rank attention (jax.jvp of the Chebyshev sum, its bound check
    and fallback included) equal those through the dense sum: 64 tokens on S^2, orders forced."""
    I = jnp.eye(3)
    model = mf.Model(attention="softmax", Q=I, K=I, V=I, beta=1.0, mlp="none", norm="sphere", dtype=jnp.float64)
    X0 = mf.sphere_uniform(jax.random.fold_in(key, 1), 64, 3, dtype=jnp.float64)
    lowrank = mf.LowRank(orders=(14, 14, 14), rtol=1e-3, fallback=mf.Dense())
    _, info = mf.lowrank_attention(model, X0, orders=lowrank.orders, rtol=lowrank.rtol, fallback=mf.Dense(),
                                   return_info=True)
    assert not bool(info.fallback) and float(info.bound) < 1e-12  # the low-rank sum itself is differentiated
    kw = dict(interval=0.5, solver="rk4", dt0=0.1, key=key)
    fast = particle_lyapunov(model, X0, 2.0, 4, attention=lowrank, **kw)
    dense = particle_lyapunov(model, X0, 2.0, 4, attention=mf.Dense(), **kw)
    assert bool(fast.finite) and bool(dense.finite)
    np.testing.assert_allclose(np.asarray(fast.exponents), np.asarray(dense.exponents), rtol=1e-8, atol=1e-10)
