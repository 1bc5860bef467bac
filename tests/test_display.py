"""Notebook display: compact `__repr__` / `_repr_html_` for models and results (shapes, key parameters,
blow-up time), computed without any JAX compile, and without changing the pytree / jit behaviour."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meanfield as mf
from meanfield.density.pde import DensitySolution
from meanfield.simulate.solvers import AutoTqdmProgressMeter, progress_meter


@contextlib.contextmanager
def compiles():
    """Collect the names of JAX compile events raised inside the block."""
    events = []

    def listener(name, *args, **kwargs):
        if "/compile/" in name:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _values_leak(text: str) -> bool:
    """True if a numpy/JAX array printout (a wall of numbers) is in `text`."""
    return "Array(" in text or "array([" in text or len(text) > 400


@pytest.fixture(scope="module")
def sphere_run():
    model = mf.Model.random(jax.random.key(0), d=3, norm="sphere", beta=4.0)
    X0 = mf.sphere_uniform(jax.random.key(1), n=16, d=3)
    return model, mf.simulate_particles(model, X0, t1=2.0, n_save=11)


def test_model_summary_names_the_parameters(sphere_run):
    model, _ = sphere_run
    text, html = repr(model), model._repr_html_()
    for part in ("d=3", "attention=softmax", "beta=4", "mlp=two_layer[gelu, h=12]", "norm=sphere", "float32"):
        assert part in text, (part, text)
    assert not _values_leak(text)
    assert html.startswith("<div") and "<table" in html and "beta" in html and "sphere" in html
    assert "dx_i/dt" in html  # the equation line


def test_model_summary_batched_piecewise_and_traced(sphere_run):
    model, _ = sphere_run
    stacked = jax.vmap(lambda b: model.replace(beta=b))(jnp.array([1.0, 2.0, 3.0]))
    assert "beta=[1, 2, 3]" in repr(stacked) and "batch=(3,)" in repr(stacked)
    pw = mf.Model.piecewise([model, model.replace(beta=1.0)], times=[1.0])
    assert "layers=2" in repr(pw) and "layer_times=[1]" in repr(pw) and "batch" not in repr(pw)
    seen = []

    @jax.jit
    def f(m):
        seen.append(repr(m))
        return m.beta

    assert float(f(model)) == 4.0
    assert "beta=traced" in seen[0]


def test_particle_solution_summary(sphere_run):
    _, sol = sphere_run
    text = repr(sol)
    assert "xs=(11, 16, 3) float32" in text and "n=16" in text and "d=3" in text
    assert "ts=[0, 2] x 11" in text and "success=True" in text and "blown_up=False" in text
    assert not _values_leak(text)
    assert "<table" in sol._repr_html_() and "mf.classify" in sol._repr_html_()


def test_display_never_compiles(sphere_run):
    model, sol = sphere_run
    I = jnp.eye(2)
    g = mf.simulate_gaussian(mf.Model(Q=I, K=I, V=I), m0=jnp.zeros(2), S0=I, t1=1.0, n_save=7)
    with compiles() as events:
        for obj in (model, sol, g):
            repr(obj), obj._repr_html_()
    assert events == []
    with compiles() as events:  # the check itself can fail: indexing a device array compiles a slice
        jnp.arange(13.0)[jnp.int32(5)]
    assert events


def test_gaussian_solution_reports_the_blowup_time():
    I = jnp.eye(2)
    g = mf.simulate_gaussian(mf.Model(Q=I, K=I, V=I), m0=jnp.zeros(2), S0=I, t1=2.0)
    text = repr(g)
    t_star = float(re.search(r"blowup_time=([0-9.e+-]+)", text).group(1))
    assert abs(t_star - 0.5) < 1e-3  # 1 / (2 v a s0) = 0.5
    assert "covs=(101, 2, 2) float32" in text and not _values_leak(text)
    calm = mf.simulate_gaussian(mf.Model(Q=I, K=I, V=-I), m0=jnp.zeros(2), S0=I, t1=1.0, n_save=5)
    assert "blowup_time=none (inf)" in repr(calm)
    assert "blowup_time" in g._repr_html_() and "0.5" in g._repr_html_()


def test_batched_solution_and_pytree_unchanged(sphere_run):
    model, sol = sphere_run
    X0 = mf.sphere_uniform(jax.random.key(2), n=8, d=3)
    sols = jax.vmap(lambda X: mf.simulate_particles(model, X, t1=0.5, n_save=3))(jnp.stack([X0, -X0]))
    text = repr(sols)
    assert "batch=(2,)" in text and "success=2/2 True" in text and "(batch (2,))" in text
    # the display methods add no fields: same leaves, and a jit round trip keeps the values
    assert len(jax.tree.leaves(sol)) == len(jax.tree.leaves(jax.jit(lambda s: s)(sol)))
    back = jax.jit(lambda s: s)(sol)
    np.testing.assert_array_equal(np.asarray(back.xs), np.asarray(sol.xs))
    assert repr(back) == repr(sol)


def test_density_and_lyapunov_summaries():
    T, N = 5, 32
    dens = DensitySolution(ts=np.linspace(0, 1, T), theta=np.linspace(0, 2 * np.pi, N, endpoint=False),
                           density=np.full((T, N), 1 / (2 * np.pi)), modes=np.full(T, N), tail=np.zeros(T),
                           min_ratio=np.ones(T), mass=np.ones(T), t_end=1.0, resolved=True, refinements=[],
                           num_steps=12)
    assert repr(dens) == ("DensitySolution(ts=[0, 1] x 5, density=(5, 32) float64, modes=[32], t_end=1, "
                          "resolved=True, refinements=0, num_steps=12)")
    assert "<table" in dens._repr_html_()
    res = mf.LyapunovResult(exponents=jnp.array([0.5, -1.0]), running=jnp.zeros((4, 2)),
                            ts=jnp.array([0.5, 1.0, 1.5, 2.0]), drift=jnp.array([1e-3, 2e-3]),
                            finite=jnp.array(True), y1=jnp.zeros((100, 3)))
    assert repr(res) == ("LyapunovResult(exponents=[0.5, -1], drift=[0.001, 0.002], intervals=4, "
                         "ts=[0.5, 2] x 4, finite=True)")
    assert len(jax.tree.leaves(res)) == 6  # still a plain NamedTuple pytree


def test_progress_bar_is_tqdm_auto(sphere_run):
    from tqdm.auto import tqdm

    assert isinstance(progress_meter(True), AutoTqdmProgressMeter)
    bar = AutoTqdmProgressMeter._init_bar()
    try:
        assert isinstance(bar, tqdm)
    finally:
        bar.close()
    model, _ = sphere_run
    X0 = mf.sphere_uniform(jax.random.key(3), n=8, d=3)
    assert bool(mf.simulate_particles(model, X0, t1=0.5, n_save=3, progress=True).success)


def test_display_never_raises_on_non_result_pytrees(sphere_run):
    import equinox as eqx

    model, sol = sphere_run
    _, static = eqx.partition(model, eqx.is_array)  # every array leaf None: no summary possible
    assert repr(static).startswith("Model(") and "Q=None" in repr(static)  # equinox's own tree printout
    assert static._repr_html_() is None  # IPython falls back to the text
    shapes = jax.tree.map(lambda x: getattr(x, "shape", x), sol)
    assert repr(shapes).startswith("ParticleSolution(")


def test_summarised_mixin_on_modules_namedtuples_and_dataclasses(sphere_run):
    """Every result class takes its `__repr__` / `_repr_html_` from `_display.Summarised`; the mixin adds no
    fields, so an equinox Module, a NamedTuple (via a fields base) and a frozen dataclass keep their structure."""
    import dataclasses
    from typing import NamedTuple

    import equinox as eqx

    from meanfield._display import Summarised, Summary

    for cls in (mf.Model, mf.ParticleSolution, mf.GaussianSolution, mf.LyapunovResult, DensitySolution):
        assert issubclass(cls, Summarised), cls
        assert "__repr__" not in cls.__dict__ and "_repr_html_" not in cls.__dict__, cls

    class Box(Summarised, eqx.Module):
        a: jax.Array

        def _summary(self):
            return Summary("Box", [("a", str(self.a.shape))], "a note")

    class _PairFields(NamedTuple):
        x: object
        y: object

    class Pair(Summarised, _PairFields):
        __slots__ = ()

        def _summary(self):
            return Summary("Pair", [("x", str(self.x.shape))])

    @dataclasses.dataclass(frozen=True, repr=False)
    class Host(Summarised):
        n: int

        def _summary(self):
            return Summary("Host", [("n", str(self.n))])

    box = Box(jnp.ones(3))
    assert repr(box) == "Box(a=(3,))" and "meanfield.Box" in box._repr_html_() and "a note" in box._repr_html_()
    assert len(jax.tree.leaves(box)) == 1 and repr(jax.jit(lambda b: b)(box)) == "Box(a=(3,))"
    pair = Pair(np.ones(2), 2)
    assert repr(pair) == "Pair(x=(2,))" and pair[1] == 2 and pair._fields == ("x", "y")
    assert not hasattr(pair, "__dict__") and len(jax.tree.leaves(pair)) == 2
    assert type(jax.tree.map(lambda v: v + 1, pair)) is Pair
    assert repr(Host(4)) == "Host(n=4)"
    # a summary that cannot be built: the next base's own repr, and no HTML
    empty = jax.tree.map(lambda _: None, box)
    assert "Box(" in repr(empty) and "a=None" in repr(empty) and empty._repr_html_() is None
    assert repr(Pair(1, 2)) == "Pair(x=1, y=2)" and Pair(1, 2)._repr_html_() is None
