"""Training checkpoints: `checkpoints/step_NNNNNNN/` with model.safetensors + config.json (what
`meanfield weights` and `Decoder.from_checkpoint` read), optimizer.safetensors and state.json.

A checkpoint directory is written under a temporary name and renamed into place, so it is whole or
absent. On resume the newest one that reads back is used; a damaged one is moved to
`checkpoints/damaged/` (kept as evidence) and the next older one is tried.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

STEP_PREFIX = "step_"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:07d}"


def _flat(tree) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    # np.require keeps 0-d leaves 0-d (np.ascontiguousarray would make them (1,))
    return {jax.tree_util.keystr(path): np.require(np.asarray(leaf), requirements="C") for path, leaf in leaves}


def _unflat(template, arrays: dict[str, np.ndarray], what: str):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if name not in arrays:
            raise Incompatible(f"{what}: the optimiser state has no tensor {name!r} (written by another version "
                               "of meanfield, optax or flax?)")
        a = arrays[name]
        if a.shape != np.shape(leaf) or a.dtype != np.asarray(leaf).dtype:
            raise Incompatible(f"{what}: tensor {name!r} is {a.dtype}{list(a.shape)}; this model's optimiser "
                               f"needs {np.asarray(leaf).dtype}{list(np.shape(leaf))}")
        out.append(a)
    if len(arrays) != len(out):
        raise Incompatible(f"{what}: {len(arrays) - len(out)} tensors this model's optimiser does not have")
    return jax.tree_util.tree_unflatten(treedef, out)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save(run_dir: Path, step: int, tensors: dict[str, np.ndarray], config_json: dict, opt_state, state: dict,
         keep: int) -> Path:
    """Write checkpoint `step` whole (temporary directory, fsync, rename), then keep only the newest
    `keep` (0: all) and drop the optimiser state of all but the newest two (the second is the fallback
    when the newest turns out damaged)."""
    final = step_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "np", "step": str(step)})
        save_file(_flat(opt_state), str(tmp / "optimizer.safetensors"), metadata={"step": str(step)})
        (tmp / "config.json").write_text(json.dumps(config_json, indent=1))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # a re-run of the same step (resume after a kill right after it was written)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = complete(run_dir)
    if keep:
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        done = done[-keep:]
    for old in done[:-2]:
        (old / "optimizer.safetensors").unlink(missing_ok=True)
    return final


def complete(run_dir: Path) -> list[Path]:
    """Checkpoint directories in step order (written whole: they hold state.json)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and (p / "state.json").is_file())


def load_latest(run_dir: Path, params_template, opt_template, digest: str):
    """(step, params, opt_state, state) of the newest readable checkpoint with the optimiser state, or
    None. A checkpoint that does not read back is moved to checkpoints/damaged/ with a line on stderr;
    one of another config (digest), or whose optimiser state does not fit (another library version), is
    refused (ValueError)."""
    for d in reversed(complete(run_dir)):
        if not (d / "optimizer.safetensors").is_file():
            continue
        try:
            state = json.loads((d / "state.json").read_text())
            if state.get("config_digest") != digest:
                raise _OtherConfig(f"{d}: written by another configuration (digest {state.get('config_digest')}, "
                                   f"this one is {digest})")
            params = load_file(str(d / "model.safetensors"))
            opt = _unflat(opt_template, load_file(str(d / "optimizer.safetensors")), f"{d}/optimizer.safetensors")
            return int(state["step"]), params, opt, state
        except (_OtherConfig, Incompatible) as exc:
            raise ValueError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any damage: set it aside and try the previous one
            bad = d.parent / "damaged"
            bad.mkdir(exist_ok=True)
            target = bad / d.name
            shutil.rmtree(target, ignore_errors=True)
            os.replace(d, target)
            print(f"warning: {d} is damaged ({type(exc).__name__}: {str(exc)[:120]}); moved to {target}",
                  file=sys.stderr)
    return None


class _OtherConfig(Exception):
    pass


class Incompatible(ValueError):
    """A checkpoint that reads back whole but does not fit this model or optimiser: refused, not set aside
    (it is not damaged; resuming from an older one or from scratch would silently lose the run)."""
