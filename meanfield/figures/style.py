"""Shared figure conventions: file naming, the JSON of plotted numbers, and the key check value."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class FigureResult:
    """What a rendered figure reports.

    ``key`` names the figure's check value ``value`` (e.g. "fitted consensus rate"); ``expected`` is the
    mathematical reference it is compared with (or None) and ``tolerance`` the accepted deviation.
    ``ok`` is whether ``|value - expected| <= tolerance`` (True when there is no reference).
    """

    name: str
    key: str
    value: float
    expected: float | None = None
    tolerance: float | None = None
    files: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        if self.expected is None or self.tolerance is None:
            return bool(np.isfinite(self.value))
        return bool(abs(self.value - self.expected) <= self.tolerance)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def save_figure(fig, out_dir, name: str, data: dict, *, key: str, value: float, expected: float | None = None,
                tolerance: float | None = None, quick: bool = False) -> FigureResult:
    """Write ``name.png`` (150 dpi), ``name.pdf`` and ``name.json`` into ``out_dir``; return the result.

    The JSON holds ``data`` (the plotted numbers; arrays become lists), the key check, whether the figure
    was drawn at ``--quick`` size, and the machine it was made on.
    """
    import matplotlib.pyplot as plt

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for ext, kw in (("png", {"dpi": 150}), ("pdf", {})):
        path = out / f"{name}.{ext}"
        fig.savefig(path, bbox_inches="tight", **kw)
        files.append(str(path))
    plt.close(fig)
    result = FigureResult(name=name, key=key, value=float(value), expected=expected, tolerance=tolerance,
                          files=tuple(files) + (str(out / f"{name}.json"),))
    payload = {"figure": name, "quick": quick, "machine": platform.platform(),
               "check": {"key": key, "value": float(value), "expected": expected, "tolerance": tolerance,
                         "ok": result.ok},
               "data": _jsonable(data)}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    return result
