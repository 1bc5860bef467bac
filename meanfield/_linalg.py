"""A matrix product that stays fast when vmapped over many tiny systems.

XLA on CPU lowers a batched `dot` of tiny matrices to one GEMM call per matrix, so a vmapped
4 x 4 product costs microseconds per lane. Written as an elementwise multiply and a sum, the same
product fuses into one loop across the whole batch: 0.55 us instead of 5.4 us per lane for the
4 x 4 moment field in a batch of 512 (measured on 2 CPU cores, see benchmarks/README.md). Large
products keep `@` (BLAS / tensor cores).
"""

from __future__ import annotations

import jax.numpy as jnp

SMALL_MATMUL = 4096
"""Products with m * k * n at most this use the elementwise form."""


def matmul(a, b):
    """a @ b for 2-d a (m, k) and b (k, n); elementwise multiply-and-sum when m k n <= SMALL_MATMUL."""
    if a.ndim == 2 and b.ndim == 2 and a.shape[0] * a.shape[1] * b.shape[1] <= SMALL_MATMUL:
        return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)
    return a @ b
