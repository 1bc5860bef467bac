r"""Exact Gaussian moment dynamics (Alcalde, Ji, Zuazua 2026; MISSION section 2).

For tokens distributed as $N(m, S)$, softmax attention and an affine (or no) MLP give the affine
field $F(x) = c + Mx$ with $M = a_\text{attn}\beta V S K^\top Q + a_\text{mlp}W$,
$c = a_\text{attn}Vm + a_\text{mlp}b$, and the moments close exactly:

$$ \dot m = c + M m, \qquad \dot S = M S + S M^\top. $$

Numerics. We integrate a square-root factor instead of S: with $S = LL^\top$,

$$ \dot L = M(LL^\top) L \quad\Longrightarrow\quad \dot S = MS + SM^\top, $$

so S is symmetric positive semi-definite by construction and its rank is the rank of
$L(t) = \Phi(t) L_0$ ($\dot\Phi = M\Phi$), i.e. exactly rank(S0) up to rounding (the zero columns
of $L_0$ stay exactly zero). This is the congruence update $S \mapsto \Phi S \Phi^\top$ done by the
ODE solver.

Blow-up. The solve stops at the end of the step in which $\operatorname{tr} S$ crosses
`blowup_threshold` times $\max(\operatorname{tr} S_0, \text{tiny})$ (a boolean diffrax event; no root
finder is needed, see below, and under `vmap` one would run at every step of every lane). Near a Riccati singularity $\operatorname{tr}S \sim C/(t^*-t)$, so
$\tau = \operatorname{tr}S / \tfrac{d}{dt}\operatorname{tr}S = t^*-t + O(1/\operatorname{tr}S)$ and we
report $t^* \approx t_\text{event} + \tau$. When the growth was only exponential
($\tau$ is not small compared with the time already elapsed: $\tau > 0.01\,(t_\text{event}-t_0)$)
there is no finite-time singularity estimate and the crossing time is reported, recovered exactly
for exponential growth as $t_\text{event} - \tau\log(\operatorname{tr}S/\text{limit})$; either
way the covariance has grown by `blowup_threshold` and the run is labelled blow-up. A solver
failure (step size collapsing) after tr S has grown by sqrt(`blowup_threshold`) counts as blow-up
at the last time reached.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import _display as D
from .._display import Summarised, Summary
from .._linalg import matmul
from .._symeig import eigh
from .._types import Cov, Mean
from ..model.field import gaussian_closure_error, moment_matrices
from .core import Trajectory, solve, solve_ensemble
from .particles import split_layer_times, with_layer_times
from .checks import (
    check_covariance, check_depths, check_finite, check_model_finite, check_number, check_solver_options, check_span,
)
from .solvers import batch_progress, make_controller, make_solver, progress_meter, save_times


class GaussianSolution(Summarised, eqx.Module):
    """Result of `simulate_gaussian`.

    Attributes:
        ts: save times (T,) ((B, T) for a batch with one depth t1 per point).
        means: (T, d); covs: (T, d, d). A batched call adds a leading axis B to every field
            but `ts` (and to `ts` too with one depth per point). Save times after a blow-up hold the last state before
            it (see `valid`), so a blow-up never puts NaN or inf in them; after a failure whose
            state became NaN / inf (`success` False) the saves not `valid` hold that state.
        valid: (T,) bool, True where the save time was actually reached.
        blowup_time: estimated finite-time singularity (inf when none before t1).
        t_end: the depth the solve reached (t1, or the blow-up event).
        success: False if the solver failed for another reason (max_steps, step collapse) or the
            state became NaN / inf (a recorded failure, not a blow-up: `blowup_time` stays inf).
        num_steps: accepted solver steps. num_attempts: accepted + rejected steps (what `max_steps`
            bounds).
    """

    ts: jax.Array
    means: jax.Array
    covs: jax.Array
    valid: jax.Array
    blowup_time: jax.Array
    t_end: jax.Array
    success: jax.Array
    num_steps: jax.Array
    num_attempts: jax.Array

    def __iter__(self):  # `ts, means, covs, blowup_time = simulate_gaussian(...)`
        return iter((self.ts, self.means, self.covs, self.blowup_time))

    def _summary(self) -> Summary:
        """What `__repr__` / `_repr_html_` show (`Summarised`): shapes and scalars only, no JAX op."""
        *batch, T, d = self.means.shape
        rows = [("ts", D.span(self.ts)), ("d", str(d)), ("means", D.shape(self.means)),
                ("covs", D.shape(self.covs))]
        if batch:
            rows.append(("batch", str(tuple(batch))))
        bt = D.num(self.blowup_time)
        rows += [("blowup_time", "none (inf)" if bt == "inf" else bt), ("t_end", D.num(self.t_end)),
                 ("success", D.flag(self.success)), ("num_steps", D.num(self.num_steps)),
                 ("num_attempts", D.num(self.num_attempts))]
        return Summary("GaussianSolution", rows,
                       "dm/dt = c + M m, dS/dt = M S + S M^T; regime: mf.classify(g); prediction: mf.predict_regime")


def covariance_factor(S: Cov, rank_rtol: float | None = None) -> jax.Array:
    r"""A square factor L with $LL^\top = S$ whose columns are exactly zero on S's null space.

    Eigenvalues below `rank_rtol * lambda_max` (default d * eps) are treated as zero, so a
    rank-r covariance gets exactly d - r zero columns. S must be a covariance up to rounding
    (`simulate_gaussian` refuses anything else before it gets here): the symmetrisation and the
    clipping only absorb round-off, they do not repair an asymmetric or indefinite matrix. (Jacobi
    rotations up to 16 x 16, `meanfield._symeig.eigh`: no LAPACK call in a sweep's program.)
    """
    S = 0.5 * (S + S.T)
    lam, U = eigh(S)
    tol = (S.shape[-1] * jnp.finfo(S.dtype).eps if rank_rtol is None else rank_rtol) * jnp.max(jnp.abs(lam))
    lam = jnp.where(lam > tol, lam, 0.0)
    return U * jnp.sqrt(lam)


def simulate_gaussian(
    model,
    m0: Mean,
    S0: Cov,
    t1: float,
    *,
    t0: float = 0.0,
    ts=None,
    n_save: int = 101,
    solver="tsit5",
    dt0: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 16_384,
    blowup_threshold: float | None = None,
    rank_rtol: float | None = None,
    progress: bool = False,
    lanes: int | None = None,
) -> GaussianSolution:
    r"""Solve the exact moment ODE $\dot m = c + Mm$, $\dot S = MS + SM^\top$ from $N(m_0, S_0)$.

    Arguments:
        model: a `Model` with softmax or no attention, affine or no MLP, no sphere norm, not
            causal (anything else has no exact Gaussian closure and is refused), or a batch of B
            such models stacked along a leading axis.
        m0: initial mean (d,) or a batch (B, d). S0: initial covariance (d, d) or (B, d, d),
            symmetric positive semidefinite (may be singular). A concrete S0 that is not is
            refused (see Raises), never symmetrised or clipped into another covariance; only
            rounding (within `checks.covariance_rtol`) is absorbed. A batch (of moments, of
            models, or both) runs the ensemble integrator (`meanfield.simulate.core`): B independent adaptive solves on
            `lanes` lanes (default min(B, 256)), each lane refilled when its point finishes.
        t1, t0, ts, n_save, solver, dt0, rtol, atol, max_steps, progress: as in
            `simulate_particles` (a batch takes one depth t1 per point too, shape (B,)).
        blowup_threshold: tr S / tr S0 at which the solve stops and blow-up is declared
            (default 1e3 in float32, 1e6 in float64). Near a singularity tr S ~ 1/(t* - t) cannot
            exceed about 1/eps of its start (t* - t is not resolved below eps t*), and the Riccati
            extrapolation makes the blow-up time accurate to O(threshold^-2) relative, so a higher
            threshold buys nothing; it costs steps, since M grows with S and an exponentially
            growing S needs a number of steps proportional to the threshold.
        rank_rtol: relative eigenvalue cut-off defining S0's rank (default d * eps).

    Returns:
        `GaussianSolution` (ts, means, covs, blowup_time, ...).

    Raises:
        ValueError: if the model has no exact closure (the message says why), on bad shapes, and,
            naming the argument, for concrete inputs that are not valid numbers: `m0`, `S0` or a
            model array holding NaN / inf; `S0` not symmetric (max |S0 - S0^T| above 100 d eps
            max |S0|) or not positive semidefinite (smallest eigenvalue below -100 d eps times
            the largest); `t0` / `t1` not finite or `t1 <= t0`; `ts` not finite, decreasing or
            outside [t0, t1]; `n_save` not an integer >= 2; `dt0` / `rtol` / `atol` not finite
            and > 0; `blowup_threshold` NaN or <= 1 (inf: never stop); a per-point `t1` whose
            length is not the batch's, or in a single solve, or with `ts`. Traced inputs (inside
            jit / vmap) are not checked.
    """
    why = gaussian_closure_error(model)
    if why is not None:
        raise ValueError(f"simulate_gaussian: no exact Gaussian closure for this model: {why}.")
    d = model.d
    B = model.batch_size
    m0 = jnp.asarray(m0, model.dtype)
    S0 = jnp.asarray(S0, model.dtype)
    if m0.shape[-1:] != (d,) or m0.ndim > 2:
        raise ValueError(f"simulate_gaussian: `m0` must have shape (d,) = {(d,)} or (B, d); got {tuple(m0.shape)}.")
    if S0.shape[-2:] != (d, d) or S0.ndim > 3:
        raise ValueError(f"simulate_gaussian: `S0` must have shape (d, d) = {(d, d)} or (B, d, d); got {tuple(S0.shape)}.")
    sizes = {n for n in (B, m0.shape[0] if m0.ndim == 2 else None, S0.shape[0] if S0.ndim == 3 else None) if n is not None}
    if len(sizes) > 1:
        raise ValueError(f"simulate_gaussian: batch sizes of `model`, `m0` and `S0` disagree: {sorted(sizes)}.")
    if blowup_threshold is None:
        blowup_threshold = 1e6 if model.dtype == jnp.float64 else 1e3
    # Concrete inputs only (traced ones, inside jit / vmap, pass): refuse what is not a number,
    # and an S0 that is not a covariance (it is never "repaired" into another problem).
    where = "simulate_gaussian"
    check_finite(where, "m0", m0)
    check_covariance(where, "S0", S0)
    check_model_finite(where, model)
    check_depths(where, t1, next(iter(sizes)) if sizes else None)
    check_span(where, t0, t1)
    check_solver_options(where, dt0=dt0, rtol=rtol, atol=atol, max_steps=max_steps)
    check_number(where, "blowup_threshold", blowup_threshold, gt=1, allow_inf=True)
    if rank_rtol is not None:
        check_number(where, "rank_rtol", rank_rtol, ge=0)
    solver_obj, adaptive = make_solver(solver)
    ts = save_times(t0, t1, ts, n_save, model.dtype, where)
    controller = make_controller(
        adaptive, dt0=dt0, rtol=rtol, atol=atol, dtype=model.dtype, jump_ts=model.layer_times
    )
    args = (model, jnp.asarray(t0, model.dtype), jnp.asarray(t1, model.dtype), ts,
            None if dt0 is None else jnp.asarray(dt0, model.dtype), solver_obj, controller,
            max_steps, blowup_threshold, rank_rtol)
    if sizes:
        n = sizes.pop()
        m0 = jnp.broadcast_to(m0, (n, d))
        S0 = jnp.broadcast_to(S0, (n, d, d))
        with batch_progress(progress, n, "points") as tick:
            return _solve_batch(m0, S0, *args, lanes, tick)
    return _solve(m0, S0, *args, progress)


def _factored_field(t, y, args):
    m, L = y
    layer = args["model"].at(t)
    S = matmul(L, L.T)
    M, c = moment_matrices(layer, m, S)
    return c + M @ m, matmul(M, L)


def _blowup_event(t, y, args, **kwargs):
    """tr S = |L|_F^2 above its limit (or not finite): stop at the end of this step.

    A boolean event with no root finder: the Riccati extrapolation in `_finish` is accurate wherever
    we stop, and a root finder would run in every lane."""
    m, L = y
    log_tr = jnp.log(jnp.sum(L * L) + jnp.finfo(L.dtype).tiny)
    return (log_tr > args["log_limit"]) | ~jnp.isfinite(log_tr)


def _start(S0, threshold, rank_rtol):
    """(L0, log tr S limit) of one point."""
    tiny = jnp.finfo(S0.dtype).tiny
    return covariance_factor(S0, rank_rtol), jnp.log(jnp.maximum(jnp.trace(S0), tiny ** 0.5)) + jnp.log(threshold)


def _finish(traj: Trajectory, model, ts, t0, threshold, log_limit) -> GaussianSolution:
    """Saves held at the last state after the stop, and the blow-up time by Riccati extrapolation."""
    tiny = jnp.finfo(ts.dtype).tiny
    means, Ls = traj.ys
    m_end, L_end = traj.y_end
    t_end = traj.t_end
    valid = (ts <= t_end) & jnp.all(jnp.isfinite(means), axis=-1) & jnp.all(jnp.isfinite(Ls), axis=(-2, -1))
    means = jnp.where(valid[:, None], means, m_end)
    Ls = jnp.where(valid[:, None, None], Ls, L_end)
    covs = Ls @ jnp.swapaxes(Ls, -1, -2)
    # Riccati extrapolation from the event state: tau = tr S / (d/dt tr S), d/dt tr S = 2 tr(M S).
    S_end = L_end @ L_end.T
    M_end, _ = moment_matrices(model.at(t_end), m_end, S_end)
    tr = jnp.trace(S_end)
    dtr = 2.0 * jnp.trace(M_end @ S_end)
    tau = jnp.where(dtr > 0, tr / jnp.where(dtr > 0, dtr, 1.0), jnp.inf)
    singular = tau < 0.01 * (t_end - t0)
    # Exponential growth: log tr S is linear in t, so the crossing time is t_end - tau log(tr / limit).
    t_cross = t_end - tau * jnp.maximum(jnp.log(tr + tiny) - log_limit, 0.0)
    # A solver failure (step size collapsing, max_steps) with an already large covariance is a
    # singularity the event threshold could not resolve.
    failed = ~traj.success
    collapsed = failed & (jnp.log(tr + tiny) > log_limit - 0.5 * jnp.log(threshold))
    # A non-finite end state (a fixed-step solver accepts NaN steps; the event also fires on one)
    # is a recorded failure, never a blow-up: no finite threshold crossing was seen.
    finite_end = jnp.all(jnp.isfinite(m_end)) & jnp.all(jnp.isfinite(L_end))
    blown = (traj.event | collapsed) & finite_end
    blowup = jnp.where(blown, jnp.where(singular, t_end + tau, jnp.where(jnp.isfinite(t_cross), t_cross, t_end)), jnp.inf)
    return GaussianSolution(
        ts=ts, means=means, covs=covs, valid=valid, blowup_time=blowup.astype(ts.dtype),
        t_end=t_end, success=(~failed | collapsed) & finite_end, num_steps=traj.num_steps,
        num_attempts=traj.num_attempts,
    )


@eqx.filter_jit
def _solve(m0, S0, model, t0, t1, ts, dt0, solver, controller, max_steps, threshold, rank_rtol, progress):
    L0, log_limit = _start(S0, threshold, rank_rtol)
    traj = solve(_factored_field, (m0, L0), {"model": model, "log_limit": log_limit}, t0=t0, t1=t1, ts=ts,
                 solver=solver, controller=controller, dt0=dt0, max_steps=max_steps, event=_blowup_event,
                 progress_meter=progress_meter(progress))
    return _finish(traj, model, ts, t0, threshold, log_limit)


@eqx.filter_jit
def _solve_batch(m0, S0, model, t0, t1, ts, dt0, solver, controller, max_steps, threshold, rank_rtol, lanes, tick):
    L0, log_limit = jax.vmap(lambda S: _start(S, threshold, rank_rtol))(S0)
    shared = model.batch_size is None
    per_point, layer_times = split_layer_times(model)
    args = {"log_limit": log_limit} if shared else {"log_limit": log_limit, "model": per_point}

    def point_model(a):
        return model if shared else with_layer_times(a["model"], layer_times)

    def field(t, y, a):
        return _factored_field(t, y, {"model": point_model(a)})

    traj = solve_ensemble(field, (m0, L0), args, t0=t0, t1=t1, ts=ts, solver=solver, controller=controller, dt0=dt0,
                          max_steps=max_steps, event=_blowup_event, lanes=lanes, on_finish=tick)
    grids = jnp.broadcast_to(ts, traj.t_end.shape + ts.shape[-1:])  # each point's save grid
    sol = jax.vmap(lambda tr, a, t: _finish(tr, point_model(a), t, t0, threshold, a["log_limit"]))(traj, args, grids)
    return sol if ts.ndim == 2 else eqx.tree_at(lambda s: s.ts, sol, ts)  # a shared grid stays (T,)
