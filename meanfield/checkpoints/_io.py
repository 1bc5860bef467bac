"""Reading safetensors files without torch: a single file, a directory, or a sharded index.

Tensors are returned as float32 NumPy arrays. F32/F16/F64 (and integer) tensors go through
``safetensors.safe_open(..., framework="numpy")``; BF16, which NumPy cannot hold, is read as raw
little-endian uint16 at the offsets of the file's header and widened exactly (bf16 is the top half of
a float32: ``(u16 << 16).view(float32)``).
"""

from __future__ import annotations

import json
import pathlib
import struct

import numpy as np

from ._types import CheckpointError

INDEX = "model.safetensors.index.json"


def _header(file: pathlib.Path) -> dict:
    """The JSON header of a .safetensors file: name -> {dtype, shape, data_offsets} (+ __metadata__)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise CheckpointError(f"{file}: not a safetensors file (header length {n}).")
            return json.loads(f.read(n)), 8 + n
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not a safetensors file ({exc}).") from None


def resolve(path) -> tuple[list[pathlib.Path], dict, pathlib.Path]:
    """(safetensors files, config.json dict or {}, the path given) for a file or a Hugging Face-style directory.

    A directory is read through ``model.safetensors.index.json`` when present, else ``model.safetensors``,
    else every ``*.safetensors`` in it. A single file uses a ``config.json`` beside it when there is one.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    cdir = p if p.is_dir() else p.parent
    config = {}
    cfile = cdir / "config.json"
    if cfile.is_file():
        try:
            config = json.loads(cfile.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfile}: invalid JSON ({exc}).") from None
    if p.is_file():
        if p.name == INDEX:
            return _from_index(p), config, p
        return [p], config, p
    if (p / INDEX).is_file():
        return _from_index(p / INDEX), config, p
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"], config, p
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{p}: no model.safetensors, {INDEX} or *.safetensors file in this directory.")
    return files, config, p


def _from_index(index: pathlib.Path) -> list[pathlib.Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({exc!r}).") from None
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        f = index.parent / shard
        if not f.is_file():
            raise CheckpointError(f"{index}: weight_map names shard {shard!r}, which does not exist ({f}).")
        files.append(f)
    return files


class TensorStore:
    """Name -> float32 array over one or more safetensors files (``names``, ``shape(name)``, ``get(name)``)."""

    def __init__(self, files):
        self.files = [pathlib.Path(f) for f in files]
        self._where: dict[str, tuple[pathlib.Path, dict, int]] = {}
        for f in self.files:
            header, start = _header(f)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self._where:
                    raise CheckpointError(f"{f}: tensor {name!r} also stored in {self._where[name][0]}.")
                self._where[name] = (f, info, start)
        self._handles = {}

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def shape(self, name) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtypes(self) -> str:
        return ",".join(sorted({info["dtype"] for _, info, _ in self._where.values()}))

    def get(self, name) -> np.ndarray:
        """The tensor as a float32 NumPy array (bf16 widened exactly)."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} not found in {', '.join(map(str, self.files))}.")
        f, info, start = self._where[name]
        if info["dtype"] == "BF16":
            lo, hi = info["data_offsets"]
            raw = np.fromfile(f, dtype="<u2", count=(hi - lo) // 2, offset=start + lo)
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
        from safetensors import safe_open

        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="numpy")
        try:
            return np.asarray(self._handles[f].get_tensor(name), dtype=np.float32)
        except Exception as exc:  # an unsupported dtype (e.g. F8)
            raise CheckpointError(f"{f}: cannot read tensor {name!r} of dtype {info['dtype']} ({exc}).") from None
