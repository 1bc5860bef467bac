"""``meanfield weights PATH``: the 1:1 rule's per-layer numbers for a local checkpoint (no network).

    meanfield weights PATH [--attention wo|value|both] [--fold-gains] [--out DIR] [--float64]

Per layer: ||W_mlp||_2, ||W_attn||_2, rho = ||W_mlp||_2/||W_attn||_2 and the propagated effective rank and
condition number of `meanfield.rule.propagate`. Default precision is the rule's per-model script (each
step in float64, C stored in float32); ``--float64`` keeps C in float64. Writes weights.csv, weights.nc
(xarray, dims attention x layer) and weights.png into ``--out`` (default runs/weights/<name>).
Exit 0 on success, 2 for a bad path, checkpoint or option: one line naming the file and the fault, never a
traceback. Refused: damaged or truncated safetensors files (the header is checked against the file size
before anything is read), a sharded index naming a missing shard, config.json that is not a JSON object or
whose fields contradict the tensors, incomplete layers, weights holding NaN / inf, and a model whose d x d
matrices would not fit in memory. All-zero W_mlp / W_attn (rho undefined) are analysed with a warning.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import sys

import numpy as np

BAND = (0.5, 2.0)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``weights`` subcommand to an argparse ``subparsers`` object; sets ``func=run``."""
    p = subparsers.add_parser("weights", help="the 1:1 rule's per-layer rho, erank and condition number of a local checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="checkpoint directory (config.json + model.safetensors or a sharded index) or a .safetensors file")
    p.add_argument("--attention", choices=("wo", "value", "both"), default="wo",
                   help="W_attn: wo = W_o (the rule's; W_o W_o^T if not square), value = sum_h W_o^h W_v^h (default: wo)")
    p.add_argument("--fold-gains", action="store_true", help="fold the norm gains into W_up / W_v (and Gemma's post-norms into W_down / W_o)")
    p.add_argument("--out", help="output directory (default: runs/weights/<name>)")
    p.add_argument("--float64", action="store_true", help="store C in float64 too (default: float64 steps, float32 storage, as the rule)")
    p.set_defaults(func=run)
    return p


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def analyse(ckpt, attentions, *, fold_gains=False, float64=False):
    """xarray Dataset (attention x layer) of norms, rho, erank and condition number."""
    import xarray as xr

    from .. import rule
    from .matrices import ATTENTION_MATRICES, layer_matrices

    out = {k: [] for k in ("mlp_norm", "attn_norm", "rho", "erank", "cond", "lam_min")}
    for att in attentions:
        W_mlp, W_attn = layer_matrices(ckpt, att, fold_gains=fold_gains, dtype=np.float64)
        mn, an = rule.spectral_norms(W_mlp), rule.spectral_norms(W_attn)
        traj = rule.propagate(W_mlp, W_attn, dtype="float64", store_dtype="float64" if float64 else "float32")
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero norm: reported as such by `run`
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


def _memory_estimate(ckpt) -> int:
    """Peak bytes of `analyse`, roughly: W_mlp, W_attn, A and its copies, (L, d, d) float64 each."""
    return 6 * ckpt.num_layers * ckpt.d_model ** 2 * 8


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX: no check
        return 0


def _nonfinite(ds) -> str:
    """'erank at layers 3, 4; ...' for the quantities that are NaN or inf (rho of a zero norm excepted)."""
    out = []
    for k in ("mlp_norm", "attn_norm", "erank", "cond", "lam_min"):
        bad = np.flatnonzero(~np.isfinite(ds[k].values).all(axis=0))
        if bad.size:
            out.append(f"{k} at layer(s) {', '.join(map(str, bad[:8]))}{' ...' if bad.size > 8 else ''}")
    return "; ".join(out)


def summary_lines(ds) -> list[str]:
    lines = []
    for att in ds.attention.values:
        s = ds.sel(attention=att)
        rho, er = s.rho.values, s.erank.values
        inband = np.mean((rho >= BAND[0]) & (rho <= BAND[1]))
        low = np.flatnonzero(er < 10)
        first = f"first layer with erank < 10: {int(low[0])}" if low.size else "erank >= 10 at every layer"
        verdict = "stable" if BAND[0] <= rho.mean() <= BAND[1] else "outside the band"
        lines.append(f"[{att}] mean rho {rho.mean():.3f} (the rule's model rho; {verdict} by the rule's 0.5-2 band), "
                     f"{100 * inband:.0f}% of layers in the band; min erank {er.min():.2f} at layer {int(er.argmin())}; "
                     f"{first}; max condition number {s.cond.values.max():.3g}")
    return lines


def print_table(ds) -> None:
    atts = list(ds.attention.values)
    head = f"{'layer':>5} {'||W_mlp||':>10}"
    for a in atts:
        head += f" | {a + ': ||W_attn||':>16} {'rho':>8} {'erank':>8} {'cond':>9}"
    print(head)
    print("-" * len(head))
    for layer in ds.layer.values:
        row = f"{layer:5d} {ds.mlp_norm.values[0, layer]:10.4g}"
        for j in range(len(atts)):
            row += (f" | {ds.attn_norm.values[j, layer]:16.4g} {ds.rho.values[j, layer]:8.3f} "
                    f"{ds.erank.values[j, layer]:8.2f} {ds.cond.values[j, layer]:9.2e}")
        print(row)


def write_csv(ds, path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["attention", "layer", "mlp_norm", "attn_norm", "rho", "erank", "cond", "lam_min"])
        for j, att in enumerate(ds.attention.values):
            for layer in ds.layer.values:
                w.writerow([att, int(layer)] + [f"{ds[k].values[j, layer]:.8g}" for k in
                                                ("mlp_norm", "attn_norm", "rho", "erank", "cond", "lam_min")])


def plot(ds, path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    ax.axhspan(*BAND, color="tab:green", alpha=0.15, lw=0, label="rule's band 0.5-2")
    for att in ds.attention.values:
        s = ds.sel(attention=att)
        ax.plot(s.layer, s.rho, "o-", ms=3, label=f"{att}: " + ((r"$W_o W_o^\top$" if ds.attrs["wo_squared"] else "$W_o$") if att == "wo"
                                                  else r"$\sum_h W_o^h W_v^h$"))
        bx.plot(s.layer, s.erank, "o-", ms=3, label=att)
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(r"$\rho = \|W_\mathrm{mlp}\|_2/\|W_\mathrm{attn}\|_2$")
    ax.legend(fontsize=8)
    bx.axhline(10, color="crimson", ls=":", lw=1.2, label="erank 10")
    bx.set_yscale("log")
    bx.set_xlabel("layer")
    bx.set_ylabel(r"effective rank of $C_{l+1}$")
    bx.legend(fontsize=8)
    fig.suptitle(f"{ds.attrs['arch']}: {pathlib.Path(ds.attrs['source']).name}"
                 f"{' (gains folded)' if ds.attrs['fold_gains'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    """Execute ``meanfield weights``; returns the exit status (0 ok, 2 bad input)."""
    from . import CheckpointError, load_checkpoint
    from .matrices import ATTENTION_MATRICES

    path = pathlib.Path(args.path)
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as exc:
        return _error(str(exc))
    except (OSError, ValueError, TypeError, IndexError, KeyError, MemoryError) as exc:
        # the readers check the files (CheckpointError); this only keeps a case they miss from a traceback
        return _error(f"{path}: cannot read this checkpoint ({type(exc).__name__}: {exc}).")
    attentions = ("wo", "value") if args.attention == "both" else (args.attention,)
    out = pathlib.Path(args.out) if args.out else pathlib.Path("runs") / "weights" / (path.stem if path.is_file() else path.resolve().name)
    if out.exists() and not out.is_dir():
        return _error(f"--out {out}: exists and is not a directory")
    need, have = _memory_estimate(ckpt), _physical_memory()
    if have and need > have:
        return _error(f"{path}: d_model {ckpt.d_model} x {ckpt.num_layers} layers needs about {need / 2 ** 30:.3g} GiB for "
                      f"the per-layer d x d matrices of the rule; this machine has {have / 2 ** 30:.3g} GiB.")
    try:
        ds = analyse(ckpt, attentions, fold_gains=args.fold_gains, float64=args.float64)
    except (CheckpointError, ValueError) as exc:
        return _error(f"{path}: {exc}")
    except MemoryError:
        return _error(f"{path}: out of memory (d_model {ckpt.d_model} x {ckpt.num_layers} layers: about "
                      f"{need / 2 ** 30:.3g} GiB).")
    bad = _nonfinite(ds)
    if bad:
        return _error(f"{path}: the analysis gave non-finite values ({bad}); the weights are finite but too large or "
                      "degenerate for the rule, so no numbers are reported.")
    print(f"{path}: {ckpt.arch}, {ckpt.num_layers} layers, d_model {ckpt.d_model}, heads {ckpt.num_heads} "
          f"(kv {ckpt.num_kv_heads}, head_dim {ckpt.head_dim}), stored {ckpt.dtype}; {ds.attrs['precision']}")
    for a in attentions:
        print(f"  {a}: {ATTENTION_MATRICES[a]}")
    if "wo" in attentions and ds.attrs["wo_squared"]:
        print(f"  here W_o is {ckpt.d_model} x {ckpt.layers[0].w_o.shape[1]} (not square): wo uses W_o W_o^T; its rho "
              "is not comparable with square-W_o models")
    if args.fold_gains:
        print("  norm gains folded into W_up / W_v (Gemma post-norms into W_down / W_o)")
    for att in attentions:
        s = ds.sel(attention=att)
        zero = [int(i) for i in s.layer.values if not (s.mlp_norm.values[i] > 0 and s.attn_norm.values[i] > 0)]
        if zero:
            print(f"  warning [{att}]: ||W_mlp|| or ||W_attn|| is exactly 0 at layer(s) {', '.join(map(str, zero))}: rho is "
                  "0, inf or nan (undefined) there (all-zero weights: an untrained or damaged checkpoint?)")
    print_table(ds)
    for line in summary_lines(ds):
        print(line)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(ds, out / "weights.csv")
        ds.to_netcdf(out / "weights.nc", engine="h5netcdf")
        plot(ds, out / "weights.png")
    except OSError as exc:
        return _error(f"--out {out}: cannot write ({exc.strerror or exc}).")
    for f in ("weights.csv", "weights.nc", "weights.png"):
        print(f"wrote {out / f}")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (``python -m meanfield.checkpoints.cli PATH ...``) until `meanfield weights` is wired."""
    parser = argparse.ArgumentParser(prog="meanfield")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["weights", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
