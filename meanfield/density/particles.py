r"""Token particles on the circle in angle form, for large n.

$\dot\theta_i = \langle e(\theta_i), F(X)_i\rangle$ is the particle ODE of `simulate_particles` for
unit tokens $x_i = (\cos\theta_i, \sin\theta_i)$ with `norm="sphere"` (there $\dot x_i = P_{x_i}F_i
= \dot\theta_i\, e(\theta_i)$). The field is evaluated by `velocity.angle_velocity` in O(n P)
instead of O(n^2), so n = 10^5 tokens take milliseconds per step; it agrees with
`token_velocity` to float rounding (tests/test_density.py). Use float64.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ..simulate.core import solve
from ..simulate.solvers import make_controller, make_solver, save_times
from .velocity import check_model, kernel_order, layer_angle_velocity


def simulate_angles(model, theta0, t1: float, *, t0: float = 0.0, ts=None, n_save: int = 11, solver="tsit5",
                    dt0=None, rtol=None, atol=None, max_steps: int = 100_000, P: int | None = None, weights=None):
    """Integrate the angle form of the particle ODE; returns (ts (T,), thetas (T, n) in [0, 2 pi),
    accepted steps).

    `P`: kernel expansion size (default from beta ||Q^T K||, see `velocity.kernel_order`).
    `weights`: token weights summing to 1 (default 1/n). Zero-weight tokens are passive tracers,
    which lets runs with different n share one compiled shape.
    """
    check_model(model, "simulate_angles")
    dtype = model.dtype
    theta0 = jnp.asarray(theta0, dtype)
    if P is None:
        P = max(kernel_order(model.layer(l)) for l in range(model.n_layers)) if model.attention != "none" else 16
    solver_obj, adaptive = make_solver(solver)
    ts = save_times(t0, t1, ts, n_save, dtype)
    controller = make_controller(adaptive, dt0=dt0, rtol=rtol, atol=atol, dtype=dtype, jump_ts=model.layer_times)
    ys, nsteps = _solve(model, theta0, jnp.asarray(t0, dtype), jnp.asarray(t1, dtype), ts,
                        None if dt0 is None else jnp.asarray(dt0, dtype), solver_obj, controller, max_steps, P,
                        None if weights is None else jnp.asarray(weights, dtype))
    return ts, jnp.mod(ys, 2 * np.pi), nsteps


@eqx.filter_jit
def _solve(model, theta0, t0, t1, ts, dt0, solver, controller, max_steps, P, weights):
    def field(t, th, args):
        return layer_angle_velocity(args.at(t), th, P, weights)

    traj = solve(field, theta0, model, t0=t0, t1=t1, ts=ts, solver=solver, controller=controller, dt0=dt0,
                 max_steps=max_steps, throw=True)
    return traj.ys, traj.num_steps
