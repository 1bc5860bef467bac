r"""The one solve core: $(f, y_0, \text{save times}, \text{solver}, \text{controller}, \text{event})$ -> saves.

Every simulator builds a vector field $\dot y = f(t, y, \text{args})$, an optional boolean event
$g(t, y, \text{args})$ (stop at the end of the first step where it holds) and a save function,
then calls one of two solvers that return the same `Trajectory`:

- `solve`: one trajectory, `diffrax.diffeqsolve` (what `jax.vmap` of a single call runs).
- `solve_ensemble`: B trajectories on a fixed pool of L lanes. Each lane holds its own t, dt,
  state, solver (FSAL) state, PID controller state, save cursor and point index. One loop
  iteration makes one attempted step of the same Runge-Kutta tableau in every lane, with one
  batched field evaluation per stage (the solver's `step` and diffrax's `adapt_step_size`, vmapped
  over lanes; the named solvers are diffrax's tableaus with their stages unrolled,
  `solvers.UnrolledStages`); accept/reject and the next step size are per lane. A lane writes a save row only
  when its step crosses a save time (diffrax's dense interpolant, as `diffeqsolve` does), into
  its point's slot. A finished lane (t1 reached, event, max_steps, controller failure) writes
  its end state and is refilled from the queue of pending points, so the loop costs about
  (sum of steps over points) / L iterations instead of max steps, and no lane waits for another.

Each lane makes exactly the steps of the single solve (same tableau, controller and initial step
size): a lane differs from `solve` only by the rounding of batched vs unbatched arithmetic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from .._xla_flags import YNN_REDUCE_LANE_STATE


class Trajectory(eqx.Module):
    """What a solve returns, per trajectory (a leading batch axis B from `solve_ensemble`).

    Attributes:
        ys: `fn(t, y, args)` at the save times, shape (T, ...); `inf` at save times not reached.
        y_end: the state where the solve stopped.
        t_end: the time where it stopped (t1, the end of the event step, or where it failed).
        event: whether the event stopped it.
        success: reached t1 or the event (False: max_steps or a controller failure).
        num_steps: accepted steps. num_attempts: accepted + rejected steps.
        solution: the `diffrax.Solution` (single solves only; None from the ensemble).
    """

    ys: Any
    y_end: Any
    t_end: jax.Array
    event: jax.Array
    success: jax.Array
    num_steps: jax.Array
    num_attempts: jax.Array
    solution: Any = None


def _save_y(t, y, args):
    return y


def solve(field: Callable, y0, args, *, t0, t1, ts, solver, controller, dt0=None, max_steps: int,
          event: Callable | None = None, fn: Callable | None = None, dense: bool = False,
          progress_meter=None, throw: bool = False) -> Trajectory:
    """One trajectory of $\\dot y = f(t, y, args)$ through `diffrax.diffeqsolve` (saves at `ts`;
    `throw=True` raises on a failed solve instead of returning `success=False`)."""
    fn = _save_y if fn is None else fn
    saveat = diffrax.SaveAt(subs=[diffrax.SubSaveAt(ts=ts, fn=fn), diffrax.SubSaveAt(t1=True)], dense=dense)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), solver, t0, t1, dt0, y0, args=args, saveat=saveat,
        event=None if event is None else diffrax.Event(event), stepsize_controller=controller,
        max_steps=max_steps, throw=throw,
        progress_meter=diffrax.NoProgressMeter() if progress_meter is None else progress_meter,
    )
    ys, y_end = sol.ys
    hit = sol.result == diffrax.RESULTS.event_occurred
    if sol.event_mask is not None:
        hit = hit | jnp.any(jnp.asarray(sol.event_mask))
    return Trajectory(
        ys=ys, y_end=jax.tree.map(lambda a: a[0], y_end), t_end=sol.ts[1][0], event=hit,
        success=(sol.result == diffrax.RESULTS.successful) | hit,
        num_steps=sol.stats["num_accepted_steps"], num_attempts=sol.stats["num_steps"], solution=sol,
    )


def _clip_floor(t1):
    """t1 minus 100 ulp: a step ending past it is clipped onto t1 (as `diffeqsolve` does).

    Counted on the bit pattern (100 chained `nextafter` calls send XLA's simplifier in circles)."""
    int_dtype = jnp.int64 if t1.dtype == jnp.float64 else jnp.int32
    bits = jax.lax.bitcast_convert_type(t1, int_dtype)
    step = lambda b: jax.lax.bitcast_convert_type(b, t1.dtype)  # noqa: E731
    below_zero = -jnp.finfo(t1.dtype).tiny  # t1 = 0 (never a depth here): just below it
    return jnp.where(t1 > 0, step(bits - 100), jnp.where(t1 < 0, step(bits + 100), below_zero))


def _wrapped(field):
    """The term exactly as `diffeqsolve` hands it to the solver and controller: an ODETerm inside
    diffrax's time-direction wrapper. (The wrapper matters: with it, the PID controller's initial
    step for `dt0=None` is diffrax's fixed 0.01 rather than its Hairer-Wanner estimate, so a lane
    takes the single solve's very steps.)"""
    term = diffrax.ODETerm(field)
    try:
        from diffrax._term import WrapTerm
    except ImportError:  # a future diffrax without it: same equations, maybe another first step
        return term
    return WrapTerm(term, 1)


def _is_fsal(solver) -> bool:
    tableau = getattr(solver, "tableau", None)
    return bool(getattr(tableau, "fsal", False)) and isinstance(solver, diffrax.AbstractRungeKutta)


TAIL_MIN_LANES = 16
"""The smallest pool the ensemble's tail shrinks to (from pools of 128 lanes or more)."""

SMALL_LANE_STATE = 64
"""A lane whose state has at most this many numbers (a Gaussian's m and S up to d = 7) shrinks its
tail pool 4-fold at a time, larger ones about 2-fold (`tail_pools`)."""


def tail_pools(lanes: int, lane_size: int) -> list[int]:
    """The pool sizes the ensemble runs: `lanes`, then, once the queue is empty, smaller pools down to
    `TAIL_MIN_LANES` (none under 128 lanes). Each size is one more compiled loop.

    Small states (at most `SMALL_LANE_STATE` numbers per lane) shrink 4-fold: an iteration of few
    small lanes costs about its fixed per-operation overhead, so a pool up to 4x the active lanes
    costs little run time, and two fewer loops save compile time (10^5 Gaussian points, d = 4, two
    CPU devices: compile 14-18 s of CPU instead of 24-27 s, run time the same within noise,
    256 -> 64 -> 16). Larger states go to the power of two below; those the sweep compiles without
    YNNPACK (at most `YNN_REDUCE_LANE_STATE` numbers, `meanfield._xla_flags.program_options`) stop at
    three quarters of every power of two from 256 up (256 -> 192 -> 128 -> ...): their iteration
    costs about the pool's size, active lanes or not (64-token d = 8 lanes without YNNPACK: 25.1 /
    20.4 / 14.6 ms per iteration at 256 / 192 / 128 lanes). With YNNPACK's kernels an iteration
    costs by powers of two (the same lanes: 14.2 / 13.6 / 7.6 / 7.2 / 6.3 / 4.0 / 2.1 ms at
    256 / 192 / 128 / 96 / 64 / 32 / 16 lanes, session 31), so those states halve: dropping the
    192-lane stop took the 1,024-point particle chunk (n = 64, d = 8) from 162.0 / 165.4 s to
    146.9 / 153.0 s (alternating processes; session 29 had measured the stop paying with the
    slower field of then)."""
    sizes = [int(lanes)]
    if lanes >= 128:
        while sizes[-1] > TAIL_MIN_LANES:
            cur = sizes[-1]
            if lane_size <= SMALL_LANE_STATE:
                nxt = cur // 4
            elif cur >= 256 and cur & (cur - 1) == 0 and lane_size <= YNN_REDUCE_LANE_STATE:
                nxt = 3 * cur // 4
            else:
                nxt = 1 << ((cur - 1).bit_length() - 1)  # the power of two below
            sizes.append(max(TAIL_MIN_LANES, nxt))
    return sizes


def default_lanes(n_points: int) -> int:
    """Pool size when none is given: every point when few, else 256 lanes (on 2 CPU cores 256 lanes
    of a d = 4 moment field or of 32-token systems amortise the per-iteration cost; the tail after
    the queue empties runs on a shrunken pool). `lanes=` / `output.lanes` change it."""
    return int(max(1, min(n_points, 256)))


def solve_ensemble(field: Callable, y0, args, *, t0, t1, ts, solver, controller, dt0=None, max_steps: int,
                   event: Callable | None = None, fn: Callable | None = None, lanes: int | None = None,
                   args_batched: bool = True, refill: int | None = None, on_finish: Callable | None = None
                   ) -> Trajectory:
    """B trajectories of $\\dot y = f(t, y, args_b)$ on a pool of `lanes` independent integrators.

    Arguments:
        y0: pytree with a leading batch axis B. args: pytree with a leading axis B
            (`args_batched=True`) or shared by every point.
        t0: scalar start time. t1: scalar or (B,). ts: save times (T,) or (B, T) within [t0, t1].
        solver, controller: a diffrax Runge-Kutta solver and a `PIDController` /
            `ConstantStepSize` (as `make_solver` / `make_controller` give); `jump_ts` of a
            `ClipStepSizeController` are shared by all points.
        dt0: initial step (None: diffrax's initial step-size selection, per point).
        max_steps: attempted steps per point. event, fn: as in `solve`.
        lanes: pool size L (default `default_lanes(B)`). refill: lanes (re)initialised per
            iteration at most (default L when B <= L, else max(1, L // 8)); an idle lane beyond that
            waits one iteration.
        on_finish: optional host callback `on_finish(k)` with the number of points finished in
            an iteration (a progress bar); None compiles no callback.

    Returns:
        `Trajectory` with leading axis B (`solution` None).
    """
    fn = _save_y if fn is None else fn
    leaves = jax.tree.leaves(y0)
    B = int(leaves[0].shape[0])
    dtype = jnp.result_type(*leaves)
    L = default_lanes(B) if lanes is None else int(max(1, min(int(lanes), B)))
    # All points fit in the pool: fill it in the first iteration (else lanes started in later
    # iterations finish later: 256 consensus systems of ~25 steps took 8 more iterations).
    K = (L if B <= L else max(1, L // 8)) if refill is None else int(max(1, min(int(refill), L)))
    t0 = jnp.asarray(t0, dtype)
    t1 = jnp.broadcast_to(jnp.asarray(t1, dtype), (B,))
    ts = jnp.asarray(ts, dtype)
    ts = jnp.broadcast_to(ts, (B, ts.shape[-1]))
    T = ts.shape[-1]
    floor = _clip_floor(t1)
    controller = controller.wrap(1)
    terms = _wrapped(field)
    fsal = _is_fsal(solver)
    jumps = getattr(controller, "jump_ts", None) is not None  # a ClipStepSizeController (maybe in a StallGuard)
    error_order = solver.error_order(terms)
    arg_axis = 0 if args_batched else None
    take = (lambda tree, idx: jax.tree.map(lambda a: a[idx], tree))
    # Per-point arguments travel with their lane; shared ones stay outside the loop state.
    args_of = (lambda lane: lane["args"]) if args_batched else (lambda lane: args)

    def init_lane(y, a, t1_p):
        tnext, cstate = controller.init(terms, t0, t1_p, y, dt0, a, solver.func, error_order)
        tnext = jnp.minimum(tnext, t1_p)
        sstate = solver.init(terms, t0, tnext, y, a)
        if fsal:  # evaluate the first stage here, so no step of any lane re-evaluates it
            sstate = (jnp.array(False), terms.vf(t0, y, a))
        return tnext, cstate, sstate

    init_lanes = jax.vmap(init_lane, in_axes=(0, arg_axis, 0))

    def start(points):
        """Fresh lane state for `points` (all valid indices)."""
        y = take(y0, points)
        a = take(args, points) if args_batched else args
        tnext, cstate, sstate = init_lanes(y, a, t1[points])
        lane = dict(point=points, tprev=jnp.full(points.shape, t0), tnext=tnext, y=y, sstate=sstate,
                    cstate=cstate, jump=jnp.zeros(points.shape, bool), cursor=jnp.zeros(points.shape, jnp.int32),
                    steps=jnp.zeros(points.shape, jnp.int32), accepted=jnp.zeros(points.shape, jnp.int32))
        if args_batched:
            lane["args"] = a
        return lane

    out_ys = jax.tree.map(
        lambda s: jnp.full((B, T) + s.shape, jnp.inf, s.dtype),
        jax.eval_shape(fn, t0, take(y0, 0), take(args, 0) if args_batched else args),
    )
    out = dict(
        ys=out_ys, y_end=jax.tree.map(jnp.zeros_like, y0), t_end=jnp.full((B,), t0),
        event=jnp.zeros((B,), bool), success=jnp.zeros((B,), bool),
        steps=jnp.zeros((B,), jnp.int32), attempts=jnp.zeros((B,), jnp.int32),
    )
    # Every lane starts idle; the first iterations fill the pool from the queue (one traced `start`).
    lanes0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(start, jnp.zeros(L, jnp.int32)))
    lanes0["point"] = jnp.full((L,), -1, jnp.int32)

    def lane_step(tprev, tnext, y, a, sstate, cstate, jump, t1_p, floor_p):
        made_jump = jump if jumps else False
        y1, y_err, dense_info, sstate1, _ = solver.step(terms, tprev, tnext, y, a, sstate, made_jump)
        y_err = jax.tree.map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), y_err)
        keep, tp, tn, jump1, cstate1, c_result = controller.adapt_step_size(
            tprev, tnext, y, y1, a, y_err, error_order, cstate)
        tp = jnp.minimum(tp, t1_p)
        tn = jnp.where(tn > floor_p, jnp.where(keep, t1_p, tp + 0.5 * (t1_p - tp)), tn)
        sel = lambda new, old: jnp.where(keep, new, old)  # noqa: E731
        y1 = jax.tree.map(sel, y1, y)
        sstate1 = jax.tree.map(sel, sstate1, sstate)
        jump1 = jnp.where(keep, jump1, jump) if jumps else jump
        ok = c_result == diffrax.RESULTS.successful
        return keep, tp, tn, y1, sstate1, cstate1, jump1, ok, dense_info

    step_lanes = jax.vmap(lane_step, in_axes=(0, 0, 0, arg_axis, 0, 0, 0, 0, 0))

    def interp(tprev, tnext, dense_info, t):
        return solver.interpolation_cls(t0=tprev, t1=tnext, **dense_info).evaluate(t)

    interp_lanes = jax.vmap(interp)
    save_lanes = jax.vmap(fn, in_axes=(0, 0, arg_axis))
    stop_lanes = None if event is None else jax.vmap(event, in_axes=(0, 0, arg_axis))

    def refill(args_):
        lane, queue = args_
        n = lane["point"].shape[0]
        k = min(K, n)
        idle = lane["point"] < 0
        slots = jnp.nonzero(idle, size=k, fill_value=n)[0]
        new = queue + jnp.arange(k, dtype=jnp.int32)
        valid = (slots < n) & (new < B)
        fresh = start(jnp.where(valid, new, 0))
        fresh["point"] = jnp.where(valid, new, -1)
        dst = jnp.where(valid, slots, n)
        lane = jax.tree.map(lambda cur, f: cur.at[dst].set(f, mode="drop"), lane, fresh)
        return lane, queue + jnp.sum(valid).astype(queue.dtype)

    def body(carry, refilling=True):
        lane, out, queue = carry
        if refilling:  # idle lanes take the next points of the queue (at most `refill` per iteration)
            lane, queue = jax.lax.cond(jnp.any(lane["point"] < 0) & (queue < B), refill, lambda a: a, (lane, queue))
        active = lane["point"] >= 0
        p = jnp.where(active, lane["point"], 0)
        t1_l, floor_l, ts_l = t1[p], floor[p], ts[p]
        keep, tp, tn, y1, sstate, cstate, jump, ok, dense_info = step_lanes(
            lane["tprev"], lane["tnext"], lane["y"], args_of(lane), lane["sstate"], lane["cstate"], lane["jump"],
            t1_l, floor_l)

        # Saves crossed by this step: ts[cursor] <= old tnext (diffrax's dense interpolation).
        def save_needed(cursor):
            t_c = jnp.take_along_axis(ts_l, jnp.minimum(cursor, T - 1)[:, None], axis=1)[:, 0]
            return active & keep & (cursor < T) & (t_c <= lane["tnext"]), t_c

        def save_cond(c):
            return jnp.any(save_needed(c[0])[0])

        def save_body(c):
            cursor, ys = c
            need, t_c = save_needed(cursor)
            vals = save_lanes(t_c, interp_lanes(lane["tprev"], lane["tnext"], dense_info, t_c), args_of(lane))
            row = jnp.where(need, p, B)  # out of range: dropped
            ys = jax.tree.map(lambda buf, v: buf.at[row, jnp.minimum(cursor, T - 1)].set(v, mode="drop"), ys, vals)
            return cursor + need.astype(cursor.dtype), ys

        cursor, ys = jax.lax.while_loop(save_cond, save_body, (lane["cursor"], out["ys"]))
        steps = lane["steps"] + 1
        accepted = lane["accepted"] + keep.astype(jnp.int32)
        hit = jnp.zeros_like(keep) if stop_lanes is None else stop_lanes(tp, y1, args_of(lane))
        reached = tp >= t1_l
        finished = active & (reached | hit | ~ok | (steps >= max_steps))
        row = jnp.where(finished, p, B)
        out = dict(
            ys=ys,
            y_end=jax.tree.map(lambda buf, v: buf.at[row].set(v, mode="drop"), out["y_end"], y1),
            t_end=out["t_end"].at[row].set(tp, mode="drop"),
            event=out["event"].at[row].set(hit, mode="drop"),
            success=out["success"].at[row].set((reached | hit) & ok, mode="drop"),
            steps=out["steps"].at[row].set(accepted, mode="drop"),
            attempts=out["attempts"].at[row].set(steps, mode="drop"),
        )
        lane = dict(lane, point=jnp.where(finished, -1, lane["point"]), tprev=tp, tnext=tn, y=y1, sstate=sstate,
                    cstate=cstate, jump=jump, cursor=cursor, steps=steps, accepted=accepted)
        if on_finish is not None:
            jax.debug.callback(on_finish, jnp.sum(finished))

        return lane, out, queue

    # The tail: once the queue is empty, the last points run on a pool cut each time the active lanes
    # fit in the next size (`tail_pools`: 256 -> 128 -> 64 -> 32 -> 16 for 64-token particles, with a
    # 192 stop for mid-size states, 256 -> 64 -> 16 for small states). Per-point costs are heavy-tailed (stiff points take 10-30x the median
    # steps): when the queue empties, many lanes still hold slow points for hundreds of iterations.
    # Halving (instead of one 8-fold cut at <= 32 active lanes) took a 512-point particle chunk
    # from 9.8 s to 5.8 s, a 1,024-point one from 14.7 s to 10.2 s (n = 32, one core) and an 8,192-point
    # d = 4 moment chunk from 3.0 s to 1.9 s. Each pool size is one more compiled loop (without the
    # refill, which the tail never needs): that chunk compiles in 14.8 s instead of 10.3 s, once per
    # machine with the persistent cache. Pools under 128 lanes are not cut, as before.
    sizes = tail_pools(L, sum(math.prod(leaf.shape[1:]) for leaf in leaves))
    carry = (lanes0, out, jnp.asarray(0, jnp.int32))
    for k, size_next in enumerate(sizes[1:] + [None]):

        def cond(c, size_next=size_next):
            lane, _, queue = c
            active = lane["point"] >= 0
            going = jnp.any(active) | (queue < B)
            if size_next is None:
                return going
            return going & ((queue < B) | (jnp.sum(active) > size_next))

        carry = jax.lax.while_loop(cond, body if k == 0 else functools.partial(body, refilling=False), carry)
        if size_next is not None:
            lane, out, queue = carry
            active = lane["point"] >= 0
            keep = jnp.nonzero(active, size=size_next, fill_value=0)[0]
            filled = jnp.arange(size_next) < jnp.sum(active)
            lane = jax.tree.map(lambda a: a[keep], lane)
            lane["point"] = jnp.where(filled, lane["point"], -1)
            carry = (lane, out, queue)
    _, out, _ = carry
    return Trajectory(ys=out["ys"], y_end=out["y_end"], t_end=out["t_end"], event=out["event"],
                      success=out["success"], num_steps=out["steps"], num_attempts=out["attempts"])
