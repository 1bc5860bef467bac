r"""Initial densities on the circle (callables $\theta \mapsto \rho(\theta)$, mass 1) and sampling.

- `uniform_perturbed`: $\rho = \frac{1}{2\pi}\big(1 + \sum_k a_k\cos(k\theta + \phi_k)\big)$.
- `von_mises_mixture`: $\rho = \sum_i w_i \frac{e^{\kappa_i\cos(\theta-\mu_i)}}{2\pi I_0(\kappa_i)}$.
- `kernel_density`: the von Mises kernel estimate $\frac1n\sum_j \frac{e^{\kappa\cos(\theta-\theta_j)}}{2\pi I_0(\kappa)}$
  from samples (angles or tokens (n, 2)), $\kappa = 1/h^2$ for bandwidth h.
- `sample_density`: n i.i.d. angles from a density, by inverting its exact Fourier CDF.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import i0e

from . import grid as _grid


def uniform_perturbed(amplitudes: Sequence[float] | float = 0.1, phases: Sequence[float] | None = None,
                      *, key=None, modes: Sequence[int] | None = None) -> Callable:
    r"""$\frac{1}{2\pi}(1 + \sum_k a_k\cos(k\theta + \phi_k))$ for $k$ in `modes` (default 1, 2, ...).

    `amplitudes`: one per mode (a scalar means mode 1 only). `phases`: one per mode, or drawn
    uniformly from `key` (zero when neither is given). Positive when $\sum|a_k| < 1$.
    """
    a = np.atleast_1d(np.asarray(amplitudes, np.float64))
    ks = np.arange(1, len(a) + 1) if modes is None else np.asarray(modes)
    if len(ks) != len(a):
        raise ValueError(f"uniform_perturbed: need one amplitude per mode; got {len(a)} and {len(ks)}.")
    if phases is None:
        ph = np.zeros(len(a)) if key is None else np.asarray(jax.random.uniform(key, (len(a),), maxval=2 * math.pi))
    else:
        ph = np.asarray(phases, np.float64)
    if np.sum(np.abs(a)) >= 1:
        raise ValueError(f"uniform_perturbed: sum |a_k| must be < 1 for a positive density; got {np.sum(np.abs(a))}.")

    def density(theta):
        theta = jnp.asarray(theta)
        s = jnp.ones_like(theta)
        for ak, k, p in zip(a, ks, ph):
            s = s + ak * jnp.cos(k * theta + p)
        return s / (2 * math.pi)

    return density


def von_mises_mixture(locs: Sequence[float] | float = 0.0, kappas: Sequence[float] | float = 1.0,
                      weights: Sequence[float] | None = None) -> Callable:
    r"""$\sum_i w_i\, e^{\kappa_i(\cos(\theta-\mu_i) - 1)} / (2\pi\, I_0(\kappa_i) e^{-\kappa_i})$ (weights normalised)."""
    mu = np.atleast_1d(np.asarray(locs, np.float64))
    ka = np.broadcast_to(np.asarray(kappas, np.float64), mu.shape)
    w = np.ones_like(mu) if weights is None else np.asarray(weights, np.float64)
    if np.any(ka < 0) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"von_mises_mixture: kappas and weights must be >= 0 (weights not all 0); got {ka}, {w}.")
    w = w / w.sum()

    def density(theta):
        theta = jnp.asarray(theta)
        out = jnp.zeros_like(theta)
        for m, k, wi in zip(mu, ka, w):
            out = out + wi * jnp.exp(k * (jnp.cos(theta - m) - 1.0)) / (2 * math.pi * i0e(jnp.asarray(k, theta.dtype)))
        return out

    return density


def kernel_density(samples, bandwidth: float | None = None) -> Callable:
    r"""Von Mises kernel estimate from angles (n,) or unit tokens (n, 2); $\kappa = 1/h^2$.

    Default bandwidth: Silverman-like $h = 1.06\,\hat\sigma\,n^{-1/5}$ with $\hat\sigma$ the
    circular standard deviation $\sqrt{-2\log R}$ (capped at $\pi$).
    """
    s = jnp.asarray(samples)
    theta_s = _grid.to_angles(s) if s.ndim == 2 else jnp.mod(s, 2 * math.pi)
    n = theta_s.shape[0]
    if bandwidth is None:
        R = float(jnp.abs(jnp.mean(jnp.exp(1j * theta_s))))
        sig = min(math.sqrt(-2 * math.log(max(R, 1e-12))), math.pi)
        bandwidth = 1.06 * sig * n ** (-0.2)
    kappa = 1.0 / float(bandwidth) ** 2

    def density(theta):
        theta = jnp.asarray(theta)
        norm = 2 * math.pi * i0e(jnp.asarray(kappa, theta.dtype))

        b = 1024
        nb = -(-n // b)
        tpad = jnp.pad(theta_s.astype(theta.dtype), (0, nb * b - n)).reshape(nb, b)
        mask = (jnp.arange(nb * b) < n).reshape(nb, b).astype(theta.dtype)

        def chunk(acc, tm):
            ts, ms = tm
            k = jnp.exp(kappa * (jnp.cos(theta[:, None] - ts[None, :]) - 1.0))
            return acc + k @ ms, None

        acc, _ = jax.lax.scan(chunk, jnp.zeros_like(theta), (tpad, mask))
        return acc / (n * norm)

    return density


def sample_density(key, density0, n: int, *, modes: int = 4096, dtype=None) -> jax.Array:
    r"""n i.i.d. angles in $[0, 2\pi)$ from `density0` (callable or grid values), by inverse transform:
    bracket $F^{-1}(u)$ on a `modes`-point grid, then 3 Newton steps on the exact Fourier CDF.
    Exact (to rounding) for the trigonometric interpolant of `density0` on that grid."""
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    density = jnp.asarray(density0(_grid.grid(modes, dtype)) if callable(density0) else _grid.resample(jnp.asarray(density0, dtype), modes), dtype)
    total = _grid.mass(density)
    nodes = _grid.grid(modes, dtype)
    F_nodes = jnp.concatenate([_grid.cdf(density, nodes, n_modes=_grid.significant_modes(density)), total[None]]) / total
    u = jax.random.uniform(key, (n,), dtype)
    j = jnp.clip(jnp.searchsorted(F_nodes, u, side="right") - 1, 0, modes - 1)
    h = 2 * math.pi / modes
    frac = (u - F_nodes[j]) / jnp.maximum(F_nodes[j + 1] - F_nodes[j], jnp.finfo(dtype).tiny)
    theta = nodes[j] + h * jnp.clip(frac, 0.0, 1.0)
    lo, hi = nodes[j], nodes[j] + h
    K = _grid.significant_modes(density)
    for _ in range(3):
        f = _grid.cdf(density, theta, n_modes=K) / total - u
        fp = _grid.evaluate(density, theta, n_modes=K) / total
        theta = jnp.clip(theta - f / jnp.maximum(fp, jnp.finfo(dtype).tiny), lo, hi)
    return jnp.mod(theta, 2 * math.pi)
