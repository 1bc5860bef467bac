"""`meanfield run --distributed`: real processes on 127.0.0.1 with gloo collectives, a SIGKILLed
peer, an unreachable coordinator, and the claim files that share the chunks."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

import meanfield as mf
from meanfield.cli import main
from meanfield.sweep.claims import Claims
from meanfield.sweep.distributed import DistributedError, settings

ENV = dict(os.environ, MEANFIELD_COMPILE_CACHE="0", JAX_PLATFORMS="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config, out, n, port, env=ENV, extra=()):
    return [subprocess.Popen([sys.executable, "-m", "meanfield", "run", str(config), "--out", str(out), "--quiet",
                              "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                              "--process-id", str(i), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(n)]


def _points_per_chunk(run: Path) -> list[np.ndarray]:
    return [xr.load_dataset(f, engine="h5netcdf")["point"].values for f in sorted((run / "chunks").glob("points-*.nc"))]


def test_settings_are_checked():
    assert settings()["coordinator"] is None  # auto-detection
    for kwargs, names in [(dict(num_processes=2), "--coordinator, --process-id missing"),
                          (dict(coordinator="host", num_processes=2, process_id=0), "HOST:PORT"),
                          (dict(coordinator="h:1", num_processes=2, process_id=2), "--process-id"),
                          (dict(coordinator="h:1", num_processes="two", process_id=0), "not an integer"),
                          (dict(coordinator="h:1", num_processes=0, process_id=0), "--num-processes")]:
        with pytest.raises(DistributedError, match=names):
            settings(**kwargs)


def test_environment_variables_start_explicitly(monkeypatch):
    monkeypatch.setenv("MEANFIELD_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("MEANFIELD_NUM_PROCESSES", "4")
    monkeypatch.setenv("MEANFIELD_PROCESS_ID", "3")
    s = settings(process_id=1)  # a flag wins over the environment
    assert (s["coordinator"], s["num_processes"], s["process_id"]) == ("10.0.0.1:1234", 4, 1)


def test_flags_without_distributed_are_refused(tmp_path, capsys):
    assert main(["run", "quickstart", "--out", str(tmp_path / "x"), "--num-processes", "2"]) == 2
    assert "need --distributed" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_claims_one_winner_and_takeover_of_a_dead_holder(tmp_path):
    a, b = Claims(tmp_path), Claims(tmp_path)
    assert a.take("c1") and not b.take("c1")
    # A holder that died on this host: its claim is stale at once, and exactly one process takes it over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "c2.claim.0").write_text(json.dumps({"host": a.owner["host"], "pid": int(dead.stdout), "time": 0}))
    assert a.stale("c2") and not b.stale("c1")
    assert [a.take("c2"), b.take("c2")] == [True, False]
    # A holder elsewhere that stopped touching its claim: stale after the timeout.
    c = Claims(tmp_path, timeout=0.5)
    (tmp_path / "c3.claim.0").write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": 0}))
    assert not c.take("c3")
    time.sleep(0.6)
    assert c.take("c3")
    for x in (a, b, c):
        x.close()


def test_an_unreachable_coordinator_is_one_line_and_a_bounded_wait(tmp_path):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "meanfield", "run", "quickstart", "--out", str(tmp_path / "out"),
                              "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                              "--process-id", "1", "--init-timeout", "4"], env=ENV, capture_output=True, text=True,
                             timeout=120)
    assert res.returncode == 2 and time.perf_counter() - t0 < 60
    assert f"no answer from the coordinator 127.0.0.1:{port}" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """Two processes (gloo) run the quickstart; the merged dataset equals a one-process run's."""
    procs = _launch("quickstart", tmp_path / "two", 2, _free_port())
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "process 1 of 2: computed" in outs[1][0]
    two = mf.load_run(tmp_path / "two")
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert [p["process"] for p in info["processes"]] == [0, 1] and all(p["points"] > 0 for p in info["processes"])
    assert not (tmp_path / "two" / "claims").exists()
    chunks = _points_per_chunk(tmp_path / "two")
    assert sorted(np.concatenate(chunks).tolist()) == list(range(two.sizes["point"]))  # none lost, none twice
    one = subprocess.run([sys.executable, "-m", "meanfield", "run", "quickstart", "--out", str(tmp_path / "one"),
                          "--quiet"], env=ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    one = mf.load_run(tmp_path / "one")
    assert np.array_equal(two["regime"].values, one["regime"].values)
    # Different chunks batch different points together: float32 rounding apart. The distance to rank
    # one, sqrt(1 - s1^2 / sum s^2), sits on float32's cancellation floor sqrt(eps) = 3.5e-4 near collapse.
    xr.testing.assert_allclose(two.drop_attrs(), one.drop_attrs(), rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_a_killed_coordinator_then_a_one_process_relaunch_completes(tmp_path):
    """SIGKILL process 0 halfway: process 1 stops too (JAX's service lived in process 0); re-launching
    with one process finishes the missing chunks; the dataset equals an uninterrupted run's."""
    cfg = {"name": "dist", "model": {"d": 2, "beta": 1.0, "mlp": "two_layer", "activation": "tanh", "norm": "sphere"},
           "initial": {"kind": "sphere", "n": 8}, "simulator": {"kind": "particles", "t1": 2.0, "n_save": 5},
           "observables": ["effective_rank", "mean_cosine"], "plots": {"curves": None}, "output": {"chunk_size": 2},
           "sweep": {"grid": {"model.beta": [1.0, 2.0, 3.0, 4.0], "seed": [0, 1, 2, 3]}}}
    f = tmp_path / "dist.yaml"
    f.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "killed"
    procs = _launch(f, out, 2, _free_port(), env=dict(ENV, MEANFIELD_CHUNK_PAUSE="1"))
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "chunks").glob("points-*.nc"))) < 2:
        time.sleep(0.1)
    procs[0].send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate(timeout=120)
    assert procs[0].returncode == -signal.SIGKILL and procs[1].returncode != 0
    done = sum(len(c) for c in _points_per_chunk(out))
    assert 2 <= done < 16 and not (out / "results.nc").exists()
    res = subprocess.run([sys.executable, "-m", "meanfield", "run", str(f), "--out", str(out), "--quiet"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"computed {16 - done} points" in res.stdout
    chunks = _points_per_chunk(out)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(16))  # none lost, none twice
    clean = subprocess.run([sys.executable, "-m", "meanfield", "run", str(f), "--out", str(tmp_path / "clean"), "--quiet"],
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr
    xr.testing.assert_allclose(mf.load_run(out).drop_attrs(), mf.load_run(tmp_path / "clean").drop_attrs(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_process_1_loads_its_compiled_program_on_the_next_launch(tmp_path):
    """JAX's persistent cache is written by process 0 only; process 1 stores its compiled chunk program
    in `meanfield-executables/`, and each process stores it by what it is traced from; the next launch
    loads them (no entry is written again), with the same dataset."""
    cfg = {"name": "dist_cache", "model": {"d": 2, "beta": 1.0, "mlp": "two_layer", "activation": "tanh",
                                           "norm": "sphere"},
           "initial": {"kind": "sphere", "n": 8}, "simulator": {"kind": "particles", "t1": 2.0, "n_save": 5},
           "observables": ["effective_rank"], "plots": {"curves": None},
           "sweep": {"grid": {"model.beta": [1.0, 2.0, 3.0, 4.0]}}}
    f = tmp_path / "dist.yaml"
    f.write_text(yaml.safe_dump(cfg))
    cache = tmp_path / "cache"
    env = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(MEANFIELD_COMPILE_CACHE="1", MEANFIELD_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    runs, stored = [], []
    for k in range(2):
        procs = _launch(f, tmp_path / f"run{k}", 2, _free_port(), env=env)
        outs = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
        stored.append({p.name: p.stat().st_mtime_ns for p in (cache / "meanfield-executables").glob("*.bin")})
        runs.append(mf.load_run(tmp_path / f"run{k}"))
    traced = [name for name in stored[0] if name.startswith("traced-")]
    assert len(traced) == 2 and len(stored[0]) == 3, stored[0]  # one per process, + process 1's compiled program
    assert stored[1] == stored[0]
    xr.testing.assert_equal(runs[0].drop_attrs(), runs[1].drop_attrs())


def test_merge_command(tmp_path, capsys):
    """`meanfield merge DIR` finishes a run whose chunks are all there, and refuses one with missing points."""
    from meanfield.sweep.run import run_experiment

    cfg = {"name": "m", "model": {"d": 2, "attention": "none", "mlp": "affine", "norm": "none", "W": {"eye": -1.0}},
           "initial": {"kind": "gaussian", "n": 4}, "simulator": {"kind": "gaussian", "t1": 1.0, "n_save": 3},
           "sweep": {"grid": {"model.W.eye": [-1.0, -0.5, 0.5]}}, "output": {"chunk_size": 1}, "plots": {"curves": None}}
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    first = run_experiment(f, out=run, quiet=True, plots=False).dataset
    (run / "results.nc").unlink()
    assert main(["merge", str(run)]) == 0
    xr.testing.assert_identical(mf.load_run(run)[["regime", "cov_trace"]].drop_attrs(), first[["regime", "cov_trace"]].drop_attrs())
    sorted((run / "chunks").glob("points-*.nc"))[0].unlink()
    (run / "results.nc").unlink()
    capsys.readouterr()
    assert main(["merge", str(run)]) == 2
    assert "1 of 3 points are not computed yet" in capsys.readouterr().err


def test_two_configs_never_share_a_directory_even_when_started_together(tmp_path):
    """run.json is created exclusively: a config that arrives second (after `check_run_dir` passed for
    both) is refused, and the first one's run.json is untouched."""
    from meanfield.sweep.plan import ConfigError
    from meanfield.sweep.run import _register_run

    run = tmp_path / "run"
    run.mkdir()
    _register_run(run, "aaaa", {"config_hash": "aaaa", "name": "first"})
    _register_run(run, "aaaa", {"config_hash": "aaaa", "name": "first"})  # the same config: joins the run
    with pytest.raises(ConfigError, match="different config"):
        _register_run(run, "bbbb", {"config_hash": "bbbb", "name": "second"})
    assert json.loads((run / "run.json").read_text())["config_hash"] == "aaaa"
    assert [p.name for p in run.iterdir()] == ["run.json"]
