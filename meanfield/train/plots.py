"""One figure per training run: rho per layer vs step (with the band), hidden-state effective rank per
layer vs step next to the rule's linear-propagation erank, and the losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from ..rule.band import BAND


def plot_telemetry(ds: xr.Dataset, path: Path, band=BAND, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = ds["step"].values
    L = ds.sizes["layer"]
    colors = plt.cm.viridis(np.linspace(0.05, 0.9, L))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.axhspan(*band, color="tab:green", alpha=0.12, lw=0, label=f"band {band[0]:g}-{band[1]:g}")
    for layer in range(L):
        ax.plot(steps, ds["rho_wo"].values[:, layer], color=colors[layer], lw=1.6, label=f"layer {layer}")
        ax.plot(steps, ds["rho_value"].values[:, layer], color=colors[layer], lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(r"$\rho_l$ (solid: $W_o$; dashed: $\sum_h W_o^h W_v^h$)")
    ax.legend(fontsize=7, ncol=2)
    bx = axes[1]
    for layer in range(L):
        bx.plot(steps, ds["hidden_erank"].values[:, layer], color=colors[layer], lw=1.6)
        bx.plot(steps, ds["linear_erank_wo"].values[:, layer], color=colors[layer], lw=1, ls=":")
    bx.plot(steps, ds["embedding_erank"].values, color="grey", lw=1, label="embedding")
    bx.set_yscale("log")
    bx.set_xlabel("step")
    bx.set_ylabel("effective rank (solid: hidden states; dotted: rule's proxy)")
    bx.legend(fontsize=7)
    cx = axes[2]
    cx.plot(steps[1:], ds["train_loss"].values[1:], label="train", color="tab:blue")
    cx.plot(steps, ds["val_loss"].values, label="validation", color="tab:orange")
    cx.set_xlabel("step")
    cx.set_ylabel("cross-entropy (nats/byte)")
    cx.legend(fontsize=8)
    fig.suptitle(title or ds.attrs.get("name", ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
