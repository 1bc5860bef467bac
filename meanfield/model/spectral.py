r"""The spectral balance ratio of a model and a setter that makes it exact.

$$ \rho = \frac{\lVert a_\text{mlp} W_\text{eff}\rVert_2}{\lVert a_\text{attn} V\rVert_2}, \qquad
   W_\text{eff} = \begin{cases} W & \text{affine} \\ W_2 W_1 & \text{two-layer}\end{cases} $$

How this differs from the 1:1 rule (Gamaleldin 2025; MISSION section 5): the rule uses a decoder
layer's weights, $W_\text{mlp} = W_\text{down} W_\text{up}$ and $W_\text{attn} = W_o$ (the output
projection alone, or $W_o W_o^\top$ when not square). Here the attention side is the value map
$V$ of the continuous model, which plays the role of $W_o W_v$ (the value-aware variant), and
both branch weights are included. Both drop the activation's slope at zero (gelu'(0) = 1/2,
tanh'(0) = 1, relu: undefined), so for a two-layer MLP $\rho$ measures the weights, not the
branch's Jacobian.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp

from .._symeig import ROLLED_MAX_N, eigvalsh


def spectral_norm(A):
    r"""$\lVert A\rVert_2 = \sqrt{\lambda_\max(A^\top A)}$ over the last two axes. Up to
    `ROLLED_MAX_N` on the smaller side from the Gram matrix's Jacobi eigenvalues (`meanfield._symeig`:
    no LAPACK call, so sweeps of the spectral ratio split over several CPU devices; the largest
    eigenvalue carries a relative error of a few eps, so the norm agrees with the SVD's to rounding);
    larger matrices by `jnp.linalg.norm(A, 2)` (an SVD)."""
    r, c = A.shape[-2:]
    if min(r, c) > ROLLED_MAX_N:
        return jnp.linalg.norm(A, ord=2, axis=(-2, -1))
    At = jnp.swapaxes(A, -1, -2)
    G = At @ A if c <= r else A @ At
    return jnp.sqrt(jnp.maximum(eigvalsh(G)[..., -1], 0))


def mlp_effective_matrix(model):
    """W (affine) or W2 @ W1 (two-layer); per layer for a piecewise model."""
    if model.mlp == "affine":
        return model.W
    if model.mlp == "two_layer":
        return model.W2 @ model.W1
    raise ValueError("spectral ratio: the model has no MLP (mlp='none'), so rho = 0 and cannot be set.")


def spectral_ratio(model):
    """rho = ||a_mlp W_eff||_2 / ||a_attn V||_2 (one value per layer for a piecewise model)."""
    if model.attention == "none":
        raise ValueError("spectral ratio: the model has no attention (attention='none'); rho is undefined.")
    num = jnp.abs(model.a_mlp) * spectral_norm(mlp_effective_matrix(model))
    den = jnp.abs(model.a_attn) * spectral_norm(model.V)
    return num / den


def with_spectral_ratio(model, rho):
    """A copy of `model` whose MLP branch is rescaled (through `a_mlp`) so that `spectral_ratio == rho`.

    The whole MLP branch output (biases included) is multiplied by the same factor, so its
    shape is unchanged; only the balance between the two branches moves. `rho` may be a
    scalar or, for a piecewise model, one value per layer. jit- and vmap-compatible.

    Raises:
        ValueError: if the model has no MLP or no attention, or if `rho` is not positive.
    """
    try:
        bad = bool(jnp.any(jnp.asarray(rho) <= 0))
    except Exception:  # traced: cannot check here
        bad = False
    if bad:
        raise ValueError(f"with_spectral_ratio: `rho` must be > 0; got {rho}.")
    current = spectral_ratio(model)
    new_a = model.a_mlp * jnp.asarray(rho, model.dtype) / current
    return eqx.tree_at(lambda m: m.a_mlp, model, new_a.astype(model.dtype))
