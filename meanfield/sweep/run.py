"""The lifecycle of a sweep run: validate, check the output directory, compute, merge, report.

`run_experiment` plans the sweep (`plan`), refuses output directories meanfield may not write to,
registers the run (run.json), lets `schedule.run_plan` compute every chunk (the point functions of
`points`; claim files between processes), then process 0 merges the chunks (`finish_run`), completes
run.json and draws the figures. `merge_run` finishes a run whose workers stopped after the last
chunk; `summary_table` is the text report.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import xarray as xr
import yaml

from ..regimes import REGIMES
from .config import ExperimentConfig
from .plan import ConfigError, Plan, config_hash, load_config, make_plan
from .schedule import log, run_plan
from .store import (
    RUN_FILES, ChunkIndex, atomic_write_dataset, atomic_write_text, git_commit, merge_chunks, read_run_info,
    read_tokens_file,
)


@dataclass
class RunResult:
    dataset: xr.Dataset | None
    """The merged results (None in a process other than 0 of a distributed run: process 0 merges)."""
    run_dir: Path
    figures: list[Path]
    seconds: float
    computed: int
    compute_seconds: float = 0.0
    """Wall time of the computation alone (planning done; chunks computed and written), without
    the merge and the figures."""
    stats: object = None
    """This process's `schedule.WorkStats`: points and chunks computed, busy and wall seconds."""


def group_file_tokens(cfg: ExperimentConfig, source_dir: Path | None) -> np.ndarray | None:
    """The initial tokens of a group whose `initial.kind` is `file` (checked: see `read_tokens_file`), else None."""
    if cfg.initial.kind != "file":
        return None
    f = Path(cfg.initial.path)
    if not f.is_absolute() and source_dir is not None:
        f = source_dir / f
    try:
        return read_tokens_file(f, (cfg.initial.n, cfg.model.d))
    except FileNotFoundError:
        raise ConfigError(f"field `initial.path`: no such file {str(f)!r}") from None
    except ValueError as exc:
        raise ConfigError(f"field `initial.path`: {exc}") from None


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_experiment`: finished chunks are saved in `run_dir`; the same command resumes."""

    def __init__(self, run_dir: Path, done: int, total: int):
        super().__init__(f"{run_dir}: {done} of {total} points saved")
        self.run_dir, self.done, self.total = run_dir, done, total


def check_run_dir(cfg: ExperimentConfig, run_dir: Path, *, overwrite: bool = False) -> str:
    """Refuse an output directory meanfield may not write to (nothing is written here); returns the
    config hash. Allowed: a missing or empty directory, or a run directory (it has run.json) of the
    same config, or of another config with `overwrite`. A file, or a non-empty directory that is not
    a run directory (a user's own files), is refused even with `overwrite`."""
    h = config_hash(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: the output path is a file, not a directory; pass another --out")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return h
    try:
        info = read_run_info(run_dir)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if info is None:
        raise ConfigError(f"{run_dir}: exists, is not empty and is not a meanfield run directory (no run.json); "
                          "meanfield only writes to (and --overwrite only replaces) its own run directories; "
                          "pass another --out")
    if info.get("config_hash") != h and not overwrite:
        raise ConfigError(
            f"{run_dir}: holds a run of a different config (hash {info.get('config_hash')} there, {h} now); "
            "pass --out to write elsewhere, or --overwrite to replace it"
        )
    return h


def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path, *, overwrite: bool = False) -> str:
    """`check_run_dir`, then with `overwrite` remove what meanfield wrote there (`store.RUN_FILES`)
    and nothing else."""
    h = check_run_dir(cfg, run_dir, overwrite=overwrite)
    if overwrite and (run_dir / "run.json").is_file():
        import shutil

        for name in RUN_FILES[1:] + RUN_FILES[:1]:  # run.json last: a crash here leaves a run directory
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return h


def _register_run(run_dir: Path, h: str, info: dict) -> None:
    """Create run.json exclusively (a hard link of a finished temporary file: atomic, fails if it
    exists), so two configs started at once on one directory cannot both pass `check_run_dir`; if it
    exists, its config must be ours. Process 0 then marks the run as running."""
    from .claims import HOST

    target = run_dir / "run.json"
    tmp = run_dir / f".run.json.{HOST}-{os.getpid()}"
    tmp.write_text(json.dumps({**info, "status": "running"}, indent=1))
    try:
        try:
            os.link(tmp, target)
            return
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive creation, written in place
            try:
                fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(tmp.read_text())
                return
            except FileExistsError:
                pass
    finally:
        tmp.unlink(missing_ok=True)
    try:
        prev = read_run_info(run_dir) or {}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if prev.get("config_hash") != h:
        raise ConfigError(f"{run_dir}: another process started a run of a different config here (hash "
                          f"{prev.get('config_hash')}, {h} now); pass another --out")
    if jax.process_index() == 0:
        atomic_write_text(json.dumps({**prev, **info, "status": "running"}, indent=1), target)


def _run_info(cfg: ExperimentConfig, plan: Plan, h: str, source_dir: Path | None) -> dict:
    import importlib.metadata

    try:
        version = importlib.metadata.version("meanfield")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "config_hash": h, "name": cfg.name, "n_points": plan.n_points, "meanfield_version": version,
        "jax_version": jax.__version__, "devices": [str(d) for d in jax.devices()],
        "git_commit": git_commit(source_dir or Path.cwd()),
    }


def run_experiment(
    source: str | Path | ExperimentConfig,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    plots: bool = True,
) -> RunResult:
    """Validate, plan, run (resuming), merge, plot; returns a `RunResult` (dataset, run_dir, figures, seconds,
    computed). The library call behind `meanfield run`.

    Under `jax.distributed` (or with several commands on one shared directory) every process computes
    the chunks it can claim (`schedule.run_plan`) until every point is stored; process 0 then merges,
    writes run.json (with each process's busy time) and draws the figures, and the others return a
    `RunResult` without a dataset."""
    from . import distributed

    t_start = time.perf_counter()
    source_dir = None
    if isinstance(source, ExperimentConfig):
        cfg, src = source, "<config>"
    else:
        cfg, src = load_config(source), str(source)
        source_dir = Path(source).resolve().parent
    plan = make_plan(cfg, source=src)  # every point validated before anything is written
    tokens = {gi: group_file_tokens(g.config, source_dir)  # and every initial-token file read and checked
              for gi, g in enumerate(plan.groups)}
    run_dir = Path(out or cfg.output.dir or Path("runs") / cfg.name)
    proc = jax.process_index()
    h = (prepare_run_dir if proc == 0 else check_run_dir)(cfg, run_dir, overwrite=overwrite)
    distributed.barrier("meanfield-prepared")  # process 0 has removed what --overwrite replaces
    try:
        (run_dir / "chunks").mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{run_dir}: cannot write the output directory ({exc.strerror or exc}); pass another --out") from None
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    info = _run_info(cfg, plan, h, source_dir)
    _register_run(run_dir, h, info)
    if proc == 0:
        atomic_write_text(config_yaml, run_dir / "config.yaml")
    launch = distributed.launch_id()
    index = ChunkIndex(run_dir, h, plan.n_points)
    n_done_before = index.n_done
    if n_done_before and not quiet:
        log(f"resuming {run_dir}: {n_done_before} of {plan.n_points} points already done", quiet)
    t_compute = time.perf_counter()
    try:
        stats = run_plan(plan, run_dir, index, tokens, quiet=quiet, launch=launch)
    except KeyboardInterrupt:
        if proc == 0:
            prev = read_run_info(run_dir) or info
            atomic_write_text(json.dumps({**prev, "status": "interrupted"}, indent=1), run_dir / "run.json")
        raise RunInterrupted(run_dir, index.refresh().n_done, plan.n_points) from None
    compute_seconds = time.perf_counter() - t_compute
    stats_dir = run_dir / "processes" / launch
    stats_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(stats.record()), stats_dir / f"process-{proc}.json")
    if proc != 0:  # process 0 merges (it must leave last: it hosts JAX's coordination service)
        return RunResult(None, run_dir, [], time.perf_counter() - t_start, stats.points, compute_seconds, stats)
    ds, figures, procs = finish_run(run_dir, cfg, plan, info, config_yaml, launch=launch, n_proc=jax.process_count(),
                                    plots=plots)
    computed = sum(p["points"] for p in procs) if len(procs) > 1 else stats.points  # by every process of the launch
    return RunResult(ds, run_dir, figures, time.perf_counter() - t_start, computed, compute_seconds, stats)


STATS_WAIT_SECONDS = 5.0


def _gather_stats(run_dir: Path, launch: str | None, n_proc: int) -> list[dict]:
    """The launch's per-process records (waiting briefly for peers that are still writing theirs)."""
    if launch is None:
        return []
    d = run_dir / "processes" / launch
    deadline = time.perf_counter() + STATS_WAIT_SECONDS
    while len(list(d.glob("process-*.json"))) < n_proc and time.perf_counter() < deadline:
        time.sleep(0.2)
    out = []
    for f in sorted(d.glob("process-*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            pass
    return sorted(out, key=lambda r: r.get("process", 0))


def finish_run(run_dir: Path, cfg: ExperimentConfig, plan: Plan, info: dict, config_yaml: str, *,
               launch: str | None = None, n_proc: int = 1, plots: bool = True):
    """Merge every chunk into results.nc, complete run.json (with the processes' busy times) and draw
    the figures; (dataset, figure paths, per-process records). Done once, by one process, after every
    point is stored."""
    import shutil

    h = info["config_hash"]
    ds = merge_chunks(run_dir, h)
    ds.attrs.update({
        "name": cfg.name, "description": cfg.description, "config_yaml": config_yaml, "config_hash": h,
        "meanfield_version": info["meanfield_version"], "jax_version": info["jax_version"],
        "devices": ", ".join(info["devices"]), "git_commit": info["git_commit"] or "none",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "simulator": cfg.simulator.kind, "grid_axes": " ".join(plan.grid_axes()),
        "sweep_axes": " ".join(plan.axes),
    })
    atomic_write_dataset(ds, run_dir / "results.nc")
    record = {**info, "status": "complete"}
    procs = _gather_stats(run_dir, launch, n_proc)
    if procs:
        walls = [p["wall_seconds"] for p in procs]
        busy = [p["busy_seconds"] for p in procs]
        record["processes"] = procs
        record["load_balance"] = {
            "processes": len(procs), "processes_launched": n_proc, "slowest_wall_seconds": max(walls),
            "mean_busy_seconds": round(sum(busy) / len(busy), 3),
            "idle_fraction_of_slowest": round(1 - busy[walls.index(max(walls))] / max(walls), 4) if max(walls) > 0 else 0.0,
        }
    atomic_write_text(json.dumps(record, indent=1), run_dir / "run.json")
    shutil.rmtree(run_dir / "claims", ignore_errors=True)
    shutil.rmtree(run_dir / "processes", ignore_errors=True)
    figures: list[Path] = []
    if plots:
        from .plots import plot_run

        figures = plot_run(ds, cfg, run_dir / "figures")
    return ds, figures, procs


def merge_run(run_dir: str | Path, *, plots: bool = True) -> RunResult:
    """Finish a run whose workers stopped after computing every chunk (e.g. preempted before the
    merge): merge, run.json, figures. Refuses (ConfigError) a directory with missing points, saying
    how to compute them. The library call behind `meanfield merge DIR`."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    try:
        info = read_run_info(run_dir)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if info is None or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a meanfield run directory (no run.json and config.yaml)")
    source = str(run_dir / "config.yaml")
    cfg = load_config(source, check_files=False)
    h = config_hash(cfg)
    if info.get("config_hash") != h:
        raise ConfigError(f"{run_dir}: config.yaml (hash {h}) is not the config of run.json ({info.get('config_hash')})")
    plan = make_plan(cfg, source=source)
    missing = plan.n_points - ChunkIndex(run_dir, h, plan.n_points).n_done
    if missing:
        raise ConfigError(f"{run_dir}: {missing} of {plan.n_points} points are not computed yet; compute them with "
                          f"`meanfield run {source} --out {run_dir}` (any number of processes), which also merges")
    info = {**info, **{k: v for k, v in _run_info(cfg, plan, h, None).items() if k not in info}}
    ds, figures, _ = finish_run(run_dir, cfg, plan, info, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
                                plots=plots)
    return RunResult(ds, run_dir, figures, time.perf_counter() - t0, 0, 0.0)


def summary_table(ds: xr.Dataset) -> str:
    """A short text summary: regime counts overall and along the first sweep axis. Each row ends with
    the quantity that decided collapse against stable (`_final_column`; the final rank-one distance,
    collapse below `regimes.collapse_tol`) as its least and largest value over the row's collapse and
    stable points; the shaped SDE also shows its exploded fraction (blow-up above 0.5). A run that did
    not record that quantity shows the mean final value of its first recorded observable instead."""
    from .plots import run_collapse_tol

    reg = ds["regime"].values
    n = reg.size
    lines = [f"{n} points: " + ", ".join(f"{name} {int(np.sum(reg == i))}" for i, name in enumerate(REGIMES))]
    if "blowup_time" in ds and np.any(np.isfinite(ds["blowup_time"].values)):
        bt = ds["blowup_time"].values
        lines.append(f"blow-up depth: min {np.nanmin(bt[np.isfinite(bt)]):.4g}, "
                     f"median {np.median(bt[np.isfinite(bt)]):.4g} over {int(np.isfinite(bt).sum())} points")
    axes = ds.attrs.get("sweep_axes", "").split()
    if axes:
        axis = axes[0]
        vals = ds[axis].values
        uniq = list(dict.fromkeys(vals.tolist()))
        if len(uniq) <= 40:
            heading, values, ranges = _final_column(ds)
            columns = [(heading, values)]
            if "exploded_fraction" in ds:
                columns.append(("exploded_fraction", ds["exploded_fraction"].values.astype(float)))
            if ranges:
                lines.append(f"last column{'s' if len(columns) > 1 else ''}: least .. largest value per row; "
                             f"{columns[0][0]} over the collapse and stable points (collapse below "
                             f"{run_collapse_tol(ds):g})" + ("; exploded_fraction over all points (blow-up above 0.5)"
                                                            if len(columns) > 1 else ""))
            header = f"{axis:>24} | " + " | ".join(f"{r:>8}" for r in REGIMES) + "".join(f" | {c}" for c, _ in columns)
            lines += [header, "-" * len(header)]
            for u in uniq:
                sel = vals == u
                counts = " | ".join(f"{int(np.sum(reg[sel] == i)):>8}" for i in range(len(REGIMES)))
                label = f"{u:.4g}" if isinstance(u, float) else str(u)
                cells = []
                for name, fin in columns:
                    v = fin[sel][np.isfinite(fin[sel])]
                    if not ranges:
                        cells.append(f"{np.mean(v):.4g}" if v.size else "nan")
                    elif not v.size:
                        cells.append("-")
                    else:
                        lo, hi = f"{v.min():.3g}", f"{v.max():.3g}"
                        cells.append(lo if lo == hi else f"{lo} .. {hi}")
                lines.append(f"{label:>24} | {counts}" + "".join(f" | {c}" for c in cells))
    return "\n".join(lines)


def _final_column(ds) -> tuple[str, np.ndarray, bool]:
    """The summary's last column: (heading, one value per point (NaN where it does not apply), whether
    rows show least .. largest). The quantity that decided collapse against stable; where it was not
    recorded, the mean final value of a recorded observable (or, with none, the final depth as a range)."""
    from .plots import deciding_values, final_values

    decided = deciding_values(ds)
    if decided is not None:
        return f"final {decided[1]}", decided[0], True
    for name in ("effective_rank", "cov_trace", "corr_mean"):
        if name in ds:
            return f"final {name} (mean; rank_one_distance not recorded)", final_values(ds[name]).values, False
    return "final t", final_values(ds["t"]).values, True
