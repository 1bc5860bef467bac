"""The standardised in-memory checkpoint: frozen dataclasses of float32 NumPy arrays, y = W x (shape (out, in))."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: names the path, tensor or config field at fault."""


@dataclasses.dataclass(frozen=True, eq=False)
class LayerWeights:
    """One transformer block. All matrices map y = W x: shape (out, in); float32.

    Attention: ``w_q`` (H*hd, d), ``w_k`` and ``w_v`` (KV*hd, d), ``w_o`` (d, H*hd); query head h reads
    key/value head ``h // (H // KV)`` (the Hugging Face ``repeat_kv`` order). MLP: ``w_up`` (h, d),
    ``w_gate`` (h, d) for gated MLPs (SwiGLU / GeGLU: ``w_down (act(w_gate x) * (w_up x))``), else None;
    ``w_down`` (d, h). Norms: ``ln1`` before attention and ``ln2`` before the MLP (pre-norm), or after the
    attention / MLP residual add when ``post_ln`` (BERT). Biases are None when absent (RMSNorm: no
    ``ln*_bias``). Scale of a norm = ``Checkpoint.norm_weight_offset + ln*_weight`` (Gemma stores w - 1).
    Phi has one norm shared by both parallel branches: ``ln2_*`` are the same arrays as ``ln1_*``.

    Extras, None when absent: ``post_attn_norm_weight`` / ``post_mlp_norm_weight`` (Gemma-2/3 sandwich
    norms on the branch outputs, before the residual add) and ``q_norm_weight`` / ``k_norm_weight``
    ((hd,), per-head RMSNorm of queries / keys: Gemma-3, Qwen3).
    """

    w_q: np.ndarray
    w_k: np.ndarray
    w_v: np.ndarray
    w_o: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray
    ln1_weight: np.ndarray
    ln2_weight: np.ndarray
    w_gate: np.ndarray | None = None
    b_q: np.ndarray | None = None
    b_k: np.ndarray | None = None
    b_v: np.ndarray | None = None
    b_o: np.ndarray | None = None
    b_up: np.ndarray | None = None
    b_down: np.ndarray | None = None
    ln1_bias: np.ndarray | None = None
    ln2_bias: np.ndarray | None = None
    post_ln: bool = False
    post_attn_norm_weight: np.ndarray | None = None
    post_mlp_norm_weight: np.ndarray | None = None
    q_norm_weight: np.ndarray | None = None
    k_norm_weight: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    """A transformer's block weights in one layout for every architecture.

    ``arch``: family read from the tensor names (and config.json's ``model_type`` when present): "gpt2",
    "llama" (also Mistral, SmolLM), "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt_neox", "phi",
    "phi3", "bert", "meanfield" (the models `meanfield train` writes). ``config``: config.json as read ({} when absent). ``num_heads`` / ``num_kv_heads`` /
    ``head_dim`` are 0 when they cannot be known (no config.json and no tensor that fixes them).
    ``norm``: "layernorm" | "rmsnorm" | "none" (meanfield's own models only); ``mlp_kind``: "swiglu" | "geglu" (gated) or the activation family
    of a plain two-layer MLP ("gelu", "relu", "silu"); ``activation``: the config's exact name (e.g.
    "gelu_new", "gelu_pytorch_tanh", "silu"). ``parallel_residual``: x + attn(ln1 x) + mlp(ln2 x) (GPT-NeoX,
    Phi) instead of the sequential block. ``source``: path read; ``dtype``: stored dtype(s), e.g. "BF16".
    Embeddings, the final norm and the LM head are not loaded.
    """

    arch: str
    config: dict[str, Any]
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str
    mlp_kind: str
    activation: str
    parallel_residual: bool
    layers: tuple[LayerWeights, ...]
    norm_weight_offset: float = 0.0
    source: str = ""
    dtype: str = ""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def post_ln(self) -> bool:
        return bool(self.layers and self.layers[0].post_ln)
