r"""Per-layer $W_\text{mlp}$ and $W_\text{attn}$ of a checkpoint, as the 1:1 rule uses them (MISSION §5).

$$ W_\text{mlp} = W_\text{down} W_\text{up} \quad(\text{gate dropped for gated MLPs, as the rule's code}), $$
$$ W_\text{attn} = \begin{cases} W_o \;(W_o W_o^\top \text{ when not square}) & \texttt{"wo"} \text{ (the rule)}\\
   \sum_h W_o^{h} W_v^{g(h)} & \texttt{"value"} \end{cases} $$

with $W_o^h$ the columns of head $h$ and $g(h) = \lfloor h/(H/KV)\rfloor$ its key/value group (GQA).
``"value"`` is the map a head applies to the residual stream when its attention is uniform over
identical tokens: invariant under $W_v \to c W_v$, $W_o \to W_o/c$, which changes ``"wo"``.

Gain folding (``fold_gains=True``): a pre-norm's gain $g = \text{offset} + w$ scales the branch input,
so $W_\text{up} \to W_\text{up}\,\mathrm{diag}(g_2)$ and $W_v \to W_v\,\mathrm{diag}(g_1)$; Gemma-2/3's
post-branch norms scale the output, $W_\text{down} \to \mathrm{diag}(g_\text{post mlp}) W_\text{down}$ and
$W_o \to \mathrm{diag}(g_\text{post attn}) W_o$. With ``"wo"`` only the output-side gains reach $W_\text{attn}$.
"""

from __future__ import annotations

import numpy as np

from ._types import Checkpoint, CheckpointError

ATTENTION_MATRICES = {
    "wo": "W_attn = W_o, the attention output projection (the rule's choice; W_o W_o^T when W_o is not square, "
          "which has squared units)",
    "value": "W_attn = sum_h W_o^h W_v^h, the value-aware map (GQA: each query head with its key/value group's W_v)",
}


def _gain(ckpt: Checkpoint, w):
    return None if w is None else ckpt.norm_weight_offset + w.astype(np.float64)


def value_matrix(w_o, w_v, *, num_heads: int, num_kv_heads: int, head_dim: int) -> np.ndarray:
    r"""$\sum_h W_o^h W_v^{g(h)}$, $g(h) = \lfloor h/(H/KV)\rfloor$: ``w_o`` (d, H hd), ``w_v`` (KV hd, d) -> (d, d).

    With ``num_heads == 0`` (unknown) only multi-head attention (``w_v`` rows = ``w_o`` columns) is
    possible, where the sum is $W_o W_v$.
    """
    w_o = np.asarray(w_o, np.float64)
    w_v = np.asarray(w_v, np.float64)
    if w_v.shape[0] == w_o.shape[1]:
        return w_o @ w_v
    if not num_heads:
        raise CheckpointError(
            f"value-aware W_attn: grouped-query attention (W_v has {w_v.shape[0]} rows, W_o {w_o.shape[1]} columns) "
            "needs num_attention_heads / num_key_value_heads from config.json, which this checkpoint lacks.")
    return grouped_value_matrix(w_o, w_v, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)


def grouped_value_matrix(w_o, w_v, *, num_heads: int, num_kv_heads: int, head_dim: int):
    r"""$\sum_h W_o^h W_v^{g(h)}$ for known head counts, in the inputs' own array type and dtype (NumPy, or
    JAX under `jit`, as in the spectral guard): the query heads sharing a key/value head are summed first."""
    d = w_o.shape[0]
    rep = num_heads // num_kv_heads
    w_o_grouped = w_o.reshape(d, num_kv_heads, rep, head_dim).sum(axis=2).reshape(d, num_kv_heads * head_dim)
    return w_o_grouped @ w_v


def layer_matrices(ckpt: Checkpoint, attention: str = "wo", *, fold_gains: bool = False,
                   dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    r"""(W_mlp, W_attn), each (L, d, d): $W_\text{down} W_\text{up}$ and the ``attention`` matrix
    (``"wo"``: the rule's $W_o$, or $W_o W_o^\top$ when non-square; ``"value"``: $\sum_h W_o^h W_v^h$).

    Products are formed in float64 (as the rule's per-model script) and returned in ``dtype``.

    Raises:
        ValueError: unknown ``attention``; ``fold_gains`` on a post-norm (BERT) checkpoint, whose norms act
            on the residual stream, not on a branch input.
    """
    if attention not in ATTENTION_MATRICES:
        raise ValueError(f"layer_matrices: attention must be one of {sorted(ATTENTION_MATRICES)}; got {attention!r}.")
    if fold_gains and ckpt.post_ln:
        raise ValueError(f"layer_matrices: fold_gains needs pre-norm layers; {ckpt.arch} ({ckpt.source}) is post-norm.")
    L, d = ckpt.num_layers, ckpt.d_model
    W_mlp = np.empty((L, d, d), dtype)
    W_attn = np.empty((L, d, d), dtype)
    for i, lw in enumerate(ckpt.layers):
        w_up, w_down = lw.w_up.astype(np.float64), lw.w_down.astype(np.float64)
        w_o, w_v = lw.w_o.astype(np.float64), lw.w_v.astype(np.float64)
        if fold_gains:
            w_up = w_up * _gain(ckpt, lw.ln2_weight)[None, :]
            w_v = w_v * _gain(ckpt, lw.ln1_weight)[None, :]
            if lw.post_mlp_norm_weight is not None:
                w_down = _gain(ckpt, lw.post_mlp_norm_weight)[:, None] * w_down
            if lw.post_attn_norm_weight is not None:
                w_o = _gain(ckpt, lw.post_attn_norm_weight)[:, None] * w_o
        W_mlp[i] = w_down @ w_up
        if attention == "wo":
            W_attn[i] = w_o if w_o.shape[1] == d else w_o @ w_o.T
        else:
            W_attn[i] = value_matrix(w_o, w_v, num_heads=ckpt.num_heads, num_kv_heads=ckpt.num_kv_heads,
                                     head_dim=ckpt.head_dim)
    return W_mlp, W_attn
