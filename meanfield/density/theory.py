r"""Closed-form rates of the density dynamics on the circle ($Q^\top K = I$, $V = vI$, no MLP).

Instability of the uniform density (clustering). Put $\rho = \frac{1}{2\pi}(1 + \varepsilon\cos k\theta)$.
With $\psi = \varphi - \theta$ the kernel is $e^{\beta\cos\psi}$ and
$\langle e(\theta), x(\varphi)\rangle = \sin\psi$; using $\int_0^{2\pi} e^{\beta\cos\psi}\cos m\psi\,d\psi
= 2\pi I_m(\beta)$ and $I_{k-1} - I_{k+1} = \frac{2k}{\beta} I_k$,

$$ \int e^{\beta\cos\psi}\sin\psi\,\rho(\theta+\psi)\,d\psi = -\varepsilon\,\frac{k I_k(\beta)}{\beta}\sin k\theta,
   \qquad Z = I_0(\beta) + O(\varepsilon), $$

so $v = -\varepsilon\,v\,\frac{k I_k(\beta)}{\beta I_0(\beta)}\sin k\theta + O(\varepsilon^2)$ (softmax) and
$\partial_t\rho = -\frac{1}{2\pi}\partial_\theta v$ gives $\dot\varepsilon = \lambda_k\varepsilon$ with

$$ \lambda_k^\text{softmax} = v\,\frac{k^2 I_k(\beta)}{\beta\, I_0(\beta)}, \qquad
   \lambda_k^\text{unnormalised} = v\,\frac{k^2 I_k(\beta)}{\beta}. $$

$\beta \to 0$: $\lambda_1 = v/2$. The fastest mode $k^*(\beta)$ sets the number of clusters that form
first (metastable state): $k^* = 1, 3, 4$ for $\beta = 1, 4, 9$ (softmax; see `fastest_mode`).

Consensus (a single concentrated bump). Linearising about the consensus state $\delta_{\bar\theta}$:
a token at $\bar\theta + \delta$ moves with $\langle e(\bar\theta+\delta), V x(\bar\theta)\rangle
= -v\sin\delta$ (softmax: the weights of a Dirac are 1), so $\dot\delta = -v\,\delta$, independent
of $\beta$. For a bump of small circular variance $\sigma^2$ the Gaussian tilt of the weights
$e^{\beta\cos(\varphi-\theta)}$ gives $v(\theta) \approx -v(\theta - \bar\theta)/(1 + \beta\sigma^2)$, hence

$$ \frac{d\sigma^2}{dt} = -\frac{2 v\,\sigma^2}{1 + \beta\sigma^2}\,(1 + O(\sigma^2)), $$

so $\sigma^2(t) \sim C e^{-2vt}$: the consensus rate of the variance is $2v$ (`consensus_rate`).
Here $\sigma^2 = -2\log|\int e^{i\theta}\rho|$ (exact variance for a wrapped normal).
"""

from __future__ import annotations

import math

import numpy as np


def _ive(k, beta):
    """I_k(beta) e^{-beta} for integer k >= 0, from the integral (1/pi) int_0^pi e^{beta(cos s - 1)} cos(ks) ds
    (trapezoidal rule on a periodic analytic integrand: exact to rounding with 512 nodes for beta <= 100)."""
    k = np.asarray(k, np.float64)
    s = np.linspace(0.0, 2 * math.pi, 1024, endpoint=False)
    f = np.exp(beta * (np.cos(s) - 1.0))
    return np.mean(f * np.cos(np.multiply.outer(k, s)), axis=-1)


def uniform_growth_rate(k, beta: float, *, attention: str = "softmax", v: float = 1.0):
    r"""$\lambda_k$: growth rate of mode k about the uniform density (see module docstring)."""
    k = np.asarray(k, np.float64)
    Ik = _ive(k, beta)  # I_k(beta) e^{-beta}
    if attention == "softmax":
        return v * k**2 * Ik / (beta * _ive(0, beta))
    if attention == "unnormalised":
        return v * k**2 * Ik * np.exp(beta) / beta
    raise ValueError(f"uniform_growth_rate: attention must be 'softmax' or 'unnormalised'; got {attention!r}.")


def fastest_mode(beta: float, *, attention: str = "softmax", k_max: int = 64) -> int:
    """argmax_k lambda_k (k >= 1)."""
    ks = np.arange(1, k_max + 1)
    return int(ks[np.argmax(uniform_growth_rate(ks, beta, attention=attention))])


def consensus_rate(v: float = 1.0) -> float:
    r"""Asymptotic decay rate $2v$ of the circular variance of a single bump ($V = vI$)."""
    return 2.0 * v


def circular_variance(density) -> np.ndarray:
    r"""$\sigma^2 = -2\log|\hat\rho_1/\hat\rho_0|$ from grid values (..., N)."""
    density = np.asarray(density, np.float64)
    c = np.fft.rfft(density, axis=-1)
    return -2.0 * np.log(np.abs(c[..., 1]) / np.abs(c[..., 0]))
