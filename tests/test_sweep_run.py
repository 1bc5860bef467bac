"""The sweep engine: same numbers as the library, closed forms through YAML, crash safety, sharding."""

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
import yaml

import meanfield as mf
from meanfield.sweep.plan import ConfigError, config_from_dict
from meanfield.sweep.run import run_experiment

PARTICLES = {
    "name": "tiny", "seed": 0,
    "model": {"d": 2, "beta": 1.0, "mlp": "two_layer", "activation": "tanh", "norm": "sphere"},
    "initial": {"kind": "sphere", "n": 8},
    "simulator": {"kind": "particles", "t1": 2.0, "n_save": 5},
    "observables": ["effective_rank", "mean_cosine"],
    "sweep": {"grid": {"model.beta": [1.0, 3.0], "seed": [0, 1, 2]}},
    "output": {"chunk_size": 2},
    "plots": {"curves": None},
}


def _particles(**updates):
    raw = copy.deepcopy(PARTICLES)
    for k, v in updates.items():
        raw[k] = v
    return raw


def test_sweep_matches_direct_library_calls(tmp_path):
    res = run_experiment(config_from_dict(_particles()), out=tmp_path / "run", quiet=True)
    ds = res.dataset
    assert ds.sizes == {"point": 6, "depth": 5}
    assert set(ds.data_vars) >= {"effective_rank", "mean_cosine", "regime", "blowup_time", "success", "t"}
    for name in ("config_yaml", "config_hash", "meanfield_version", "jax_version", "devices", "git_commit"):
        assert name in ds.attrs
    assert ds["effective_rank"].attrs["long_name"] and ds["regime"].attrs["flag_meanings"] == "collapse stable blowup failed"
    # Point (beta=3, seed=2), rebuilt by hand with the documented seeding.
    i = int(np.flatnonzero((ds["model.beta"].values == 3.0) & (ds["seed"].values == 2))[0])
    key = jax.random.key(2)
    model = mf.Model.random(jax.random.fold_in(key, 0), 2, beta=3.0, activation="tanh", norm="sphere")
    X0 = mf.sphere_uniform(jax.random.fold_in(key, 1), 8, 2)
    sol = mf.simulate_particles(model, X0, 2.0, n_save=5, save_fn=mf.metrics.particle_observables)
    np.testing.assert_allclose(ds["effective_rank"].values[i], sol.xs["effective_rank"], rtol=1e-5)
    np.testing.assert_allclose(ds["mean_cosine"].values[i], sol.xs["mean_cosine"], rtol=1e-5, atol=1e-6)
    full = mf.simulate_particles(model, X0, 2.0, n_save=5)
    assert int(ds["regime"].values[i]) == int(mf.classify(full))
    # Loads with mf.load_run and with plain xarray.
    again = mf.load_run(tmp_path / "run")
    xr.testing.assert_identical(again.drop_attrs(), ds.drop_attrs())
    plain = xr.open_dataset(tmp_path / "run" / "results.nc", engine="h5netcdf")
    np.testing.assert_array_equal(plain["regime"].values, ds["regime"].values)
    plain.close()


def test_gaussian_sweep_reproduces_riccati_blowup_times(tmp_path):
    """d = 1 moment ODE through YAML: V = v, K^T Q = a, W = w, s0 = 1 (MISSION section 2)."""
    raw = {
        "name": "riccati",
        "model": {"d": 1, "mlp": "affine", "Q": {"eye": 1.0}, "K": {"eye": 1.0}, "V": {"eye": 1.0}, "W": {"eye": 0.0}},
        "initial": {"kind": "gaussian", "mean": 0.0, "cov": 1.0},
        "simulator": {"kind": "gaussian", "t1": 3.0, "n_save": 11},
        "sweep": {"grid": {"model.V.eye": [0.5, 1.0, 2.0], "model.W.eye": [0.0, 0.3, -0.2]}},
        "plots": {"curves": None},
    }
    ds = run_experiment(config_from_dict(raw), out=tmp_path / "g", quiet=True).dataset
    for v, w, bt, reg in zip(ds["model.V.eye"].values, ds["model.W.eye"].values, ds["blowup_time"].values, ds["regime"].values):
        t_star = 1 / (2 * v) if w == 0 else np.log(1 + w / v) / (2 * w)
        assert abs(bt - t_star) / t_star < 1e-4, (v, w, bt, t_star)
        assert reg == 2
    # Observables stop (NaN) after the blow-up and are finite before it.
    tr = ds["cov_trace"].values
    assert np.all(np.isfinite(tr[:, 0])) and np.all(np.isnan(tr[:, -1]))


def test_swept_depth_runs_on_the_ensemble_and_matches_closed_form_and_library_calls(tmp_path):
    """simulator.t1 swept: every point solves to its own depth on the ensemble integrator. The d = 1
    Riccati moments s(t) = 1 / (1 - 2 v t) at every save, the blow-up time 1 / (2 v), and the same
    numbers as a direct `simulate_gaussian` call per point; particles against `simulate_particles`."""
    from meanfield.sweep.plan import make_plan
    from meanfield.sweep.points import uses_ensemble

    raw = {
        "name": "depths",
        "model": {"d": 1, "mlp": "affine", "Q": {"eye": 1.0}, "K": {"eye": 1.0}, "V": {"eye": 1.0}, "W": {"eye": 0.0}},
        "initial": {"kind": "gaussian", "mean": 0.0, "cov": 1.0},
        "simulator": {"kind": "gaussian", "t1": 3.0, "n_save": 6},
        "observables": ["cov_trace"],
        "sweep": {"grid": {"model.V.eye": [0.5, 2.0], "simulator.t1": [0.5, 1.5]}},
        "plots": {"curves": None},
    }
    cfg = config_from_dict(raw)
    groups = make_plan(cfg, source="test").groups
    assert len(groups) == 1 and "simulator.t1" in groups[0].traced_paths  # one batch, a depth per point
    assert uses_ensemble(cfg, groups[0].traced_paths)
    ds = run_experiment(cfg, out=tmp_path / "g", quiet=True).dataset
    for i, (v, t1) in enumerate(zip(ds["model.V.eye"].values, ds["simulator.t1"].values)):
        t = ds["t"].values[i]
        np.testing.assert_allclose(t, np.linspace(0.0, t1, 6), rtol=1e-6)
        tr = ds["cov_trace"].values[i]
        reached = np.isfinite(tr)
        np.testing.assert_allclose(tr[reached], 1 / (1 - 2 * v * t[reached]), rtol=1e-4)
        direct = mf.simulate_gaussian(mf.Model(mlp="affine", Q=jnp.eye(1), K=jnp.eye(1), V=v * jnp.eye(1),
                                               W=jnp.zeros((1, 1))), jnp.zeros(1), jnp.eye(1), float(t1), n_save=6)
        if 1 / (2 * v) < t1:  # blows up before its depth (v = 0.5: at 1.5, not at 0.5)
            assert int(ds["regime"].values[i]) == 2
            assert abs(ds["blowup_time"].values[i] - 1 / (2 * v)) < 1e-4 * (1 / (2 * v))
        else:
            assert reached.all() and not np.isfinite(ds["blowup_time"].values[i])
        np.testing.assert_allclose(ds["blowup_time"].values[i], direct.blowup_time, rtol=1e-6)
        assert int(ds["regime"].values[i]) == int(mf.classify(direct))
    # Particles: each point against its own library call.
    pdir = tmp_path / "p"
    raw = _particles(sweep={"grid": {"simulator.t1": [0.5, 2.0], "seed": [0, 1]}})
    ds = run_experiment(config_from_dict(raw), out=pdir, quiet=True).dataset
    for i, (t1, seed) in enumerate(zip(ds["simulator.t1"].values, ds["seed"].values)):
        key = jax.random.key(int(seed))
        model = mf.Model.random(jax.random.fold_in(key, 0), 2, beta=1.0, activation="tanh", norm="sphere")
        X0 = mf.sphere_uniform(jax.random.fold_in(key, 1), 8, 2)
        sol = mf.simulate_particles(model, X0, float(t1), n_save=5, save_fn=mf.metrics.particle_observables)
        np.testing.assert_allclose(ds["t"].values[i], sol.ts, rtol=1e-6)
        np.testing.assert_allclose(ds["effective_rank"].values[i], sol.xs["effective_rank"], rtol=1e-5)


def test_resume_computes_only_missing_points(tmp_path):
    cfg = config_from_dict(_particles())
    first = run_experiment(cfg, out=tmp_path / "r", quiet=True)
    chunks = sorted((tmp_path / "r" / "chunks").glob("*.nc"))
    assert len(chunks) == 3
    chunks[1].unlink()
    (tmp_path / "r" / "results.nc").unlink()
    second = run_experiment(cfg, out=tmp_path / "r", quiet=True)
    assert second.computed == 2
    xr.testing.assert_allclose(second.dataset.drop_attrs(), first.dataset.drop_attrs())
    third = run_experiment(cfg, out=tmp_path / "r", quiet=True)
    assert third.computed == 0


def test_changed_config_is_refused(tmp_path):
    run_experiment(config_from_dict(_particles()), out=tmp_path / "c", quiet=True)
    changed = _particles(model={**PARTICLES["model"], "beta": 2.0})
    with pytest.raises(ConfigError, match="different config"):
        run_experiment(config_from_dict(changed), out=tmp_path / "c", quiet=True)


def _write(tmp_path, raw, name="exp.yaml"):
    f = tmp_path / name
    f.write_text(yaml.safe_dump(raw))
    return f


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_equals_uninterrupted(tmp_path):
    raw = _particles(sweep={"grid": {"model.beta": [1.0, 2.0, 3.0, 4.0], "seed": [0, 1]}})
    f = _write(tmp_path, raw)
    out = tmp_path / "killed"
    env = dict(os.environ, MEANFIELD_CHUNK_PAUSE="2")
    proc = subprocess.Popen([sys.executable, "-m", "meanfield", "run", str(f), "--out", str(out), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "chunks").glob("*.nc")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_chunks = len(list((out / "chunks").glob("*.nc")))
    assert 1 <= n_chunks < 4, "the run must be killed mid-sweep"
    assert not (out / "results.nc").exists()
    res = subprocess.run([sys.executable, "-m", "meanfield", "run", str(f), "--out", str(out), "--quiet", "--resume"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"computed {8 - 2 * n_chunks} points in" in res.stdout
    resumed = mf.load_run(out)
    clean = run_experiment(config_from_dict(raw), out=tmp_path / "clean", quiet=True).dataset
    xr.testing.assert_allclose(resumed.drop_attrs(), clean.drop_attrs())


GAUSSIAN = {
    "name": "tiny_gaussian", "model": {"d": 3, "mlp": "affine"}, "initial": {"kind": "gaussian", "mean": 0.2, "cov": 0.5},
    "simulator": {"kind": "gaussian", "t1": 2.0, "n_save": 5}, "observables": ["cov_trace", "effective_rank"],
    "sweep": {"grid": {"model.beta": [0.5, 1.0, 2.0], "seed": [0, 1, 2, 3]}}, "output": {"chunk_size": 8},
    "plots": {"curves": None},
}


@pytest.mark.parametrize("raw, why", [
    # d = 17: the spectral norm behind spectral_ratio is an SVD (Jacobi rotations go up to 16 x 16)
    pytest.param(_particles(output={"chunk_size": 4}, model=dict(PARTICLES["model"], d=17, spectral_ratio=1.0)), "LAPACK",
                 marks=pytest.mark.slow),
    # 32 tokens x d = 9 = 288 numbers per lane: compiled with YNNPACK reduce fusions, kept on one device
    pytest.param(_particles(output={"chunk_size": 4}, initial={"kind": "sphere", "n": 32}, model=dict(PARTICLES["model"], d=9)),
                 "YNNPACK", marks=pytest.mark.slow),
    (GAUSSIAN, None)], ids=["particles_lapack", "particles_ynnpack", "gaussian"])
def test_four_devices_give_the_one_device_results(tmp_path, raw, why):
    """Four CPU devices: a LAPACK-free chunk program (Gaussian moments) is split over them; one that
    calls LAPACK (an SVD above 16 x 16) runs on one device and says so (several concurrent LAPACK
    calls hang jaxlib 0.10's CPU thread pool, `schedule._Compiled`), as does one with YNNPACK reduce
    fusions (measured slower when split). Same numbers."""
    f = _write(tmp_path, raw)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               MEANFIELD_CACHE_DIR=str(tmp_path / "cache"))
    for out in ("sharded", "again"):  # the second launch loads the program (and the one-device choice) untraced
        res = subprocess.run([sys.executable, "-m", "meanfield", "run", str(f), "--out", str(tmp_path / out), "--quiet"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert ("runs on one CPU device" in res.stderr) == (why is not None), res.stderr
        assert why is None or why in res.stderr, res.stderr
    assert any((tmp_path / "cache").rglob("*.one-device")) == (why == "LAPACK")
    sharded = mf.load_run(tmp_path / "sharded")
    assert len(sharded.attrs["devices"].split(", ")) == 4
    single = run_experiment(config_from_dict(raw), out=tmp_path / "single", quiet=True).dataset
    # Different XLA batching: float32 results agree to a few ulps (measured max 3.6e-7).
    xr.testing.assert_allclose(sharded.drop_attrs(), single.drop_attrs(), rtol=1e-6, atol=1e-6)
    xr.testing.assert_identical(mf.load_run(tmp_path / "again").drop_attrs(), sharded.drop_attrs())


def test_initial_tokens_from_file_and_plot_command(tmp_path):
    X0 = np.asarray(mf.sphere_uniform(jax.random.key(5), 8, 2))
    np.save(tmp_path / "tokens.npy", X0)
    raw = _particles(initial={"kind": "file", "n": 8, "path": "tokens.npy"}, sweep={"grid": {"model.beta": [1.0, 2.0]}},
                     plots={"curves": {"observable": "effective_rank"}})
    f = _write(tmp_path, raw)
    res = run_experiment(f, out=tmp_path / "file_run", quiet=True)
    model = mf.Model.random(jax.random.fold_in(jax.random.key(0), 0), 2, beta=2.0, activation="tanh", norm="sphere")
    sol = mf.simulate_particles(model, X0, 2.0, n_save=5, save_fn=mf.metrics.effective_rank)
    np.testing.assert_allclose(res.dataset["effective_rank"].values[1], sol.xs, rtol=1e-5)
    # `meanfield plot RUN_DIR` redraws the figures from the stored dataset and config.
    for p in (tmp_path / "file_run" / "figures").glob("*"):
        p.unlink()
    from meanfield.cli import main

    assert main(["plot", str(tmp_path / "file_run")]) == 0
    assert (tmp_path / "file_run" / "figures" / "effective_rank_vs_depth.png").stat().st_size > 10_000
    # A file of the wrong shape is refused with the field named.
    np.save(tmp_path / "tokens.npy", X0[:5])
    with pytest.raises(ConfigError, match="initial.path"):
        run_experiment(f, out=tmp_path / "bad_file_run", quiet=True)


def test_shaped_sde_sweep_matches_direct_call(tmp_path):
    """simulator.kind shaped_sde: the engine's correlation statistics equal a direct
    `simulate_shaped_sde` call with the documented seeding (paths from fold_in(key(seed), 1))."""
    from meanfield.shaped.sde import simulate_shaped_sde

    raw = {
        "name": "shaped_tiny", "seed": 3,
        "shaped": {"m": 2, "corr0": 0.3, "gamma_attn2": 0.3, "gamma_mlp2": 0.2, "n_paths": 64},
        "simulator": {"kind": "shaped_sde", "t1": 0.2, "dt0": 0.02, "n_save": 5},
        "sweep": {"grid": {"shaped.tau0": [0.5, 1.0]}},
        "plots": {"curves": None},
    }
    ds = run_experiment(config_from_dict(raw), out=tmp_path / "sh", quiet=True).dataset
    V0 = jnp.array([[1.0, 0.3], [0.3, 1.0]])
    sol = simulate_shaped_sde(jax.random.fold_in(jax.random.key(3), 1), V0, 0.2, dt=0.02, gamma_attn2=0.3,
                              gamma_mlp2=0.2, tau0=1.0, c_plus=1.0, c_minus=-1.0, n_paths=64, n_save=5)
    corr = np.where(np.asarray(sol.exploded)[:, None, None], np.nan, np.asarray(sol.correlations))
    i = int(np.flatnonzero(ds["shaped.tau0"].values == 1.0)[0])
    np.testing.assert_allclose(ds["corr_mean"].values[i], np.nanmean(corr, axis=(0, 2)), rtol=1e-5, atol=1e-6)
    assert ds["exploded_fraction"].dims == ("point",)
    with pytest.raises(ConfigError, match="dt0"):
        config_from_dict({**raw, "simulator": {"kind": "shaped_sde", "t1": 0.2, "dt0": 0.03}})


def test_stall_watch_warns_when_no_cpu_is_used(monkeypatch, capsys):
    """A chunk that sits at 0% CPU (XLA's wedged thread pool) gets a warning naming the remedy."""
    import meanfield.sweep.watchdog as watchdog

    monkeypatch.setattr(watchdog, "STALL_SECONDS", 0.4)
    # A frozen CPU clock: other threads of this process (XLA's pool finishing earlier tests' work,
    # the garbage collector) may use a millisecond here and there, which a real wedged pool would not.
    with monkeypatch.context() as m:
        m.setattr(watchdog.time, "process_time", lambda: 0.0)
        with watchdog.StallWatch("demo chunk 3"):
            time.sleep(1.2)  # sleeping uses no CPU, like a wedged pool
    err = capsys.readouterr().err
    assert "demo chunk 3: no CPU progress" in err and "rerun the same command to resume" in err
    with watchdog.StallWatch("busy"):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            pass  # busy: no warning
    assert "busy" not in capsys.readouterr().err


def test_lowrank_attention_sweep_matches_direct_attention(tmp_path, capfd):
    """`simulator.attention: {kind: lowrank}` plans static orders per group, runs points unvmapped, and
    reproduces the direct-sum solve within the attention tolerance."""
    raw = {
        "name": "lowrank",
        "model": {"d": 3, "mlp": "none", "norm": "sphere", "Q": {"eye": 1.0}, "K": {"eye": 1.0}, "V": {"eye": 1.0}},
        "initial": {"kind": "sphere", "n": 512},
        "simulator": {"t1": 2.0, "n_save": 3, "solver": "rk4", "dt0": 0.25,
                      "attention": {"kind": "lowrank", "rtol": 1e-4}},
        "observables": ["effective_rank", "mean_cosine"],
        "sweep": {"grid": {"model.beta": [0.5, 1.0]}},
        "plots": {"curves": None},
    }
    ds = run_experiment(config_from_dict(raw), out=tmp_path / "lr", quiet=True).dataset
    assert "low-rank attention, Chebyshev orders" in capfd.readouterr().err
    i = 1  # the beta = 1 point against one direct solve (each beta is a compile)
    assert ds["model.beta"].values[i] == 1.0
    model = mf.Model(Q=jnp.eye(3), K=jnp.eye(3), V=jnp.eye(3), beta=1.0, mlp="none", norm="sphere")
    X0 = mf.sphere_uniform(jax.random.fold_in(jax.random.key(0), 1), 512, 3)
    sol = mf.simulate_particles(model, X0, 2.0, n_save=3, solver="rk4", dt0=0.25, attention=mf.Dense(),
                                save_fn=mf.metrics.particle_observables)
    np.testing.assert_allclose(ds["mean_cosine"].values[i], sol.xs["mean_cosine"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(ds["effective_rank"].values[i], sol.xs["effective_rank"], rtol=1e-3)
    bad = copy.deepcopy(raw)
    bad["model"]["attention"] = "shaped"
    with pytest.raises(ConfigError, match="simulator.attention.*'lowrank' needs softmax"):
        config_from_dict(bad)
