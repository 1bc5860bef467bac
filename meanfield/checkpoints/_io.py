"""Reading safetensors files without torch: a single file, a directory, or a sharded index.

A .safetensors file is an 8-byte little-endian header length n, n bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` and the tensor bytes,
offsets relative to the end of the header. `parse_header` is the one place the header is checked, from
the header and the file size alone, before any tensor is allocated: every field's type, the dtype, each
tensor's byte length against its shape (so a header claiming a huge tensor is refused without
allocating it), offsets inside the data and not overlapping. A damaged file (truncated, random bytes,
a header of another structure) raises `CheckpointError` naming the file and the fault.

Tensors are returned as float32 NumPy arrays, read with ``np.fromfile`` at the checked offsets:
F64/F32/F16 and integer tensors are cast; BF16, which NumPy cannot hold, is read as raw little-endian
uint16 and widened exactly (bf16 is the top half of a float32: ``(u16 << 16).view(float32)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct

import numpy as np

from ._types import CheckpointError

INDEX = "model.safetensors.index.json"

#: Longest header accepted (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000

#: Bits per element of every safetensors dtype; the NumPy dtype each readable one is read as (None: not readable).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "E8M0": 8, "I16": 16,
              "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64,
              "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
NUMPY_DTYPES = {"BOOL": "?", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2", "BF16": "<u2",
                "I32": "<i4", "U32": "<u4", "F32": "<f4", "F64": "<f8", "I64": "<i8", "U64": "<u8"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One checked header entry: ``begin``/``end`` are byte offsets into the file (header included)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(raw: bytes, data_bytes: int, where) -> dict[str, TensorInfo]:
    """Check a safetensors JSON header against the size of the data that follows it.

    ``raw``: the header bytes (after the 8-byte length); ``data_bytes``: bytes in the file after the
    header; ``where``: the file, for messages. Returns name -> `TensorInfo` with file offsets
    (``8 + len(raw)`` added); ``__metadata__`` is checked (an object of strings) and dropped.

    Raises:
        CheckpointError: ``"{where}: ..."`` naming the tensor and the fault, for anything but a valid header.
    """
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: not a safetensors file (header is not UTF-8 text).") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: not a safetensors file (header is not JSON: {exc}).") from None
    except RecursionError:
        raise CheckpointError(f"{where}: not a safetensors file (header JSON nested too deeply).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: not a safetensors file (header is a JSON {type(header).__name__}, "
                              "not an object of tensors).")
    start = 8 + len(raw)
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(f"{where}: damaged safetensors header: __metadata__ must be an object of strings.")
            continue
        bad = f"{where}: damaged safetensors header: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{bad} is a JSON {type(info).__name__}, not an object with dtype, shape, data_offsets.")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise CheckpointError(f"{bad} has no {', '.join(missing)}.")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise CheckpointError(f"{bad} has unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)}).")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise CheckpointError(f"{bad} has shape {_short(shape)}; expected a list of non-negative integers.")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{bad} has data_offsets {_short(offsets)}; expected [begin, end], 0 <= begin <= end.")
        lo, hi = offsets
        need = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8  # exact integers: no overflow at any size
        if hi - lo != need:
            raise CheckpointError(f"{bad}: shape {_short(shape)} of {dtype} needs {need} bytes but data_offsets "
                                  f"[{lo}, {hi}] hold {hi - lo}.")
        if hi > data_bytes:
            raise CheckpointError(f"{where}: truncated or damaged: tensor {name!r} ends at data byte {hi}, but the file "
                                  f"has {data_bytes} data bytes after its header.")
        out[name] = TensorInfo(dtype, tuple(shape), start + lo, start + hi)
        if hi > lo:
            spans.append((lo, hi, name))
    spans.sort()
    for (_, hi0, n0), (lo1, _, n1) in zip(spans, spans[1:]):
        if lo1 < hi0:
            raise CheckpointError(f"{where}: damaged safetensors header: tensors {n0!r} and {n1!r} overlap.")
    return out


def _short(x, n=80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[:n] + "..."


def read_header(file) -> dict[str, TensorInfo]:
    """The checked header of a .safetensors file (see `parse_header`); reads only the header bytes."""
    file = pathlib.Path(file)
    try:
        with open(file, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if size < 8:
                raise CheckpointError(f"{file}: not a safetensors file ({size} bytes; too short for the 8-byte header length).")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES or n > size - 8:
                what = "truncated or not a safetensors file" if n <= MAX_HEADER_BYTES else "not a safetensors file"
                raise CheckpointError(f"{file}: {what} (header length field says {n} bytes; the file has "
                                      f"{size - 8} after it{f', limit {MAX_HEADER_BYTES}' if n > MAX_HEADER_BYTES else ''}).")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror or exc}).") from None
    if len(raw) != n:
        raise CheckpointError(f"{file}: truncated (header of {n} bytes, {len(raw)} read).")
    return parse_header(raw, size - 8 - n, file)


def _read_json(file: pathlib.Path, what: str):
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror or exc}).") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else \
            "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{file}: invalid JSON ({reason}); expected {what}.") from None


def resolve(path) -> tuple[list[pathlib.Path], dict, pathlib.Path]:
    """(safetensors files, config.json dict or {}, the path given) for a file or a Hugging Face-style directory.

    A directory is read through ``model.safetensors.index.json`` when present, else ``model.safetensors``,
    else every ``*.safetensors`` in it. A single file uses a ``config.json`` beside it when there is one.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not (p.is_dir() or p.is_file()):
        raise CheckpointError(f"{p}: not a regular file or directory.")
    cdir = p if p.is_dir() else p.parent
    config = {}
    cfile = cdir / "config.json"
    if cfile.is_file():
        config = _read_json(cfile, "the model's config object")
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfile}: expected a JSON object (the model's config); got a {type(config).__name__}.")
    if p.is_file():
        if p.name == INDEX:
            return _from_index(p), config, p
        return [p], config, p
    if (p / INDEX).is_file():
        return _from_index(p / INDEX), config, p
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"], config, p
    files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
    if not files:
        raise CheckpointError(f"{p}: no model.safetensors, {INDEX} or *.safetensors file in this directory.")
    return files, config, p


def _from_index(index: pathlib.Path) -> list[pathlib.Path]:
    data = _read_json(index, "an object with a 'weight_map'")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' object (tensor name -> shard file).")
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        if (not isinstance(shard, str) or not shard or pathlib.PurePath(shard).is_absolute()
                or ".." in pathlib.PurePath(shard).parts):
            raise CheckpointError(f"{index}: weight_map names shard {_short(shard)}; expected a file name in {index.parent}.")
        f = index.parent / shard
        if not f.is_file():
            raise CheckpointError(f"{index}: weight_map names shard {shard!r}, which does not exist ({f}).")
        files.append(f)
    return files


class TensorStore:
    """Name -> float32 array over one or more safetensors files (``names``, ``shape(name)``, ``get(name)``).

    Every file's header is checked when the store is made (`parse_header`); ``get`` reads one tensor.
    """

    def __init__(self, files):
        self.files = [pathlib.Path(f) for f in files]
        self._where: dict[str, tuple[pathlib.Path, TensorInfo]] = {}
        for f in self.files:
            for name, info in read_header(f).items():
                if name in self._where:
                    raise CheckpointError(f"{f}: tensor {name!r} also stored in {self._where[name][0]}.")
                self._where[name] = (f, info)

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def shape(self, name) -> tuple[int, ...]:
        return self._where[name][1].shape

    def dtypes(self) -> str:
        return ",".join(sorted({info.dtype for _, info in self._where.values()}))

    def get(self, name, *, finite: bool = False) -> np.ndarray:
        """The tensor as a float32 NumPy array (bf16 widened exactly).

        ``finite``: refuse (CheckpointError naming the tensor) a tensor holding NaN or +-inf, or a value
        beyond float32's range (which becomes inf).
        """
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} not found in {', '.join(map(str, self.files))}.")
        f, info = self._where[name]
        if info.dtype not in NUMPY_DTYPES:
            raise CheckpointError(f"{f}: cannot read tensor {name!r}: dtype {info.dtype} is not supported "
                                  f"(supported: {', '.join(NUMPY_DTYPES)}).")
        dt = np.dtype(NUMPY_DTYPES[info.dtype])
        count = (info.end - info.begin) // dt.itemsize
        try:
            raw = np.fromfile(f, dtype=dt, count=count, offset=info.begin) if count else np.empty(0, dt)
        except OSError as exc:
            raise CheckpointError(f"{f}: cannot read tensor {name!r} ({exc.strerror or exc}).") from None
        if raw.size != count:
            raise CheckpointError(f"{f}: truncated: tensor {name!r} has {raw.size} of its {count} values "
                                  "(the file changed after its header was read?).")
        if info.dtype == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            with np.errstate(over="ignore"):
                arr = raw.astype(np.float32)
        arr = arr.reshape(info.shape)
        if finite:
            bad = ~np.isfinite(arr)
            if bad.any():
                n_nan = int(np.isnan(arr).sum())
                raise CheckpointError(
                    f"{f}: tensor {name!r} ({info.dtype}) holds {int(bad.sum())} non-finite value(s) "
                    f"({n_nan} NaN, {int(bad.sum()) - n_nan} inf{' or beyond float32 range' if info.dtype == 'F64' else ''}); "
                    "the analysis would turn them into meaningless numbers.")
        return arr
