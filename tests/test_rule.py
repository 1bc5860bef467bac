"""The 1:1 rule's propagation (meanfield.rule) against a direct NumPy computation and the synthetic construction's closed forms."""

import jax
import numpy as np
import pytest

from meanfield import rule


def numpy_rule(W_mlp, W_attn, *, store=np.float64):
    """C_0 = I, A = I + W_mlp + W_attn, C <- A C A^T / ||.||_2 in float64, stored in `store`; erank and floored cond."""
    L, d, _ = W_mlp.shape
    C = np.eye(d)
    erank, cond = [], []
    for l in range(L):
        A = np.eye(d) + W_mlp[l].astype(np.float64) + W_attn[l].astype(np.float64)
        M = A @ C.astype(np.float64) @ A.T
        M = M / np.linalg.norm(M, 2)
        lam = np.clip(np.linalg.eigvalsh(M), 0, None)
        p = lam / lam.sum()
        p = p[p > 0]
        erank.append(np.exp(-np.sum(p * np.log(p))))
        floor = np.finfo(np.float64).eps * max(1.0, lam[-1]) * d
        cond.append(lam[-1] / lam[lam > floor].min())
        C = M.astype(store)
    return np.array(erank), np.array(cond)


@pytest.fixture
def mats():
    rng = np.random.default_rng(0)
    L, d = 3, 16
    return (0.3 * rng.standard_normal((L, d, d)) / np.sqrt(d)).astype(np.float32), \
        (0.5 * rng.standard_normal((L, d, d)) / np.sqrt(d)).astype(np.float32)


def test_propagate_matches_numpy(mats):
    W_mlp, W_attn = mats
    er64, cond64 = numpy_rule(W_mlp, W_attn)
    t = rule.propagate(W_mlp, W_attn, dtype="float64")
    assert t.erank.dtype == np.float64 and t.erank.shape == (3,)
    np.testing.assert_allclose(t.erank, er64, rtol=1e-10)
    np.testing.assert_allclose(t.cond, cond64, rtol=1e-8)
    # the rule's per-model precision: float64 steps, float32 storage
    er_s, cond_s = numpy_rule(W_mlp, W_attn, store=np.float32)
    t = rule.propagate(W_mlp, W_attn, dtype="float64", store_dtype="float32")
    np.testing.assert_allclose(t.erank, er_s, rtol=1e-9)
    np.testing.assert_allclose(t.cond, cond_s, rtol=1e-6)
    # float32 throughout (the synthetic script)
    t = rule.propagate(W_mlp, W_attn)
    assert t.erank.dtype == np.float32
    np.testing.assert_allclose(t.erank, er64, rtol=1e-5)
    np.testing.assert_allclose(t.cond, cond64, rtol=1e-3)


def test_propagate_identity_and_floor():
    d = 16
    Z = np.zeros((2, d, d), np.float32)
    t = rule.propagate(Z, Z)
    np.testing.assert_allclose(t.erank, d, rtol=1e-6)
    np.testing.assert_allclose(t.cond, 1.0, rtol=1e-6)
    # A = I + W with W = P - I (P a rank-3 projector): A = P, so C = P after one layer: erank 3, and the
    # zero eigenvalues fall below the rule's floor eps * d, so the condition number is 1, not infinite.
    Q = np.linalg.qr(np.random.default_rng(1).standard_normal((d, 3)))[0]
    W = np.broadcast_to(Q @ Q.T - np.eye(d), (2, d, d)).astype(np.float32)
    t = rule.propagate(W, np.zeros_like(W))
    np.testing.assert_allclose(t.erank, 3.0, rtol=1e-4)
    np.testing.assert_allclose(t.cond, 1.0, rtol=1e-4)
    assert np.all(t.lam_min < 1e-5)


def test_spectrum_stats_rule_floor():
    lam = np.array([1e-20, 1e-3, 0.5, 1.0])
    erank, cond, lam_min = rule.spectrum_stats(np.asarray(lam, np.float32), 4)
    p = lam / lam.sum()
    np.testing.assert_allclose(erank, np.exp(-np.sum(p * np.log(p))), rtol=1e-5)
    np.testing.assert_allclose(cond, 1e3, rtol=1e-5)  # 1e-20 is below eps * 1 * 4


def test_balance_ratio(mats):
    W_mlp, W_attn = mats
    expected = [np.linalg.svd(a.astype(np.float64), compute_uv=False)[0] / np.linalg.svd(b.astype(np.float64), compute_uv=False)[0]
                for a, b in zip(W_mlp, W_attn)]
    np.testing.assert_allclose(rule.balance_ratio(W_mlp, W_attn), expected, rtol=1e-12)


@pytest.mark.parametrize("rho", [0.1, 0.5, 0.97, 1.0, 1.3, 20.0])
def test_spiked_pair_closed_forms(rho):
    U, V = rule.random_bases(jax.random.key(3), 24)
    W_mlp, W_attn = (np.asarray(w, np.float64) for w in rule.spiked_pair(U, V, rho))
    s_m = np.linalg.svd(W_mlp, compute_uv=False)
    s_a = np.linalg.svd(W_attn, compute_uv=False)
    s_sum = np.linalg.svd(W_mlp + W_attn, compute_uv=False)
    np.testing.assert_allclose(s_a[0], 5.0, rtol=1e-5)
    np.testing.assert_allclose(s_m[0] / s_a[0], rho, rtol=1e-5)  # the construction's rho is the target
    np.testing.assert_allclose(s_sum[0], max(5 * abs(rho - 1), 1.0), rtol=1e-5)
    np.testing.assert_allclose(rule.sum_top_singular_value(rho), max(5 * abs(rho - 1), 1.0))
    # the bulk: W_mlp + W_attn = U diag(5(rho-1), 1, ..., 1) V^T
    expected = np.sort(np.r_[abs(5 * (rho - 1)), np.ones(23)])
    np.testing.assert_allclose(np.sort(s_sum), expected, rtol=1e-5, atol=1e-5)


def test_synthetic_sweep_small():
    rhos = [0.1, 1.0, 20.0]
    r = rule.synthetic_sweep(jax.random.key(0), rhos, d=16, num_layers=6, n_seeds=2)
    assert r["erank"].shape == (3, 2, 6) and r["cond"].shape == (3, 2, 6) and r["sigma_sum"].shape == (3, 2)
    np.testing.assert_allclose(r["sigma_sum"], np.broadcast_to(r["sigma_sum_expected"][:, None], (3, 2)), rtol=1e-5)
    np.testing.assert_allclose(r["sigma_sum_expected"], [4.5, 1.0, 95.0])
    assert np.all((r["erank"] >= 1 - 1e-4) & (r["erank"] <= 16 + 1e-3))
    # one (rho, seed) against the NumPy reference, rebuilt from the same bases
    U, V = rule.random_bases(jax.random.split(jax.random.key(0), 2)[1], 16)
    W_mlp, W_attn = (np.asarray(w) for w in rule.spiked_pair(U, V, 20.0))
    er, _ = numpy_rule(np.broadcast_to(W_mlp, (6, 16, 16)), np.broadcast_to(W_attn, (6, 16, 16)), store=np.float32)
    np.testing.assert_allclose(r["erank"][2, 1], er, rtol=2e-3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="float32 or float64"):
        rule.propagate(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), dtype="float16")
    with pytest.raises(ValueError, match=r"\(L, d, d\)"):
        rule.propagate(np.zeros((2, 2)), np.zeros((2, 2)))
