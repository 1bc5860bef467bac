"""XLA CPU options that `import meanfield` sets before JAX creates its CPU client.

**YNNPACK reduce fusions off** (`--xla_cpu_experimental_ynn_fusion_type=`). jaxlib 0.10 hands XLA
CPU's reduce fusions to YNNPACK. Our vector fields are chains of small batched products written as
multiply-and-sum (`meanfield._linalg.matmul`), and YNNPACK runs them several times slower than XLA's
own loop emitter. Profiled on one 5,000-point chunk of the d = 4 Gaussian sweep (`jax.profiler`, one
device): one such fusion, (256, 4, 4, 4) products summed over one axis, took 0.2 ms per call and half
of the chunk's time. Measured in one process (benchmarks/README.md, bench_ensemble):

- the chunk: 1.8 s -> 0.77 s;
- the batched Gaussian field: 649 -> 115 ns per lane-evaluation;
- the consensus field (n = 32, d = 3): 6.6 -> 2.9 us per system-evaluation.

Larger states gain from YNNPACK: a 64-token, d = 8 particle field (softmax + GELU, 256 lanes)
runs at 5.2-5.8 us per lane-evaluation with its reduce fusions against 11.6-12.2 us without
(session 30; 16-17.5 against 22-23.5 before the field's rewrite). So
`program_options` gives the sweep's compile of such groups their reduce fusions back (lane states
above `YNN_REDUCE_LANE_STATE` numbers). A library call (`mf.simulate_particles`) of such a state runs
without them unless MEANFIELD_XLA_DEFAULTS=0. `meanfield train` takes the flag back before JAX starts
(`unset_cpu_defaults`: a training step's wide products run faster with YNNPACK).

Only the reduce type matters here (measured per type: REDUCE alone is as slow as jaxlib's default;
DOT alone is as fast as none). The flag only changes which code XLA emits for a fusion, not what it
computes; sums may round in another order.

When it is set:
- only for jaxlib releases where the flag is known (`KNOWN_JAXLIB`): an unknown flag in XLA_FLAGS
  aborts the process when JAX starts;
- not when XLA_FLAGS already names it (the user's choice wins);
- not when MEANFIELD_XLA_DEFAULTS=0 (off).

It takes effect only if meanfield is imported before the first JAX computation: XLA reads XLA_FLAGS
once, when JAX creates its CPU client. It changes nothing on GPU or TPU (the flag is for XLA's CPU
backend).
"""

from __future__ import annotations

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
"""No YNNPACK library fusions on CPU (an empty list of fusion types)."""

KNOWN_JAXLIB = ((0, 10),)
"""(major, minor) jaxlib releases whose XLA knows `YNN_FLAG` (checked: 0.10.2)."""

OFF_ENV = "MEANFIELD_XLA_DEFAULTS"
"""Set to 0 to keep XLA's own defaults."""

YNN_REDUCE_LANE_STATE = 256
"""Lane states above this many numbers (64 tokens x d = 8: 512) compile with YNNPACK reduce fusions
in sweeps; smaller ones (a d = 4 Gaussian: 20; 32 tokens x d = 3: 96) without."""


def program_options(lane_state: int) -> dict:
    """XLA compile options for a program whose lanes hold `lane_state` numbers: YNNPACK reduce fusions
    back on for large states when XLA_FLAGS holds exactly `YNN_FLAG` (as `set_cpu_defaults` appends it,
    in this process or in the parent that started it, so every process of a run decides alike); else
    none. A user who writes that same flag gets the same choice."""
    if lane_state <= YNN_REDUCE_LANE_STATE or YNN_FLAG not in os.environ.get("XLA_FLAGS", "").split():
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def _jaxlib_release() -> tuple[int, int] | None:
    """(major, minor) of the installed jaxlib, from `jaxlib.__version__` (3 ms: `import jax` imports
    jaxlib anyway; `importlib.metadata.version` scans the installed distributions, 50 ms per import)."""
    try:
        import jaxlib

        major, minor = jaxlib.__version__.split(".")[:2]
        return int(major), int(minor)
    except Exception:  # no jaxlib, or an odd version string: leave XLA alone
        return None


_appended = False
"""Whether `set_cpu_defaults` appended `YNN_FLAG` in this process."""


def set_cpu_defaults() -> bool:
    """Append `YNN_FLAG` to XLA_FLAGS when the rules above allow it; True when it did."""
    global _appended
    if os.environ.get(OFF_ENV, "1").strip() == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags or _jaxlib_release() not in KNOWN_JAXLIB:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()
    _appended = True
    return True


def unset_cpu_defaults() -> bool:
    """Take back what `set_cpu_defaults` appended (a user's own flag stays); True when it did.

    For training (`meanfield train`): its steps are products of 128-512 wide matrices, which
    YNNPACK's fusions run faster. `bench_train --quick` (d_model 128, 2 CPU devices, one process
    each): 370 ms per step with `YNN_FLAG` against 256 ms without (18% / 21% of the matmul floor,
    whose own product also slows with the flag: 164.8 against 195.6 GFLOP/s). Like the flag itself,
    it takes effect only before JAX creates its CPU client."""
    global _appended
    if not _appended:
        return False
    flags = os.environ.get("XLA_FLAGS", "").split()
    if YNN_FLAG in flags:
        flags.remove(YNN_FLAG)
    os.environ["XLA_FLAGS"] = " ".join(flags)
    _appended = False
    return True
