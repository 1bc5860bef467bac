r"""A discrete transformer decoder in Flax NNX, loadable from checkpoints, for layer-by-layer rank.

One block (pre-LN, the default; `post_ln` for BERT-style encoders; `parallel_residual` for GPT-NeoX /
Phi, where both branches read the same input):

$$ h = x + \mathrm{MHA}(\mathrm{LN}_1(x)), \qquad x' = h + \mathrm{MLP}(\mathrm{LN}_2(h)) $$

with causal multi-head attention ($\mathrm{softmax}(q_i^\top k_j / \sqrt{d_h})$ over $j \le i$, grouped
query heads sharing key/value heads), and a GELU MLP $W_\text{down}\,\mathrm{gelu}(W_\text{up} x + b)$
or a gated one (SwiGLU: $W_\text{down}(\mathrm{silu}(W_\text{gate} x) \odot W_\text{up} x)$; GeGLU with
gelu). LayerNorm or RMSNorm (Gemma's stored weight w means a scale 1 + w).

No embedding: the decoder acts on given token vectors (random ones in the 1:1-rule comparison), which is
the residual-stream map whose rank the rule is about. Rotary positions (`rope_theta`) are optional (the
trained language models of `meanfield.train` use them); checkpoints of other families are run without
theirs. RoPE and learned positions change which tokens attend to which, not the linear maps the rule reads.
Token arrays may carry leading batch axes, (..., n, d).

`residual_ranks(decoder, X)` returns the effective rank of the residual stream's second-moment
matrix $C_l = X_l^\top X_l / n$ after every layer, the forward-pass counterpart of the rule's
$C_{l+1} = A_l C_l A_l^\top$ (both start from $C_0 = I$ when $X_0 \sim N(0, I)$ and $n \gg d$).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..metrics import entropy_rank


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shapes and options of a `Decoder` (the same fields a loaded checkpoint provides)."""

    d_model: int
    n_layers: int
    num_heads: int
    head_dim: int
    hidden: int
    num_kv_heads: int | None = None
    mlp: str = "gelu"  # "gelu" | "relu" | "silu" | "swiglu" | "geglu"
    gelu_exact: bool = False  # erf GELU (BERT "gelu"); else the tanh approximation (GPT-2 "gelu_new")
    norm: str = "layernorm"  # "layernorm" | "rmsnorm" | "none"
    norm_offset: bool = False  # Gemma: scale = 1 + weight
    parallel_residual: bool = False
    post_ln: bool = False
    causal: bool = True
    bias: bool = True
    eps: float = 1e-5
    sandwich_norms: bool = False  # Gemma-2/3: RMSNorm on each branch output before the residual add
    qk_norm: bool = False  # Gemma-3 / Qwen3: per-head RMSNorm of queries and keys
    attn_scale: float | None = None  # logit scale (default 1/sqrt(head_dim))
    rope_theta: float | None = None  # rotary positions on queries and keys (Llama's rotate-half form); None: none

    def __post_init__(self):
        if self.mlp not in ("gelu", "relu", "silu", "swiglu", "geglu"):
            raise ValueError(f"mlp: must be gelu, relu, silu, swiglu or geglu; got {self.mlp!r}")
        if self.norm not in ("layernorm", "rmsnorm", "none"):
            raise ValueError(f"norm: must be layernorm, rmsnorm or none; got {self.norm!r}")
        if self.rope_theta is not None and (not self.rope_theta > 0 or self.head_dim % 2):
            raise ValueError(f"rope_theta: needs theta > 0 and an even head_dim; got {self.rope_theta}, {self.head_dim}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_kv_heads: must divide num_heads = {self.num_heads}; got {kv}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def gated(self) -> bool:
        return self.mlp in ("swiglu", "geglu")


class Norm(nnx.Module):
    """LayerNorm $(x - \\bar x)/\\sqrt{\\mathrm{var} + \\epsilon}\\, g + b$ or RMSNorm $x/\\sqrt{\\overline{x^2} + \\epsilon}\\, g$."""

    def __init__(self, d: int, kind: str, eps: float, offset: bool):
        self.kind, self.eps, self.offset = kind, eps, offset
        self.scale = nnx.Param(jnp.zeros((d,)) if offset else jnp.ones((d,)))
        self.bias = nnx.Param(jnp.zeros((d,))) if kind == "layernorm" else None

    def __call__(self, x):
        if self.kind == "none":
            return x
        g = self.scale[...] + (1.0 if self.offset else 0.0)
        if self.kind == "rmsnorm":
            return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * g
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + self.eps) * g + self.bias[...]


def rotary(x, theta: float):
    r"""Rotary positions on (..., n, heads, hd), Llama's rotate-half form: position $p$ rotates the pairs
    $(x_i, x_{i + hd/2})$ by the angle $p\,\theta^{-2i/hd}$."""
    n, hd = x.shape[-3], x.shape[-1]
    inv = theta ** (-np.arange(0, hd // 2, dtype=np.float64) * 2.0 / hd)
    ang = np.arange(n)[:, None] * inv[None, :]  # (n, hd/2), a constant of the shapes
    cos = jnp.asarray(np.concatenate([np.cos(ang)] * 2, -1), x.dtype)[:, None, :]
    sin = jnp.asarray(np.concatenate([np.sin(ang)] * 2, -1), x.dtype)[:, None, :]
    half = hd // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def _linear(n_in, n_out, bias, rngs, std):
    init = nnx.initializers.normal(std)
    return nnx.Linear(n_in, n_out, use_bias=bias, kernel_init=init, rngs=rngs)


class Block(nnx.Module):
    """One transformer block (attention + MLP with their norms and residual connections)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, std: float = 0.02, mlp_out_std: float | None = None):
        d, H, KV, hd, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.hidden
        self.cfg = cfg
        self.ln1 = Norm(d, cfg.norm, cfg.eps, cfg.norm_offset)
        self.ln2 = Norm(d, cfg.norm, cfg.eps, cfg.norm_offset)
        self.q = _linear(d, H * hd, cfg.bias, rngs, std)
        self.k = _linear(d, KV * hd, cfg.bias, rngs, std)
        self.v = _linear(d, KV * hd, cfg.bias, rngs, std)
        self.o = _linear(H * hd, d, cfg.bias, rngs, std)
        self.up = _linear(d, h, cfg.bias, rngs, std)
        self.gate = _linear(d, h, False, rngs, std) if cfg.gated else None
        self.down = _linear(h, d, cfg.bias, rngs, std if mlp_out_std is None else mlp_out_std)
        self.post_attn_norm = Norm(d, "rmsnorm", cfg.eps, cfg.norm_offset) if cfg.sandwich_norms else None
        self.post_mlp_norm = Norm(d, "rmsnorm", cfg.eps, cfg.norm_offset) if cfg.sandwich_norms else None
        self.q_norm = Norm(hd, "rmsnorm", cfg.eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = Norm(hd, "rmsnorm", cfg.eps, cfg.norm_offset) if cfg.qk_norm else None

    def attention(self, x):
        cfg = self.cfg
        lead, n = x.shape[:-2], x.shape[-2]
        H, KV, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        q = self.q(x).reshape(*lead, n, H, hd)
        k = jnp.repeat(self.k(x).reshape(*lead, n, KV, hd), H // KV, axis=-2)
        v = jnp.repeat(self.v(x).reshape(*lead, n, KV, hd), H // KV, axis=-2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.rope_theta is not None:
            q, k = rotary(q, cfg.rope_theta), rotary(k, cfg.rope_theta)
        scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / np.sqrt(hd)
        q, k, v = (jnp.swapaxes(a, -2, -3) for a in (q, k, v))  # (..., heads, n, hd): batched products
        logits = jnp.einsum("...hid,...hjd->...hij", q, k) * scale
        if cfg.causal:
            mask = jnp.tril(jnp.ones((n, n), bool))
            logits = jnp.where(mask, logits, -jnp.inf)
        w = jax.nn.softmax(logits, axis=-1)
        out = jnp.swapaxes(jnp.einsum("...hij,...hjd->...hid", w, v), -2, -3)
        return self.o(out.reshape(*lead, n, H * hd))

    def mlp(self, x):
        kind = self.cfg.mlp
        if kind == "swiglu":
            return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
        gelu = lambda z: jax.nn.gelu(z, approximate=not self.cfg.gelu_exact)  # noqa: E731
        if kind == "geglu":
            return self.down(gelu(self.gate(x)) * self.up(x))
        act = {"relu": jax.nn.relu, "silu": jax.nn.silu}.get(kind, gelu)
        return self.down(act(self.up(x)))

    def _branch(self, norm, y):
        return y if norm is None else norm(y)

    def __call__(self, x, mark=None):
        """x (..., n, d) -> the block's output. `mark`, if given, is applied to the residual stream
        between attention and the MLP (h above); it must be the identity on values (training passes
        `meanfield.train.lm.materialized_cotangent`)."""
        cfg = self.cfg
        mark = mark or (lambda y: y)
        if cfg.post_ln:
            h = mark(self.ln1(x + self.attention(x)))
            return self.ln2(h + self.mlp(h))
        if cfg.parallel_residual:
            return x + self.attention(self.ln1(x)) + self.mlp(self.ln2(x))
        h = mark(x + self._branch(self.post_attn_norm, self.attention(self.ln1(x))))
        return h + self._branch(self.post_mlp_norm, self.mlp(self.ln2(h)))


class Decoder(nnx.Module):
    """A stack of `Block`s acting on token vectors X (n, d); `__call__` returns every residual state."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, std: float = 0.02, mlp_out_std: float | None = None):
        self.cfg = cfg
        self.blocks = nnx.List([Block(cfg, rngs=rngs, std=std, mlp_out_std=mlp_out_std) for _ in range(cfg.n_layers)])

    def __call__(self, X):
        """(n_layers + 1, n, d): the input and the residual stream after each block."""
        states = [X]
        for block in self.blocks:
            X = block(X)
            states.append(X)
        return jnp.stack(states)

    @classmethod
    def from_checkpoint(cls, ckpt) -> "Decoder":
        """A decoder holding the blocks of a `meanfield.checkpoints.Checkpoint` (matrices (out, in)).

        Modelled: the block structure (pre-LN, parallel, post-LN), grouped-query causal attention (BERT:
        bidirectional), the MLP kind and activation, Gemma's 1 + w norm scale, sandwich norms and q/k
        norms, and `query_pre_attn_scalar`; for meanfield's own checkpoints (`meanfield train`) also the
        rotary positions and norm "none", so the loaded blocks are exactly the trained ones. Not modelled
        for other families: positional encodings (RoPE, learned), Gemma-2's logit soft-capping and
        sliding-window layers (all layers attend globally here).
        """
        if ckpt.num_heads <= 0 or ckpt.head_dim <= 0:
            raise ValueError(f"{ckpt.source}: the checkpoint does not fix num_heads / head_dim (no config.json?); "
                             "the forward pass needs them")
        first = ckpt.layers[0]
        cfgd = ckpt.config or {}
        own = ckpt.arch == "meanfield"  # written by `meanfield train`: causal, with its rotary positions if any
        scalar = cfgd.get("query_pre_attn_scalar")
        # Hugging Face defaults when config.json does not say: RMSNorm models 1e-6, BERT 1e-12, else 1e-5
        default_eps = 1e-12 if ckpt.arch == "bert" else 1e-6 if ckpt.norm == "rmsnorm" else 1e-5
        cfg = DecoderConfig(
            d_model=ckpt.d_model, n_layers=len(ckpt.layers), num_heads=ckpt.num_heads,
            num_kv_heads=ckpt.num_kv_heads or ckpt.num_heads, head_dim=ckpt.head_dim,
            hidden=int(np.asarray(first.w_up).shape[0]), mlp=ckpt.mlp_kind, norm=ckpt.norm,
            gelu_exact=ckpt.activation == "gelu", norm_offset=ckpt.norm_weight_offset != 0.0,
            parallel_residual=bool(ckpt.parallel_residual), post_ln=ckpt.post_ln,
            causal=bool(cfgd.get("causal", True)) if own else not ckpt.post_ln,
            rope_theta=float(cfgd["rope_theta"]) if own and cfgd.get("rope_theta") else None,
            bias=True, sandwich_norms=first.post_attn_norm_weight is not None, qk_norm=first.q_norm_weight is not None,
            attn_scale=None if scalar is None else float(scalar) ** -0.5,
            eps=float(cfgd.get("layer_norm_eps", cfgd.get("rms_norm_eps", cfgd.get("layer_norm_epsilon", default_eps)))),
        )
        dec = cls(cfg, rngs=nnx.Rngs(0))
        f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
        for block, lw in zip(dec.blocks, ckpt.layers):
            for name, w, b in (("q", lw.w_q, lw.b_q), ("k", lw.w_k, lw.b_k), ("v", lw.w_v, lw.b_v),
                               ("o", lw.w_o, lw.b_o), ("up", lw.w_up, lw.b_up), ("down", lw.w_down, lw.b_down),
                               ("gate", lw.w_gate, None)):
                lin = getattr(block, name)
                if lin is None:
                    continue
                lin.kernel[...] = f32(w).T
                if lin.bias is not None:
                    lin.bias[...] = jnp.zeros_like(lin.bias[...]) if b is None else f32(b)
            norms = ((block.ln1, lw.ln1_weight, lw.ln1_bias), (block.ln2, lw.ln2_weight, lw.ln2_bias),
                     (block.post_attn_norm, lw.post_attn_norm_weight, None),
                     (block.post_mlp_norm, lw.post_mlp_norm_weight, None),
                     (block.q_norm, lw.q_norm_weight, None), (block.k_norm, lw.k_norm_weight, None))
            for ln, g, b in norms:
                if ln is None:
                    continue
                ln.scale[...] = f32(g)
                if ln.bias is not None:
                    ln.bias[...] = jnp.zeros_like(ln.bias[...]) if b is None else f32(b)
        return dec


def second_moment_erank(X) -> jax.Array:
    r"""$\exp(-\sum p_i \log p_i)$, $p = \lambda / \sum\lambda$, $\lambda$ = eigenvalues of $X^\top X / n$
    (`meanfield.metrics.entropy_rank` of p; the same p as `meanfield.metrics.effective_rank`, without its
    non-finite masking and rescaling)."""
    C = X.T @ X / X.shape[0]
    lam = jnp.clip(jnp.linalg.eigvalsh(C), 0.0, None)
    return entropy_rank(lam / jnp.sum(lam))


@nnx.jit
def residual_ranks(decoder: Decoder, X) -> jax.Array:
    """Effective rank of the residual stream's second moment after each block, (n_layers + 1,)."""
    return jax.vmap(second_moment_erank)(decoder(X))


def decoder_layer_matrices(decoder: Decoder, attention: str = "wo") -> tuple[np.ndarray, np.ndarray]:
    r"""The 1:1 rule's per-layer matrices of a decoder, (L, d, d) each, in the $y = W x$ convention.

    $W_\text{mlp} = W_\text{down} W_\text{up}$ (a gate, if any, dropped as the rule does);
    `attention="wo"`: $W_\text{attn} = W_o$ (the rule; $W_o W_o^\top$ if not square);
    `attention="value"`: $\sum_h W_o^h W_v^{g(h)}$ (value-aware: what attention adds for uniform weights).
    """
    cfg = decoder.cfg
    H, KV, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    mlps, attns = [], []
    for block in decoder.blocks:
        up = np.asarray(block.up.kernel[...], np.float64).T  # (h, d)
        down = np.asarray(block.down.kernel[...], np.float64).T  # (d, h)
        o = np.asarray(block.o.kernel[...], np.float64).T  # (d, H hd)
        mlps.append(down @ up)
        if attention == "wo":
            attns.append(o if o.shape[0] == o.shape[1] else o @ o.T)
        elif attention == "value":
            v = np.asarray(block.v.kernel[...], np.float64).T  # (KV hd, d)
            total = np.zeros((o.shape[0], v.shape[1]))
            for h in range(H):
                g = h // (H // KV)
                total += o[:, h * hd:(h + 1) * hd] @ v[g * hd:(g + 1) * hd]
            attns.append(total)
        else:
            raise ValueError(f"attention: must be 'wo' or 'value'; got {attention!r}")
    return np.stack(mlps), np.stack(attns)


def rule_vs_forward(decoder: Decoder, X, *, attention: str = "wo") -> dict[str, np.ndarray]:
    """Per layer on the same weights: the rule's rho and linear-proxy erank (`meanfield.rule.propagate`,
    float64) next to the erank of the actual forward pass on tokens X (`residual_ranks`, layers 1..L)."""
    from ..rule import balance_ratio, propagate

    W_mlp, W_attn = decoder_layer_matrices(decoder, attention)
    traj = propagate(W_mlp, W_attn, dtype="float64")
    return {
        "rho": np.asarray(balance_ratio(W_mlp, W_attn)),
        "linear_erank": np.asarray(traj.erank),
        "forward_erank": np.asarray(residual_ranks(decoder, X))[1:],
    }
