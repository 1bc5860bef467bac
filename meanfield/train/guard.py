r"""The spectral guard: an optax transformation that keeps each layer's $\rho$ inside a band.

The 1:1 rule's remedy ("layer-wise scaling factors"), made literal. After the optimiser's update, for
every layer with $\rho_l = \|W_\text{down} W_\text{up}\|_2 / \|W_\text{attn}\|_2$ outside
$[\rho_\text{lo}, \rho_\text{hi}]$, the MLP output matrix is rescaled,

$$ W_\text{down} \leftarrow \frac{\mathrm{clip}(\rho_l, \rho_\text{lo}, \rho_\text{hi})}{\rho_l}\, W_\text{down}, $$

which puts $\rho_l$ on the band's edge exactly ($\rho$ is linear in $W_\text{down}$). $W_\text{attn}$ is
$W_o$ (the rule's) or $\sum_h W_o^h W_v^h$ (value-aware), the definitions of `meanfield weights`.
It acts on the parameters a step produces: the transformation returns the update that lands on the
rescaled parameters, so it chains after `optax.adamw`. Every `every` steps (its own step count);
spectral norms are exact (`meanfield.model.spectral.spectral_norm` of the d x d products: their largest
singular value), computed in the parameters' dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..checkpoints.matrices import grouped_value_matrix
from ..model.spectral import spectral_norm


class GuardState(NamedTuple):
    count: jax.Array  # updates seen
    scale: jax.Array  # (L,) the last factors applied to W_down (1 where rho was inside the band)


def mlp_matrix(up_kernel, down_kernel):
    r"""$W_\text{mlp} = W_\text{down} W_\text{up}$ (y = W x) from NNX kernels (in, out): $(K_\text{up} K_\text{down})^\top$."""
    return (up_kernel @ down_kernel).T


def attention_matrix(o_kernel, v_kernel, attention: str, num_heads: int, kv_heads: int):
    r"""$W_o$ or $\sum_h W_o^h W_v^{g(h)}$ (y = W x) from NNX kernels (in, out), with `meanfield weights`'s
    `grouped_value_matrix`."""
    if attention == "wo":
        return o_kernel.T
    return grouped_value_matrix(o_kernel.T, v_kernel.T, num_heads=num_heads, num_kv_heads=kv_heads,
                                head_dim=o_kernel.shape[0] // num_heads)


def layer_rho(blocks, attention: str, num_heads: int, kv_heads: int):
    """(L,) rho of every layer from the parameter pytree's `blocks` (a dict index -> block params)."""
    out = []
    for i in sorted(blocks, key=int):
        b = blocks[i]
        mlp = spectral_norm(mlp_matrix(b["up"]["kernel"], b["down"]["kernel"]))
        att = spectral_norm(attention_matrix(b["o"]["kernel"], b["v"]["kernel"], attention, num_heads, kv_heads))
        out.append(mlp / att)
    return jnp.stack(out)


def spectral_guard(band: tuple[float, float], *, attention: str = "wo", num_heads: int, kv_heads: int | None = None,
                   every: int = 1, blocks_path=("decoder", "blocks")) -> optax.GradientTransformation:
    """An optax transformation: params + update lands on parameters whose rho is inside `band`.

    `blocks_path` locates the blocks in the parameter pytree (a `LanguageModel`'s pure dict). Chain it
    last: `optax.chain(optax.clip_by_global_norm(c), optax.adamw(...), spectral_guard(...))`."""
    lo, hi = float(band[0]), float(band[1])
    kv = kv_heads or num_heads

    def blocks_of(tree):
        for k in blocks_path:
            tree = tree[k]
        return tree

    def init(params):
        n = len(blocks_of(params))
        return GuardState(jnp.zeros((), jnp.int32), jnp.ones((n,), jnp.float32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("spectral_guard needs the parameters (optax.apply_updates order: pass params to update)")
        count = state.count + 1
        new = jax.tree.map(lambda p, u: p + u, params, updates)

        def factors(_):
            rho = layer_rho(blocks_of(new), attention, num_heads, kv)
            f = jnp.clip(rho, lo, hi) / rho
            return jnp.where(jnp.isfinite(f), f, 1.0).astype(jnp.float32)

        scale = jax.lax.cond(count % every == 0, factors, lambda _: jnp.ones_like(state.scale), None)
        updates = jax.tree.map(lambda u: u, updates)  # new containers: the caller's tree is not modified
        ub = blocks_of(updates)
        pb, nb = blocks_of(params), blocks_of(new)
        for j, i in enumerate(sorted(nb, key=int)):
            W = nb[i]["down"]["kernel"]
            ub[i]["down"]["kernel"] = (scale[j].astype(W.dtype) * W) - pb[i]["down"]["kernel"]
        return updates, GuardState(count, scale)

    return optax.GradientTransformation(init, update)
