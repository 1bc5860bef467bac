"""Byte-level text for training: a corpus every machine has offline, a held-out split, and batches
that are a pure function of (seed, step), so a resumed run reads exactly the data an uninterrupted
one would.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..sweep.plan import ConfigError


@dataclass(frozen=True)
class Corpus:
    """`train` / `val` (uint8 arrays: the first 1 - val_fraction of the bytes, then the rest),
    `source` (what was read) and `sha256` (of the bytes, recorded with every run)."""

    train: np.ndarray
    val: np.ndarray
    source: str
    sha256: str


def stdlib_bytes(max_bytes: int) -> tuple[bytes, str]:
    """This Python's standard-library `.py` files, in sorted path order, concatenated up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    out, total = [], 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(out)[:max_bytes], f"stdlib:{root}"


def load_corpus(spec: str, max_bytes: int, val_fraction: float, seq_len: int, base_dir: Path | None = None) -> Corpus:
    """Read the corpus (`"stdlib"` or a file path) and split it. Raises ConfigError naming `data.corpus`
    when the file is missing or too short for one training and one validation window."""
    if spec == "stdlib":
        data, source = stdlib_bytes(max_bytes)
    else:
        p = Path(spec).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.is_file():
            raise ConfigError(f"field `data.corpus`: no such file {str(p)!r} (or use `stdlib`)")
        try:
            with open(p, "rb") as f:
                data = f.read(max_bytes)
        except OSError as exc:
            raise ConfigError(f"field `data.corpus`: cannot read {str(p)!r} ({exc.strerror or exc})") from None
        source = str(p)
    arr = np.frombuffer(data, np.uint8)
    n_val = int(len(arr) * val_fraction)
    need = seq_len + 2
    if len(arr) - n_val < need or n_val < need:
        raise ConfigError(f"field `data.corpus`: {source} has {len(arr):,} bytes; a training and a validation window of "
                          f"seq_len + 1 = {seq_len + 1} bytes need at least {need / min(val_fraction, 1 - val_fraction):,.0f}")
    return Corpus(train=arr[: len(arr) - n_val], val=arr[len(arr) - n_val:], source=source,
                  sha256=hashlib.sha256(data).hexdigest())


def windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """(len(starts), seq_len + 1) int32 windows: inputs are [:, :-1], next-byte targets [:, 1:]."""
    return data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def train_batch(corpus: Corpus, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
    """The batch of update `step` (1-based): uniform random windows drawn from (seed, step) alone."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(corpus.train) - seq_len - 1, size=batch_size)
    return windows(corpus.train, starts, seq_len)


def fixed_windows(data: np.ndarray, count: int, seq_len: int) -> np.ndarray:
    """`count` windows evenly spaced over `data` (the validation and probe sets: the same at every step)."""
    starts = np.linspace(0, len(data) - seq_len - 1, count).astype(np.int64)
    return windows(data, starts, seq_len)
