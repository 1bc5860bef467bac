"""The named Runge-Kutta solvers: diffrax's tableaus with their stages unrolled (`UnrolledStages`).

Checked against diffrax's own step (same tableau, float64) and against the methods' convergence
orders on an ODE with a closed-form solution."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meanfield.simulate.solvers import FIXED, UnrolledStages, make_solver

DIFFRAX = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8, "bosh3": diffrax.Bosh3,
           "heun": diffrax.Heun, "midpoint": diffrax.Midpoint}


def _field(t, y, args):
    """A nonlinear, time-dependent field on a tuple state (as the Gaussian moments' (m, S))."""
    m, S = y
    return (jnp.tanh(S @ m) + jnp.cos(t), -S @ S.T + jnp.outer(m, m) * t)


@pytest.mark.parametrize("name", list(DIFFRAX))
def test_unrolled_step_equals_diffraxs_step(x64, name):
    ours, _ = make_solver(name)
    assert isinstance(ours, UnrolledStages)
    ref = DIFFRAX[name]()
    term = diffrax.ODETerm(_field)
    y0 = (jnp.array([0.3, -0.2, 0.5]), jnp.array([[1.0, 0.2, 0.0], [0.1, 0.8, -0.3], [0.0, 0.4, 1.2]]))
    state_ours, state_ref = ours.init(term, 0.0, 0.1, y0, None), ref.init(term, 0.0, 0.1, y0, None)
    t0, y = 0.0, y0
    for t1, jump in ((0.1, False), (0.25, False), (0.3, True)):  # first step, FSAL reuse, after a jump
        out = ours.step(term, t0, t1, y, None, state_ours, jnp.array(jump))
        exp = ref.step(term, t0, t1, y, None, state_ref, jnp.array(jump))
        for a, b in zip(jax.tree.leaves(out[:3]), jax.tree.leaves(exp[:3])):  # y1, error, dense k
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        state_ours, state_ref = out[3], exp[3]
        for a, b in zip(jax.tree.leaves(state_ours), jax.tree.leaves(state_ref)):  # the FSAL stage
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        t0, y = t1, out[0]


ORDERS = {"tsit5": 5, "dopri5": 5, "dopri8": 8, "bosh3": 3, "rk4": 4, "heun": 2, "midpoint": 2, "euler": 1}


@pytest.mark.parametrize("name", list(ORDERS))
def test_named_solvers_converge_at_their_order(x64, name):
    """y' = cos(t) y, y(0) = 1: y(t) = exp(sin t). Constant steps h and h/2 to t = 2: the error ratio
    is 2^p for a method of order p (Tsit5 reads 5.5 at these steps: its error constant is still
    settling, as with diffrax's own Tsit5)."""
    solver, _ = make_solver(name)
    term = diffrax.ODETerm(lambda t, y, args: jnp.cos(t) * y)
    hs = {8: (1 / 2, 1 / 4)}.get(ORDERS[name], (1 / 16, 1 / 32))  # asymptotic, above float64 rounding

    @jax.jit
    def solve(dt):
        sol = diffrax.diffeqsolve(term, solver, 0.0, 2.0, dt, jnp.array(1.0), max_steps=64,
                                  stepsize_controller=diffrax.ConstantStepSize())
        return sol.ys[-1]

    errs = [abs(float(solve(h)) - np.exp(np.sin(2.0))) for h in hs]
    order = np.log2(errs[0] / errs[1])
    assert -0.3 < order - ORDERS[name] < 0.6, (name, errs, order)


def test_a_diffrax_instance_keeps_its_step_kind():
    """diffrax's own fixed-step classes stay fixed-step when passed as instances."""
    for cls in (diffrax.Heun, diffrax.Midpoint, diffrax.Euler):
        assert make_solver(cls())[1] is False
    assert make_solver(diffrax.Tsit5())[1] is True
    assert all(make_solver(name)[1] is False for name in FIXED)
