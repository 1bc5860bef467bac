"""Hostile and careless input: damaged checkpoints are refused with one line naming the file and the fault
(exit 2, no traceback, nothing allocated from a header's claims), non-finite weights are refused, and
`steer` accepts NumPy float64 arrays and lists as the rest of the API does (cast to JAX's default dtype)."""

import json
import os
import pathlib
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save
from safetensors.numpy import save_file
from test_checkpoints import make_llama, make_neox

from meanfield.checkpoints import CheckpointError, TensorStore, cli
from meanfield.checkpoints._io import DTYPE_BITS, parse_header, read_header

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------- helpers


def _raw(header, data=b"", n=None) -> bytes:
    """A safetensors file from a header (any JSON value, or bytes) and data bytes; ``n`` overrides the length field."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def _weights(path, tmp_path, capsys) -> tuple[int, str]:
    """`meanfield weights PATH` in-process: (exit status, stderr); stdout must be empty on refusal."""
    rc = cli.main([str(path), "--out", str(tmp_path / "out")])
    cap = capsys.readouterr()
    return rc, cap.err


def _refused(path, tmp_path, capsys, *words):
    rc, err = _weights(path, tmp_path, capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(path) in err or pathlib.Path(path).name in err, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny valid Llama checkpoint, F32 and BF16: {dtype: directory}."""
    base = tmp_path_factory.mktemp("good")
    out = {}
    for dt in ("F32", "BF16"):
        make_llama(base / dt, np.random.default_rng(0), dtype=dt, model_type="llama")
        out[dt] = base / dt
    return out


def _copy(src_dir, dst_dir, data: bytes | None = None, cut: int | None = None):
    """Copy a checkpoint directory, replacing model.safetensors' bytes or cutting them to ``cut`` bytes."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():
        (dst_dir / f.name).write_bytes(f.read_bytes())
    st_file = dst_dir / "model.safetensors"
    if data is not None:
        st_file.write_bytes(data)
    if cut is not None:
        st_file.write_bytes(st_file.read_bytes()[:cut])
    return st_file


# ------------------------------------------------------------------------------ damaged files, one by one


@pytest.mark.parametrize("dt", ["F32", "BF16"])
def test_truncated_data_and_header(good, tmp_path, capsys, dt):
    full = (good[dt] / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", full[:8])[0]
    f = _copy(good[dt], tmp_path / "data", cut=len(full) - 7)
    _refused(f.parent, tmp_path, capsys, "model.safetensors", "truncated", "data bytes")
    f = _copy(good[dt], tmp_path / "head", cut=8 + n // 2)
    _refused(f, tmp_path, capsys, "header length field says")


@pytest.mark.parametrize("name, data, words", [
    ("empty", b"", ("0 bytes",)),
    ("short", b"\x01\x02\x03", ("3 bytes",)),
    ("huge_n", struct.pack("<Q", 2 ** 63) + b"{}", ("header length field says",)),
    ("random", np.random.default_rng(1).bytes(4096), ("not a safetensors file",)),
    ("random_small_n", struct.pack("<Q", 64) + np.random.default_rng(2).bytes(200), ("not a safetensors file",)),
    ("list", _raw([1, 2, 3]), ("JSON list",)),
    ("string", _raw("hello"), ("JSON str",)),
    ("deep", _raw(b"[" * 100_000 + b"]" * 100_000), ("nested too deeply",)),
    ("not_object", _raw({"a": [1]}), ("'a'", "JSON list")),
    ("no_dtype", _raw({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), ("no dtype",)),
    ("no_offsets", _raw({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), ("no data_offsets",)),
    ("unknown_dtype", _raw({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), ("unknown dtype 'F33'",)),
    ("dtype_int", _raw({"a": {"dtype": 32, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), ("unknown dtype 32",)),
    ("shape_str", _raw({"a": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, b"\0" * 16), ("shape ['4']",)),
    ("shape_float", _raw({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, b"\0" * 16), ("shape [4.0]",)),
    ("shape_bool", _raw({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), ("shape [True]",)),
    ("shape_neg", _raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), ("shape [-1]",)),
    ("shape_not_list", _raw({"a": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, b"\0" * 16), ("shape 4",)),
    ("offsets_neg", _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4), ("data_offsets [-4, 0]",)),
    ("offsets_reversed", _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), ("data_offsets [4, 0]",)),
    ("offsets_three", _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 8), ("data_offsets",)),
    ("offsets_out", _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 8), ("ends at data byte 12",)),
    ("overlap", _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), ("overlap",)),
    ("bytes_mismatch", _raw({"a": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 32]}}, b"\0" * 32), ("needs 36 bytes",)),
    ("huge_shape", _raw({"a": {"dtype": "F32", "shape": [10 ** 12, 10 ** 12], "data_offsets": [0, 16]}}, b"\0" * 16),
     ("needs 4000000000000000000000000 bytes",)),
    ("huge_claim", _raw({"a": {"dtype": "BF16", "shape": [10 ** 12, 10 ** 12], "data_offsets": [0, 2 * 10 ** 24]}}, b"\0" * 16),
     ("truncated",)),
    ("metadata", _raw({"__metadata__": [1]}), ("__metadata__",)),
])
def test_damaged_file(tmp_path, capsys, name, data, words):
    f = tmp_path / f"{name}.safetensors"
    f.write_bytes(data)
    _refused(f, tmp_path, capsys, *words)


def test_damaged_index_and_config(good, tmp_path, capsys):
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"model.layers.0.x": np.zeros(2, np.float32)}, str(d / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"model.layers.0.x": "model-00001-of-00002.safetensors",
                            "model.layers.0.y": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(d, tmp_path, capsys, "model-00002-of-00002.safetensors", "does not exist")
    for bad, words in ((b"{not json", ("invalid JSON",)), (b"\xff\xfe\x00", ("not UTF-8",)),
                       (b"[1, 2]", ("weight_map",)), (json.dumps({"weight_map": [1]}).encode(), ("weight_map",)),
                       (json.dumps({"weight_map": {"a": 7}}).encode(), ("shard 7",)),
                       (json.dumps({"weight_map": {"a": "../../etc/passwd"}}).encode(), ("shard '../../etc/passwd'",))):
        (d / "model.safetensors.index.json").write_bytes(bad)
        _refused(d, tmp_path, capsys, "model.safetensors.index.json", *words)
    c = tmp_path / "cfg"
    _copy(good["F32"], c)
    for bad, words in ((b"{\"model_type\": ", ("config.json", "invalid JSON")),
                       (np.random.default_rng(3).bytes(300), ("config.json", "invalid JSON")),
                       (b"[]", ("config.json", "JSON object")),
                       (json.dumps({"model_type": ["llama"]}).encode(), ("model_type",)),
                       (json.dumps({"num_attention_heads": "four"}).encode(), ("num_attention_heads = 'four'",)),
                       (json.dumps({"num_attention_heads": -4, "head_dim": -4}).encode(), ("num_attention_heads = -4",)),
                       (json.dumps({"hidden_act": 5}).encode(), ("hidden_act = 5",)),
                       (json.dumps({"num_hidden_layers": 3}).encode(), ("says 3 layers", "2 complete layers"))):
        (c / "config.json").write_bytes(bad)
        _refused(c, tmp_path, capsys, *words)


def _tensors(src):
    from safetensors.numpy import load_file

    return load_file(str(src / "model.safetensors"))


def test_tensor_structure_refused(good, tmp_path, capsys):
    t = _tensors(good["F32"])
    cfg = json.loads((good["F32"] / "config.json").read_text())
    cases = {
        "partial": ({k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}, ("layer 1 is incomplete", "mlp.up_proj.weight")),
        "gap": ({**t, **{k.replace("layers.1.", "layers.3."): v for k, v in t.items() if "layers.1." in k}},
                ("tensors of layer(s) 3 are present",)),
        "stray": ({**t, "model.layers.2.input_layernorm.weight": t["model.layers.1.input_layernorm.weight"]},
                  ("tensors of layer(s) 2 are present",)),
        "vector": ({**t, "model.layers.0.self_attn.q_proj.weight": np.zeros(16, np.float32)},
                   ("q_proj.weight", "non-empty matrix")),
        "empty": ({**t, "model.layers.0.self_attn.o_proj.weight": np.zeros((16, 0), np.float32)}, ("non-empty matrix",)),
        "norm": ({**t, "model.layers.1.input_layernorm.weight": np.ones((4, 4), np.float32)}, ("ln1_weight has shape (4, 4)",)),
    }
    for name, (tensors, words) in cases.items():
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": None}))
        _refused(d, tmp_path, capsys, *words)


def test_fused_qkv_of_the_wrong_size_refused(tmp_path, capsys):
    make_neox(tmp_path / "ok", np.random.default_rng(4), dtype="F32")
    t = _tensors(tmp_path / "ok")
    name = "gpt_neox.layers.1.attention.query_key_value.weight"
    t[name] = t[name][:-4]
    d = _copy(tmp_path / "ok", tmp_path / "bad").parent
    save_file(t, str(d / "model.safetensors"))
    _refused(d, tmp_path, capsys, "layer 1 (gpt_neox.layers.1.", "query_key_value has weight shape (44, 16)")


@pytest.mark.parametrize("dt, value, words", [("F32", np.nan, "1 NaN"), ("BF16", np.inf, "1 inf"), ("F64", 1e300, "beyond float32")])
def test_nonfinite_weights_refused(good, tmp_path, capsys, dt, value, words):
    t = _tensors(good["F32"])
    name = "model.layers.1.self_attn.o_proj.weight"
    t[name] = t[name].astype(np.float64)
    t[name][2, 3] = value
    d = _copy(good["F32"], tmp_path / "ck").parent
    if dt == "BF16":  # write the raw bfloat16 bits (top halves of the float32 values)
        hdr, data, off = {}, b"", 0
        for k, v in sorted(t.items()):
            b = (np.asarray(v, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
            hdr[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
            data, off = data + b, off + len(b)
        (d / "model.safetensors").write_bytes(_raw(hdr, data))
    else:
        save_file({k: v.astype(np.float64 if dt == "F64" else np.float32) for k, v in t.items()}, str(d / "model.safetensors"))
    err = _refused(d, tmp_path, capsys, name, words, "non-finite")
    assert "rho" not in err


def test_zero_weights_flagged(good, tmp_path, capsys):
    t = {k: np.zeros_like(v) for k, v in _tensors(good["F32"]).items()}
    d = _copy(good["F32"], tmp_path / "ck").parent
    save_file(t, str(d / "model.safetensors"))
    assert cli.main([str(d), "--out", str(tmp_path / "out")]) == 0
    assert "is exactly 0 at layer(s) 0, 1" in capsys.readouterr().out


def test_unsupported_dtype_read_refused(tmp_path):
    f = tmp_path / "f8.safetensors"
    f.write_bytes(_raw({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4))
    store = TensorStore([f])
    assert store.shape("a") == (4,)
    with pytest.raises(CheckpointError, match=r"f8\.safetensors.*'a'.*F8_E4M3 is not supported"):
        store.get("a")


# ------------------------------------------------------------------------- property-based: the header parser

_json = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=6), ch, max_size=4),
                     max_leaves=20)
_dtype = st.sampled_from(sorted(DTYPE_BITS)) | st.text(max_size=5) | _json
_int = st.integers(-3, 40) | st.integers(-2 ** 70, 2 ** 70)
_entry = st.fixed_dictionaries({}, optional={"dtype": _dtype, "shape": st.lists(_int | _json, max_size=3) | _json,
                                             "data_offsets": st.lists(_int, min_size=0, max_size=3) | _json})
_header = st.dictionaries(st.text(max_size=6), _entry | _json, max_size=5) | _json


@FAST
@given(header=_header, data_bytes=st.integers(0, 10 ** 6))
def test_parse_header_random_json(header, data_bytes):
    try:
        out = parse_header(json.dumps(header).encode(), data_bytes, "x.safetensors")
    except CheckpointError as exc:
        assert str(exc).startswith("x.safetensors: ")
        return
    start = 8 + len(json.dumps(header).encode())
    for info in out.values():  # accepted: every tensor lies inside the data, its size fits its shape
        assert start <= info.begin <= info.end <= start + data_bytes
        assert info.end - info.begin == (int(np.prod(info.shape, dtype=object)) * DTYPE_BITS[info.dtype] + 7) // 8


@FAST
@given(raw=st.binary(max_size=300), data_bytes=st.integers(0, 1000))
def test_parse_header_random_bytes(raw, data_bytes):
    try:
        parse_header(raw, data_bytes, "x")
    except CheckpointError:
        pass


_NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I32": np.int32, "I8": np.int8, "U8": np.uint8}


@st.composite
def _tensor_dict(draw):
    names = draw(st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=6),
                          min_size=1, max_size=4, unique=True))
    out = {}
    for n in names:
        dt = draw(st.sampled_from(sorted(_NP) + ["BF16"]))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        bits = draw(st.lists(st.integers(0, 2 ** 16 - 1), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        if dt == "BF16":
            out[n] = ("BF16", np.asarray(bits, "<u2").reshape(shape))
        else:
            with np.errstate(over="ignore"):  # 65535 -> F16 inf: stored and read back as such
                out[n] = (dt, np.asarray(bits, np.uint16).astype(np.uint8 if np.dtype(_NP[dt]).itemsize == 1 else np.uint64)
                          .astype(_NP[dt]).reshape(shape))
    return out


def _serialise(tensors) -> bytes:
    """safetensors' own writer for NumPy dtypes; BF16 written by hand (raw bits, sorted, packed)."""
    if all(dt != "BF16" for dt, _ in tensors.values()):
        return st_save({n: a for n, (_, a) in tensors.items()})
    hdr, data = {}, b""
    for n, (dt, a) in sorted(tensors.items()):
        b = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
        hdr[n] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    return _raw(hdr, data)


def _expected(dt, a):
    if dt == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    with np.errstate(over="ignore"):
        return a.astype(np.float32)


@FAST
@given(tensors=_tensor_dict(), cut=st.integers(1, 64))
def test_valid_files_round_trip_and_every_truncation_is_refused(tensors, cut):
    raw = _serialise(tensors)
    with tempfile.TemporaryDirectory() as tmp:
        f = pathlib.Path(tmp) / "t.safetensors"
        f.write_bytes(raw)
        store = TensorStore([f])
        assert sorted(store.names) == sorted(tensors)
        for n, (dt, a) in tensors.items():
            assert store.shape(n) == a.shape
            np.testing.assert_array_equal(store.get(n), _expected(dt, a))
        if any(a.size for _, a in tensors.values()):  # data ends at end of file: any shorter prefix is refused
            f.write_bytes(raw[:max(0, len(raw) - cut)])
            with pytest.raises(CheckpointError, match="t.safetensors"):
                read_header(f)


@FAST
@given(tensors=_tensor_dict(), pos=st.integers(0, 10 ** 6), byte=st.integers(0, 255))
def test_one_corrupted_byte_never_escapes(tensors, pos, byte):
    raw = bytearray(_serialise(tensors))
    raw[pos % len(raw)] = byte
    with tempfile.TemporaryDirectory() as tmp:
        f = pathlib.Path(tmp) / "t.safetensors"
        f.write_bytes(bytes(raw))
        try:
            store = TensorStore([f])
            for n in store.names:
                store.get(n)
        except CheckpointError as exc:
            assert "t.safetensors" in str(exc)


# -------------------------------------------------------------------- the command line, as a user runs it


def test_command_line_refuses_without_traceback(good, tmp_path):
    """Three real `python -m meanfield weights` runs (JAX import ~3 s each)."""
    full = (good["BF16"] / "model.safetensors").read_bytes()
    trunc = _copy(good["BF16"], tmp_path / "trunc_bf16", cut=len(full) // 2).parent
    rnd = tmp_path / "garbage.safetensors"
    rnd.write_bytes(np.random.default_rng(5).bytes(10_000))
    nan = _copy(good["F32"], tmp_path / "nan_ck").parent
    t = _tensors(good["F32"])
    t["model.layers.0.mlp.down_proj.weight"][0, 0] = np.nan
    save_file(t, str(nan / "model.safetensors"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cases = ((trunc, "truncated"), (rnd, "not a safetensors file"), (nan, "model.layers.0.mlp.down_proj.weight"))
    procs = [subprocess.Popen([sys.executable, "-m", "meanfield", "weights", str(path), "--out", str(tmp_path / "o")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for path, _ in cases]
    for (path, word), proc in zip(cases, procs):  # run side by side: the import of meanfield dominates
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert "Traceback" not in err and out == ""
        assert len(err.strip().splitlines()) == 1 and path.name in err and word in err, err


# ------------------------------------------------------------------ steer: NumPy float64 and lists, as JAX does

_M0, _S0 = np.array([0.0, 0.0]), np.array([[1.0, 0.3], [0.3, 0.5]])
_M1, _S1 = np.array([1.0, -0.5]), np.array([[0.4, -0.2], [-0.2, 1.2]])


def test_steer_casts_numpy_float64_and_lists_to_the_default_float():
    """Without x64: float64 NumPy arrays and lists are cast to float32 (JAX's convention), as
    `simulate_gaussian` does, and give the same result as float32 JAX arrays. ``max_iters=0``: the
    exact attention-free guess and the verifying solve (the L-BFGS path is in the slow test below)."""
    import jax.numpy as jnp

    from meanfield.control import resolution, steer

    kw = dict(K=2, n_sub=4, n_save=2, max_iters=0)
    runs = {"numpy float64": steer(_M0, _S0, _M1, _S1, 1.0, **kw),
            "lists": steer(_M0.tolist(), _S0.tolist(), _M1.tolist(), _S1.tolist(), 1, **kw),
            "jnp float32": steer(*(jnp.asarray(x, jnp.float32) for x in (_M0, _S0, _M1, _S1)), 1.0, **kw)}
    res = resolution(_M1, _S1, np.float32)
    ref = runs["jnp float32"]
    for name, r in runs.items():
        assert r.model.dtype == jnp.float32 and r.dtype == "float32" and r.tol == pytest.approx(res), name
        assert r.distance <= 2 * res, (name, r.distance)
        for p in ("V", "W", "b"):
            np.testing.assert_allclose(np.asarray(getattr(r.model, p)), np.asarray(getattr(ref.model, p)),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{name}: {p}")


def test_bures_wasserstein_casts_inputs():
    import jax.numpy as jnp

    from meanfield.control import bures_wasserstein

    u, v = np.array([1.0, 2.0]), np.array([2.0, -0.5])
    exact = np.sqrt(5.0 + 4.25 - 2 * 1.0)  # rank one: |u|^2 + |v|^2 - 2 |<u, v>|
    args = (np.zeros(2), np.outer(v, v), np.zeros(2), np.outer(u, u))
    for form in (args, tuple(a.tolist() for a in args), tuple(jnp.asarray(a, jnp.float32) for a in args)):
        w = bures_wasserstein(*form)
        assert w.dtype == jnp.float32 and abs(float(w) - exact) < 1e-5
    # a rank-deficient target against itself: the rank cut-off is float32's (it was float64's for NumPy input)
    assert float(bures_wasserstein(np.zeros(2), np.outer(u, u), np.zeros(2), np.outer(u, u))) < 1e-3


def test_steer_refuses_invalid_numbers():
    from meanfield.control import steer

    for args, match in (((np.array([np.nan, 0.0]), _S0, _M1, _S1, 1.0), "`m0` must be finite"),
                        ((_M0, np.array([[1.0, 2.0], [0.0, 1.0]]), _M1, _S1, 1.0), "`S0` must be a symmetric"),
                        ((_M0, _S0, _M1, np.array([[1.0, 2.0], [2.0, 1.0]]), 1.0), "`S1` must be positive semidefinite"),
                        ((_M0, _S0, _M1, _S1, float("nan")), "`T` must be finite"),
                        ((["a", "b"], _S0, _M1, _S1, 1.0), "real arrays")):
        with pytest.raises(ValueError, match=match):
            steer(*args)


@pytest.mark.slow
def test_steer_float32_controls_reach_the_target_in_float64():
    """The full L-BFGS path in float32: the controls it returns, run in float64, reach the target to
    about float32's resolution, and agree with the float64 controls to that accuracy."""
    import jax
    import jax.numpy as jnp

    import meanfield as mf
    from meanfield.control import bures_wasserstein, resolution, steer

    r32 = steer(_M0, _S0, _M1, _S1, 1.0, K=4)
    assert r32.dtype == "float32" and r32.distance <= 2 * resolution(_M1, _S1, np.float32)
    with jax.enable_x64(True):
        r64 = steer(_M0, _S0, _M1, _S1, 1.0, K=4)
        assert r64.dtype == "float64" and r64.tol == 1e-5
        layers = [mf.Model(Q=np.eye(2), K=np.eye(2), V=np.asarray(r32.model.V[i], np.float64),
                           W=np.asarray(r32.model.W[i], np.float64), b=np.asarray(r32.model.b[i], np.float64),
                           mlp="affine", dtype=jnp.float64) for i in range(4)]
        model = mf.Model.piecewise(layers, times=0.25 * np.arange(1, 4))
        sol = mf.simulate_gaussian(model, _M0, _S0, 1.0, rtol=1e-10, atol=1e-12)
        d64 = float(bures_wasserstein(sol.means[-1], sol.covs[-1], _M1, _S1))
    assert d64 < 3 * resolution(_M1, _S1, np.float32), d64
    for p in ("W", "b"):
        np.testing.assert_allclose(np.asarray(getattr(r32.model, p)), np.asarray(getattr(r64.model, p)), atol=1e-2)


def test_small_file_claiming_a_huge_model_is_refused_before_allocating(tmp_path, capsys):
    """Rank-one tensors of a tiny file can imply d_model = 10^6: the rule's d x d matrices would need
    terabytes, refused from the dimensions before any is allocated."""
    d, p = 1_000_000, "model.layers.0."
    t = {p + n: np.full(shape, 0.01, np.float32) for n, shape in (
        ("self_attn.q_proj.weight", (1, d)), ("self_attn.k_proj.weight", (1, d)), ("self_attn.v_proj.weight", (1, d)),
        ("self_attn.o_proj.weight", (d, 1)), ("mlp.gate_proj.weight", (1, d)), ("mlp.up_proj.weight", (1, d)),
        ("mlp.down_proj.weight", (d, 1)), ("input_layernorm.weight", (d,)), ("post_attention_layernorm.weight", (d,)))}
    save_file(t, str(tmp_path / "big.safetensors"))
    _refused(tmp_path / "big.safetensors", tmp_path, capsys, "d_model 1000000", "GiB")
