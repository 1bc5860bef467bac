"""Small symmetric eigenvalues by Jacobi rotations (`meanfield._symeig`): equal to LAPACK's on hard
matrices, differentiable like `jnp.linalg.eigvalsh`, and free of the LAPACK custom call whose
thread-pool wait hung large sweeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meanfield import _symeig


def _hard_batch(n, rng):
    """Random SPD, graded over 12 orders of magnitude, near-identity, rank one, indefinite, diagonal."""
    A = rng.standard_normal((60, n, n))
    A = A @ np.swapaxes(A, 1, 2)
    g = np.geomspace(1, 1e-6, n)
    A[:10] = A[:10] * g[None, :, None] * g[None, None, :]
    A[10:20] = np.eye(n) + 1e-9 * A[10:20]
    A[20:30] = np.ones((n, n))
    B = rng.standard_normal((10, n, n))
    A[30:40] = B + np.swapaxes(B, 1, 2)
    A[40:50] = np.eye(n) * rng.standard_normal((10, 1, n))
    return A


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16])
def test_equals_lapack_to_rounding(n, x64):
    """Unrolled rotations up to 4 x 4, rolled ones from 5 x 5 to 16 x 16, on the hard batch."""
    A = _hard_batch(n, np.random.default_rng(n))
    ref = np.linalg.eigvalsh(A)
    scale = np.abs(ref).max(-1, keepdims=True)
    for dtype, tol in ((jnp.float64, 1e-14), (jnp.float32, 5e-6)):
        got = np.asarray(_symeig.eigvalsh(jnp.asarray(A, dtype)))
        assert got.dtype == dtype
        err = np.abs(got - ref) / scale
        assert np.all(err <= tol), (dtype, err.max())
        assert np.all(np.diff(got, axis=-1) >= 0)  # ascending, as eigvalsh


def test_batch_shapes_nan_and_large_matrices(x64):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((2, 3, 4, 4))
    A = A + np.swapaxes(A, -1, -2)
    np.testing.assert_allclose(_symeig.eigvalsh(jnp.asarray(A)), np.linalg.eigvalsh(A), atol=1e-13)
    assert _symeig.eigvalsh(jnp.asarray(A[0, 0])).shape == (4,)
    assert _symeig.eigvalsh(jnp.zeros((0, 3, 3))).shape == (0, 3)
    assert np.all(np.isnan(_symeig.eigvalsh(jnp.full((3, 3), jnp.nan))))
    assert np.all(np.isnan(_symeig.eigvalsh(jnp.full((8, 8), jnp.nan))))
    big = rng.standard_normal((17, 17))  # above ROLLED_MAX_N: LAPACK
    big = big + big.T
    np.testing.assert_allclose(_symeig.eigvalsh(jnp.asarray(big)), np.linalg.eigvalsh(big), atol=1e-12)


@pytest.mark.parametrize("n", [4, 6])
def test_gradient_equals_lapacks(n, x64):
    rng = np.random.default_rng(1)
    A = rng.standard_normal((n, n))
    A = jnp.asarray(A @ A.T)
    w = jnp.arange(1.0, n + 1.0)
    mine = jax.grad(lambda a: jnp.sum(w * _symeig.eigvalsh(a)))(A)
    lapack = jax.grad(lambda a: jnp.sum(w * jnp.linalg.eigvalsh(a)))(A)
    np.testing.assert_allclose(mine, lapack, atol=1e-11)


def test_no_lapack_call_in_the_program():
    """The hang: jaxlib's batched LAPACK eigensolver waits on XLA's intra-op pool from inside it
    (`ParallelBatchMap`), so independent calls can occupy every pool thread and wait forever. Up to
    16 x 16 the program holds no custom call at all; above, it is LAPACK as before."""
    for n in (4, 8, 16):
        assert "custom_call" not in _symeig.eigvalsh.lower(jnp.zeros((16, n, n))).as_text()
        assert "custom_call" not in _symeig.eigh.lower(jnp.zeros((16, n, n))).as_text()
    large = _symeig.eigvalsh.lower(jnp.zeros((16, 17, 17))).as_text()
    assert "custom_call" in large


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_eigh_vectors_rebuild_the_matrix(n, x64):
    """`eigh` (Jacobi up to 16 x 16): orthonormal eigenvectors with A = V diag(lam) V^T, eigenvalues
    ascending and equal to LAPACK's, on the hard batch; 17 x 17 goes to LAPACK."""
    A = _hard_batch(n, np.random.default_rng(10 + n))
    scale = np.abs(np.linalg.eigvalsh(A)).max(-1)[:, None, None]
    for dtype, tol in ((jnp.float64, 1e-13), (jnp.float32, 5e-6)):
        lam, V = _symeig.eigh(jnp.asarray(A, dtype))
        lam, V = np.asarray(lam, np.float64), np.asarray(V, np.float64)
        np.testing.assert_allclose(lam, np.linalg.eigvalsh(A), atol=tol * scale.max())
        assert np.all(np.abs(V @ (lam[..., None] * np.swapaxes(V, -1, -2)) - A) <= tol * 10 * scale)
        assert np.abs(np.swapaxes(V, -1, -2) @ V - np.eye(n)).max() <= tol * 10
        assert np.all(np.diff(lam, axis=-1) >= 0)
    assert "lapack" not in jax.jit(_symeig.eigh).lower(jnp.asarray(A)).as_text()
    big = np.random.default_rng(0).standard_normal((17, 17))
    lam, V = _symeig.eigh(jnp.asarray(big + big.T))
    np.testing.assert_allclose(np.asarray(V) @ np.diag(lam) @ np.asarray(V).T, big + big.T, atol=1e-12)
