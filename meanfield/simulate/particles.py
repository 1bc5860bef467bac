r"""Token particles: integrate $\dot x_i = F(t, X)_i$ for all n tokens with diffrax.

One compiled solve per (model options, shapes, solver). A batch (X0 of shape (B, n, d), and/or a
stacked Model with leading axis B) runs the ensemble integrator of `core.solve_ensemble`: every
point steps on its own and finished points are replaced from a queue. `jax.vmap` of an
unbatched call works as for any pure function (in lockstep: every lane pays the slowest lane).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from .. import _display as D
from .._display import Summarised, Summary
from .._types import Tokens
from ..model.attention import AbstractAttention, LowRank, direct_evaluator
from ..model.field import particle_field
from .attention_policy import Auto, resolve_attention
from .core import Trajectory, solve, solve_ensemble
from .checks import check_depths, check_finite, check_model_finite, check_number, check_solver_options, check_span
from .solvers import batch_progress, make_controller, make_solver, progress_meter, save_times


class ParticleSolution(Summarised, eqx.Module):
    """Result of `simulate_particles`.

    Attributes:
        ts: save times, shape (T,) ((B, T) for a batch with one depth t1 per point).
        xs: token states, shape (T, n, d), or the pytree returned by `save_fn` per time. A batched
            call adds a leading axis B to `xs`, `success`, `blown_up`, `t_end`, `num_steps`, `num_attempts`.
        success: whether the solver reached t1 or stopped at a blow-up (False: max_steps hit,
            step size collapsed, or the state became NaN / inf, a recorded failure and not a
            regime; saves after a failure hold inf, reached saves may hold NaN).
        blown_up: whether the token scale crossed `blowup_growth` with a finite state (the solve
            stopped there; later saves hold inf).
        t_end: the depth the solve reached.
        num_steps: accepted solver steps. num_attempts: accepted + rejected steps (what `max_steps`
            bounds, and what a solve costs: one field evaluation per stage of each attempt).
        solution: the raw `diffrax.Solution` (use `.evaluate(t)` when `dense=True`; None for a
            batched call).
    """

    ts: jax.Array
    xs: Any
    success: jax.Array
    blown_up: jax.Array
    t_end: jax.Array
    num_steps: jax.Array
    num_attempts: jax.Array
    solution: diffrax.Solution

    def __iter__(self):  # allows `ts, xs = simulate_particles(...)`
        return iter((self.ts, self.xs))

    def evaluate(self, t):
        """Dense output X(t) (requires `dense=True`)."""
        return self.solution.evaluate(t)

    @property
    def final(self):
        """State (or saved observables) at the last save time, (n, d); (B, n, d) for a batch."""
        last = (lambda x: x[:, -1]) if jnp.ndim(self.t_end) else (lambda x: x[-1])
        return jax.tree.map(last, self.xs)

    def _summary(self) -> Summary:
        """What `__repr__` / `_repr_html_` show (`Summarised`): shapes and scalars only, no JAX op."""
        if isinstance(self.xs, jax.Array) and self.xs.ndim >= 3:
            *batch, T, n, d = self.xs.shape
            rows = [("ts", D.span(self.ts)), ("xs", D.shape(self.xs)), ("n", str(n)), ("d", str(d))]
            if batch:
                rows.append(("batch", str(tuple(batch))))
        else:  # observables saved by `save_fn`
            shapes = jax.tree.map(lambda x: tuple(getattr(x, "shape", ())), self.xs)
            rows = [("ts", D.span(self.ts)), ("xs", str(shapes))]
        rows += [("success", D.flag(self.success)), ("blown_up", D.flag(self.blown_up)),
                 ("t_end", D.num(self.t_end)), ("num_steps", D.num(self.num_steps)),
                 ("num_attempts", D.num(self.num_attempts))]
        return Summary("ParticleSolution", rows,
                       "regime: mf.classify(sol) -> index into mf.REGIMES; final tokens: sol.final")


def simulate_particles(
    model,
    X0: Tokens,
    t1: float,
    *,
    t0: float = 0.0,
    ts=None,
    n_save: int = 101,
    solver="tsit5",
    dt0: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 100_000,
    attention: AbstractAttention = Auto(),
    save_fn: Callable[[Tokens], Any] | None = None,
    dense: bool = False,
    progress: bool = False,
    blowup_growth: float | None = 1e8,
    lanes: int | None = None,
) -> ParticleSolution:
    r"""Solve the token ODE $\dot x_i = a_\text{attn}\mathrm{Attn}(x_i;X) + a_\text{mlp}\mathrm{MLP}(x_i)$.

    Arguments:
        model: a `Model` (depth-constant or piecewise), or a batch of B models stacked along a
            leading axis of every array leaf (`jax.tree.map(lambda *a: jnp.stack(a), *models)`).
        X0: initial tokens, shape (n, d), or a batch (B, n, d). With `norm="sphere"` rows should
            have unit norm. A batch (of X0, of models, or both) runs the ensemble integrator: B
            independent adaptive solves on a pool of `lanes` lanes, each lane refilled with the next
            point when its point finishes (`meanfield.simulate.core`); each point gets the steps
            its single solve would take.
        t1: final depth; for a batch also one depth per point, shape (B,) (each point then saves at
            `n_save` equally spaced depths of its own [t0, t1]: `ts` has shape (B, n_save)).
            `t0`: initial depth.
        ts: save times (default: `n_save` equally spaced on [t0, t1]).
        solver: `"tsit5"`, `"dopri5"`, `"dopri8"`, `"bosh3"` (adaptive, `rtol`/`atol`; default
            3e-6/3e-8 in float32, measured above its rounding floor, 1e-9/1e-11 in float64), `"rk4"`, `"euler"`, `"heun"`,
            `"midpoint"` (fixed step `dt0`), or any diffrax solver.
        attention: the attention evaluator: `Auto(rtol)` (default: the low-rank sum when its a
            priori error bound meets `rtol` and its cost model beats the direct sum, in practice
            n >= 2048 tokens with d or rank(Q^T K) <= 4; else the direct sum, dense up to 4096
            tokens, blocked above), `Dense()`, `Blocked(block_size)` (online softmax, O(n) memory)
            or `LowRank(orders, rtol, fallback=Blocked())` (separable Chebyshev features, O(n F),
            `mf.lowrank_attention`; softmax and unnormalised attention, causal or not). Resolved
            once from `X0` (`meanfield.simulate.attention_policy.resolve_attention`): `Auto` and
            `LowRank(orders=None)` plan their static orders here from concrete values (under an
            outer jit/vmap `Auto` is the direct sum); given `orders` skip the planning and work
            under an outer jit (how the sweep engine uses them). Every field evaluation of the
            low-rank sum rechecks its bound on the current tokens and falls back where it fails.
            Batched calls use the direct sum (`Auto` resolves to it; `LowRank` is refused: its
            fallback would run in every lane).
        save_fn: if given, save `save_fn(X)` (any pytree of arrays) instead of the tokens.
        dense: also keep dense output, available through `.evaluate(t)` (single solves only).
        progress: show a progress bar (`tqdm.auto`: a widget in notebooks): over depth for one
            solve, over finished points for a batch.
        blowup_growth: stop (a diffrax event) once the RMS token norm exceeds this multiple of
            its initial value (a number > 1, inf allowed); None never stops. Without it an
            exploding run spends `max_steps` on overflowing values.
        lanes: pool size of a batched call (default `min(B, 256)`).

    Returns:
        `ParticleSolution` with `ts` (T,) and `xs` (T, n, d) (or the saved observables); a batch
        adds a leading axis B to every field but `ts` (and to `ts` too with per-point depths).

    Raises:
        ValueError: naming the argument, for concrete inputs that are not valid numbers: `X0` or a
            model array holding NaN / inf, `t0` / `t1` not finite or `t1 <= t0`, `ts` not finite,
            decreasing or outside [t0, t1], `n_save` not an integer >= 2, `dt0` / `rtol` / `atol`
            not finite and > 0, `max_steps` < 1, `blowup_growth` NaN or <= 1; and on bad shapes (a
            per-point `t1` whose length is not the batch's, or in a single solve, or with `ts`).
            Traced inputs (inside jit / vmap) are not checked.
    """
    where = "simulate_particles"
    X0 = jnp.asarray(X0, model.dtype)
    B = model.batch_size
    if X0.ndim not in (2, 3) or X0.shape[-1] != model.d:
        raise ValueError(
            f"simulate_particles: `X0` must have shape (n, d) or (B, n, d) with d = {model.d}; got {tuple(X0.shape)}."
        )
    if X0.shape[-2] < 1:
        raise ValueError("simulate_particles: `X0` must hold at least one token; got n = 0.")
    # Concrete inputs only (traced ones, inside jit / vmap, pass): refuse what is not a number.
    check_finite(where, "X0", X0)
    check_model_finite(where, model)
    check_solver_options(where, dt0=dt0, rtol=rtol, atol=atol, max_steps=max_steps)
    if blowup_growth is not None:
        check_number(where, "blowup_growth", blowup_growth, gt=1, allow_inf=True)
    if X0.ndim == 3 and B is not None and X0.shape[0] != B:
        raise ValueError(
            f"simulate_particles: `X0` holds a batch of {X0.shape[0]} and `model` a batch of {B}; they must agree."
        )
    batched = X0.ndim == 3 or B is not None
    check_depths(where, t1, X0.shape[0] if X0.ndim == 3 else B if batched else None)
    check_span(where, t0, t1)
    if batched:
        if dense:
            raise ValueError("simulate_particles: `dense=True` needs a single solve (X0 of shape (n, d), one Model).")
        if isinstance(attention, LowRank):
            raise ValueError(
                "simulate_particles: a batched call uses the direct attention sum; the low-rank path "
                f"(attention={attention!r}) runs one point at a time."
            )
        # The ensemble runs the direct sum (no low-rank planning per point).
        attention = direct_evaluator(X0.shape[-2]) if isinstance(attention, Auto) else resolve_attention(
            attention, model, X0)
    else:
        attention = resolve_attention(attention, model, X0)
    solver_obj, adaptive = make_solver(solver)
    ts = save_times(t0, t1, ts, n_save, model.dtype, where)
    controller = make_controller(
        adaptive, dt0=dt0, rtol=rtol, atol=atol, dtype=model.dtype, jump_ts=model.layer_times
    )
    t0_, t1_ = jnp.asarray(t0, model.dtype), jnp.asarray(t1, model.dtype)
    dt0_ = None if dt0 is None else jnp.asarray(dt0, model.dtype)
    if batched:
        n_points = X0.shape[0] if X0.ndim == 3 else B
        with batch_progress(progress, n_points, "points") as tick:
            return _solve_batch(model, X0, t0_, t1_, ts, dt0_, solver_obj, controller, max_steps, attention,
                                save_fn, blowup_growth, lanes, tick)
    return _solve(
        model, X0, t0_, t1_, ts, dt0_, solver_obj, controller, max_steps, attention, save_fn, dense,
        progress, blowup_growth,
    )


def split_layer_times(model):
    """(the model without `layer_times`, its `layer_times`): a batch of piecewise models carries its
    arrays per point and one depth schedule shared by every point."""
    if model.layer_times is None:
        return model, None
    if model.layer_times.ndim > 1:
        raise ValueError("a batch of piecewise models must share one `layer_times` (pass it unbatched).")
    return eqx.tree_at(lambda m: m.layer_times, model, None), model.layer_times


def with_layer_times(model, layer_times):
    """Inverse of `split_layer_times` (inside a lane: the point's arrays and the shared schedule)."""
    if layer_times is None:
        return model
    return eqx.tree_at(lambda m: m.layer_times, model, layer_times, is_leaf=lambda x: x is None)


def _blowup_event(blowup_growth):
    """Boolean event on the mean squared token norm: above its limit, or not finite."""
    if blowup_growth is None:
        return None

    def too_big(t, y, args, **kwargs):
        ms = jnp.mean(jnp.sum(y * y, axis=-1))
        return (ms > args["limit"]) | ~jnp.isfinite(ms)

    return too_big


def _limit(X0, blowup_growth):
    tiny = jnp.finfo(X0.dtype).tiny
    return (blowup_growth ** 2) * jnp.maximum(jnp.mean(jnp.sum(X0 * X0, axis=-1)), tiny) if blowup_growth else jnp.inf


def _finish(traj: Trajectory, ts, dense_solution=None) -> ParticleSolution:
    """A `ParticleSolution` from one trajectory: saves after the stopping depth hold inf.

    A non-finite state where the solve stopped is a failure (`success` False, `blown_up` False),
    never a blow-up: no finite threshold was seen crossed (a fixed-step solver accepts NaN steps;
    the blow-up event also fires on a non-finite state)."""
    reached = ts <= traj.t_end
    ys = jax.tree.map(lambda a: jnp.where(reached.reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.inf), traj.ys)
    finite_end = jnp.all(jnp.isfinite(traj.y_end))
    return ParticleSolution(ts=ts, xs=ys, success=traj.success & finite_end, blown_up=traj.event & finite_end,
                            t_end=traj.t_end, num_steps=traj.num_steps, num_attempts=traj.num_attempts,
                            solution=dense_solution)


@eqx.filter_jit
def _solve(model, X0, t0, t1, ts, dt0, solver, controller, max_steps, attention, save_fn, dense, progress,
           blowup_growth):
    def vector_field(t, X, args):
        return particle_field(t, X, args["model"], attention=attention)

    fn = None if save_fn is None else (lambda t, y, args: save_fn(y))
    traj = solve(vector_field, X0, {"model": model, "limit": _limit(X0, blowup_growth)}, t0=t0, t1=t1, ts=ts,
                 solver=solver, controller=controller, dt0=dt0, max_steps=max_steps,
                 event=_blowup_event(blowup_growth), fn=fn, dense=dense, progress_meter=progress_meter(progress))
    return _finish(traj, ts, traj.solution)


@eqx.filter_jit
def _solve_batch(model, X0, t0, t1, ts, dt0, solver, controller, max_steps, attention, save_fn,
                 blowup_growth, lanes, tick):
    shared = model.batch_size is None
    if X0.ndim == 2:
        X0 = jnp.broadcast_to(X0, (model.batch_size,) + X0.shape)
    args = {"limit": jax.vmap(lambda x: _limit(x, blowup_growth))(X0)}
    per_point, layer_times = split_layer_times(model)
    if not shared:
        args["model"] = per_point

    def vector_field(t, X, a):
        m = model if shared else with_layer_times(a["model"], layer_times)
        return particle_field(t, X, m, attention=attention)

    fn = None if save_fn is None else (lambda t, y, args: save_fn(y))
    traj = solve_ensemble(vector_field, X0, args, t0=t0, t1=t1, ts=ts, solver=solver, controller=controller,
                          dt0=dt0, max_steps=max_steps, event=_blowup_event(blowup_growth), fn=fn, lanes=lanes,
                          on_finish=tick)
    sol = jax.vmap(_finish)(traj, jnp.broadcast_to(ts, traj.t_end.shape + ts.shape[-1:]))
    return sol if ts.ndim == 2 else eqx.tree_at(lambda s: s.ts, sol, ts)  # a shared grid stays (T,)
