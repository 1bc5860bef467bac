"""`meanfield train`: training throughput against the machine's matmul throughput, and the cost of
telemetry and of the spectral guard, all timed in this one process.

What it measures, for the experiment's model (d_model 128, 4 layers, 4 heads, GELU, pre-LN, byte
vocabulary, seq_len 128, batch 16; `experiments/training_telemetry.yaml`) and a wider one (d_model 256):

1. Matmul floor: a jitted float32 (1024 x 1024) @ (1024 x 1024) product, best of 5 rounds of 10;
   also the model's own MLP shape (2048 x d) @ (d x 4d).
2. Training throughput: the updates after step 50 of the K = 50 run below, from its `train_seconds`
   (telemetry excluded, the step's compile too); FLOPs counted as 6 x parameters x tokens per step
   (attention's T^2 terms not counted). The batch is split over one CPU device per core, as
   `meanfield train` does (`train.loop.data_devices`); the same run on one device is the baseline.
   Target: >= 50% of the 1024^2 matmul throughput. Baseline in this process: the same run with the
   residual cotangents left to XLA's fusion (`lm.materialized_cotangent` replaced by the identity).
3. Telemetry overhead at K = 50 (rho both ways, linear erank, hidden eranks, validation loss every 50
   steps; Lyapunov spectrum every 100): wall time of the same run with K = 50 against K = steps, the
   telemetry programs compiled beforehand. Target: <= 10%.
4. Spectral guard (every step, band 0.5-2): wall time against the same run without it (reported). A
   guarded run keeps one device (`train`: its SVDs on every device cost more than the split gains).

    python benchmarks/bench_train.py [--steps N] [--quick]

Run it on an otherwise idle machine: two cores shared with anything else move every ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from meanfield._xla_flags import unset_cpu_defaults
from meanfield.cli import _cpu_devices

unset_cpu_defaults()  # YNNPACK fusions on, as `meanfield train` (before JAX starts its CPU client)
_cpu_devices()  # one CPU device per core, as `meanfield train`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from meanfield.train import train  # noqa: E402
from meanfield.train.config import train_config_from_dict  # noqa: E402
from meanfield.train.loop import data_devices  # noqa: E402


def matmul_gflops(m: int, k: int, n: int, rounds: int = 5, reps: int = 10) -> float:
    a = jnp.ones((m, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = np.inf
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * m * k * n / best / 1e9


def config(d: int, steps: int, every: int, lyapunov_every: int, guard: bool = False):
    return train_config_from_dict({
        "name": "bench", "steps": steps, "seed": 0,
        "data": {"seq_len": 128, "batch_size": 16},
        "model": {"d_model": d, "n_layers": 4, "num_heads": 4},
        "telemetry": {"every": every, "lyapunov_every": lyapunov_every},
        "checkpoint": {"every": 10 * steps},
        "guard": {"enabled": guard},
    })


def params_of(d: int) -> int:
    from flax import nnx

    from meanfield.train.lm import LanguageModel

    cfg = config(d, 1, 1, 0)
    model = LanguageModel(cfg.model, 128, rngs=nnx.Rngs(0))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def timed_run(cfg, root: Path, name: str, devices: int | None = None, marks: bool = True):
    """`train` timed whole; `marks=False`: with `materialized_cotangent` replaced by the identity."""
    from meanfield.train import lm

    kept = lm.materialized_cotangent
    if not marks:
        lm.materialized_cotangent = lambda x: x
    try:
        t = time.perf_counter()
        ds = train(cfg, root / name, quiet=True, devices=devices)
        return time.perf_counter() - t, ds
    finally:
        lm.materialized_cotangent = kept


def step_seconds(ds, steps: int) -> float:
    """Seconds per update after the record at step 50 (the step's compile excluded)."""
    ts = ds.train_seconds.values
    return float(ts[-1] - ts[1]) / (steps - int(ds.step.values[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="60 steps, d_model 128 only")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    steps = 60 if args.quick else args.steps
    widths = (128,) if args.quick else (128, 256)
    out: dict = {"steps": steps}
    floor = matmul_gflops(1024, 1024, 1024)
    out["matmul_gflops_1024"] = floor
    print(f"matmul floor: (1024 x 1024)^2 float32 {floor:.1f} GFLOP/s")
    split = len(data_devices(16))
    out["data_devices"] = split
    print(f"each batch of 16 split over {split} CPU device(s) ({len(jax.local_devices())} shown to JAX)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in widths:
            mlp = matmul_gflops(2048, d, 4 * d)
            n_params = params_of(d)
            # warm-up: compiles the telemetry programs of this shape (the step compiles in every run)
            train(config(d, 2, 1, 1), root / f"warm{d}", quiet=True)
            wall_off, ds_off = timed_run(config(d, steps, steps, 0), root, f"off{d}")
            wall_on, ds_on = timed_run(config(d, steps, 50, 100), root, f"on{d}")
            wall_guard, ds_guard = timed_run(config(d, steps, steps, 0, guard=True), root, f"guard{d}")
            _, ds_one = timed_run(config(d, steps, 50, 0), root, f"one{d}", devices=1)
            _, ds_plain = timed_run(config(d, steps, 50, 0), root, f"plain{d}", marks=False)
            per_step_plain = step_seconds(ds_plain, steps)
            per_step = step_seconds(ds_on, steps)
            per_step_one = step_seconds(ds_one, steps)
            flops = 6 * n_params * 16 * 128
            gflops = flops / per_step / 1e9
            overhead = wall_on / wall_off - 1
            guard_cost = wall_guard / wall_off - 1
            tel = ds_on.telemetry_seconds.values[1:]
            row = dict(d_model=d, params=n_params, matmul_mlp_shape_gflops=mlp, step_ms=per_step * 1e3,
                       step_ms_one_device=per_step_one * 1e3, step_ms_unmarked=per_step_plain * 1e3,
                       train_gflops=gflops, fraction_of_floor=gflops / floor, wall_no_telemetry_s=wall_off,
                       wall_telemetry_k50_s=wall_on, telemetry_overhead=overhead, wall_guard_s=wall_guard,
                       guard_overhead=guard_cost, telemetry_record_s=float(np.mean(tel)),
                       val_loss_no_guard=float(ds_off.val_loss[-1]), val_loss_guard=float(ds_guard.val_loss[-1]))
            out[f"d{d}"] = row
            print(f"\nd_model {d}: {n_params:,} parameters, {steps} steps of 16 x 128 tokens")
            print(f"  matmul at the MLP's shape (2048 x {d}) @ ({d} x {4 * d}): {mlp:.1f} GFLOP/s")
            print(f"  training: {per_step * 1e3:.0f} ms/step (after step 50), {gflops:.1f} GFLOP/s "
                  f"(6 N D) = {gflops / floor:.0%} of the 1024^2 matmul floor  "
                  f"[target >= 50%: {'met' if gflops / floor >= 0.5 else 'NOT met'}]")
            print(f"  without the cotangent marks (the rest as now): {per_step_plain * 1e3:.0f} ms/step "
                  f"({flops / per_step_plain / 1e9 / floor:.0%}); the marks make it {per_step_plain / per_step:.2f}x faster")
            print(f"  the same on one device: {per_step_one * 1e3:.0f} ms/step ({flops / per_step_one / 1e9:.1f} GFLOP/s, "
                  f"{flops / per_step_one / 1e9 / floor:.0%}); the split is {per_step_one / per_step:.2f}x faster")
            print(f"  telemetry every 50 steps (+ Lyapunov every 100): wall {wall_on:.1f} s vs {wall_off:.1f} s without "
                  f"-> {overhead:+.1%} (one record {np.mean(tel):.2f} s)  "
                  f"[target <= 10%: {'met' if overhead <= 0.10 else 'NOT met'}]")
            print(f"  spectral guard every step (one device): wall {wall_guard:.1f} s -> {guard_cost:+.1%}; final val loss "
                  f"{row['val_loss_guard']:.4f} with, {row['val_loss_no_guard']:.4f} without")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
