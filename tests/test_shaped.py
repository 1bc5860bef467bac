"""Shaped transformer (Noci et al. 2023) vs its kernel SDE, against the numbers of docs/shaped_sde.md.

Statistical tolerances are stated per test. A control variate is a term with exactly zero mean,
computed from the same standard normals the simulator consumed; we subtract it to cut the
variance of one-step drift estimates (docs/shaped_sde.md §3).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meanfield.shaped import finite_width as net
from meanfield.shaped import sde

V0_M3 = np.array([[1.0, 0.6, 0.2], [0.6, 1.3, -0.1], [0.2, -0.1, 0.8]])
IU = np.triu_indices(3)  # entries (11, 12, 13, 22, 23, 33)
ATTN = dict(gamma_attn2=0.5, gamma_mlp2=0.0, tau0=0.5, c_plus=0.0, c_minus=0.0)
MLP = dict(gamma_attn2=0.0, gamma_mlp2=0.5, tau0=0.5, c_plus=1.0, c_minus=-1.0)
B_ATTN_REF = np.array([0.2356, 0.1127, 0.0524, 0.3842, -0.0182, 0.3164])  # docs/shaped_sde.md §3
B_MLP_REF = np.array([0.0, 0.1145, 0.1919, 0.0, 0.3762, 0.0])  # docs/shaped_sde.md §3
FIG = dict(gamma_attn2=0.3, gamma_mlp2=0.2, tau0=0.5, c_plus=1.0, c_minus=-1.0)


def _sym_cov(A):
    """Sample covariance of flattened (N, m, m) samples: (m*m, m*m)."""
    A = np.asarray(A, np.float64).reshape(A.shape[0], -1)
    return np.cov(A.T)


# -- (i) drift: the formula, then the finite network --------------------------------------------
def test_drift_formula_reproduces_reference_numbers(x64):
    V = jnp.asarray(V0_M3)
    np.testing.assert_allclose(np.asarray(sde.shaped_drift(V, **ATTN))[IU], B_ATTN_REF, atol=1e-3 * 0.51)
    np.testing.assert_allclose(np.asarray(sde.shaped_drift(V, **MLP))[IU], B_MLP_REF, atol=1e-3 * 0.51)
    # m = 2: the u-term vanishes and attention's drift is proportional to V (docs/shaped_sde.md §4).
    V2 = jnp.array([[1.0, 0.3], [0.3, 2.0]])
    b2 = sde.shaped_drift(V2, gamma_attn2=0.5, gamma_mlp2=0.0, tau0=0.5)
    np.testing.assert_allclose(b2 / V2, jnp.full((2, 2), b2[0, 0] / V2[0, 0]), rtol=1e-12)


def _attention_drift_estimate(key, n, n_samples, *, gamma_attn2, tau0, n_k=16):
    """n (dV - C) per sample, for the in-law attention sub-layer (`attention_in_law`) at V0_M3.

    C = lam gam (XY^T + YX^T)/n + gam^2 (YY^T/n - V) + gam^2 (S YY^T/n + YY^T S^T/n)
        + lam gam (XY^T S^T + S YX^T)/n,
    with Y = chol(V) N_V and S = (QK^T/tau) P / m, the linear part of softmax - 11^T/m. Each term has
    mean exactly 0 (E Y = 0, E YY^T/n = V, E S = 0, and S is independent of Y).
    """
    m = 3
    V = jnp.asarray(V0_M3, jnp.float32)
    L0 = jnp.asarray(np.linalg.cholesky(V0_M3), jnp.float32)
    P = jnp.eye(m) - 1.0 / m
    X = net.tokens_from_kernel(V, n)
    lam, gam = math.sqrt(1 - gamma_attn2), math.sqrt(gamma_attn2)
    tau = tau0 * math.sqrt(n * n_k)

    def one(k):
        k1, k2, k3 = jax.random.split(k, 3)
        noise = dict(N_Q=jax.random.normal(k1, (m, n_k)), N_K=jax.random.normal(k2, (m, n_k)),
                     N_V=jax.random.normal(k3, (m, n)))
        dV = net.gram(net.attention_in_law(X, noise, gamma_attn2=gamma_attn2, tau0=tau0)) - V
        Y, Q, K = L0 @ noise["N_V"], L0 @ noise["N_Q"], L0 @ noise["N_K"]
        S = (Q @ K.T / tau) @ P / m
        YY, XY = Y @ Y.T / n, X @ Y.T / n
        C = (lam * gam * (XY + XY.T) + gamma_attn2 * (YY - V) + gamma_attn2 * (S @ YY + YY @ S.T)
             + lam * gam * (XY @ S.T + S @ XY.T))
        return n * (dV - C)

    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(key, n_samples)), np.float64)


def _mlp_drift_estimate(key, n, n_samples, *, gamma_mlp2, c_plus, c_minus):
    """n (dV - C) per sample, for the in-law MLP sub-layer (`mlp_in_law`) at V0_M3.

    With U = chol(V) N_pre, H = phi(U), R = chol(HH^T/n) N_post:
    C = lam gam sqrt(c) (XR^T + RX^T)/n + gam^2 c (RR^T - HH^T)/n + gam^2 (UU^T/n - V)
        + gam^2 c (c+ - c-)/(2 sqrt n) (U|U|^T + |U|U^T)/n,
    each of mean exactly 0 (the last one because u -> -u flips its sign).
    """
    m = 3
    V = jnp.asarray(V0_M3, jnp.float32)
    L0 = jnp.asarray(np.linalg.cholesky(V0_M3), jnp.float32)
    X = net.tokens_from_kernel(V, n)
    lam, gam = math.sqrt(1 - gamma_mlp2), math.sqrt(gamma_mlp2)
    s_plus, s_minus, c = net.relu_slopes(n, c_plus, c_minus)

    def one(k):
        k1, k2 = jax.random.split(k)
        noise = dict(N_pre=jax.random.normal(k1, (m, n)), N_post=jax.random.normal(k2, (m, n)))
        dV = net.gram(net.mlp_in_law(X, noise, gamma_mlp2=gamma_mlp2, c_plus=c_plus, c_minus=c_minus)) - V
        U = L0 @ noise["N_pre"]
        H = net.shaped_leaky_relu(U, s_plus=s_plus, s_minus=s_minus)
        HH = H @ H.T / n
        R = jnp.linalg.cholesky(HH) @ noise["N_post"]
        XR = X @ R.T / n
        UA = U @ jnp.abs(U).T / n
        C = (lam * gam * math.sqrt(c) * (XR + XR.T) + gamma_mlp2 * c * (R @ R.T / n - HH)
             + gamma_mlp2 * (U @ U.T / n - V)
             + gamma_mlp2 * c * (c_plus - c_minus) / (2 * math.sqrt(n)) * (UA + UA.T))
        return n * (dV - C)

    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(key, n_samples)), np.float64)


def _check_drift(samples, reference, *, bias):
    est = samples.mean(0)[IU]
    se = samples.std(0)[IU] / math.sqrt(samples.shape[0])
    tol = 4.0 * se + bias
    assert np.all(np.abs(est - reference) < tol), dict(est=est.round(4), ref=reference, se=se.round(4))
    return est, se


def test_one_step_drift_attention_matches_sde(key):
    """n E[dV] of one attention sub-layer at n = 256 vs b(V0). Tolerance: 4 SE (SE ~ .002-.005 with the
    control variate, N = 2e4) + .008 for the O(1/n) finite-width bias (docs/shaped_sde.md §5: entry 22 is
    .3793 at n = 256 vs .3842)."""
    samples = _attention_drift_estimate(key, 256, 20_000, gamma_attn2=0.5, tau0=0.5)
    theory = np.asarray(sde.shaped_drift(jnp.asarray(V0_M3), **ATTN))[IU]
    est, se = _check_drift(samples, theory, bias=0.008)
    assert se.max() < 0.01, se  # the control variate works: raw SEs are .1-.2 at this N
    # Power: the drift without the quadratic-softmax (u) term is excluded by this estimate.
    no_u = np.asarray((ATTN["gamma_attn2"] / ATTN["tau0"] ** 2) * np.trace(
        (np.eye(3) - 1 / 3) @ V0_M3 @ (np.eye(3) - 1 / 3) @ V0_M3) / 9 * V0_M3)[IU]
    assert np.max(np.abs(est - no_u) / (4 * se + 0.008)) > 1.0


def test_one_step_drift_mlp_matches_sde(key):
    """Same for one MLP sub-layer (c+ = -c- = 1, so the O(n^{-1/2}) drift bias vanishes).
    With c+ = -c-, phi(u) = u + |u|/sqrt(n), and the control variate removes all noise but an
    O(n^{-1/2}) remainder, so SE ~ 3e-4 (N = 2e4). Tolerance: 4 SE + .01 for the finite-width bias
    (measured gaps <= .002)."""
    samples = _mlp_drift_estimate(key, 256, 20_000, gamma_mlp2=0.5, c_plus=1.0, c_minus=-1.0)
    theory = np.asarray(sde.shaped_drift(jnp.asarray(V0_M3), **MLP))[IU]
    np.testing.assert_allclose(theory, B_MLP_REF, atol=5e-4)
    est, se = _check_drift(samples, theory, bias=0.01)
    # Power: an unshaped (plain linear, nu = 0) MLP drift would be 0 off the diagonal.
    assert abs(est[4]) > 0.3  # entry 23: theory .3762


# -- (ii) diffusion --------------------------------------------------------------------------------
def test_em_noise_has_exact_diffusion_covariance(x64):
    """dM is linear in (dW1, dW2); its covariance J J^T must equal Sigma(V) to rounding."""
    V = jnp.asarray(V0_M3)
    hyper = dict(gamma_attn2=0.5, gamma_mlp2=0.3, tau0=0.7)
    a_lin, a_G = sde.diffusion_coefficients(**hyper, m=3)
    L, F = sde.noise_factors(V)
    np.testing.assert_allclose(L @ L.T, V, atol=1e-12)
    J = jax.jacfwd(lambda w: sde.shaped_noise(L, F, w, a_lin=a_lin, a_G=a_G))(jnp.zeros((2, 3, 3)))
    J = J.reshape(9, 18)
    Sigma = sde.shaped_diffusion_cov(V, **hyper).reshape(9, 9)
    np.testing.assert_allclose(J @ J.T, Sigma, atol=1e-12)


def test_one_step_covariance_matches_diffusion(key):
    """n Cov(dV) of one full block (attention then MLP) at n = 256 vs Sigma(V0).
    Relative Frobenius error: measured 1.7-2.3% at N = 2e4 over seeds (sampling error ~1-2%, finite-n
    bias ~.7%, docs/shaped_sde.md §5); here N = 4e4; tolerance 5%. Power: the same estimate is more than 5% away
    from Sigma without the a_G (logit) term (~11%) and from Sigma with a_lin x 1.1 (~7%)."""
    n, m, N = 256, 3, 40_000
    hyper = dict(gamma_attn2=0.5, gamma_mlp2=0.5, tau0=0.5, c_plus=1.0, c_minus=-1.0)
    V = jnp.asarray(V0_M3, jnp.float32)
    X = net.tokens_from_kernel(V, n)

    def one(k):
        return net.gram(net.block_in_law(X, net.block_noise(k, m, n, 16, jnp.float32), **hyper)) - V

    dV = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(key, N)))
    C = n * _sym_cov(dV)
    cov_kw = dict(gamma_attn2=0.5, gamma_mlp2=0.5)
    Sigma = np.asarray(sde.shaped_diffusion_cov(jnp.asarray(V0_M3), **cov_kw, tau0=0.5)).reshape(9, 9)
    Sigma_lin = np.asarray(sde.shaped_diffusion_cov(jnp.asarray(V0_M3), **cov_kw, tau0=np.inf)).reshape(9, 9)
    rel = lambda A: np.linalg.norm(C - A) / np.linalg.norm(A)  # noqa: E731
    assert rel(Sigma) < 0.05, rel(Sigma)
    assert rel(Sigma_lin) > 0.05 and rel(Sigma + 0.1 * Sigma_lin) > 0.05, (rel(Sigma_lin), rel(Sigma + 0.1 * Sigma_lin))


def test_sde_single_euler_step_has_drift_and_diffusion(key):
    """One Euler-Maruyama step of size dt = 1 through diffrax: V1 - V0 ~ N(b(V0), Sigma(V0)).
    This checks the terms and the Brownian increment scale. Mean: within 4 SE (SE = sqrt(Sigma/N) ~ .01).
    Covariance: relative Frobenius error < 5% (sampling ~2%)."""
    hyper = dict(gamma_attn2=0.5, gamma_mlp2=0.5, tau0=0.5, c_plus=1.0, c_minus=-1.0)
    V = jnp.asarray(V0_M3, jnp.float32)
    sol = sde.simulate_shaped_sde(key, V, 1.0, dt=1.0, n_paths=10_000, n_save=2, **hyper, explode_threshold=1e30)
    dV = np.asarray(sol.kernels[:, -1] - V, np.float64)
    b = np.asarray(sde.shaped_drift(V, **hyper))
    Sigma = np.asarray(sde.shaped_diffusion_cov(V, gamma_attn2=0.5, gamma_mlp2=0.5, tau0=0.5)).reshape(9, 9)
    se = np.sqrt(np.diag(Sigma).reshape(3, 3) / dV.shape[0])
    assert np.all(np.abs(dV.mean(0) - b) < 4 * se), (dV.mean(0), b, se)
    C = _sym_cov(dV)
    assert np.linalg.norm(C - Sigma) / np.linalg.norm(Sigma) < 0.05


# -- (iii) SDE paths ------------------------------------------------------------------------------
def test_sde_paths_stay_psd_over_short_horizon(key):
    """T = 0.2, dt = 1e-3, 200 paths from V0_M3 (figure parameters). A few paths may blow up already:
    the drift is cubic, and 13.5-14% do by T = 1 (docs/shaped_sde.md §4), so we allow up to 5%. Every other
    saved kernel is PSD (no eigenvalue clip was needed)."""
    sol = sde.simulate_shaped_sde(key, jnp.asarray(V0_M3, jnp.float32), 0.2, dt=1e-3, n_paths=200, n_save=21, **FIG)
    assert sol.kernels.shape == (200, 21, 3, 3) and sol.ts.shape == (21,)
    ex = np.asarray(sol.exploded)
    assert ex.mean() <= 0.05, ex.mean()
    assert bool(jnp.all(jnp.isfinite(sol.kernels)))
    assert float(np.min(np.asarray(sol.min_eig)[~ex])) > 0.0
    np.testing.assert_allclose(sol.kernels[~ex], jnp.swapaxes(sol.kernels[~ex], -1, -2), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(sol.kernels[:, 0], jnp.broadcast_to(V0_M3, (200, 3, 3)), atol=1e-6)


def test_sde_exploded_paths_are_flagged_and_frozen(key):
    """A large kernel with small tau0 explodes (cubic drift); those paths are frozen, never NaN.
    (Same grid and path count as the PSD test, so the compiled solve is shared.)"""
    V = 5.0 * jnp.asarray(V0_M3, jnp.float32)
    sol = sde.simulate_shaped_sde(key, V, 0.2, dt=1e-3, n_paths=200, n_save=21, gamma_attn2=0.5, gamma_mlp2=0.0,
                                  tau0=0.3, explode_threshold=1e3)
    ex = np.asarray(sol.exploded)
    assert 0 < ex.sum() < 200
    K = np.asarray(sol.kernels)
    assert np.all(np.isfinite(K))
    tr = np.trace(K, axis1=-2, axis2=-1)
    assert np.all(tr[~ex] <= 1e3)
    assert np.all((tr[ex, -1] > 1e3) | (np.abs(K[ex, -1]).max(axis=(-1, -2)) > 1e3))
    # Frozen: the last two saves are identical for paths that exploded before the second-to-last save.
    early = ex & (tr[:, -2] > 1e3)
    assert early.any()
    np.testing.assert_array_equal(K[early, -1], K[early, -2])


# -- (iv) determinism, shapes, dtypes ---------------------------------------------------------------
def test_network_is_deterministic_with_shapes(key):
    V = jnp.asarray(V0_M3, jnp.float32)
    f = lambda k: net.shaped_network_kernels(k, V, n=32, depth_ratio=0.5, **FIG)  # noqa: E731
    a, b = f(key), f(key)
    assert a.shape == (17, 3, 3) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, f(jax.random.key(1)))
    batch = jax.vmap(f)(jax.random.split(key, 4))
    assert batch.shape == (4, 17, 3, 3)
    np.testing.assert_allclose(batch[:, 0], jnp.broadcast_to(V, (4, 3, 3)), atol=1e-5)
    np.testing.assert_allclose(batch[0], f(jax.random.split(key, 4)[0]), rtol=1e-5, atol=1e-6)


def test_sde_is_deterministic_with_shapes_and_chunking(key):
    V = jnp.asarray(V0_M3, jnp.float32)
    run = lambda k, **kw: sde.simulate_shaped_sde(k, V, 0.2, dt=1e-3, n_paths=200, n_save=21, **FIG, **kw)  # noqa: E731
    s1, s2 = run(key), run(key)
    np.testing.assert_array_equal(s1.kernels, s2.kernels)
    assert not np.array_equal(s1.kernels, run(jax.random.key(1)).kernels)
    ts, Vs, exploded = s1
    assert Vs.shape == (200, 21, 3, 3) and exploded.shape == (200,) and s1.min_eig.shape == (200, 21)
    assert s1.correlations.shape == (200, 21, 3)
    np.testing.assert_allclose(ts, np.linspace(0, 0.2, 21), atol=1e-6)
    # Path i depends on key i only: chunks of 64 (last one padded) give the same paths.
    np.testing.assert_array_equal(run(key, batch_size=64).kernels, s1.kernels)


def test_sde_virtual_brownian_tree(key):
    V = jnp.asarray(V0_M3, jnp.float32)
    vt = sde.simulate_shaped_sde(key, V, 0.1, dt=1e-2, n_paths=3, n_save=3, brownian="virtual", **FIG)
    assert vt.kernels.shape == (3, 3, 3, 3) and bool(jnp.all(jnp.isfinite(vt.kernels)))
    assert not np.array_equal(vt.kernels[0, -1], vt.kernels[1, -1])


def test_float64_paths(x64, key):
    V = jnp.asarray(V0_M3, jnp.float64)
    Vs = net.shaped_network_kernels(key, V, n=16, depth_ratio=0.5, **FIG)
    assert Vs.dtype == jnp.float64
    np.testing.assert_allclose(Vs[0], V0_M3, atol=1e-13)
    sol = sde.simulate_shaped_sde(key, V, 0.05, dt=1e-2, n_paths=3, n_save=6, **FIG)
    assert sol.kernels.dtype == jnp.float64 and sol.ts.dtype == jnp.float64
    model = net.ShapedTransformer(8, 2, n_k=2, **FIG, dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert model(net.tokens_from_kernel(V, 8)).dtype == jnp.float64


def test_clipped_cholesky_and_correlations(x64):
    V = jnp.asarray(V0_M3)
    np.testing.assert_allclose(net.clipped_cholesky(V), np.linalg.cholesky(V0_M3), atol=1e-14)
    singular = jnp.array([[1.0, 1.0, 0.5], [1.0, 1.0, 0.5], [0.5, 0.5, 2.0]])  # rho12 = 1
    L = net.clipped_cholesky(singular)
    assert bool(jnp.all(jnp.isfinite(L)))
    np.testing.assert_allclose(L @ L.T, singular, atol=1e-12)
    corr = sde.kernel_correlations(V)
    np.testing.assert_allclose(jnp.diagonal(corr), 1.0)
    np.testing.assert_allclose(corr[0, 1], 0.6 / math.sqrt(1.3), rtol=1e-12)
    np.testing.assert_allclose(sde.offdiag_correlations(jnp.stack([V, V]))[1], corr[np.triu_indices(3, 1)])


def test_bad_arguments_are_rejected(key):
    V = jnp.asarray(V0_M3, jnp.float32)
    with pytest.raises(ValueError, match="gamma_attn2"):
        net.shaped_network_kernels(key, V, n=16, **{**FIG, "gamma_attn2": 1.5})
    with pytest.raises(ValueError, match="`n` must be >= "):
        net.shaped_network_kernels(key, V, n=2, **FIG)
    with pytest.raises(ValueError, match="T / dt"):
        sde.simulate_shaped_sde(key, V, 0.1, dt=0.03, n_paths=2, **FIG)
    with pytest.raises(ValueError, match="tau0"):
        sde.simulate_shaped_sde(key, V, 0.1, dt=0.01, n_paths=2, n_save=3, **{**FIG, "tau0": 0.0})
    with pytest.raises(ValueError, match="square"):
        sde.simulate_shaped_sde(key, V[:2], 0.1, dt=0.01, n_paths=2, **FIG)


def test_causal_attention_matrix_is_lower_triangular(key):
    Q, K = jax.random.normal(key, (2, 5, 4))
    A = net.attention_matrix(Q, K, n=16, tau0=0.5, causal=True, shaped=True)
    np.testing.assert_allclose(jnp.triu(A, 1), 0.0)
    np.testing.assert_allclose(A.sum(-1), 1.0, rtol=1e-6)  # I + (softmax - C): rows of softmax - C sum to 0
    S = net.attention_matrix(Q, K, n=16, tau0=0.5, causal=True, shaped=False)
    np.testing.assert_allclose(jnp.triu(S, 1), 0.0)
    np.testing.assert_allclose(S.sum(-1), 1.0, rtol=1e-6)
    assert net.shaped_network_kernels(key, jnp.eye(5), n=8, n_k=4, causal=True, **FIG).shape == (9, 5, 5)


# -- (v) literal weights vs fast simulator -----------------------------------------------------------
def test_literal_network_matches_fast_simulator_in_distribution(key):
    """n = 16, L = 8 blocks, m = 3, 3000 networks each. The mean and second moment of every entry of
    V_L, and the mean of every correlation, agree within 4.5 combined SEs."""
    n, L, B = 16, 8, 3000
    V = jnp.asarray(V0_M3, jnp.float32)
    X0 = net.tokens_from_kernel(V, n)
    kw = dict(n_k=4, **FIG)

    def literal(k):
        return net.ShapedTransformer(n, L, **kw, rngs=nnx.Rngs(params=k))(X0)

    k1, k2 = jax.random.split(key)
    lit = np.asarray(jax.jit(jax.vmap(literal))(jax.random.split(k1, B))[:, -1], np.float64)
    fast = np.asarray(jax.vmap(lambda k: net.shaped_network_kernels(k, V, n=n, n_blocks=L, **kw))(
        jax.random.split(k2, B))[:, -1], np.float64)
    for f in (lambda v: v[:, IU[0], IU[1]], lambda v: v[:, IU[0], IU[1]] ** 2,
              lambda v: np.asarray(sde.offdiag_correlations(v))):
        a, b = f(lit), f(fast)
        z = np.abs(a.mean(0) - b.mean(0)) / np.sqrt(a.var(0) / B + b.var(0) / B)
        assert np.all(z < 4.5), z
    # ...and both moved away from V0 (the check has something to detect).
    assert np.abs(lit.mean(0) - V0_M3).max() > 0.05


# -- (vi) rank collapse of unshaped attention -------------------------------------------------------
def test_unshaped_attention_collapses_shaped_does_not(key):
    """n = L = 32, attention only (gamma_a^2 = .3), rho0 = .3, 32 nets each. Standard softmax attention
    collapses the kernel: rho12 > .99 in every net (docs/shaped_sde.md §5: 1.0000). Shaped attention keeps it
    spread: mean rho12 < .7 and no net above .99."""
    V = jnp.array([[1.0, 0.3], [0.3, 1.0]])
    kw = dict(n=32, depth_ratio=1.0, gamma_attn2=0.3, gamma_mlp2=0.0, tau0=0.5)
    keys = jax.random.split(key, 32)
    corr = {s: np.asarray(sde.offdiag_correlations(jax.vmap(
        lambda k, s=s: net.shaped_network_kernels(k, V, shaped=s, **kw))(keys)[:, -1]))[:, 0] for s in (False, True)}
    assert np.all(corr[False] > 0.99), corr[False].min()
    assert corr[True].mean() < 0.7 and np.all(corr[True] < 0.99), corr[True]


# -- finite networks vs SDE at depth T ----------------------------------------------------------------
@pytest.mark.slow
def test_sde_matches_finite_networks_at_depth_one(key):
    """m = 2, rho0 = .3, T = 1, gamma_a^2 = .3, gamma_f^2 = .2, tau0 = .5, c+- = +-1: KS distance of the
    output rho12 between 3000 nets at n = 128 and 4000 SDE paths (exploded ones dropped) is < .06
    (docs/shaped_sde.md §5: .043 at n = 64, .0135 at n = 256; 5% critical value ~.03). The control SDE without
    the logit terms (tau0 = inf) is further away."""
    V = jnp.array([[1.0, 0.3], [0.3, 1.0]])
    k1, k2 = jax.random.split(key)
    nets = jax.vmap(lambda k: net.shaped_network_kernels(k, V, n=128, depth_ratio=1.0, **FIG))(jax.random.split(k1, 3000))
    corr_net = np.asarray(sde.offdiag_correlations(nets[:, -1]))[:, 0]
    sol = sde.simulate_shaped_sde(k2, V, 1.0, dt=2e-3, n_paths=4000, n_save=2, **FIG)
    corr_sde = np.asarray(sol.correlations[:, -1, 0])[~np.asarray(sol.exploded)]
    ks = sde.ks_distance(corr_net, corr_sde)
    assert ks < 0.06, ks
    ctrl = sde.simulate_shaped_sde(k2, V, 1.0, dt=2e-3, n_paths=4000, n_save=2, **{**FIG, "tau0": np.inf})
    ks_ctrl = sde.ks_distance(corr_net, np.asarray(ctrl.correlations[:, -1, 0])[~np.asarray(ctrl.exploded)])
    assert ks_ctrl > ks, (ks, ks_ctrl)


def test_ks_distance_is_the_two_sample_statistic():
    a = np.array([0.1, 0.4, 0.7])
    b = np.array([0.2, 0.3, 0.5, 0.9])
    # ECDF gap at x = .1: F_a = 1/3, F_b = 0 (the largest; at .7 it is 1 - 3/4).
    assert math.isclose(sde.ks_distance(a, b), 1 / 3, rel_tol=1e-12)
    assert sde.ks_distance(a, a) == 0.0
    assert sde.ks_distance(a, a + 10) == 1.0
