"""`meanfield train`: the schema's refusals, loss that decreases, telemetry equal to `meanfield weights`
on the same checkpoint, resume with the same numbers, the spectral guard, and checkpoints that load
back as the very blocks that were trained. One tiny model shape (each shape is a compile)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
from flax import nnx

from meanfield.checkpoints import load_checkpoint
from meanfield.cli import main
from meanfield.nets import Decoder
from meanfield.sweep.plan import ConfigError, set_path
from meanfield.train import TrainingInterrupted, train
from meanfield.train.config import train_config_from_dict
from meanfield.train.corpus import load_corpus, stdlib_bytes
from meanfield.train.guard import layer_rho
from meanfield.train.lm import LanguageModel, load_model_tensors

TINY = {
    "name": "tiny", "seed": 3, "steps": 40,
    "data": {"seq_len": 16, "batch_size": 4, "max_bytes": 60_000},
    "model": {"d_model": 16, "n_layers": 2, "num_heads": 2},
    "optimizer": {"learning_rate": 3e-3, "warmup_steps": 5},
    "telemetry": {"every": 10, "val_batches": 2, "probe_sequences": 2, "lyapunov_every": 20, "lyapunov_k": 3,
                  "lyapunov_tokens": 8},
    "checkpoint": {"every": 20, "keep": 0},
}
TIMING = ("train_seconds", "telemetry_seconds")


def tiny(**over):
    raw = copy.deepcopy(TINY)
    for path, value in over.items():
        set_path(raw, path, value)
    return train_config_from_dict(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 40-step run: its directory and telemetry."""
    run = tmp_path_factory.mktemp("train") / "run"
    ds = train(tiny(), run, quiet=True)
    return run, ds


def test_schema_refusals_name_the_field(tmp_path, capsys):
    for over, field in (({"model.d_modle": 8}, "model.d_modle"), ({"model.num_heads": 3}, "model.num_heads"),
                        ({"telemetry.lyapunov_every": 15}, "telemetry.lyapunov_every"),
                        ({"guard.band": [2.0, 0.5]}, "guard.band"), ({"steps": 0}, "steps"),
                        ({"grid": {"model.mlp_out_gian": [1, 2]}}, "model.mlp_out_gian"),
                        ({"grid": {"model.norm": ["pre_ln", "layer"]}}, "model.norm")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            tiny(**over)
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nmodel: {norm: batchnorm}\n")
    assert main(["train", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "model.norm" in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_grid_runs_are_labelled_and_validated_one_by_one(tmp_path):
    cfg = tiny(grid={"model.mlp_out_gain": [0.25, 4], "guard.enabled": [False, True]})
    runs = cfg.runs()
    assert [label for label, _ in runs] == ["mlp_out_gain=0.25,guard=false", "mlp_out_gain=0.25,guard=true",
                                            "mlp_out_gain=4,guard=false", "mlp_out_gain=4,guard=true"]
    assert runs[3][1].model.mlp_out_gain == 4 and runs[3][1].guard.enabled and not runs[3][1].grid
    assert len({c.digest() for _, c in runs}) == 4
    user = tmp_path / "notes"
    user.mkdir()
    (user / "a.txt").write_text("x")
    from meanfield.train import train_grid

    with pytest.raises(ConfigError, match="did not make"):
        train_grid(cfg, user, quiet=True)


def test_learning_rate_is_linear_warm_up_then_cosine_to_the_floor():
    """lr(s) = peak s / w on the warm-up, then min + (peak - min)(1 + cos(pi (s - w) / (S - w))) / 2."""
    from meanfield.train.loop import schedule

    cfg = tiny(**{"optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 5, "optimizer.min_lr_ratio": 0.1})
    lr, peak, lo, w, S = schedule(cfg), 2e-3, 2e-4, 5, 40
    for s in (0, 2, 5, 12, 22, 31, 40):
        want = peak * s / w if s < w else lo + (peak - lo) * (1 + np.cos(np.pi * (s - w) / (S - w))) / 2
        np.testing.assert_allclose(float(lr(s)), want, rtol=1e-5, atol=1e-12)


def test_corpus_is_deterministic_and_short_files_are_refused(tmp_path):
    a, src = stdlib_bytes(50_000)
    b, _ = stdlib_bytes(50_000)
    assert a == b and len(a) == 50_000 and src.startswith("stdlib:")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ConfigError, match="data.corpus"):
        load_corpus(str(short), 10_000, 0.1, 16)
    with pytest.raises(ConfigError, match="no such file"):
        load_corpus(str(tmp_path / "none.txt"), 10_000, 0.1, 16)


def test_loss_decreases_and_telemetry_equals_meanfield_weights(trained, tmp_path, capsys):
    run, ds = trained
    assert list(ds.step.values) == [0, 10, 20, 30, 40]
    assert float(ds.val_loss[-1]) < float(ds.val_loss[0]) - 0.3  # from ~log 256 = 5.55
    assert np.isfinite(ds.lyapunov.sel(step=20)).all() and np.isnan(ds.lyapunov.sel(step=10)).all()
    for step in (20, 40):
        out = tmp_path / f"w{step}"
        assert main(["weights", str(run / "checkpoints" / f"step_{step:07d}"), "--attention", "both", "--out", str(out)]) == 0
        w = xr.load_dataset(out / "weights.nc", engine="h5netcdf")
        t = ds.sel(step=step)
        for att in ("wo", "value"):
            # the same tensors through the same code: equal to the last bit, not merely close
            np.testing.assert_array_equal(t[f"rho_{att}"].values, w.rho.sel(attention=att).values)
            np.testing.assert_array_equal(t[f"linear_erank_{att}"].values, w.erank.sel(attention=att).values)
    capsys.readouterr()
    # the telemetry file on disk is the returned dataset
    disk = xr.load_dataset(run / "telemetry.nc", engine="h5netcdf")
    xr.testing.assert_identical(disk.drop_vars(TIMING), ds.drop_vars(TIMING))


def test_weights_probe_text_equals_the_telemetry_lyapunov(trained, tmp_path, capsys):
    """`meanfield weights --lyapunov --probe-text` embeds the bytes with the checkpoint's own embedding and
    learned positions: on the bytes the telemetry probed (the first lyapunov_tokens bytes of the validation
    split), with its k and seed 0, the exponents are the telemetry's at that step."""
    run, ds = trained
    cfg = tiny()
    d, t = cfg.data, cfg.telemetry
    val = load_corpus(d.corpus, d.max_bytes, d.val_fraction, d.seq_len).val
    ckpt = str(run / "checkpoints" / "step_0000020")
    (tmp_path / "probe.txt").write_bytes(val[: t.lyapunov_tokens].tobytes())  # the whole file
    (tmp_path / "long.txt").write_bytes(val[: d.seq_len + 1].tobytes())  # one byte more than the learned positions
    ref = ds.lyapunov.sel(step=20).values
    assert np.isfinite(ref).all()
    for name, extra in (("probe.txt", []), ("long.txt", ["--probe-tokens", str(t.lyapunov_tokens)])):
        out = tmp_path / f"w_{name}"
        assert main(["weights", ckpt, "--lyapunov", "--probe-text", str(tmp_path / name), "--lyapunov-k", str(t.lyapunov_k),
                     "--seed", "0", *extra, "--out", str(out)]) == 0
        w = xr.load_dataset(out / "weights.nc", engine="h5netcdf")
        np.testing.assert_allclose(w.lyapunov_exponent.values, ref, rtol=1e-5, atol=1e-7)
        assert w.attrs["lyapunov_probe"].startswith(f"{t.lyapunov_tokens} bytes of {tmp_path / name} embedded by the checkpoint")
        assert w.attrs["lyapunov_probe"] in capsys.readouterr().out
    # the whole file: refused beyond the learned positions, naming the option; nothing written
    assert main(["weights", ckpt, "--lyapunov", "--probe-text", str(tmp_path / "long.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --probe-text") and f"{d.seq_len} learned positions" in err[0]
    assert not (tmp_path / "o").exists()


def test_resume_after_interruption_gives_the_same_numbers(trained, tmp_path):
    run, full = trained
    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted):
        train(tiny(), part, quiet=True, stop_after=20)
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny(), part, quiet=True)
    resumed = train(tiny(), part, quiet=True, resume=True)
    assert resumed.attrs["resumed_from"] == "20" and not (part / "checkpoints" / "damaged").exists()
    xr.testing.assert_identical(resumed.drop_vars(TIMING).drop_attrs(), full.drop_vars(TIMING).drop_attrs())
    assert {k: v for k, v in resumed.attrs.items() if k != "resumed_from"} == full.attrs
    a = load_checkpoint(run / "checkpoints" / "step_0000040")
    b = load_checkpoint(part / "checkpoints" / "step_0000040")
    for la, lb in zip(a.layers, b.layers):
        np.testing.assert_array_equal(la.w_down, lb.w_down)
        np.testing.assert_array_equal(la.w_q, lb.w_q)
    # another configuration is never resumed into this directory
    with pytest.raises(ConfigError, match="another configuration"):
        train(tiny(**{"optimizer.learning_rate": 1e-3}), part, quiet=True, resume=True)


@pytest.mark.slow
def test_damaged_checkpoint_is_set_aside_and_the_previous_one_used(trained, tmp_path, capsys):
    _, full = trained
    part = tmp_path / "part"
    cfg = tiny(**{"checkpoint.every": 10})
    with pytest.raises(TrainingInterrupted):
        train(cfg, part, quiet=True, stop_after=30)
    (part / "checkpoints" / "step_0000030" / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    resumed = train(cfg, part, quiet=True, resume=True)
    assert "damaged" in capsys.readouterr().err and resumed.attrs["resumed_from"] == "20"
    assert (part / "checkpoints" / "damaged" / "step_0000030").is_dir()
    xr.testing.assert_equal(resumed.drop_vars(TIMING), full.drop_vars(TIMING))  # attrs: another checkpoint.every


def test_finished_run_resumes_to_its_record_and_foreign_optimizer_state_is_refused(trained, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    run, full = trained
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    t0 = time.perf_counter()
    again = train(tiny(), copy, quiet=True, resume=True)  # nothing to train: the record as it is
    assert time.perf_counter() - t0 < 5
    xr.testing.assert_identical(again, xr.load_dataset(run / "telemetry.nc", engine="h5netcdf"))
    # an optimiser state of another layout (another library version) is refused, not set aside
    (copy / "telemetry.nc").unlink()
    f = copy / "checkpoints" / "step_0000040" / "optimizer.safetensors"
    arrays = load_file(str(f))
    name = sorted(arrays)[0]
    arrays["renamed" + name] = arrays.pop(name)
    save_file(arrays, str(f))
    with pytest.raises(ConfigError, match="another version"):
        train(tiny(), copy, quiet=True, resume=True)
    assert f.is_file() and not (copy / "checkpoints" / "damaged").exists()


def test_run_directory_refusals(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("keep me")
    with pytest.raises(ConfigError, match="did not make"):
        train(tiny(), user, quiet=True, overwrite=True)
    assert (user / "thesis.tex").read_text() == "keep me"


def test_guard_keeps_rho_in_band_and_matches_meanfield_weights(tmp_path):
    band = (0.8, 0.9)
    ds = train(tiny(**{"guard.enabled": True, "guard.band": list(band), "steps": 20}), tmp_path / "g", quiet=True)
    rho = ds.rho_wo.sel(step=slice(1, None)).values
    assert np.all(rho >= band[0] * (1 - 1e-5)) and np.all(rho <= band[1] * (1 + 1e-5))
    assert np.any(ds.guard_scale.values != 1.0)
    # the guard's own rho (JAX, float32, on the parameter tree) is `meanfield weights`'s rho
    ckpt_dir = tmp_path / "g" / "checkpoints" / "step_0000020"
    cfg = tiny(**{"guard.enabled": True, "steps": 20})
    model = LanguageModel(cfg.model, cfg.data.seq_len, rngs=nnx.Rngs(0))
    from safetensors.numpy import load_file

    load_model_tensors(model, load_file(str(ckpt_dir / "model.safetensors")))
    blocks = nnx.to_pure_dict(nnx.split(model)[1])["decoder"]["blocks"]
    for att in ("wo", "value"):
        got = np.asarray(layer_rho(blocks, att, 2, 2))
        np.testing.assert_allclose(got, ds.sel(step=20)[f"rho_{att}"].values, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("over", [{"model.positions": "rope", "model.mlp": "swiglu", "model.norm": "none"},
                                  {"model.norm": "post_ln", "model.bias": False}])
def test_checkpoint_loads_back_as_the_trained_blocks(tmp_path, over):
    cfg = tiny(**over, steps=2, **{"checkpoint.every": 2, "telemetry.every": 2, "telemetry.lyapunov_every": 0})
    train(cfg, tmp_path / "r", quiet=True)
    ckpt_dir = tmp_path / "r" / "checkpoints" / "step_0000002"
    from safetensors.numpy import load_file

    model = LanguageModel(cfg.model, cfg.data.seq_len, rngs=nnx.Rngs(0))
    load_model_tensors(model, load_file(str(ckpt_dir / "model.safetensors")))
    loaded = Decoder.from_checkpoint(load_checkpoint(ckpt_dir))
    for field in ("norm", "post_ln", "mlp", "rope_theta", "causal", "eps", "gelu_exact", "num_heads", "head_dim"):
        assert getattr(loaded.cfg, field) == getattr(model.decoder.cfg, field), field
    X = jax.random.normal(jax.random.key(0), (12, cfg.model.d_model))
    np.testing.assert_array_equal(np.asarray(loaded(X)), np.asarray(model.decoder(X)))


def test_training_gradient_equals_the_plain_one_and_keeps_its_fusion_boundaries():
    """`cross_entropy`'s gradient (one-hot target, residual cotangents behind `materialized_cotangent`)
    equals the gradient of the textbook loss (gathered target, blocks without marks), and on CPU
    the compiled gradient keeps one conditional per mark (2 per block): XLA did not simplify them away."""
    from meanfield.train.lm import cross_entropy

    cfg = tiny()
    model = LanguageModel(cfg.model, cfg.data.seq_len, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    window = jax.random.randint(jax.random.key(4), (4, cfg.data.seq_len + 1), 0, 256)

    def plain(st):
        m = nnx.merge(graphdef, st)
        x = m.embed_tokens(window[:, :-1])
        for block in m.decoder.blocks:
            x = block(x)
        logp = jax.nn.log_softmax(m.logits(x), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, window[:, 1:, None], axis=-1))

    marked = jax.jit(jax.value_and_grad(lambda st: cross_entropy(nnx.merge(graphdef, st), window)))
    (l1, g1), (l0, g0) = marked(state), jax.value_and_grad(plain)(state)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    if jax.default_backend() == "cpu":
        hlo = marked.lower(state).compile().as_text()
        assert hlo.count(" conditional(") == 2 * cfg.model.n_layers


def test_rotary_positions_rotate_pairs_by_position():
    from meanfield.nets.decoder import rotary

    x = jnp.zeros((3, 1, 4)).at[:, 0, 0].set(1.0)  # the pair (x_0, x_2) = (1, 0) at every position
    y = np.asarray(rotary(x, 100.0))
    angles = np.arange(3) * 1.0  # theta^(-0) = 1 for the first pair
    np.testing.assert_allclose(y[:, 0, 0], np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(y[:, 0, 2], np.sin(angles), atol=1e-6)
    # rotations keep norms and make q.k depend on the offset only
    q = jax.random.normal(jax.random.key(1), (1, 1, 4))
    k = jax.random.normal(jax.random.key(2), (1, 1, 4))
    rq = lambda p: rotary(jnp.tile(q, (8, 1, 1)), 100.0)[p, 0]  # noqa: E731
    rk = lambda p: rotary(jnp.tile(k, (8, 1, 1)), 100.0)[p, 0]  # noqa: E731
    np.testing.assert_allclose(jnp.dot(rq(5), rk(3)), jnp.dot(rq(4), rk(2)), rtol=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(trained, tmp_path):
    """A real kill (SIGKILL) of `meanfield train` after its first checkpoint, then --resume."""
    _, full = trained
    f = tmp_path / "tiny.yaml"
    import yaml

    f.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "killed"
    # One CPU device, as the in-process run (`meanfield train` splits batches over one device per core).
    env = dict(os.environ, MEANFIELD_COMPILE_CACHE="0",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1")
    proc = subprocess.Popen([sys.executable, "-m", "meanfield", "train", str(f), "--out", str(out), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_0000020" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = subprocess.run([sys.executable, "-m", "meanfield", "train", str(f), "--out", str(out), "--quiet", "--resume"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    ds = xr.load_dataset(out / "telemetry.nc", engine="h5netcdf")
    assert ds.attrs["resumed_from"] == "20"
    xr.testing.assert_identical(ds.drop_vars(TIMING).drop_attrs(), full.drop_vars(TIMING).drop_attrs())


SPLIT_SCRIPT = """
import json, sys
import numpy as np, xarray as xr
import jax
from meanfield.train import TrainingInterrupted, train
from meanfield.train.config import train_config_from_dict
raw, root = json.loads(sys.argv[1]), sys.argv[2]
cfg = train_config_from_dict(raw)
assert len(jax.local_devices()) == 2
one = train(cfg, root + "/one", quiet=True, devices=1)
two = train(cfg, root + "/two", quiet=True)
try:
    train(cfg, root + "/resumed", quiet=True, stop_after=20)
except TrainingInterrupted:
    pass
resumed = train(cfg, root + "/resumed", quiet=True, resume=True)
try:
    train(cfg, root + "/mixed", quiet=True, stop_after=20)
except TrainingInterrupted:
    pass
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train(cfg, root + "/mixed", quiet=True, resume=True, devices=1)
assert any("split over 2 device(s), resumes on 1" in str(w.message) for w in caught), [str(w.message) for w in caught]
timing = ["train_seconds", "telemetry_seconds"]
xr.testing.assert_identical(resumed.drop_vars(timing).drop_attrs(), two.drop_vars(timing).drop_attrs())
for v in ["train_loss", "val_loss", "grad_norm", "rho_wo", "rho_value", "hidden_erank", "lyapunov"]:
    np.testing.assert_allclose(two[v].values, one[v].values, rtol=2e-4, atol=1e-5, err_msg=v)
print(json.dumps([json.load(open(root + "/" + k + "/train.json"))["data_devices"] for k in ("one", "two")]))
"""


@pytest.mark.slow
def test_a_batch_split_over_two_devices_trains_the_same_model(tmp_path):
    """Two CPU devices (as `meanfield train` shows one per core): each step's batch is split over
    both. The numbers equal a one-device run's to float32 rounding, and a run resumed from its
    checkpoint equals the uninterrupted two-device run exactly; resuming on another number of devices
    warns that the numbers will differ by rounding."""
    import json

    env = dict(os.environ, MEANFIELD_COMPILE_CACHE="0",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2")
    res = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT, json.dumps(TINY), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [1, 2]


def test_band_exit_and_collapse_steps_of_the_figure():
    from meanfield.figures.training_telemetry import first_exit, first_step

    steps = np.array([0, 25, 50, 75, 100])
    # starts outside, enters at 25, leaves at 75
    assert first_exit(steps, np.array([True, False, False, True, True])) == 75
    # never inside: no exit; inside throughout: no exit
    assert np.isnan(first_exit(steps, np.ones(5, bool))) and np.isnan(first_exit(steps, np.zeros(5, bool)))
    assert first_step(steps, np.array([False, False, True, False, True])) == 50
