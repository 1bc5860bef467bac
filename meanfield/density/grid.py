r"""Fourier pseudo-spectral representation of a density on the circle.

A density is stored by its values $\rho_j = \rho(\theta_j)$ on the uniform grid
$\theta_j = 2\pi j/N$, $j = 0..N-1$ ($N$ even), which is the same as its trigonometric interpolant

$$ \rho(\theta) = \sum_{|k| < N/2} \hat\rho_k e^{ik\theta}, \qquad \hat\rho_k = \frac1N\sum_j \rho_j e^{-ik\theta_j} $$

(the Nyquist mode $k = N/2$ is kept at zero). Every function here works on that representation:
exact evaluation at any angle, exact cumulative distribution
$F(\theta) = \int_0^\theta \rho = \hat\rho_0\theta + \sum_{k\ne0}\hat\rho_k (e^{ik\theta}-1)/(ik)$,
resampling to another N (zero padding / truncation), the spectral tail used to choose N, and
the peak count.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Float

Density = Float[Array, "N"]
Angles = Float[Array, "n"]


def grid(N: int, dtype=None) -> Float[Array, "N"]:
    r"""The angles $\theta_j = 2\pi j/N$."""
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    return (2 * math.pi / N) * jnp.arange(N, dtype=dtype)


def check_modes(N: int, where: str = "modes") -> int:
    """N must be a multiple of 4 and >= 8 (so the 3/2-padded grid 3N/2 is even)."""
    N = int(N)
    if N < 8 or N % 4:
        raise ValueError(f"`{where}` must be a multiple of 4 and >= 8; got {N}.")
    return N


def coefficients(density: Density) -> jax.Array:
    r"""$\hat\rho_k$ for $k = 0..N/2$ (rfft / N), Nyquist zeroed."""
    N = density.shape[-1]
    c = jnp.fft.rfft(density, axis=-1) / N
    return c.at[..., N // 2].set(0.0)


def resample(density: Density, M: int) -> jax.Array:
    """Values of the trigonometric interpolant of `density` on the M-point grid (exact for M >= N;
    for M < N the modes |k| >= M/2 are dropped)."""
    N = density.shape[-1]
    if M == N:
        return density
    c = coefficients(density)
    K = min(N, M) // 2
    c = c[..., :K]
    return jnp.fft.irfft(c, n=M, axis=-1) * M


def spectral_tail(density: Density) -> jax.Array:
    r"""$\max_{N/3 \le k < N/2} |\hat\rho_k| / |\hat\rho_0|$: size of the top third of the resolved
    modes relative to the mean. The truncation error of a smooth (analytic) density is of that
    order, so it is the resolution indicator."""
    N = density.shape[-1]
    c = jnp.abs(coefficients(density))
    k0 = -(-N // 3)
    return jnp.max(c[..., k0: N // 2], axis=-1) / jnp.maximum(jnp.abs(c[..., 0]), jnp.finfo(density.dtype).tiny)


def mass(density: Density) -> jax.Array:
    r"""$\int_0^{2\pi}\rho = 2\pi\hat\rho_0$ (exact for the interpolant)."""
    return 2 * math.pi * jnp.mean(density, axis=-1)


def _chunked(fn, theta, block: int = 2048):
    n = theta.shape[0]
    if n <= block:
        return fn(theta)
    nb = -(-n // block)
    tp = jnp.pad(theta, (0, nb * block - n)).reshape(nb, block)
    return jax.lax.map(fn, tp).reshape(-1)[:n]


@jax.jit
def _evaluate_coeffs(c, theta):
    k = jnp.arange(c.shape[-1], dtype=theta.dtype)
    w = jnp.where(k == 0, 1.0, 2.0) * c
    return _chunked(lambda th: jnp.real(jnp.exp(1j * th[:, None] * k[None, :]) @ w), theta)


@jax.jit
def _cdf_coeffs(c, theta):
    k = jnp.arange(1, c.shape[-1], dtype=theta.dtype)
    w = 2.0 * c[1:] / (1j * k)
    return _chunked(lambda th: jnp.real(c[0]) * th + jnp.real((jnp.exp(1j * th[:, None] * k[None, :]) - 1.0) @ w),
                    theta)


def evaluate(density: Density, theta: Angles, *, n_modes: int | None = None) -> jax.Array:
    r"""$\rho(\theta)$ of the interpolant at arbitrary angles (O(n N), in blocks of angles).

    `n_modes`: use only modes $k <$ n_modes (see `significant_modes`)."""
    c = coefficients(density)
    if n_modes is not None:
        c = c[..., :n_modes]
    return _evaluate_coeffs(c, jnp.asarray(theta, density.dtype))


def cdf(density: Density, theta: Angles, *, n_modes: int | None = None) -> jax.Array:
    r"""$F(\theta) = \int_0^\theta \rho(s)\,ds$ at arbitrary angles in $[0, 2\pi]$ (exact, O(n N))."""
    c = coefficients(density)
    if n_modes is not None:
        c = c[..., :n_modes]
    return _cdf_coeffs(c, jnp.asarray(theta, density.dtype))


def significant_modes(density, rtol: float | None = None) -> int:
    """Number of leading modes k = 0.. K-1 holding every |rho_k| > rtol |rho_0| (host-side;
    default rtol = eps of the dtype). Evaluations with `n_modes=K` are then exact to rounding."""
    density = np.asarray(density)
    rtol = np.finfo(density.dtype).eps if rtol is None else rtol
    c = np.abs(np.fft.rfft(density)) / density.shape[-1]
    big = np.nonzero(c[: density.shape[-1] // 2] > rtol * c[0])[0]
    return int(big[-1]) + 1 if len(big) else 1


def count_peaks(density: Density, level: float = 2.0) -> jax.Array:
    r"""Number of density peaks: connected arcs of the superlevel set
    $\{\theta: \rho(\theta) > \text{level}\cdot m/2\pi\}$ ($m$ the mass, so `level` is in units of
    the uniform density). Peaks joined by a dip that stays above the level count once; a
    perturbation of the uniform density smaller than `level - 1` counts as no peak."""
    thr = level * jnp.mean(density, axis=-1, keepdims=True)
    above = density > thr
    starts = above & ~jnp.roll(above, 1, axis=-1)
    n = jnp.sum(starts, axis=-1)
    return jnp.where(jnp.all(above, axis=-1), 1, n)


def to_angles(X) -> jax.Array:
    """Angles in [0, 2pi) of tokens X (n, 2)."""
    return jnp.mod(jnp.arctan2(X[..., 1], X[..., 0]), 2 * math.pi)


def to_tokens(theta) -> jax.Array:
    """Unit tokens (cos theta, sin theta), shape (n, 2)."""
    return jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)


def upsample_np(density: np.ndarray, M: int) -> np.ndarray:
    """NumPy version of `resample` for M >= N (used to put saves of different N on one grid)."""
    N = density.shape[-1]
    if M == N:
        return density
    c = np.fft.rfft(density, axis=-1) / N
    c[..., N // 2] = 0.0
    out = np.zeros(density.shape[:-1] + (M // 2 + 1,), c.dtype)
    out[..., : N // 2 + 1] = c
    return np.fft.irfft(out, n=M, axis=-1) * M
