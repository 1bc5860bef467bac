"""Plots of a sweep dataset: regime maps over two swept axes, observables against depth.

Colours are the Okabe-Ito colour-blind-safe palette: collapse blue, stable bluish green,
blow-up vermillion, failed solves grey. A spectral-ratio axis is drawn on a log scale with the 1:1 rule's
stable band 0.5 <= rho <= 2 marked. Each regime-map cell is labelled with the number the regime rule
decided on (`deciding_values`, `blowup_values`): the final rank-one distance, or the blow-up depth.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.patches import Patch

from ..regimes.observed import REGIMES
from ..rule.band import BAND
from .config import RegimeConfig, RegimeMapPlot

REGIME_COLORS = ("#0072B2", "#009E73", "#D55E00", "#999999")
LINE_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9,
         "figure.dpi": 110, "savefig.dpi": 150, "axes.spines.top": False, "axes.spines.right": False}


def _is_ratio_axis(name: str) -> bool:
    return name.endswith("spectral_ratio")


def _log_axis(name: str, values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return _is_ratio_axis(name) or (v.size > 2 and np.all(v > 0) and v.max() / v.min() > 50)


def _edges(v: np.ndarray, log: bool) -> np.ndarray:
    if v.size == 1:
        return np.array([v[0] * 0.5, v[0] * 1.5]) if log else np.array([v[0] - 0.5, v[0] + 0.5])
    w = np.log(v) if log else v
    mid = (w[1:] + w[:-1]) / 2
    e = np.concatenate([[w[0] - (mid[0] - w[0])], mid, [w[-1] + (w[-1] - mid[-1])]])
    return np.exp(e) if log else e


def _label(v) -> str:
    return f"{v:.3g}" if isinstance(v, (float, np.floating)) else str(v)


def _positions(name: str, values: np.ndarray):
    """(cell centres, cell edges, log?) for one regime-map axis. Log-spaced numeric axes (and the
    spectral ratio) get a log scale; short or unevenly spaced axes are drawn as categories."""
    if np.issubdtype(values.dtype, np.number):
        v = values.astype(float)
        if _log_axis(name, v):
            return v, _edges(v, True), True
        even = v.size > 2 and np.allclose(np.diff(v), np.diff(v)[0])
        if even and v.size > 10:
            return v, _edges(v, False), False
    pos = np.arange(values.size, dtype=float)
    return pos, _edges(pos, False), False


def final_values(da: xr.DataArray) -> xr.DataArray:
    """The last finite value along depth of each point (blown-up runs stop early)."""
    if "depth" not in da.dims:
        return da
    arr = da.values
    idx = np.where(np.isfinite(arr), np.arange(arr.shape[-1]), -1).max(axis=-1)
    out = np.where(idx >= 0, np.take_along_axis(arr, np.maximum(idx, 0)[:, None], axis=-1)[:, 0], np.nan)
    return xr.DataArray(out, dims=("point",), coords={c: da.coords[c] for c in da.coords if da.coords[c].dims == ("point",)})


def _mode(x: np.ndarray) -> int:
    vals, counts = np.unique(x, return_counts=True)
    return int(vals[np.argmax(counts)])


def run_collapse_tol(ds: xr.Dataset) -> float:
    """The run's `regimes.collapse_tol` (from its stored config), else the schema's default (1e-2)."""
    import yaml

    default = RegimeConfig().collapse_tol
    try:
        tree = yaml.safe_load(ds.attrs.get("config_yaml", "")) or {}
        return float((tree.get("regimes") or {}).get("collapse_tol", default))
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        return default


def deciding_values(ds: xr.Dataset) -> tuple[np.ndarray, str] | None:
    """Per point, the number the regime rule decided collapse against stable on, and its name.

    Particles and Gaussian moments: the final `rank_one_distance` (collapse below `collapse_tol`);
    the shaped SDE: `1 - corr_mean` at t1 (its collapse test). None when that observable was not
    recorded. Blown-up and failed points get NaN here (see `blowup_values`)."""
    reg = ds["regime"].values
    if "rank_one_distance" in ds:
        vals, name = final_values(ds["rank_one_distance"]).values.astype(float), "rank_one_distance"
    elif "corr_mean" in ds:
        vals, name = 1.0 - final_values(ds["corr_mean"]).values.astype(float), "1 - corr_mean"
    else:
        return None
    return np.where((reg == REGIMES.index("collapse")) | (reg == REGIMES.index("stable")), vals, np.nan), name


def blowup_values(ds: xr.Dataset) -> tuple[np.ndarray, str]:
    """Per point, the number that marks a blow-up: the exploded fraction of shaped-SDE paths (blow-up
    above 0.5), else the blow-up depth (the event, or the first save whose RMS norm grew past
    `growth_limit`). NaN for points that did not blow up."""
    blown = ds["regime"].values == REGIMES.index("blowup")
    if "exploded_fraction" in ds:
        return np.where(blown, ds["exploded_fraction"].values.astype(float), np.nan), "exploded fraction"
    bt = ds["blowup_time"].values.astype(float) if "blowup_time" in ds else np.full(blown.shape, np.nan)
    return np.where(blown & np.isfinite(bt), bt, np.nan), "blow-up depth t"


def compact(v: float) -> str:
    """A number in at most about six characters: 0.37, 12, 0.0071, 3e-5."""
    if not np.isfinite(v):
        return ""
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e3:
        return f"{v:.2g}"
    mant, exp = f"{v:.0e}".split("e")
    return f"{mant}e{int(exp)}"


def regime_map(ds: xr.Dataset, x: str, y: str, observable: str = "effective_rank", ax=None):
    """Cells over (x, y) coloured by regime (the most frequent over the other axes, e.g. seeds; a tie
    goes to the first in `REGIMES` order, so one collapsed seed of two makes a collapse cell),
    annotated with the quantity that decided it: the median over the cell's points of that regime
    of the final `rank_one_distance` (collapse below `collapse_tol`; `1 - corr_mean` for the shaped
    SDE), or, in blow-up cells, of the blow-up depth "t=..." (shaped SDE: the exploded fraction).
    When the collapse quantity was not recorded, cells show the mean final value of `observable`."""
    for axis in (x, y):
        if axis not in ds.coords:
            raise ValueError(f"regime_map: `{axis}` is not a sweep axis of this run; axes: {ds.attrs.get('sweep_axes', '')}")
    xs = np.unique(ds[x].values)
    ys = np.unique(ds[y].values)
    reg = np.full((ys.size, xs.size), np.nan)
    text = np.full((ys.size, xs.size), "", dtype=object)
    decided = deciding_values(ds)
    blown, blown_name = blowup_values(ds)
    fin = final_values(ds[observable]).values if (decided is None and observable in ds) else None
    xv, yv, rv = ds[x].values, ds[y].values, ds["regime"].values
    blowup_code = REGIMES.index("blowup")
    for i, yy in enumerate(ys):
        for j, xx in enumerate(xs):
            sel = (xv == xx) & (yv == yy)
            if not sel.any():
                continue
            reg[i, j] = _mode(rv[sel])
            if decided is None:
                if fin is not None and np.isfinite(fin[sel]).any():
                    text[i, j] = f"{np.nanmean(fin[sel]):.2g}"
                continue
            of_mode = sel & (rv == reg[i, j])
            vals = (blown if reg[i, j] == blowup_code else decided[0])[of_mode]
            if np.isfinite(vals).any():
                v = compact(float(np.nanmedian(vals)))
                text[i, j] = (f"t={v}" if "depth" in blown_name else v) if reg[i, j] == blowup_code else v
    with plt.rc_context(STYLE):
        if ax is None:
            fig, ax = plt.subplots(figsize=(6.4, 4.8), layout="constrained")
        px, edges_x, logx = _positions(x, xs)
        py, edges_y, logy = _positions(y, ys)
        cmap = ListedColormap(REGIME_COLORS)
        ax.pcolormesh(edges_x, edges_y, np.ma.masked_invalid(reg),
                      cmap=cmap, norm=BoundaryNorm(np.arange(len(REGIMES) + 1) - 0.5, len(REGIMES)), edgecolors="white", linewidth=0.3)
        for axis_vals, pos, log, set_scale, set_ticks, set_labels in (
            (xs, px, logx, ax.set_xscale, ax.set_xticks, ax.set_xticklabels),
            (ys, py, logy, ax.set_yscale, ax.set_yticks, ax.set_yticklabels),
        ):
            if log:
                set_scale("log")
            elif pos is not None and not np.array_equal(pos, axis_vals):  # categorical axis
                set_ticks(pos)
                set_labels([_label(v) for v in axis_vals])
        cx = px if px is not None else xs
        cy = py if py is not None else ys
        annotate = xs.size <= 16 and ys.size <= 16 and any(text.ravel())  # beyond 16 the numbers overlap
        if annotate:
            for i in range(ys.size):
                for j in range(xs.size):
                    if text[i, j]:
                        ax.text(cx[j], cy[i], text[i, j], ha="center", va="center", fontsize=6.5, color="white")
        for axis, setter in ((x, ax.axvspan), (y, ax.axhspan)):
            if _is_ratio_axis(axis):
                setter(*BAND, facecolor="none", edgecolor="black", hatch="//", linewidth=0.8, alpha=0.6)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(f"regimes of {ds.attrs.get('name', 'run')}")
        shown = set(np.unique(rv).tolist())  # "failed" only in the legend when some point failed
        handles = [Patch(color=c, label=r) for k, (c, r) in enumerate(zip(REGIME_COLORS, REGIMES))
                   if r != "failed" or k in shown]
        if _is_ratio_axis(x) or _is_ratio_axis(y):
            handles.append(Patch(facecolor="none", edgecolor="black", hatch="//", label="1:1 band 0.5-2"))
        legend = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        if annotate:
            if decided is None:
                note = f"numbers: final\n{observable}\n(mean; rank_one_distance\nnot recorded)"
            else:
                note = f"numbers: final\n{decided[1]}\n(collapse < {compact(run_collapse_tol(ds))})"
                if blowup_code in shown:
                    note += "\nblow-up cells:\n" + ("t = blow-up depth" if "depth" in blown_name else blown_name)
                note += "\n(median over the\ncell's points)"
            legend.set_title(note, prop={"size": 8})
            legend._legend_box.align = "left"
    return ax.figure


def regime_map_panels(ds: xr.Dataset, x: str, y: str, observable: str = "effective_rank", facet: str | None = None):
    """`regime_map` once per value of `facet` (side by side), or once if `facet` is None."""
    if facet is None:
        return regime_map(ds, x, y, observable)
    if facet not in ds.coords:
        raise ValueError(f"regime_map: facet `{facet}` is not a sweep axis; axes: {ds.attrs.get('sweep_axes', '')}")
    values = list(dict.fromkeys(ds[facet].values.tolist()))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(values), figsize=(4.6 * len(values) + 1.6, 4.6), layout="constrained", squeeze=False)
        for k, (v, ax) in enumerate(zip(values, axes[0])):
            sub = ds.isel(point=np.flatnonzero(ds[facet].values == v))
            regime_map(sub, x, y, observable, ax=ax)
            ax.set_title(f"{facet} = {_label(v)}")
            if k < len(values) - 1 and ax.get_legend() is not None:
                ax.get_legend().remove()
            if k > 0:
                ax.set_ylabel("")
        fig.suptitle(f"regimes of {ds.attrs.get('name', 'run')} (most frequent over the other axes)")
    return fig


def depth_curves(ds: xr.Dataset, observable: str = "effective_rank", hue: str | None = None, ax=None, max_lines: int = 40):
    """`observable` against depth: one line per `hue` value (mean over the other points, with a
    min-max band), or one line per point when there is no hue and few points."""
    if observable not in ds:
        raise ValueError(f"depth_curves: `{observable}` was not recorded; recorded: {[v for v in ds.data_vars if 'depth' in ds[v].dims]}")
    da = ds[observable]
    depth = ds["depth"].values
    t_all = ds["t"].values if "t" in ds else np.broadcast_to(depth, da.shape)
    same_grid = bool(np.allclose(t_all, t_all[:1], equal_nan=True))
    with plt.rc_context(STYLE):
        if ax is None:
            fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
        if hue is None and ds.sizes["point"] <= max_lines:
            for k in range(ds.sizes["point"]):
                ax.plot(t_all[k], da.values[k], color=LINE_COLORS[1], alpha=0.5, linewidth=1)
        else:
            groups = [(None, np.ones(ds.sizes["point"], bool))] if hue is None else [
                (u, ds[hue].values == u) for u in np.unique(ds[hue].values)]
            numeric = hue is not None and np.issubdtype(ds[hue].dtype, np.number) and len(groups) > 5
            if numeric:  # a sequential colour scale and a colour bar instead of a long legend
                hv = np.array([u for u, _ in groups], dtype=float)
                log = _log_axis(hue, hv)
                norm = (matplotlib.colors.LogNorm if log else matplotlib.colors.Normalize)(hv.min(), hv.max())
                cmap = plt.get_cmap("cividis")
            for k, (u, sel) in enumerate(groups):
                vals = da.values[sel]
                color = cmap(norm(float(u))) if numeric else LINE_COLORS[k % len(LINE_COLORS)]
                label = None if u is None else f"{hue}={_label(u)}"
                if not same_grid:  # depth grids differ (t1 swept): one line per point on its own grid
                    for j, row in enumerate(vals):
                        ax.plot(t_all[sel][j], row, color=color, linewidth=1.2, label=None if (numeric or j) else label)
                    continue
                with np.errstate(all="ignore"):
                    mean, lo, hi = np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)
                ax.plot(depth, mean, color=color, label=None if numeric else label, linewidth=1.6)
                if len(groups) <= 5:
                    ax.fill_between(depth, lo, hi, color=color, alpha=0.15, linewidth=0)
            if numeric:
                sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
                ax.figure.colorbar(sm, ax=ax, label=hue + (" (line: mean over other axes)" if same_grid else ""))
            elif hue is not None:
                ax.legend(frameon=False, loc="best", title="mean, min-max band" if same_grid else None)
        vals = da.values[np.isfinite(da.values)]
        if vals.size and np.all(vals > 0) and vals.max() / max(vals.min(), 1e-300) > 1e3:
            ax.set_yscale("log")
        ax.set_xlabel("depth t")
        ax.set_ylabel(da.attrs.get("long_name", observable))
        ax.set_title(f"{ds.attrs.get('name', 'run')}: {observable} over depth")
    return ax.figure


def _save(fig, stem: Path, formats) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = stem.with_suffix(f".{fmt}")
        fig.savefig(p)
        paths.append(p)
    plt.close(fig)
    return paths


def plot_run(ds: xr.Dataset, cfg, fig_dir: Path) -> list[Path]:
    """The figures a run's config asks for (regime map, depth curves) as PNG and PDF."""
    fig_dir = Path(fig_dir)
    formats = cfg.plots.formats
    paths: list[Path] = []
    rm = cfg.plots.regime_map
    grid_axes = [a for a in ds.attrs.get("grid_axes", "").split() if np.issubdtype(ds[a].dtype, np.number)]
    if rm is None and len(grid_axes) >= 2:
        non_seed = [a for a in grid_axes if a != "seed"]
        if len(non_seed) >= 2:
            rm = RegimeMapPlot(x=non_seed[0], y=non_seed[1], observable=cfg.observable_names()[0])
    if rm is not None:
        obs = cfg.plot_observable(rm.observable)
        paths += _save(regime_map_panels(ds, rm.x, rm.y, obs, rm.facet), fig_dir / "regime_map", formats)
    curves = cfg.plots.curves
    if curves is not None:
        obs = cfg.plot_observable(curves.observable)
        hue = curves.hue
        if hue is None:
            axes = [a for a in ds.attrs.get("sweep_axes", "").split() if a != "seed"]
            hue = axes[0] if axes and ds.sizes["point"] > 40 else None
        paths += _save(depth_curves(ds, obs, hue), fig_dir / f"{obs}_vs_depth", formats)
    return paths
