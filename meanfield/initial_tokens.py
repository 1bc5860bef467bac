"""Initial token configurations, deterministic per PRNG key."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._symeig import eigh
from .model.params import default_float_dtype


def sphere_uniform(key, n: int, d: int, dtype=None) -> jax.Array:
    r"""Returns (n, d): n tokens i.i.d. uniform on the unit sphere S^{d-1}, $x = g/|g|$ with $g \sim N(0, I_d)$."""
    dtype = default_float_dtype() if dtype is None else dtype
    X = jax.random.normal(key, (n, d), dtype)
    return X / jnp.linalg.norm(X, axis=-1, keepdims=True)


def hemisphere(key, n: int, d: int, direction=None, dtype=None) -> jax.Array:
    r"""Returns (n, d): n tokens uniform on the open hemisphere $\{x : \langle x, u\rangle > 0\}$, u = `direction` (default e_1)."""
    X = sphere_uniform(key, n, d, dtype)
    u = jnp.zeros((d,), X.dtype).at[0].set(1.0) if direction is None else jnp.asarray(direction, X.dtype)
    u = u / jnp.linalg.norm(u)
    s = X @ u
    return jnp.where((s < 0)[:, None], X - 2.0 * s[:, None] * u, X)


def gaussian_tokens(key, n: int, m, S, dtype=None) -> jax.Array:
    r"""Returns (n, d): n tokens i.i.d. $N(m, S)$, $x = m + S^{1/2} g$ with the symmetric square root
    $S^{1/2} = U\Lambda^{1/2}U^\top$ (S may be singular; unique, so the draw does not depend on the
    eigenvectors' signs or order)."""
    dtype = default_float_dtype() if dtype is None else dtype
    m = jnp.asarray(m, dtype)
    S = jnp.asarray(S, dtype)
    lam, U = eigh(0.5 * (S + S.T))  # Jacobi rotations up to 16 x 16: no LAPACK call in a sweep's program
    root = (U * jnp.sqrt(jnp.clip(lam, 0.0, None))) @ U.T
    Z = jax.random.normal(key, (n, m.shape[0]), dtype)
    return m + Z @ root.T
