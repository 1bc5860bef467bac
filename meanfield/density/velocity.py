r"""The mean-field velocity on the circle: the particle model's field averaged over a density.

Tokens on $S^1$ are $x(\theta) = (\cos\theta, \sin\theta)$ with unit tangent
$e(\theta) = (-\sin\theta, \cos\theta)$. For a density $\rho$ the velocity of a token at $\theta$
is the tangential component of the field of MISSION section 1, with the sum over tokens replaced
by the integral against $\rho$ ($\int\rho = 1$):

$$ v[\rho](\theta) = a_\text{attn}\,\Big\langle e(\theta),
   \frac{\int k(\theta,\varphi)\, V x(\varphi)\,\rho(\varphi)\,d\varphi}{Z(\theta)} \Big\rangle
   + a_\text{mlp}\,\langle e(\theta), \mathrm{MLP}(x(\theta))\rangle, $$

$k(\theta,\varphi) = e^{\beta\langle Q x(\theta), K x(\varphi)\rangle}$, softmax:
$Z(\theta) = \int k(\theta,\varphi)\rho(\varphi)\,d\varphi$; unnormalised: $Z = 1$; shaped:
softmax term $+ \langle e, V x(\theta)\rangle - \langle e, V\!\int x\rho\rangle$. The integral is the
trapezoidal rule on the grid of `density` (spectrally accurate for a smooth periodic integrand):
exactly the particle model's velocity for tokens at the grid nodes carrying weights
$w_j = 2\pi\rho_j/N$. Two evaluations of the same quadrature sum:

- `"dense"`: the (N, N) kernel matrix, any 2x2 Q, K, V;
- `"fft"`: when $Q^\top K = aI + bJ$ and $V = cI + dJ$ ($J$ the quarter turn) the kernel depends on
  $\theta - \varphi$ only and the sums are circular correlations, done with the FFT in O(N log N).

`angle_velocity` evaluates the particle model's own tangential velocity for n tokens at angles
$\theta_i$ (weights $1/n$) in O(n P) instead of O(n^2), from the separable expansion
$k(\theta,\varphi) = \sum_{|p|,|q|<P/2} c_{pq} e^{i(p\theta + q\varphi)}$ (a 2-d FFT of the kernel;
the kernel is entire, so the coefficients fall off like $(\beta\|Q^\top K\|)^{|p|}/|p|!$ and P is
chosen so the dropped ones are below float64 rounding). Use float64 there: the expansion sums
terms of size $e^{\beta\|Q^\top K\|}$ to get values as small as $e^{-\beta\|Q^\top K\|}$.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..model.mlp import mlp as _mlp
from .grid import to_tokens

METHODS = ("auto", "dense", "fft")


def check_model(model, where: str) -> None:
    """The density PDE needs d = 2, norm='sphere' and no causal mask."""
    if model.d != 2:
        raise ValueError(f"{where}: the density PDE is for tokens on the circle, d = 2; got d = {model.d}.")
    if model.norm != "sphere":
        raise ValueError(
            f"{where}: the density PDE lives on the circle, so the model needs norm='sphere'; got {model.norm!r}."
        )
    if model.causal:
        raise ValueError(
            f"{where}: causal attention has no mean-field density limit (a density has no token order); "
            "got causal=True."
        )


def _J(dtype):
    return jnp.array([[0.0, -1.0], [1.0, 0.0]], dtype)


def rotation_invariant(model, atol: float = 0.0) -> bool:
    """Whether every layer has $Q^\top K$ and $V$ of the form $aI + bJ$ (commuting with rotations).

    Needs concrete arrays (returns False for traced ones). The MLP is a local term and does not
    enter (it may break the rotation symmetry of the dynamics but not the convolution structure).
    """
    if model.attention == "none":
        return True
    try:
        Q = np.asarray(model.Q, np.float64)
        K = np.asarray(model.K, np.float64)
        V = np.asarray(model.V, np.float64)
    except Exception:  # traced
        return False
    A = np.swapaxes(Q, -1, -2) @ K

    def ok(M):
        tol = atol + 1e-6 * max(np.max(np.abs(M)), 1e-30)
        return np.all(np.abs(M[..., 0, 0] - M[..., 1, 1]) <= tol) and np.all(np.abs(M[..., 0, 1] + M[..., 1, 0]) <= tol)

    return bool(ok(A) and ok(V))


# --- per-layer operators on an M-point grid -----------------------------------------------------

def layer_operator(layer, M: int, method: str, dtype) -> dict:
    """Everything `apply_operator` needs for one depth-constant layer on the M-point grid."""
    theta = (2 * math.pi / M) * jnp.arange(M, dtype=dtype)
    X = to_tokens(theta)
    E = jnp.stack([-jnp.sin(theta), jnp.cos(theta)], axis=-1)
    local = jnp.zeros((M,), dtype)
    if layer.mlp != "none":
        local = local + layer.a_mlp * jnp.sum(E * _mlp(layer, X), axis=-1)
    op = {"local": local}
    if layer.attention == "none":
        return op
    VX = X @ layer.V.T
    if layer.attention == "shaped":
        op["local"] = op["local"] + layer.a_attn * jnp.sum(E * VX, axis=-1)
    if method == "dense":
        logits = layer.beta * (X @ layer.Q.T) @ (X @ layer.K.T).T  # (query i, key j)
        rowmax = jnp.max(logits, axis=1)
        op["kernel"] = jnp.exp(logits - rowmax[:, None])
        op["rowmax"] = rowmax
    else:  # fft: logit(psi) with psi = phi - theta, psi on the grid
        A = layer.Q.T @ layer.K
        a, b = 0.5 * (A[0, 0] + A[1, 1]), 0.5 * (A[1, 0] - A[0, 1])
        c, d = 0.5 * (layer.V[0, 0] + layer.V[1, 1]), 0.5 * (layer.V[1, 0] - layer.V[0, 1])
        logit = layer.beta * (a * jnp.cos(theta) - b * jnp.sin(theta))
        shift = jnp.max(logit)
        k = jnp.exp(logit - shift)
        g = k * (c * jnp.sin(theta) + d * jnp.cos(theta))
        # conj of the transforms, stored as (real, imag) so the solver's args stay real
        k_hat, g_hat = jnp.fft.rfft(k), jnp.fft.rfft(g)
        op["k_hat"] = jnp.stack([k_hat.real, -k_hat.imag])
        op["g_hat"] = jnp.stack([g_hat.real, -g_hat.imag])
        op["rowmax"] = jnp.full((M,), shift, dtype)
    return op


def apply_operator(op: dict, layer, density: jax.Array) -> jax.Array:
    """Tangential velocity on the M-point grid for the density values `density` (M,) there."""
    v = op["local"]
    if layer.attention == "none":
        return v
    M = density.shape[-1]
    dtype = density.dtype
    w = density * (2 * math.pi / M)
    theta = (2 * math.pi / M) * jnp.arange(M, dtype=dtype)
    E = jnp.stack([-jnp.sin(theta), jnp.cos(theta)], axis=-1)
    if "kernel" in op:
        X = to_tokens(theta)
        VX = X @ layer.V.T
        Z = op["kernel"] @ w
        num = jnp.sum(E * (op["kernel"] @ (w[:, None] * VX)), axis=-1)
    else:
        w_hat = jnp.fft.rfft(w)
        k_hat = op["k_hat"][0] + 1j * op["k_hat"][1]
        g_hat = op["g_hat"][0] + 1j * op["g_hat"][1]
        Z = jnp.fft.irfft(w_hat * k_hat, n=M)
        num = jnp.fft.irfft(w_hat * g_hat, n=M)
    if layer.attention == "unnormalised":
        attn = num * jnp.exp(op["rowmax"])
    else:
        attn = num / Z
    if layer.attention == "shaped":
        X = to_tokens(theta)
        mean_vx = (w @ X) @ layer.V.T
        attn = attn - E @ mean_vx
    return v + layer.a_attn * attn


def resolve_method(model, method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}; got {method!r}.")
    if method == "auto":
        return "fft" if rotation_invariant(model) else "dense"
    if method == "fft" and not rotation_invariant(model):
        raise ValueError(
            "method='fft' needs Q^T K and V of the form a I + b J (rotation-invariant) in every layer; "
            "use method='dense' for general Q, K, V."
        )
    return method


def density_velocity(model, density, *, t=0.0, method: str = "auto") -> jax.Array:
    r"""$v[\rho](\theta_j)$ at the grid nodes of `density` (N,), for the layer active at depth `t`.

    Equal (to float rounding) to the tangential component of `token_velocity` for tokens at the
    nodes $\theta_j$ with weights $2\pi\rho_j/N$ (see the module docstring).
    """
    check_model(model, "density_velocity")
    density = jnp.asarray(density, model.dtype)
    layer = model.at(jnp.asarray(t, model.dtype))
    method = resolve_method(model, method)
    op = layer_operator(layer, density.shape[-1], method, density.dtype)
    return apply_operator(op, layer, density)


# --- particle velocity in O(n P) ----------------------------------------------------------------

def kernel_modes(layer, dtype, P: int | None = None):
    r"""(C, shift, P): $c_{pq}$ with $e^{\beta\langle Qx(\theta),Kx(\varphi)\rangle - \text{shift}}
    = \sum_{p,q} C_{pq} e^{i(p\theta + q\varphi)}$, $p, q \in [-P/2, P/2)$ in FFT order."""
    A = layer.Q.T @ layer.K
    if P is None:
        P = kernel_order(layer)
    theta = (2 * math.pi / P) * jnp.arange(P, dtype=dtype)
    X = to_tokens(theta)
    logits = layer.beta * (X @ A) @ X.T  # [a, b] = logit(theta_a, phi_b)
    shift = jnp.max(logits)
    C = jnp.fft.fft2(jnp.exp(logits - shift)) / (P * P)
    return C, shift, P


def kernel_order(layer) -> int:
    """Grid size P for `kernel_modes`: (beta ||Q^T K||_2 / 2)^{P/2} / (P/2)! below float64 eps."""
    try:
        s = float(np.abs(np.asarray(layer.beta)) * np.linalg.norm(np.asarray(layer.Q).T @ np.asarray(layer.K), 2))
    except Exception:  # traced: be generous
        return 128
    half = 8  # |c_p| <~ (s/2)^p / p! relative to the largest
    while half * math.log(max(s / 2, 1e-12)) - math.lgamma(half + 1) > math.log(1e-18) and half < 512:
        half += 2
    return 8 * (-(-(2 * half + 8) // 8))


def angle_velocity(model, theta, *, t=0.0, P: int | None = None, weights=None) -> jax.Array:
    r"""Tangential particle velocity $\langle e(\theta_i), F(X)_i\rangle$ of n tokens at angles `theta`
    (the field of `token_velocity`, weights 1/n or `weights` summing to 1), in O(n P) by the
    kernel's Fourier expansion."""
    check_model(model, "angle_velocity")
    layer = model.at(jnp.asarray(t, model.dtype))
    theta = jnp.asarray(theta, model.dtype)
    return layer_angle_velocity(layer, theta, P, None if weights is None else jnp.asarray(weights, model.dtype))


def layer_angle_velocity(layer, theta, P, weights=None):
    """`angle_velocity` of one layer (`model.at(t)`) at angles `theta` (in the layer's dtype), with
    `P` Fourier modes of the kernel (None: `kernel_modes` chooses) and optional weights."""
    dtype = theta.dtype
    X = to_tokens(theta)
    E = jnp.stack([-jnp.sin(theta), jnp.cos(theta)], axis=-1)
    v = jnp.zeros_like(theta)
    if layer.mlp != "none":
        v = v + layer.a_mlp * jnp.sum(E * _mlp(layer, X), axis=-1)
    if layer.attention == "none":
        return v
    C, shift, P = kernel_modes(layer, dtype, P)
    half = P // 2
    # e^{i q theta} for q = 0..half+1 from real cos / sin (vectorised; complex exp is not)
    qa = theta[:, None] * jnp.arange(half + 2, dtype=dtype)[None, :]
    pw = jax.lax.complex(jnp.cos(qa), jnp.sin(qa))  # (n, half + 2)
    if weights is None:
        mp = jnp.mean(pw, axis=0)                                 # (1/n) sum_j e^{i q phi_j}, q >= 0
    else:
        mp = weights.astype(pw.dtype) @ pw                        # sum_j w_j e^{i q phi_j}
    m = jnp.concatenate([jnp.conj(mp[1:][::-1]), mp])            # q = -half-1 .. half+1
    q = jnp.fft.fftfreq(P, 1.0 / P).astype(jnp.int32)  # FFT order
    idx = q + half + 1
    m1 = m[idx]
    mc = 0.5 * (m[idx + 1] + m[idx - 1])          # (1/n) sum e^{iq phi} cos phi
    ms = (m[idx + 1] - m[idx - 1]) / 2j           # (1/n) sum e^{iq phi} sin phi
    mom = jnp.stack([m1, mc, ms], axis=-1)        # (P, 3)
    inner = C @ mom                               # (P over p, 3)
    # sum_p e^{ip theta} inner_p, p in [-half, half): real part, using e^{-ip theta} = conj(z^p)
    pos = pw[:, :half] @ inner[:half]                              # p = 0..half-1
    neg = jnp.conj(pw[:, 1:half + 1]) @ inner[P - 1:half - 1:-1]   # p = -1..-half
    S = jnp.real(pos + neg)                       # (n, 3): Z, sum k cos, sum k sin
    Z = S[:, 0]
    num_vec = S[:, 1:] @ layer.V.T                # sum_j k_ij V x_j
    num = jnp.sum(E * num_vec, axis=-1)
    if layer.attention == "unnormalised":
        attn = num * jnp.exp(shift)
    else:
        attn = num / Z
    if layer.attention == "shaped":
        VX = X @ layer.V.T
        mean_vx = jnp.mean(VX, axis=0) if weights is None else weights @ VX
        attn = attn + jnp.sum(E * VX, axis=-1) - E @ mean_vx
    return v + layer.a_attn * attn
