"""The command line's persistent compilation cache: on by default in its own directory, off with
MEANFIELD_COMPILE_CACHE=0, a warning (never a traceback) when the directory cannot be written, and
never turned on by `import meanfield` alone."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import matplotlib
import pytest

from meanfield.cli import compile_cache

TINY = textwrap.dedent("""
    name: tiny_cache
    seed: 0
    model: {d: 2, beta: 1.0, mlp: two_layer, activation: tanh, norm: sphere}
    initial: {kind: sphere, n: 4}
    simulator: {kind: particles, t1: 1.0, n_save: 3}
    observables: [effective_rank]
    sweep: {grid: {model.spectral_ratio: [0.5, 2.0]}}
    plots: {curves: null}
""")
# The spectral ratio puts an SVD (a LAPACK call) into the chunk program: a program loaded untraced
# in a fresh process must find jaxlib's LAPACK table filled in (`executables._initialize_custom_calls`).


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MEANFIELD_CACHE_DIR", "MEANFIELD_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")  # nothing lands in the real ~/.cache
    env.setdefault("MPLCONFIGDIR", matplotlib.get_cachedir())  # ... but keep matplotlib's font cache
    env.update(extra)
    return env


def _run(tmp_path, *args, **env):
    res = subprocess.run([sys.executable, "-m", "meanfield", "run", *args], cwd=tmp_path, env=_env(tmp_path, **env),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert re.search(r"computed 2 points in \d+\.\d\d s", res.stdout), res.stdout
    return res


def _entries(path):
    """JAX's cache entries and meanfield's stored programs (`executables.SUBDIR/<name>`)."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same sweep run twice against one cache directory: (cache dir, entries after each run).
    The compile-time floor is lowered to 0 here so the test does not depend on how fast XLA compiles."""
    tmp = tmp_path_factory.mktemp("cache_runs")
    (tmp / "tiny.yaml").write_text(TINY)
    cache = tmp / "cache"
    env = dict(MEANFIELD_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    _run(tmp, "tiny.yaml", "--out", str(tmp / "out"), "--quiet", **env)
    first = _entries(cache)
    _run(tmp, "tiny.yaml", "--out", str(tmp / "out"), "--overwrite", "--quiet", **env)
    return cache, first, _entries(cache)


def test_run_writes_the_cache_and_reuses_it(two_runs):
    cache, first, second = two_runs
    jax_entries = [name for name in first if "/" not in name]
    # (A `.one-device` file records that the chunk program calls LAPACK: it runs on one CPU device.)
    ours = [name for name in first if "/" in name and not name.endswith(".one-device")]
    assert jax_entries and all(name.endswith(("-cache", "-atime")) for name in jax_entries), first
    # The chunk program, stored by what it is traced from (the next launch loads it untraced).
    assert len(ours) == 1 and ours[0].startswith("meanfield-executables/traced-"), first
    # The second run found every program it compiles in the cache: it wrote nothing new.
    assert second == first


def test_the_sweep_program_itself_is_cached(two_runs):
    """The chunk program (ensemble integrator) has no host callback, so JAX persists it; the second
    run adds no entry, i.e. it loaded the program instead of compiling it."""
    cache, first, _ = two_runs
    assert any(name.startswith("jit_chunk") for name in first), first


def test_a_program_from_jax_cache_is_not_stored_again(two_runs, tmp_path):
    """When JAX's cache holds the chunk program and meanfield's store does not (an older meanfield
    filled it), the run loads it from JAX's cache and stores nothing: serialising a program that was
    itself deserialised gives a blob that fails in the next process (`NOT_FOUND: Function ... not
    found`). The runs after it keep working. (JAX's keys hold the cache directory's path, so this
    runs on the fixture's own directory: the fixture's lists were taken already.)"""
    import shutil

    from meanfield.sweep.executables import SUBDIR

    cache, _, _ = two_runs
    shutil.rmtree(cache / SUBDIR)
    (tmp_path / "tiny.yaml").write_text(TINY)
    env = dict(MEANFIELD_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    for _ in range(2):
        _run(tmp_path, "tiny.yaml", "--out", str(tmp_path / "out"), "--overwrite", "--quiet", **env)
        assert not any(name.startswith(SUBDIR) and name.endswith(".bin") for name in _entries(cache)), _entries(cache)


def test_switched_off(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    cache = tmp_path / "cache"
    _run(tmp_path, "tiny.yaml", "--out", str(tmp_path / "out"), "--quiet", MEANFIELD_CACHE_DIR=str(cache),
         MEANFIELD_COMPILE_CACHE="0", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert _entries(cache) == []
    assert not (tmp_path / "xdg" / "meanfield").exists()


def test_default_directory_and_config_restored(tmp_path, monkeypatch):
    for name in ("MEANFIELD_CACHE_DIR", "MEANFIELD_COMPILE_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    before = jax.config.jax_compilation_cache_dir
    with compile_cache() as path:
        assert path == tmp_path / "meanfield" / "jax" and path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs <= 0.5
    assert jax.config.jax_compilation_cache_dir == before  # main() called in-process leaves JAX as it found it


def test_unwritable_directory_warns_once(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a directory cannot be created under a file, even as root
    monkeypatch.setenv("MEANFIELD_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.delenv("MEANFIELD_COMPILE_CACHE", raising=False)
    before = jax.config.jax_compilation_cache_dir
    with compile_cache() as path:
        assert path is None
        assert jax.config.jax_compilation_cache_dir == before
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("warning: compilation cache disabled"), err


def test_importing_the_library_leaves_the_cache_off(tmp_path):
    code = "import jax, meanfield; assert jax.config.jax_compilation_cache_dir is None"
    res = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _lowered():
    f = jax.jit(lambda v: {"y": jax.numpy.sin(v["x"]) * 2.0})
    x = {"x": jax.numpy.arange(4.0)}
    return f.lower(x), x


def test_executable_store_compiles_once_then_loads(tmp_path, monkeypatch):
    """Processes other than 0 keep their compiled programs themselves (JAX's cache is written by
    process 0 only): the first call compiles and stores, the next loads without compiling, and a
    damaged entry is compiled again and replaced."""
    from meanfield.sweep import executables

    lowered, x = _lowered()
    want = lowered.compile()(x)["y"]
    first = executables.compile_lowered(lowered, jax.local_devices(), tmp_path)
    (entry,) = tmp_path.iterdir()
    assert entry.suffix == ".bin" and first(x)["y"].tolist() == want.tolist()

    def no_compile(self, *a, **k):
        raise AssertionError("compiled although the store holds the program")

    with monkeypatch.context() as m:
        m.setattr(type(lowered), "compile", no_compile)
        loaded = executables.compile_lowered(lowered, jax.local_devices(), tmp_path)
    assert loaded(x)["y"].tolist() == want.tolist()
    entry.write_bytes(b"not a program")
    again = executables.compile_lowered(lowered, jax.local_devices(), tmp_path)
    assert again(x)["y"].tolist() == want.tolist() and entry.read_bytes() != b"not a program"
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temporary file left behind


def test_executable_store_only_for_processes_other_than_0(tmp_path, monkeypatch):
    from meanfield.sweep import executables

    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        assert executables.store_dir() is None  # process 0: JAX's own cache
        monkeypatch.setattr(executables.jax, "process_index", lambda: 1)
        assert executables.store_dir() == tmp_path / executables.SUBDIR
        jax.config.update("jax_compilation_cache_dir", None)
        assert executables.store_dir() is None  # the cache is off
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_traced_store_loads_without_tracing(tmp_path):
    """`compile_traced` keys programs by what they are traced from: a second call with the same parts
    loads the program without calling `lower` (nothing is traced), other parts miss, and a damaged
    entry is traced and compiled again."""
    from meanfield.sweep import executables

    lowered, x = _lowered()
    want = lowered.compile()(x)["y"].tolist()
    devices = jax.local_devices()
    first, loaded = executables.compile_traced(lambda: lowered, ["group A"], devices, tmp_path)
    (entry,) = tmp_path.glob("traced-*.bin")
    assert first(x)["y"].tolist() == want and loaded is None

    def no_trace():
        raise AssertionError("traced although the store holds the program")

    again, loaded = executables.compile_traced(no_trace, ["group A"], devices, tmp_path)
    assert again(x)["y"].tolist() == want and loaded == entry
    with pytest.raises(AssertionError, match="traced although"):
        executables.compile_traced(no_trace, ["group B"], devices, tmp_path)
    entry.write_bytes(b"not a program")
    assert executables.compile_traced(lambda: lowered, ["group A"], devices, tmp_path)[0](x)["y"].tolist() == want
    assert entry.read_bytes() != b"not a program"


def test_traced_key_follows_everything_a_program_is_traced_from(monkeypatch):
    from meanfield.sweep import executables

    devices = jax.local_devices()
    key = executables.traced_key(["cfg", b"tokens"], devices)
    assert key == executables.traced_key(["cfg", b"tokens"], devices)
    assert key != executables.traced_key(["cfg", b"tokens2"], devices)
    assert key != executables.traced_key(["cfg2", b"tokens"], devices)
    with jax.enable_x64(True):
        assert key != executables.traced_key(["cfg", b"tokens"], devices)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
    assert key != executables.traced_key(["cfg", b"tokens"], devices)
    monkeypatch.undo()
    monkeypatch.setattr(executables, "_PACKAGE_DIGEST", ["another version of meanfield"])
    assert key != executables.traced_key(["cfg", b"tokens"], devices)
    monkeypatch.setattr(executables, "_versions", lambda: "diffrax==0.0.1")
    monkeypatch.setattr(executables, "_PACKAGE_DIGEST", [])
    assert key != executables.traced_key(["cfg", b"tokens"], devices)


def test_second_run_traces_nothing(tmp_path, monkeypatch):
    """Two runs of one sweep against one cache directory: the second builds its chunk program from
    the store without tracing it (the chunk function would raise if traced) and stores the same numbers."""
    import numpy as np
    import yaml

    from meanfield.sweep import schedule
    from meanfield.sweep.plan import config_from_dict
    from meanfield.sweep.run import run_experiment

    cfg = config_from_dict(yaml.safe_load(TINY))
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cache"))
        first = run_experiment(cfg, out=tmp_path / "a", quiet=True, plots=False)
        assert list((tmp_path / "cache" / "meanfield-executables").glob("traced-*.bin"))

        def untraceable(*args, **kwargs):
            def chunk(values):
                raise AssertionError("the chunk program was traced again")
            return chunk

        monkeypatch.setattr(schedule, "make_chunk_function", untraceable)
        second = run_experiment(cfg, out=tmp_path / "b", quiet=True, plots=False)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    for name in first.dataset.data_vars:
        np.testing.assert_array_equal(first.dataset[name].values, second.dataset[name].values)


def test_a_stored_program_that_fails_to_run_is_compiled_again(tmp_path, monkeypatch, capsys):
    """A stored program that loads but fails when run (what re-serialising a program from JAX's cache
    gave: `NOT_FOUND: Function ... not found`) costs a warning, not the run: its entry is deleted, the
    chunk is computed by a freshly compiled program, and the numbers are those of the first run."""
    import numpy as np
    import yaml

    from meanfield.sweep import executables
    from meanfield.sweep.plan import config_from_dict
    from meanfield.sweep.run import run_experiment

    cfg = config_from_dict(yaml.safe_load(TINY))
    before = jax.config.jax_compilation_cache_dir
    real_load = executables._load

    def broken(values):
        raise jax.errors.JaxRuntimeError("NOT_FOUND: Function concatenate_broadcast_fusion not found (type id: 1)")

    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cache"))
        first = run_experiment(cfg, out=tmp_path / "a", quiet=True, plots=False)
        (entry,) = (tmp_path / "cache" / executables.SUBDIR).glob("traced-*.bin")
        monkeypatch.setattr(executables, "_load", lambda path, devices: (
            broken if path == entry and path.is_file() else real_load(path, devices)))
        second = run_experiment(cfg, out=tmp_path / "b", quiet=True, plots=False)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    err = capsys.readouterr().err
    assert "a stored compiled program failed to run (NOT_FOUND" in err and "compiled again" in err, err
    assert err.count("failed to run") == 1  # deleted once; the fresh program ran
    for name in first.dataset.data_vars:
        np.testing.assert_array_equal(first.dataset[name].values, second.dataset[name].values)
