"""`import meanfield` turns XLA CPU's YNNPACK reduce fusions off (meanfield._xla_flags), and only when safe."""

import os
import subprocess
import sys

import pytest

from meanfield import _xla_flags


@pytest.fixture
def flags(monkeypatch):
    monkeypatch.delenv(_xla_flags.OFF_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    monkeypatch.setattr(_xla_flags, "_jaxlib_release", lambda: _xla_flags.KNOWN_JAXLIB[0])
    return monkeypatch


def test_the_flag_is_appended_once(flags):
    assert _xla_flags.set_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == f"--xla_cpu_multi_thread_eigen=false {_xla_flags.YNN_FLAG}"
    assert not _xla_flags.set_cpu_defaults()  # already there: unchanged
    assert os.environ["XLA_FLAGS"].count("ynn_fusion_type") == 1


@pytest.mark.parametrize("case", ["user", "off", "unknown jaxlib", "no jaxlib version"])
def test_the_flag_is_left_out(flags, case):
    if case == "user":
        flags.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE")
    elif case == "off":
        flags.setenv(_xla_flags.OFF_ENV, "0")
    elif case == "unknown jaxlib":
        flags.setattr(_xla_flags, "_jaxlib_release", lambda: (99, 0))
    else:
        flags.setattr(_xla_flags, "_jaxlib_release", lambda: None)
    before = os.environ["XLA_FLAGS"]
    assert not _xla_flags.set_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == before


def test_training_takes_the_flag_back(flags):
    """`meanfield train` removes the flag that `import meanfield` appended (a training step's wide
    products run faster with YNNPACK), and leaves a user's own flag and every other flag alone."""
    flags.setattr(_xla_flags, "_appended", False)
    assert not _xla_flags.unset_cpu_defaults()  # nothing appended here: nothing to take back
    assert _xla_flags.set_cpu_defaults()
    assert _xla_flags.unset_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"
    assert not _xla_flags.unset_cpu_defaults()


def test_a_fresh_process_starts_jax_with_it():
    """In a fresh process the flag reaches XLA: JAX starts (an unknown flag would abort it) and compiles
    a reduce without a YNNPACK fusion."""
    code = ("import os, meanfield, jax, jax.numpy as jnp; "
            "txt = jax.jit(lambda a, b: jnp.sum(a[:, :, None] * b[None], axis=1)).lower("
            "jnp.ones((64, 8)), jnp.ones((8, 8))).compile().as_text(); "
            "print('ynn' in os.environ['XLA_FLAGS'], 'ynn_fusion' in txt)")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", _xla_flags.OFF_ENV)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if _xla_flags._jaxlib_release() in _xla_flags.KNOWN_JAXLIB:
        assert out.stdout.split() == ["True", "False"]


def test_program_options_give_large_states_their_reduce_fusions(flags, tmp_path):
    """Sweeps of large token states compile with YNNPACK reduce fusions again (faster there), small
    states without; the options are part of the stored program's key."""
    import jax
    import jax.numpy as jnp

    from meanfield.sweep.executables import compile_lowered

    flags.setenv("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=false {_xla_flags.YNN_FLAG}")
    big = _xla_flags.program_options(64 * 8)
    assert big == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    assert _xla_flags.program_options(4 + 16) == {} and _xla_flags.program_options(32 * 3) == {}
    flags.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # not set by us: leave XLA alone
    assert _xla_flags.program_options(64 * 8) == {}

    if _xla_flags._jaxlib_release() not in _xla_flags.KNOWN_JAXLIB:
        return
    lowered = jax.jit(lambda a, b: jnp.sum(a[:, :, None] * b[None], axis=1)).lower(jnp.ones((64, 8)), jnp.ones((8, 8)))
    devices = jax.local_devices()[:1]
    compiled = compile_lowered(lowered, devices, tmp_path, options=big)
    assert "ynn_fusion" in compiled.as_text()
    compile_lowered(lowered, devices, tmp_path, options={"xla_cpu_experimental_ynn_fusion_type": ""})
    assert len(list(tmp_path.glob("*.bin"))) == 2  # two keys
