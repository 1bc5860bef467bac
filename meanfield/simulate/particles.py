r"""Token particles: integrate $\dot x_i = F(t, X)_i$ for all n tokens with diffrax.

One compiled solve per (model options, shapes, solver); `jax.vmap` over models and initial
conditions works as for any pure function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from .._types import Tokens
from ..model.fast_attention import default_rtol, plan_attention
from ..model.field import particle_field
from .solvers import make_controller, make_solver, progress_meter, save_times


class ParticleSolution(eqx.Module):
    """Result of `simulate_particles`.

    Attributes:
        ts: save times, shape (T,).
        xs: token states, shape (T, n, d), or the pytree returned by `save_fn` per time.
        success: whether the solver reached t1 or stopped at a blow-up (False: max_steps hit
            or step size collapsed; saves after a failure hold inf).
        blown_up: whether the token scale crossed `blowup_growth` (the solve stopped there;
            later saves hold inf).
        t_end: the depth the solve reached.
        num_steps: accepted solver steps.
        solution: the raw `diffrax.Solution` (use `.evaluate(t)` when `dense=True`).
    """

    ts: jax.Array
    xs: Any
    success: jax.Array
    blown_up: jax.Array
    t_end: jax.Array
    num_steps: jax.Array
    solution: diffrax.Solution

    def __iter__(self):  # allows `ts, xs = simulate_particles(...)`
        return iter((self.ts, self.xs))

    def evaluate(self, t):
        """Dense output X(t) (requires `dense=True`)."""
        return self.solution.evaluate(t)

    @property
    def final(self):
        """State (or saved observables) at the last save time."""
        return jax.tree.map(lambda x: x[-1], self.xs)

    def _summary(self) -> list[tuple[str, str]]:
        """(name, value) rows for `__repr__` / `_repr_html_`: shapes and scalars only, no JAX op."""
        from .. import _display as D

        if isinstance(self.xs, jax.Array) and self.xs.ndim >= 3:
            *batch, T, n, d = self.xs.shape
            rows = [("ts", D.span(self.ts)), ("xs", D.shape(self.xs)), ("n", str(n)), ("d", str(d))]
            if batch:
                rows.append(("batch", str(tuple(batch))))
        else:  # observables saved by `save_fn`
            shapes = jax.tree.map(lambda x: tuple(getattr(x, "shape", ())), self.xs)
            rows = [("ts", D.span(self.ts)), ("xs", str(shapes))]
        rows += [("success", D.flag(self.success)), ("blown_up", D.flag(self.blown_up)),
                 ("t_end", D.num(self.t_end)), ("num_steps", D.num(self.num_steps))]
        return rows

    def __repr__(self) -> str:
        from .. import _display as D

        rows = D.summary(self)
        return eqx.Module.__repr__(self) if rows is None else D.text("ParticleSolution", rows)

    def _repr_html_(self) -> str | None:
        from .. import _display as D

        rows = D.summary(self)
        return None if rows is None else D.table(
            "meanfield.ParticleSolution", rows, "regime: mf.classify(sol) -> index into mf.REGIMES; final tokens: sol.final")


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
    attention_impl: str = "auto",
    block_size: int = 1024,
    attention_method: str = "auto",
    attention_rtol: float | None = None,
    attention_orders: tuple[int, ...] | None = None,
    save_fn: Callable[[Tokens], Any] | None = None,
    dense: bool = False,
    progress: bool = False,
    blowup_growth: float | None = 1e8,
) -> ParticleSolution:
    r"""Solve the token ODE $\dot x_i = a_\text{attn}\mathrm{Attn}(x_i;X) + a_\text{mlp}\mathrm{MLP}(x_i)$.

    Arguments:
        model: a `Model` (depth-constant or piecewise).
        X0: initial tokens, shape (n, d). With `norm="sphere"` rows should have unit norm.
        t1: final depth. `t0`: initial depth.
        ts: save times (default: `n_save` equally spaced on [t0, t1]).
        solver: `"tsit5"`, `"dopri5"`, `"dopri8"`, `"bosh3"` (adaptive, `rtol`/`atol`; default
            1e-6/1e-8 in float32, 1e-9/1e-11 in float64), `"rk4"`, `"euler"`, `"heun"`,
            `"midpoint"` (fixed step `dt0`), or any diffrax solver.
        attention_impl: `"dense"`, `"blocked"` (online softmax, O(n) memory) or `"auto"`
            (dense up to 4096 tokens). `block_size`: tokens per block.
        attention_method: `"direct"` (the sum over all pairs, `attention_impl`), `"lowrank"`
            (separable Chebyshev features, O(n F), `mf.lowrank_attention`; softmax and
            unnormalised attention, causal or not, rank(Q^T K) small) or `"auto"` (low-rank only
            when its a priori error bound meets `attention_rtol` and its cost model beats the
            direct sum: in practice n >= 2048 tokens with d or rank(Q^T K) <= 4). The orders are
            chosen here from `X0` (concrete values; under an outer jit/vmap "auto" is direct);
            every field evaluation rechecks the bound on the current tokens and falls back to the
            direct sum where it fails. Shaped attention is always direct.
        attention_rtol: error bound for the low-rank path, relative to max_j |V x_j| (softmax);
            default 1e-6 in float32, 1e-12 in float64.
        attention_orders: static Chebyshev orders (one per coordinate, e.g. from
            `mf.choose_orders` on representative tokens) for the low-rank path, skipping the
            planning from `X0`: works under an outer jit (how the sweep engine uses it); the bound
            is still rechecked at every evaluation, with the direct-sum fallback.
        save_fn: if given, save `save_fn(X)` (any pytree of arrays) instead of the tokens.
        dense: also keep dense output, available through `.evaluate(t)`.
        progress: show a progress bar over depth (`tqdm.auto`: a widget in notebooks).
        blowup_growth: stop (a diffrax event) once the RMS token norm exceeds this multiple of
            its initial value; None never stops. Without it an exploding run spends `max_steps`
            on overflowing values, and in a vmapped batch every lane waits for it.

    Returns:
        `ParticleSolution` with `ts` (T,) and `xs` (T, n, d) (or the saved observables).
    """
    X0 = jnp.asarray(X0, model.dtype)
    if X0.ndim != 2 or X0.shape[1] != model.d:
        raise ValueError(
            f"simulate_particles: `X0` must have shape (n, d) with d = {model.d}; got {tuple(X0.shape)}."
        )
    if X0.shape[0] < 1:
        raise ValueError("simulate_particles: `X0` must hold at least one token; got n = 0.")
    if attention_orders is not None:
        orders = tuple(int(o) for o in attention_orders)
        if len(orders) != model.d or min(orders) < 1 or model.attention not in ("softmax", "unnormalised"):
            raise ValueError(
                f"simulate_particles: `attention_orders` must hold d = {model.d} positive integers and needs "
                f"softmax or unnormalised attention; got {attention_orders} with {model.attention!r}."
            )
    else:
        orders = plan_attention(model, X0, method=attention_method, rtol=attention_rtol)
    rtol_attn = None if orders is None else (
        default_rtol(model.dtype) if attention_rtol is None else float(attention_rtol))
    solver_obj, adaptive = make_solver(solver)
    ts = save_times(t0, t1, ts, n_save, model.dtype)
    controller = make_controller(
        adaptive, dt0=dt0, rtol=rtol, atol=atol, dtype=model.dtype, jump_ts=model.layer_times
    )
    return _solve(
        model, X0, jnp.asarray(t0, model.dtype), jnp.asarray(t1, model.dtype), ts,
        None if dt0 is None else jnp.asarray(dt0, model.dtype),
        solver_obj, controller, max_steps, attention_impl, block_size, save_fn, dense, progress, blowup_growth,
        orders, rtol_attn,
    )


@eqx.filter_jit
def _solve(model, X0, t0, t1, ts, dt0, solver, controller, max_steps, impl, block_size, save_fn, dense, progress,
           blowup_growth, orders=None, rtol_attn=None):
    def vector_field(t, X, args):
        return particle_field(t, X, args, impl=impl, block_size=block_size, orders=orders, rtol=rtol_attn)

    fn = (lambda t, y, args: y) if save_fn is None else (lambda t, y, args: save_fn(y))
    event = None
    if blowup_growth is not None:
        limit = (blowup_growth ** 2) * jnp.maximum(jnp.mean(jnp.sum(X0 * X0, axis=-1)), jnp.finfo(X0.dtype).tiny)

        def too_big(t, y, args, **kwargs):
            ms = jnp.mean(jnp.sum(y * y, axis=-1))
            return (ms > limit) | ~jnp.isfinite(ms)

        event = diffrax.Event(too_big)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        t0,
        t1,
        dt0,
        X0,
        args=model,
        saveat=diffrax.SaveAt(ts=ts, fn=fn, dense=dense, t1=True),
        event=event,
        stepsize_controller=controller,
        max_steps=max_steps,
        throw=False,
        progress_meter=progress_meter(progress),
    )
    blown = sol.result == diffrax.RESULTS.event_occurred
    if sol.event_mask is not None:
        blown = blown | jnp.any(jnp.asarray(sol.event_mask))
    success = (sol.result == diffrax.RESULTS.successful) | blown
    # With SaveAt(t1=True) the final state follows the saves reached (diffrax packs it there when
    # an event stops early); keep only the requested save times, inf where they were not reached.
    t_all = jnp.where(jnp.isfinite(sol.ts), sol.ts, -jnp.inf)
    t_end = jnp.max(t_all)
    reached = ts <= t_end
    ys = jax.tree.map(
        lambda a: jnp.where(reached.reshape((-1,) + (1,) * (a.ndim - 1)), a[:-1], jnp.inf), sol.ys
    )
    return ParticleSolution(ts=ts, xs=ys, success=success, blown_up=blown, t_end=t_end,
                            num_steps=sol.stats["num_accepted_steps"], solution=sol)
