"""Shared fixtures: fixed PRNG keys and a float64 switch (jax.enable_x64 scoped to one test).

XLA's multi-threaded Eigen pool can wedge on CPU (0% CPU forever; see `meanfield.cli`), which would
hang CI until its time limit; the tests run as the command line does, without it.
"""

import os

if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _xla_flags_unchanged():
    """`meanfield.cli.main` sets XLA_FLAGS for its command (e.g. one CPU device per core for `train`);
    called in-process it must not change what later tests' subprocesses inherit."""
    before = os.environ.get("XLA_FLAGS")
    yield
    if before is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = before


@pytest.fixture
def key():
    return jax.random.key(20261123)


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield


def unit_norm(A):
    """A / ||A||_2: random matrices with spectral norm exactly 1."""
    return A / np.linalg.norm(np.asarray(A, dtype=np.float64), 2)
