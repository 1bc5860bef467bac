"""Solver choice shared by every simulator: names -> diffrax solvers, tolerances, controllers.

Adaptive solvers (`"tsit5"`, `"dopri5"`, `"dopri8"`, `"bosh3"`) use a PID controller with
`rtol`/`atol` and step exactly onto the boundaries of a piecewise-constant depth schedule
(`jump_ts`). Fixed-step solvers (`"rk4"`, `"euler"`, `"heun"`, `"midpoint"`) need `dt0`.
Any `diffrax.AbstractSolver` instance is accepted as-is.

The named Runge-Kutta solvers are diffrax's, with their stages unrolled (`UnrolledStages`): same
tableaus, same numbers to float rounding, less per-step bookkeeping in a batch.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import diffrax
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np

from .checks import check_finite, concrete, concrete_scalar


def _stage_sum(y0, coeffs, ks):
    """y0 + sum_j coeffs[j] k_j, leaf by leaf, over the nonzero coefficients in order (y0 None: the
    sum alone; no nonzero coefficient: y0, or zeros like k_1)."""
    terms = [(float(a), k) for a, k in zip(coeffs, ks) if a != 0]
    if not terms:
        return y0 if y0 is not None else jax.tree.map(jnp.zeros_like, ks[0])

    def leaf(*leaves):
        out = None if y0 is None else leaves[0]
        for (a, _), k in zip(terms, leaves[y0 is not None:]):
            out = a * k if out is None else out + a * k
        return out

    return jax.tree.map(leaf, *([] if y0 is None else [y0]), *[k for _, k in terms])


class UnrolledStages:
    r"""Mixin for diffrax's explicit Runge-Kutta solvers: diffrax's tableau and step, with the stages
    written out one after another instead of diffrax's loop over stages.

    $k_1 = h f(t_0, y_0)$ (FSAL tableaus: the previous step's last stage), $k_i = h f(t_0 + c_i h,\,
    y_0 + \sum_{j<i} a_{ij} k_j)$, $y_1 = y_0 + \sum_i b_i k_i$ (SSAL: the last stage's input), error
    $\sum_i e_i k_i$; dense output from the same stacked $k$ as diffrax's. Same numbers as diffrax's
    step to float rounding (the sums run over the nonzero coefficients in order).

    Why: diffrax's stage loop writes each $k_i$ into a buffer and reads row $i$ of the tableau from an
    array at every stage; written out, that bookkeeping goes (256 consensus systems in one batch:
    0.53 -> 0.38 ms per system; the 1,024-point particle sweep 150 -> 133 s; benchmarks/README.md).
    Each stage's field evaluation sits inside a `lax.cond` whose two branches are that same
    evaluation: the boundary makes XLA compute the stage input once, where it would otherwise fuse the
    stage sum into the field's kernels and recompute it for every reuse of a token (measured: a
    16-token batch twice as slow, the 64-token YNNPACK field kernel 1.6x). On CPU
    `lax.optimization_barrier` does not survive compilation; a cond does. The cost: the field is
    compiled once per stage (a first compile ~1 s longer).

    Falls back to diffrax's own step for terms whose field is marked expensive, implicit tableaus and
    tableau tuples (SRK / IMEX), which meanfield's named solvers never use."""

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        tab = self.tableau
        if (not isinstance(tab, diffrax.ButcherTableau) or tab.implicit
                or terms.is_vf_expensive(t0, t1, y0, args)):
            return super().step(terms, t0, t1, y0, args, solver_state, made_jump)
        control = terms.contr(t0, t1)
        dt = t1 - t0
        live = eqxi.unvmap_any(t1 != t0)  # any dynamic unbatched predicate: both branches are the same

        def field(ti, yi):
            return terms.vf(ti, yi, args)

        if tab.fsal:
            first_step, f0 = solver_state
            redo = eqxi.unvmap_any(first_step | made_jump)  # the stored f0 is stale
            f0 = jax.lax.cond(redo, lambda: field(t0, y0), lambda: f0)
        else:
            f0 = field(t0, y0)
        ks = [terms.prod(f0, control)]
        fi, yi = f0, y0
        for i in range(1, tab.num_stages):
            yi = _stage_sum(y0, tab.a_lower[i - 1], ks)
            c = float(tab.c[i - 1])
            ti = t1 if c == 1 else t0 + c * dt
            fi = jax.lax.cond(live, field, field, ti, yi)
            ks.append(terms.prod(fi, control))
        y1 = yi if tab.ssal else _stage_sum(y0, tab.b_sol, ks)
        y_error = _stage_sum(None, tab.b_error, ks)
        dense_info = dict(y0=y0, y1=y1, k=jax.tree.map(lambda *kl: jnp.stack(kl), *ks))
        solver_state = (False, fi) if tab.fsal else None
        return y1, y_error, dense_info, solver_state, diffrax.RESULTS.successful


class Tsit5(UnrolledStages, diffrax.Tsit5):
    """diffrax's Tsit5 (5th order, FSAL), stages unrolled (`UnrolledStages`)."""


class Dopri5(UnrolledStages, diffrax.Dopri5):
    """diffrax's Dopri5 (5th order, FSAL), stages unrolled (`UnrolledStages`)."""


class Dopri8(UnrolledStages, diffrax.Dopri8):
    """diffrax's Dopri8 (8th order, 14 stages), stages unrolled (`UnrolledStages`)."""


class Bosh3(UnrolledStages, diffrax.Bosh3):
    """diffrax's Bosh3 (3rd order, FSAL), stages unrolled (`UnrolledStages`)."""


_rk4_tableau = diffrax.ButcherTableau(
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    b_error=np.zeros(4),
    c=np.array([0.5, 0.5, 1.0]),
)


class RK4(UnrolledStages, diffrax.AbstractERK):
    r"""The classical 4th-order Runge-Kutta method (fixed step only: it has no error estimate).

    $k_1 = f(y)$, $k_2 = f(y + \tfrac h2 k_1)$, $k_3 = f(y + \tfrac h2 k_2)$, $k_4 = f(y + h k_3)$,
    $y_{+} = y + \tfrac h6 (k_1 + 2k_2 + 2k_3 + k_4)$. Dense output: cubic Hermite.
    """

    tableau: ClassVar[diffrax.ButcherTableau] = _rk4_tableau
    interpolation_cls: ClassVar = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        del terms
        return 4


class Heun(UnrolledStages, diffrax.Heun):
    """diffrax's Heun (2nd order, 2 stages), stages unrolled (`UnrolledStages`)."""


class Midpoint(UnrolledStages, diffrax.Midpoint):
    """diffrax's Midpoint (2nd order, 2 stages), stages unrolled (`UnrolledStages`)."""


ADAPTIVE = {"tsit5": Tsit5, "dopri5": Dopri5, "dopri8": Dopri8, "bosh3": Bosh3}
FIXED = {"rk4": RK4, "euler": diffrax.Euler, "heun": Heun, "midpoint": Midpoint}
SOLVERS = tuple(ADAPTIVE) + tuple(FIXED)
_FIXED_BASES = (RK4, diffrax.Euler, diffrax.Heun, diffrax.Midpoint)
"""Solver classes run with a constant step (diffrax's own instances too, as before)."""


def make_solver(solver) -> tuple[diffrax.AbstractSolver, bool]:
    """(solver instance, is_adaptive) from a name or a diffrax solver."""
    if isinstance(solver, diffrax.AbstractSolver):
        adaptive = not isinstance(solver, _FIXED_BASES)
        return solver, adaptive
    if not isinstance(solver, str) or solver.lower() not in SOLVERS:
        raise ValueError(f"`solver` must be one of {list(SOLVERS)} or a diffrax solver; got {solver!r}.")
    name = solver.lower()
    if name in ADAPTIVE:
        return ADAPTIVE[name](), True
    return FIXED[name](), False


ODE_TOLERANCES = {"float32": (3e-6, 3e-8), "float64": (1e-9, 1e-11)}
"""(rtol, atol) of the token and moment ODEs (and Lyapunov tangent solves), per dtype.

Float32 was chosen by measurement (`benchmarks/bench_tolerances.py`: consensus on S^2, d = 4
Gaussian moments, n = 64 particles, errors against float64 at 1e-10): at 1e-6 / 1e-8 float32 is
already at its rounding floor (1e-7 / 1e-9 barely lowers the error but doubles the steps, and a
few solves stall on rounding noise); 3e-6 / 3e-8 takes 17-20% fewer steps (median; up to 25% at
the max) with errors within 1.3-3.8x of the floor (median) and no new regime-label change;
1e-5 / 1e-7 would cost ~10x the floor's error."""

DENSITY_TOLERANCES = {"float32": (1e-6, 1e-8), "float64": (1e-10, 1e-12)}
"""(rtol, atol) of the density PDE (`simulate_density`), per dtype: 100x below its tail tolerance
(`density.pde.default_tail_tol`). An explicit solver under error control lets the stiffest (highest)
modes sit at about the local error tolerance times the density's RMS/mean ratio; the tail check
must not see that."""

_TOLERANCES = {"ode": ODE_TOLERANCES, "density": DENSITY_TOLERANCES}


def default_tolerances(dtype, problem: str = "ode") -> tuple[float, float]:
    """(rtol, atol) for `problem` "ode" (`ODE_TOLERANCES`: (3e-6, 3e-8) float32, (1e-9, 1e-11) float64)
    or "density" (`DENSITY_TOLERANCES`: (1e-6, 1e-8) float32, (1e-10, 1e-12) float64)."""
    if problem not in _TOLERANCES:
        raise ValueError(f"default_tolerances: `problem` must be one of {list(_TOLERANCES)}; got {problem!r}.")
    return _TOLERANCES[problem]["float64" if jnp.dtype(dtype) == jnp.float64 else "float32"]


class StallGuard(diffrax.AbstractAdaptiveStepSizeController):
    r"""`controller`, with one more way to stop: when the step size has fallen below what t can resolve.

    Two loops that never end, both seen in float32 (float64 has the same floor, further down):

    - **A rejected step whose retry is the very same step.** After a rejection the controller proposes
      a step of at most `safety` times the rejected one, from the same state. Once the step is a few
      ulp of t long (at most 5: rounding $t_0 + h$ moves it by half an ulp), $t_0 + h$ can round back
      to the rejected end point. The retry then has the rejected step's $t_0$, $t_1$, state, solver
      state and controller state, so it is rejected again, and so is every retry after it. (Particle
      sweeps at spectral ratio 20: t ~ 0.64, the step stuck at 3 ulp = 1.8e-7 with the scaled error at
      1.37, for 16,000 attempts.)
    - **A step of length zero** ($t_0 + h$ rounds to $t_0$): it changes nothing and is accepted with
      zero error, the controller grows the step, the grown step is rejected, and so on. (A stiff
      $\dot y = -10^5 y$ at t ~ 1024, where one ulp is 1.2e-4.)

    The guard reports `RESULTS.dt_min_reached` (the step cannot shrink further in this precision) as
    soon as either happens, for `diffeqsolve` and the ensemble alike, so both stop on the same step
    where the solve would otherwise spin until `max_steps`. Every step either path takes is still
    the wrapped controller's."""

    controller: diffrax.AbstractAdaptiveStepSizeController

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):
        return self.controller.norm

    @property
    def jump_ts(self):
        """The wrapped controller's `jump_ts` (None without a depth schedule)."""
        return getattr(self.controller, "jump_ts", None)

    def wrap(self, direction):
        return StallGuard(self.controller.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        keep, next_t0, next_t1, made_jump, state, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state)
        repeat = ~keep & (next_t0 == t0) & (next_t1 == t1)
        for new_leaf, old_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(controller_state)):
            repeat = repeat & jnp.all(new_leaf == old_leaf)  # the controller state too: the retry is identical
        stuck = repeat | (t1 <= t0)
        return keep & ~stuck, next_t0, next_t1, made_jump, state, diffrax.RESULTS.where(
            stuck, diffrax.RESULTS.dt_min_reached, result)


def make_controller(adaptive: bool, *, dt0, rtol, atol, dtype, jump_ts=None, problem: str = "ode"):
    """A PID controller (adaptive; rtol / atol None: `default_tolerances(dtype, problem)`), inside a
    `StallGuard`, or a constant step (fixed, `dt0` required)."""
    if not adaptive:
        if dt0 is None:
            raise ValueError("a fixed-step solver needs `dt0` (the step size); got None.")
        return diffrax.ConstantStepSize()
    d_rtol, d_atol = default_tolerances(dtype, problem)
    return StallGuard(diffrax.PIDController(
        rtol=d_rtol if rtol is None else rtol,
        atol=d_atol if atol is None else atol,
        jump_ts=jump_ts,
    ))


class AutoTqdmProgressMeter(diffrax.TqdmProgressMeter):
    """diffrax's tqdm progress meter through `tqdm.auto`: a widget bar in notebooks, text in a terminal."""

    @staticmethod
    def _init_bar():
        from tqdm.auto import tqdm

        return tqdm(total=100, unit="%", bar_format="{percentage:.2f}%|{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def progress_meter(progress: bool):
    """`progress=True`: a depth progress bar (`tqdm.auto`); False: none."""
    return AutoTqdmProgressMeter() if progress else diffrax.NoProgressMeter()


_BATCH_BARS: list = []


def _batch_tick(k) -> None:
    """Host callback of the ensemble integrator: `k` more points finished (one stable function, so
    the compiled solve does not depend on which bar is open)."""
    if _BATCH_BARS and int(k):
        _BATCH_BARS[-1].update(int(k))


@contextlib.contextmanager
def batch_progress(progress: bool, total: int, unit: str):
    """`progress=True` for a batched solve: a `tqdm.auto` bar over finished points; yields the
    callback to pass as `on_finish` (None when off, so no callback is compiled)."""
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit=unit)
    _BATCH_BARS.append(bar)
    try:
        yield _batch_tick
    finally:
        jax.effects_barrier()
        _BATCH_BARS.remove(bar)
        bar.close()


def save_times(t0, t1, ts, n_save, dtype, where: str | None = None):
    """The save grid: `ts` if given, else `n_save` equally spaced times on [t0, t1] ((B, n_save) for
    per-point depths t1 of shape (B,), which take no `ts`).

    Concrete `ts` must be finite, non-decreasing and within [t0, t1] (in `dtype`); `n_save` must be
    an integer >= 2. `where` prefixes the error messages (the public function's name)."""
    pre = "" if where is None else f"{where}: "
    if ts is not None and np.ndim(t1) > 0:
        raise ValueError(f"{pre}`ts` cannot be given with one `t1` per point: each point saves at `n_save` "
                         "equally spaced depths of its own [t0, t1].")
    if ts is not None:
        ts = jnp.asarray(ts, dtype)
        if ts.ndim != 1:
            raise ValueError(f"{pre}`ts` must be a 1-d array of save times; got shape {ts.shape}.")
        check_finite(where, "ts", ts)
        host = concrete(ts)
        lo, hi = concrete_scalar(jnp.asarray(t0, dtype)), concrete_scalar(jnp.asarray(t1, dtype))
        if host is not None and host.size:
            if np.any(np.diff(host) < 0):
                raise ValueError(f"{pre}`ts` must be non-decreasing; got {host}.")
            if lo is not None and hi is not None and (host[0] < lo or host[-1] > hi):
                raise ValueError(f"{pre}`ts` must lie in [t0, t1] = [{lo:g}, {hi:g}]; got [{host[0]:g}, {host[-1]:g}].")
        return ts
    if isinstance(n_save, (bool, np.bool_)) or not isinstance(n_save, (int, np.integer)) or n_save < 2:
        raise ValueError(f"{pre}`n_save` must be an integer >= 2; got {n_save!r}.")
    return jnp.linspace(jnp.asarray(t0, dtype), jnp.asarray(t1, dtype), n_save, dtype=dtype, axis=-1)
