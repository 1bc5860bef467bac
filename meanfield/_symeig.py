r"""Eigenvalues of small symmetric matrices, batched, without LAPACK: cyclic Jacobi rotations.

Why not `jnp.linalg.eigvalsh`. On CPU it calls LAPACK (`ssyevd` / `dsyevd`) through jaxlib's FFI,
which splits a batch over XLA's intra-op thread pool and blocks the calling pool thread until the
pieces are done (`jax::ParallelBatchMap`). When the program has several independent eigenvalue
calls (a sweep's observables and regime rule), XLA can run one on every pool thread at once; each
then waits for pieces that no free thread is left to run, and the process hangs at 0% CPU.
That is the "XLA CPU hang" of large Gaussian sweeps (issue #14): `gdb` on a hung 10^4-point run
showed both pool threads ("tf_XLAEigen") in `lapack_ssyevd_ffi` -> `ParallelBatchMap` ->
`BlockingCounter::Wait`, and the main thread waiting on the result.

Jacobi's method is pure elementwise arithmetic, so it fuses into XLA loops across the batch and
never touches that pool. For a symmetric $A$ each rotation $A \leftarrow J^\top A J$ in the
plane $(p, q)$ zeroes $a_{pq}$ (Golub & Van Loan, Matrix Computations, 4th ed., Alg. 8.5.2-8.5.3,
`sym.schur2`): $\tau = (a_{qq} - a_{pp}) / 2a_{pq}$, $t = \operatorname{sign}\tau / (|\tau| + \sqrt{1 + \tau^2})$,
$c = 1/\sqrt{1 + t^2}$, $s = tc$. Sweeps over all pairs converge quadratically; a fixed number of
them (`SWEEPS`, `rolled_sweeps`) reaches rounding. The eigenvalues come out with Jacobi's (small)
relative error and ascending, as `eigvalsh` returns them.

Two forms. Up to `JACOBI_MAX_N` every rotation is unrolled into elementwise code on the matrix
entries (fastest, but its compile grows as n^2 rotations). Up to `ROLLED_MAX_N` one rotation is a
loop body that updates rows and columns p and q in place (`lax.dynamic_update_index_in_dim`):
it compiles in ~0.4 s at any n, and runs 3.5-5x slower than LAPACK (8 x 8, float32: 2,816
matrices 50 ms against 14 ms; 5e4 matrices 1.3 s against 0.25-0.38 s). That is what a sweep's
observables and spectral ratios cost once per point, against solves of seconds, and it keeps
their programs free of LAPACK, so they split over several CPU devices (`meanfield.sweep.schedule`).
Larger matrices keep LAPACK.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

JACOBI_MAX_N = 4
"""Largest matrix size solved by unrolled Jacobi rotations. Measured on this 2-core machine (float32,
one jitted call): 2e5 4 x 4 matrices 0.09 s against LAPACK's 0.27 s, compiled in 0.9 s; but 5e4
8 x 8 matrices 0.76 s against 0.20 s, with a 9.7 s compile (28 unrolled rotations per sweep). So
5 x 5 and up take the rolled form."""
ROLLED_MAX_N = 16
"""Largest matrix size solved by rolled Jacobi rotations (one loop step per rotation); larger ones
call `jnp.linalg.eigvalsh` / `eigh` (LAPACK), and keep its hang risk. A rolled sweep costs
O(n^3) per matrix, against LAPACK's O(n^3) for the whole decomposition."""
SWEEPS = 6
"""Fixed number of Jacobi sweeps (a static count keeps the loop reverse-differentiable): one more than
the most we measured to reach float64 rounding for n <= 4 (random, graded, near-identity, rank-one
and indefinite matrices)."""


def rolled_sweeps(n: int) -> int:
    """Jacobi sweeps of the rolled form for n x n matrices: one more than measured to reach float64
    rounding on the hard batch of tests/test_symeig.py (largest error / largest |eigenvalue|: n = 8,
    5 sweeps 1.3e-14; n = 12, 6 sweeps 4.0e-15; n = 16, 7 sweeps 4.7e-15 (6: 4.2e-13))."""
    return 6 if n <= 8 else 8


def _angle(app, aqq, apq):
    """(c, s) of the rotation in the plane (p, q) that zeroes a_pq, from a_pp, a_qq, a_pq."""
    d = aqq - app
    # |tau| = |d / 2 a_pq| beyond 1/sqrt(eps): sqrt(1 + tau^2) = |tau| to rounding, so t = a_pq / d;
    # each branch sees only inputs that are safe for it (no overflowing tau^2, no 0 * inf in the
    # derivative of a converged rotation).
    big = jnp.abs(d) * jnp.sqrt(jnp.finfo(app.dtype).eps) > 2 * jnp.abs(apq)
    formula = (apq != 0) & ~big
    tau = d / (2 * jnp.where(formula, apq, 1))
    t = jnp.where(tau >= 0, 1.0, -1.0).astype(app.dtype) / (jnp.abs(tau) + jnp.sqrt(1 + tau * tau))
    t = jnp.where(big, apq / jnp.where(big, d, 1), jnp.where(formula, t, 0))
    c = jax.lax.rsqrt(1 + t * t)
    return c, t * c


def _rotate(M, p: int, q: int):
    """(J^T M J zeroing M[p][q], c, s) for p < q static; M is n x n nested lists of batch arrays and
    J the rotation with J_pp = J_qq = c, J_pq = s, J_qp = -s."""
    apq = M[p][q]
    c, s = _angle(M[p][p], M[q][q], apq)
    M = [list(row) for row in M]
    for row in M:  # M J: columns p and q
        row[p], row[q] = c * row[p] - s * row[q], s * row[p] + c * row[q]
    rp, rq = M[p], M[q]  # J^T (M J): rows p and q
    M[p] = [c * a - s * b for a, b in zip(rp, rq)]
    M[q] = [s * a + c * b for a, b in zip(rp, rq)]
    M[p][q] = M[q][p] = jnp.zeros_like(apq)
    return M, c, s


@jax.jit  # called eagerly (a notebook's metrics), the unrolled rotations would be ~1,000 dispatches
def eigvalsh(A) -> jax.Array:
    """Ascending eigenvalues of the symmetric matrices A (..., n, n), as `jnp.linalg.eigvalsh`
    (which also symmetrises its input); Jacobi rotations for n <= ROLLED_MAX_N, LAPACK above.

    Batch-last inside: each matrix entry is one array over the whole batch, so every rotation is a
    few fused elementwise loops."""
    A = jnp.asarray(A)
    n = A.shape[-1]
    if n > ROLLED_MAX_N or not jnp.issubdtype(A.dtype, jnp.floating):
        return jnp.linalg.eigvalsh(A)
    lam, _ = (_jacobi if n <= JACOBI_MAX_N else _jacobi_rolled)(A, vectors=False)
    return jnp.sort(lam, axis=-1)


def _jacobi(A, vectors: bool):
    """(eigenvalues (..., n) unsorted, eigenvectors (..., n, n) as columns or None) by `SWEEPS`
    cyclic Jacobi sweeps; V accumulates the rotations, A = V diag(lam) V^T."""
    n = A.shape[-1]
    batch = A.shape[:-2]
    flat = A.reshape((-1, n, n))
    M = [[flat[:, i, i] if i == j else 0.5 * (flat[:, i, j] + flat[:, j, i]) for j in range(n)] for i in range(n)]
    one, zero = jnp.ones_like(flat[:, 0, 0]), jnp.zeros_like(flat[:, 0, 0])
    V = [[one if i == j else zero for j in range(n)] for i in range(n)] if vectors else None
    pairs = [(p, q) for p in range(n - 1) for q in range(p + 1, n)]

    def sweep(_, state):
        M, V = state
        for p, q in pairs:
            M, c, s = _rotate(M, p, q)
            if V is not None:  # V J: columns p and q
                V = [list(row) for row in V]
                for row in V:
                    row[p], row[q] = c * row[p] - s * row[q], s * row[p] + c * row[q]
        return M, V

    M, V = jax.lax.fori_loop(0, SWEEPS, sweep, (M, V)) if pairs else (M, V)
    lam = jnp.stack([M[i][i] for i in range(n)], axis=-1).reshape(batch + (n,))
    if V is None:
        return lam, None
    return lam, jnp.stack([jnp.stack(row, axis=-1) for row in V], axis=-2).reshape(batch + (n, n))


def _jacobi_rolled(A, vectors: bool):
    """As `_jacobi`, one rotation per loop step: the pair (p, q) is read from a table by the step's
    index, and rows and columns p and q of the batch-last matrices (n, n, batch) are updated in place."""
    n = A.shape[-1]
    batch = A.shape[:-2]
    flat = A.reshape((-1, n, n))
    M = jnp.transpose(0.5 * (flat + jnp.swapaxes(flat, 1, 2)), (1, 2, 0))
    V = jnp.broadcast_to(jnp.eye(n, dtype=A.dtype)[:, :, None], M.shape) if vectors else None
    pairs = [(p, q) for p in range(n - 1) for q in range(p + 1, n)]
    P = jnp.array([p for p, _ in pairs], jnp.int32)
    Q = jnp.array([q for _, q in pairs], jnp.int32)
    index = jnp.arange(n)[:, None]
    get = jax.lax.dynamic_index_in_dim
    put = jax.lax.dynamic_update_index_in_dim

    def rotate_columns(X, p, q, c, s):  # X J
        xp, xq = get(X, p, 1, keepdims=False), get(X, q, 1, keepdims=False)
        return put(put(X, c * xp - s * xq, p, 1), s * xp + c * xq, q, 1)

    def rotation(k, state):
        M, V = state
        p, q = P[k % len(pairs)], Q[k % len(pairs)]
        rp, rq = get(M, p, 0, keepdims=False), get(M, q, 0, keepdims=False)
        c, s = _angle(rp[p], rq[q], rp[q])
        M = rotate_columns(M, p, q, c, s)
        rp, rq = get(M, p, 0, keepdims=False), get(M, q, 0, keepdims=False)  # J^T (M J): rows p and q
        M = put(put(M, jnp.where(index == q, 0, c * rp - s * rq), p, 0), jnp.where(index == p, 0, s * rp + c * rq), q, 0)
        return M, (None if V is None else rotate_columns(V, p, q, c, s))

    M, V = jax.lax.fori_loop(0, rolled_sweeps(n) * len(pairs), rotation, (M, V))
    lam = jnp.diagonal(M, axis1=0, axis2=1).reshape(batch + (n,))
    if V is None:
        return lam, None
    return lam, jnp.transpose(V, (2, 0, 1)).reshape(batch + (n, n))


@jax.jit
def eigh(A) -> tuple[jax.Array, jax.Array]:
    """(ascending eigenvalues, eigenvectors as columns) of the symmetric matrices A (..., n, n), as
    `jnp.linalg.eigh`: Jacobi rotations for n <= ROLLED_MAX_N (no LAPACK call: a sweep's programs
    can then run on several CPU devices at once, `sweep.schedule`), LAPACK above."""
    A = jnp.asarray(A)
    n = A.shape[-1]
    if n > ROLLED_MAX_N or not jnp.issubdtype(A.dtype, jnp.floating):
        return jnp.linalg.eigh(A)
    lam, V = (_jacobi if n <= JACOBI_MAX_N else _jacobi_rolled)(A, vectors=True)
    order = jnp.argsort(lam, axis=-1)
    return jnp.take_along_axis(lam, order, axis=-1), jnp.take_along_axis(V, order[..., None, :], axis=-1)
