r"""What is measured while a model trains, every K steps, into `telemetry.nc` (dims step x layer).

- `train_loss` (mean over the updates since the last record), `val_loss` (fixed validation windows),
  `grad_norm` (global norm before clipping, mean since the last record), `learning_rate`.
- The 1:1 rule per layer, with exactly `meanfield weights`'s code (the model's tensors go through
  `meanfield.checkpoints.checkpoint_from_tensors` and `meanfield.rule.analyse`): `rho`,
  `mlp_norm`, `attn_norm`, and the rule's linear-propagation `linear_erank`, each for
  `attention` = wo ($W_o$) and value ($\sum_h W_o^h W_v^h$).
- `hidden_erank` (step, layer): the effective rank of the real residual stream after block l,
  $\exp(-\sum p \log p)$ of the eigenvalues of $X^\top X / n$ of one probe sequence (n tokens),
  averaged over the fixed probe sequences (the forward-pass counterpart of the rule's $C_l$);
  `hidden_erank_centered` the same of $X - \bar X$ (the tokens' spread about their mean: rank collapse
  in the sense of tokens becoming one point); `embedding_erank` before the first block.
- `lyapunov` (step, exponent): every `lyapunov_every` steps, the leading finite-time Lyapunov exponents
  (per layer) of the block-to-block map on one probe sequence's embedded tokens
  (`meanfield.lyapunov.decoder_lyapunov`); NaN at the other steps.
- `guard_scale` (step, layer): the factor the spectral guard last applied to W_down (1: none).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from flax import nnx

from ..checkpoints import checkpoint_from_tensors
from ..rule.checkpoint import analyse
from ..nets.decoder import second_moment_erank
from .lm import LanguageModel, cross_entropy, model_tensors

ATTENTIONS = ("wo", "value")


@nnx.jit
def validation_loss(model: LanguageModel, windows) -> jax.Array:
    """Mean cross-entropy over windows (V, B, T + 1), one batch at a time."""
    return jnp.mean(jax.lax.map(lambda w: cross_entropy(model, w), windows))


@nnx.jit
def hidden_eranks(model: LanguageModel, probe) -> tuple[jax.Array, jax.Array]:
    """(L + 1,) effective rank of each residual state X (n, d), of $X^\top X / n$ and of the token
    differences $X - \bar X$, per probe sequence then averaged; probe (P, T)."""
    states = model.hidden_states(probe)  # (L + 1, P, T, d)
    er = jax.vmap(jax.vmap(second_moment_erank))
    centered = states - jnp.mean(states, axis=-2, keepdims=True)
    return jnp.mean(er(states), axis=1), jnp.mean(er(centered), axis=1)


@nnx.jit
def _embedded(model: LanguageModel, tokens):
    return model.embed_tokens(tokens)


def rule_numbers(model: LanguageModel, config_json: dict) -> xr.Dataset:
    """`meanfield weights`'s dataset (attention x layer) for the model as it is now."""
    ckpt = checkpoint_from_tensors(model_tensors(model), config_json, source="<training>")
    return analyse(ckpt, ATTENTIONS)


def lyapunov_exponents(model: LanguageModel, tokens, k: int, seed: int = 0) -> np.ndarray:
    """(k,) leading exponents (1/layer) of the blocks' map on the embedded `tokens` (n,), from random
    initial tangents (`jax.random.key(seed)`, the same at every step)."""
    from ..lyapunov import decoder_lyapunov

    res = decoder_lyapunov(model.decoder, _embedded(model, tokens), k, key=jax.random.key(seed))
    return np.asarray(res.exponents, np.float64)


class Recorder:
    """Holds the records of one run and writes `telemetry.nc` (the whole dataset, atomically)."""

    def __init__(self, n_layers: int, k: int, attrs: dict):
        self.n_layers, self.k, self.attrs = n_layers, k, dict(attrs)
        self.rows: list[dict] = []

    def measure(self, step: int, model: LanguageModel, *, config_json, val_windows, probe, lyapunov_tokens,
                lyapunov: bool, train_loss: float, grad_norm: float, learning_rate: float,
                guard_scale: np.ndarray | None, train_seconds: float) -> dict:
        """One record: every quantity at `step` (after `step` updates). Returns it (and keeps it)."""
        t0 = time.perf_counter()
        rule = rule_numbers(model, config_json)
        er, erc = (np.asarray(a, np.float64) for a in hidden_eranks(model, probe))
        row = {
            "step": step, "train_loss": train_loss, "grad_norm": grad_norm, "learning_rate": learning_rate,
            "val_loss": float(validation_loss(model, val_windows)),
            "embedding_erank": float(er[0]), "hidden_erank": er[1:], "hidden_erank_centered": erc[1:],
            "train_seconds": train_seconds,
            "guard_scale": np.ones(self.n_layers) if guard_scale is None else np.asarray(guard_scale, np.float64),
            "lyapunov": (lyapunov_exponents(model, lyapunov_tokens, self.k) if lyapunov
                         else np.full(self.k, np.nan)),
        }
        for att in ATTENTIONS:
            s = rule.sel(attention=att)
            for var in ("rho", "attn_norm", "erank"):
                name = {"erank": "linear_erank"}.get(var, var)
                row[f"{name}_{att}"] = np.asarray(s[var].values, np.float64)
        row["mlp_norm"] = np.asarray(rule.sel(attention="wo")["mlp_norm"].values, np.float64)
        row["telemetry_seconds"] = time.perf_counter() - t0
        self.rows = [r for r in self.rows if r["step"] < step] + [row]
        return row

    def dataset(self) -> xr.Dataset:
        steps = np.array([r["step"] for r in self.rows], np.int64)
        stack = lambda k: np.stack([np.asarray(r[k], np.float64) for r in self.rows])  # noqa: E731
        meta = {
            "train_loss": ("training loss", "nats/byte", "mean cross-entropy of the updates since the last record"),
            "val_loss": ("validation loss", "nats/byte", "mean cross-entropy on the fixed validation windows"),
            "grad_norm": ("gradient norm", "1", "global L2 norm before clipping, mean since the last record"),
            "learning_rate": ("learning rate", "1", "the schedule's value at this step"),
            "embedding_erank": ("effective rank (embedding)", "1", "erank of the residual stream entering block 0"),
            "train_seconds": ("training time", "s", "wall time of the updates so far, telemetry excluded"),
            "telemetry_seconds": ("telemetry time", "s", "wall time of this record's measurements"),
            "hidden_erank": ("hidden-state effective rank", "1", "exp(-sum p log p), p = eigenvalues of X^T X / n of a "
                             "probe sequence's residual stream after this block, mean over probe sequences"),
            "hidden_erank_centered": ("hidden-state effective rank, centred", "1", "as hidden_erank for X - mean over "
                                      "the sequence's tokens: how far the tokens are from one point (rank collapse)"),
            "mlp_norm": (r"$\|W_\mathrm{mlp}\|_2$", "1", "spectral norm of W_down W_up (meanfield weights)"),
            "guard_scale": ("guard factor", "1", "the last factor the spectral guard applied to W_down (1: none)"),
            "lyapunov": ("finite-time Lyapunov exponent", "1/layer", "leading exponents of the blocks' map on the "
                         "embedded probe sequence (QR on jvp tangents); NaN where not measured"),
        }
        for att in ATTENTIONS:
            w = "W_o" if att == "wo" else "sum_h W_o^h W_v^h"
            meta[f"rho_{att}"] = (r"$\rho$ " + att, "1", f"||W_down W_up||_2 / ||{w}||_2 (meanfield weights --attention {att})")
            meta[f"attn_norm_{att}"] = (r"$\|W_\mathrm{attn}\|_2$ " + att, "1", f"spectral norm of {w}")
            meta[f"linear_erank_{att}"] = ("rule's linear-propagation erank " + att, "1",
                                           "C_{l+1} = A C A^T / ||.||, A = I + W_mlp + W_attn (meanfield weights' erank)")
        data = {}
        for k, (long_name, units, desc) in meta.items():
            arr = stack(k)
            dims = ("step",) if arr.ndim == 1 else ("step", "exponent" if k == "lyapunov" else "layer")
            data[k] = (dims, arr, {"long_name": long_name, "units": units, "description": desc})
        ds = xr.Dataset(data, coords={"step": steps, "layer": np.arange(self.n_layers), "exponent": np.arange(self.k)})
        ds["step"].attrs["description"] = "optimiser updates done (0: the initial weights)"
        ds.attrs.update(self.attrs)
        return ds

    def load(self, ds: xr.Dataset, upto: int) -> None:
        """Take the records of an earlier telemetry.nc up to step `upto` (resume)."""
        self.rows = []
        if "resumed_from" in ds.attrs:
            self.attrs["resumed_from"] = ds.attrs["resumed_from"]
        for i, s in enumerate(ds["step"].values):
            if s > upto:
                continue
            row = {"step": int(s)}
            for k, v in ds.data_vars.items():
                val = v.values[i]
                row[k] = float(val) if v.ndim == 1 else np.asarray(val)
            self.rows.append(row)
