"""Typed config -> Model and initial state, written so that numbers may be JAX tracers.

One route from YAML to a `Model`: the validated `ExperimentConfig` of a group (`plan.Group.config`)
and the point's swept numbers by path (`{"model.spectral_ratio": x, "seed": s, ...}`, traced
scalars inside `jax.vmap`) give `point_config(cfg, values)`, the typed config of that point; its
`model` section goes to `build_model`, its `initial` section to `initial_tokens` /
`initial_moments`. Nothing here branches on a number; only strings and shapes pick code paths.
Seeds: `key = jax.random.key(seed)`; the weights use `fold_in(key, 0)` (the same draw as
`Model.random(fold_in(key, 0), d, ...)`), the initial tokens `fold_in(key, 1)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import BaseModel

from ..initial_tokens import gaussian_tokens, hemisphere, sphere_uniform
from ..model.params import Model, random_weights
from ..model.spectral import with_spectral_ratio
from .config import Diag, Eye, InitialConfig, ModelConfig

C = TypeVar("C", bound=BaseModel)


def _replace(node, parts: list[str], value, path: str):
    if not parts:
        return value
    head, rest = parts[0], parts[1:]
    if isinstance(node, BaseModel) and head in type(node).model_fields:
        return node.model_copy(update={head: _replace(getattr(node, head), rest, value, path)})
    if isinstance(node, (list, tuple)) and head.isdigit() and int(head) < len(node):
        new = list(node)
        new[int(head)] = _replace(node[int(head)], rest, value, path)
        return new
    raise KeyError(f"no field `{path}` in the config")


def point_config(cfg: C, values: Mapping[str, Any], prefix: str = "") -> C:
    """`cfg` (a validated config section) with the numbers at `values`' paths replaced: the typed
    config of one sweep point. Paths are dotted (`model.beta`, `model.V.diag.0`), relative to the
    whole experiment; `prefix` ("model") is the path of `cfg` in it (paths outside it are skipped).
    Not validated again (the plan validated every point); values may be tracers."""
    head = prefix + "." if prefix else ""
    for path, value in values.items():
        if path.startswith(head):
            cfg = _replace(cfg, path[len(head):].split("."), value, path)
    return cfg


def matrix_from_spec(spec, shape, random_value, dtype):
    """'random' -> the seeded draw; Eye(a) -> a I; Diag(v) -> diag(v); nested list -> array."""
    if isinstance(spec, str):
        return random_value
    if isinstance(spec, Eye):
        return spec.eye * jnp.eye(shape[0], shape[1], dtype=dtype)
    if isinstance(spec, Diag):
        out = jnp.zeros(shape, dtype)
        vals = jnp.stack([jnp.asarray(v, dtype) for v in spec.diag])
        return out.at[jnp.arange(len(spec.diag)), jnp.arange(len(spec.diag))].set(vals)
    return jnp.stack([jnp.stack([jnp.asarray(v, dtype) for v in row]) for row in spec])


def build_model(model: ModelConfig, key, dtype, values: Mapping[str, Any] | None = None) -> Model:
    """The `Model` a `model:` section describes, with the point's numbers `values` (path -> number,
    e.g. `{"model.spectral_ratio": rho}`; tracers allowed) in place of the section's.

    Weights: `random_weights(key, d, ...)` for every `random` matrix; then `with_spectral_ratio`
    when `model.spectral_ratio` is set."""
    m = point_config(model, values or {}, "model")
    d = m.d
    k = m.qk_dim or d
    h = m.hidden or 4 * d
    rnd = random_weights(key, d, hidden=h, qk_dim=k, dtype=dtype)
    shapes = {"Q": (k, d), "K": (k, d), "V": (d, d), "W": (d, d), "W1": (h, d), "W2": (d, h)}
    mats = {name: matrix_from_spec(getattr(m, name), shape, rnd[name], dtype) for name, shape in shapes.items()}
    b = m.b
    b = jnp.stack([jnp.asarray(v, dtype) for v in b]) if isinstance(b, list) else jnp.full((d,), b, dtype)
    kwargs = dict(
        attention=m.attention, causal=m.causal, beta=m.beta, a_attn=m.a_attn, a_mlp=m.a_mlp,
        mlp=m.mlp, activation=m.activation, norm=m.norm, dtype=dtype,
    )
    if m.attention != "none":
        kwargs.update(Q=mats["Q"], K=mats["K"], V=mats["V"])
    if m.mlp == "affine":
        kwargs.update(W=mats["W"], b=b)
    elif m.mlp == "two_layer":
        kwargs.update(W1=mats["W1"], W2=mats["W2"], b2=b)
    out = Model(**kwargs)
    if m.spectral_ratio is not None:
        out = with_spectral_ratio(out, m.spectral_ratio)
    return out


def initial_moments(init: InitialConfig, d: int, dtype):
    """(m0, S0) of the `initial:` section (scalar mean broadcast; scalar cov s means s I)."""
    mean = init.mean
    m0 = jnp.stack([jnp.asarray(v, dtype) for v in mean]) if isinstance(mean, list) else jnp.full((d,), mean, dtype)
    cov = init.cov
    if isinstance(cov, (int, float)) or (hasattr(cov, "shape") and jnp.ndim(cov) == 0):
        S0 = cov * jnp.eye(d, dtype=dtype)
    else:
        S0 = matrix_from_spec(cov, (d, d), None, dtype)
    return m0, S0


def initial_tokens(init: InitialConfig, d: int, key, dtype, file_tokens: np.ndarray | None = None):
    """X0 (n, d) for the particle simulator."""
    n = init.n
    kind = init.kind
    if kind == "sphere":
        return sphere_uniform(key, n, d, dtype)
    if kind == "hemisphere":
        return hemisphere(key, n, d, init.direction, dtype)
    if kind == "file":
        return jnp.asarray(file_tokens, dtype)
    m0, S0 = initial_moments(init, d, dtype)
    return gaussian_tokens(key, n, m0, S0, dtype)


def point_keys(seed):
    """(weights key, initial-state key) of a point's `seed`: `fold_in(key(seed), 0)` and `fold_in(.., 1)`."""
    key = jax.random.key(seed)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
