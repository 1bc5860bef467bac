"""Checkpoint readers: tiny random checkpoints in each layout, written with safetensors under the real tensor
names and shapes, checked against NumPy computations made here from the raw stored tensors."""

import argparse
import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.flax import save_file as save_flax
from safetensors.numpy import save_file

from meanfield.checkpoints import CheckpointError, cli, layer_matrices, load_checkpoint, value_matrix

L = 2


def _rand(rng, *shape, scale=0.3):
    return (scale * rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)


def _write(dir_, tensors, config=None, dtype="F32", shards=1):
    """Write tensors (dict of float32 arrays) as safetensors in `dtype`; return the values as stored (float32)."""
    dir_.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (dir_ / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    files = ["model.safetensors"] if shards == 1 else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    stored = {}
    for fname, group in zip(files, groups):
        part = {k: tensors[k] for k in group}
        if dtype == "BF16":
            save_flax({k: jnp.asarray(v, jnp.bfloat16) for k, v in part.items()}, str(dir_ / fname))
            stored.update({k: np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32)) for k, v in part.items()})
        else:
            npd = {"F32": np.float32, "F16": np.float16}[dtype]
            save_file({k: v.astype(npd) for k, v in part.items()}, str(dir_ / fname))
            stored.update({k: v.astype(npd).astype(np.float32) for k, v in part.items()})
    if shards > 1:
        (dir_ / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f for f, g in zip(files, groups) for k in g}}))
    return stored


def heads_sum(w_o, w_v_heads, H, hd, rep):
    """sum_h W_o[:, h hd:(h+1) hd] @ W_v^{h // rep}, one head at a time."""
    return sum(w_o[:, h * hd:(h + 1) * hd].astype(np.float64) @ w_v_heads[h // rep].astype(np.float64) for h in range(H))


# ---------------------------------------------------------------------------------------------- layouts


def make_gpt2(tmp, rng, dtype="F32"):
    d, h, H = 16, 64, 4
    t = {"wte.weight": _rand(rng, 50, d), "wpe.weight": _rand(rng, 8, d)}
    for i in range(L):
        p = f"h.{i}."
        t.update({p + "ln_1.weight": 1 + _rand(rng, d), p + "ln_1.bias": _rand(rng, d),
                  p + "attn.c_attn.weight": _rand(rng, d, 3 * d), p + "attn.c_attn.bias": _rand(rng, 3 * d),
                  p + "attn.c_proj.weight": _rand(rng, d, d), p + "attn.c_proj.bias": _rand(rng, d),
                  p + "attn.bias": np.tril(np.ones((1, 1, 8, 8), np.float32)),
                  p + "ln_2.weight": 1 + _rand(rng, d), p + "ln_2.bias": _rand(rng, d),
                  p + "mlp.c_fc.weight": _rand(rng, d, h), p + "mlp.c_fc.bias": _rand(rng, h),
                  p + "mlp.c_proj.weight": _rand(rng, h, d), p + "mlp.c_proj.bias": _rand(rng, d)})
    s = _write(tmp, t, {"model_type": "gpt2", "n_embd": d, "n_head": H, "n_layer": L}, dtype)
    ref = []
    for i in range(L):  # Conv1D: stored (in, out), y = x W
        p = f"h.{i}."
        w_o = s[p + "attn.c_proj.weight"].T
        w_v = s[p + "attn.c_attn.weight"][:, 2 * d:].T
        ref.append(dict(mlp=s[p + "mlp.c_proj.weight"].T.astype(np.float64) @ s[p + "mlp.c_fc.weight"].T,
                        wo=w_o, value=heads_sum(w_o, w_v.reshape(H, d // H, d), H, d // H, 1),
                        g1=s[p + "ln_1.weight"], g2=s[p + "ln_2.weight"], w_up=s[p + "mlp.c_fc.weight"].T,
                        w_down=s[p + "mlp.c_proj.weight"].T, w_o=w_o, w_v=w_v, w_q=s[p + "attn.c_attn.weight"][:, :d].T))
    return ref


def make_llama(tmp, rng, *, dtype="F32", shards=1, model_type="qwen2", config=True, H=4, KV=2, hd=4, d=16,
               gemma3=False):
    h = 24
    t = {"model.embed_tokens.weight": _rand(rng, 50, d), "model.norm.weight": _rand(rng, d)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": _rand(rng, H * hd, d), p + "self_attn.k_proj.weight": _rand(rng, KV * hd, d),
                  p + "self_attn.v_proj.weight": _rand(rng, KV * hd, d), p + "self_attn.o_proj.weight": _rand(rng, d, H * hd),
                  p + "mlp.gate_proj.weight": _rand(rng, h, d), p + "mlp.up_proj.weight": _rand(rng, h, d),
                  p + "mlp.down_proj.weight": _rand(rng, d, h),
                  p + "input_layernorm.weight": _rand(rng, d), p + "post_attention_layernorm.weight": _rand(rng, d)})
        if model_type == "qwen2":
            t.update({p + "self_attn.q_proj.bias": _rand(rng, H * hd), p + "self_attn.k_proj.bias": _rand(rng, KV * hd),
                      p + "self_attn.v_proj.bias": _rand(rng, KV * hd)})
        if gemma3:
            t.update({p + "pre_feedforward_layernorm.weight": _rand(rng, d), p + "post_feedforward_layernorm.weight": _rand(rng, d),
                      p + "self_attn.q_norm.weight": _rand(rng, hd), p + "self_attn.k_norm.weight": _rand(rng, hd)})
    cfg = {"model_type": model_type, "hidden_size": d, "num_attention_heads": H, "num_key_value_heads": KV,
           "head_dim": hd, "intermediate_size": h, "num_hidden_layers": L} if config else None
    s = _write(tmp, t, cfg, dtype, shards)
    ref = []
    for i in range(L):
        p = f"model.layers.{i}."
        w_o, w_v = s[p + "self_attn.o_proj.weight"], s[p + "self_attn.v_proj.weight"]
        ln2 = s[p + ("pre_feedforward_layernorm.weight" if gemma3 else "post_attention_layernorm.weight")]
        ref.append(dict(mlp=s[p + "mlp.down_proj.weight"].astype(np.float64) @ s[p + "mlp.up_proj.weight"],
                        wo=w_o if w_o.shape[1] == d else w_o.astype(np.float64) @ w_o.T,
                        value=heads_sum(w_o, w_v.reshape(KV, hd, d), H, hd, H // KV),
                        g1=s[p + "input_layernorm.weight"], g2=ln2, w_up=s[p + "mlp.up_proj.weight"],
                        w_down=s[p + "mlp.down_proj.weight"], w_o=w_o, w_v=w_v,
                        post_attn=s.get(p + "post_attention_layernorm.weight") if gemma3 else None,
                        post_mlp=s.get(p + "post_feedforward_layernorm.weight")))
    return ref


def make_neox(tmp, rng, dtype="F16"):
    d, H, h = 16, 4, 64
    hd = d // H
    t = {"gpt_neox.embed_in.weight": _rand(rng, 50, d)}
    for i in range(L):
        p = f"gpt_neox.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + _rand(rng, d), p + "input_layernorm.bias": _rand(rng, d),
                  p + "post_attention_layernorm.weight": 1 + _rand(rng, d), p + "post_attention_layernorm.bias": _rand(rng, d),
                  p + "attention.query_key_value.weight": _rand(rng, 3 * d, d), p + "attention.query_key_value.bias": _rand(rng, 3 * d),
                  p + "attention.dense.weight": _rand(rng, d, d), p + "attention.dense.bias": _rand(rng, d),
                  p + "attention.rotary_emb.inv_freq": _rand(rng, hd // 2),
                  p + "mlp.dense_h_to_4h.weight": _rand(rng, h, d), p + "mlp.dense_h_to_4h.bias": _rand(rng, h),
                  p + "mlp.dense_4h_to_h.weight": _rand(rng, d, h), p + "mlp.dense_4h_to_h.bias": _rand(rng, d)})
    s = _write(tmp, t, {"model_type": "gpt_neox", "hidden_size": d, "num_attention_heads": H,
                        "use_parallel_residual": True}, dtype)
    ref = []
    for i in range(L):
        p = f"gpt_neox.layers.{i}."
        qkv = s[p + "attention.query_key_value.weight"]
        # rows of head k: [q_k (hd rows), k_k (hd), v_k (hd)]
        w_v_heads = [qkv[k * 3 * hd + 2 * hd: k * 3 * hd + 3 * hd] for k in range(H)]
        w_q = np.concatenate([qkv[k * 3 * hd: k * 3 * hd + hd] for k in range(H)])
        w_o = s[p + "attention.dense.weight"]
        ref.append(dict(mlp=s[p + "mlp.dense_4h_to_h.weight"].astype(np.float64) @ s[p + "mlp.dense_h_to_4h.weight"],
                        wo=w_o, value=heads_sum(w_o, w_v_heads, H, hd, 1), w_q=w_q,
                        b_v=np.concatenate([s[p + "attention.query_key_value.bias"][k * 3 * hd + 2 * hd: k * 3 * hd + 3 * hd]
                                            for k in range(H)])))
    return ref


def make_phi(tmp, rng):
    d, H, h = 16, 2, 32
    t = {}
    for i in range(L):
        p = f"model.layers.{i}."
        for n, shp in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)), ("self_attn.v_proj", (d, d)),
                       ("self_attn.dense", (d, d)), ("mlp.fc1", (h, d)), ("mlp.fc2", (d, h))):
            t[p + n + ".weight"] = _rand(rng, *shp)
            t[p + n + ".bias"] = _rand(rng, shp[0])
        t[p + "input_layernorm.weight"] = 1 + _rand(rng, d)
        t[p + "input_layernorm.bias"] = _rand(rng, d)
    s = _write(tmp, t, {"model_type": "phi", "hidden_size": d, "num_attention_heads": H}, "BF16")
    return [dict(mlp=s[f"model.layers.{i}.mlp.fc2.weight"].astype(np.float64) @ s[f"model.layers.{i}.mlp.fc1.weight"],
                 wo=s[f"model.layers.{i}.self_attn.dense.weight"],
                 value=s[f"model.layers.{i}.self_attn.dense.weight"].astype(np.float64) @ s[f"model.layers.{i}.self_attn.v_proj.weight"],
                 g=s[f"model.layers.{i}.input_layernorm.weight"]) for i in range(L)]


def make_phi3(tmp, rng):
    d, H, KV, hd, h = 16, 4, 2, 4, 24
    t = {}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.qkv_proj.weight": _rand(rng, (H + 2 * KV) * hd, d), p + "self_attn.o_proj.weight": _rand(rng, d, H * hd),
                  p + "mlp.gate_up_proj.weight": _rand(rng, 2 * h, d), p + "mlp.down_proj.weight": _rand(rng, d, h),
                  p + "input_layernorm.weight": _rand(rng, d), p + "post_attention_layernorm.weight": _rand(rng, d)})
    s = _write(tmp, t, {"model_type": "phi3", "hidden_size": d, "num_attention_heads": H, "num_key_value_heads": KV})
    ref = []
    for i in range(L):
        p = f"model.layers.{i}."
        qkv, w_o = s[p + "self_attn.qkv_proj.weight"], s[p + "self_attn.o_proj.weight"]
        w_v = qkv[(H + KV) * hd:]
        ref.append(dict(mlp=s[p + "mlp.down_proj.weight"].astype(np.float64) @ s[p + "mlp.gate_up_proj.weight"][h:],
                        wo=w_o, value=heads_sum(w_o, w_v.reshape(KV, hd, d), H, hd, H // KV)))
    return ref


def make_bert(tmp, rng):
    d, H, h = 16, 4, 64
    t = {"bert.embeddings.word_embeddings.weight": _rand(rng, 50, d)}
    for i in range(L):
        p = f"bert.encoder.layer.{i}."
        for n, shp in (("attention.self.query", (d, d)), ("attention.self.key", (d, d)), ("attention.self.value", (d, d)),
                       ("attention.output.dense", (d, d)), ("intermediate.dense", (h, d)), ("output.dense", (d, h))):
            t[p + n + ".weight"] = _rand(rng, *shp)
            t[p + n + ".bias"] = _rand(rng, shp[0])
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):  # old-style gamma / beta names
            t[p + n + ".gamma"] = 1 + _rand(rng, d)
            t[p + n + ".beta"] = _rand(rng, d)
    s = _write(tmp, t, {"model_type": "bert", "hidden_size": d, "num_attention_heads": H})
    return [dict(mlp=s[f"bert.encoder.layer.{i}.output.dense.weight"].astype(np.float64) @ s[f"bert.encoder.layer.{i}.intermediate.dense.weight"],
                 wo=s[f"bert.encoder.layer.{i}.attention.output.dense.weight"],
                 value=s[f"bert.encoder.layer.{i}.attention.output.dense.weight"].astype(np.float64)
                 @ s[f"bert.encoder.layer.{i}.attention.self.value.weight"]) for i in range(L)]


def check_matrices(ckpt, ref, fold=False):
    for att in ("wo", "value"):
        W_mlp, W_attn = layer_matrices(ckpt, att, dtype=np.float64)
        assert W_mlp.shape == W_attn.shape == (L, ckpt.d_model, ckpt.d_model)
        for i in range(L):
            np.testing.assert_allclose(W_mlp[i], ref[i]["mlp"], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(W_attn[i], ref[i][att], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- tests


def test_gpt2_conv1d_layout(tmp_path):
    ref = make_gpt2(tmp_path, np.random.default_rng(0))
    ck = load_checkpoint(tmp_path)
    assert (ck.arch, ck.d_model, ck.num_heads, ck.num_kv_heads, ck.head_dim, ck.num_layers) == ("gpt2", 16, 4, 4, 4, L)
    assert (ck.norm, ck.mlp_kind, ck.activation, ck.parallel_residual, ck.post_ln) == ("layernorm", "gelu", "gelu_new", False, False)
    lw = ck.layers[0]
    assert lw.w_q.shape == (16, 16) and lw.w_up.shape == (64, 16) and lw.w_down.shape == (16, 64) and lw.w_gate is None
    np.testing.assert_array_equal(lw.w_q, ref[0]["w_q"])
    assert lw.w_q.dtype == np.float32 and lw.b_q.shape == (16,) and lw.ln1_bias is not None
    check_matrices(ck, ref)
    # gain folding: W_up diag(g2), W_v diag(g1)
    W_mlp, W_attn = layer_matrices(ck, "value", fold_gains=True, dtype=np.float64)
    r = ref[1]
    np.testing.assert_allclose(W_mlp[1], r["w_down"].astype(np.float64) @ (r["w_up"] * r["g2"].astype(np.float64)[None, :]), rtol=1e-10)
    np.testing.assert_allclose(W_attn[1], r["w_o"].astype(np.float64) @ (r["w_v"] * r["g1"].astype(np.float64)[None, :]),
                               rtol=1e-10)


def test_qwen2_gqa_sharded_fp16(tmp_path):
    ref = make_llama(tmp_path, np.random.default_rng(1), dtype="F16", shards=2)
    ck = load_checkpoint(tmp_path)
    assert (ck.arch, ck.num_heads, ck.num_kv_heads, ck.head_dim, ck.mlp_kind, ck.norm) == ("qwen2", 4, 2, 4, "swiglu", "rmsnorm")
    assert ck.dtype == "F16" and ck.norm_weight_offset == 0.0
    lw = ck.layers[1]
    assert lw.w_k.shape == (8, 16) and lw.w_gate.shape == (24, 16) and lw.b_q.shape == (16,) and lw.ln1_bias is None
    check_matrices(ck, ref)
    # the library helper on its own: GQA grouping against the head loop
    np.testing.assert_allclose(value_matrix(lw.w_o, lw.w_v, num_heads=4, num_kv_heads=2, head_dim=4), ref[1]["value"], rtol=1e-10)


def test_gemma3_bf16_nonsquare_wo(tmp_path):
    # num_heads * head_dim = 2 * 12 = 24 != d = 16: the rule uses W_o W_o^T
    ref = make_llama(tmp_path, np.random.default_rng(2), dtype="BF16", model_type="gemma3_text", H=2, KV=1, hd=12,
                     gemma3=True)
    ck = load_checkpoint(tmp_path)
    assert (ck.arch, ck.num_heads, ck.num_kv_heads, ck.head_dim, ck.mlp_kind, ck.activation) == \
        ("gemma3", 2, 1, 12, "geglu", "gelu_pytorch_tanh")
    assert ck.norm_weight_offset == 1.0 and ck.dtype == "BF16"
    lw = ck.layers[0]
    assert lw.w_o.shape == (16, 24) and lw.q_norm_weight.shape == (12,) and lw.post_attn_norm_weight is not None
    check_matrices(ck, ref)
    # Gemma: scale = 1 + w, including the sandwich norms on the branch outputs
    W_mlp, W_attn = layer_matrices(ck, "value", fold_gains=True, dtype=np.float64)
    r = ref[0]
    w_down = (1 + r["post_mlp"].astype(np.float64))[:, None] * r["w_down"]
    np.testing.assert_allclose(W_mlp[0], w_down @ (r["w_up"] * (1 + r["g2"].astype(np.float64))[None, :]), rtol=1e-10)
    w_o = (1 + r["post_attn"].astype(np.float64))[:, None] * r["w_o"]
    w_v = r["w_v"] * (1 + r["g1"].astype(np.float64))[None, :]
    np.testing.assert_allclose(W_attn[0], heads_sum(w_o, w_v.reshape(1, 12, 16), 2, 12, 2), rtol=1e-10)


def test_bf16_read_is_exact(tmp_path):
    x = np.random.default_rng(3).standard_normal((5, 7)).astype(np.float32) * 100
    save_flax({"layers.0.x": jnp.asarray(x, jnp.bfloat16)}, str(tmp_path / "a.safetensors"))
    from meanfield.checkpoints import TensorStore

    got = TensorStore([tmp_path / "a.safetensors"]).get("layers.0.x")
    np.testing.assert_array_equal(got, np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)))
    assert got.dtype == np.float32 and np.max(np.abs(got - x) / np.abs(x)) < 2**-8


def test_neox_interleaved_qkv(tmp_path):
    ref = make_neox(tmp_path, np.random.default_rng(4))
    ck = load_checkpoint(tmp_path)
    assert (ck.arch, ck.parallel_residual, ck.num_heads, ck.head_dim) == ("gpt_neox", True, 4, 4)
    np.testing.assert_array_equal(ck.layers[0].w_q, ref[0]["w_q"])
    np.testing.assert_array_equal(ck.layers[1].b_v, ref[1]["b_v"])
    check_matrices(ck, ref)


def test_phi_bf16_shared_norm(tmp_path):
    ref = make_phi(tmp_path, np.random.default_rng(5))
    ck = load_checkpoint(tmp_path)
    assert (ck.arch, ck.parallel_residual, ck.mlp_kind, ck.dtype) == ("phi", True, "gelu", "BF16")
    assert ck.layers[0].ln2_weight is ck.layers[0].ln1_weight
    check_matrices(ck, ref)


def test_phi3_fused(tmp_path):
    ref = make_phi3(tmp_path, np.random.default_rng(6))
    ck = load_checkpoint(tmp_path)
    assert (ck.arch, ck.num_kv_heads, ck.mlp_kind) == ("phi3", 2, "swiglu")
    check_matrices(ck, ref)


def test_bert_post_norm(tmp_path):
    ref = make_bert(tmp_path, np.random.default_rng(7))
    ck = load_checkpoint(tmp_path)
    assert (ck.arch, ck.post_ln, ck.norm) == ("bert", True, "layernorm") and ck.layers[0].ln1_bias is not None
    check_matrices(ck, ref)
    with pytest.raises(ValueError, match="post-norm"):
        layer_matrices(ck, fold_gains=True)


def test_single_file_without_config(tmp_path):
    rng = np.random.default_rng(8)
    ref = make_llama(tmp_path / "mha", rng, config=False, model_type="llama", H=4, KV=4, hd=4)
    ck = load_checkpoint(tmp_path / "mha" / "model.safetensors")
    assert (ck.arch, ck.num_heads, ck.head_dim) == ("llama", 0, 0)  # unknown without config.json
    check_matrices(ck, ref)  # multi-head: sum_h W_o^h W_v^h = W_o W_v needs no head split
    make_llama(tmp_path / "gqa", rng, config=False, model_type="llama", H=4, KV=2, hd=4)
    ck = load_checkpoint(tmp_path / "gqa" / "model.safetensors")
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        layer_matrices(ck, "value")


def test_errors(tmp_path):
    save_file({"encoder.blocks.0.attn.wqkv": np.zeros((6, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=r"unknown tensor layout.*encoder\.blocks\.0\.attn\.wqkv.*Tables tried: .*gpt2"):
        load_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope")
    make_llama(tmp_path / "bad", np.random.default_rng(9))
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3}))
    with pytest.raises(CheckpointError, match="num_attention_heads=3"):
        load_checkpoint(tmp_path / "bad")


def _args(path, out, **kw):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    argv = ["weights", str(path), "--out", str(out)]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return parser.parse_args(argv)


def test_cli_end_to_end(tmp_path, capsys):
    import xarray as xr

    from test_rule import numpy_rule

    ref = make_llama(tmp_path / "ck", np.random.default_rng(10), dtype="BF16", model_type="llama")
    out = tmp_path / "out"
    assert cli.run(_args(tmp_path / "ck", out, attention="both")) == 0
    text = capsys.readouterr().out
    assert "W_attn = W_o" in text and "value-aware" in text and "mean rho" in text
    rows = list(csv.DictReader(open(out / "weights.csv")))
    assert len(rows) == 2 * L and (out / "weights.png").is_file()
    ds = xr.load_dataset(out / "weights.nc", engine="h5netcdf")
    assert list(ds.attention.values) == ["wo", "value"] and ds.rho.attrs["units"] == "1"
    for j, att in enumerate(("wo", "value")):
        Wm = np.stack([r["mlp"] for r in ref])
        Wa = np.stack([np.asarray(r[att], np.float64) for r in ref])
        rho = [np.linalg.norm(Wm[i], 2) / np.linalg.norm(Wa[i], 2) for i in range(L)]
        er, cond = numpy_rule(Wm, Wa, store=np.float32)  # the rule's precision: float64 steps, float32 storage
        np.testing.assert_allclose(ds.mlp_norm.values[j], [np.linalg.norm(w, 2) for w in Wm], rtol=1e-10)
        np.testing.assert_allclose(ds.rho.values[j], rho, rtol=1e-10)
        np.testing.assert_allclose(ds.erank.values[j], er, rtol=1e-9)
        np.testing.assert_allclose(ds.cond.values[j], cond, rtol=1e-6)
        np.testing.assert_allclose([float(r["rho"]) for r in rows if r["attention"] == att], rho, rtol=1e-6)
    # --float64 keeps C in float64
    assert cli.run(_args(tmp_path / "ck", out, float64=True)) == 0
    ds = xr.load_dataset(out / "weights.nc", engine="h5netcdf")
    er, _ = numpy_rule(np.stack([r["mlp"] for r in ref]), np.stack([r["wo"] for r in ref]))
    np.testing.assert_allclose(ds.erank.values[0], er, rtol=1e-10)


def test_cli_errors(tmp_path, capsys):
    assert cli.run(_args(tmp_path / "missing", tmp_path / "o")) == 2
    assert "missing" in capsys.readouterr().err
    save_file({"foo.0.bar": np.zeros((2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    assert cli.run(_args(tmp_path / "x.safetensors", tmp_path / "o")) == 2
    assert "unknown tensor layout" in capsys.readouterr().err
    make_bert(tmp_path / "b", np.random.default_rng(11))
    assert cli.run(_args(tmp_path / "b", tmp_path / "o", fold_gains=True)) == 2
    assert "post-norm" in capsys.readouterr().err
