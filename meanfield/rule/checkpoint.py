"""The 1:1 rule on a real checkpoint: its per-layer norms, rho, effective rank and condition number as an
xarray Dataset (`analyse`). Used by ``meanfield weights PATH`` (`meanfield.checkpoints.cli`) and the training
telemetry (`meanfield.train.telemetry`).
"""

from __future__ import annotations

import numpy as np

from ..checkpoints.matrices import ATTENTION_MATRICES, layer_matrices
from .propagation import propagate, spectral_norms


def analyse(ckpt, attentions, *, fold_gains=False, float64=False):
    r"""The 1:1 rule on a checkpoint: per layer, $\lVert W_\text{mlp}\rVert_2$, $\lVert W_\text{attn}\rVert_2$,
    $\rho$ and the propagated effective rank, condition number and smallest eigenvalue of `propagate`.

    Arguments: `ckpt` a `meanfield.checkpoints.Checkpoint`; `attentions` names from `ATTENTION_MATRICES`
    ("wo", "value"); `fold_gains` folds the norm gains (`layer_matrices`); `float64` stores C in float64
    (default: float64 steps, C stored in float32, the rule's per-model script).

    Returns an xarray Dataset with dims attention x layer; every variable has `long_name` and `units`."""
    import xarray as xr

    out = {k: [] for k in ("mlp_norm", "attn_norm", "rho", "erank", "cond", "lam_min")}
    for att in attentions:
        W_mlp, W_attn = layer_matrices(ckpt, att, fold_gains=fold_gains, dtype=np.float64)
        mn, an = spectral_norms(W_mlp), spectral_norms(W_attn)
        traj = propagate(W_mlp, W_attn, dtype="float64", store_dtype="float64" if float64 else "float32")
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero norm: reported as such by the CLI (`meanfield.checkpoints.cli`)
            rho = mn / an
        for k, v in (("mlp_norm", mn), ("attn_norm", an), ("rho", rho), ("erank", traj.erank),
                     ("cond", traj.cond), ("lam_min", traj.lam_min)):
            out[k].append(np.asarray(v, np.float64))
        del W_mlp, W_attn
    meta = {
        "mlp_norm": (r"$\|W_\mathrm{mlp}\|_2$", "1", "spectral norm of W_down W_up (gate dropped)"),
        "attn_norm": (r"$\|W_\mathrm{attn}\|_2$", "1", "spectral norm of W_attn (see attention coordinate)"),
        "rho": (r"$\rho$", "1", "||W_mlp||_2 / ||W_attn||_2"),
        "erank": ("effective rank", "1", "exp(-sum p log p) of C_{l+1}, p = eigenvalues / their sum"),
        "cond": ("condition number", "1", "lambda_1 / smallest eigenvalue above eps max(1, lambda_1) d (the rule's floor)"),
        "lam_min": (r"$\lambda_\mathrm{min}$", "1", "smallest eigenvalue of the normalised C_{l+1} (no floor)"),
    }
    ds = xr.Dataset(
        {k: (("attention", "layer"), np.stack(v), {"long_name": meta[k][0], "units": meta[k][1], "description": meta[k][2]})
         for k, v in out.items()},
        coords={"attention": list(attentions), "layer": np.arange(ckpt.num_layers)})
    ds["attention"].attrs["description"] = "; ".join(f"{a}: {ATTENTION_MATRICES[a]}" for a in attentions)
    ds.attrs.update(source=ckpt.source, arch=ckpt.arch, d_model=ckpt.d_model, num_layers=ckpt.num_layers,
                    num_heads=ckpt.num_heads, num_kv_heads=ckpt.num_kv_heads, head_dim=ckpt.head_dim,
                    stored_dtype=ckpt.dtype, fold_gains=int(fold_gains),
                    wo_squared=int(ckpt.layers[0].w_o.shape[1] != ckpt.d_model),
                    precision="float64 steps, C stored in float64" if float64 else
                    "float64 steps, C stored in float32 (the rule's per-model script)",
                    method="C_0 = I, A_l = I + W_mlp + W_attn, C_{l+1} = A C A^T / ||A C A^T||_2 (meanfield.rule.propagate)")
    return ds
