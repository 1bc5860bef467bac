import jax
import numpy as np
import pytest
import scipy.linalg as sla

import meanfield as mf
from meanfield.regimes.predicted import predict_regime, scalar_regime, simulated_regime, validation_grid


def _scalar(v, a, w):
    return mf.Model(Q=[[a]], K=[[1.0]], V=[[v]], W=[[w]], mlp="affine", dtype="float64")


@pytest.mark.parametrize(
    "v, a, w, s0, label, t_star",
    [
        (1.0, 1.0, 0.0, 1.0, "blowup", 0.5),                         # 1 / (2 v a s0)
        (1.0, 0.5, 0.3, 2.0, "blowup", np.log(1 + 0.3 / 1.0) / 0.6),  # ln(1 + w/(v a s0)) / (2w)
        (-1.0, 0.5, 0.4, 3.0, "equilibrium", None),                   # s -> -w/(v a) = 0.8
        (0.5, 2.0, -1.0, 0.5, "collapse", None),                      # w / (v a s0) < -1
        (-1.0, 1.0, 0.0, 1.0, "collapse", None),                      # s = s0 / (1 + 2 s0 t)
    ],
)
def test_scalar_closed_forms(x64, v, a, w, s0, label, t_star):
    got, det = predict_regime(_scalar(v, a, w), [0.0], [[s0]])
    assert got == label
    if t_star is not None:
        assert abs(det["blowup_time"] - t_star) < 1e-12
        sol = mf.simulate_gaussian(_scalar(v, a, w), [0.0], [[s0]], 3 * t_star)
        assert abs(float(sol.blowup_time) - t_star) / t_star < 1e-6
    if label == "equilibrium":
        assert abs(det["limit"] - (-w / (v * a))) < 1e-12


def test_scalar_regime_threshold():
    """w < 0 < c: threshold s0 = -w/c; above it blows up, below collapses."""
    assert scalar_regime(1.0, -1.0, 1.5)[0] == "blowup"
    assert scalar_regime(1.0, -1.0, 0.5)[0] == "collapse"


def _random_qk(key, d):
    k1, k2 = jax.random.split(key)
    return np.asarray(jax.random.normal(k1, (d, d))), np.asarray(jax.random.normal(k2, (d, d)))


def test_matrix_blowup_time_w0(x64, key):
    """V = vI, W = 0: T* = 1 / (2 beta v lambda_max(S0^1/2 Ms S0^1/2)), and simulate_gaussian agrees."""
    d, beta, v = 3, 0.7, 1.3
    Q, K = _random_qk(key, d)
    S0 = np.array([[1.0, 0.2, 0.0], [0.2, 0.5, 0.1], [0.0, 0.1, 0.8]])
    Ms = 0.5 * (Q.T @ K + K.T @ Q)
    h = sla.sqrtm(S0).real
    t_star = 1 / (2 * beta * v * np.linalg.eigvalsh(h @ Ms @ h)[-1])
    model = mf.Model(Q=Q, K=K, V=v * np.eye(d), W=np.zeros((d, d)), beta=beta, mlp="affine", dtype="float64")
    label, det = predict_regime(model, np.zeros(d), S0)
    assert label == "blowup" and abs(det["blowup_time"] - t_star) < 1e-12 * t_star
    sol = mf.simulate_gaussian(model, np.zeros(d), S0, 2 * t_star)
    assert abs(float(sol.blowup_time) - t_star) / t_star < 1e-6


def test_lyapunov_equilibrium(x64):
    """Re lambda(W) > 0, beta v Ms negative definite: S -> (P*)^{-1}, W^T P* + P* W = -2 beta v Ms."""
    d = 2
    Q = np.array([[1.0, 0.3], [0.0, 1.0]])
    K = -Q
    W = np.array([[0.5, 0.4], [-0.2, 0.8]])
    model = mf.Model(Q=Q, K=K, V=0.7 * np.eye(d), W=W, mlp="affine", dtype="float64")
    label, det = predict_regime(model, np.zeros(d), np.eye(d))
    assert label == "equilibrium"
    Ms = 0.5 * (Q.T @ K + K.T @ Q)
    P = det["P_star"]
    np.testing.assert_allclose(W.T @ P + P @ W, -2 * 0.7 * Ms, atol=1e-12)
    sim, sol = simulated_regime(model, np.zeros(d), np.eye(d), 60.0)
    assert sim == "equilibrium"
    np.testing.assert_allclose(np.asarray(sol.covs[-1]), det["limit"], rtol=1e-7)


def test_hurwitz_threshold(x64):
    """W Hurwitz, beta v Ms positive definite: small S0 collapses, large S0 blows up."""
    d = 2
    W = np.array([[-1.0, 0.3], [0.0, -0.5]])
    model = mf.Model(Q=np.eye(d), K=np.eye(d), V=np.eye(d), W=W, mlp="affine", dtype="float64")
    small, _ = predict_regime(model, np.zeros(d), 0.05 * np.eye(d))
    large, det = predict_regime(model, np.zeros(d), 3.0 * np.eye(d))
    assert (small, large) == ("collapse", "blowup")
    assert simulated_regime(model, np.zeros(d), 0.05 * np.eye(d), 100.0)[0] == "collapse"
    sol = mf.simulate_gaussian(model, np.zeros(d), 3.0 * np.eye(d), 3 * det["blowup_time"])
    assert abs(float(sol.blowup_time) - det["blowup_time"]) / det["blowup_time"] < 1e-6


def test_small_random_grid_agrees(x64):
    """Every definite prediction matches the simulation on a small grid; blow-up times to 1e-6."""
    rows = validation_grid(seed=3, n_per=2, dims=(2,), classes="ABCG")
    definite = [r for r in rows if r["predicted"] != "unknown"]
    assert len(definite) >= 6
    for r in definite:
        assert r["predicted"] == r["simulated"], r
        if r["t_pred"]:
            assert abs(r["t_pred"] - r["t_sim"]) / r["t_pred"] < 1e-6
