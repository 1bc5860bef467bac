"""The `meanfield` command: thin wrappers over library calls.

    meanfield run FILE [--out DIR] [--resume] [--overwrite] [--quiet]
                       [--distributed [--coordinator HOST:PORT --num-processes N --process-id I]]
    meanfield merge RUN_DIR
    meanfield validate FILE
    meanfield plot RUN_DIR
    meanfield list
    meanfield train FILE [--out DIR] [--resume] [--overwrite] [--quiet]
    meanfield weights PATH [--attention wo|value|both] [--lyapunov] ...

Exit status 0 on success, 2 for a bad experiment file, input file or output directory (one
message naming the file and field; nothing is written), 1 for a failure while running (e.g. a
full disk: one line naming the path; finished chunks are kept), 130 after Ctrl-C (one line saying
how to resume).

The commands that compute (`run`, `figures NAME`, `weights`) turn on JAX's persistent compilation
cache, so a second run of the same experiment can load its compiled programs from disk instead of
recompiling: in `$MEANFIELD_CACHE_DIR` if set, else `$XDG_CACHE_HOME/meanfield/jax` (default
`~/.cache/meanfield/jax`); `MEANFIELD_COMPILE_CACHE=0` turns it off. Only the command line does
this; `import meanfield` leaves JAX's configuration alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from .sweep.plan import EXPERIMENTS_DIRS, find_experiment


CACHE_MIN_COMPILE_SECS = 0.5  # JAX's default (1 s) would skip most of a sweep's compiles on a fast machine


def compile_cache_dir() -> Path:
    """Where the command line keeps JAX's compiled programs: $MEANFIELD_CACHE_DIR, else
    $XDG_CACHE_HOME/meanfield/jax, else ~/.cache/meanfield/jax."""
    if os.environ.get("MEANFIELD_CACHE_DIR"):
        return Path(os.environ["MEANFIELD_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "meanfield" / "jax"


@contextlib.contextmanager
def compile_cache():
    """Turn on JAX's persistent compilation cache for the duration of one command, then put JAX's
    configuration back as it was (`main` may be called in-process, e.g. from tests or a notebook).

    Off with MEANFIELD_COMPILE_CACHE=0. A cache directory already given to JAX (JAX_COMPILATION_CACHE_DIR)
    is kept unless MEANFIELD_CACHE_DIR is set. A directory that cannot be created or written (read-only
    home) costs one warning line on stderr; the command then runs without the cache."""
    import jax

    if os.environ.get("MEANFIELD_COMPILE_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        yield None
        return
    previous = jax.config.jax_compilation_cache_dir
    if previous and not os.environ.get("MEANFIELD_CACHE_DIR"):
        yield Path(previous)  # the user configured JAX's cache themselves
        return
    path = compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        print(f"warning: compilation cache disabled: cannot write {path} ({exc.strerror or exc}); "
              "set MEANFIELD_CACHE_DIR, or MEANFIELD_COMPILE_CACHE=0 to silence this", file=sys.stderr)
        yield None
        return
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    if previous:
        cc.reset_cache()  # JAX opens its cache directory once per process; make it open the new one
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min(CACHE_MIN_COMPILE_SECS,
                      saved["jax_persistent_cache_min_compile_time_secs"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor
    try:
        yield path
    finally:
        for n, v in saved.items():
            jax.config.update(n, v)
        cc.reset_cache()


def _computes(args) -> bool:
    """Whether a command compiles JAX programs (and so uses the compilation cache)."""
    if args.command == "figures":  # not for listing, nor for names it will refuse
        from .figures import FIGURES

        return bool(args.names) and not args.list and all(n in FIGURES for n in args.names if n != "all")
    return args.command in ("run", "weights", "train")


def _cmd_run(args) -> int:
    from .sweep.plan import ConfigError
    from .sweep.run import run_experiment

    if args.distributed:
        from .sweep import distributed

        distributed.start(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
    elif any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        raise ConfigError("--coordinator, --num-processes and --process-id need --distributed")
    res = run_experiment(find_experiment(args.file), out=args.out, overwrite=args.overwrite, quiet=args.quiet)
    if res.dataset is None:  # a distributed run's process > 0: process 0 merges and reports
        st = res.stats
        print(f"process {st.process} of {st.processes}: computed {st.points} points in {st.chunks} chunks, busy "
              f"{st.busy_seconds:.2f} of {st.wall_seconds:.2f} s; process 0 merges into {res.run_dir / 'results.nc'}")
        return 0
    across = f" by {res.stats.processes} processes" if res.stats is not None and res.stats.processes > 1 else ""
    return _report(res, f"computed {res.computed} points{across} in {res.seconds:.2f} s (computation "
                        f"{res.compute_seconds:.2f} s, then merge and figures)")


def _cmd_merge(args) -> int:
    from .sweep.run import merge_run

    res = merge_run(args.run_dir)
    return _report(res, f"merged {res.dataset.sizes['point']} points")


def _report(res, what: str) -> int:
    """The summary table, one line of what was done, the dataset and the PNG figures."""
    from .sweep.run import summary_table

    print(summary_table(res.dataset))
    print(f"{what}; dataset: {res.run_dir / 'results.nc'}")
    for f in res.figures:
        if f.suffix == ".png":
            print(f"figure: {f}")
    return 0


def _cmd_validate(args) -> int:
    from .sweep.plan import load_config, make_plan

    file = find_experiment(args.file)
    cfg = load_config(file)
    plan = make_plan(cfg, source=file)
    print(f"{file}: valid. {plan.n_points} points in {len(plan.groups)} compiled group(s); "
          f"simulator {cfg.simulator.kind}; swept: {', '.join(plan.axes) or 'nothing'}")
    return 0


def _cmd_plot(args) -> int:
    from .sweep.plan import ConfigError, config_from_dict
    from .sweep.plots import plot_run
    from .sweep.store import load_run
    import yaml

    import warnings

    from .sweep.store import IncompleteRunWarning

    run_dir = Path(args.run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteRunWarning)
        try:
            ds = load_run(run_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if "incomplete" in ds.attrs:
        raise ConfigError(f"{run_dir}: the run is incomplete ({ds.attrs['incomplete']}); finish it with "
                          f"`meanfield run {run_dir / 'config.yaml'} --out {run_dir}`, then plot")
    if "config_yaml" not in ds.attrs:
        raise ConfigError(f"{run_dir}: not a meanfield results file (no config_yaml attribute)")
    cfg = config_from_dict(yaml.safe_load(ds.attrs["config_yaml"]), source=str(run_dir / "config.yaml"), check_files=False)
    for f in plot_run(ds, cfg, run_dir / "figures"):
        print(f"figure: {f}")
    return 0


def _description(f: Path) -> str:
    """The first line of a YAML file's `description` field ('' without one)."""
    import yaml

    try:
        desc = (yaml.safe_load(f.read_text()) or {}).get("description", "")
    except yaml.YAMLError:
        return "(invalid YAML)"
    return desc.strip().splitlines()[0] if isinstance(desc, str) and desc.strip() else ""


def _list_files(dirs, tag: str = "") -> bool:
    """Print each YAML file of `dirs` (the first of a name wins) with its description; whether any was found."""
    seen = set()
    for d in dirs:
        for f in sorted(d.glob("*.yaml")):
            if f.name not in seen:
                seen.add(f.name)
                print(f"{f.stem:28} {tag}{_description(f)}")
                print(f"{'':28} {f}")
    return bool(seen)


def _cmd_list(args) -> int:
    if not _list_files(EXPERIMENTS_DIRS):
        print("no shipped experiments found (looked in: " + ", ".join(map(str, EXPERIMENTS_DIRS)) + ")")
    from .train.cli import TRAINING_DIRS

    _list_files(TRAINING_DIRS, "(meanfield train) ")
    return 0


def _cmd_figures(args) -> int:
    import time

    from .figures import FIGURES, render

    if args.list or not args.names:
        for name, (_, desc) in FIGURES.items():
            print(f"{name:24} {desc}")
        if not args.names:
            print("\nmeanfield figures NAME [NAME ...] | all  [--quick] [--out DIR]")
        return 0
    names = list(FIGURES) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        print(f"error: unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        try:
            res = render(name, args.out, quick=args.quick)
        except Exception as exc:  # noqa: BLE001 - one broken figure must not stop the others
            print(f"error: {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        ref = "" if res.expected is None else f" (expected {res.expected:g} +- {res.tolerance:g})"
        print(f"{name}: {res.key} = {res.value:.6g}{ref} -> {'ok' if res.ok else 'CHECK FAILED'}; "
              f"{time.perf_counter() - t0:.0f} s")
        for f in res.files:
            print(f"  {f}")
        if not res.ok:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meanfield", description="Transformers as continuous-depth dynamical systems.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a YAML sweep (resumes an interrupted run of the same config)")
    p.add_argument("file", help="experiment YAML, or the name of a shipped one (see `meanfield list`)")
    p.add_argument("--out", help="output directory (default: output.dir, else runs/<name>)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted run (the default when the output holds the same config)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output directory first")
    p.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    d = p.add_argument_group("several processes (jax.distributed; see the README's 'Clusters' section)")
    d.add_argument("--distributed", action="store_true",
                   help="start jax.distributed: auto-detect SLURM / Open MPI / TPU pods, or use the three flags below "
                        "(or MEANFIELD_COORDINATOR, MEANFIELD_NUM_PROCESSES, MEANFIELD_PROCESS_ID)")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    d.add_argument("--num-processes", metavar="N", help="number of processes")
    d.add_argument("--process-id", metavar="I", help="this process's index, 0..N-1")
    d.add_argument("--init-timeout", metavar="S", help="seconds to wait for the coordinator (default 120; "
                   "MEANFIELD_INIT_TIMEOUT)")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("merge", help="merge the chunks of a run whose workers stopped before merging")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_merge)
    p = sub.add_parser("validate", help="check a YAML file and print its sweep plan; writes nothing")
    p.add_argument("file")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("plot", help="redraw the figures of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_plot)
    p = sub.add_parser("list", help="list the shipped experiments")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("figures", help="reproduce the papers' figures (PNG + PDF + plotted numbers as JSON)")
    p.add_argument("names", nargs="*", help="figure names, or `all` (none: list them)")
    p.add_argument("--quick", action="store_true", help="small sizes (each figure in well under a few minutes)")
    p.add_argument("--out", default="figures", help="output directory (default: figures/)")
    p.add_argument("--list", action="store_true", help="list the catalogued figures")
    p.set_defaults(func=_cmd_figures)
    from .checkpoints.cli import add_parser as add_weights_parser
    from .train.cli import add_parser as add_train_parser

    add_weights_parser(sub)
    add_train_parser(sub)
    return parser


XLA_SAFE_FLAG = "--xla_cpu_multi_thread_eigen=false"


def _avoid_eigen_pool_wedge() -> None:
    """Run XLA's CPU Eigen work single-threaded unless the user chose otherwise (XLA_FLAGS).

    XLA's CPU runtime can park every worker and never return (0% CPU; reported upstream with this
    flag as the remedy, e.g. PyAutoFit #1530). Here: large Gaussian sweeps (chunks of ~8,000 points)
    hung in 2 of 2 runs with the multi-threaded pool and in 1 of 3 with this flag, so it lowers the
    risk without removing it; the sweep's stall watch names the remedy (stop and rerun: finished
    chunks are kept). The hang's cause was found later (`meanfield._symeig`: jaxlib's batched LAPACK
    eigensolver waits on the intra-op pool from inside it), which this flag does not touch; it is
    kept until runs without it are measured again. Measured cost on the ensemble integrator: about
    20% on 256 small particle systems, none on moment sweeps. Must run before JAX creates its CPU
    client.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_SAFE_FLAG}".strip()


MAX_CPU_DEVICES = 8
"""The most CPU devices `meanfield run` and `meanfield train` create (one per core)."""


def _cpu_devices() -> None:
    """Show JAX one CPU device per core this process may use (at most 8; its CPU affinity, so
    `taskset` counts) for `meanfield run` and `meanfield train`, unless XLA_FLAGS already sets the
    count. XLA runs one program's kernels on one core: split over one device per core, a sweep's
    chunk runs one ensemble pool per device (`sweep.schedule`) and a training step computes its
    batch in parts (`train.loop.data_devices`). Measured on 2 cores (benchmarks/README.md): 10^5
    Gaussian points 1.3x (49.3 -> 38.7 s), a batch of 16 sequences 1.2-1.3x; groups whose program calls
    LAPACK stay on one device (`sweep.schedule._Compiled`). No effect on GPU or TPU runs. Launch
    several processes on one machine with `--xla_force_host_platform_device_count=1` in XLA_FLAGS
    (or each under `taskset`). Must run before JAX creates its CPU client."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(cores, MAX_CPU_DEVICES)
    if n > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _os_error_line(exc: OSError) -> str:
    """'cannot write or read PATH: REASON' (the run's writes name their file: `store._atomic`)."""
    reason = exc.strerror or " ".join(str(exc).split())[:200]
    return f"cannot write or read {exc.filename}: {reason}" if exc.filename else f"input/output failed: {reason}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "train":  # training is large matmuls: it needs the threaded pool (and never wedged)
        _avoid_eigen_pool_wedge()
    else:  # and YNNPACK's fusions (meanfield._xla_flags.unset_cpu_defaults)
        from ._xla_flags import unset_cpu_defaults

        unset_cpu_defaults()
    if args.command in ("run", "train"):
        _cpu_devices()
    import matplotlib

    matplotlib.use("Agg")  # the command line only draws to files; the library leaves the backend alone

    code = _dispatch(args)
    if getattr(args, "distributed", False):
        import jax

        if jax.distributed.is_initialized():
            from .sweep import distributed

            distributed.leave(code)  # skip JAX's shutdown barrier: it aborts when a peer died
    return code


def _dispatch(args) -> int:
    """Run the command; bad input is exit 2, Ctrl-C 130, an I/O failure 1, each one line on stderr."""
    from .sweep.distributed import DistributedError
    from .sweep.plan import ConfigError

    try:
        with compile_cache() if _computes(args) else contextlib.nullcontext():
            return args.func(args)
    except (ConfigError, DistributedError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from .sweep.run import RunInterrupted

        if isinstance(exc, RunInterrupted):
            print(f"\ninterrupted: {exc.done} of {exc.total} points are saved in {exc.run_dir}; run the same "
                  "command again to resume", file=sys.stderr)
        elif args.command == "train":
            print("\ninterrupted: rerun the same command with --resume to continue from the newest checkpoint",
                  file=sys.stderr)
        else:
            print("\ninterrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, read-only or vanished output: the path and the reason, one line
        print(f"error: {_os_error_line(exc)}; finished chunks (if any) are kept", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
