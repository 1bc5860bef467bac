"""The sweep report says what decided each regime: the printed summary table and the regime map's cell
labels show the final rank-one distance (collapse below collapse_tol) and, in blow-up cells, the blow-up
depth. Synthetic datasets, no solve."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import xarray as xr

from meanfield.regimes import REGIMES
from meanfield.sweep.plots import compact, deciding_values, regime_map
from meanfield.sweep.run import summary_table

COLLAPSE, STABLE, BLOWUP, FAILED = (REGIMES.index(r) for r in ("collapse", "stable", "blowup", "failed"))


def _dataset(rank_one=True):
    """Two ratios x two betas x two seeds. rho = 0.1: collapse (seed 0) and stable (seed 1);
    rho = 10: stable at beta 1, blow-up at beta 4 (depth 2.5)."""
    rho = np.repeat([0.1, 10.0], 4)
    beta = np.tile(np.repeat([1.0, 4.0], 2), 2)
    seed = np.tile([0, 1], 4)
    regime = np.array([COLLAPSE, STABLE, COLLAPSE, STABLE, STABLE, STABLE, BLOWUP, BLOWUP], np.int8)
    final = np.array([3e-4, 0.25, 5e-3, 0.3, 0.05, 0.07, np.nan, np.nan])
    depth = np.linspace(0.0, 5.0, 3)
    curve = np.stack([np.linspace(0.5, f, 3) if np.isfinite(f) else [0.5, 0.4, np.nan] for f in final])
    blowup = np.where(regime == BLOWUP, 2.5, np.inf)
    coords = {"model.spectral_ratio": ("point", rho), "model.beta": ("point", beta), "seed": ("point", seed),
              "depth": depth}
    data = {"regime": ("point", regime), "blowup_time": ("point", blowup),
            "effective_rank": (("point", "depth"), 1.0 + curve)}
    if rank_one:
        data["rank_one_distance"] = (("point", "depth"), curve)
    return xr.Dataset(data, coords=coords, attrs={"name": "synthetic", "sweep_axes": "model.spectral_ratio model.beta seed",
                                                   "config_yaml": "regimes: {collapse_tol: 0.01}\n"})


def test_summary_table_prints_the_deciding_rank_one_distance():
    out = summary_table(_dataset())
    assert "8 points: collapse 2, stable 4, blowup 2, failed 0" in out
    assert "final rank_one_distance" in out and "collapse below 0.01" in out
    rows = {line.split("|")[0].strip(): line for line in out.splitlines() if "|" in line}
    assert rows["0.1"].endswith("| 0.0003 .. 0.3")  # collapsed 3e-4 and 5e-3, stable 0.25 and 0.3
    assert rows["10"].endswith("| 0.05 .. 0.07")  # blown-up points do not enter the range
    assert "effective_rank" not in out


def test_summary_table_without_rank_one_distance_says_so():
    out = summary_table(_dataset(rank_one=False))
    assert "final effective_rank (mean; rank_one_distance not recorded)" in out


def test_regime_map_labels_cells_with_the_deciding_quantity():
    ds = _dataset()
    fig = regime_map(ds, "model.spectral_ratio", "model.beta", "effective_rank")
    labels = sorted(t.get_text() for t in fig.axes[0].texts)
    # (0.1, 1): collapse (tie goes to collapse), its collapsed point 3e-4; (0.1, 4): 5e-3; (10, 1): stable,
    # median of 0.05 and 0.07; (10, 4): blow-up at depth 2.5.
    assert labels == sorted(["3e-4", "0.005", "0.06", "t=2.5"])
    note = fig.axes[0].get_legend().get_title().get_text()
    assert "rank_one_distance" in note and "collapse < 0.01" in note and "blow-up depth" in note


def test_deciding_values_and_compact_format():
    values, name = deciding_values(_dataset())
    assert name == "rank_one_distance"
    np.testing.assert_allclose(values[:6], [3e-4, 0.25, 5e-3, 0.3, 0.05, 0.07])
    assert np.all(np.isnan(values[6:]))
    assert deciding_values(_dataset(rank_one=False)) is None
    assert [compact(v) for v in (0.0, 0.37, 12.0, 0.0071, 3.2e-5, 1234.0, np.nan)] == \
        ["0", "0.37", "12", "0.0071", "3e-5", "1e3", ""]


@pytest.mark.parametrize("collapse_tol", [0.01, 0.05])
def test_regime_map_reads_collapse_tol_from_the_run(collapse_tol):
    ds = _dataset()
    ds.attrs["config_yaml"] = f"regimes: {{collapse_tol: {collapse_tol}}}\n"
    fig = regime_map(ds, "model.spectral_ratio", "model.beta", "effective_rank")
    assert f"collapse < {compact(collapse_tol)}" in fig.axes[0].get_legend().get_title().get_text()


def test_every_shipped_experiment_has_a_docs_page():
    """docs/experiments/NAME.md for every experiments/**/NAME.yaml, listed on the index and in the nav."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    names = sorted(p.stem for p in (root / "experiments").rglob("*.yaml"))
    assert names, "no shipped experiments found"
    index = (root / "docs" / "experiments" / "index.md").read_text()
    nav = (root / "mkdocs.yml").read_text()
    for name in names:
        assert (root / "docs" / "experiments" / f"{name}.md").is_file(), name
        assert f"({name}.md)" in index and f"experiments/{name}.md" in nav, name
