"""The NNX decoder against a NumPy transcription of the block equations; residual erank."""

import jax
import numpy as np
import pytest
from flax import nnx

from meanfield.nets import Decoder, DecoderConfig, residual_ranks, second_moment_erank


def _np_norm(x, g, b, kind, offset, eps):
    g = g + (1.0 if offset else 0.0)
    if kind == "rmsnorm":
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * g + b


def _gelu(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def _np_block(block, cfg, x):
    P = lambda p: np.asarray(p[...], np.float64)  # noqa: E731
    lin = lambda m, z: z @ P(m.kernel) + (P(m.bias) if m.bias is not None else 0.0)  # noqa: E731
    n = x.shape[0]
    H, KV, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim

    def attn(z):
        q, k, v = lin(block.q, z), lin(block.k, z), lin(block.v, z)
        out = np.zeros((n, H * hd))
        for h in range(H):
            g = h // (H // KV)  # the key/value group of query head h
            s = q[:, h * hd:(h + 1) * hd] @ k[:, g * hd:(g + 1) * hd].T / np.sqrt(hd)
            if cfg.causal:
                s = np.where(np.tril(np.ones((n, n))) > 0, s, -np.inf)
            w = np.exp(s - s.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)
            out[:, h * hd:(h + 1) * hd] = w @ v[:, g * hd:(g + 1) * hd]
        return lin(block.o, out)

    def mlp(z):
        if cfg.mlp == "swiglu":
            gz = lin(block.gate, z)
            return lin(block.down, gz / (1 + np.exp(-gz)) * lin(block.up, z))
        return lin(block.down, _gelu(lin(block.up, z)))

    def ln(m, z):
        return _np_norm(z, P(m.scale), P(m.bias) if m.bias is not None else 0.0, cfg.norm, cfg.norm_offset, cfg.eps)

    if cfg.post_ln:
        h = ln(block.ln1, x + attn(x))
        return ln(block.ln2, h + mlp(h))
    if cfg.parallel_residual:
        return x + attn(ln(block.ln1, x)) + mlp(ln(block.ln2, x))
    h = x + attn(ln(block.ln1, x))
    return h + mlp(ln(block.ln2, h))


@pytest.mark.parametrize("options", [
    dict(),
    dict(mlp="swiglu", norm="rmsnorm", num_kv_heads=2, norm_offset=True, bias=False),
    dict(parallel_residual=True),
    dict(post_ln=True, causal=False),
])
def test_decoder_matches_numpy_block_equations(options):
    cfg = DecoderConfig(d_model=16, n_layers=2, num_heads=4, head_dim=4, hidden=32, **options)
    dec = Decoder(cfg, rngs=nnx.Rngs(1), std=0.3)
    # non-trivial norm parameters
    for i, block in enumerate(dec.blocks):
        for ln in (block.ln1, block.ln2):
            ln.scale[...] = ln.scale[...] + 0.1 * jax.random.normal(jax.random.key(10 + i), ln.scale.shape)
    X = np.asarray(jax.random.normal(jax.random.key(2), (12, 16)))
    states = np.asarray(dec(X))
    ref = X.astype(np.float64)
    for layer, block in enumerate(dec.blocks):
        ref = _np_block(block, cfg, ref)
        np.testing.assert_allclose(states[layer + 1], ref, rtol=2e-4, atol=2e-4)


def test_residual_erank_of_isotropic_tokens_and_rank_one():
    X = jax.random.normal(jax.random.key(0), (4096, 8))
    assert abs(float(second_moment_erank(X)) - 8.0) < 0.05  # C ~ I: erank d
    u = jax.random.normal(jax.random.key(1), (64, 1)) * np.ones((1, 8))
    assert abs(float(second_moment_erank(u)) - 1.0) < 1e-3
    cfg = DecoderConfig(d_model=8, n_layers=3, num_heads=2, head_dim=4, hidden=16)
    r = residual_ranks(Decoder(cfg, rngs=nnx.Rngs(0)), X[:256])
    assert r.shape == (4,) and np.all(np.isfinite(np.asarray(r)))


# ------------------------------------------------------------------ checkpoints -> decoder, against raw tensors


def _raw(path):
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(path / "model.safetensors")).items()}


def _softmax_causal(s):
    n = s.shape[-1]
    s = np.where(np.tril(np.ones((n, n))) > 0, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


def test_gpt2_checkpoint_forward_matches_raw_tensors(tmp_path):
    """GPT-2 (Conv1D weights stored (in, out), fused c_attn) read through meanfield.checkpoints and run by
    the decoder == a NumPy forward pass written directly on the stored tensor names."""
    from test_checkpoints import L, make_gpt2

    from meanfield.checkpoints import load_checkpoint

    make_gpt2(tmp_path, np.random.default_rng(0))
    t = _raw(tmp_path)
    d, H = 16, 4
    hd = d // H
    X = np.random.default_rng(1).standard_normal((6, d))
    ln = lambda x, g, b: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b  # noqa: E731
    x = X.copy()
    for i in range(L):
        p = f"h.{i}."
        z = ln(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"])
        qkv = z @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        heads = [_softmax_causal(q[:, h * hd:(h + 1) * hd] @ k[:, h * hd:(h + 1) * hd].T / np.sqrt(hd)) @ v[:, h * hd:(h + 1) * hd]
                 for h in range(H)]
        x = x + np.concatenate(heads, 1) @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        z = ln(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"]) @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"]
        x = x + _gelu(z) @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
    dec = Decoder.from_checkpoint(load_checkpoint(tmp_path))
    np.testing.assert_allclose(np.asarray(dec(jax.numpy.asarray(X, jax.numpy.float32)))[-1], x, rtol=1e-4, atol=1e-4)


def test_qwen2_checkpoint_forward_matches_raw_tensors(tmp_path):
    """Qwen2 layout (RMSNorm, q/k/v biases, SwiGLU, grouped-query attention H = 4, KV = 2)."""
    from test_checkpoints import L, make_llama

    from meanfield.checkpoints import load_checkpoint

    make_llama(tmp_path, np.random.default_rng(2))
    t = _raw(tmp_path)
    d, H, KV, hd = 16, 4, 2, 4
    X = np.random.default_rng(3).standard_normal((6, d))
    rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g  # noqa: E731
    x = X.copy()
    for i in range(L):
        p = f"model.layers.{i}.self_attn."
        z = rms(x, t[f"model.layers.{i}.input_layernorm.weight"])
        q = z @ t[p + "q_proj.weight"].T + t[p + "q_proj.bias"]
        k = z @ t[p + "k_proj.weight"].T + t[p + "k_proj.bias"]
        v = z @ t[p + "v_proj.weight"].T + t[p + "v_proj.bias"]
        heads = []
        for h in range(H):
            g = h // (H // KV)
            w = _softmax_causal(q[:, h * hd:(h + 1) * hd] @ k[:, g * hd:(g + 1) * hd].T / np.sqrt(hd))
            heads.append(w @ v[:, g * hd:(g + 1) * hd])
        x = x + np.concatenate(heads, 1) @ t[p + "o_proj.weight"].T
        m = f"model.layers.{i}.mlp."
        z = rms(x, t[f"model.layers.{i}.post_attention_layernorm.weight"])
        gate = z @ t[m + "gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (z @ t[m + "up_proj.weight"].T)) @ t[m + "down_proj.weight"].T
    dec = Decoder.from_checkpoint(load_checkpoint(tmp_path))
    np.testing.assert_allclose(np.asarray(dec(jax.numpy.asarray(X, jax.numpy.float32)))[-1], x, rtol=1e-4, atol=1e-4)
