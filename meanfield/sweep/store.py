"""On-disk layout of a run, crash-safe.

    RUN_DIR/
      config.yaml        the validated config (every default filled in)
      run.json           config hash, package / JAX versions, git commit, devices, status;
                         its presence is what makes a directory a run directory
      chunks/            one NetCDF file per finished batch, written atomically
                         (tmp file + fsync + os.replace), named by their first and last point,
                         each stamped with its config hash
      chunks/damaged/    chunk files that failed to read or belong to another config, set aside
      claims/            which process computes which chunk (claims.py; removed by the merge)
      processes/         each process's busy time, folded into run.json by the merge
      results.nc         all chunks merged, sorted by point (written at the end)
      figures/           plots

A killed run leaves only whole chunk files; re-running computes the points no chunk holds. A
chunk that cannot be read (a crash of the disk or of a copy, a truncated file) is named, moved
to chunks/damaged/ and recomputed. `load_run` reads `results.nc`, or merges the chunks of an
unfinished run with a warning that says how many points it holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from ..metrics import OBSERVABLES
from ..regimes import REGIMES
from .claims import HOST, pid_alive

if TYPE_CHECKING:
    from .plan import Plan

ENGINE = "h5netcdf"


RUN_FILES = ("run.json", "config.yaml", "results.nc", "chunks", "figures", "claims", "processes")
"""What meanfield writes in a run directory; `--overwrite` removes these and nothing else."""


class IncompleteRunWarning(UserWarning):
    """`load_run` returned the chunks of a run that has not finished."""


def _atomic(write, path: Path) -> None:
    """write(tmp), fsync, then rename over `path`: readers see the old file or the whole new one.
    A failed write (disk full, read-only) removes its temporary file and re-raises."""
    tmp = path.with_name(f"{path.name}.tmp-{HOST}-{os.getpid()}")  # one per writer: processes share chunks/
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None and exc.errno:  # name the file in the message
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """`data` into `path` atomically (`_atomic`)."""
    _atomic(lambda tmp: tmp.write_bytes(data), path)


def atomic_write_dataset(ds: xr.Dataset, path: Path) -> None:
    """The NetCDF bytes are made in memory, then written by plain file I/O: a full disk is then a clean
    OSError (HDF5 writing to a full disk left a file object whose later close crashed the interpreter)."""
    atomic_write_bytes(ds.to_netcdf(engine=ENGINE), path)


def atomic_write_text(text: str, path: Path) -> None:
    _atomic(lambda tmp: tmp.write_text(text), path)


def chunk_path(run_dir: Path, first: int, last: int) -> Path:
    return Path(run_dir) / "chunks" / f"points-{first:07d}-{last:07d}.nc"


def _chunk_files(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "chunks").glob("points-*.nc"))


def _read_chunk(f: Path, config_hash: str | None, n_points: int | None = None) -> xr.Dataset:
    """One chunk file, loaded whole (a truncated file fails here); raises ValueError naming what is
    wrong with it, FileNotFoundError if another process moved it away meanwhile."""
    try:
        ds = xr.load_dataset(f, engine=ENGINE)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py/netCDF raise many types for a damaged file
        raise ValueError(f"unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None
    stamp = ds.attrs.get("config_hash")
    if config_hash is not None and stamp is not None and stamp != config_hash:
        raise ValueError(f"written by another config (hash {stamp}, this run is {config_hash})")
    if "point" not in ds.coords or ds["point"].ndim != 1 or not np.issubdtype(ds["point"].dtype, np.integer):
        raise ValueError("has no integer `point` coordinate")
    if n_points is not None and ds.sizes["point"] and not 0 <= int(ds["point"].min()) <= int(ds["point"].max()) < n_points:
        raise ValueError(f"holds points outside this run's 0..{n_points - 1}")
    return ds


def _readable_chunks(files, config_hash: str | None, n_points: int | None = None):
    """(file, dataset) for each chunk file that reads and belongs to this config; the others are set aside."""
    for f in files:
        try:
            ds = _read_chunk(f, config_hash, n_points)
        except FileNotFoundError:
            continue
        except ValueError as exc:
            try:
                set_aside(f, str(exc))
            except FileNotFoundError:  # another process set it aside first
                pass
            continue
        yield f, ds


def set_aside(f: Path, reason: str) -> Path:
    """Move a chunk file to chunks/damaged/ (never deleted: it may be evidence) and say so on stderr."""
    dest_dir = f.parent / "damaged"
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / f.name
    k = 1
    while dest.exists():
        dest = dest_dir / f"{f.name}.{k}"
        k += 1
    os.replace(f, dest)
    print(f"warning: chunk {f} is {reason}; moved to {dest}, its points will be recomputed", file=sys.stderr)
    return dest


TMP_MAX_AGE = 3600.0
"""A temporary chunk file of another host untouched this long is a dead writer's leftover."""


def _remove_dead_writers_tmp(chunks: Path) -> None:
    """Temporary files of writes that were killed (their pid is gone on this host, or they are old);
    other processes' writes in progress are left alone."""
    for tmp in chunks.glob("points-*.nc.tmp*"):
        host, _, pid = tmp.name.partition(".tmp-")[2].rpartition("-")
        try:
            dead = (host == HOST and pid.isdigit() and not pid_alive(int(pid))) or not pid.isdigit() or \
                time.time() - tmp.stat().st_mtime > TMP_MAX_AGE
            if dead:
                tmp.unlink()
        except OSError:
            pass


class ChunkIndex:
    """Which of a run's `n_points` points its chunk files hold (`done`, a boolean mask), re-scanned
    cheaply: each file is read once (files appear whole, by atomic rename). Damaged or foreign
    chunks, and chunks holding points outside the run, are set aside (chunks/damaged/)."""

    def __init__(self, run_dir: Path, config_hash: str | None, n_points: int):
        self.dir = Path(run_dir) / "chunks"
        self.config_hash = config_hash
        self.files: dict[Path, np.ndarray] = {}
        self.done = np.zeros(n_points, dtype=bool)
        _remove_dead_writers_tmp(self.dir)
        self.refresh()

    @property
    def n_done(self) -> int:
        return int(self.done.sum())

    def add(self, points: np.ndarray) -> None:
        """Points this process has just written."""
        self.done[points] = True

    def refresh(self) -> "ChunkIndex":
        present = set(_chunk_files(self.dir.parent))
        if any(f not in present for f in self.files):  # set aside by another process: recount
            self.files = {f: p for f, p in self.files.items() if f in present}
            self.done[:] = False
            for pts in self.files.values():
                self.done[pts] = True
        for f, ds in _readable_chunks(sorted(present - set(self.files)), self.config_hash, len(self.done)):
            self.files[f] = pts = ds["point"].values
            self.done[pts] = True
        return self
def merge_chunks(run_dir: Path, config_hash: str | None = None) -> xr.Dataset:
    """All readable chunks of this config (each file read once; damaged or foreign ones set aside),
    one row per point (a point held twice, e.g. by a chunk copied in by hand, is kept once), sorted
    by point."""
    parts = [ds for _, ds in _readable_chunks(_chunk_files(run_dir), config_hash)]
    if not parts:
        raise FileNotFoundError(f"{run_dir}: no finished chunks")
    ds = xr.concat(parts, dim="point", data_vars="all", coords="different", compat="equals", join="outer")
    _, first = np.unique(ds["point"].values, return_index=True)
    return ds.isel(point=np.sort(first)).sortby("point")


def load_run(path: str | Path) -> xr.Dataset:
    """The dataset of a run directory (or a results.nc file path); also opens with plain xarray:
    `xr.open_dataset(RUN_DIR / "results.nc", engine="h5netcdf")`.

    An unfinished run (no results.nc) returns the points its chunks hold, with an
    `IncompleteRunWarning` and `attrs["incomplete"]` saying how many of how many."""
    path = Path(path)
    try:
        if path.is_file():
            return xr.load_dataset(path, engine=ENGINE)
        results = path / "results.nc"
        if results.is_file():
            return xr.load_dataset(results, engine=ENGINE)
    except Exception as exc:  # noqa: BLE001 - h5py raises many types for a damaged file
        raise ValueError(f"{path}: cannot read the results file ({type(exc).__name__}: {str(exc)[:120]})") from None
    if (path / "chunks").is_dir():
        info = read_run_info(path) or {}
        ds = merge_chunks(path, info.get("config_hash"))
        total = info.get("n_points")
        msg = f"{ds.sizes['point']} of {total if total is not None else '?'} points (the run has not finished)"
        ds.attrs["incomplete"] = msg
        warnings.warn(f"{path}: incomplete run: {msg}; rerun `meanfield run` on its config to finish it",
                      IncompleteRunWarning, stacklevel=2)
        return ds
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
    """run.json as a dict; None when there is none. A damaged run.json raises ValueError."""
    f = Path(run_dir) / "run.json"
    if not f.is_file():
        return None
    try:
        info = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{f}: damaged ({type(exc).__name__}); remove the directory or pass another --out") from None
    if not isinstance(info, dict):
        raise ValueError(f"{f}: damaged (not a JSON object); remove the directory or pass another --out")
    return info


def coordinate_array(values: list):
    """A NetCDF-friendly array for one sweep axis (numbers, strings or None)."""
    if all(isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int8)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.float64 if any(isinstance(v, float) for v in values) else np.int64)
    return np.asarray(["null" if v is None else str(v) for v in values], dtype=object)


MAX_TOKEN_FILE_BYTES = 2**34
"""An initial-token .npy larger than 16 GiB is refused from its header, before it is read."""


def read_tokens_file(path: Path, shape: tuple[int | None, int], what: str = "(initial.n, model.d)") -> np.ndarray:
    """Initial tokens from a .npy file of `shape` (`what` names it; None for the number of tokens: any
    n >= 1), checked from the header before any data is read: no pickled objects, a real number dtype,
    the right shape, finite values. Raises ValueError naming the file and what is wrong."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            header = fmt.read_array_header_1_0(f) if version == (1, 0) else fmt.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a .npy array file ({str(exc)[:100]})") from None
    got, _, dtype = header
    if dtype.hasobject:
        raise ValueError(f"{path}: holds Python objects (a pickle), which are never loaded; save a float array")
    if dtype.kind not in "fiu":
        raise ValueError(f"{path}: dtype {dtype} is not a real number type")
    n, d = shape
    if len(got) != 2 or got[1] != d or (got[0] != n if n is not None else got[0] < 1):
        want = tuple(shape) if n is not None else f"(n, {d}) with n >= 1"
        raise ValueError(f"{path}: array shape {tuple(got)} != {what} = {want}")
    nbytes = int(np.prod(got, dtype=np.int64)) * dtype.itemsize
    if nbytes > MAX_TOKEN_FILE_BYTES:
        raise ValueError(f"{path}: {nbytes:,} bytes of tokens is more than the limit {MAX_TOKEN_FILE_BYTES:,}")
    try:
        X = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read the array ({str(exc)[:100]}); is the file truncated?") from None
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{path}: holds {int(np.sum(~np.isfinite(X)))} non-finite values (NaN or inf)")
    return X

OUTPUT_ATTRS = {
    "regime": {"long_name": "regime", "flag_values": np.arange(len(REGIMES), dtype=np.int8),
               "flag_meanings": " ".join(REGIMES)},
    "blowup_time": {"long_name": "blow-up depth (inf: none; nan: the solve failed)", "units": "depth"},
    "t": {"long_name": "depth", "units": "depth"},
    "success": {"long_name": "solver reached t1 or a blow-up event (0: stopped early, e.g. max_steps, or "
                             "non-finite; regime 'failed', observables nan)", "units": "1"},
    "lyapunov": {"long_name": "leading Lyapunov exponents over [discard, t1] (QR method; nan: the state left float "
                              "range)", "units": "1/depth"},
}
"""CF attributes of a sweep's outputs other than the observables (those: `metrics.OBSERVABLES`)."""


def chunk_dataset(plan: Plan, idx: np.ndarray, out: dict, h: str) -> xr.Dataset:
    """One chunk's outputs (name -> array over its points `idx`) as a dataset with CF attributes
    (`metrics.OBSERVABLES`, `OUTPUT_ATTRS`) and the plan's sweep coordinates, stamped with the run's
    config hash `h`."""
    T = out["t"].shape[1]
    t = np.asarray(out["t"])
    depth = t[0] if np.allclose(t, t[:1]) and "simulator.t1" not in plan.axes else np.arange(T)
    data = {}
    for name, arr in out.items():
        arr = np.asarray(arr)
        dims = ("point", "exponent") if name == "lyapunov" else ("point", "depth") if arr.ndim == 2 else ("point",)
        if name in OBSERVABLES:
            attrs = {"long_name": OBSERVABLES[name].long_name, "units": OBSERVABLES[name].units}
        else:
            attrs = dict(OUTPUT_ATTRS.get(name, {}))
        data[name] = (dims, arr, attrs)
    coords = {"point": idx, "depth": ("depth", depth, {"long_name": "depth t", "units": "depth"})}
    for axis in plan.axes:
        coords[axis] = ("point", coordinate_array([plan.points[i].get(axis) for i in idx]))
    return xr.Dataset(data, coords=coords, attrs={"config_hash": h})
