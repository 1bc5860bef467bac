r"""A causal byte-level language model around the NNX `Decoder`, and its checkpoint tensors.

$$ x^{(0)}_i = E[b_i] + P_i, \qquad x^{(l+1)} = \mathrm{Block}_l(x^{(l)}), \qquad
   \mathrm{logits}_i = U\,\mathrm{LN}_f(x^{(L)}_i) $$

with $E$ the byte embedding (256 x d), $P$ learned positions (or none, with rotary positions inside
attention), the `Decoder`'s blocks (pre-LN, post-LN or no norm; GELU or SwiGLU MLP), a final norm for
pre-LN only, and the unembedding $U$. The blocks are the `Decoder` class itself, so
`Decoder.from_checkpoint` on a saved checkpoint is the very map that was trained.

`model_tensors` names the weights as `meanfield.checkpoints` reads them (layout "meanfield": y = W x,
(out, in)); `model_config_json` is the config.json that goes with them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..nets.decoder import Decoder, DecoderConfig, Norm
from .config import ModelConfig

VOCAB = 256


def decoder_config(m: ModelConfig) -> DecoderConfig:
    """The `DecoderConfig` of a model section (pre_ln / post_ln: LayerNorm; none: no norm)."""
    return DecoderConfig(
        d_model=m.d_model, n_layers=m.n_layers, num_heads=m.num_heads, head_dim=m.d_model // m.num_heads,
        hidden=m.mlp_hidden, mlp=m.mlp, norm="none" if m.norm == "none" else "layernorm",
        post_ln=m.norm == "post_ln", causal=True, bias=m.bias,
        rope_theta=m.rope_theta if m.positions == "rope" else None)


class LanguageModel(nnx.Module):
    """Embedding (+ learned positions), `Decoder` blocks, final norm (pre-LN), unembedding."""

    def __init__(self, m: ModelConfig, max_len: int, *, rngs: nnx.Rngs):
        self.mcfg = m
        cfg = decoder_config(m)
        init = nnx.initializers.normal(m.init_std)
        self.embed = nnx.Embed(VOCAB, m.d_model, embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (max_len, m.d_model))) if m.positions == "learned" else None
        self.decoder = Decoder(cfg, rngs=rngs, std=m.init_std, mlp_out_std=m.mlp_out_gain * m.init_std)
        self.final_norm = Norm(m.d_model, "layernorm", cfg.eps, False) if m.norm == "pre_ln" else None
        self.unembed = nnx.Linear(m.d_model, VOCAB, use_bias=False, kernel_init=init, rngs=rngs)

    def embed_tokens(self, tokens):
        """(..., n) bytes -> (..., n, d): the residual stream entering the first block."""
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos[...][: tokens.shape[-1]]
        return x

    def hidden_states(self, tokens):
        """(L + 1, ..., n, d): the residual stream entering block 1, then after every block."""
        return self.decoder(self.embed_tokens(tokens))

    def logits(self, x):
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.unembed(x)

    def __call__(self, tokens):
        """(..., n) bytes -> (..., n, 256) logits. On CPU the residual stream's cotangent is made a
        materialized array before and in the middle of every block (`materialized_cotangent`)."""
        mark = materialized_cotangent if jax.default_backend() == "cpu" else None
        x = self.embed_tokens(tokens)
        for block in self.decoder.blocks:
            x = block(x if mark is None else mark(x), mark)
        return self.logits(x)


@jax.custom_vjp
def materialized_cotangent(x):
    """The identity, whose backward pass computes the cotangent as an array of its own.

    The residual stream's gradient is a sum over all later blocks' branches. Left alone, XLA CPU
    fuses that chain of additions (and the norms' backward terms) into each consumer, among them
    the transposed copies the weight-gradient products read, and so recomputes it there with
    strided writes: on the d_model 128 model (4 layers, 16 x 128 bytes, one CPU device), 53 such
    copies took 80 ms of a 210 ms step. Here the cotangent passes through a `lax.cond`, which XLA
    does not fuse across; its branches are `c` and `c * 1.0` (XLA removes a cond whose branches
    both return their operand unchanged; one whose branches compute something, as in
    `solvers.UnrolledStages`, stays). The step then takes ~160 ms (benchmarks/README.md, bench_train).
    Only on CPU (`LanguageModel.__call__`): a GPU's cond waits for its predicate on the host."""
    return x


def _materialized_fwd(x):
    return x, None


def _materialized_bwd(_, g):
    return (jax.lax.cond(jnp.isfinite(g.reshape(-1)[0]), lambda c: c, lambda c: c * 1.0, g),)


materialized_cotangent.defvjp(_materialized_fwd, _materialized_bwd)


def cross_entropy(model: LanguageModel, window) -> jax.Array:
    """Mean next-byte cross-entropy (nats) of windows (B, T + 1), -mean_i log softmax(logits_i)[b_{i+1}]
    (the target picked by a one-hot product: its backward is a product too, where a gather's is a scatter)."""
    logits = model(window[..., :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jax.nn.one_hot(window[..., 1:], logp.shape[-1], dtype=logp.dtype)
    return -jnp.sum(logp * target) / target[..., 0].size


def _lin(out, prefix, lin):
    out[prefix + ".weight"] = np.asarray(lin.kernel[...]).T
    if lin.bias is not None:
        out[prefix + ".bias"] = np.asarray(lin.bias[...])


def _norm(out, prefix, norm):
    if norm is None or norm.kind == "none":
        return
    out[prefix + ".weight"] = np.asarray(norm.scale[...])
    if norm.bias is not None:
        out[prefix + ".bias"] = np.asarray(norm.bias[...])


def model_tensors(model: LanguageModel) -> dict[str, np.ndarray]:
    """Name -> contiguous NumPy array in the checkpoint layout "meanfield" (matrices (out, in))."""
    out: dict[str, np.ndarray] = {"embed.weight": np.asarray(model.embed.embedding[...])}
    if model.pos is not None:
        out["pos.weight"] = np.asarray(model.pos[...])
    for i, b in enumerate(model.decoder.blocks):
        p = f"blocks.{i}."
        for name in ("q", "k", "v", "o"):
            _lin(out, p + "attn." + name, getattr(b, name))
        for name in ("up", "gate", "down"):
            if getattr(b, name) is not None:
                _lin(out, p + "mlp." + name, getattr(b, name))
        _norm(out, p + "ln1", b.ln1)
        _norm(out, p + "ln2", b.ln2)
    _norm(out, "final_norm", model.final_norm)
    out["unembed.weight"] = np.asarray(model.unembed.kernel[...]).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def load_model_tensors(model: LanguageModel, tensors: dict[str, np.ndarray]) -> None:
    """Set the model's weights from `model_tensors`-named arrays (shapes checked); the inverse of it."""
    want = model_tensors(model)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise ValueError(f"checkpoint tensors do not match the model: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, v in want.items():
        if tensors[k].shape != v.shape:
            raise ValueError(f"checkpoint tensor {k!r} has shape {tensors[k].shape}; the model needs {v.shape}")

    def put(var, arr, transpose=False):
        a = np.asarray(arr)
        var[...] = jnp.asarray(a.T if transpose else a, var[...].dtype)

    put(model.embed.embedding, tensors["embed.weight"])
    if model.pos is not None:
        put(model.pos, tensors["pos.weight"])
    for i, b in enumerate(model.decoder.blocks):
        p = f"blocks.{i}."
        for group, names in (("attn.", ("q", "k", "v", "o")), ("mlp.", ("up", "gate", "down"))):
            for name in names:
                lin = getattr(b, name)
                if lin is None:
                    continue
                put(lin.kernel, tensors[p + group + name + ".weight"], transpose=True)
                if lin.bias is not None:
                    put(lin.bias, tensors[p + group + name + ".bias"])
        for name in ("ln1", "ln2"):
            norm = getattr(b, name)
            if norm.kind != "none":
                put(norm.scale, tensors[p + name + ".weight"])
                if norm.bias is not None:
                    put(norm.bias, tensors[p + name + ".bias"])
    if model.final_norm is not None:
        put(model.final_norm.scale, tensors["final_norm.weight"])
        put(model.final_norm.bias, tensors["final_norm.bias"])
    put(model.unembed.kernel, tensors["unembed.weight"], transpose=True)


def model_config_json(m: ModelConfig, max_len: int) -> dict:
    """config.json for the checkpoint: what `load_checkpoint` and `Decoder.from_checkpoint` read."""
    cfg = decoder_config(m)
    return {
        "model_type": "meanfield", "architectures": ["meanfield.train.LanguageModel"],
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden,
        "hidden_act": "silu" if m.mlp == "swiglu" else "gelu_new", "norm": cfg.norm, "post_ln": cfg.post_ln,
        "layer_norm_eps": cfg.eps, "causal": True, "rope_theta": cfg.rope_theta,
        "positions": m.positions, "vocab_size": VOCAB, "max_position_embeddings": max_len,
        "tie_word_embeddings": False,
    }
