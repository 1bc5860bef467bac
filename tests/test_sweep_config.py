"""The experiment schema and planner: bad input never gets far, sweeps expand as documented."""

import re
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


def test_shipped_experiments_are_found_by_name():
    from meanfield.sweep.plan import EXPERIMENTS_DIRS, find_experiment

    assert any((d / "quickstart.yaml").is_file() for d in EXPERIMENTS_DIRS)
    assert find_experiment("quickstart").endswith("quickstart.yaml")
    assert find_experiment("no_such_experiment") == "no_such_experiment"
    assert find_experiment("x.yaml") == "x.yaml"


def test_observables_are_checked_against_the_registry():
    """`observables:` accepts exactly the names `metrics.observable_names(kind)` lists."""
    from meanfield.metrics import observable_names

    for name in observable_names("particles"):
        config_from_dict(_with(observables=[name]))
    with pytest.raises(ConfigError, match="cov_logdet.*not available for particles"):
        config_from_dict(_with(observables=["cov_logdet"]))


def test_point_config_puts_the_numbers_in_the_typed_config():
    """A point's swept numbers replace the group config's, by path, in the typed config `build_model` reads."""
    import jax.numpy as jnp

    from meanfield.sweep.build import build_model, point_config, point_keys
    from meanfield.sweep.config import Diag, Eye

    cfg = config_from_dict(_with(model={"d": 2, "V": {"eye": 1.0}, "W1": "random", "b": [0.0, 0.0]},
                                 initial={"cov": {"diag": [1.0, 1.0]}}))
    pc = point_config(cfg, {"model.V.eye": 2.0, "model.b.1": 0.5, "initial.cov.diag.0": 3.0, "seed": 4})
    assert pc.model.V == Eye(eye=2.0) and pc.model.b == [0.0, 0.5] and pc.initial.cov == Diag(diag=[3.0, 1.0])
    assert pc.seed == 4 and cfg.seed == 0 and cfg.model.V == Eye(eye=1.0)
    key = point_keys(4)[0]
    a = build_model(cfg.model, key, jnp.float32, {"model.V.eye": 2.0, "model.beta": 3.0})
    b = build_model(pc.model.model_copy(update={"beta": 3.0}), key, jnp.float32)
    assert float(a.beta) == 3.0 and jnp.array_equal(a.V, 2.0 * jnp.eye(2)) and jnp.array_equal(a.V, b.V)
    with pytest.raises(KeyError, match="model.nope"):
        point_config(cfg, {"model.nope": 1.0})


@pytest.mark.parametrize("value, expected", [
    (None, "Auto()"), ("auto", "Auto()"), ("dense", "Dense()"), ("blocked", "Blocked()"),
    ({"kind": "blocked", "block_size": 512}, "Blocked(block_size=512)"), ("lowrank", "LowRank()"),
    ({"kind": "lowrank", "rtol": 1.0e-4}, "LowRank(rtol=0.0001)"), ({"kind": "auto", "rtol": 1e-5}, "Auto(rtol=1e-05)"),
])
def test_simulator_attention_names_the_evaluators(value, expected):
    """`simulator.attention`: a string or a {kind: ...} mapping, validated into the library's evaluators."""
    import meanfield as mf

    sim = {} if value is None else {"attention": value}
    cfg = config_from_dict(_with(simulator=sim, model={"d": 2, "mlp": "affine", "attention": "softmax"}))
    evaluator = cfg.simulator.attention.evaluator()
    assert evaluator == eval(expected, {k: getattr(mf, k) for k in ("Auto", "Dense", "Blocked", "LowRank")})


@pytest.mark.parametrize("old, message", [
    ({"attention_impl": "dense"}, "simulator.attention_impl was replaced by simulator.attention: dense"),
    ({"attention_method": "lowrank", "attention_rtol": 1e-4},
     "simulator.attention_method was replaced by simulator.attention: {kind: lowrank, rtol: 0.0001}"),
    ({"attention_rtol": 1e-4}, "simulator.attention_rtol was replaced by simulator.attention: {kind: auto, rtol: 0.0001}"),
])
def test_replaced_attention_keys_are_refused(old, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(_with(simulator=old))


def test_bad_attention_values_are_refused():
    for bad in ("flash", {"kind": "dense", "block_size": 64}, {"kind": "blocked", "block_size": 0}, {"rtol": 1e-3}):
        with pytest.raises(ConfigError, match="simulator.attention"):
            config_from_dict(_with(simulator={"attention": bad}))


def test_replaced_shaped_rho0_is_refused():
    """`rho` is the spectral ratio only: the shaped SDE's initial correlation is `shaped.corr0`."""
    raw = {"name": "s", "simulator": {"kind": "shaped_sde", "t1": 1.0, "dt0": 0.01}, "shaped": {"rho0": 0.3},
           "observables": ["corr_mean"]}
    with pytest.raises(ConfigError, match=re.escape("shaped.rho0 was replaced by shaped.corr0 (the initial correlation): corr0: 0.3")):
        config_from_dict(raw)
    raw["shaped"] = {"corr0": 0.3}
    assert config_from_dict(raw).shaped.corr0 == 0.3


def _same_plan(a, b):
    assert a.points == b.points and a.axes == b.axes and len(a.groups) == len(b.groups)
    for ga, gb in zip(a.groups, b.groups):
        assert ga.config == gb.config and ga.traced_paths == gb.traced_paths
        np.testing.assert_array_equal(ga.indices, gb.indices)
        assert ga.values.keys() == gb.values.keys()
        for p in ga.values:
            assert ga.values[p].dtype == gb.values[p].dtype, p
            np.testing.assert_array_equal(ga.values[p], gb.values[p])


@pytest.mark.parametrize("sweep", [
    {"grid": {"model.beta": {"lin": [0.1, 2.0, 7]}, "seed": {"range": [0, 5, 1]}}},
    {"grid": {"model.spectral_ratio": {"log": [0.05, 20.0, 4]}}, "zip": {"model.a_attn": [1, 2.5], "seed": [3, 4]}},
    {"points": [{"model.beta": 1, "initial.cov": 0.5}, {"model.beta": 2.0, "initial.cov": 0}]},
    {"grid": {"model.b": [-0.0, 0.0, 1], "simulator.rtol": [1e-4, 1e-5]}},
])
def test_value_by_value_planning_equals_point_by_point(sweep):
    """A sweep over `INDEPENDENT_PATHS` is validated once per distinct value (the fast path) and gives
    exactly the groups, values (with their dtypes, int vs float, -0.0) and config of the point loop."""
    raw = _with(model={"mlp": "two_layer"}, sweep=sweep)
    cfg = config_from_dict(raw)
    _same_plan(make_plan(cfg), make_plan(cfg, by_value=False))


@pytest.mark.parametrize("sweep, field", [
    ({"grid": {"model.beta": [1.0, -2.0], "seed": [0, 1]}}, "sweep point 2 (model.beta=-2.0, seed=0)"),
    ({"grid": {"seed": [0, 2**31]}}, "seed"),
    ({"grid": {"model.a_attn": [1.0, 1e39]}}, "overflows float32"),
])
def test_value_by_value_planning_reports_the_first_bad_point(sweep, field):
    raw = _with(model={"mlp": "two_layer"}, sweep=sweep)
    with pytest.raises(ConfigError) as err:
        make_plan(config_from_dict(raw, source="exp.yaml"), source="exp.yaml")
    assert field in str(err.value), str(err.value)


def test_independent_paths_are_read_by_no_cross_field_validator():
    """`INDEPENDENT_PATHS` stays true: no model validator of the schema reads those fields' values
    (beyond `is None` / list-ness checks, which a swept number never meets)."""
    import inspect

    from meanfield.sweep import config as C
    from meanfield.sweep.plan import INDEPENDENT_PATHS

    allowed = {  # reads that cannot see a swept number's value
        "spectral_ratio": ["self.spectral_ratio is not None"],
        "b": ["isinstance(self.b, list)", "len(self.b)"],
        "mean": ["isinstance(init.mean, list)", "len(init.mean)"],
        "cov": ["isinstance(self.cov, float) and self.cov < 0", "isinstance(self.cov, Eye)", "self.cov.eye",
                "isinstance(self.cov, Diag)", "self.cov.diag", "isinstance(self.cov, list)", "_check_covariance(self.cov)",
                "isinstance(init.cov, list)", "len(init.cov)", "init.cov)", "isinstance(init.cov, Diag)", "init.cov.diag"],
    }
    sources = []
    for _, cls in inspect.getmembers(C, inspect.isclass):
        if issubclass(cls, C.BaseModel) and cls.__module__ == C.__name__:
            for name, dec in cls.__pydantic_decorators__.model_validators.items():
                src = inspect.getsource(getattr(cls, name))
                sources.append(re.sub(r'"[^"\n]*"|\'[^\'\n]*\'', '""', src))  # messages are not reads
    for path in INDEPENDENT_PATHS:
        leaf = path.split(".")[-1]
        for src in sources:
            for kw in allowed.get(leaf, []):
                src = src.replace(kw, "")
            assert not re.search(rf"\.{leaf}\b|\b{leaf}\s*=", src), (path, src)
