"""Compact display of models and results (`__repr__`, and `_repr_html_` for notebooks).

Pure Python on purpose: a summary reads shapes, dtypes and a few small arrays (at most
`SMALL` elements, copied to the host with `np.asarray`), never runs a JAX operation (no
compile, no indexing of device arrays) and never reads a large array's values. Tracers (inside
`jax.jit` / `jax.vmap`) are shown as "traced".
"""

from __future__ import annotations

import html
from typing import NamedTuple

import numpy as np

#: Arrays with more elements than this are summarised by shape only.
SMALL = 64


def _is_traced(x) -> bool:
    try:
        from jax.core import Tracer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Tracer)


def _host(x, limit: int = SMALL):
    """A small array's values on the host, or None (None, traced, too large, not an array)."""
    if x is None or _is_traced(x):
        return None
    size = getattr(x, "size", 1)
    if size > limit:
        return None
    try:
        return np.asarray(x)
    except Exception:  # e.g. a deleted / donated buffer
        return None


def shape(x) -> str:
    """`(101, 64, 3) float32`, or `None`."""
    if x is None:
        return "None"
    shp = getattr(x, "shape", None)
    if shp is None:
        return type(x).__name__
    dt = getattr(x, "dtype", None)
    return f"{tuple(shp)} {dt}" if dt is not None else str(tuple(shp))


def num(x, fmt: str = ".4g") -> str:
    """A scalar as `4`; a small batch as `[1, 4]` (or `1 .. 9 (B,)` beyond 6 values); else its shape."""
    if x is None:
        return "None"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, float, np.integer, np.floating)):
        return format(float(x), fmt) if isinstance(x, (float, np.floating)) else str(int(x))
    if _is_traced(x):
        return "traced"
    v = _host(x)
    if v is None:
        return f"array{tuple(getattr(x, 'shape', ()))}"
    if v.dtype == bool:
        return flag(v)
    if v.ndim == 0:
        return format(v.item(), fmt) if np.issubdtype(v.dtype, np.floating) else str(v.item())
    flat = v.reshape(-1)
    if flat.size <= 6:
        return "[" + ", ".join(format(float(u), fmt) for u in flat) + "]"
    finite = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    if finite.size == 0:
        return f"all non-finite {tuple(v.shape)}"
    return f"{format(float(finite.min()), fmt)} .. {format(float(finite.max()), fmt)} {tuple(v.shape)}"


def flag(x) -> str:
    """A bool as `True`; a batch of them as `7/8 True`."""
    if _is_traced(x):
        return "traced"
    v = _host(x)
    if v is None:
        return "None" if x is None else f"array{tuple(getattr(x, 'shape', ()))}"
    v = np.asarray(v, bool)
    if v.ndim == 0:
        return str(bool(v))
    return f"{int(v.sum())}/{v.size} True"


def span(ts) -> str:
    """`[0, 20] x 101` for save times; a batch of grids adds the batch shape, and grids of different
    depths (one t1 per point) show the range of their ends, `[0, 1-4] x 101 (batch (8,))`."""
    if ts is None:
        return "None"
    shp = tuple(getattr(ts, "shape", (len(ts),)))
    if _is_traced(ts):
        return f"traced x {shp[-1]}" if shp else "traced"
    v = _host(ts, limit=1_000_000) if shp else None  # save times: a host copy, no JAX op
    if v is None or v.size == 0:
        return f"array{shp}"
    grids = v.reshape(-1, shp[-1])
    first, lo, hi = grids[0], float(grids[:, -1].min()), float(grids[:, -1].max())
    end = f"{lo:.4g}" if lo == hi else f"{lo:.4g}-{hi:.4g}"
    out = f"[{float(first[0]):.4g}, {end}] x {shp[-1]}"
    return out if len(shp) == 1 else f"{out} (batch {shp[:-1]})"


class Summary(NamedTuple):
    """What a result shows: `name` (`__repr__` prints `name(key=value, ...)`, the HTML table is headed
    `meanfield.<name>`), `rows` of (key, value) strings, and a one-line `note` under the HTML table."""

    name: str
    rows: list[tuple[str, str]]
    note: str = ""


def summary(obj) -> Summary | None:
    """`obj._summary()`, or None when the object is not a plain result (e.g. a model after
    `eqx.partition` or `jax.tree.map`, whose leaves are None or shapes): display must never raise."""
    try:
        return obj._summary()
    except Exception:
        return None


class Summarised:
    """Mixin: `__repr__` and `_repr_html_` from one method, `_summary() -> Summary`.

    List it first among the bases (`class Solution(Summarised, eqx.Module)`), so that its methods
    come before the base's; it adds no fields and no state (`__slots__ = ()`), so pytrees, `jit` and
    equality are unchanged. When `_summary` raises, `__repr__` falls back to the next base's own
    (equinox's tree printout, a NamedTuple's) and `_repr_html_` returns None (IPython then shows the
    text). A `typing.NamedTuple` cannot take a mixin itself: subclass it
    (`class Result(Summarised, _ResultFields): __slots__ = ()`)."""

    __slots__ = ()

    def _summary(self) -> Summary:
        raise NotImplementedError(f"{type(self).__name__} must define _summary()")

    def __repr__(self) -> str:
        shown = summary(self)
        return super().__repr__() if shown is None else text(shown.name, shown.rows)

    def _repr_html_(self) -> str | None:
        shown = summary(self)
        return None if shown is None else table(f"meanfield.{shown.name}", shown.rows, shown.note)


def text(name: str, rows: list[tuple[str, str]]) -> str:
    """`Name(key=value, ...)`."""
    return f"{name}(" + ", ".join(f"{k}={v}" for k, v in rows) + ")"


def table(name: str, rows: list[tuple[str, str]], note: str = "") -> str:
    """A two-column HTML table headed by `name` (values escaped)."""
    cells = "".join(
        f"<tr><td style='text-align:left;padding:0 1em 0 0'><b>{html.escape(k)}</b></td>"
        f"<td style='text-align:left'><code>{html.escape(v)}</code></td></tr>"
        for k, v in rows
    )
    foot = f"<div style='font-size:90%;opacity:.75'>{html.escape(note)}</div>" if note else ""
    return (
        f"<div class='meanfield-repr'><b>{html.escape(name)}</b>"
        f"<table style='border-collapse:collapse;margin:0'>{cells}</table>{foot}</div>"
    )
