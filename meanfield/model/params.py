r"""The one definition of the transformer ODE: a `Model` pytree.

The residual stream of a transformer, read as an ODE in depth `t`, moves every token
`x_i in R^d` by

$$ \frac{dx_i}{dt} = a_\text{attn}\,\mathrm{Attn}(x_i; X) + a_\text{mlp}\,\mathrm{MLP}(x_i), $$

optionally projected on the tangent space of the sphere (layer norm, `norm="sphere"`):
$\dot x_i = P_{x_i} v_i$ with $P_x v = v - \langle x, v\rangle x$.

`Model` holds the arrays (`Q, K, V, beta, a_attn, W, b, W1, b1, W2, b2, a_mlp`) as pytree
leaves and the structural choices (`attention, causal, mlp, activation, norm`) as static
fields, so a `Model` can be passed through `jax.jit`, stacked and `jax.vmap`-ed over like any
pytree. Depth-dependent parameters are piecewise constant: `Model.piecewise([m0, m1, ...],
times=[t1, ...])` stacks layers along a leading axis and `model.at(t)` returns the layer
active at depth `t` (layer `l` acts on `[t_l, t_{l+1})`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import _display as D
from .._display import Summarised, Summary

ATTENTIONS = ("softmax", "unnormalised", "shaped", "none")
MLPS = ("none", "affine", "two_layer")
ACTIVATIONS = ("relu", "tanh", "gelu")
NORMS = ("none", "sphere")

ATTENTION_ALIASES = {
    "unnormalized": ("unnormalised", False),
    "usa": ("unnormalised", False),
    "sa": ("softmax", False),
    "causal": ("softmax", True),
    "causal_softmax": ("softmax", True),
    "causal_unnormalised": ("unnormalised", True),
    "causal_unnormalized": ("unnormalised", True),
}
"""Other names `Model(attention=...)` accepts: alias -> (attention, implied causal)."""

_ARRAY_FIELDS = ("Q", "K", "V", "beta", "a_attn", "W", "b", "W1", "b1", "W2", "b2", "a_mlp")


def default_float_dtype() -> np.dtype:
    """JAX's default float: float32, or float64 once `jax_enable_x64` is on."""
    return jnp.zeros(()).dtype


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"Model: `{name}` must be one of {list(allowed)}; got {value!r}.")
    return value


def _check_finite(where: str, name: str, arr) -> None:
    """ValueError naming the field when a concrete array holds NaN or inf (after the cast to the
    model's dtype, so a float64 1e39 that overflows float32 is caught). Traced values (a Model
    built inside jit / vmap, as the sweep engine does) are not checked."""
    if isinstance(arr, jax.core.Tracer):
        return
    try:
        host = np.asarray(arr)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if np.issubdtype(host.dtype, np.number) and not np.all(np.isfinite(host)):
        nan, inf = int(np.isnan(host).sum()), int(np.isinf(host).sum())
        shown = f"{host.item()!r}" if host.ndim == 0 else f"{nan} NaN and {inf} inf of {host.size} entries"
        raise ValueError(f"{where}: `{name}` must be finite (every weight, beta, a_attn, a_mlp); got {shown}.")


def _as_array(name: str, value: Any, dtype, ndim: int | None) -> jax.Array | None:
    if value is None:
        return None
    arr = jnp.asarray(value, dtype=dtype)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(
            f"Model: `{name}` must be a {ndim}-d array; got shape {tuple(arr.shape)}."
        )
    _check_finite("Model", name, arr)
    return arr


class Model(Summarised, eqx.Module):
    r"""Parameters of $\dot x_i = a_\text{attn}\mathrm{Attn}(x_i;X) + a_\text{mlp}\mathrm{MLP}(x_i)$.

    Attention (`attention=`), with logits $\ell_{ij} = \beta\langle Q x_i, K x_j\rangle$:

    - `"softmax"` (SA): $\sum_j \mathrm{softmax}_j(\ell_{ij})\, V x_j$;
    - `"unnormalised"` (USA): $\frac1n \sum_j e^{\ell_{ij}} V x_j$;
    - `"shaped"` (Noci et al. 2023): $V x_i + \sum_j (\mathrm{softmax}_j(\ell_{ij}) - \frac1n) V x_j$,
      i.e. the attention matrix $I + \mathrm{softmax} - \frac1n 11^\top$; `beta` plays the
      role of the inverse temperature $1/\tau$;
    - `"none"`: no attention branch.

    `causal=True` restricts every sum to $j \le i$ (token $i$ sees its prefix; the
    unnormalised sum keeps its $1/n$, the shaped centring becomes $1/i$). The shorthand
    `attention="causal"` means causal softmax.

    MLP (`mlp=`): `"none"`; `"affine"` $W x + b$; `"two_layer"` $W_2\,\sigma(W_1 x + b_1) + b_2$
    with $\sigma$ = `activation` in {relu, tanh, gelu (exact erf form)}.

    Arguments:
        Q, K: query and key maps, shape (k, d) (k = d usually; k < d gives low-rank attention).
        V: value map, shape (d, d).
        beta: inverse temperature (scalar).
        a_attn, a_mlp: branch weights (scalars).
        W, b: affine MLP, shapes (d, d) and (d,) (b defaults to 0).
        W1, b1, W2, b2: two-layer MLP, shapes (h, d), (h,), (d, h), (d,) (biases default to 0).
        norm: `"none"` (tokens in R^d) or `"sphere"` (tokens on S^{d-1}).
        dtype: float dtype of every array; default JAX's default float (float32, float64
            under `jax_enable_x64`).

    Raises:
        ValueError: naming the field, the rule and the value received, for unknown choices,
            missing matrices, inconsistent shapes, and concrete arrays holding NaN or inf (after
            the cast to `dtype`; traced values, inside jit / vmap, are not checked).
    """

    Q: jax.Array | None
    K: jax.Array | None
    V: jax.Array | None
    beta: jax.Array
    a_attn: jax.Array
    W: jax.Array | None
    b: jax.Array | None
    W1: jax.Array | None
    b1: jax.Array | None
    W2: jax.Array | None
    b2: jax.Array | None
    a_mlp: jax.Array
    layer_times: jax.Array | None
    attention: str = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    mlp: str = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    norm: str = eqx.field(static=True)

    def __init__(
        self,
        *,
        Q=None,
        K=None,
        V=None,
        beta=1.0,
        a_attn=1.0,
        attention: str = "softmax",
        causal: bool = False,
        W=None,
        b=None,
        W1=None,
        b1=None,
        W2=None,
        b2=None,
        a_mlp=1.0,
        mlp: str | None = None,
        activation: str = "gelu",
        norm: str = "none",
        dtype=None,
    ):
        dtype = default_float_dtype() if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"Model: `dtype` must be a float dtype; got {dtype}.")
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError(
                "Model: `dtype=float64` needs `jax.config.update('jax_enable_x64', True)` "
                "before any array is created."
            )
        attention = attention.lower()
        if attention in ATTENTION_ALIASES:
            attention, implied_causal = ATTENTION_ALIASES[attention]
            causal = causal or implied_causal
        self.attention = _choice("attention", attention, ATTENTIONS)
        self.causal = bool(causal)
        self.activation = _choice("activation", activation, ACTIVATIONS)
        self.norm = _choice("norm", norm, NORMS)
        if mlp is None:  # infer from the matrices given
            mlp = "two_layer" if W1 is not None else ("affine" if W is not None else "none")
        self.mlp = _choice("mlp", mlp, MLPS)

        self.Q = _as_array("Q", Q, dtype, 2)
        self.K = _as_array("K", K, dtype, 2)
        self.V = _as_array("V", V, dtype, 2)
        self.beta = _as_array("beta", beta, dtype, 0)
        self.a_attn = _as_array("a_attn", a_attn, dtype, 0)
        self.a_mlp = _as_array("a_mlp", a_mlp, dtype, 0)
        self.W = _as_array("W", W, dtype, 2)
        self.W1 = _as_array("W1", W1, dtype, 2)
        self.W2 = _as_array("W2", W2, dtype, 2)
        self.layer_times = None

        if self.attention != "none":
            for name in ("Q", "K", "V"):
                if getattr(self, name) is None:
                    raise ValueError(
                        f"Model: attention={self.attention!r} needs `{name}`; got None "
                        "(use attention='none' for an MLP-only model)."
                    )
        else:
            self.Q = self.K = self.V = None

        d = self._infer_d()
        if self.attention != "none":
            if self.V.shape != (d, d):
                raise ValueError(f"Model: `V` must have shape (d, d) = {(d, d)}; got {self.V.shape}.")
            if self.Q.shape[1] != d or self.K.shape != self.Q.shape:
                raise ValueError(
                    f"Model: `Q` and `K` must share a shape (k, d) with d = {d}; "
                    f"got Q {self.Q.shape}, K {self.K.shape}."
                )

        zeros = lambda n: jnp.zeros((n,), dtype)  # noqa: E731
        if self.mlp == "affine":
            if self.W is None:
                raise ValueError("Model: mlp='affine' needs `W`; got None.")
            if self.W.shape != (d, d):
                raise ValueError(f"Model: `W` must have shape (d, d) = {(d, d)}; got {self.W.shape}.")
            self.b = zeros(d) if b is None else _as_array("b", b, dtype, 1)
            if self.b.shape != (d,):
                raise ValueError(f"Model: `b` must have shape (d,) = {(d,)}; got {self.b.shape}.")
            self.W1 = self.W2 = self.b1 = self.b2 = None
        elif self.mlp == "two_layer":
            if self.W1 is None or self.W2 is None:
                raise ValueError("Model: mlp='two_layer' needs `W1` and `W2`; got None.")
            h = self.W1.shape[0]
            if self.W1.shape != (h, d) or self.W2.shape != (d, h):
                raise ValueError(
                    f"Model: two-layer MLP needs `W1` (h, d) and `W2` (d, h) with d = {d}; "
                    f"got W1 {self.W1.shape}, W2 {self.W2.shape}."
                )
            self.b1 = zeros(h) if b1 is None else _as_array("b1", b1, dtype, 1)
            self.b2 = zeros(d) if b2 is None else _as_array("b2", b2, dtype, 1)
            if self.b1.shape != (h,) or self.b2.shape != (d,):
                raise ValueError(
                    f"Model: `b1` must have shape (h,) = {(h,)} and `b2` shape (d,) = {(d,)}; "
                    f"got {self.b1.shape} and {self.b2.shape}."
                )
            self.W = self.b = None
        else:
            self.W = self.b = self.W1 = self.W2 = self.b1 = self.b2 = None

    def _infer_d(self) -> int:
        for name, axis in (("V", 1), ("W", 1), ("W1", 1), ("W2", 0)):
            arr = getattr(self, name)
            if arr is not None:
                return int(arr.shape[axis])
        raise ValueError("Model: no matrix given, so the token dimension d is unknown.")

    # -- shape information -------------------------------------------------------------
    @property
    def d(self) -> int:
        """Token dimension."""
        for name, axis in (("V", -1), ("W", -1), ("W1", -1), ("W2", -2)):
            arr = getattr(self, name)
            if arr is not None:
                return int(arr.shape[axis])
        raise ValueError("Model has no matrix")  # unreachable for a constructed Model

    @property
    def dtype(self):
        return self.beta.dtype

    @property
    def batch_size(self) -> int | None:
        """B of a stacked batch of models (array leaves with a leading axis B), None for one model."""
        extra = self.beta.ndim - (0 if self.layer_times is None else 1)
        if extra == 0:
            return None
        if extra == 1:
            return int(self.beta.shape[0])
        raise ValueError(f"Model: `beta` has shape {tuple(self.beta.shape)}; a batch of models has one leading axis.")

    @property
    def n_layers(self) -> int:
        """Number of piecewise-constant layers (1 for a depth-constant model)."""
        return 1 if self.layer_times is None else int(self.layer_times.shape[-1]) + 1

    # -- depth schedule -------------------------------------------------------------------
    @classmethod
    def piecewise(cls, layers: Sequence["Model"], times) -> "Model":
        """Stack depth-constant models into a piecewise-constant schedule.

        Layer `l` acts on `[times[l-1], times[l])` (layer 0 from the start, the last one to
        the end); `times` are the `L - 1` interior boundaries, strictly increasing.
        """
        layers = list(layers)
        if len(layers) < 1:
            raise ValueError("Model.piecewise: `layers` must hold at least one Model; got none.")
        times = np.asarray(times, dtype=float).reshape(-1)
        if times.shape[0] != len(layers) - 1:
            raise ValueError(
                f"Model.piecewise: `times` must hold len(layers) - 1 = {len(layers) - 1} "
                f"boundaries; got {times.shape[0]}."
            )
        if not np.all(np.isfinite(times)):
            raise ValueError(f"Model.piecewise: `times` must be finite; got {times}.")
        if np.any(np.diff(times) <= 0):
            raise ValueError(f"Model.piecewise: `times` must be strictly increasing; got {times}.")
        first = layers[0]
        for i, layer in enumerate(layers):
            if layer.layer_times is not None:
                raise ValueError(f"Model.piecewise: layers[{i}] is itself piecewise; nest is not supported.")
            if jax.tree.structure(layer) != jax.tree.structure(first) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(layer), jax.tree.leaves(first))
            ):
                raise ValueError(
                    f"Model.piecewise: layers[{i}] differs from layers[0] in its options or "
                    "array shapes; every layer must share attention, mlp, norm and shapes."
                )
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        return eqx.tree_at(
            lambda m: m.layer_times, stacked, jnp.asarray(times, first.dtype),
            is_leaf=lambda x: x is None,
        )

    def at(self, t) -> "Model":
        """The depth-constant model active at depth `t` (itself when not piecewise)."""
        if self.layer_times is None:
            return self
        idx = jnp.searchsorted(self.layer_times, t, side="right")
        arrays = {name: getattr(self, name) for name in _ARRAY_FIELDS}
        picked = jax.tree.map(lambda x: x[idx], arrays)
        out = eqx.tree_at(lambda m: m.layer_times, self, None)
        for name, value in picked.items():
            if value is not None:
                out = eqx.tree_at(lambda m, n=name: getattr(m, n), out, value)
        return out

    def layer(self, index: int) -> "Model":
        """Layer `index` of a piecewise model as a depth-constant model."""
        if self.layer_times is None:
            if index not in (0, -1):
                raise IndexError(f"Model.layer: a depth-constant model has one layer; got index {index}.")
            return self
        t = jnp.concatenate([self.layer_times[:1] - 1.0, self.layer_times])[index]
        return self.at(t)

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        key: jax.Array,
        d: int,
        *,
        attention: str = "softmax",
        causal: bool = False,
        mlp: str = "two_layer",
        activation: str = "gelu",
        hidden: int | None = None,
        qk_dim: int | None = None,
        norm: str = "none",
        beta=1.0,
        a_attn=1.0,
        a_mlp=1.0,
        bias: bool = False,
        dtype=None,
    ) -> "Model":
        r"""A model with Gaussian weights drawn from `key` (deterministic per key).

        Scalings (LeCun / fan-in): $Q, K \in \mathbb R^{k\times d}$, $V$, $W$, $W_1$ have i.i.d.
        $N(0, 1/d)$ entries, $W_2$ has $N(0, 1/h)$ entries, so every map has O(1) operator norm
        (about 2 for square ones) and the logits are O(beta |x|^2). Biases are zero unless
        `bias=True` ($N(0, 1/d)$ then). `hidden` defaults to 4d, `qk_dim` to d.
        """
        if d < 1:
            raise ValueError(f"Model.random: `d` must be >= 1; got {d}.")
        dtype = default_float_dtype() if dtype is None else jnp.dtype(dtype)
        mats = random_weights(key, d, hidden=hidden, qk_dim=qk_dim, dtype=dtype, bias=bias)
        keep = set()
        if attention.lower() != "none":
            keep |= {"Q", "K", "V"}
        if mlp == "affine":
            keep |= {"W", "b"}
        elif mlp == "two_layer":
            keep |= {"W1", "W2", "b1", "b2"}
        mats = {k: v for k, v in mats.items() if k in keep}
        return cls(
            **mats, beta=beta, a_attn=a_attn, a_mlp=a_mlp, attention=attention, causal=causal,
            mlp=mlp, activation=activation, norm=norm, dtype=dtype,
        )

    def replace(self, **changes) -> "Model":
        """A copy with some arrays replaced (same options); e.g. `model.replace(beta=4.0)`."""
        out = self
        for name, value in changes.items():
            if name not in _ARRAY_FIELDS:
                raise ValueError(
                    f"Model.replace: `{name}` is not an array field; allowed: {list(_ARRAY_FIELDS)}. "
                    "Build a new Model to change its options."
                )
            old = getattr(self, name)
            if old is None:
                raise ValueError(f"Model.replace: `{name}` is unused by this model (it is None).")
            new = jnp.asarray(value, old.dtype)
            if new.shape != old.shape:
                raise ValueError(f"Model.replace: `{name}` must keep shape {old.shape}; got {new.shape}.")
            _check_finite("Model.replace", name, new)
            out = eqx.tree_at(lambda m, n=name: getattr(m, n), out, new)
        return out

    # -- display ------------------------------------------------------------------------
    def _summary(self) -> Summary:
        """What `__repr__` / `_repr_html_` show (`Summarised`): shapes and scalars only, no JAX op."""
        rows = [("d", str(self.d))]
        if self.attention == "none":
            rows.append(("attention", "none"))
        else:
            kind = ("causal " if self.causal else "") + self.attention
            if self.Q.shape[-2] != self.d:
                kind += f", qk_dim={self.Q.shape[-2]}"
            rows += [("attention", kind), ("beta", D.num(self.beta)), ("a_attn", D.num(self.a_attn))]
        if self.mlp == "two_layer":
            rows.append(("mlp", f"two_layer[{self.activation}, h={self.W1.shape[-2]}]"))
        else:
            rows.append(("mlp", self.mlp))
        if self.mlp != "none":
            rows.append(("a_mlp", D.num(self.a_mlp)))
        rows.append(("norm", self.norm))
        if self.layer_times is not None:
            rows += [("layers", str(self.n_layers)), ("layer_times", D.num(self.layer_times))]
        batch = self.beta.shape[: self.beta.ndim - (0 if self.layer_times is None else 1)]
        if batch:
            rows.append(("batch", str(tuple(batch))))
        rows.append(("dtype", str(self.dtype)))
        return Summary("Model", rows, _equation(self))


def _equation(model: "Model") -> str:
    """The model's token ODE in one line (plain text)."""
    terms = []
    if model.attention != "none":
        terms.append("a_attn Attn(x_i; X)")
    if model.mlp != "none":
        terms.append("a_mlp MLP(x_i)")
    rhs = " + ".join(terms) or "0"
    return f"dx_i/dt = P_x({rhs}) on the sphere" if model.norm == "sphere" else f"dx_i/dt = {rhs}"


def random_weights(key, d: int, *, hidden: int | None = None, qk_dim: int | None = None, dtype=None, bias: bool = False) -> dict:
    r"""Every weight `Model.random` can use, drawn from `key` with fan-in scalings.

    $Q, K \in \mathbb R^{k\times d}$, $V, W \in \mathbb R^{d\times d}$, $W_1 \in \mathbb R^{h\times d}$:
    i.i.d. $N(0, 1/d)$; $W_2 \in \mathbb R^{d\times h}$: $N(0, 1/h)$; biases $N(0, 1/d)$ if `bias`,
    else None. Each matrix has its own subkey, so which matrices are used does not change the
    others' values.
    """
    h = 4 * d if hidden is None else int(hidden)
    k = d if qk_dim is None else int(qk_dim)
    dtype = default_float_dtype() if dtype is None else jnp.dtype(dtype)
    keys = jax.random.split(key, 8)
    g = lambda kk, shape, fan: jax.random.normal(kk, shape, dtype) / np.sqrt(fan)  # noqa: E731
    return {
        "Q": g(keys[0], (k, d), d), "K": g(keys[1], (k, d), d), "V": g(keys[2], (d, d), d),
        "W": g(keys[3], (d, d), d), "b": g(keys[4], (d,), d) if bias else None,
        "W1": g(keys[3], (h, d), d), "b1": g(keys[4], (h,), d) if bias else None,
        "W2": g(keys[5], (d, h), h), "b2": g(keys[6], (d,), d) if bias else None,
    }
