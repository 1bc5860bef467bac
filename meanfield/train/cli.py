"""``meanfield train FILE.yaml``: train a byte-level language model (or a grid of them) with telemetry.

    meanfield train FILE [--out DIR] [--resume] [--overwrite] [--quiet]

Writes into ``--out`` (default runs/<name>; a grid: one directory per combination) train.json,
config.yaml, telemetry.nc (dims step x layer), telemetry.png and checkpoints/step_NNNNNNN/ (safetensors
that ``meanfield weights`` reads). Exit 2 with one line naming the file and field for a bad training
file or output directory (nothing is written); 130 after Ctrl-C (rerun with --resume: it continues from
the newest checkpoint with the same data order and numbers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a small byte-level language model with spectral telemetry",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="training YAML, or the name of a shipped one (experiments/training/NAME.yaml)")
    p.add_argument("--out", help="output directory (default: runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def summary_line(label: str, ds) -> str:
    """One line per run: final losses, rho range over layers, least centred hidden erank, time spent."""
    last = ds.isel(step=-1)
    rho = last["rho_wo"].values
    er = ds["hidden_erank_centered"].values.min(axis=1)
    return (f"{label or ds.attrs.get('name', '')}: step {int(last.step)}, train {float(last.train_loss):.3f}, "
            f"val {float(last.val_loss):.3f} nats/byte; rho(W_o) {np.nanmin(rho):.3g}-{np.nanmax(rho):.3g}; "
            f"least centred hidden erank {np.nanmin(er):.3g} at step {int(ds.step.values[np.nanargmin(er)])} "
            f"(final {er[-1]:.3g}); "
            f"telemetry {ds['telemetry_seconds'].values.sum():.1f} s of {float(last.train_seconds):.1f} s training")


TRAINING_DIRS = (Path.cwd() / "experiments" / "training",
                 Path(__file__).resolve().parents[2] / "experiments" / "training")


def run(args) -> int:
    from ..sweep.plan import find_experiment
    from .config import load_train_config
    from .loop import train_grid

    file = find_experiment(args.file, TRAINING_DIRS)  # `training_telemetry` -> experiments/training/...yaml
    cfg = load_train_config(file)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    results = train_grid(cfg, out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
                         base_dir=Path(file).parent)
    for label, ds in results.items():
        print(summary_line(label, ds))
        print(f"  {out / label / 'telemetry.nc'}, {out / label / 'telemetry.png'}")
    return 0
