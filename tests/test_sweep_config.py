"""The experiment schema and planner: bad input never gets far, sweeps expand as documented."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from meanfield.sweep.config import LinSpec, LogSpec, RangeSpec, axis_values
from meanfield.sweep.plan import ConfigError, config_from_dict, load_config, make_plan

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "name": "t", "model": {"d": 2, "mlp": "affine"}, "initial": {"kind": "gaussian", "n": 8},
    "simulator": {"kind": "particles", "t1": 1.0, "n_save": 3},
}


def _with(**sections):
    import copy

    cfg = copy.deepcopy(BASE)
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_experiments_validate(path):
    cfg = load_config(path)
    plan = make_plan(cfg, source=str(path))
    assert plan.n_points >= 1 and cfg.description


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(model={"bta": 1.0}), "model.bta"),  # typo: unknown key
        (dict(model={"beta": "hot"}), "model.beta"),  # wrong type
        (dict(model={"beta": -1.0}), "model.beta"),  # impossible value
        (dict(initial={"n": 0}), "initial.n"),
        (dict(model={"spectral_ratio": 0.0, "mlp": "two_layer"}), "model.spectral_ratio"),
        (dict(model={"V": [[1.0, 0.0]]}), "model"),  # shape mismatch of a given matrix
        (dict(simulator={"solver": "rk4"}), "simulator"),  # fixed step without dt0
        (dict(simulator={"kind": "gaussian"}, initial={"kind": "sphere"}), "initial.kind"),
        (dict(observables=["entropy"]), "observables"),
        (dict(sweep={"grid": {"model.beta": [1.0, -2.0]}}), "model.beta"),  # bad value inside the sweep
        (dict(sweep={"grid": {"model.spectral_ratio": {"log": [0.0, 1.0, 3]}}}), "sweep.grid"),
        (dict(sweep={"zip": {"model.beta": [1, 2], "model.a_attn": [1, 2, 3]}}), "zip"),
        (dict(sweep={"grid": {"model.beta": [1]}, "zip": {"model.beta": [2]}}), "already swept"),
        (dict(sweep={"derived": {"model.beta": "model.a_attn +* 2"}}), "sweep.derived.model.beta"),
        (dict(initial={"kind": "file", "path": "nowhere.npy"}), "initial.path"),
    ],
)
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        make_plan(config_from_dict(_with(**change), source="exp.yaml"), source="exp.yaml")
    assert field in str(err.value) and "exp.yaml" in str(err.value), str(err.value)


def test_gaussian_refuses_models_without_closure():
    raw = _with(simulator={"kind": "gaussian"}, model={"norm": "sphere"})
    with pytest.raises(ConfigError, match="no exact closure.*sphere"):
        config_from_dict(raw)


def test_axis_specs():
    np.testing.assert_allclose(axis_values(LinSpec(lin=(0, 1, 5))), [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(axis_values(LogSpec(log=(0.1, 10, 3))), [0.1, 1, 10])
    assert axis_values(RangeSpec(range=(0, 10, 3))) == [0, 3, 6, 9]


def test_expansion_grid_zip_points_derived():
    raw = _with(sweep={
        "grid": {"model.beta": [1.0, 2.0], "seed": {"range": [0, 3, 1]}},
        "zip": {"model.a_attn": [1.0, 0.5], "model.a_mlp": [0.1, 0.2]},
        "points": [{"initial.n": 4}, {"initial.n": 6}],
        "derived": {"model.V.eye": "2 * model.beta"},
    })
    plan = make_plan(config_from_dict(raw))
    assert plan.n_points == 2 * 3 * 2 * 2
    assert plan.axes == ["model.beta", "seed", "model.a_attn", "model.a_mlp", "initial.n", "model.V.eye"]
    for p in plan.points:
        assert p["model.V.eye"] == 2 * p["model.beta"]
        assert (p["model.a_attn"], p["model.a_mlp"]) in [(1.0, 0.1), (0.5, 0.2)]
    # initial.n sets a shape: two compile groups, everything else traced inside them.
    assert len(plan.groups) == 2
    assert set(plan.groups[0].traced_paths) == {"model.beta", "seed", "model.a_attn", "model.a_mlp", "model.V.eye"}
    assert sorted(np.concatenate([g.indices for g in plan.groups]).tolist()) == list(range(plan.n_points))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "meanfield", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_bad_file_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        name: bad
        model: {d: 2, beta: -1}
    """))
    out = tmp_path / "out"
    res = _cli("run", str(bad), "--out", str(out), cwd=tmp_path)
    assert res.returncode == 2
    assert "bad.yaml" in res.stderr and "model.beta" in res.stderr and "greater than or equal to 0" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("name: x\nmodel: {d: 2\n")
    res = _cli("validate", str(syntax), cwd=tmp_path)
    assert res.returncode == 2 and "line" in res.stderr
    res = _cli("run", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert res.returncode == 2 and "no such experiment file" in res.stderr


def test_cli_validate_list_help():
    res = _cli("validate", "experiments/quickstart.yaml", cwd=ROOT)
    assert res.returncode == 0 and "48 points" in res.stdout
    res = _cli("list", cwd=ROOT)
    assert res.returncode == 0 and "quickstart" in res.stdout
    from meanfield.cli import main

    for cmd in ("run", "validate", "plot", "list"):
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0
