"""Config dict -> Model and initial state, written so that numbers may be JAX tracers.

A sweep point's numbers (beta, spectral ratio, matrix entries, seeds, ...) arrive as traced
scalars inside `jax.vmap`, so nothing here branches on a number; only strings and shapes pick
code paths. Seeds: `key = jax.random.key(seed)`; the weights use `fold_in(key, 0)` (the same
draw as `Model.random(fold_in(key, 0), d, ...)`), the initial tokens `fold_in(key, 1)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..initial import gaussian_tokens, hemisphere, sphere_uniform
from ..model.params import Model, random_weights
from ..model.spectral import with_spectral_ratio


def matrix_from_spec(spec, shape, random_value, dtype):
    """'random' -> the seeded draw; {eye: a} -> a I; {diag: v} -> diag(v); list -> array."""
    if isinstance(spec, str):
        return random_value
    if isinstance(spec, dict) and "eye" in spec:
        return spec["eye"] * jnp.eye(shape[0], shape[1], dtype=dtype)
    if isinstance(spec, dict) and "diag" in spec:
        out = jnp.zeros(shape, dtype)
        vals = jnp.stack([jnp.asarray(v, dtype) for v in spec["diag"]])
        return out.at[jnp.arange(len(spec["diag"])), jnp.arange(len(spec["diag"]))].set(vals)
    return jnp.stack([jnp.stack([jnp.asarray(v, dtype) for v in row]) for row in spec])


def build_model(m: dict, key, dtype) -> Model:
    """The `Model` a `model:` section describes (numbers may be tracers)."""
    d = m["d"]
    k = m["qk_dim"] or d
    h = m["hidden"] or 4 * d
    rnd = random_weights(key, d, hidden=h, qk_dim=k, dtype=dtype)
    shapes = {"Q": (k, d), "K": (k, d), "V": (d, d), "W": (d, d), "W1": (h, d), "W2": (d, h)}
    mats = {name: matrix_from_spec(m[name], shape, rnd[name], dtype) for name, shape in shapes.items()}
    b = m["b"]
    b = jnp.stack([jnp.asarray(v, dtype) for v in b]) if isinstance(b, list) else jnp.full((d,), b, dtype)
    kwargs = dict(
        attention=m["attention"], causal=m["causal"], beta=m["beta"], a_attn=m["a_attn"], a_mlp=m["a_mlp"],
        mlp=m["mlp"], activation=m["activation"], norm=m["norm"], dtype=dtype,
    )
    if m["attention"] != "none":
        kwargs.update(Q=mats["Q"], K=mats["K"], V=mats["V"])
    if m["mlp"] == "affine":
        kwargs.update(W=mats["W"], b=b)
    elif m["mlp"] == "two_layer":
        kwargs.update(W1=mats["W1"], W2=mats["W2"], b2=b)
    model = Model(**kwargs)
    if m["spectral_ratio"] is not None:
        model = with_spectral_ratio(model, m["spectral_ratio"])
    return model


def initial_moments(init: dict, d: int, dtype):
    """(m0, S0) of the `initial:` section (scalar mean broadcast; scalar cov s means s I)."""
    mean = init["mean"]
    m0 = jnp.stack([jnp.asarray(v, dtype) for v in mean]) if isinstance(mean, list) else jnp.full((d,), mean, dtype)
    cov = init["cov"]
    if isinstance(cov, (int, float)) or (hasattr(cov, "shape") and jnp.ndim(cov) == 0):
        S0 = cov * jnp.eye(d, dtype=dtype)
    else:
        S0 = matrix_from_spec(cov, (d, d), None, dtype)
    return m0, S0


def initial_tokens(init: dict, d: int, key, dtype, file_tokens: np.ndarray | None = None):
    """X0 (n, d) for the particle simulator."""
    n = init["n"]
    kind = init["kind"]
    if kind == "sphere":
        return sphere_uniform(key, n, d, dtype)
    if kind == "hemisphere":
        return hemisphere(key, n, d, init["direction"], dtype)
    if kind == "file":
        return jnp.asarray(file_tokens, dtype)
    m0, S0 = initial_moments(init, d, dtype)
    return gaussian_tokens(key, n, m0, S0, dtype)


def point_keys(seed):
    key = jax.random.key(seed)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
