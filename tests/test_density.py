r"""The density PDE on the circle (meanfield.density): invariants, linear rates, particles == PDE.

Compile budget: every `simulate_density` call with a new N / model structure / n_save is one JIT
compile (a few seconds). The default tests share a handful of shapes (N = 32 and 64 rotation-
invariant softmax, N = 512 for the bump, one dense float32 case); heavier checks are `slow`.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield as mf
from meanfield.density import (
    UnderResolvedError, UnderResolvedWarning, angle_velocity, density_velocity, kernel_density,
    sample_density, simulate_angles, simulate_density, uniform_growth_rate, uniform_perturbed,
    von_mises_mixture, w1_densities, w1_samples, w1_samples_density,
)
from meanfield.density import grid as G
from meanfield.density import theory
from meanfield.density.pde import _rhs_factory, _build_ops

I2 = np.eye(2)
J2 = np.array([[0.0, -1.0], [1.0, 0.0]])
QG = np.array([[1.0, 0.3], [-0.2, 0.8]])
KG = np.array([[0.9, -0.4], [0.1, 1.1]])
VG = np.array([[1.0, 0.2], [-0.3, 0.7]])


def rot(a):
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def circle_model(Q=I2, K=I2, V=I2, beta=1.0, **kw):
    return mf.Model(Q=Q, K=K, V=V, beta=beta, norm="sphere", **kw)


def tangential(X, F):
    th = G.to_angles(X)
    E = jnp.stack([-jnp.sin(th), jnp.cos(th)], -1)
    return jnp.sum(E * F, -1)


def rhs(model, density, t=0.0, method="dense"):
    """dρ/dt of the semi-discrete PDE (the solver's right-hand side) at the grid values `density`."""
    return _rhs_jit(model, jnp.asarray(density), t, method)


@jax.jit
def _rhs_jit_inner(model, density, t, ops):
    return _rhs_factory(density.shape[0])(t, density, (model, ops))


def _rhs_jit(model, density, t, method):
    N = density.shape[0]
    ops = jax.jit(_build_ops, static_argnums=(1, 2, 3))(model, 3 * N // 2, method, density.dtype)
    return _rhs_jit_inner(model, density, t, ops)


# --- Wasserstein-1 ----------------------------------------------------------------------------

def _geo(a, b):
    d = np.abs(a - b) % (2 * np.pi)
    return np.minimum(d, 2 * np.pi - d)


def test_w1_against_brute_force(x64, key):
    k1, k2, k3 = jax.random.split(key, 3)
    # equal weights: optimal plan is a permutation; try all 6! of them
    a = np.asarray(jax.random.uniform(k1, (6,), maxval=2 * np.pi))
    b = np.asarray(jax.random.uniform(k2, (6,), maxval=2 * np.pi))
    brute = min(np.mean(_geo(a, b[list(p)])) for p in itertools.permutations(range(6)))
    assert float(w1_samples(a, b)) == pytest.approx(brute, rel=1e-12, abs=1e-14)
    # unequal sizes and weights: the transport linear program
    optimize = pytest.importorskip("scipy.optimize")
    a = np.asarray(jax.random.uniform(k3, (5,), maxval=2 * np.pi))
    wa = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    wb = np.full(6, 1 / 6)
    C = _geo(a[:, None], b[None, :])
    A_eq = np.vstack([np.kron(np.eye(5), np.ones(6)), np.kron(np.ones(5), np.eye(6))])
    lp = optimize.linprog(C.ravel(), A_eq=A_eq, b_eq=np.concatenate([wa, wb]), bounds=(0, None))
    assert float(w1_samples(a, b, wa, wb)) == pytest.approx(lp.fun, rel=1e-9)
    # density vs samples, density vs density: against m quantile atoms (W1 error <= pi/m)
    density_a = von_mises_mixture([0.3, 3.0], [3.0, 1.0], [0.7, 0.3])(G.grid(128))
    density_b = uniform_perturbed([0.4, 0.2], [0.5, 1.0])(G.grid(128))
    m = 5000

    def atoms(density):
        u = (np.arange(m) + 0.5) / m
        nodes = np.linspace(0, 2 * np.pi, 20001)
        F = np.asarray(G.cdf(density, jnp.asarray(nodes)))
        return np.interp(u, F, nodes)

    qa, qb = atoms(density_a), atoms(density_b)
    assert float(w1_samples_density(b, density_a)) == pytest.approx(float(w1_samples(b, qa)), abs=2 * np.pi / m)
    assert float(w1_densities(density_a, density_b)) == pytest.approx(float(w1_samples(qa, qb)), abs=2 * np.pi / m)
    assert float(w1_densities(density_a, density_a)) < 1e-12


@pytest.mark.slow
def test_sampling_and_kernel_density(x64, key):
    density0 = von_mises_mixture([0.0, 2.5], [2.0, 4.0], [0.6, 0.4])
    n = 2000
    th = sample_density(key, density0, n)
    density = density0(G.grid(256))
    w = float(w1_samples_density(th, density))
    assert w * math.sqrt(n) < 3.0  # E W1 ~ 0.4 / sqrt(n) here; i.i.d. exactness
    kde = kernel_density(th)(G.grid(256))
    assert float(G.mass(kde)) == pytest.approx(1.0, abs=1e-12)
    assert float(w1_densities(kde, density)) < 0.1  # the default (Silverman) bandwidth over-smooths
    kde = kernel_density(G.to_tokens(th), bandwidth=0.1)(G.grid(256))
    assert float(w1_densities(kde, density)) < 0.05  # sampling noise ~ 1.4 / sqrt(n) + bias


# --- the velocity field: PDE == particles ---------------------------------------------------------

@pytest.mark.parametrize("attention", ["softmax", "unnormalised", "shaped"])
def test_velocity_is_the_particle_velocity(x64, key, attention):
    """Tokens at the grid nodes, node j repeated c_j times: the density with weights c_j / n has
    exactly the particle velocity (same sums); the O(nP) angle velocity too, at any angles."""
    model = circle_model(QG, KG, VG, beta=2.0, attention=attention, W=0.3 * VG, b=[0.1, -0.2])
    N = 64
    counts = np.asarray(jax.random.randint(key, (N,), 1, 5))
    th = np.repeat(np.asarray(G.grid(N)), counts)
    X = G.to_tokens(jnp.asarray(th))
    v_tok = tangential(X, mf.token_velocity(model, X))
    density = counts / counts.sum() * N / (2 * np.pi)
    v_pde = np.repeat(np.asarray(density_velocity(model, density, method="dense")), counts)
    np.testing.assert_allclose(v_pde, v_tok, atol=1e-13)
    np.testing.assert_allclose(angle_velocity(model, jnp.asarray(th)), v_tok, atol=1e-13)
    th_r = jax.random.uniform(jax.random.fold_in(key, 1), (300,), maxval=2 * np.pi)
    X_r = G.to_tokens(th_r)
    np.testing.assert_allclose(angle_velocity(model, th_r), tangential(X_r, mf.token_velocity(model, X_r)), atol=1e-13)
    # rotation-invariant Q^T K, V: the FFT evaluation is the same quadrature
    inv = circle_model(1.3 * rot(0.4), rot(-0.1), 0.8 * I2 + 0.5 * J2, beta=2.0, attention=attention)
    np.testing.assert_allclose(density_velocity(inv, density, method="fft"), density_velocity(inv, density, method="dense"),
                               atol=1e-13)


@pytest.mark.slow
def test_velocity_monte_carlo(x64, key):
    """n i.i.d. tokens from the density: their particle velocity is the PDE velocity + O(n^-1/2) noise."""
    model = circle_model(QG, KG, VG, beta=1.5)
    density0 = von_mises_mixture([0.0, 2.5], [2.0, 4.0], [0.6, 0.4])
    v_grid = density_velocity(model, density0(G.grid(256)))
    errs = []
    for n in (512, 2048):
        th = sample_density(jax.random.fold_in(key, n), density0, n)
        X = G.to_tokens(th)
        v_tok = tangential(X, mf.token_velocity(model, X))
        errs.append(float(jnp.sqrt(jnp.mean((v_tok - G.evaluate(v_grid, th)) ** 2))))
        assert errs[-1] < 2.0 / math.sqrt(n)
    assert errs[1] < 0.75 * errs[0]  # halves with 4x n (up to noise)


def test_model_checks():
    with pytest.raises(ValueError, match="d = 2"):
        simulate_density(mf.Model(Q=np.eye(3), K=np.eye(3), V=np.eye(3), norm="sphere"), uniform_perturbed(), 1.0)
    with pytest.raises(ValueError, match="norm='sphere'"):
        density_velocity(mf.Model(Q=I2, K=I2, V=I2), np.ones(16))
    with pytest.raises(ValueError, match="causal"):
        density_velocity(circle_model(causal=True), np.ones(16))
    with pytest.raises(ValueError, match="rotation-invariant"):
        density_velocity(circle_model(QG, KG, VG), np.ones(16), method="fft")
    with pytest.raises(ValueError, match="on_underresolved"):
        simulate_density(circle_model(), uniform_perturbed(), 1.0, on_underresolved="ignore")


# --- linearised dynamics ----------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["softmax", "unnormalised"])
def test_uniform_instability_rates_rhs(x64, attention):
    r"""$\rho = (1 + \varepsilon\cos k\theta)/2\pi$: $\dot\varepsilon = \lambda_k\varepsilon$ with
    $\lambda_k = k^2 I_k(\beta)/(\beta I_0(\beta))$ (softmax), $k^2 I_k(\beta)/\beta$ (unnormalised)
    (derivation in `meanfield.density.theory`). Checked on the right-hand side for k = 1..6."""
    beta, eps, N = 4.0, 1e-7, 64
    model = circle_model(beta=beta, attention=attention)
    th = G.grid(N)
    for k in range(1, 7):
        density = (1 + eps * jnp.cos(k * th)) / (2 * np.pi)
        d = rhs(model, density, method="fft")
        rate = float(2 * jnp.mean(d * jnp.cos(k * th)) * 2 * np.pi / eps)
        assert rate == pytest.approx(uniform_growth_rate(k, beta, attention=attention), rel=1e-6)


def _rotinv_model(beta=4.0, V=I2):
    return circle_model(I2, I2, V, beta=beta)


def test_uniform_is_stationary_and_mode_grows(x64):
    """Uniform density: exactly stationary (a rotation V = I + 0.7 J only adds a constant drift that
    leaves it unchanged). Mode 3 at beta = 4 grows at lambda_3 (the full solve)."""
    ts = np.linspace(0.0, 2.0, 5)
    sol = simulate_density(_rotinv_model(V=I2 + 0.7 * J2), lambda th: jnp.full_like(th, 1 / (2 * np.pi)), 2.0,
                           ts=ts, modes=32)
    assert sol.resolved and sol.modes.tolist() == [32] * 5
    np.testing.assert_allclose(sol.density, 1 / (2 * np.pi), atol=1e-14)
    eps = 1e-6
    sol = simulate_density(_rotinv_model(), uniform_perturbed([eps], modes=[3]), 2.0, ts=ts, modes=32)
    amp = 2 * np.abs(np.fft.rfft(sol.density, axis=1)[:, 3]) / sol.density.shape[1] * 2 * np.pi
    rate = np.polyfit(ts, np.log(amp), 1)[0]
    assert rate == pytest.approx(uniform_growth_rate(3, 4.0), rel=1e-4)


def test_consensus_rate(x64):
    r"""A single narrow von Mises bump ($\kappa = 100$, $\sigma^2 \approx 0.01$) concentrates.

    At the peak $\partial_\theta\rho = 0$, so $\frac{d}{dt}\log\rho_{\max} = -\partial_\theta v(\bar\theta)$.
    Linearising about the consensus state (a Dirac at $\bar\theta$): $\dot\delta = -\sin\delta$
    ($V = I$; softmax weights of a Dirac are 1), so $-\partial_\theta v \to 1$ and the circular
    variance decays like $e^{-2t}$ (`theory.consensus_rate` = 2), independent of $\beta$. At finite
    width the Gaussian tilt of the weights $e^{\beta\cos(\varphi-\theta)}$ slows it to
    $-\partial_\theta v = 1/(1+\beta\sigma^2) + O(\sigma^2)$. Checked: the peak growth rate is within
    $\sigma^2$ of $1/(1+\beta\sigma^2)$, within $(1+\beta)\sigma^2$ of the linear rate 1, and the
    variance's log-slope approaches -2.
    """
    ts = np.linspace(0.0, 1.0, 11)
    for beta in (1.0, 4.0):
        sol = simulate_density(_rotinv_model(beta=beta), von_mises_mixture(1.0, 100.0), 1.0, ts=ts, modes=512)
        assert sol.resolved and sol.refinements == []
        s2 = theory.circular_variance(sol.density)
        peak = np.array([float(G.evaluate(jnp.asarray(r), jnp.array([1.0]))[0]) for r in sol.density])  # stays at 1.0
        rate = np.gradient(np.log(peak), ts)
        np.testing.assert_array_less(np.abs(rate - 1 / (1 + beta * s2))[1:], s2[1:])
        np.testing.assert_array_less(np.abs(rate - 1)[1:], (1 + beta) * s2[1:])
        slope = np.diff(np.log(s2)) / np.diff(ts)
        assert abs(slope[-1] + theory.consensus_rate()) < 3 * (1 + beta) * s2[-1]
        assert np.all(np.diff(np.abs(slope + 2)) < 0)  # approaches -2 monotonically


# --- invariants --------------------------------------------------------------------------------------

def test_mass_positivity_float32_general_model():
    """General Q, K, V, unnormalised attention and an affine MLP, float32: the mass is exact to
    float rounding (the k = 0 mode of d density/dt is exactly zero), positivity is monitored."""
    model = circle_model(QG, KG, -0.5 * VG, beta=1.0, attention="unnormalised", W=0.5 * np.diag([1.0, -1.0]),
                         b=[0.2, 0.0], dtype=jnp.float32)
    sol = simulate_density(model, von_mises_mixture([0.0, 2.5], [2.0, 4.0], [0.6, 0.4]), 0.5, n_save=5, modes=64,
                           method="dense")
    assert sol.density.dtype == np.float32 and sol.resolved
    np.testing.assert_allclose(sol.mass, 1.0, atol=2e-6)
    assert np.all(sol.min_ratio > 0) and np.all(sol.tail < 1e-4)


def test_rotation_equivariance(x64):
    """Rotation-invariant Q^T K and V (rotations and multiples of I): rotating density0 by alpha
    rotates density(t) by alpha (alpha off the grid)."""
    model = circle_model(1.3 * rot(0.4), rot(-0.1), 0.8 * I2 + 0.5 * J2, beta=1.0)
    density0 = uniform_perturbed([0.3, 0.2], [0.0, 1.0])
    alpha = 0.7
    ts = np.linspace(0.0, 2.0, 5)
    a = simulate_density(model, density0, 2.0, ts=ts, modes=32)
    b = simulate_density(model, lambda th: density0(th - alpha), 2.0, ts=ts, modes=32)
    assert a.resolved and b.resolved and a.modes.tolist() == b.modes.tolist()
    shifted = G.evaluate(jnp.asarray(a.density[-1]), jnp.asarray(b.theta) - alpha)
    np.testing.assert_allclose(b.density[-1], shifted, atol=1e-9)
    np.testing.assert_allclose(b.mass, 1.0, atol=1e-13)


def test_spectral_convergence_rhs(x64):
    """Smooth density, general model: the semi-discrete right-hand side converges exponentially in N."""
    model = circle_model(QG, KG, VG, beta=1.0, W=0.3 * VG)
    density0 = von_mises_mixture([0.0, 2.5], [2.0, 4.0], [0.6, 0.4])
    fine = G.grid(96)
    ref = rhs(model, density0(G.grid(96)))
    errs = []
    for N in (8, 16, 32, 48):
        d = rhs(model, density0(G.grid(N)))
        errs.append(float(jnp.max(jnp.abs(G.evaluate(d, fine) - ref))))
    errs = np.array(errs)
    assert np.all(np.diff(np.log(errs)) < -3.0)  # each step gains more than e^3
    assert errs[-1] < 1e-10


def test_underresolved_is_reported(x64):
    """Too few modes allowed: a warning and NaN saves after the stop, or an error; never silent."""
    ts = np.linspace(0.0, 5.0, 5)
    density0 = von_mises_mixture(0.0, 1.0)  # resolved at N = 32, then concentrates (beta = 4)
    with pytest.warns(UnderResolvedWarning, match="resolution insufficient"):
        sol = simulate_density(_rotinv_model(), density0, 5.0, ts=ts, modes=32, max_modes=64)
    assert [r[1:] for r in sol.refinements] == [(32, 64)]  # refined once, then out of modes
    assert not sol.resolved and sol.t_end < 5.0
    assert np.isnan(sol.density[-1]).all() and np.isfinite(sol.density[0]).all()
    assert np.all(sol.tail[np.isfinite(sol.tail)] <= 1e-8)  # every returned save passes the check
    with pytest.raises(UnderResolvedError):
        simulate_density(_rotinv_model(), density0, 5.0, ts=ts, modes=32, max_modes=32, on_underresolved="raise")


def test_a_failed_time_solve_leaves_nan_saves_not_inf(x64):
    """max_steps = 1 and a first step that the controller rejects: the solver fails before writing any
    save; the saves are NaN (never inf), with the warning that says so."""
    ts = np.linspace(0.0, 5.0, 5)
    with pytest.warns(UnderResolvedWarning, match="time solver failed"):
        sol = simulate_density(_rotinv_model(), von_mises_mixture(0.0, 1.0), 5.0, ts=ts, modes=32, max_steps=1,
                               dt0=1.0, rtol=1e-10, atol=1e-12)
    assert not sol.resolved and np.isnan(sol.density).all() and np.isnan(sol.mass).all()


@pytest.mark.slow
def test_piecewise_schedule(x64):
    """Model.piecewise: attraction then repulsion == two consecutive depth-constant solves."""
    ts = np.linspace(0.0, 2.0, 5)
    l0, l1 = _rotinv_model(beta=1.0, V=0.5 * I2), _rotinv_model(beta=1.0, V=-0.5 * I2 + J2)
    pw = mf.Model.piecewise([l0, l1], times=[1.0])
    density0 = uniform_perturbed([0.3, 0.1], [0.0, 1.0])
    full = simulate_density(pw, density0, 2.0, ts=ts, modes=32)
    first = simulate_density(l0, density0, 1.0, ts=np.linspace(0.0, 1.0, 5), modes=32)
    second = simulate_density(l1, first.density[-1], 2.0, t0=1.0, ts=np.linspace(1.0, 2.0, 5), modes=32)
    assert full.resolved and first.resolved and second.resolved
    N = max(full.density.shape[1], first.density.shape[1], second.density.shape[1])
    np.testing.assert_allclose(G.upsample_np(full.density[2], N), G.upsample_np(first.density[-1], N), atol=1e-8)
    np.testing.assert_allclose(G.upsample_np(full.density[-1], N), G.upsample_np(second.density[-1], N), atol=1e-8)


# --- slow: full solves against each other and against particles ----------------------------------------

@pytest.mark.slow
def test_spectral_convergence_solve(x64):
    model = circle_model(QG, KG, VG, beta=1.0)
    density0 = von_mises_mixture([0.0, 2.5], [2.0, 4.0], [0.6, 0.4])
    ref = simulate_density(model, density0, 1.0, n_save=2, modes=96, tail_tol=1e-6)
    errs = []
    for N in (16, 24, 32, 48):
        sol = simulate_density(model, density0, 1.0, n_save=2, modes=N, on_underresolved="warn", tail_tol=1.0)
        errs.append(np.max(np.abs(G.upsample_np(sol.density[-1], 96) - ref.density[-1])))
    assert np.all(np.diff(np.log(errs)) < -2.0) and errs[-1] < 1e-6  # measured 9e-3, 9e-4, 5e-5, 1.3e-7


@pytest.mark.slow
def test_refinement_and_particles_converge(x64, key):
    """Adaptive refinement follows a concentrating bump; particles approach the PDE at n^-1/2."""
    model = circle_model(QG, KG, VG, beta=1.0)
    density0 = von_mises_mixture([0.0, 2.5], [2.0, 4.0], [0.6, 0.4])
    sol = simulate_density(model, density0, 2.0, n_save=3)
    assert sol.resolved and np.all(np.abs(sol.mass - 1) < 1e-12)
    w = {}
    for n in (400, 6400):
        ws = []
        for s in range(4):
            th0 = sample_density(jax.random.fold_in(key, 100 * n + s), density0, n)
            _, th, _ = simulate_angles(model, th0, 2.0, n_save=2)
            ws.append(float(w1_samples_density(th[-1], sol.density[-1])))
        w[n] = np.mean(ws)
    assert 2.0 < w[400] / w[6400] < 8.0  # 4 expected for n^-1/2
    # the O(nP) angle particles are simulate_particles' tokens
    th0 = sample_density(key, density0, 300)
    _, th, _ = simulate_angles(model, th0, 2.0, n_save=2)
    ps = mf.simulate_particles(model, G.to_tokens(th0), 2.0, n_save=2)
    diff = jnp.angle(jnp.exp(1j * (G.to_angles(ps.xs[-1]) - th[-1])))
    assert float(jnp.max(jnp.abs(diff))) < 1e-6
