"""Input checks for the public API: a number that is not a valid input is refused with a ValueError
naming the argument (or the model field).

The checks run on concrete values only: inside jit / vmap (the sweep engine builds its inputs there)
the values are tracers and the checks are skipped; the sweep validates its YAML numbers itself
(`meanfield.sweep.config`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
# A number that is not a valid input is refused with a ValueError naming the argument. The checks
# run on concrete values only: inside jit / vmap (the sweep engine builds its inputs there) the
# values are tracers and the checks are skipped; the sweep validates its YAML numbers itself.


def concrete(x) -> np.ndarray | None:
    """`x` as a host NumPy array, or None when it is traced (inside jit / vmap)."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def concrete_scalar(x) -> float | None:
    """float(x) for a concrete real scalar; None when traced. Raises TypeError for a non-number."""
    a = concrete(x)
    if a is None:
        return None
    if a.ndim != 0 or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"not a real scalar: {x!r}")
    return float(a)


def _nonfinite_report(a: np.ndarray) -> str:
    nan, inf = np.isnan(a), np.isinf(a)
    first = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0]) if a.ndim else ()
    at = f" (first at index {first})" if a.ndim else ""
    return f"{int(nan.sum())} NaN and {int(inf.sum())} inf of {a.size} entries{at}"


def all_finite(x) -> bool | None:
    """Whether every entry of `x` is finite; None when traced. On device for a concrete jax Array
    (one reduction, one bool back), on the host otherwise."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array):
        flag = jnp.all(jnp.isfinite(x))
        if not isinstance(flag, jax.core.Tracer):  # a concrete array closed over inside a jit trace
            return bool(flag)
    a = concrete(x)
    if a is None:
        return None
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        return False
    return bool(np.all(np.isfinite(a)))


def check_finite(where: str | None, name: str, x) -> None:
    """ValueError naming `name` when concrete `x` holds NaN or inf (counts and the first index)."""
    if all_finite(x) is False:
        pre = "" if where is None else f"{where}: "
        a = concrete(x)
        detail = _nonfinite_report(np.asarray(a, np.float64)) if a is not None and np.issubdtype(a.dtype, np.number) \
            else f"got {x!r}"
        raise ValueError(f"{pre}`{name}` must be finite; it holds {detail}.")


def check_number(where: str | None, name: str, value, *, gt=None, ge=None, allow_inf: bool = False,
                 integer: bool = False) -> None:
    """ValueError naming `name` unless concrete `value` is a real number (not NaN; not inf unless
    `allow_inf`), an integer if `integer`, and > `gt` / >= `ge`. Traced values pass."""
    pre = "" if where is None else f"{where}: "
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{pre}`{name}` must be a number; got {value!r}.")
    try:
        v = concrete_scalar(value)
    except (TypeError, ValueError):
        raise ValueError(f"{pre}`{name}` must be a real number; got {value!r}.") from None
    if v is None:
        return
    rule = "a finite number" if not allow_inf else "a number (not NaN)"
    if integer:
        rule = "an integer"
    if gt is not None:
        rule += f" > {gt}"
    if ge is not None:
        rule += f" >= {ge}"
    ok = not np.isnan(v) and (allow_inf or np.isfinite(v))
    ok = ok and (not integer or (np.isfinite(v) and float(v).is_integer()))
    ok = ok and (gt is None or v > gt) and (ge is None or v >= ge)
    if not ok:
        raise ValueError(f"{pre}`{name}` must be {rule}; got {value!r}.")


def check_span(where: str | None, t0, t1) -> None:
    """Finite depths with t1 > t0 (checked when concrete); t1 may be one depth per point, shape (B,)."""
    check_number(where, "t0", t0)
    pre = "" if where is None else f"{where}: "
    if np.ndim(t1) == 1:  # a batch's per-point depths
        check_finite(where, "t1", t1)
        a, b = concrete_scalar(t0), concrete(t1)
        if a is not None and b is not None and b.size and not np.all(b > a):
            bad = int(np.argmin(b))
            raise ValueError(f"{pre}`t1` must be > `t0` = {a:g} for every point (the solve runs forward in depth); "
                             f"got t1[{bad}] = {b[bad]:g}.")
        return
    check_number(where, "t1", t1)
    a, b = concrete_scalar(t0), concrete_scalar(t1)
    if a is not None and b is not None and not b > a:
        raise ValueError(f"{pre}`t1` must be > `t0` = {a:g} (the solve runs forward in depth); got t1 = {b:g}.")


def check_depths(where: str | None, t1, n_points: int | None) -> None:
    """`t1` is one depth, or (for a batch of `n_points`; None: a single solve) one per point, shape (B,)."""
    pre = "" if where is None else f"{where}: "
    dims = np.ndim(t1)
    if dims == 0:
        return
    if dims > 1 or n_points is None:
        raise ValueError(f"{pre}`t1` must be one depth, or one per point (shape (B,)) for a batched call; "
                         f"got shape {np.shape(t1)}" + (" in a single solve." if dims == 1 else "."))
    if np.shape(t1)[0] != n_points:
        raise ValueError(f"{pre}`t1` holds {np.shape(t1)[0]} depths for a batch of {n_points} points; they must agree.")


def check_solver_options(where: str | None, *, dt0=None, rtol=None, atol=None, max_steps=None) -> None:
    """dt0, rtol, atol: finite and > 0 when given; max_steps: an integer >= 1."""
    for name, v in (("dt0", dt0), ("rtol", rtol), ("atol", atol)):
        if v is not None:
            check_number(where, name, v, gt=0)
    if max_steps is not None:
        check_number(where, "max_steps", max_steps, integer=True, ge=1)


def covariance_rtol(d: int, dtype) -> float:
    """Relative tolerance of `check_covariance`: 100 d eps of `dtype` (2.4e-5 for d = 2 in float32,
    4.4e-14 in float64): rounding of a matrix built as A A^T or summed from samples, not more."""
    return 100.0 * max(int(d), 1) * float(jnp.finfo(dtype).eps)


def check_covariance(where: str | None, name: str, S, dtype=None) -> None:
    """ValueError naming `name` unless concrete `S` (d, d) or (B, d, d) is finite, symmetric
    (max |S - S^T| <= rtol max |S|) and positive semidefinite (lambda_min >= -rtol lambda_max),
    with rtol = `covariance_rtol(d, dtype)`. Singular (rank-deficient) S is valid."""
    check_finite(where, name, S)
    a = concrete(S)
    if a is None:
        return
    pre = "" if where is None else f"{where}: "
    dtype = a.dtype if dtype is None else dtype
    d = a.shape[-1]
    rtol = covariance_rtol(d, dtype)
    a = np.asarray(a, np.float64).reshape((-1, d, d))
    scale = np.max(np.abs(a), axis=(-2, -1))
    asym = np.max(np.abs(a - np.swapaxes(a, -1, -2)), axis=(-2, -1))
    bad = np.nonzero(asym > rtol * scale)[0]
    if bad.size:
        i = int(bad[0])
        at = f" (batch index {i})" if S.ndim == 3 else ""
        raise ValueError(
            f"{pre}`{name}` must be a symmetric covariance; max |S - S^T| = {asym[i]:.3g} exceeds the rounding "
            f"tolerance {rtol * scale[i]:.3g} (= {rtol:.1e} x max |S|){at}. It is not symmetrised for you: pass (S + S^T) / 2 if that is meant.")
    lam = np.linalg.eigvalsh(0.5 * (a + np.swapaxes(a, -1, -2)))
    top = np.max(np.abs(lam), axis=-1)
    bad = np.nonzero(lam[:, 0] < -rtol * top)[0]
    if bad.size:
        i = int(bad[0])
        at = f" (batch index {i})" if S.ndim == 3 else ""
        raise ValueError(
            f"{pre}`{name}` must be positive semidefinite; its smallest eigenvalue is {lam[i, 0]:.3g} < "
            f"-{rtol:.1e} x largest |eigenvalue| {top[i]:.3g}{at}. An indefinite matrix is not a covariance "
            "and is not clipped for you (that would change its rank).")


def check_model_finite(where: str | None, model) -> None:
    """ValueError naming the field when a concrete `Model` array (weights, beta, a_attn, a_mlp,
    layer_times) holds NaN or inf; a Model built by its constructor is checked there already, this
    catches arrays set afterwards (`eqx.tree_at`, stacking)."""
    names = ("Q", "K", "V", "beta", "a_attn", "W", "b", "W1", "b1", "W2", "b2", "a_mlp", "layer_times")
    arrays = {n: getattr(model, n, None) for n in names}
    arrays = {n: a for n, a in arrays.items() if a is not None and not isinstance(a, jax.core.Tracer)}
    if not arrays:
        return
    flags = {n: jnp.all(jnp.isfinite(a)) for n, a in arrays.items()}
    if any(isinstance(f, jax.core.Tracer) for f in flags.values()):
        flags = {n: np.all(np.isfinite(np.asarray(a))) for n, a in arrays.items()}
    flags = jax.device_get(flags)
    for n, ok in flags.items():
        if not bool(ok):
            pre = "" if where is None else f"{where}: "
            detail = _nonfinite_report(np.asarray(arrays[n], np.float64))
            raise ValueError(f"{pre}model field `{n}` must be finite; it holds {detail}.")
