"""Low-rank (Chebyshev) attention against the blocked direct sum and the exp-throughput floor.

    python benchmarks/bench_lowrank_attention.py            # n = 1e5 and 1e6, beta in {1, 4, 9}
    python benchmarks/bench_lowrank_attention.py --quick    # n = 1e5 only

float64, d = 3, tokens uniform on S^2, softmax attention with random Q, K scaled so that
||Q^T K||_2 = 1 (beta is then the largest logit) and random V; tolerance 1e-6 relative to
max_j |V x_j|. Every time is a median over interleaved rounds in this one process:

- lowrank: one jitted `lowrank_attention` call (`meanfield.model.lowrank`; orders from `choose_orders`;
  the in-jit bound check and `lax.cond` fallback to `mf.Blocked()` included). Planning time is printed separately.
- direct: the blocked online-softmax direct sum (`blocked_attention`'s recurrence) for a subset of
  m queries against all n keys, scaled by n / m (the direct sum is linear in the queries).
- floor: n^2 exponentials at the float64 `jnp.exp` throughput measured here (`sum(exp(x))` over
  10^7 elements, fused, so no output array is written).

The error column is max |lowrank - direct| / max_j |V x_j| over the m subset queries.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import meanfield as mf  # noqa: E402
from meanfield.model.attention import attention_rows  # noqa: E402
from meanfield.model.lowrank import choose_orders, lowrank_attention  # noqa: E402


def timed(fn, *args):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def model_for(beta, key):
    base = mf.Model.random(key, 3, mlp="none", dtype=jnp.float64)
    s = float(np.linalg.norm(np.asarray(base.Q.T @ base.K), 2))
    return mf.Model(Q=base.Q / np.sqrt(s), K=base.K / np.sqrt(s), V=base.V, beta=beta, norm="sphere",
                    mlp="none", dtype=jnp.float64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ns = [100_000] if args.quick else [100_000, 1_000_000]
    betas = [1.0, 4.0, 9.0]
    rtol = 1e-6
    print(f"load average at start: {os.getloadavg()}")
    big = jax.random.normal(jax.random.key(9), (10_000_000,), jnp.float64)
    exp_fn = jax.jit(lambda x: jnp.sum(jnp.exp(x)))  # fused: exp throughput, no 80 MB output
    timed(exp_fn, big)
    rows = []
    for n in ns:
        X = mf.sphere_uniform(jax.random.key(0), n, 3, dtype=jnp.float64)
        m_sub = 1024 if n <= 100_000 else 256
        Xq = X[:m_sub]
        for beta in betas:
            model = model_for(beta, jax.random.key(3))
            t0 = time.perf_counter()
            orders = choose_orders(model, X, rtol=rtol)
            t_plan = time.perf_counter() - t0
            if orders is None:
                print(f"n={n} beta={beta}: bound cannot be met -> direct sum")
                continue
            fast = jax.jit(lambda X, model=model, orders=orders: lowrank_attention(
                model, X, orders=orders, rtol=rtol, fallback=mf.Blocked(), return_info=True))
            direct = jax.jit(lambda Xq, X, model=model: attention_rows(model, Xq, X, block_size=4096))
            out, info = fast(X)
            ref = direct(Xq, X)
            vinf = float(jnp.max(jnp.abs(X @ model.V.T)))
            err = float(jnp.max(jnp.abs(out[:m_sub] - ref))) / vinf
            t_fast, t_dir, t_exp = [], [], []
            for _ in range(args.rounds):
                t_fast.append(timed(fast, X))
                t_dir.append(timed(direct, Xq, X) * n / m_sub)
                t_exp.append(timed(exp_fn, big) * (float(n) * n / big.size))
            row = dict(n=n, beta=beta, orders=orders, F=info.features, bound=float(info.bound),
                       bound_post=float(info.bound_post), fallback=bool(info.fallback), err=err,
                       plan=t_plan, fast=statistics.median(t_fast), direct=statistics.median(t_dir),
                       floor=statistics.median(t_exp))
            rows.append(row)
            print(f"n={n:>8} beta={beta:>3} orders={orders} F={row['F']:>5} bound={row['bound']:.1e} "
                  f"(post {row['bound_post']:.1e}) err={err:.1e} plan {t_plan:.2f}s lowrank {row['fast']:.3f}s "
                  f"[{min(t_fast):.3f}-{max(t_fast):.3f}] direct~{row['direct']:.1f}s floor~{row['floor']:.1f}s",
                  flush=True)
    print()
    print("| n | beta | orders (F) | a priori bound | error vs direct | lowrank s | direct s (scaled) "
          "| speed-up vs direct | speed-up vs exp floor | target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["n"] >= 1_000_000:
            target = "< 1 s" + ("" if r["beta"] > 4 else (": met" if r["fast"] < 1.0 else ": **missed**"))
        else:
            target = ">= 30x direct: " + ("met" if r["direct"] / r["fast"] >= 30 else "**missed**")
        print(f"| {r['n']:.0e} | {r['beta']:g} | {r['orders']} ({r['F']}) | {r['bound']:.1e} | {r['err']:.1e} "
              f"| {r['fast']:.3f} | {r['direct']:.1f} | {r['direct'] / r['fast']:.0f}x "
              f"| {r['floor'] / r['fast']:.0f}x | {target} |")
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
