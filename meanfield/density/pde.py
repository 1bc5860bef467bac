r"""The mean-field PDE on the circle: the continuity equation for the token density.

For tokens on $S^1$ ($d = 2$, `norm="sphere"`) the token density $\rho(\theta, t)$ obeys

$$ \partial_t\rho + \partial_\theta\big(\rho\, v[\rho]\big) = 0, $$

with $v[\rho]$ the tangential particle velocity averaged over $\rho$ (`meanfield.density.velocity`;
piecewise-constant depth schedules pick the layer active at $t$). Discretisation:

- Fourier pseudo-spectral in $\theta$: the state is $\rho$ on N uniform nodes (modes $|k| < N/2$);
  the velocity and the flux $\rho v$ are formed on the 3/2-padded grid $M = 3N/2$ (products of two
  N-mode fields are alias-free there), the flux is truncated back to $|k| < N/2$ and
  differentiated exactly ($\widehat{\partial_\theta f}_k = ik\hat f_k$). The $k = 0$ mode of
  $\partial_t\rho$ is exactly zero, so the mass $\int\rho = 2\pi\hat\rho_0$ is conserved to float rounding.
- Time: any diffrax solver (default Tsit5 with a PID controller).
- Resolution: N is chosen from $\rho_0$ (doubled until the spectral tail, the top third of the
  modes relative to $\hat\rho_0$, is below `tail_tol / 10`). A diffrax event watches the tail, the
  positivity $\min\rho \ge -\text{positivity\_tol}\cdot\max\rho$ and finiteness at every step; when
  one fails the solve stops there and (default `on_underresolved="refine"`) restarts from that
  state at 2N (exact spectral interpolation), up to `max_modes`. Beyond that it stops with an
  `UnderResolvedWarning` (saves after the stop are NaN) or raises (`"raise"`); it never returns
  an unresolved density silently (`"warn"` continues at fixed N but warns).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import _display as D
from .._display import Summarised, Summary
from ..simulate.checks import (
    all_finite, check_finite, check_model_finite, check_number, check_solver_options, check_span,
)
from ..simulate.core import Trajectory, solve
from ..simulate.solvers import make_controller, make_solver, progress_meter, save_times
from . import grid as _grid
from .velocity import apply_operator, check_model, layer_operator, resolve_method

UNDERRESOLVED = ("refine", "stop", "warn", "raise")


class UnderResolvedWarning(RuntimeWarning):
    """The density needed more Fourier modes than allowed (or lost positivity)."""


class UnderResolvedError(RuntimeError):
    """Raised by `simulate_density(on_underresolved="raise")` when the resolution is insufficient."""


def default_tail_tol(dtype) -> float:
    """1e-4 in float32, 1e-8 in float64 (the relative size of the neglected modes)."""
    return 1e-8 if jnp.dtype(dtype) == jnp.float64 else 1e-4


@dataclasses.dataclass(frozen=True, repr=False)  # __repr__ from Summarised
class DensitySolution(Summarised):
    """Result of `simulate_density` (host arrays).

    Attributes:
        ts: save times (T,).
        theta: the output grid (N_out,), N_out the largest N used.
        density: densities at the save times on `theta` (T, N_out) (spectral interpolation of the
            state at its own N; NaN where the solve did not reach).
        modes: the N in use at each save (T,).
        tail: spectral tail of each save (T,) (see `grid.spectral_tail`).
        min_ratio: min density / max density of each save (T,) (negative: lost positivity).
        mass: integral of density at each save (T,).
        t_end: the depth reached (t1 unless stopped for lack of resolution).
        resolved: whether the solve reached t1 with every check passed.
        refinements: list of (t, N_old, N_new) restarts.
        num_steps: accepted solver steps over all segments.
        message: what happened when not resolved ("" otherwise).
    """

    ts: np.ndarray
    theta: np.ndarray
    density: np.ndarray
    modes: np.ndarray
    tail: np.ndarray
    min_ratio: np.ndarray
    mass: np.ndarray
    t_end: float
    resolved: bool
    refinements: list
    num_steps: int
    message: str = ""

    @property
    def final(self) -> np.ndarray:
        return self.density[-1]

    def peaks(self, level: float = 2.0) -> np.ndarray:
        """Peak count (`grid.count_peaks`) at every save (-1 where not reached)."""
        ok = np.all(np.isfinite(self.density), axis=-1)
        n = np.asarray(_grid.count_peaks(jnp.asarray(np.where(ok[:, None], self.density, 0.0)), level))
        return np.where(ok, n, -1)

    def cdf(self, index: int, theta) -> np.ndarray:
        """Cumulative distribution of save `index` at angles `theta` in [0, 2 pi]."""
        return np.asarray(_grid.cdf(jnp.asarray(self.density[index]), jnp.asarray(theta, self.density.dtype)))

    def _summary(self) -> Summary:
        """What `__repr__` / `_repr_html_` show (`Summarised`; host arrays, shapes and scalars only)."""
        rows = [("ts", D.span(self.ts)), ("density", D.shape(self.density)),
                ("modes", str(sorted(set(np.asarray(self.modes).tolist())))),
                ("t_end", D.num(self.t_end)), ("resolved", str(bool(self.resolved))),
                ("refinements", str(len(self.refinements))), ("num_steps", str(int(self.num_steps)))]
        if self.message:
            rows.append(("message", self.message))
        return Summary("DensitySolution", rows,
                       "d(density)/dt + d(density v[density])/dtheta = 0 on the circle; peaks: sol.peaks()")


def choose_modes(density0: Callable, tail_tol: float, *, start: int = 16, max_modes: int = 4096, dtype=None) -> int:
    """Smallest N = start * 2^j whose grid values of `density0` have spectral tail <= tail_tol
    (max_modes if none does)."""
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    N = _grid.check_modes(start, "start")
    while True:
        density = jnp.asarray(density0(_grid.grid(N, dtype)), dtype)
        if float(_grid.spectral_tail(density)) <= tail_tol or N >= max_modes:
            return N
        N *= 2


def _initial_state(density0, modes, tail_tol, max_modes, dtype):
    if callable(density0):
        N = choose_modes(density0, tail_tol / 10, max_modes=max_modes, dtype=dtype) if modes is None \
            else _grid.check_modes(modes)
        return jnp.asarray(density0(_grid.grid(N, dtype)), dtype)
    density = jnp.asarray(density0, dtype)
    if density.ndim != 1:
        raise ValueError(f"simulate_density: `density0` must be a callable or grid values (N,); got shape {density.shape}.")
    _grid.check_modes(density.shape[0], "len(density0)")
    if modes is None:
        N = density.shape[0]
        while float(_grid.spectral_tail(_grid.resample(density, N))) > tail_tol / 10 and N < max_modes:
            N *= 2
    else:
        N = _grid.check_modes(modes)
    return _grid.resample(density, N)


def _rhs_factory(N: int):
    M = 3 * N // 2
    K = N // 2

    def rhs(t, density, args):
        model, ops = args
        if model.layer_times is None:
            op = ops
        else:
            idx = jnp.searchsorted(model.layer_times, t, side="right")
            op = jax.tree.map(lambda a: a[idx], ops)
        layer = model.at(t)
        c = jnp.fft.rfft(density)[:K]                             # modes 0..N/2-1 (Nyquist dropped)
        density_padded = jnp.fft.irfft(c, n=M) * (M / N)          # exact values on the padded grid
        flux = density_padded * apply_operator(op, layer, density_padded)
        f_hat = jnp.fft.rfft(flux)[:K] * (N / M)
        k = jnp.arange(K, dtype=density.dtype)
        return -jnp.fft.irfft(1j * k * f_hat, n=N)

    return rhs


def _build_ops(model, M, method, dtype):
    if model.layer_times is None:
        return layer_operator(model, M, method, dtype)
    ops = [layer_operator(model.layer(l), M, method, dtype) for l in range(model.n_layers)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *ops)


@eqx.filter_jit
def _segment(model, density0, t0, t1, ts, dt0, solver, controller, max_steps, method, tail_tol, pos_tol, watch,
             progress) -> Trajectory:
    """One stretch of the PDE solve on the shared solve core (`meanfield.simulate.core.solve`), stopped
    by the resolution watch (spectral tail, positivity, finiteness) when `watch`."""
    N = density0.shape[0]
    M = 3 * N // 2
    ops = _build_ops(model, M, method, density0.dtype)
    def unresolved(t, y, args, **kwargs):
        tail = _grid.spectral_tail(y)
        return (tail > tail_tol) | (jnp.min(y) < -pos_tol * jnp.max(y)) | ~jnp.all(jnp.isfinite(y))

    return solve(_rhs_factory(N), density0, (model, ops), t0=t0, t1=t1, ts=ts, solver=solver, controller=controller,
                 dt0=dt0, max_steps=max_steps, event=unresolved if watch else None,
                 progress_meter=progress_meter(progress))


def simulate_density(
    model,
    density0,
    t1: float,
    *,
    t0: float = 0.0,
    ts=None,
    n_save: int = 101,
    modes: int | None = None,
    max_modes: int = 4096,
    tail_tol: float | None = None,
    positivity_tol: float = 1e-3,
    on_underresolved: str = "refine",
    method: str = "auto",
    solver="tsit5",
    dt0: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 200_000,
    progress: bool = False,
) -> DensitySolution:
    r"""Solve $\partial_t\rho + \partial_\theta(\rho\,v[\rho]) = 0$ on the circle (see module docstring).

    Arguments:
        model: a `Model` with d = 2, `norm="sphere"`, attention softmax / unnormalised / shaped /
            none, any MLP (a local field), depth-constant or `Model.piecewise`; not causal.
        density0: initial density: a callable `theta -> density(theta)` (e.g. from `meanfield.density.initial_densities`)
            or grid values (N,) on $2\pi j/N$. Its mass is kept as given (1 for a probability).
        t1: final depth; `t0` initial depth; `ts` save times (default `n_save` uniform).
        modes: fixed initial N (multiple of 4); default chosen from `density0` and `tail_tol`.
        max_modes: largest N refinement may reach.
        tail_tol: spectral tail allowed (default 1e-4 float32, 1e-8 float64).
        positivity_tol: allowed undershoot, min density >= -positivity_tol * max density.
        on_underresolved: `"refine"` (double N and restart; stop + warn at `max_modes`),
            `"stop"` (stop + warn), `"warn"` (warn, continue at fixed N), `"raise"`.
        method: `"dense"` (any Q, K, V), `"fft"` (rotation-invariant $Q^\top K$ and $V$) or `"auto"`.
        solver, dt0, rtol, atol, max_steps, progress: as in `simulate_particles`; default
            rtol/atol 1e-6/1e-8 (float32), 1e-10/1e-12 (float64), see `simulate.solvers.DENSITY_TOLERANCES`.

    Returns:
        `DensitySolution`.

    Raises:
        ValueError: for a model off the circle, causal attention, bad options, and, naming the
            argument, numbers that are not valid: `density0` or a model array holding NaN / inf,
            `t0` / `t1` not finite or `t1 <= t0`, `ts` not finite, decreasing or outside
            [t0, t1], `dt0` / `rtol` / `atol` / `tail_tol` not finite and > 0.
        UnderResolvedError: with `on_underresolved="raise"` when the checks fail.
    """
    where = "simulate_density"
    check_model(model, where)
    check_model_finite(where, model)
    check_span(where, t0, t1)
    check_solver_options(where, dt0=dt0, rtol=rtol, atol=atol, max_steps=max_steps)
    if tail_tol is not None:
        check_number(where, "tail_tol", tail_tol, gt=0)
    check_number(where, "positivity_tol", positivity_tol, ge=0)
    if on_underresolved not in UNDERRESOLVED:
        raise ValueError(f"simulate_density: `on_underresolved` must be one of {list(UNDERRESOLVED)}; "
                         f"got {on_underresolved!r}.")
    dtype = model.dtype
    tail_tol = default_tail_tol(dtype) if tail_tol is None else float(tail_tol)
    _grid.check_modes(max_modes, "max_modes")
    method = resolve_method(model, method)
    if not callable(density0):
        check_finite(where, "density0", jnp.asarray(density0, dtype))
    density = _initial_state(density0, modes, tail_tol, max_modes, dtype)
    if callable(density0) and all_finite(density) is False:
        raise ValueError(f"{where}: `density0` must give finite values on the grid; got NaN or inf "
                         f"({int(np.sum(~np.isfinite(np.asarray(density))))} of {density.shape[0]} nodes).")
    N = density.shape[0]
    if float(_grid.spectral_tail(density)) > tail_tol:
        msg = (f"simulate_density: the initial density needs more than max_modes = {max_modes} modes "
               f"(spectral tail {float(_grid.spectral_tail(density)):.2e} > tail_tol = {tail_tol:.1e}).")
        if on_underresolved == "raise":
            raise UnderResolvedError(msg)
        warnings.warn(msg, UnderResolvedWarning, stacklevel=2)
    solver_obj, adaptive = make_solver(solver)
    ts = np.asarray(save_times(t0, t1, ts, n_save, dtype, where))
    controller = make_controller(adaptive, dt0=dt0, rtol=rtol, atol=atol, dtype=dtype, jump_ts=model.layer_times,
                                 problem="density")
    T = len(ts)
    saved: list = [None] * T
    save_modes = np.zeros(T, int)
    t_start = float(t0)
    t_end = t_start
    refinements, steps, message = [], 0, ""
    watch = on_underresolved != "warn"
    resolved = True
    def passes(y) -> bool:
        y = jnp.asarray(y)
        tail = float(_grid.spectral_tail(y))
        return bool(np.isfinite(tail) and tail <= tail_tol and float(jnp.min(y)) >= -positivity_tol * float(jnp.max(y)))

    first = True
    while True:
        ts_seg = jnp.asarray(np.clip(ts, t_start, float(t1)), dtype)
        traj = _segment(
            model, density, jnp.asarray(t_start, dtype), jnp.asarray(t1, dtype), ts_seg,
            None if dt0 is None else jnp.asarray(dt0, dtype), solver_obj, controller, max_steps, method,
            tail_tol, positivity_tol, watch, progress,
        )
        steps += int(traj.num_steps)
        ok = bool(traj.success) and not bool(traj.event)  # reached t1 (an event is the watch firing)
        ys, t_end, y_end = np.asarray(traj.ys), float(traj.t_end), np.asarray(traj.y_end)
        # the saves written (diffrax writes a save inside an accepted step only; none after a failed first step)
        last = int(np.sum(np.isfinite(np.asarray(traj.solution.ts[0]))))
        mine = [i for i in range(last) if ts[i] > t_start or (first and ts[i] >= t_start)]
        first = False
        end_ok = passes(y_end)
        if ok and last == T and (end_ok or not watch):
            for i in mine:
                saved[i], save_modes[i] = ys[i], N
            break
        if not ok and end_ok:  # not an event: the time solver itself failed
            for i in mine:
                saved[i], save_modes[i] = ys[i], N
            message = (f"simulate_density: the time solver failed at t = {t_end:.4g} with N = {N} "
                       f"(max_steps = {max_steps}?); saves after it are NaN.")
            warnings.warn(message, UnderResolvedWarning, stacklevel=2)
            resolved = False
            break
        # a check failed during the last step (diffrax's event, or the end state at t1, which
        # diffrax does not test): keep the saves that pass, restart from the latest of them
        y_bad = jnp.asarray(y_end)
        why = (f"at t = {t_end:.4g} with N = {N} modes the spectral tail is {float(_grid.spectral_tail(y_bad)):.2e} "
               f"(tail_tol {tail_tol:.1e}) and min/max density = {float(jnp.min(y_bad) / jnp.max(y_bad)):.2e} "
               f"(positivity_tol {positivity_tol:.1e})")
        t_back, y_back = t_start, density
        for i in mine:
            if not passes(ys[i]):
                break
            saved[i], save_modes[i] = ys[i], N
            t_back, y_back = float(ts[i]), ys[i]
        if on_underresolved == "refine" and 2 * N <= max_modes:
            refinements.append((t_back, N, 2 * N))
            density = _grid.resample(jnp.asarray(y_back), 2 * N)
            N *= 2
            t_start = t_back
            continue
        t_end = t_back
        message = (f"simulate_density: resolution insufficient: {why}"
                   + (f"; max_modes = {max_modes} reached" if on_underresolved == "refine" else "")
                   + f"; stopped at t = {t_back:.4g}, saves after it are NaN. Raise max_modes or shorten t1.")
        resolved = False
        if on_underresolved == "raise":
            raise UnderResolvedError(message)
        warnings.warn(message, UnderResolvedWarning, stacklevel=2)
        break
    if on_underresolved == "warn":
        tails = [float(_grid.spectral_tail(jnp.asarray(y))) for y in saved if y is not None]
        worst = max(tails) if tails else 0.0
        if worst > tail_tol:
            resolved = False
            message = (f"simulate_density: on_underresolved='warn': the spectral tail reached {worst:.2e} > "
                       f"tail_tol {tail_tol:.1e} with N = {N}; the density is not resolved there.")
            warnings.warn(message, UnderResolvedWarning, stacklevel=2)
    N_out = max([m for m in save_modes if m > 0], default=N)
    np_dtype = np.dtype(dtype)
    density_out = np.full((T, N_out), np.nan, np_dtype)
    tail_out = np.full(T, np.nan)
    ratio_out = np.full(T, np.nan)
    mass_out = np.full(T, np.nan)
    for i, y in enumerate(saved):
        if y is None:
            continue
        yj = jnp.asarray(y)
        tail_out[i] = float(_grid.spectral_tail(yj))
        ratio_out[i] = float(jnp.min(yj) / jnp.max(yj))
        mass_out[i] = float(_grid.mass(yj))
        density_out[i] = _grid.upsample_np(np.asarray(y, np.float64), N_out).astype(np_dtype)
    return DensitySolution(
        ts=ts, theta=np.asarray(_grid.grid(N_out, dtype)), density=density_out, modes=save_modes, tail=tail_out,
        min_ratio=ratio_out, mass=mass_out, t_end=min(t_end, float(t1)), resolved=resolved,
        refinements=refinements, num_steps=steps, message=message,
    )
