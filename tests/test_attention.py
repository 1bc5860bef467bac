import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield as mf

VARIANTS = [("softmax", False), ("softmax", True), ("unnormalised", False), ("unnormalised", True), ("shaped", False), ("shaped", True)]


@pytest.mark.parametrize("attention, causal", VARIANTS)
def test_blocked_equals_dense(key, attention, causal):
    k1, k2 = jax.random.split(key)
    model = mf.Model.random(k1, 4, attention=attention, causal=causal, beta=2.0)
    X = jax.random.normal(k2, (300, 4))  # 300 is not a multiple of the block size
    dense = mf.dense_attention(model, X)
    blocked = mf.blocked_attention(model, X, block_size=64)
    np.testing.assert_allclose(blocked, dense, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(dense))))


def _numpy_attention(model, X, attention, causal):
    """Direct transcription of the formulas in float64."""
    X = np.asarray(X, np.float64)
    Q, K, V, beta = (np.asarray(a, np.float64) for a in (model.Q, model.K, model.V, model.beta))
    n = X.shape[0]
    logits = beta * (X @ Q.T) @ (X @ K.T).T
    v = X @ V.T
    out = np.zeros_like(v)
    for i in range(n):
        js = np.arange(i + 1) if causal else np.arange(n)
        w = np.exp(logits[i, js])
        if attention == "softmax":
            out[i] = (w / w.sum()) @ v[js]
        elif attention == "unnormalised":
            out[i] = w @ v[js] / n
        else:
            out[i] = v[i] + (w / w.sum() - 1.0 / len(js)) @ v[js]
    return out


@pytest.mark.parametrize("attention, causal", VARIANTS)
def test_dense_matches_formula(key, attention, causal):
    k1, k2 = jax.random.split(key)
    model = mf.Model.random(k1, 3, attention=attention, causal=causal, beta=1.5)
    X = jax.random.normal(k2, (17, 3))
    np.testing.assert_allclose(mf.dense_attention(model, X), _numpy_attention(model, X, attention, causal), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("qk_dim", [2, 5])
def test_dense_matches_formula_for_any_key_width(key, qk_dim):
    """Keys narrower than d take the two projections, wider ones the d x d product beta Q^T K."""
    k1, k2 = jax.random.split(key)
    model = mf.Model.random(k1, 3, qk_dim=qk_dim, beta=1.5)
    X = jax.random.normal(k2, (17, 3))
    np.testing.assert_allclose(mf.dense_attention(model, X), _numpy_attention(model, X, "softmax", False), rtol=1e-4, atol=1e-5)


def test_zero_temperature_limits(key):
    """beta = 0: softmax is the mean of V x, causal softmax the prefix mean, shaped is V x_i."""
    X = jax.random.normal(key, (9, 3))
    V = np.diag([1.0, 2.0, -1.0])
    base = dict(Q=np.eye(3), K=np.eye(3), V=V, beta=0.0)
    v = np.asarray(X) @ V.T
    np.testing.assert_allclose(mf.dense_attention(mf.Model(**base), X), np.broadcast_to(v.mean(0), v.shape), atol=1e-6)
    prefix = np.cumsum(v, 0) / np.arange(1, 10)[:, None]
    np.testing.assert_allclose(mf.dense_attention(mf.Model(**base, causal=True), X), prefix, atol=1e-6)
    np.testing.assert_allclose(mf.dense_attention(mf.Model(**base, attention="shaped"), X), v, atol=1e-6)


def test_causal_first_token_attends_to_itself(key):
    model = mf.Model.random(key, 3, causal=True)
    X = jax.random.normal(key, (5, 3))
    np.testing.assert_allclose(mf.dense_attention(model, X)[0], X[0] @ model.V.T, rtol=1e-6)


def test_sphere_projection_is_tangent(key):
    model = mf.Model.random(key, 4, norm="sphere")
    X = mf.sphere_uniform(key, 50, 4)
    F = mf.token_velocity(model, X)
    np.testing.assert_allclose(jnp.sum(F * X, -1), 0.0, atol=1e-5)


def test_bad_evaluator(key):
    with pytest.raises(ValueError, match="evaluator"):
        mf.attention(mf.Model.random(key, 2), jnp.ones((3, 2)), "flash")
    with pytest.raises(ValueError, match="block_size"):
        mf.Blocked(block_size=0)
    with pytest.raises(ValueError, match="orders"):
        mf.LowRank(orders=(0, 3))


@pytest.mark.parametrize("attention, causal", VARIANTS)
def test_every_evaluator_agrees_with_dense(x64, key, attention, causal):
    """Blocked, LowRank (fixed orders, tight bound) and an unresolved Auto give Dense's numbers to float
    rounding; LowRank on shaped attention is its fallback."""
    k1, k2 = jax.random.split(key)
    model = mf.Model.random(k1, 3, attention=attention, causal=causal, beta=0.5, dtype=jnp.float64)
    X = 0.5 * jax.random.normal(k2, (300, 3), jnp.float64)
    dense = mf.attention(model, X, mf.Dense())
    scale = float(jnp.max(jnp.abs(dense)))
    lowrank = mf.LowRank(orders=(16, 16, 16), rtol=1e-10, fallback=mf.Dense())
    for evaluator in (mf.Blocked(block_size=64), mf.Auto(), None, lowrank):
        out = jax.jit(lambda X, e=evaluator: mf.attention(model, X, e))(X)
        np.testing.assert_allclose(out, dense, rtol=1e-10, atol=1e-10 * scale, err_msg=repr(evaluator))
    if attention != "shaped":
        _, info = mf.lowrank_attention(model, X, orders=lowrank.orders, rtol=lowrank.rtol, fallback=mf.Dense(),
                                       return_info=True)
        assert not bool(info.fallback)  # the low-rank sum itself was checked, not its fallback


def test_evaluators_are_equal_and_hashable():
    """Frozen value objects: equal when their settings are, usable as static jit arguments."""
    assert mf.Dense() == mf.Dense() and hash(mf.Dense()) == hash(mf.Dense())
    assert mf.Blocked() == mf.Blocked(1024) and mf.Blocked(512) != mf.Blocked(1024)
    assert mf.LowRank([3, 4], 1e-6) == mf.LowRank((3, 4), 1e-6)
    assert hash(mf.LowRank((3, 4), 1e-6)) == hash(mf.LowRank([3, 4], 1e-6))
    assert mf.LowRank((3, 4), fallback=mf.Dense()) != mf.LowRank((3, 4))
    assert mf.Auto() == mf.Auto(None) and mf.Auto(1e-4) != mf.Auto() and mf.Dense() != mf.Blocked()
    assert len({mf.Dense(), mf.Dense(), mf.Blocked(), mf.Auto(), mf.LowRank((2, 2))}) == 4
    with pytest.raises(Exception):
        mf.Blocked().block_size = 3  # frozen
    g = jax.jit(lambda X, e: mf.attention(mf.Model.random(jax.random.key(0), 2), X, e), static_argnums=1)
    X = jnp.ones((5, 2))
    np.testing.assert_allclose(g(X, mf.Blocked(2)), g(X, mf.Dense()), rtol=1e-6)


@pytest.mark.parametrize("attention", ["softmax", "unnormalised"])
def test_attention_rows_is_a_subset_of_dense(key, attention):
    """Queries = the first 37 tokens: the same rows as the full dense attention; causal is refused."""
    k1, k2 = jax.random.split(key)
    model = mf.Model.random(k1, 4, attention=attention, beta=2.0)
    X = jax.random.normal(k2, (300, 4))
    dense = mf.dense_attention(model, X)
    rows = mf.model.attention.attention_rows(model, X[:37], X, block_size=64)
    np.testing.assert_allclose(rows, dense[:37], rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(dense))))
    with pytest.raises(ValueError, match="non-causal"):
        mf.model.attention.attention_rows(mf.Model.random(k1, 4, causal=True), X[:3], X)
