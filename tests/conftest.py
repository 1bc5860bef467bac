"""Shared fixtures: fixed PRNG keys and a float64 switch (jax.enable_x64 scoped to one test)."""

import jax
import numpy as np
import pytest


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
