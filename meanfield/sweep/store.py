"""On-disk layout of a run, crash-safe.

    RUN_DIR/
      config.yaml        the validated config (every default filled in)
      run.json           config hash, package / JAX versions, git commit, devices
      chunks/            one NetCDF file per finished batch, written atomically
                         (tmp file + os.replace), named by their first and last point
      results.nc         all chunks merged, sorted by point (written at the end)
      figures/           plots

A killed run leaves only whole chunk files; re-running computes the points no chunk holds.
`load_run` reads `results.nc`, or merges the chunks of an unfinished run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import xarray as xr

ENGINE = "h5netcdf"


def atomic_write_dataset(ds: xr.Dataset, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    ds.to_netcdf(tmp, engine=ENGINE)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def chunk_path(run_dir: Path, first: int, last: int) -> Path:
    return Path(run_dir) / "chunks" / f"points-{first:07d}-{last:07d}.nc"


def done_points(run_dir: Path) -> set[int]:
    """Global point indices held by finished chunk files."""
    done: set[int] = set()
    for f in sorted((Path(run_dir) / "chunks").glob("points-*.nc")):
        with xr.open_dataset(f, engine=ENGINE) as ds:
            done.update(int(i) for i in ds["point"].values)
    return done


def merge_chunks(run_dir: Path) -> xr.Dataset:
    files = sorted((Path(run_dir) / "chunks").glob("points-*.nc"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no finished chunks")
    parts = [xr.load_dataset(f, engine=ENGINE) for f in files]
    ds = xr.concat(parts, dim="point", data_vars="all", coords="different", compat="equals", join="outer")
    return ds.sortby("point")


def load_run(path: str | Path) -> xr.Dataset:
    """The dataset of a run directory (or a results.nc file path); also opens with plain xarray:
    `xr.open_dataset(RUN_DIR / "results.nc", engine="h5netcdf")`."""
    path = Path(path)
    if path.is_file():
        return xr.load_dataset(path, engine=ENGINE)
    results = path / "results.nc"
    if results.is_file():
        return xr.load_dataset(results, engine=ENGINE)
    if (path / "chunks").is_dir():
        return merge_chunks(path)
    raise FileNotFoundError(f"{path}: not a meanfield run directory (no results.nc or chunks/)")


def git_commit(start: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=start, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def read_run_info(run_dir: Path) -> dict | None:
    f = Path(run_dir) / "run.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text())


def coordinate_array(values: list):
    """A NetCDF-friendly array for one sweep axis (numbers, strings or None)."""
    if all(isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int8)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.float64 if any(isinstance(v, float) for v in values) else np.int64)
    return np.asarray(["null" if v is None else str(v) for v in values], dtype=object)
