"""Finite-time Lyapunov exponents of discrete layer maps (`layer_lyapunov`, `decoder_lyapunov`) and
`meanfield weights --lyapunov`, against closed forms: for Jacobians J_l and initial tangents I, successive
QR of J_l Q_{l-1} gives the R of the product J_L ... J_1 (R_L ... R_1 is upper triangular with a positive
diagonal, and that QR is unique), so lambda_j = (1/L) log R_jj of np.linalg.qr(J_L ... J_1)."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meanfield.lyapunov import decoder_lyapunov, layer_lyapunov
from meanfield.nets import Decoder, DecoderConfig


def qr_exponents(P, L, k=None):
    """(1/L) log|R_jj| of the QR of the first k columns of P (NumPy, float64)."""
    R = np.linalg.qr(np.asarray(P, np.float64)[:, :k])[1]
    return np.log(np.abs(np.diag(R))) / L


def test_linear_residual_network(x64):
    rng = np.random.default_rng(0)
    dim, L = 6, 5
    As = [0.6 * rng.standard_normal((dim, dim)) / np.sqrt(dim) for _ in range(L)]
    x0 = jnp.asarray(rng.standard_normal(dim))
    layers = [lambda x, A=jnp.asarray(A): x + A @ x for A in As]
    res = layer_lyapunov(layers, x0, dim)
    P, prefix = np.eye(dim), []
    for A in As:
        P = (np.eye(dim) + A) @ P
        prefix.append(P)
    assert res.exponents.dtype == jnp.float64 and res.running.shape == (L, dim) and bool(res.finite)
    # the volume: sum of exponents = (1/L) log|det P|
    np.testing.assert_allclose(float(jnp.sum(res.exponents)), np.log(abs(np.linalg.det(P))) / L, rtol=1e-12)
    np.testing.assert_allclose(res.exponents, qr_exponents(P, L), rtol=1e-10, atol=1e-12)
    # running[l - 1]: the same closed form for the product of the first l layers
    np.testing.assert_allclose(res.running, [qr_exponents(Pl, l) for l, Pl in enumerate(prefix, 1)], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.ts, np.arange(1, L + 1))
    np.testing.assert_allclose(res.y1, P @ np.asarray(x0), rtol=1e-12)
    q = (3 * L) // 4 - 1
    np.testing.assert_allclose(res.drift, np.abs(res.running[-1] - res.running[q]), rtol=1e-12)
    # k < dim: the QR of the first k columns of P
    np.testing.assert_allclose(layer_lyapunov(layers, x0, 3).exponents, qr_exponents(P, L, 3), rtol=1e-10, atol=1e-12)


def test_diagonal_jacobians_random_tangents(x64, key):
    """One fixed diagonal map (with negative entries, in no particular order) on a dict state, L = 60 layers.

    Generic tangents: D^L V0 = Q R with R_jj = sigma_(j)^L m_j / m_{j-1} (1 + O((sigma_(j+1)/sigma_(j))^L)),
    m_j the j x j leading minor of V0 in the sorted coordinates. The smallest ratio of |entries| here is
    1/1.5, so the O() term is below 1e-10; the minors of a Gaussian draw give |log(m_j / m_{j-1})| of order 1,
    so the error of lambda_j is about 1/L: 3 / L = 0.05 is the tolerance, well under the 0.36 smallest gap
    between the exact values (a swapped or unsorted exponent fails). The sum needs no tolerance: |det V0| = 1."""
    da, db = np.array([0.7, -2.0]), np.array([0.4, 1.5, -1.0])
    L = 60
    layers = [lambda x: {"a": jnp.asarray(da) * x["a"], "b": jnp.asarray(db) * x["b"]}] * L
    x0 = {"a": jnp.ones(2), "b": jnp.ones(3)}
    res = layer_lyapunov(layers, x0, 5, key=key)
    exact = np.sort(np.log(np.abs(np.concatenate([da, db]))))[::-1]
    np.testing.assert_allclose(float(jnp.sum(res.exponents)), exact.sum(), rtol=1e-10)
    np.testing.assert_allclose(res.exponents, exact, atol=3 / L)
    assert np.all(np.diff(np.asarray(res.exponents)) < 0)
    np.testing.assert_allclose(res.y1["b"], db ** L, rtol=1e-10)


@pytest.fixture
def tiny_decoder():
    cfg = DecoderConfig(d_model=8, n_layers=2, num_heads=2, head_dim=4, hidden=16)
    return Decoder(cfg, rngs=nnx.Rngs(3), std=0.5)


def test_decoder_matches_dense_jacobians(x64, tiny_decoder):
    X = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8)))
    dim, L = X.size, len(tiny_decoder.blocks)

    @jax.jit
    def jacobians(X):  # each block's (32, 32) Jacobian at the state it sees
        Js = []
        for block in tiny_decoder.blocks:
            Js.append(jax.jacfwd(lambda z, b=block: b(z.reshape(X.shape)).reshape(-1))(X.reshape(-1)))
            X = block(X)
        return Js

    P = np.eye(dim)
    for J in jacobians(X):
        P = np.asarray(J) @ P
    res = decoder_lyapunov(tiny_decoder, X, dim)
    assert res.exponents.dtype == jnp.float64 and bool(res.finite)
    np.testing.assert_allclose(res.exponents, qr_exponents(P, L), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(float(jnp.sum(res.exponents)), np.log(abs(np.linalg.det(P))) / L, rtol=1e-8)
    np.testing.assert_allclose(res.y1, tiny_decoder(X)[-1], rtol=1e-10)
    # fewer exponents: the QR of the product's first 5 columns
    np.testing.assert_allclose(decoder_lyapunov(tiny_decoder, X, 5).exponents, qr_exponents(P, L, 5), rtol=1e-8, atol=1e-10)


def test_input_checks(tiny_decoder):
    layers = [lambda x: 2.0 * x]
    x0 = jnp.ones(3)
    for k in (0, 4):
        with pytest.raises(ValueError, match="k: must be between 1 and the state dimension 3"):
            layer_lyapunov(layers, x0, k)
    with pytest.raises(ValueError, match="`k` must be an integer"):
        layer_lyapunov(layers, x0, 1.5)
    with pytest.raises(ValueError, match="`x0` must be finite"):
        layer_lyapunov(layers, x0.at[1].set(jnp.nan), 2)
    with pytest.raises(ValueError, match="`layers` must hold at least one"):
        layer_lyapunov([], x0, 2)
    X = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="k: must be between 1 and the state dimension 32"):
        decoder_lyapunov(tiny_decoder, X, 33)
    X[2, 3] = np.inf
    with pytest.raises(ValueError, match="`X` must be finite"):
        decoder_lyapunov(tiny_decoder, X, 2)
    with pytest.raises(ValueError, match=r"`X` must be token vectors of shape \(n, d_model = 8\)"):
        decoder_lyapunov(tiny_decoder, np.ones((4, 7)), 2)


# ------------------------------------------------------------------------------ meanfield weights --lyapunov


@pytest.fixture
def gpt2_dir(tmp_path, monkeypatch):
    from test_checkpoints import make_gpt2

    monkeypatch.setenv("MEANFIELD_COMPILE_CACHE", "0")  # no persistent cache written from the tests
    make_gpt2(tmp_path / "ck", np.random.default_rng(12))
    return tmp_path / "ck"


def test_cli_lyapunov(gpt2_dir, tmp_path, capsys):
    import xarray as xr

    from meanfield.checkpoints import load_checkpoint
    from meanfield.cli import main

    X = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)
    np.save(tmp_path / "probe.npy", X)
    out = tmp_path / "out"
    assert main(["weights", str(gpt2_dir), "--lyapunov", "--lyapunov-k", "6", "--probe", str(tmp_path / "probe.npy"),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Lyapunov exponents" in text and "positive: nearby token configurations separate" in text
    ref = decoder_lyapunov(Decoder.from_checkpoint(load_checkpoint(gpt2_dir)), X, 6, key=jax.random.key(0))
    ds = xr.load_dataset(out / "weights.nc", engine="h5netcdf")
    np.testing.assert_allclose(ds.lyapunov_exponent.values, ref.exponents, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ds.lyapunov_running.values, ref.running, rtol=1e-6, atol=1e-7)
    assert ds.lyapunov_running.dims == ("layer", "exponent") and ds.lyapunov_exponent.attrs["units"] == "1/layer"
    assert "probe.npy" in ds.attrs["lyapunov_probe"] and ds.attrs["lyapunov_k"] == 6
    rows = list(csv.DictReader(open(out / "lyapunov.csv")))
    np.testing.assert_allclose([float(r["lyapunov_exponent"]) for r in rows], ref.exponents, rtol=1e-6, atol=1e-7)
    printed = [float(line.split()[1]) for line in text.splitlines() if line.split()[:1] in ([str(j)] for j in range(1, 7))
               and len(line.split()) == 3]
    np.testing.assert_allclose(printed, ref.exponents, rtol=1e-4, atol=1e-6)
    # the default probe: --probe-tokens N(0, I) tokens drawn with --seed
    assert main(["weights", str(gpt2_dir), "--lyapunov", "--probe-tokens", "2", "--seed", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    X2 = np.random.default_rng(4).standard_normal((2, 16)).astype(np.float32)
    ref2 = decoder_lyapunov(Decoder.from_checkpoint(load_checkpoint(gpt2_dir)), X2, 8, key=jax.random.key(4))
    ds = xr.load_dataset(out / "weights.nc", engine="h5netcdf")
    np.testing.assert_allclose(ds.lyapunov_exponent.values, ref2.exponents, rtol=1e-6, atol=1e-7)


def test_cli_lyapunov_errors(gpt2_dir, tmp_path, capsys):
    from meanfield.cli import main

    from test_checkpoints import make_llama

    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 15), np.float32))
    assert main(["weights", str(gpt2_dir), "--lyapunov", "--probe", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --probe") and str(bad) in err[0] and "(3, 15)" in err[0]
    np.save(bad, np.array([[np.nan] * 16]))
    assert main(["weights", str(gpt2_dir), "--lyapunov", "--probe", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert main(["weights", str(gpt2_dir), "--lyapunov", "--probe-tokens", "1", "--lyapunov-k", "17",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--lyapunov-k" in capsys.readouterr().err
    assert main(["weights", str(gpt2_dir), "--lyapunov", "--seed", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "--seed: must be >= 0" in capsys.readouterr().err
    assert main(["weights", str(gpt2_dir), "--probe-tokens", "4", "--out", str(tmp_path / "o")]) == 2
    assert "only applies with --lyapunov" in capsys.readouterr().err
    # --probe-text: only a checkpoint with a byte embedding (meanfield train's), and not with --probe
    text = tmp_path / "t.txt"
    text.write_bytes(b"hello")
    assert main(["weights", str(gpt2_dir), "--lyapunov", "--probe-text", str(text), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --probe-text") and "gpt2" in err[0] and "--probe FILE.npy" in err[0]
    np.save(bad, np.zeros((3, 16), np.float32))
    assert main(["weights", str(gpt2_dir), "--lyapunov", "--probe-text", str(text), "--probe", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--probe-text" in err and "--probe," in err and "not both" in err
    # no config.json: heads unknown, so Decoder.from_checkpoint refuses
    make_llama(tmp_path / "nocfg", np.random.default_rng(2), config=False, model_type="llama", H=4, KV=4, hd=4)
    assert main(["weights", str(tmp_path / "nocfg" / "model.safetensors"), "--lyapunov", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_heads" in err[0] and "model.safetensors" in err[0]
    assert not (tmp_path / "o").exists()
