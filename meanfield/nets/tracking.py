r"""Gaussian tracking in a finite transformer: does a discrete network keep Gaussian tokens Gaussian?

`DiscreteTransformer` (Flax NNX) is the explicit-Euler discretisation of a `Model`'s token ODE, one
residual block per step of size $h = T/L$:

$$ x_i^{(l+1)} = x_i^{(l)} + h\,\big(a_\text{attn}\mathrm{Attn}(x_i^{(l)}; X^{(l)}) + a_\text{mlp}\mathrm{MLP}(x_i^{(l)})\big), $$

with the model's own attention (softmax over the n tokens present) and MLP (affine, or two-layer
GELU for the standard nonlinear variant). For Gaussian tokens and an affine MLP, the mean-field
map is affine (MISSION section 2), so a Gaussian stays Gaussian; what departs from it is the finite
number of tokens (the empirical softmax average is not the tilted-Gaussian mean) and, with a
nonlinear MLP, the nonlinearity itself.

`tracking_statistics` measures, per layer: the sliced 2-Wasserstein distance between the tokens and
the Gaussian with the same mean and covariance (`sliced_w2_to_gaussian`), and the distance of the
empirical moments to the moment ODE's prediction (`simulate_gaussian` at depth $l h$).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..metrics import empirical_covariance, empirical_mean
from ..model.field import moment_matrices, token_velocity


class Layer(nnx.Module):
    """One residual block: the parameters of `Model` as `nnx.Param`s, applied as $x + h F(x)$."""

    def __init__(self, model, h: float):
        arrays, static = eqx.partition(model, eqx.is_array)
        self.h = h
        self.static = static  # options and shapes only (no arrays)
        self.params = nnx.Param(arrays)  # Q, K, V, beta, W, b, W1, W2, ... as one pytree

    def __call__(self, X):
        model = eqx.combine(self.params.get_value(), self.static)
        return X + self.h * token_velocity(model, X)


class DiscreteTransformer(nnx.Module):
    """L residual blocks with step h = T / L; `__call__` returns all L + 1 token states."""

    def __init__(self, layers):
        self.layers = nnx.List(layers)

    @classmethod
    def from_model(cls, model, depth: float, n_layers: int) -> "DiscreteTransformer":
        """The Euler discretisation of `model` (depth-constant or piecewise: layer l uses `model.at(l h)`)."""
        h = depth / n_layers
        return cls([Layer(model.at(l * h) if model.layer_times is not None else model, h) for l in range(n_layers)])

    def __call__(self, X):
        states = [X]
        for layer in self.layers:
            X = layer(X)
            states.append(X)
        return jnp.stack(states)


@nnx.jit
def _forward(net, X):
    return net(X)


def discrete_moment_map(model, m0, S0, depth: float, n_layers: int):
    r"""The mean-field limit of the Euler network (closure-exact models): per layer
    $m \leftarrow m + h(c + M m)$, $S \leftarrow (I + hM) S (I + hM)^\top$ with (M, c) = `moment_matrices`
    at the current (m, S). Compared with the moment ODE it carries the O(h) Euler error, not the finite-n one."""
    h = depth / n_layers
    d = m0.shape[-1]

    def step(carry, l):
        m, S = carry
        M, c = moment_matrices(model.at(l * h) if model.layer_times is not None else model, m, S)
        E = jnp.eye(d, dtype=m.dtype) + h * M
        new = (m + h * (c + M @ m), E @ S @ E.T)
        return new, new

    _, (ms, Ss) = jax.lax.scan(step, (m0, S0), jnp.arange(n_layers))
    return jnp.concatenate([m0[None], ms]), jnp.concatenate([S0[None], Ss])


def sliced_w2_to_gaussian(X, m, S, key, n_dirs: int = 256) -> jax.Array:
    r"""Sliced 2-Wasserstein distance between the empirical law of X (n, d) and $N(m, S)$.

    $SW_2^2 = \mathbb E_\theta W_2^2(\theta^\top X, N(\theta^\top m, \theta^\top S\theta))$ over uniform
    directions $\theta$; each 1-D $W_2^2$ is $\int_0^1 (F_n^{-1}(u) - F^{-1}(u))^2 du$, evaluated with the
    sorted projections against the Gaussian quantiles at $u_k = (k - 1/2)/n$ (no Gaussian sampling noise).
    The distance of n i.i.d. Gaussian samples to their own law is the floor, of order $n^{-1/2}$ (up to logs).
    """
    n, d = X.shape
    theta = jax.random.normal(key, (n_dirs, d), X.dtype)
    theta = theta / jnp.linalg.norm(theta, axis=1, keepdims=True)
    proj = jnp.sort(X @ theta.T, axis=0)  # (n, n_dirs)
    u = (jnp.arange(n, dtype=X.dtype) + 0.5) / n
    z = jax.scipy.special.ndtri(u)
    mu = theta @ m
    sd = jnp.sqrt(jnp.maximum(jnp.einsum("kd,de,ke->k", theta, S, theta), 0.0))
    q = mu[None, :] + sd[None, :] * z[:, None]
    return jnp.sqrt(jnp.mean((proj - q) ** 2))


def tracking_statistics(net: DiscreteTransformer, X0, key, *, model=None, depth: float | None = None,
                        n_dirs: int = 256) -> dict[str, np.ndarray]:
    """Per layer l = 0..L: sliced W2 to the moment-matched Gaussian; with `model` (closure-exact) also the
    moment ODE's (m, S) at depth l h and the relative errors of the empirical mean and covariance against it
    (`mean_error`, `cov_error`: finite n + O(h)) and against `discrete_moment_map` (`cov_error_map`: finite n)."""
    states = _forward(net, X0)
    means = jax.vmap(empirical_mean)(states)
    covs = jax.vmap(empirical_covariance)(states)
    keys = jax.random.split(key, states.shape[0])
    sw = jax.vmap(lambda X, m, S, k: sliced_w2_to_gaussian(X, m, S, k, n_dirs))(states, means, covs, keys)
    scale = jnp.sqrt(jnp.trace(covs, axis1=1, axis2=2))
    out = {"sw2": np.asarray(sw), "sw2_relative": np.asarray(sw / scale), "means": np.asarray(means),
           "covs": np.asarray(covs)}
    if model is not None:
        from ..simulate.gaussian import simulate_gaussian

        L = states.shape[0] - 1
        ts = jnp.linspace(0.0, depth, L + 1, dtype=X0.dtype)
        sol = simulate_gaussian(model, means[0], covs[0], depth, ts=ts)
        ok = np.asarray(sol.valid)
        m_err = np.linalg.norm(np.asarray(sol.means) - out["means"], axis=1) / np.sqrt(np.trace(out["covs"], axis1=1, axis2=2))
        S_err = (np.linalg.norm(np.asarray(sol.covs) - out["covs"], axis=(1, 2))
                 / np.linalg.norm(np.asarray(sol.covs), axis=(1, 2)))
        dm, dS = discrete_moment_map(model, means[0], covs[0], depth, L)
        dS_err = np.linalg.norm(np.asarray(dS) - out["covs"], axis=(1, 2)) / np.linalg.norm(np.asarray(dS), axis=(1, 2))
        out.update(ode_means=np.asarray(sol.means), ode_covs=np.asarray(sol.covs),
                   mean_error=np.where(ok, m_err, np.nan), cov_error=np.where(ok, S_err, np.nan),
                   map_covs=np.asarray(dS), cov_error_map=dS_err)
    return out
