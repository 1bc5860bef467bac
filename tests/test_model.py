import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield as mf


def test_random_is_deterministic_per_key(key):
    a = mf.Model.random(key, 4)
    b = mf.Model.random(key, 4)
    c = mf.Model.random(jax.random.key(1), 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a.V, c.V)
    assert a.W1.shape == (16, 4) and a.W2.shape == (4, 16)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(attention="sofmax"), "attention"),
        (dict(norm="ball"), "norm"),
        (dict(activation="swish"), "activation"),
        (dict(V=np.ones((3, 4))), "V"),
        (dict(V=np.eye(4)), "Q"),
        (dict(K=np.eye(3, 2)), "K"),
        (dict(mlp="affine", W=np.eye(4)), "W"),
        (dict(mlp="affine", W=None), "W"),
        (dict(mlp="two_layer", W1=np.ones((5, 3)), W2=np.ones((5, 3))), "W1"),
        (dict(b=np.ones(2), mlp="affine", W=np.eye(3)), "b"),
    ],
)
def test_bad_input_names_the_field(kwargs, field):
    base = dict(Q=np.eye(3), K=np.eye(3), V=np.eye(3))
    base.update(kwargs)
    with pytest.raises(ValueError, match=f"`{field}`"):
        mf.Model(**base)


def test_missing_attention_matrix():
    with pytest.raises(ValueError, match="needs `Q`"):
        mf.Model(K=np.eye(2), V=np.eye(2))


def test_aliases_and_inference():
    m = mf.Model(Q=np.eye(2), K=np.eye(2), V=np.eye(2), attention="causal", W=np.eye(2))
    assert m.attention == "softmax" and m.causal and m.mlp == "affine"
    assert mf.Model(Q=np.eye(2), K=np.eye(2), V=np.eye(2), attention="unnormalized").attention == "unnormalised"
    assert "d=2" in repr(m)


def test_float64_requires_x64():
    with pytest.raises(ValueError, match="jax_enable_x64"):
        mf.Model(Q=np.eye(2), K=np.eye(2), V=np.eye(2), dtype="float64")


def test_float64_model(x64):
    m = mf.Model(Q=np.eye(2), K=np.eye(2), V=np.eye(2), dtype="float64")
    assert m.V.dtype == jnp.float64 and m.dtype == jnp.float64


def test_gelu_mlp_is_x_times_the_normal_cdf(key):
    """The exact GELU, W2 (h Phi(h)) with h = W1 x and Phi the standard normal CDF, in float64 by math.erf."""
    import math

    model = mf.Model.random(key, 3, mlp="two_layer", activation="gelu")
    X = 3.0 * jax.random.normal(jax.random.key(1), (17, 3))
    h = np.asarray(X, np.float64) @ np.asarray(model.W1, np.float64).T
    phi = 0.5 * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
    expected = (h * phi) @ np.asarray(model.W2, np.float64).T
    np.testing.assert_allclose(mf.mlp(model, X), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mlp", ["affine", "two_layer"])
def test_spectral_ratio_setter_is_exact(key, mlp):
    model = mf.Model.random(key, 5, mlp=mlp, a_attn=0.7, a_mlp=-1.3)
    rhos = jnp.array([0.05, 0.5, 1.0, 2.0, 20.0])
    got = jax.vmap(lambda r: mf.spectral_ratio(mf.with_spectral_ratio(model, r)))(rhos)
    np.testing.assert_allclose(got, rhos, rtol=1e-6)
    # The definition, computed independently in NumPy (float64).
    m2 = mf.with_spectral_ratio(model, 3.0)
    W_eff = np.asarray(m2.W, np.float64) if mlp == "affine" else np.asarray(m2.W2, np.float64) @ np.asarray(m2.W1, np.float64)
    rho = abs(float(m2.a_mlp)) * np.linalg.norm(W_eff, 2) / (abs(float(m2.a_attn)) * np.linalg.norm(np.asarray(m2.V, np.float64), 2))
    assert abs(rho - 3.0) / 3.0 < 1e-6
    # Only the MLP branch weight moved.
    np.testing.assert_array_equal(m2.V, model.V)


@pytest.mark.parametrize("shape", [(8, 8), (32, 8), (8, 32), (3, 16, 16), (17, 17)])
def test_spectral_norm_equals_the_svds(shape, x64):
    """`spectral_norm`: sqrt of the largest Jacobi eigenvalue of the smaller Gram matrix up to 16 on
    the smaller side (no LAPACK call), an SVD above; equal to NumPy's 2-norm to rounding, graded and
    rank-one matrices included, and with the SVD's gradient."""
    from meanfield.model.spectral import spectral_norm

    rng = np.random.default_rng(sum(shape))
    A = rng.standard_normal(shape)
    A[..., 0, :] *= 1e4  # graded rows
    ones = np.ones(shape[-2:])  # rank one
    for M in (A, ones):
        want = np.linalg.norm(M, 2, axis=(-2, -1))
        np.testing.assert_allclose(spectral_norm(jnp.asarray(M)), want, rtol=1e-13)
        np.testing.assert_allclose(spectral_norm(jnp.asarray(M, jnp.float32)), want, rtol=2e-6)
    lapack = "lapack" in jax.jit(spectral_norm).lower(jnp.asarray(A, jnp.float32)).as_text()
    assert lapack == (min(shape[-2:]) > 16)
    B = jnp.asarray(rng.standard_normal(shape[-2:]))
    np.testing.assert_allclose(jax.grad(spectral_norm)(B), jax.grad(lambda b: jnp.linalg.norm(b, 2))(B), atol=1e-10)


def test_spectral_ratio_rejects_bad_rho(key):
    with pytest.raises(ValueError, match="rho"):
        mf.with_spectral_ratio(mf.Model.random(key, 3), 0.0)
    with pytest.raises(ValueError, match="no MLP"):
        mf.with_spectral_ratio(mf.Model.random(key, 3, mlp="none"), 1.0)


def test_piecewise_layers(key):
    k1, k2, k3 = jax.random.split(key, 3)
    layers = [mf.Model.random(k, 3, beta=float(i + 1)) for i, k in enumerate((k1, k2, k3))]
    pw = mf.Model.piecewise(layers, times=[1.0, 2.5])
    assert pw.n_layers == 3
    for t, i in ((0.0, 0), (0.99, 0), (1.0, 1), (2.4, 1), (2.5, 2), (10.0, 2)):
        np.testing.assert_array_equal(pw.at(t).V, layers[i].V)
        assert float(pw.at(t).beta) == i + 1
    np.testing.assert_array_equal(pw.layer(1).W1, layers[1].W1)
    # Per-layer spectral ratio and setter.
    pw2 = mf.with_spectral_ratio(pw, jnp.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(mf.spectral_ratio(pw2), [0.5, 1.0, 2.0], rtol=1e-6)
    with pytest.raises(ValueError, match="times"):
        mf.Model.piecewise(layers, times=[1.0])
    with pytest.raises(ValueError, match="differs"):
        mf.Model.piecewise([layers[0], mf.Model.random(k1, 3, mlp="affine")], times=[1.0])


def test_replace(key):
    m = mf.Model.random(key, 3)
    assert float(m.replace(beta=4.0).beta) == 4.0
    with pytest.raises(ValueError, match="shape"):
        m.replace(V=np.eye(2))
    with pytest.raises(ValueError, match="not an array field"):
        m.replace(norm="sphere")
