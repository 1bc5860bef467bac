"""Two processes on one core each against one process on one core (issue #15).

Workload: the quickstart's model (tokens on S^2, n = 32, d = 3, softmax + GELU MLP, t1 = 20) over
4,096 points (16 spectral ratios, log in [0.05, 20], x 4 beta x 64 seeds; `--seeds 16` gives the
1,024 points of earlier measurements), through `meanfield run`:

- one process pinned to core 0 (`taskset -c 0`);
- two processes under `--distributed` (gloo on 127.0.0.1) pinned to cores 0 and 1.

Each configuration runs twice in fresh processes sharing one compilation cache: the first run fills
the cache (its compile time is reported), the second is timed (wall time of the slowest process,
start to exit). The target: speed-up >= 1.8x. Also printed: the computation's speed-up alone (the
slowest process's work-loop wall time against the single process's), without the fixed cost of
starting a process (importing JAX, planning, loading the compiled programs, the merge and figures),
and the idle fraction of the slowest process from run.json (`load_balance`: 1 - its busy time / its
wall time in the work loop). The ceiling: two independent single-process runs, one per half of the
seeds, pinned to cores 0 and 1 at the same time (no coordination, each its own merge): the most any
split of this sweep over two processes can gain on this machine, two busy cores' mutual slowdown
included. The fixed cost (the slowest process's wall time minus its work loop:
starting Python and JAX, planning, the merge and figures) is printed for each configuration.

    python benchmarks/bench_distributed.py [--quick] [--seeds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TARGET = 1.8


def config(n_ratio: int, quick: bool, n_seed: int = 16, seeds: list | None = None) -> dict:
    return {
        "name": "bench_distributed", "seed": 0,
        "model": {"d": 3, "attention": "softmax", "beta": 1.0, "mlp": "two_layer", "activation": "gelu", "norm": "sphere"},
        "initial": {"kind": "sphere", "n": 16 if quick else 32},
        "simulator": {"kind": "particles", "t1": 10.0 if quick else 20.0, "n_save": 21},
        "observables": ["effective_rank", "rank_one_distance"],
        "sweep": {"grid": {"model.spectral_ratio": {"log": [0.05, 20, n_ratio]}, "model.beta": [1.0, 2.0, 3.0, 4.0],
                           "seed": list(range(4 if quick else n_seed)) if seeds is None else seeds}},
        "plots": {"curves": None},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg_file: Path, out: Path, n_proc: int, env: dict) -> float:
    """Wall seconds until every process has exited (slowest process)."""
    shutil.rmtree(out, ignore_errors=True)
    base = [sys.executable, "-m", "meanfield", "run", str(cfg_file), "--out", str(out), "--quiet"]
    port = free_port()
    t0 = time.perf_counter()
    if n_proc == 1:
        procs = [subprocess.Popen(["taskset", "-c", "0", *base], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    else:
        procs = [subprocess.Popen(["taskset", "-c", str(i), *base, "--distributed", "--coordinator", f"127.0.0.1:{port}",
                                   "--num-processes", str(n_proc), "--process-id", str(i)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(n_proc)]
    for p in procs:
        out_, err = p.communicate()
        if p.returncode:
            sys.exit(f"a process failed ({p.returncode}):\n{err.decode()[-3000:]}")
    return time.perf_counter() - t0


def run_halves(files: list[Path], out: Path, env: dict) -> float:
    """Wall seconds of independent single-process runs, one file per core, started together."""
    t0 = time.perf_counter()
    procs = []
    for i, f in enumerate(files):
        shutil.rmtree(out / str(i), ignore_errors=True)
        procs.append(subprocess.Popen(["taskset", "-c", str(i), sys.executable, "-m", "meanfield", "run", str(f), "--out",
                                       str(out / str(i)), "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            sys.exit(f"a process failed ({p.returncode}):\n{err.decode()[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 points, n = 16, t1 = 10 (a smoke test; no target)")
    ap.add_argument("--seeds", type=int, default=64, help="seeds per (ratio, beta): points = 64 x seeds")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        sys.exit("needs taskset and at least 2 cores")
    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed-"))
    cfg = config(4 if args.quick else 16, args.quick, args.seeds)
    n_points = 4 * 4 * 4 if args.quick else 16 * 4 * args.seeds
    f = tmp / "bench.yaml"
    f.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, MEANFIELD_CACHE_DIR=str(tmp / "cache"), JAX_PLATFORMS="cpu")
    res = {"points": n_points}
    for n in (1, 2):
        cold = run(f, tmp / f"p{n}", n, env)
        warm = run(f, tmp / f"p{n}", n, env)
        info = json.loads((tmp / f"p{n}" / "run.json").read_text())
        res[f"{n}_process"] = {"cold_s": round(cold, 2), "warm_s": round(warm, 2), "load_balance": info.get("load_balance"),
                               "processes": info.get("processes")}
        print(f"{n} process(es), {n} core(s): first run {cold:.1f} s (fills the compile cache), second {warm:.1f} s",
              flush=True)
    n_seed = 4 if args.quick else args.seeds
    halves = []
    for i, part in enumerate((range(0, n_seed // 2), range(n_seed // 2, n_seed))):
        halves.append(tmp / f"half{i}.yaml")
        halves[-1].write_text(yaml.safe_dump(config(4 if args.quick else 16, args.quick, seeds=list(part))))
    run_halves(halves, tmp / "halves", env)  # fills the cache
    ceiling_s = run_halves(halves, tmp / "halves", env)
    ceiling = res["1_process"]["warm_s"] / ceiling_s
    res["ceiling"] = {"independent_halves_s": round(ceiling_s, 2), "speedup": round(ceiling, 3)}
    print(f"2 independent processes, one half of the seeds each, 2 cores: second run {ceiling_s:.1f} s", flush=True)
    speedup = res["1_process"]["warm_s"] / res["2_process"]["warm_s"]
    lb = res["2_process"]["load_balance"] or {}
    def loop(p):  # the computation: busy time without compiling (or loading compiled programs)
        return p["busy_seconds"] - p.get("compile_seconds", 0.0)

    one_loop = max(loop(p) for p in res["1_process"]["processes"])
    two_loop = max(loop(p) for p in res["2_process"]["processes"])
    compute_speedup = one_loop / two_loop
    res["speedup"] = round(speedup, 3)
    res["compute_speedup"] = round(compute_speedup, 3)
    print(f"\n{n_points} particle points: 2 processes on 2 cores vs 1 on 1 core: {speedup:.2f}x "
          f"(target >= {TARGET}x: {'met' if speedup >= TARGET else 'NOT met'}{'; --quick: not judged' if args.quick else ''})")
    print(f"  the ceiling (two independent half runs side by side vs one process): {ceiling:.2f}x; "
          f"--distributed reaches {speedup / ceiling:.0%} of it")
    print(f"  the computation alone (the busiest process, compile time excluded): {compute_speedup:.2f}x "
          f"({one_loop:.1f} s -> {two_loop:.1f} s)")
    for p in res["2_process"]["processes"] or []:
        print(f"  process {p['process']}: {p['points']} points in {p['chunks']} chunks, busy {p['busy_seconds']:.1f} s "
              f"(of which compiling {p['compile_seconds']:.1f} s) of {p['wall_seconds']:.1f} s "
              f"(idle {100 * p['idle_fraction']:.1f}%)")
    print(f"  idle fraction of the slowest process: {100 * lb.get('idle_fraction_of_slowest', float('nan')):.1f}%")
    for n in (1, 2):  # what no parallelism can shorten: outside the work loop
        r = res[f"{n}_process"]
        fixed = r["warm_s"] - max(p["wall_seconds"] for p in r["processes"])
        r["fixed_s"] = round(fixed, 2)
        print(f"  {n} process(es): {fixed:.1f} s of {r['warm_s']:.1f} s outside the work loop "
              "(start-up, planning, merge, figures)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
