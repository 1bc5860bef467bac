r"""Core speed and memory benchmarks for `meanfield`, reported as ratios to same-process baselines.

Run from the repository root:

    python benchmarks/bench_core.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_core.py --quick    # smaller, faster variant
    python benchmarks/bench_core.py --json out.json

Methodology
-----------
Absolute times on a shared machine mean little, so every speed number is a ratio against a
baseline timed *in the same process, in the same rounds*:

- Every JAX function is jitted and called once before timing (compilation and first-run
  costs excluded); results are forced with `jax.block_until_ready`.
- Candidates and baselines are timed *interleaved*: each round times every case once (a
  case may call its function several times and divide), and the reported time of a case is
  the median over rounds. Load from other processes therefore hits candidate and baseline
  alike, and the median discards outlier rounds.
- Everything is float32 (JAX's default dtype; the NumPy references use float32 arrays).

Benchmarks
----------
1. **RK4 step, n = 1024, d = 64**, softmax attention (beta = 1) + two-layer exact-GELU MLP
   (hidden h = 4d), `mf.Model.random(key, 64, mlp="two_layer", activation="gelu")`.
   Measured path: ONE jitted call of
   `mf.simulate_particles(model, X, t1=K*dt, solver="rk4", dt0=dt, n_save=2)` doing K fixed
   RK4 steps (the library's diffrax path); time per step = call time / steps taken (read from
   the solution). A hand-written jitted step (4 `mf.token_velocity` evaluations combined with
   the RK4 weights) is timed alongside as a cross-check of the diffrax overhead.
   FLOPs are counted analytically per field evaluation, matmuls only (multiply-add = 2):
   QKV projections 2*n*d*(2k + d) (k = d: 6*n*d^2), logits 2*n^2*k, weights @ V 2*n^2*d,
   MLP 2*2*n*d*h (h = 4d: 16*n*d^2). One RK4 step = 4 evaluations. The n^2 exponentials of
   the softmax (and the n*h erf of the GELU) are NOT counted as flops; they are reported
   separately. Achieved GFLOP/s is compared with `jnp.matmul` of (1024x1024)@(1024x64)
   (the shape of weights @ V) and of a square 1024^3 product, both timed in the same rounds.
   Target: >= 50% of matmul throughput (checked against each matmul separately).
2. **Same RK4 step in plain NumPy** (float32; same maths: softmax with max-subtraction,
   exact GELU x*Phi(x) via `scipy.special.erf`, or, when SciPy is not importable, the
   Abramowitz-Stegun 7.1.26 erf, |error| <= 1.5e-7, and the output says so).
   Ratio = NumPy time / JAX time (the `simulate_particles` path of 1). Target: >= 2x.
   Contention check: NumPy and JAX matmuls of (n x d)@(d x d) and (n x n)@(n x d) are timed in
   the same rounds; if NumPy's are > 1.5x slower, its multi-threaded BLAS was starved by other
   processes (NumPy then slows far more than XLA) and the ratio is flagged as inflated.
3. **Batch of 256 small systems** (n = 32, d = 3, softmax + GELU MLP, `norm="sphere"`), 100
   RK4 steps each: ONE jitted `jax.vmap` of `simulate_particles` over stacked models
   (`jax.tree.map(lambda *xs: jnp.stack(xs), *models)`) and initial conditions, vs a Python
   loop over systems running the NumPy RK4 of 2 (with the sphere normalisation and tangent
   projection of `mf.token_velocity`). Ratio = NumPy loop time / JAX time. Target: >= 100x.
4. **Peak memory of one RK4 step at n = 65,536, d = 16** (the default `attention=mf.Auto()` picks the
   blocked, online-softmax attention above 4096 tokens). Two fresh subprocesses: "base"
   imports jax + meanfield and builds the model and tokens; "step" does the same, compiles
   and runs one `simulate_particles` RK4 step. Each reports its own peak RSS (VmHWM /
   `ru_maxrss`); the step's memory is peak(step) - peak(base), i.e. compilation + execution.
   Where Linux allows resetting the high-water mark (`/proc/self/clear_refs`), the step
   process also reports the execution-only peak above its RSS just before the call.
   Target: < 2 GiB. `--quick` uses n = 16,384.

Every comparison with a NumPy reference also checks that both sides computed the same
numbers (max abs difference printed). Missed targets are reported as missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import meanfield as mf

try:  # erf for the NumPy reference's exact GELU
    from scipy.special import erf as _scipy_erf
except ImportError:  # pragma: no cover - SciPy is usually present
    _scipy_erf = None

GIB = 1024**3
MIB = 1024**2
CONTENTION_THRESHOLD = 1.5
"""NumPy matmul time / JAX matmul time above which benchmark 2 is flagged as contended."""


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    quick: bool
    # 1 + 2: one RK4 step at n = 1024, d = 64
    n: int = 1024
    d: int = 64
    dt: float = 2.0**-6  # exact in binary: K * dt hits t1 exactly, so exactly K steps
    steps_per_call: int = 10
    rounds: int = 9
    # 3: batch of small systems
    batch: int = 256
    batch_n: int = 32
    batch_d: int = 3
    batch_steps: int = 100
    batch_dt: float = 2.0**-4
    batch_rounds: int = 3
    # 4: memory
    mem_n: int = 65_536
    mem_d: int = 16

    @classmethod
    def make(cls, quick: bool) -> "Config":
        if quick:
            return cls(quick=True, steps_per_call=5, rounds=5, batch_steps=25, batch_rounds=3, mem_n=16_384)
        return cls(quick=False)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    """A function to time; `number` calls per round (time divided by `number`)."""

    fn: Callable[[], Any]
    number: int = 1
    warmup: bool = True


@dataclass
class Timing:
    median: float
    min: float
    max: float
    rounds: int

    def describe(self) -> str:
        return f"{_fmt_time(self.median)} (min {_fmt_time(self.min)}, max {_fmt_time(self.max)}, {self.rounds} rounds)"


def measure(cases: dict[str, Case], rounds: int) -> dict[str, Timing]:
    """Median seconds per call of each case, timing all cases interleaved round by round."""
    for case in cases.values():
        if case.warmup:
            jax.block_until_ready(case.fn())  # compile + first run
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            t0 = time.perf_counter()
            out = None
            for _ in range(case.number):
                out = case.fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / case.number)
    return {
        name: Timing(statistics.median(s), min(s), max(s), len(s)) for name, s in samples.items()
    }


def _fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


# ---------------------------------------------------------------------------------------------
# FLOP model
# ---------------------------------------------------------------------------------------------
def field_flops(n: int, d: int, k: int, h: int) -> dict[str, int]:
    """Matmul flops (multiply-add = 2) of one softmax-attention + two-layer-MLP field evaluation."""
    return {
        "qkv_projections": 2 * n * d * (2 * k + d),
        "logits": 2 * n * n * k,
        "weights_at_v": 2 * n * n * d,
        "mlp": 2 * 2 * n * d * h,
    }


# ---------------------------------------------------------------------------------------------
# NumPy reference (same maths as meanfield.token_velocity for softmax + two-layer MLP)
# ---------------------------------------------------------------------------------------------
_SQRT_HALF = np.float32(1.0 / math.sqrt(2.0))

# Abramowitz & Stegun 7.1.26: |error| <= 1.5e-7, below float32 resolution of erf near 1.
_AS_P = np.float32(0.3275911)
_AS_A = tuple(np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))


def _erf_as(x: np.ndarray) -> np.ndarray:
    """SciPy-free float32 erf (Abramowitz & Stegun 7.1.26), used only when SciPy is missing."""
    ax = np.abs(x)
    t = 1.0 / (1.0 + _AS_P * ax)
    a1, a2, a3, a4, a5 = _AS_A
    poly = ((((a5 * t + a4) * t + a3) * t + a2) * t + a1) * t
    return np.copysign(1.0 - poly * np.exp(-ax * ax), x)


ERF = _scipy_erf if _scipy_erf is not None else _erf_as
ERF_NAME = "scipy.special.erf" if _scipy_erf is not None else "Abramowitz-Stegun 7.1.26 erf (SciPy missing)"


def np_gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU x * Phi(x), as `jax.nn.gelu(x, approximate=False)` in meanfield's MLP."""
    return 0.5 * x * (1.0 + ERF(x * _SQRT_HALF))


def numpy_params(model) -> dict[str, np.ndarray]:
    names = ("Q", "K", "V", "beta", "a_attn", "W1", "b1", "W2", "b2", "a_mlp")
    return {name: np.asarray(getattr(model, name)) for name in names}


def np_velocity(p: dict[str, np.ndarray], X: np.ndarray, *, sphere: bool) -> np.ndarray:
    """Softmax attention + two-layer GELU MLP, optionally on the sphere (as mf.token_velocity)."""
    if sphere:
        X = X / np.linalg.norm(X, axis=-1, keepdims=True)
    q = (X @ p["Q"].T) * p["beta"]
    k = X @ p["K"].T
    v = X @ p["V"].T
    w = q @ k.T  # (n, n) logits; softmax in place
    w -= w.max(axis=1, keepdims=True)
    np.exp(w, out=w)
    w /= w.sum(axis=1, keepdims=True)
    attn = w @ v
    mlp = np_gelu(X @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"]
    out = p["a_attn"] * attn + p["a_mlp"] * mlp
    if sphere:
        out = out - np.sum(X * out, axis=-1, keepdims=True) * X
    return out


def np_rk4_step(p, X, dt, *, sphere: bool) -> np.ndarray:
    f = lambda Y: np_velocity(p, Y, sphere=sphere)  # noqa: E731
    k1 = f(X)
    k2 = f(X + (dt / 2) * k1)
    k3 = f(X + (dt / 2) * k2)
    k4 = f(X + dt * k3)
    return X + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


# ---------------------------------------------------------------------------------------------
# JAX side
# ---------------------------------------------------------------------------------------------
def make_model(key, d: int, *, norm: str = "none"):
    """Softmax attention + two-layer exact-GELU MLP (hidden 4d), float32."""
    return mf.Model.random(key, d, mlp="two_layer", activation="gelu", norm=norm, dtype=jnp.float32)


def library_rk4(model, X, *, dt: float, steps: int):
    """`steps` fixed RK4 steps through `mf.simulate_particles`; returns (X(t1), steps taken)."""
    sol = mf.simulate_particles(model, X, steps * dt, solver="rk4", dt0=dt, n_save=2)
    return sol.xs[-1], sol.num_steps


def hand_rk4_step(model, X, *, dt: float):
    """One classical RK4 step from 4 `mf.token_velocity` evaluations."""
    f = lambda Y: mf.token_velocity(model, Y)  # noqa: E731
    k1 = f(X)
    k2 = f(X + (dt / 2) * k1)
    k3 = f(X + (dt / 2) * k2)
    k4 = f(X + dt * k3)
    return X + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    benchmark: str
    measured: str
    baseline: str
    ratio: float | None
    ratio_text: str
    target: str
    met: bool | None
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# 1 + 2: one RK4 step at n = 1024, d = 64; matmul and NumPy baselines
# ---------------------------------------------------------------------------------------------
def bench_step(cfg: Config) -> list[Row]:
    n, d, dt, K = cfg.n, cfg.d, cfg.dt, cfg.steps_per_call
    k, h = d, 4 * d
    model = make_model(jax.random.key(0), d)
    X = jax.random.normal(jax.random.key(1), (n, d), jnp.float32) / np.sqrt(d)

    lib = jax.jit(lambda m, x: library_rk4(m, x, dt=dt, steps=K))
    hand = jax.jit(lambda m, x: hand_rk4_step(m, x, dt=dt))
    matmul = jax.jit(jnp.matmul)
    A = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    B = jax.random.normal(jax.random.key(3), (n, d), jnp.float32)

    _, steps_taken = jax.block_until_ready(lib(model, X))
    steps_taken = int(steps_taken)
    if steps_taken != K:
        print(f"  note: simulate_particles took {steps_taken} steps for t1 = {K} * dt (expected {K})")

    p, Xn = numpy_params(model), np.asarray(X)
    An, Bn, Qn = np.asarray(A), np.asarray(B), np.asarray(model.Q)
    dt32 = np.float32(dt)
    np_step = lambda: np_rk4_step(p, Xn, dt32, sphere=False)  # noqa: E731

    # same numbers? one library step vs one NumPy step
    one = jax.jit(lambda m, x: library_rk4(m, x, dt=dt, steps=1)[0])
    diff = float(np.max(np.abs(np.asarray(one(model, X)) - np_step())))
    diff_hand = float(np.max(np.abs(np.asarray(one(model, X)) - np.asarray(hand(model, X)))))

    print(f"[1/2] RK4 step, n = {n}, d = {d}: timing {cfg.rounds} interleaved rounds ...", flush=True)
    t = measure(
        {
            "library": Case(lambda: lib(model, X)[0]),
            "hand": Case(lambda: hand(model, X), number=3),
            "numpy": Case(np_step, warmup=True),
            "matmul_nxnxd": Case(lambda: matmul(A, B), number=10),
            "matmul_n3": Case(lambda: matmul(A, A), number=3),
            "numpy_matmul_nxnxd": Case(lambda: An @ Bn, number=10),
            "matmul_nxdxd": Case(lambda: matmul(X, model.Q), number=20),
            "numpy_matmul_nxdxd": Case(lambda: Xn @ Qn, number=20),
        },
        cfg.rounds,
    )
    t_lib = t["library"].median / steps_taken
    t_hand = t["hand"].median

    # where the time of one field evaluation goes (informational)
    vel = jax.jit(lambda m, x: mf.token_velocity(m, x))
    attn = jax.jit(lambda m, x: mf.attention(m, x))
    mlp = jax.jit(lambda m, x: mf.mlp(m, x))
    L = jax.random.normal(jax.random.key(4), (n, n), jnp.float32)
    softmax = jax.jit(lambda z: jax.nn.softmax(z, axis=-1))
    parts = measure(
        {
            "field_eval": Case(lambda: vel(model, X), number=5),
            "attention": Case(lambda: attn(model, X), number=5),
            "mlp": Case(lambda: mlp(model, X), number=10),
            "softmax_nxn": Case(lambda: softmax(L), number=10),
        },
        cfg.rounds,
    )

    flops = field_flops(n, d, k, h)
    eval_flops = sum(flops.values())
    step_flops = 4 * eval_flops
    gf = lambda fl, s: fl / s / 1e9  # noqa: E731
    gf_lib, gf_hand = gf(step_flops, t_lib), gf(step_flops, t_hand)
    gf_mm_small = gf(2 * n * n * d, t["matmul_nxnxd"].median)
    gf_mm_square = gf(2 * n**3, t["matmul_n3"].median)

    print(f"  simulate_particles ({K} steps per call): {t['library'].describe()}  -> {_fmt_time(t_lib)} per step")
    print(f"  hand-written jitted RK4 step:            {t['hand'].describe()}")
    print(f"  NumPy RK4 step:                          {t['numpy'].describe()}")
    print(f"  matmul ({n}x{n})@({n}x{d}):            {t['matmul_nxnxd'].describe()}")
    print(f"  matmul ({n}x{n})@({n}x{n}):          {t['matmul_n3'].describe()}")
    print(
        f"  flops per field eval (matmuls): {eval_flops / 1e6:.1f} M "
        + ", ".join(f"{name} {v / 1e6:.1f} M" for name, v in flops.items())
        + f"; plus {n * n / 1e6:.2f} M exp and {n * h / 1e6:.2f} M erf, not counted"
    )
    print(
        f"  GFLOP/s: simulate_particles {gf_lib:.1f}, hand step {gf_hand:.1f}, "
        f"matmul nxnxd {gf_mm_small:.1f}, matmul n^3 {gf_mm_square:.1f}"
    )
    print(
        "  one field eval: "
        + ", ".join(f"{name} {_fmt_time(v.median)}" for name, v in parts.items())
        + f"  (4 evals = {_fmt_time(4 * parts['field_eval'].median)} vs step {_fmt_time(t_lib)})"
    )
    print(f"  max |JAX - NumPy| after one step: {diff:.2e}; |simulate_particles - hand step|: {diff_hand:.2e}")
    # Contention check: on a quiet machine NumPy's BLAS and XLA multiply at similar speeds. If
    # NumPy's matmuls are much slower than XLA's in the same rounds, its BLAS threads were starved
    # (with a core taken by another process, every multi-threaded BLAS call waits for a scheduler
    # slice, several ms, which swamps the small (n, d) @ (d, d) products) and the JAX/NumPy ratio
    # is inflated.
    slow_small = t["numpy_matmul_nxdxd"].median / t["matmul_nxdxd"].median
    slow_large = t["numpy_matmul_nxnxd"].median / t["matmul_nxnxd"].median
    blas_slowdown = max(slow_small, slow_large)
    print(
        f"  contention check, NumPy / JAX matmul time: ({n}x{d})@({d}x{d}) "
        f"{_fmt_time(t['numpy_matmul_nxdxd'].median)} / {_fmt_time(t['matmul_nxdxd'].median)} = {slow_small:.2f}x, "
        f"({n}x{n})@({n}x{d}) {slow_large:.2f}x"
    )
    contended = blas_slowdown > CONTENTION_THRESHOLD
    if contended:
        print(
            f"  WARNING: NumPy's BLAS ran {blas_slowdown:.1f}x slower than XLA's matmul: CPU contention "
            "likely; the JAX/NumPy ratio (2) is inflated in this run"
        )

    common = {
        "n": n, "d": d, "k": k, "h": h, "dt": dt, "steps_per_call": K, "steps_taken": steps_taken,
        "flops_per_field_eval": flops, "flops_per_rk4_step": step_flops,
        "exp_per_field_eval_not_counted": n * n, "erf_per_field_eval_not_counted": n * h,
        "seconds": {name: asdict(v) for name, v in t.items()},
        "seconds_per_step_simulate_particles": t_lib,
        "seconds_per_step_hand": t_hand,
        "gflops": {
            "simulate_particles": gf_lib, "hand_step": gf_hand,
            "matmul_nxnxd": gf_mm_small, "matmul_n3": gf_mm_square,
        },
        "field_eval_breakdown_seconds": {name: asdict(v) for name, v in parts.items()},
        "max_abs_diff_jax_numpy": diff,
        "max_abs_diff_simulate_vs_hand": diff_hand,
    }
    rows = []
    for label, gf_mm, shape in (
        ("nxnxd", gf_mm_small, f"({n}x{n})@({n}x{d})"),
        ("n3", gf_mm_square, f"({n}x{n})@({n}x{n})"),
    ):
        ratio = gf_lib / gf_mm
        rows.append(Row(
            benchmark=f"1 RK4 step n={n} d={d} vs matmul {shape}",
            measured=f"{gf_lib:.1f} GFLOP/s ({_fmt_time(t_lib)}/step)",
            baseline=f"{gf_mm:.1f} GFLOP/s",
            ratio=ratio, ratio_text=f"{ratio:.2f}",
            target=">= 0.50", met=ratio >= 0.5,
            details=common if label == "nxnxd" else {"see": "row 1 (same measurement)"},
        ))
    speedup = t["numpy"].median / t_lib
    rows.append(Row(
        benchmark=f"2 RK4 step n={n} d={d}: JAX vs NumPy",
        measured=f"JAX {_fmt_time(t_lib)}",
        baseline=f"NumPy {_fmt_time(t['numpy'].median)}",
        ratio=speedup, ratio_text=f"{speedup:.2f}x" + (" *" if contended else ""),
        target=">= 2x", met=speedup >= 2.0,
        details={
            "numpy_seconds": asdict(t["numpy"]), "jax_seconds_per_step": t_lib,
            "speedup_vs_hand_step": t["numpy"].median / t_hand,
            "numpy_over_jax_matmul_time": {"nxdxd": slow_small, "nxnxd": slow_large},
            "contention_suspected": contended,
            "numpy_erf": ERF_NAME,
            "max_abs_diff": diff,
        },
    ))
    return rows


# ---------------------------------------------------------------------------------------------
# 3: vmapped batch of small systems vs a NumPy per-system loop
# ---------------------------------------------------------------------------------------------
def bench_batch(cfg: Config) -> Row:
    B, n, d, S, dt = cfg.batch, cfg.batch_n, cfg.batch_d, cfg.batch_steps, cfg.batch_dt
    models = [make_model(jax.random.key(i), d, norm="sphere") for i in range(B)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
    X0 = jnp.stack([mf.sphere_uniform(jax.random.key(10_000 + i), n, d, jnp.float32) for i in range(B)])

    batched = jax.jit(jax.vmap(lambda m, x: library_rk4(m, x, dt=dt, steps=S)))
    out, steps_taken = jax.block_until_ready(batched(stacked, X0))
    steps_taken = int(np.max(np.asarray(steps_taken)))

    params = [numpy_params(m) for m in models]
    X0n = np.asarray(X0)
    dt32 = np.float32(dt)

    last: dict[str, np.ndarray] = {}

    def numpy_loop():
        finals = []
        for p, x in zip(params, X0n):
            for _ in range(S):
                x = np_rk4_step(p, x, dt32, sphere=True)
            finals.append(x)
        last["out"] = np.stack(finals)
        return last["out"]

    print(
        f"[3] batch of {B} systems (n = {n}, d = {d}, sphere), {S} RK4 steps: "
        f"timing {cfg.batch_rounds} interleaved rounds ...", flush=True,
    )
    t = measure(
        {"jax_vmap": Case(lambda: batched(stacked, X0)[0]), "numpy_loop": Case(numpy_loop, warmup=False)},
        cfg.batch_rounds,
    )
    diff = float(np.max(np.abs(np.asarray(out) - last["out"])))
    speedup = t["numpy_loop"].median / t["jax_vmap"].median
    evals = B * S * 4
    print(f"  JAX vmap(simulate_particles): {t['jax_vmap'].describe()}")
    print(f"  NumPy per-system loop:        {t['numpy_loop'].describe()}")
    print(
        f"  per system-field-evaluation: JAX {_fmt_time(t['jax_vmap'].median / evals)}, "
        f"NumPy {_fmt_time(t['numpy_loop'].median / evals)}; max |JAX - NumPy| at t1: {diff:.2e}"
    )
    return Row(
        benchmark=f"3 batch {B}x(n={n} d={d}) x{S} RK4 steps: vmap vs NumPy loop",
        measured=f"JAX {_fmt_time(t['jax_vmap'].median)}",
        baseline=f"NumPy {_fmt_time(t['numpy_loop'].median)}",
        ratio=speedup, ratio_text=f"{speedup:.1f}x",
        target=">= 100x", met=speedup >= 100.0,
        details={
            "batch": B, "n": n, "d": d, "steps": S, "steps_taken": steps_taken, "dt": dt, "norm": "sphere",
            "seconds": {name: asdict(v) for name, v in t.items()},
            "seconds_per_system_field_eval": {name: v.median / evals for name, v in t.items()},
            "max_abs_diff_at_t1": diff,
        },
    )


# ---------------------------------------------------------------------------------------------
# 4: peak memory of one RK4 step at large n, measured in subprocesses
# ---------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux `clear_refs` 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _peak_rss_kib() -> int:
    import resource

    hwm = _proc_status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(kind: str, n: int, d: int) -> None:
    """Subprocess body: build inputs (and for 'step' compile + run one RK4 step); print JSON."""
    t_start = time.perf_counter()
    model = make_model(jax.random.key(0), d)
    X = jax.random.normal(jax.random.key(1), (n, d), jnp.float32) / np.sqrt(d)
    jax.block_until_ready((model, X))
    report: dict[str, Any] = {"kind": kind, "n": n, "d": d}
    if kind == "step":
        dt = 2.0**-6
        fn = jax.jit(lambda m, x: library_rk4(m, x, dt=dt, steps=1))
        t0 = time.perf_counter()
        compiled = fn.lower(model, X).compile()
        report["compile_s"] = time.perf_counter() - t0
        peak_before = _peak_rss_kib()
        rss_before = _proc_status_kib("VmRSS")
        reset = _reset_peak_rss() and rss_before is not None
        t0 = time.perf_counter()
        y, steps = jax.block_until_ready(compiled(model, X))
        report["run_s"] = time.perf_counter() - t0
        report["steps_taken"] = int(steps)
        report["finite"] = bool(np.all(np.isfinite(np.asarray(y))))
        peak_run = _peak_rss_kib()
        if reset:
            report["exec_peak_above_start_kib"] = peak_run - rss_before
            report["peak_rss_kib"] = max(peak_before, peak_run)
        else:
            report["peak_rss_kib"] = peak_run
    else:
        report["peak_rss_kib"] = _peak_rss_kib()
    report["wall_s"] = time.perf_counter() - t_start
    print(json.dumps(report), flush=True)


def _run_memory_child(kind: str, n: int, d: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", kind, "--_n", str(n), "--_d", str(d)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {kind!r} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(cfg: Config) -> Row:
    n, d = cfg.mem_n, cfg.mem_d
    print(f"[4] peak memory of one RK4 step, n = {n}, d = {d} (subprocesses) ...", flush=True)
    base = _run_memory_child("base", n, d)
    step = _run_memory_child("step", n, d)
    own = (step["peak_rss_kib"] - base["peak_rss_kib"]) * 1024
    exec_only = step.get("exec_peak_above_start_kib")
    dense_bytes = 4 * n * n
    print(f"  base process (import + inputs): peak RSS {base['peak_rss_kib'] / 1024:.0f} MiB")
    print(
        f"  step process: peak RSS {step['peak_rss_kib'] / 1024:.0f} MiB; compile {step['compile_s']:.1f} s, "
        f"run {step['run_s']:.1f} s, {step['steps_taken']} step(s), finite output: {step['finite']}"
    )
    print(f"  step's own peak (step - base): {own / MIB:.0f} MiB (compilation + execution)")
    if exec_only is not None:
        print(f"  execution-only peak above pre-call RSS: {exec_only / 1024:.0f} MiB")
    print(f"  (a dense (n, n) float32 logit matrix alone would be {dense_bytes / GIB:.1f} GiB)")
    mode_note = " (quick mode: n reduced from 65,536)" if cfg.quick else ""
    return Row(
        benchmark=f"4 peak memory, one RK4 step n={n} d={d}{mode_note}",
        measured=f"{own / MIB:.0f} MiB",
        baseline=f"base proc {base['peak_rss_kib'] / 1024:.0f} MiB",
        ratio=own / (2 * GIB), ratio_text=f"{own / (2 * GIB):.2f} of 2 GiB",
        target="< 2 GiB", met=(own < 2 * GIB) and bool(step["finite"]),
        details={
            "n": n, "d": d, "base": base, "step": step, "step_own_peak_bytes": own,
            "exec_only_peak_bytes": None if exec_only is None else exec_only * 1024,
            "dense_logits_bytes": dense_bytes,
        },
    )


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def print_table(rows: list[Row]) -> None:
    headers = ("benchmark", "measured", "baseline", "ratio", "target", "met")
    cells = [
        (r.benchmark, r.measured, r.baseline, r.ratio_text, r.target,
         "n/a" if r.met is None else ("YES" if r.met else "NO (missed)")
         + (" *" if r.details.get("contention_suspected") else ""))
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)))


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _fmt_load(load: list[float] | None) -> str:
    return "unavailable" if load is None else " / ".join(f"{x:.2f}" for x in load)


def environment() -> dict[str, Any]:
    import jax

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(dev) for dev in jax.devices()],
        "numpy": np.__version__,
        "scipy_erf": _scipy_erf is not None,
    }
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001 - best effort
        pass
    try:
        import meanfield

        info["meanfield"] = meanfield.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller, faster variant (memory at n = 16,384)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--_memory-child", dest="memory_child", choices=("base", "step"), help=argparse.SUPPRESS)
    parser.add_argument("--_n", dest="child_n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_d", dest="child_d", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        memory_child(args.memory_child, args.child_n, args.child_d)
        return 0

    cfg = Config.make(args.quick)
    env = environment()
    load_start = _loadavg()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    print(f"meanfield core benchmarks ({'quick' if cfg.quick else 'full'} mode)")
    print(
        f"  jax {env['jax']} on {env['jax_backend']} ({', '.join(env['jax_devices'])}), "
        f"{env['cpu_count']} CPUs, numpy {env['numpy']} ({env.get('numpy_blas', '?')}), float32"
    )
    print(f"  load average at start (1/5/15 min): {_fmt_load(load_start)}")
    if _scipy_erf is None:
        print(f"  NOTE: SciPy not importable -> NumPy GELU uses the {ERF_NAME}")

    rows: list[Row] = []
    rows += bench_step(cfg)
    rows.append(bench_batch(cfg))
    rows.append(bench_memory(cfg))
    total = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start  # this process only (memory subprocesses excluded)
    load_end = _loadavg()

    print()
    print_table(rows)
    missed = [r.benchmark for r in rows if r.met is False]
    if any(r.details.get("contention_suspected") for r in rows):
        print(
            f"* NumPy's BLAS ran more than {CONTENTION_THRESHOLD}x slower than XLA's matmul in the same "
            "rounds: CPU contention suspected, this ratio is inflated; rerun on a quiet machine"
        )
    flagged = sum(bool(r.details.get("contention_suspected")) for r in rows)
    print(
        f"\n{len(rows) - len(missed)}/{len(rows)} targets met"
        + (f" ({flagged} flagged *, see above)" if flagged else "")
        + f"; total time {total:.0f} s"
    )
    print(
        f"load average at end: {_fmt_load(load_end)} (this run itself keeps up to "
        f"{os.cpu_count()} cores busy; more means other processes competed for the CPU)"
    )

    if args.json:
        payload = {
            "mode": "quick" if cfg.quick else "full",
            "config": asdict(cfg),
            "environment": env,
            "numpy_erf": ERF_NAME,
            "total_seconds": total,
            "cpu_seconds_main_process": cpu,
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "results": [asdict(r) for r in rows],
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
