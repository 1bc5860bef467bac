r"""Spectral telemetry during training (issue 16; `experiments/training/training_telemetry.yaml`).

Twelve byte-level language models (4 layers, d_model 128, the standard library's Python sources):
W_down's init gain {0.25, 1, 4} x norm {pre-LN, none} x spectral guard {off, on (band 0.5-2 on
$\rho = \|W_\text{down}W_\text{up}\|_2/\|W_o\|_2$)}. Rows: pre-LN, no norm. Columns: $\rho_l$ of
every layer vs step (guard off); the least centred hidden-state effective rank over layers vs step
(the tokens' spread about their mean; solid: guard off, dashed: on); validation loss vs step.

The full figure reuses `runs/training_telemetry` when it holds the finished grid of the shipped file
(`meanfield train training_telemetry`), else trains it (23 minutes on 2 cores; an interrupted
grid resumes). `--quick`: the same grid at d_model 32, seq_len 32, 150 steps, in a temporary directory.

Key check: the guarded runs' $\rho$ stays in the band: max relative excursion outside [0.5, 2] over
layers and recorded steps >= 1, expected 0 (tolerance 1e-4: float32 spectral norms in the guard,
float64 in the telemetry).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..rule.band import BAND
from .style import FigureResult, save_figure

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "training" / "training_telemetry.yaml"
QUICK = {"steps": 150, "data.seq_len": 32, "data.batch_size": 8, "data.max_bytes": 400_000, "model.d_model": 32,
         "telemetry.every": 10, "telemetry.lyapunov_every": 50, "telemetry.lyapunov_tokens": 16,
         "telemetry.val_batches": 2, "telemetry.probe_sequences": 4, "checkpoint.every": 150,
         "optimizer.warmup_steps": 15}
BAND_RTOL = 1e-4  # the guard's float32 spectral norms vs the telemetry's float64 ones
COLLAPSE_ERANK = 2.0  # centred hidden-state erank below this at some layer: the tokens are nearly on a line


def _load_config(quick: bool):
    import yaml

    from ..sweep.plan import set_path
    from ..train.config import train_config_from_dict

    raw = yaml.safe_load(EXPERIMENT.read_text())
    if quick:
        for k, v in QUICK.items():
            set_path(raw, k, v)
    return train_config_from_dict(raw, str(EXPERIMENT))


def run_grid(cfg, quick: bool, run_root: Path | None = None) -> dict:
    """label -> telemetry dataset of every run of the grid `cfg` (trained, or read back when finished)."""
    from ..train.loop import train_grid

    if run_root is None:
        run_root = Path("runs") / cfg.name
    return train_grid(cfg, run_root, resume=True, quiet=quick)


def first_step(steps, mask) -> float:
    idx = np.flatnonzero(mask)
    return float(steps[idx[0]]) if idx.size else float("nan")


def first_exit(steps, outside) -> float:
    """The first step at which some layer is outside the band after a record with every layer inside
    (NaN if that never happens: a run that starts outside and never enters has no exit)."""
    inside_before = np.cumsum(~outside) > 0
    return first_step(steps, outside & np.concatenate([[False], inside_before[:-1]]))


def findings(results: dict, band=BAND) -> dict:
    """Per run: whether rho starts outside the band, when it first leaves it after being inside (W_o and
    value-aware), when the centred hidden erank first drops below COLLAPSE_ERANK, the least erank
    reached, the lead of the exit over the collapse, and the final validation loss."""
    out = {}
    for label, ds in results.items():
        steps = ds.step.values
        row = {}
        for att in ("wo", "value"):
            rho = ds[f"rho_{att}"].values
            # the guard puts rho on the band's edge in float32: 1e-4 relative counts as on it
            outside = np.any((rho < band[0] * (1 - BAND_RTOL)) | (rho > band[1] * (1 + BAND_RTOL)), axis=1)
            row[f"outside_at_init_{att}"] = bool(outside[0])
            row[f"rho_{att}_init"] = [float(rho[0].min()), float(rho[0].max())]
            row[f"first_exit_{att}"] = first_exit(steps, outside)
            row[f"fraction_outside_{att}"] = float(np.mean(outside[1:]))
            row[f"rho_{att}_final"] = rho[-1].tolist()
        er = ds["hidden_erank_centered"].values.min(axis=1)
        row["min_centered_erank"] = float(er.min())
        row["step_min_centered_erank"] = float(steps[int(np.argmin(er))])
        row["first_collapse"] = first_step(steps, er < COLLAPSE_ERANK)
        row["lead_wo"] = row["first_collapse"] - row["first_exit_wo"]
        lin = ds["linear_erank_wo"].values.min(axis=1)
        row["first_linear_collapse"] = first_step(steps, lin < COLLAPSE_ERANK)  # the rule's own proxy
        row["min_linear_erank"] = float(lin.min())
        ly = ds["lyapunov"].values[:, 0]
        row["lyapunov_1"] = {int(st): float(v) for st, v in zip(steps, ly) if np.isfinite(v)}
        row["centered_erank_init"] = float(er[0])
        row["centered_erank_final"] = float(er[-1])
        row["uncentered_erank_min"] = float(ds["hidden_erank"].values.min())
        row["val_loss_final"] = float(ds.val_loss.values[-1])
        row["lyapunov_max_final"] = float(np.nanmax(ds.lyapunov.values[-1])) if np.isfinite(ds.lyapunov.values[-1]).any() else float("nan")
        row["train_seconds"] = float(ds.train_seconds.values[-1])
        row["telemetry_seconds"] = float(ds.telemetry_seconds.values.sum())
        out[label] = row
    return out


def render(out_dir, quick: bool = False) -> FigureResult:
    import matplotlib.pyplot as plt

    name = "training_telemetry_quick" if quick else "training_telemetry"
    t0 = time.time()
    cfg = _load_config(quick)
    if quick:
        with tempfile.TemporaryDirectory() as tmp:
            results = run_grid(cfg, True, Path(tmp))
    else:
        results = run_grid(cfg, False)
    seconds = time.time() - t0
    band = cfg.guard.band
    table = findings(results, band)
    runs = dict(cfg.runs())  # label -> that run's config

    gains = sorted({runs[k].model.mlp_out_gain for k in results})
    norms = [n for n in ("pre_ln", "none") if any(runs[k].model.norm == n for k in results)]
    colors = dict(zip(gains, ("tab:blue", "tab:green", "tab:red", "tab:purple")))
    fig, axes = plt.subplots(len(norms), 3, figsize=(15, 4.0 * len(norms)), squeeze=False)
    excursion = 0.0
    for r, norm in enumerate(norms):
        ax, bx, cx = axes[r]
        ax.axhspan(*band, color="tab:green", alpha=0.12, lw=0)
        for label, ds in results.items():
            run = runs[label]
            if run.model.norm != norm:
                continue
            g, guard = run.model.mlp_out_gain, run.guard.enabled
            c = colors[g]
            steps = ds.step.values
            if guard:
                rho = ds.rho_wo.values[1:]
                excursion = max(excursion, float(np.max(np.maximum(band[0] - rho, 0) / band[0])),
                                float(np.max(np.maximum(rho - band[1], 0) / band[1])))
            else:
                for layer in range(ds.sizes["layer"]):
                    ax.plot(steps, ds.rho_wo.values[:, layer], color=c, lw=0.6 + 0.4 * layer,
                            label=f"gain {g:g}" if layer == ds.sizes["layer"] - 1 else None)
            er = ds.hidden_erank_centered.values.min(axis=1)
            bx.plot(steps, er, color=c, ls="--" if guard else "-", lw=1.4,
                    label=f"gain {g:g}" + (", guard" if guard else ""))
            cx.plot(steps, ds.val_loss.values, color=c, ls="--" if guard else "-", lw=1.4,
                    label=f"gain {g:g}" + (", guard" if guard else ""))
        title = {"pre_ln": "pre-LN", "none": "no norm"}[norm]
        ax.set_yscale("log")
        ax.set_title(f"{title}: " + r"$\rho_l$ per layer (guard off; thicker = deeper)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(r"$\|W_\mathrm{down}W_\mathrm{up}\|_2/\|W_o\|_2$")
        ax.legend(fontsize=7)
        bx.axhline(COLLAPSE_ERANK, color="crimson", ls=":", lw=1)
        bx.set_yscale("log")
        bx.set_title(f"{title}: least centred hidden-state erank over layers", fontsize=10)
        bx.set_xlabel("step")
        bx.set_ylabel(r"erank of $X - \bar X$ (probe text)")
        bx.legend(fontsize=7, ncol=2)
        cx.set_title(f"{title}: validation loss", fontsize=10)
        cx.set_xlabel("step")
        cx.set_ylabel("nats / byte")
        cx.set_ylim(None, min(6.0, cx.get_ylim()[1]))
        cx.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Training telemetry ({'quick' if quick else 'full'}: d_model {cfg.model.d_model}, "
                 f"{cfg.model.n_layers} layers, {cfg.steps} steps)", fontsize=11)
    fig.tight_layout()

    print(f"training_telemetry ({'quick' if quick else 'full'}; {len(results)} runs, {seconds:.0f} s)")
    print(f"{'run':<44} {'rho(0)':>11} {'exit':>5} {'exit(v)':>7} {'collapse':>8} {'min erank':>9} {'at':>4} "
          f"{'final':>6} {'proxy<2':>7} {'val loss':>8}")
    for label, row in table.items():
        r0 = row["rho_wo_init"]
        print(f"{label:<44} {r0[0]:5.2f}-{r0[1]:<5.2f} {row['first_exit_wo']:>5g} {row['first_exit_value']:>7g} "
              f"{row['first_collapse']:>8g} {row['min_centered_erank']:>9.2f} {row['step_min_centered_erank']:>4g} "
              f"{row['centered_erank_final']:>6.2f} {row['first_linear_collapse']:>7g} {row['val_loss_final']:>8.4f}")
    print(f"guarded runs: max relative excursion of rho outside the band {excursion:.2e}")
    data = {"findings": table, "settings": cfg.model_dump(mode="json"), "collapse_erank": COLLAPSE_ERANK,
            "seconds": seconds,
            "curves": {label: {"step": ds.step.values, "rho_wo": ds.rho_wo.values, "rho_value": ds.rho_value.values,
                               "hidden_erank_centered": ds.hidden_erank_centered.values,
                               "hidden_erank": ds.hidden_erank.values, "val_loss": ds.val_loss.values,
                               "lyapunov": ds.lyapunov.values}
                       for label, ds in results.items()}}
    return save_figure(fig, out_dir, name, data, key="max relative excursion of the guarded runs' rho outside the band",
                       value=excursion, expected=0.0, tolerance=BAND_RTOL, quick=quick)
