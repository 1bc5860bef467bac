"""Hostile and careless input to `meanfield run/validate/plot`: every case exits with a clear code
and one message naming the culprit, writes or loses nothing it should not, and stays within
bounded memory and time. (Checkpoints: test_hostile_weights.py; the Python API: test_hostile_api.py.)"""

import copy
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meanfield.cli import main
from meanfield.regimes.observed import FAILED, REGIMES, regime_code
from meanfield.sweep.plan import ConfigError, config_from_dict, evaluate_expression, load_config, parse_yaml
from meanfield.sweep.store import IncompleteRunWarning, load_run
from test_sweep_run import PARTICLES

TINY = PARTICLES  # 6 particle points of n = 8, d = 2 in chunks of 2 (test_sweep_run's config)


def _raw(**sections):
    raw = copy.deepcopy(TINY)
    for path, value in sections.items():
        node = raw
        *head, last = path.split("__")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def _yaml(tmp_path, raw, name="exp.yaml") -> Path:
    f = tmp_path / name
    f.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return f


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
    monkeypatch.setenv("MEANFIELD_COMPILE_CACHE", "0")


def _cli(capsys, *argv):
    """(exit code, stdout, stderr) of an in-process `meanfield ...`: an exception escaping is a traceback."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, *argv, names: str, code: int = 2) -> str:
    rc, out, err = _cli(capsys, *argv)
    assert rc == code, (rc, out, err)
    assert "Traceback" not in err
    assert names in err, err
    assert len(err) < 2000, f"an error message of {len(err)} characters"
    return err


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))} if path.exists() else {}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished run of the tiny sweep (3 chunks of 2 points), copied by the tests that damage it."""
    from meanfield.sweep.run import run_experiment

    d = tmp_path_factory.mktemp("finished")
    f = _yaml(d, TINY)
    run_experiment(f, out=d / "run", quiet=True, plots=False)
    return f, d / "run"


def _copy_run(finished_run, tmp_path) -> tuple[Path, Path]:
    f, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    return f, tmp_path / "run"


# -- 1. data loss and data integrity ---------------------------------------------------------------
def test_overwrite_never_deletes_a_directory_meanfield_did_not_make(tmp_path, capsys):
    f = _yaml(tmp_path, TINY)
    thesis = tmp_path / "d" / "thesis.tex"
    thesis.parent.mkdir()
    thesis.write_text("chapter 1")
    for flags in ((), ("--overwrite",)):
        _refused(capsys, "run", f, "--out", thesis.parent, *flags, names="not a meanfield run directory")
    assert thesis.read_text() == "chapter 1" and _tree(thesis.parent) == {"thesis.tex": 9}


def test_a_damaged_run_json_is_refused_not_overwritten(tmp_path, capsys):
    f = _yaml(tmp_path, TINY)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{not json")
    _refused(capsys, "run", f, "--out", run, names="run.json: damaged")
    assert (run / "run.json").read_text() == "{not json"


def test_out_is_a_file(tmp_path, capsys):
    f = _yaml(tmp_path, TINY)
    target = tmp_path / "notes.txt"
    target.write_text("keep")
    _refused(capsys, "run", f, "--out", target, "--overwrite", names="is a file")
    assert target.read_text() == "keep"


def test_overwrite_of_a_run_removes_only_what_meanfield_wrote(finished_run, tmp_path, capsys):
    f, run = _copy_run(finished_run, tmp_path)
    (run / "thesis.tex").write_text("mine")
    changed = _yaml(tmp_path, _raw(model__beta=2.0, sweep={"grid": {"seed": [0, 1]}}), "changed.yaml")
    _refused(capsys, "run", changed, "--out", run, "--quiet", names="different config")
    rc, out, err = _cli(capsys, "run", changed, "--out", run, "--quiet", "--overwrite")
    assert rc == 0, err
    assert (run / "thesis.tex").read_text() == "mine"
    assert load_run(run).sizes["point"] == 2


def test_damaged_chunks_are_named_set_aside_and_recomputed(finished_run, tmp_path, capsys):
    f, run = _copy_run(finished_run, tmp_path)
    clean = load_run(run)
    (run / "results.nc").unlink()
    victims = sorted((run / "chunks").glob("points-*.nc"))
    for victim, damage in zip(victims, ("truncate", "empty", "random")):
        data = victim.read_bytes()
        victim.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                            "random": np.random.default_rng(0).bytes(len(data))}[damage])
    rc, out, err = _cli(capsys, "run", f, "--out", run, "--quiet")
    assert rc == 0, err
    assert "Traceback" not in err and err.count("recomputed") == 3
    for victim in victims:
        assert victim.name in err and (run / "chunks" / "damaged" / victim.name).is_file()
    assert "computed 6 points" in out
    xr.testing.assert_allclose(load_run(run).drop_attrs(), clean.drop_attrs())


def test_a_chunk_of_another_config_is_not_mixed_in(finished_run, tmp_path, capsys):
    f, run = _copy_run(finished_run, tmp_path)
    (run / "results.nc").unlink()
    victim = sorted((run / "chunks").glob("points-*.nc"))[0]
    ds = xr.load_dataset(victim, engine="h5netcdf")
    ds.attrs["config_hash"] = "0123456789abcdef"
    ds["effective_rank"][:] = 42.0
    ds.to_netcdf(victim, engine="h5netcdf")
    rc, out, err = _cli(capsys, "run", f, "--out", run, "--quiet")
    assert rc == 0 and "another config" in err and victim.name in err
    assert not np.any(load_run(run)["effective_rank"].values == 42.0)


def test_load_run_and_plot_of_an_unfinished_run(finished_run, tmp_path, capsys):
    f, run = _copy_run(finished_run, tmp_path)
    (run / "results.nc").unlink()
    sorted((run / "chunks").glob("points-*.nc"))[0].unlink()
    with pytest.warns(IncompleteRunWarning, match="4 of 6 points"):
        ds = load_run(run)
    assert ds.sizes["point"] == 4
    _refused(capsys, "plot", run, names="incomplete")
    assert not (run / "figures").exists()
    _refused(capsys, "plot", tmp_path, names="not a meanfield run directory")


def _npy_with_header(path: Path, shape, dtype="<f8", payload: bytes = b""):
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": dtype, "fortran_order": False, "shape": shape})
        fh.write(payload)


@pytest.mark.parametrize("case, names", [
    ("pickle", "pickle"), ("shape", "array shape (3, 2)"), ("nan", "non-finite"), ("text", "not a .npy"),
    ("truncated", "truncated"), ("complex", "not a real number type"), ("missing", "no such file"),
])
def test_bad_initial_token_file_is_refused_before_anything_is_written(tmp_path, capsys, case, names):
    p = tmp_path / "tokens.npy"
    n = 8
    if case == "pickle":
        np.save(p, np.array([{"a": 1}] * n * 2, dtype=object).reshape(n, 2), allow_pickle=True)
    elif case == "shape":
        np.save(p, np.ones((3, 2)))
    elif case == "nan":
        X = np.ones((n, 2))
        X[2, 1] = np.nan
        np.save(p, X)
    elif case == "text":
        p.write_text("0.1 0.2\n" * n)
    elif case == "truncated":
        _npy_with_header(p, (n, 2), payload=b"\0" * 17)
    elif case == "complex":
        np.save(p, np.ones((n, 2), dtype=complex))
    f = _yaml(tmp_path, _raw(initial={"kind": "file", "n": n, "path": "tokens.npy"}))
    if case == "missing":
        f = _yaml(tmp_path, _raw(initial={"kind": "file", "n": n, "path": "elsewhere.npy"}))
    _refused(capsys, "run", f, "--out", tmp_path / "out", names=names)
    assert not (tmp_path / "out").exists()


def test_a_huge_token_file_header_is_refused_unread(tmp_path, capsys):
    p = tmp_path / "tokens.npy"
    _npy_with_header(p, (10**6, 2), payload=b"")  # claims 16 MB, holds nothing
    f = _yaml(tmp_path, _raw(initial={"kind": "file", "n": 10**6, "path": "tokens.npy"}))
    _refused(capsys, "run", f, "--out", tmp_path / "out", names="truncated")
    assert not (tmp_path / "out").exists()


KILL_IN_WRITE = textwrap.dedent("""
    import os, pathlib, signal, sys
    from meanfield.cli import main
    real, calls = pathlib.Path.write_bytes, []
    def dying(self, data):  # the second chunk: write a third of it, then die before the rename
        if ".nc.tmp" in self.name:
            calls.append(self)
            if len(calls) == 2:
                real(self, bytes(data)[: len(data) // 3])
                os.kill(os.getpid(), signal.SIGKILL)
        return real(self, data)
    pathlib.Path.write_bytes = dying
    sys.exit(main(sys.argv[1:]))
""")



@pytest.mark.slow
def test_sigkill_during_a_chunk_write_loses_nothing(finished_run, tmp_path, capsys):
    f, clean_run = finished_run
    out = tmp_path / "killed"
    env = dict(os.environ, MEANFIELD_COMPILE_CACHE="0")
    res = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, "run", str(f), "--out", str(out), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert len(list((out / "chunks").glob("*.nc"))) == 1 and len(list((out / "chunks").glob("*.tmp*"))) == 1
    rc, stdout, err = _cli(capsys, "run", f, "--out", out, "--quiet")
    assert rc == 0, err
    assert "computed 4 points" in stdout and not list((out / "chunks").glob("*.tmp*"))
    xr.testing.assert_allclose(load_run(out).drop_attrs(), load_run(clean_run).drop_attrs())


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, timeout=10)


def test_disk_full_is_one_line_and_keeps_finished_chunks(tmp_path, capsys):
    f = _yaml(tmp_path, _raw(output={"chunk_size": 2}))
    disk = tmp_path / "small"
    if _mount_tmpfs(disk, "size=48k"):  # a real full disk: the chunks (~16 kB each) fill it
        try:
            rc, out, err = _cli(capsys, "run", f, "--out", disk / "run", "--quiet")
            chunks = sorted((disk / "run" / "chunks").glob("*"))
        finally:
            _umount(disk)
        assert "No space left" in err
    else:  # no mount permission: a file-size limit in a child process stands in for the full disk
        code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (12000, 12000)); "
                "from meanfield.cli import main; sys.exit(main(sys.argv[1:]))")
        res = subprocess.run([sys.executable, "-c", code, "run", str(f), "--out", str(disk / "run"), "--quiet"],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, MEANFIELD_COMPILE_CACHE="0"))
        rc, err = res.returncode, res.stderr
        chunks = sorted((disk / "run" / "chunks").glob("*"))
    assert rc == 1, err
    assert "Traceback" not in err and err.count("error:") == 1 and "finished chunks" in err
    assert not [c for c in chunks if ".tmp" in c.name]


def test_read_only_output_is_refused(tmp_path, capsys):
    f = _yaml(tmp_path, TINY)
    ro = tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
    elif not _mount_tmpfs(ro, "size=64k,ro"):
        pytest.skip("root without permission to mount a read-only tmpfs")
    try:
        _refused(capsys, "run", f, "--out", ro / "run", names="cannot write")
    finally:
        if os.geteuid() == 0:
            _umount(ro)


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_that_says_how_to_resume(tmp_path):
    f = _yaml(tmp_path, TINY)
    out = tmp_path / "run"
    env = dict(os.environ, MEANFIELD_CHUNK_PAUSE="3", MEANFIELD_COMPILE_CACHE="0")
    proc = subprocess.Popen([sys.executable, "-m", "meanfield", "run", str(f), "--out", str(out), "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "chunks").glob("*.nc")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "run the same command again to resume" in err and str(out) in err
    assert (out / "run.json").is_file() and '"interrupted"' in (out / "run.json").read_text()


# -- 2. numbers that are not valid inputs ----------------------------------------------------------
@pytest.mark.parametrize("raw, names", [
    (_raw(model__Q={"eye": float("nan")}), "model.Q"),
    (_raw(model__beta=float("inf")), "model.beta"),
    (_raw(simulator__t1=float("inf")), "simulator.t1"),
    (_raw(simulator__t1=float("nan")), "simulator.t1"),
    (_raw(model__W1=[[float("nan"), 0.0]] * 8), "model.W1"),
    (_raw(sweep={"grid": {"model.beta": [1.0, float("nan")]}}), "model.beta"),
    (_raw(sweep={"grid": {"model.a_mlp": {"lin": [0.0, float("inf"), 3]}}}), "sweep.grid"),
    (_raw(sweep={"grid": {"model.beta": [1.0]}, "derived": {"model.a_attn": "10.0 ** 400"}}), "sweep.derived.model.a_attn"),
    (_raw(sweep={"grid": {"model.beta": [1.0]}, "derived": {"model.a_attn": "exp(1000)"}}), "sweep.derived.model.a_attn"),
    (_raw(sweep={"grid": {"model.beta": [1.0]}, "derived": {"model.a_attn": "1e308 * 10"}}), "sweep.derived.model.a_attn"),
    (_raw(simulator={"kind": "particles", "t1": 20.0, "solver": "rk4", "dt0": 0.001}), "simulator.max_steps"),
    (_raw(model__a_mlp=1e39), "`model.a_mlp`: 1e+39 overflows float32"),
    (_raw(model__d=2, simulator={"kind": "gaussian", "t1": 1.0}, initial={"kind": "gaussian", "cov": [[1.0, 2.0], [2.0, 1.0]]},
          model__norm="none", model__mlp="affine", observables=None), "initial.cov"),
    (_raw(model__d=2, simulator={"kind": "gaussian", "t1": 1.0}, initial={"kind": "gaussian", "cov": [[1.0, 0.5], [0.0, 1.0]]},
          model__norm="none", model__mlp="affine", observables=None), "not symmetric"),
    (_raw(model__d=2, simulator={"kind": "gaussian", "t1": 1.0}, initial={"kind": "gaussian", "cov": {"diag": [1.0, -1.0]}},
          model__norm="none", model__mlp="affine", observables=None), "initial.cov"),
])
def test_invalid_numbers_are_refused_naming_the_field(tmp_path, capsys, raw, names):
    f = _yaml(tmp_path, raw)
    _refused(capsys, "validate", f, names=names)
    _refused(capsys, "run", f, "--out", tmp_path / "out", names=names)
    assert not (tmp_path / "out").exists()


def test_yaml_nan_spellings_are_refused(tmp_path, capsys):
    for text in ("Q: {eye: .nan}", "a_mlp: .inf", "a_attn: -.Inf", "a_attn: .NaN", "b: [.nan, 0.0]"):
        base = yaml.safe_dump(TINY).replace("model:\n", "model:\n  " + text + "\n", 1)
        f = _yaml(tmp_path, base)
        _refused(capsys, "validate", f, names="model.")


def test_a_failed_solve_is_labelled_failed_never_a_regime(tmp_path, capsys):
    """max_steps too small for t1: success 0, regime 'failed', NaN observables, no blow-up depth."""
    f = _yaml(tmp_path, _raw(simulator={"kind": "particles", "t1": 2.0, "n_save": 5, "max_steps": 3},
                             sweep={"grid": {"model.beta": [1.0, 3.0]}}))
    rc, out, err = _cli(capsys, "run", f, "--out", tmp_path / "run", "--quiet")
    assert rc == 0, err
    ds = load_run(tmp_path / "run")
    assert np.all(ds["success"].values == 0)
    assert np.all(ds["regime"].values == REGIMES.index("failed"))
    assert np.all(np.isnan(ds["effective_rank"].values)) and np.all(np.isnan(ds["blowup_time"].values))
    assert "failed 2" in out and "blow-up depth" not in out


def test_weights_that_overflow_during_the_solve_are_failed_not_a_regime(tmp_path, capsys):
    """Finite in the file, non-finite in the field (float32 logits ~ 1e30 * |x|^2): never stable or collapse."""
    f = _yaml(tmp_path, _raw(model__norm="none", simulator={"kind": "particles", "t1": 2.0, "n_save": 5, "max_steps": 200},
                             sweep={"grid": {"model.a_attn": [1e30, 1e37]}}))
    rc, out, err = _cli(capsys, "run", f, "--out", tmp_path / "run", "--quiet")
    assert rc == 0, err
    ds = load_run(tmp_path / "run")
    assert set(ds["regime"].values.tolist()) <= {REGIMES.index("failed"), REGIMES.index("blowup")}
    assert np.all(np.isnan(ds["effective_rank"].values[ds["regime"].values == FAILED]))


def test_yaml_floats_without_a_dot_are_numbers(tmp_path, capsys):
    """PyYAML reads `1e-2` as a string; a sweep over strings would split compile groups and plot labels."""
    text = yaml.safe_dump(_raw(sweep=None)).replace("sweep: null", "sweep: {grid: {model.a_attn: [1e-2, 2e1]}}")
    cfg = load_config(_yaml(tmp_path, text))
    from meanfield.sweep.plan import make_plan

    plan = make_plan(cfg)
    assert [p["model.a_attn"] for p in plan.points] == [0.01, 20.0] and len(plan.groups) == 1


def test_regime_code_of_non_finite_values_is_failed():
    nan, inf = float("nan"), float("inf")
    codes = regime_code(np.array([nan, 0.5, 0.5, 0.001]), np.array([1.0, inf, 1.0, 1.0]), np.array([False, False, False, True]))
    assert codes.tolist() == [FAILED, FAILED, REGIMES.index("stable"), REGIMES.index("blowup")]
    assert int(regime_code(0.001, 1.0, False, failed=True)) == FAILED


# -- 3. unbounded resources from a small file ------------------------------------------------------
LIMITED = ("import resource, runpy, sys; lim = int(sys.argv.pop(1)) * 2**20; "
           "resource.setrlimit(resource.RLIMIT_AS, (lim, lim)); sys.argv[0] = 'meanfield'; "
           "runpy.run_module('meanfield', run_name='__main__')")


def _limited(argv, mem_mb=3000, timeout=60):
    """Run `meanfield ...` in a child process under an address-space limit; (exit code, stderr, seconds)."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", LIMITED, str(mem_mb), *map(str, argv)], capture_output=True,
                         text=True, timeout=timeout, env=dict(os.environ, MEANFIELD_COMPILE_CACHE="0"))
    return res.returncode, res.stderr, time.perf_counter() - t0


ALIAS_BOMB = "name: bomb\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" if i else "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(10))


def test_resource_bombs_are_refused_in_bounded_memory_and_time(tmp_path):
    grid = _yaml(tmp_path, _raw(sweep={"grid": {"model.beta": {"lin": [0.1, 2, 100000]}, "model.a_attn": {"lin": [0.1, 2, 100000]},
                                                "model.a_mlp": {"lin": [0.1, 2, 20]}, "seed": {"range": [0, 1, 1]}}}),
                 "grid.yaml")
    bomb = _yaml(tmp_path, ALIAS_BOMB, "bomb.yaml")
    power = _yaml(tmp_path, _raw(sweep={"grid": {"seed": [0]}, "derived": {"model.a_attn": "9**9**9**9"}}), "power.yaml")
    for f, names in ((grid, "200,000,000,000 points"), (bomb, "aliases"), (power, "sweep.derived.model.a_attn")):
        rc, err, secs = _limited(["validate", f])
        assert rc == 2 and "Traceback" not in err and names in err, err
        assert len(err) < 500 and secs < 60


def test_point_limit_is_configurable(tmp_path, capsys):
    f = _yaml(tmp_path, _raw(output={"max_points": 5}))
    _refused(capsys, "validate", f, names="6 points is more than output.max_points = 5")
    assert _cli(capsys, "validate", _yaml(tmp_path, _raw(output={"max_points": 6}), "ok.yaml"))[0] == 0


@pytest.mark.parametrize("expr", ["9**9**9", "(10**100)**(10**100)", "2**10**10 % 7", "1" + "0" * 400, "+" * 600 + "1",
                                  "(" * 300 + "1" + ")" * 300, "1 / 0", "log(0)", "model.attention * 1000000000", "max(*[])"])
def test_derived_expressions_cost_is_bounded(expr):
    tree = {"model": {"beta": 2.0, "attention": "softmax"}}
    t0 = time.perf_counter()
    with pytest.raises(ValueError):
        evaluate_expression(expr, tree)
    assert time.perf_counter() - t0 < 1.0


def test_derived_expressions_still_compute():
    tree = {"model": {"beta": 2.0, "d": 3}}
    assert evaluate_expression("1 / model.beta", tree) == 0.5
    assert evaluate_expression("2 ** 10 * model.d", tree) == 3072
    assert evaluate_expression("sqrt(model.d) * 2", tree) == pytest.approx(2 * math.sqrt(3))
    assert evaluate_expression("2 ** 100", tree) == pytest.approx(2.0**100)


def test_a_point_too_big_for_memory_is_refused(tmp_path, capsys):
    f = _yaml(tmp_path, _raw(model__d=4096, initial={"kind": "sphere", "n": 10_000_000}))
    _refused(capsys, "validate", f, names="initial.n = 10000000")


def test_a_repeated_key_is_refused_not_silently_replaced(tmp_path, capsys):
    f = _yaml(tmp_path, yaml.safe_dump(TINY).replace("  beta: 1.0\n", "  beta: 1.0\n  beta: 4.0\n"))
    _refused(capsys, "validate", f, names="key 'beta' appears twice")


def test_oversized_deep_or_binary_yaml(tmp_path, capsys):
    big = _yaml(tmp_path, "name: big\n" + "#" * (5 * 2**20), "big.yaml")
    _refused(capsys, "validate", big, names="too large")
    deep = _yaml(tmp_path, "name: deep\nx: " + "[" * 20000 + "]" * 20000, "deep.yaml")
    _refused(capsys, "validate", deep, names="deep.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\x00bin\n")
    _refused(capsys, "validate", binary, names="not a text file")
    _refused(capsys, "validate", tmp_path, names="no such experiment file")


# -- 4. typos that used to surface only after the computation --------------------------------------
@pytest.mark.parametrize("plots, names", [
    ({"regime_map": {"x": "model.beta", "y": "model.bta"}}, "plots.regime_map.y"),
    ({"regime_map": {"x": "model.beta", "y": "seed", "observable": "efective_rank"}}, "plots.regime_map.observable"),
    ({"curves": {"observable": "rms_norm"}}, "plots.curves.observable"),
    ({"curves": {"hue": "model.a_attn"}}, "plots.curves.hue"),
])
def test_plot_typos_fail_validation(tmp_path, capsys, plots, names):
    f = _yaml(tmp_path, _raw(plots=plots))
    _refused(capsys, "validate", f, names=names)


# -- property-based: the schema never tracebacks, never admits a non-finite number ------------------
_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30), st.booleans())
_leaves = st.one_of(_numbers, st.none(), st.text(max_size=8), st.sampled_from(
    ["random", "softmax", "sphere", "gaussian", "particles", "rk4", "tsit5", "model.beta", "1 / model.beta"]))
_keys = st.sampled_from(["name", "model", "d", "beta", "Q", "eye", "diag", "initial", "n", "cov", "simulator", "t1",
                         "dt0", "solver", "kind", "sweep", "grid", "zip", "derived", "lin", "log", "range", "points",
                         "output", "max_points", "plots", "regime_map", "x", "y", "observables", "seed", "dtype"])
_trees = st.recursive(_leaves, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(_keys, kids, max_size=5)),
                      max_leaves=25)


def _finite_everywhere(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite_everywhere(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite_everywhere(v) for v in obj)
    return True


def _mutated(change, base):
    """The tiny config with one section, or one key of a section, replaced by a random tree."""
    section, key, value = change
    raw = copy.deepcopy(base)
    if isinstance(raw.get(section), dict):
        raw[section][key] = value
    else:
        raw[section] = value
    return raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(st.sampled_from(["model", "initial", "simulator", "sweep", "output", "plots", "regimes", "seed"]), _keys, _trees))
def test_schema_property_no_traceback_no_non_finite(change):
    from meanfield.sweep.plan import make_plan

    raw = _mutated(change, TINY)
    try:
        cfg = config_from_dict(raw)
        make_plan(cfg)
    except ConfigError as exc:
        assert len(str(exc)) < 2000
        return
    assert _finite_everywhere(cfg.model_dump(mode="python"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_yaml_parser_property(text):
    try:
        parse_yaml(text, "<hypothesis>")
    except ConfigError as exc:
        assert len(str(exc)) < 2000
