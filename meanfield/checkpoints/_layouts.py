"""Per-architecture tensor-name tables and the loader that turns a safetensors checkpoint into a `Checkpoint`.

A layout is recognised from the tensor names of layer 0 (``Layout.required`` under one of its layer
prefixes); config.json's ``model_type`` only picks among layouts that match and names the family
within one (Llama / Qwen2 / Gemma share tensor names). Every matrix is returned in y = W x form,
(out, in): GPT-2's Conv1D weights (stored (in, out)) are transposed, fused q/k/v projections split
(GPT-NeoX's per head interleaved: rows ordered (head, {q, k, v}, head_dim)).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from ._io import TensorStore, resolve
from ._types import Checkpoint, CheckpointError, LayerWeights


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    prefixes: tuple[str, ...]
    required: tuple[str, ...]
    model_types: tuple[str, ...]
    build: Callable = None  # (get, opt, dims) -> LayerWeights


def _T(a):
    return None if a is None else np.ascontiguousarray(a.T)


def _split_rows(w, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(None if w is None else w[start:start + s])
        start += s
    return out


def _cfg(config, *names, default=None):
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default


def _cfg_int(config, path, *names, default=0) -> int:
    """A positive-integer config field (the first of ``names`` present), else ``default``."""
    for n in names:
        v = config.get(n)
        if v is None:
            continue
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CheckpointError(f"{path}: config.json field {n} = {v!r}; expected a positive integer.")
        return v
    return default


def _cfg_str(config, path, *names, default=None) -> str:
    for n in names:
        v = config.get(n)
        if v is not None and not isinstance(v, str):
            raise CheckpointError(f"{path}: config.json field {n} = {v!r}; expected a string.")
    return _cfg(config, *names, default=default)


class _LayerError(Exception):
    """A builder's complaint about one layer's tensors; `load_checkpoint` adds the path and layer."""


def _gated_kind(act: str) -> str:
    if "gelu" in act:
        return "geglu"
    if act in ("silu", "swish"):
        return "swiglu"
    return f"{act}-glu"


def _plain_kind(act: str) -> str:
    for k in ("gelu", "relu", "silu", "tanh"):
        if k in act:
            return k
    return act


# ------------------------------------------------------------------ builders (get: required, opt: optional)


def _build_gpt2(get, opt, dims):
    d = dims["d"]
    w_qkv = get("attn.c_attn.weight").T  # Conv1D (in, out) -> (out, in)
    b_qkv = opt("attn.c_attn.bias")
    w_q, w_k, w_v = _split_rows(w_qkv, (d, d, d))
    b_q, b_k, b_v = _split_rows(b_qkv, (d, d, d))
    return LayerWeights(
        w_q=np.ascontiguousarray(w_q), w_k=np.ascontiguousarray(w_k), w_v=np.ascontiguousarray(w_v),
        w_o=_T(get("attn.c_proj.weight")), b_q=b_q, b_k=b_k, b_v=b_v, b_o=opt("attn.c_proj.bias"),
        w_up=_T(get("mlp.c_fc.weight")), b_up=opt("mlp.c_fc.bias"),
        w_down=_T(get("mlp.c_proj.weight")), b_down=opt("mlp.c_proj.bias"),
        ln1_weight=get("ln_1.weight"), ln1_bias=opt("ln_1.bias"),
        ln2_weight=get("ln_2.weight"), ln2_bias=opt("ln_2.bias"))


def _build_llama(get, opt, dims):
    sandwich = opt("pre_feedforward_layernorm.weight") is not None
    return LayerWeights(
        w_q=get("self_attn.q_proj.weight"), w_k=get("self_attn.k_proj.weight"), w_v=get("self_attn.v_proj.weight"),
        w_o=get("self_attn.o_proj.weight"), b_q=opt("self_attn.q_proj.bias"), b_k=opt("self_attn.k_proj.bias"),
        b_v=opt("self_attn.v_proj.bias"), b_o=opt("self_attn.o_proj.bias"),
        w_gate=get("mlp.gate_proj.weight"), w_up=get("mlp.up_proj.weight"), w_down=get("mlp.down_proj.weight"),
        b_up=opt("mlp.up_proj.bias"), b_down=opt("mlp.down_proj.bias"),
        ln1_weight=get("input_layernorm.weight"),
        ln2_weight=get("pre_feedforward_layernorm.weight") if sandwich else get("post_attention_layernorm.weight"),
        post_attn_norm_weight=get("post_attention_layernorm.weight") if sandwich else None,
        post_mlp_norm_weight=opt("post_feedforward_layernorm.weight"),
        q_norm_weight=opt("self_attn.q_norm.weight"), k_norm_weight=opt("self_attn.k_norm.weight"))


def _build_neox(get, opt, dims):
    H, hd, d = dims["H"], dims["hd"], dims["d"]
    w = get("attention.query_key_value.weight")
    b = opt("attention.query_key_value.bias")
    if w.shape != (3 * H * hd, d) or (b is not None and b.shape != (3 * H * hd,)):
        raise _LayerError(f"attention.query_key_value has weight shape {w.shape}"
                          f"{'' if b is None else f' and bias shape {b.shape}'}; expected ({3 * H * hd}, {d}) "
                          f"and ({3 * H * hd},) for {H} heads of dimension {hd}.")
    w = w.reshape(H, 3, hd, d)
    b = None if b is None else b.reshape(H, 3, hd)
    q, k, v = (np.ascontiguousarray(w[:, j].reshape(H * hd, d)) for j in range(3))
    bq, bk, bv = (None, None, None) if b is None else (np.ascontiguousarray(b[:, j].reshape(H * hd)) for j in range(3))
    return LayerWeights(
        w_q=q, w_k=k, w_v=v, b_q=bq, b_k=bk, b_v=bv,
        w_o=get("attention.dense.weight"), b_o=opt("attention.dense.bias"),
        w_up=get("mlp.dense_h_to_4h.weight"), b_up=opt("mlp.dense_h_to_4h.bias"),
        w_down=get("mlp.dense_4h_to_h.weight"), b_down=opt("mlp.dense_4h_to_h.bias"),
        ln1_weight=get("input_layernorm.weight"), ln1_bias=opt("input_layernorm.bias"),
        ln2_weight=get("post_attention_layernorm.weight"), ln2_bias=opt("post_attention_layernorm.bias"))


def _build_phi(get, opt, dims):
    ln_w, ln_b = get("input_layernorm.weight"), opt("input_layernorm.bias")
    return LayerWeights(
        w_q=get("self_attn.q_proj.weight"), w_k=get("self_attn.k_proj.weight"), w_v=get("self_attn.v_proj.weight"),
        b_q=opt("self_attn.q_proj.bias"), b_k=opt("self_attn.k_proj.bias"), b_v=opt("self_attn.v_proj.bias"),
        w_o=get("self_attn.dense.weight"), b_o=opt("self_attn.dense.bias"),
        w_up=get("mlp.fc1.weight"), b_up=opt("mlp.fc1.bias"), w_down=get("mlp.fc2.weight"), b_down=opt("mlp.fc2.bias"),
        ln1_weight=ln_w, ln1_bias=ln_b, ln2_weight=ln_w, ln2_bias=ln_b)


def _build_phi3(get, opt, dims):
    q_rows, kv_rows = dims["q_rows"], dims["kv_rows"]
    w_qkv = get("self_attn.qkv_proj.weight")
    if w_qkv.shape[0] != q_rows + 2 * kv_rows:
        raise _LayerError(f"self_attn.qkv_proj.weight has {w_qkv.shape[0]} rows; expected {q_rows + 2 * kv_rows} "
                          f"(query {q_rows} + 2 x key/value {kv_rows}).")
    w_q, w_k, w_v = _split_rows(w_qkv, (q_rows, kv_rows, kv_rows))
    gate_up = get("mlp.gate_up_proj.weight")
    h = gate_up.shape[0] // 2
    return LayerWeights(
        w_q=w_q, w_k=w_k, w_v=w_v, w_o=get("self_attn.o_proj.weight"),
        w_gate=gate_up[:h], w_up=gate_up[h:], w_down=get("mlp.down_proj.weight"),
        ln1_weight=get("input_layernorm.weight"), ln2_weight=get("post_attention_layernorm.weight"))


def _build_bert(get, opt, dims):
    def ln(base):
        w = opt(base + ".weight")
        return (w, opt(base + ".bias")) if w is not None else (get(base + ".gamma"), opt(base + ".beta"))

    ln1_w, ln1_b = ln("attention.output.LayerNorm")
    ln2_w, ln2_b = ln("output.LayerNorm")
    return LayerWeights(
        w_q=get("attention.self.query.weight"), w_k=get("attention.self.key.weight"),
        w_v=get("attention.self.value.weight"), b_q=opt("attention.self.query.bias"),
        b_k=opt("attention.self.key.bias"), b_v=opt("attention.self.value.bias"),
        w_o=get("attention.output.dense.weight"), b_o=opt("attention.output.dense.bias"),
        w_up=get("intermediate.dense.weight"), b_up=opt("intermediate.dense.bias"),
        w_down=get("output.dense.weight"), b_down=opt("output.dense.bias"),
        ln1_weight=ln1_w, ln1_bias=ln1_b, ln2_weight=ln2_w, ln2_bias=ln2_b, post_ln=True)


def _build_meanfield(get, opt, dims):
    ones = np.ones(dims["d"], np.float32)  # norm "none": the blocks have no norm weights

    def norm(base):
        w = opt(base + ".weight")
        return (ones, None) if w is None else (w, opt(base + ".bias"))

    (ln1_w, ln1_b), (ln2_w, ln2_b) = norm("ln1"), norm("ln2")
    return LayerWeights(
        w_q=get("attn.q.weight"), w_k=get("attn.k.weight"), w_v=get("attn.v.weight"), w_o=get("attn.o.weight"),
        b_q=opt("attn.q.bias"), b_k=opt("attn.k.bias"), b_v=opt("attn.v.bias"), b_o=opt("attn.o.bias"),
        w_up=get("mlp.up.weight"), b_up=opt("mlp.up.bias"), w_gate=opt("mlp.gate.weight"),
        w_down=get("mlp.down.weight"), b_down=opt("mlp.down.bias"),
        ln1_weight=ln1_w, ln1_bias=ln1_b, ln2_weight=ln2_w, ln2_bias=ln2_b, post_ln=dims["post_ln"])


LAYOUTS: tuple[Layout, ...] = (
    Layout("meanfield", ("blocks.{i}.",),
           ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "mlp.up.weight", "mlp.down.weight"),
           ("meanfield",), _build_meanfield),
    Layout("gpt2", ("h.{i}.", "transformer.h.{i}."),
           ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"), ("gpt2",), _build_gpt2),
    Layout("llama", ("model.layers.{i}.", "layers.{i}.", "language_model.model.layers.{i}.",
                     "model.language_model.layers.{i}."),
           ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"),
           ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"), _build_llama),
    Layout("gpt_neox", ("gpt_neox.layers.{i}.", "layers.{i}."),
           ("attention.query_key_value.weight", "attention.dense.weight", "mlp.dense_h_to_4h.weight",
            "mlp.dense_4h_to_h.weight"), ("gpt_neox",), _build_neox),
    Layout("phi", ("model.layers.{i}.", "layers.{i}."),
           ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.dense.weight",
            "mlp.fc1.weight", "mlp.fc2.weight"), ("phi",), _build_phi),
    Layout("phi3", ("model.layers.{i}.", "layers.{i}."),
           ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"),
           ("phi3",), _build_phi3),
    Layout("bert", ("bert.encoder.layer.{i}.", "encoder.layer.{i}.", "roberta.encoder.layer.{i}."),
           ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
            "attention.output.dense.weight", "intermediate.dense.weight", "output.dense.weight"),
           ("bert", "roberta"), _build_bert),
)


def _detect(store: TensorStore, config: dict, path) -> tuple[Layout, str]:
    found = []
    for layout in LAYOUTS:
        for prefix in layout.prefixes:
            p0 = prefix.format(i=0)
            if all(p0 + r in store for r in layout.required):
                found.append((layout, prefix))
    if not found:
        names = sorted(store.names)
        layer0 = [n for n in names if ".0." in n] or names
        sample = ", ".join(layer0[:24]) + (f", ... ({len(names)} tensors in all)" if len(layer0) > 24 else "")
        tried = "; ".join(f"{lay.name}: {lay.prefixes[0].format(i=0)}{{{', '.join(lay.required)}}}" for lay in LAYOUTS)
        mt = config.get("model_type")
        raise CheckpointError(f"{path}: unknown tensor layout{f' (config model_type={mt!r})' if mt else ''}. "
                              f"Tensors found: {sample}. Tables tried: {tried}.")
    mt = config.get("model_type")
    for layout, prefix in found:
        if mt in layout.model_types:
            return layout, prefix
    return found[0]


def _family(layout: Layout, config: dict, has) -> str:
    if layout.name != "llama":
        return layout.name
    mt = config.get("model_type")
    if mt:
        return "gemma3" if mt == "gemma3_text" else ("llama" if mt == "mistral" else mt)
    if has("pre_feedforward_layernorm.weight"):
        return "gemma3" if has("self_attn.q_norm.weight") else "gemma2"
    return "qwen3" if has("self_attn.q_norm.weight") else "llama"


def _heads(config, path, *, q_rows, kv_rows, hd_hint=0):
    """(H, KV, hd) from config.json (num_attention_heads / n_head, num_key_value_heads, head_dim), checked
    against the tensor rows; 0 where unknown (no config and no tensor that fixes it)."""
    H = _cfg_int(config, path, "num_attention_heads", "n_head", default=0)
    KV = _cfg_int(config, path, "num_key_value_heads", default=H)
    hd = _cfg_int(config, path, "head_dim", default=0) or hd_hint or (q_rows // H if H else 0)
    if not H and hd:
        H, KV = q_rows // hd, kv_rows // hd
    if H and (H * hd != q_rows or KV * hd != kv_rows or H % max(KV, 1)):
        raise CheckpointError(
            f"{path}: config.json num_attention_heads={H}, num_key_value_heads={KV}, head_dim={hd} do not match "
            f"the tensors (query rows {q_rows}, key/value rows {kv_rows}).")
    return H, KV, hd


def load_checkpoint(path, *, config: dict | None = None) -> Checkpoint:
    """Read a Hugging Face-style checkpoint (directory with config.json + model.safetensors or a sharded
    ``model.safetensors.index.json``, or one .safetensors file) into a `Checkpoint` (float32, y = W x).

    ``config`` overrides config.json (e.g. to give ``num_attention_heads`` for a bare file).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: unknown layout (lists a sample of the tensor names and the tables tried), a tensor
            missing or of the wrong shape, or config.json fields that contradict the tensors.
    """
    files, cfg, p = resolve(path)
    if config is not None:
        cfg = dict(config)
    return checkpoint_from_store(TensorStore(files), cfg, p)


class ArrayStore:
    """`TensorStore`'s interface over in-memory arrays (name -> array), e.g. a model being trained."""

    def __init__(self, tensors: dict, dtype: str = "F32"):
        self._t, self._dtype = dict(tensors), dtype

    @property
    def names(self) -> list[str]:
        return list(self._t)

    def __contains__(self, name) -> bool:
        return name in self._t

    def shape(self, name) -> tuple[int, ...]:
        return tuple(np.shape(self._t[name]))

    def dtypes(self) -> str:
        return self._dtype

    def get(self, name, *, finite: bool = False) -> np.ndarray:
        if name not in self._t:
            raise CheckpointError(f"tensor {name!r} not found.")
        arr = np.asarray(self._t[name], np.float32)
        if finite and not np.all(np.isfinite(arr)):
            raise CheckpointError(f"tensor {name!r} holds NaN or inf.")
        return arr


def checkpoint_from_tensors(tensors: dict, config: dict, source: str = "<memory>") -> Checkpoint:
    """The `Checkpoint` that `load_checkpoint` would read from these tensors saved with this config.json
    (the same tables and checks), without writing them: e.g. the telemetry of `meanfield.train`."""
    return checkpoint_from_store(ArrayStore(tensors), dict(config), source)


def checkpoint_from_store(store, cfg: dict, p) -> Checkpoint:
    """A `Checkpoint` from a tensor store (`TensorStore` or `ArrayStore`) and its config dict."""
    mt = cfg.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise CheckpointError(f"{p}: config.json field model_type = {mt!r}; expected a string.")
    layout, prefix = _detect(store, cfg, p)
    has0 = lambda s: prefix.format(i=0) + s in store  # noqa: E731
    arch = _family(layout, cfg, has0)
    L = 0
    while all(prefix.format(i=L) + r in store for r in layout.required):
        for r in layout.required:
            shp = store.shape(prefix.format(i=L) + r)
            if len(shp) != 2 or 0 in shp:
                raise CheckpointError(f"{p}: tensor {prefix.format(i=L) + r!r} has shape {shp}; expected a non-empty matrix.")
        L += 1
    _check_layer_count(store, cfg, p, layout, prefix, L)

    def shape(s, ndim=2):
        shp = store.shape(prefix.format(i=0) + s)
        if len(shp) != ndim:
            raise CheckpointError(f"{p}: tensor {prefix.format(i=0) + s!r} has shape {shp}; expected {ndim} dimension(s).")
        return shp

    # dimensions
    if layout.name == "gpt2":
        d = shape("attn.c_attn.weight")[0]
        H, KV, hd = _heads(cfg, p, q_rows=d, kv_rows=d)
        act = _cfg_str(cfg, p, "activation_function", default="gelu_new")
        norm, mlp_kind, parallel = "layernorm", _plain_kind(act), False
    elif layout.name == "llama":
        q_rows, d = shape("self_attn.q_proj.weight")
        hd_hint = shape("self_attn.q_norm.weight", 1)[0] if has0("self_attn.q_norm.weight") else 0
        H, KV, hd = _heads(cfg, p, q_rows=q_rows, kv_rows=shape("self_attn.k_proj.weight")[0], hd_hint=hd_hint)
        act = _cfg_str(cfg, p, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh" if arch.startswith("gemma") else "silu")
        norm, mlp_kind, parallel = "rmsnorm", _gated_kind(act), False
    elif layout.name == "gpt_neox":
        d = shape("attention.dense.weight")[0]
        H, KV, hd = _heads(cfg, p, q_rows=d, kv_rows=d)
        if not H:
            raise CheckpointError(f"{p}: GPT-NeoX fuses q/k/v per head; config.json field num_attention_heads is "
                                  "needed to split attention.query_key_value (no config.json found).")
        act = _cfg_str(cfg, p, "hidden_act", default="gelu")
        norm, mlp_kind, parallel = "layernorm", _plain_kind(act), bool(_cfg(cfg, "use_parallel_residual", default=True))
    elif layout.name == "phi":
        q_rows, d = shape("self_attn.q_proj.weight")
        H, KV, hd = _heads(cfg, p, q_rows=q_rows, kv_rows=shape("self_attn.k_proj.weight")[0])
        act = _cfg_str(cfg, p, "hidden_act", default="gelu_new")
        norm, mlp_kind, parallel = "layernorm", _plain_kind(act), True
    elif layout.name == "phi3":
        d, q_rows = shape("self_attn.o_proj.weight")
        kv_rows = (shape("self_attn.qkv_proj.weight")[0] - q_rows) // 2
        H, KV, hd = _heads(cfg, p, q_rows=q_rows, kv_rows=kv_rows)
        act = _cfg_str(cfg, p, "hidden_act", default="silu")
        norm, mlp_kind, parallel = "rmsnorm", _gated_kind(act), False
    elif layout.name == "meanfield":
        q_rows, d = shape("attn.q.weight")
        H, KV, hd = _heads(cfg, p, q_rows=q_rows, kv_rows=shape("attn.k.weight")[0])
        gated = has0("mlp.gate.weight")
        act = _cfg_str(cfg, p, "hidden_act", default="silu" if gated else "gelu_new")
        norm = _cfg_str(cfg, p, "norm", default="layernorm")
        if norm not in ("layernorm", "rmsnorm", "none"):
            raise CheckpointError(f"{p}: config.json field norm = {norm!r}; expected layernorm, rmsnorm or none.")
        mlp_kind, parallel = (_gated_kind(act) if gated else _plain_kind(act)), False
    else:  # bert
        d = shape("attention.self.query.weight")[1]
        H, KV, hd = _heads(cfg, p, q_rows=d, kv_rows=d)
        act = _cfg_str(cfg, p, "hidden_act", default="gelu")
        norm, mlp_kind, parallel = "layernorm", _plain_kind(act), False
    dims = {"d": d, "H": H, "KV": KV, "hd": hd, "post_ln": bool(cfg.get("post_ln", False))}
    if layout.name == "phi3":
        dims.update(q_rows=q_rows, kv_rows=kv_rows)

    layers = []
    for i in range(L):
        pre = prefix.format(i=i)
        try:
            layers.append(layout.build(lambda s, pre=pre: store.get(pre + s, finite=True),
                                       lambda s, pre=pre: store.get(pre + s, finite=True) if pre + s in store else None,
                                       dims))
        except _LayerError as exc:
            raise CheckpointError(f"{p}: layer {i} ({pre}...): {exc}") from None
    ckpt = Checkpoint(arch=arch, config=cfg, d_model=int(d), num_heads=H, num_kv_heads=KV, head_dim=hd, norm=norm,
                      mlp_kind=mlp_kind, activation=str(act), parallel_residual=parallel, layers=tuple(layers),
                      norm_weight_offset=1.0 if arch.startswith("gemma") else 0.0, source=str(p), dtype=store.dtypes())
    _check_shapes(ckpt, prefix)
    return ckpt


def _check_layer_count(store: TensorStore, cfg: dict, p, layout: Layout, prefix: str, L: int) -> None:
    """Layers 0..L-1 are complete: refuse a partial layer L, tensors of later layers, or a config.json
    layer count that disagrees (a missing shard or file would otherwise shorten the analysis silently)."""
    pre = prefix.format(i=L)
    partial = [r for r in layout.required if pre + r in store]
    if partial:
        missing = [r for r in layout.required if pre + r not in store]
        raise CheckpointError(f"{p}: layer {L} is incomplete: {pre}{{{', '.join(missing)}}} missing "
                              f"(layers 0-{L - 1} are complete).")
    head = re.escape(prefix.partition("{i}")[0])
    later = sorted({int(m.group(1)) for n in store.names if (m := re.match(head + r"([0-9]+)\.", n))} - set(range(L)))
    if later:
        raise CheckpointError(f"{p}: layers 0-{L - 1} are complete, but tensors of layer(s) "
                              f"{', '.join(map(str, later[:8]))}{' ...' if len(later) > 8 else ''} are present without "
                              f"layer {L}'s {{{', '.join(layout.required)}}} (a missing shard or file?).")
    n = _cfg_int(cfg, p, "num_hidden_layers", "n_layer", default=0)
    if n and n != L:
        raise CheckpointError(f"{p}: config.json says {n} layers but the tensors hold {L} complete layers "
                              f"({prefix.format(i=0)}... to {prefix.format(i=L - 1)}...).")


def _check_shapes(ckpt: Checkpoint, prefix: str) -> None:
    """Every layer's matrices, norms and biases have the shapes the dimensions imply."""
    d = ckpt.d_model
    for i, lw in enumerate(ckpt.layers):
        h = lw.w_up.shape[0]
        qo = lw.w_q.shape[0]
        kvo = lw.w_k.shape[0]
        want = {"w_q": (qo, d), "w_k": (kvo, d), "w_v": (kvo, d), "w_o": (d, qo), "w_up": (h, d), "w_down": (d, h),
                "ln1_weight": (d,), "ln2_weight": (d,), "w_gate": (h, d), "b_q": (qo,), "b_k": (kvo,), "b_v": (kvo,),
                "b_o": (d,), "b_up": (h,), "b_down": (d,), "ln1_bias": (d,), "ln2_bias": (d,),
                "post_attn_norm_weight": (d,), "post_mlp_norm_weight": (d,)}
        if ckpt.num_heads:
            want["w_q"] = (ckpt.num_heads * ckpt.head_dim, d)
            want["w_k"] = want["w_v"] = (ckpt.num_kv_heads * ckpt.head_dim, d)
            want["q_norm_weight"] = want["k_norm_weight"] = (ckpt.head_dim,)
        for name, shp in want.items():
            if getattr(lw, name) is None:
                continue
            got = getattr(lw, name).shape
            if got != shp:
                raise CheckpointError(f"{ckpt.source}: layer {i} ({prefix.format(i=i)}...) {name} has shape {got}; "
                                      f"expected {shp} (d_model={d}, heads={ckpt.num_heads}, "
                                      f"kv_heads={ckpt.num_kv_heads}, head_dim={ckpt.head_dim}).")
