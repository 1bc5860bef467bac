"""The figure catalog: every published-figure reproduction behind one name.

    meanfield figures all --quick          # every figure, small sizes
    meanfield figures consensus clustering  # chosen ones, full size

A figure is a module in this package with ``render(out_dir, quick) -> FigureResult``; it writes
``<name>.png``, ``<name>.pdf`` and ``<name>.json`` (the plotted numbers and the key check value) into
``out_dir`` via :func:`meanfield.figures.style.save_figure`. The catalog is in ``catalog.py``.
"""

from .catalog import FIGURES as FIGURES
from .catalog import render as render
from .style import FigureResult as FigureResult
from .style import save_figure as save_figure

__all__ = ["FIGURES", "render", "FigureResult", "save_figure"]
