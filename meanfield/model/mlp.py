r"""The MLP branch as a pure function of one token matrix X (n, d).

- `"none"`:      $0$
- `"affine"`:    $W x + b$
- `"two_layer"`: $W_2\,\sigma(W_1 x + b_1) + b_2$, $\sigma \in$ {relu, tanh, gelu}; gelu is the
  exact form $x\,\Phi(x)$ (not the tanh approximation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._linalg import matmul
from .._types import Tokens

ACTIVATION_FNS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def mlp(model, X: Tokens) -> Tokens:
    r"""Row-wise MLP branch: $0$ (none), $W x_i + b$ (affine) or $W_2\,\sigma(W_1 x_i + b_1) + b_2$ (two_layer),
    for X of shape (n, d); returns (n, d)."""
    if model.mlp == "none":
        return jnp.zeros_like(X)
    if model.mlp == "affine":
        return matmul(X, model.W.T) + model.b
    act = ACTIVATION_FNS[model.activation]
    return matmul(act(matmul(X, model.W1.T) + model.b1), model.W2.T) + model.b2
