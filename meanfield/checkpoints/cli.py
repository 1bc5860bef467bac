"""``meanfield weights PATH``: the 1:1 rule's per-layer numbers for a local checkpoint (no network).

    meanfield weights PATH [--attention wo|value|both] [--fold-gains] [--out DIR] [--float64]
                           [--lyapunov [--lyapunov-k K] [--probe-tokens N] [--seed S]
                                       [--probe FILE.npy | --probe-text FILE]]

Per layer: ||W_mlp||_2, ||W_attn||_2, rho = ||W_mlp||_2/||W_attn||_2 and the propagated effective rank and
condition number of `meanfield.rule.propagate` (`meanfield.rule.analyse`). Default precision is the rule's per-model script (each
step in float64, C stored in float32); ``--float64`` keeps C in float64. Writes weights.csv, weights.nc
(xarray, dims attention x layer) and weights.png into ``--out`` (default runs/weights/<name>).
Exit 0 on success, 2 for a bad path, checkpoint or option: one line naming the file and the fault, never a
traceback. Refused: damaged or truncated safetensors files (the header is checked against the file size
before anything is read), a sharded index naming a missing shard, config.json that is not a JSON object or
whose fields contradict the tensors, incomplete layers, weights holding NaN / inf, and a model whose d x d
matrices would not fit in memory. All-zero W_mlp / W_attn (rho undefined) are analysed with a warning.

``--lyapunov`` adds the K (default 8) leading finite-time Lyapunov exponents of the block-to-block map of the
actual forward pass (`meanfield.nets.Decoder.from_checkpoint`, `meanfield.lyapunov.decoder_lyapunov`), in units
of 1/layer, on probe tokens: ``--probe-tokens N`` (default 16) N(0, I) vectors of dimension d_model drawn with
``--seed`` (default 0), or ``--probe FILE.npy`` (a real array of shape (n, d_model)), or ``--probe-text FILE``:
the file's bytes (all of them, or the first N with ``--probe-tokens N``) embedded by the checkpoint itself, its
byte embedding ``embed.weight`` plus its learned positions ``pos.weight`` (rotary positions: nothing added, they
act inside attention), as `meanfield.train.LanguageModel.embed_tokens` does. Only for checkpoints of `meanfield
train` (model_type meanfield, 256 bytes); at most max_position_embeddings bytes. On the bytes the training
telemetry probes (the first ``telemetry.lyapunov_tokens`` bytes of the corpus's validation split), with its
``--lyapunov-k`` and seed 0, the exponents are its ``lyapunov`` at that step. Positive: nearby token
configurations separate through the network; negative: they merge. Added to weights.nc (``lyapunov_exponent``,
``lyapunov_drift`` over ``exponent``, ``lyapunov_running`` over layer x exponent) and written to lyapunov.csv.
float32 unless ``--float64``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import pathlib
import sys

import numpy as np

from ..rule.band import BAND
from ..rule.checkpoint import analyse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``weights`` subcommand to an argparse ``subparsers`` object; sets ``func=run``."""
    p = subparsers.add_parser("weights", help="the 1:1 rule's per-layer rho, erank and condition number of a local checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="checkpoint directory (config.json + model.safetensors or a sharded index) or a .safetensors file")
    p.add_argument("--attention", choices=("wo", "value", "both"), default="wo",
                   help="W_attn: wo = W_o (the rule's; W_o W_o^T if not square), value = sum_h W_o^h W_v^h (default: wo)")
    p.add_argument("--fold-gains", action="store_true", help="fold the norm gains into W_up / W_v (and Gemma's post-norms into W_down / W_o)")
    p.add_argument("--out", help="output directory (default: runs/weights/<name>)")
    p.add_argument("--float64", action="store_true", help="store C in float64 too (default: float64 steps, float32 storage, as the rule); "
                   "--lyapunov in float64 too (default float32)")
    p.add_argument("--lyapunov", action="store_true",
                   help="also the finite-time Lyapunov exponents (1/layer) of the forward pass's block-to-block map on probe tokens")
    p.add_argument("--lyapunov-k", type=int, metavar="K", help="number of exponents (default 8; at most n x d_model)")
    p.add_argument("--probe-tokens", type=int, metavar="N",
                   help="--lyapunov on N random N(0, I) tokens (default 16); with --probe-text: the first N bytes")
    p.add_argument("--seed", type=int, help="seed of the random probe tokens and initial tangents (default 0)")
    p.add_argument("--probe", metavar="FILE.npy", help="--lyapunov on these tokens instead: a real .npy array of shape (n, d_model)")
    p.add_argument("--probe-text", metavar="FILE",
                   help="--lyapunov on this file's bytes (default all) embedded by the checkpoint's own byte embedding and "
                        "learned positions (meanfield train's checkpoints only)")
    p.set_defaults(func=run)
    return p


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _read_probe(path, d: int) -> np.ndarray:
    """Tokens (n, d) from a .npy file, any n >= 1, with `read_tokens_file`'s checks (no pickles, a real
    dtype, a size limit, finite values). ValueError naming the file."""
    from ..sweep.store import read_tokens_file

    return read_tokens_file(pathlib.Path(path), (None, d), "(n, d_model)")


def byte_embedding(ckpt) -> tuple[np.ndarray, np.ndarray | None]:
    """(embed.weight (256, d), pos.weight (max_len, d) or None for rotary positions) of a checkpoint that
    `meanfield train` wrote, read with the loader's `TensorStore`; ValueError naming ``--probe-text`` for any
    other checkpoint or tensors that do not fit it."""
    from ._io import TensorStore, resolve
    from ._types import CheckpointError

    where = f"--probe-text: {ckpt.source}"
    if ckpt.arch != "meanfield":
        raise ValueError(f"{where} is a {ckpt.arch} checkpoint, which has no byte embedding: its tokens need its own "
                         "tokenizer (e.g. GPT-2's BPE), which meanfield does not have. --probe-text needs a checkpoint "
                         "of `meanfield train` (model_type meanfield, 256 bytes); embed the tokens yourself and use "
                         "--probe FILE.npy")
    cfg, d = ckpt.config, ckpt.d_model
    if cfg.get("vocab_size", 256) != 256:
        raise ValueError(f"{where}: config.json vocab_size = {cfg.get('vocab_size')!r}; a byte embedding has 256 rows")
    try:
        store = TensorStore(resolve(ckpt.source)[0])
        if "embed.weight" not in store:
            raise ValueError(f"{where}: no tensor 'embed.weight' (the byte embedding) in this checkpoint")
        if store.shape("embed.weight") != (256, d):
            raise ValueError(f"{where}: tensor 'embed.weight' has shape {store.shape('embed.weight')}; a byte "
                             f"embedding is (256, d_model) = (256, {d})")
        embed = store.get("embed.weight", finite=True)
        if "pos.weight" not in store:
            if cfg.get("positions", "rope") != "rope":
                raise ValueError(f"{where}: config.json positions = {cfg.get('positions')!r} but there is no tensor "
                                 "'pos.weight' (the learned positions)")
            return embed, None
        shp = store.shape("pos.weight")
        if len(shp) != 2 or shp[1] != d or shp[0] < 1:
            raise ValueError(f"{where}: tensor 'pos.weight' has shape {shp}; learned positions are "
                             f"(max_position_embeddings, d_model) with d_model = {d}")
        return embed, store.get("pos.weight", finite=True)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ValueError(f"--probe-text: {exc}") from None


def text_probe(args, ckpt) -> tuple[np.ndarray, str]:
    """``--probe-text FILE``: the file's first N bytes (``--probe-tokens N``; default all) embedded as
    `meanfield.train.LanguageModel.embed_tokens` does, E[b_i] + P_i (rotary positions: E[b_i]), (n, d);
    float32 (the training's own sum) unless ``--float64``. ValueError naming the option."""
    embed, pos = byte_embedding(ckpt)
    # learned positions: one row per position; rotary: the length the model was built for (n^2 attention)
    limit = pos.shape[0] if pos is not None else ckpt.config.get("max_position_embeddings")
    limit = int(limit) if isinstance(limit, int) and limit >= 1 else None
    kind = "learned positions" if pos is not None else "positions"
    n = args.probe_tokens
    if n is not None and n < 1:
        raise ValueError(f"--probe-tokens: must be >= 1; got {n}")
    if n is not None and limit is not None and n > limit:
        raise ValueError(f"--probe-tokens: {n} bytes, but the checkpoint has {limit} {kind} "
                         f"(max_position_embeddings); give at most {limit}")
    try:
        with open(args.probe_text, "rb") as f:
            data = f.read(n if n is not None else -1 if limit is None else limit + 1)
    except OSError as exc:
        raise ValueError(f"--probe-text {args.probe_text}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise ValueError(f"--probe-text {args.probe_text}: the file is empty; it needs at least one byte")
    if n is not None and len(data) < n:
        raise ValueError(f"--probe-tokens: {n} bytes, but --probe-text {args.probe_text} has only {len(data)}")
    if limit is not None and len(data) > limit:
        raise ValueError(f"--probe-text {args.probe_text}: longer than the checkpoint's {limit} {kind} "
                         f"(max_position_embeddings); give --probe-tokens N (at most {limit}) to use its first N bytes")
    dt = np.float64 if args.float64 else np.float32
    b = np.frombuffer(data, np.uint8)
    X = embed.astype(dt)[b]
    if pos is not None:
        X = X + pos.astype(dt)[: len(b)]
    how = "byte embedding + learned positions" if pos is not None else "byte embedding; rotary positions inside attention"
    return X, f"{len(b)} bytes of {args.probe_text} embedded by the checkpoint ({how})"


def probe(args, d: int, ckpt=None) -> tuple[np.ndarray, str]:
    """The probe tokens of ``--lyapunov`` (n, d) and a line saying what they are; ValueError naming the option.
    ``ckpt``: the loaded checkpoint, whose byte embedding ``--probe-text`` uses."""
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed: must be >= 0; got {args.seed}")
    if args.probe_text is not None:
        if args.probe is not None:
            raise ValueError("--probe-text: give either --probe-text or --probe, not both")
        return text_probe(args, ckpt)
    if args.probe is not None:
        if args.probe_tokens is not None:
            raise ValueError("--probe: give either --probe or --probe-tokens, not both")
        try:
            X = _read_probe(args.probe, d)
        except ValueError as exc:
            raise ValueError(f"--probe {exc}") from None
        return X, f"{X.shape[0]} tokens from {args.probe}"
    n = 16 if args.probe_tokens is None else args.probe_tokens
    seed = 0 if args.seed is None else args.seed
    if n < 1:
        raise ValueError(f"--probe-tokens: must be >= 1; got {n}")
    X = np.random.default_rng(seed).standard_normal((n, d))
    return X, f"{n} N(0, I) tokens (numpy default_rng({seed}).standard_normal((n, d_model)))"


def lyapunov(ckpt, X, k: int, *, float64: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """`decoder_lyapunov` of the checkpoint's forward pass on tokens X: exponents, drift (k,), running (L, k), finite.
    The initial tangents are random (`jax.random.key(seed)`): the first k coordinate directions would all
    belong to token 0, and a few layers would not turn them towards the leading directions."""
    import jax

    from ..lyapunov import decoder_lyapunov
    from ..nets import Decoder

    decoder = Decoder.from_checkpoint(ckpt)
    with jax.enable_x64(True) if float64 else contextlib.nullcontext():
        res = decoder_lyapunov(decoder, np.asarray(X, np.float64 if float64 else np.float32), k, key=jax.random.key(seed))
        return {"exponents": np.asarray(res.exponents, np.float64), "drift": np.asarray(res.drift, np.float64),
                "running": np.asarray(res.running, np.float64), "finite": bool(res.finite)}


def add_lyapunov(ds, lyap, probe_line: str, k: int, n_tokens: int, float64: bool) -> None:
    """Put the exponents into the weights dataset: dims exponent (1..k) and layer x exponent."""
    ds.coords["exponent"] = np.arange(1, k + 1)
    ds["lyapunov_exponent"] = (("exponent",), lyap["exponents"], {
        "long_name": r"$\lambda_j$", "units": "1/layer",
        "description": "finite-time Lyapunov exponents of the block-to-block map X_{l+1} = Block_l(X_l) on the probe "
                       "tokens: (1/L) sum_l log|R_jj| of the QR after every block; > 0 nearby token configurations "
                       "separate, < 0 they merge"})
    ds["lyapunov_drift"] = (("exponent",), lyap["drift"], {
        "long_name": "drift", "units": "1/layer", "description": "|lambda(L) - lambda(3L/4)| (convergence diagnostic)"})
    ds["lyapunov_running"] = (("layer", "exponent"), lyap["running"], {
        "long_name": r"$\lambda_j$ after block layer", "units": "1/layer",
        "description": "the estimate after blocks 0..layer: sum of log|R_jj| divided by layer + 1"})
    ds.attrs.update(lyapunov_probe=probe_line, lyapunov_tokens=n_tokens, lyapunov_k=k,
                    lyapunov_precision="float64" if float64 else "float32",
                    lyapunov_method="meanfield.lyapunov.decoder_lyapunov on meanfield.nets.Decoder.from_checkpoint "
                                    "(initial tangents: k random orthonormal directions of the flattened (n, d_model) state, from "
                                    "jax.random.key(--seed))")


def print_lyapunov(ds) -> None:
    print(f"Lyapunov exponents of the block-to-block map, {ds.attrs['lyapunov_k']} of n x d_model = "
          f"{ds.attrs['lyapunov_tokens'] * ds.attrs['d_model']}, on {ds.attrs['lyapunov_probe']} ({ds.attrs['lyapunov_precision']}):")
    print("  per layer (1/L sum of log stretch per block); positive: nearby token configurations separate, "
          "negative: they merge")
    print(f"{'j':>5} {'lambda_j':>12} {'drift':>10}")
    for j, (lam, dr) in enumerate(zip(ds.lyapunov_exponent.values, ds.lyapunov_drift.values), 1):
        print(f"{j:5d} {lam:12.5g} {dr:10.2e}")


def write_lyapunov_csv(ds, path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["exponent", "lyapunov_exponent", "drift"])
        for j, lam, dr in zip(ds.exponent.values, ds.lyapunov_exponent.values, ds.lyapunov_drift.values):
            w.writerow([int(j), f"{lam:.8g}", f"{dr:.8g}"])


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
    given = [o for o, v in (("--lyapunov-k", args.lyapunov_k), ("--probe-tokens", args.probe_tokens), ("--seed", args.seed),
                            ("--probe", args.probe), ("--probe-text", args.probe_text)) if v is not None]
    if given and not args.lyapunov:
        return _error(f"{given[0]}: only applies with --lyapunov")
    if args.lyapunov:
        try:
            X, probe_line = probe(args, ckpt.d_model, ckpt)
        except ValueError as exc:
            return _error(str(exc))
        k = 8 if args.lyapunov_k is None else args.lyapunov_k
        if not 1 <= k <= X.size:
            return _error(f"--lyapunov-k: must be between 1 and n x d_model = {X.shape[0]} x {ckpt.d_model} = {X.size}; got {k}")
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
    if args.lyapunov:
        try:
            lyap = lyapunov(ckpt, X, k, float64=args.float64, seed=args.seed or 0)
        except (CheckpointError, ValueError, TypeError, KeyError) as exc:
            return _error(f"{path}: --lyapunov cannot run this checkpoint's forward pass ({exc})")
        except MemoryError:
            return _error(f"{path}: --lyapunov: out of memory")
        if not (lyap["finite"] and np.all(np.isfinite(lyap["running"]))):  # exponents = running[-1]
            return _error(f"{path}: --lyapunov gave non-finite exponents (the forward pass on the probe tokens overflows or "
                          "a Jacobian is singular), so none are reported.")
        add_lyapunov(ds, lyap, probe_line, k, X.shape[0], args.float64)
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
    if args.lyapunov:
        print_lyapunov(ds)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(ds, out / "weights.csv")
        ds.to_netcdf(out / "weights.nc", engine="h5netcdf")
        plot(ds, out / "weights.png")
        if args.lyapunov:
            write_lyapunov_csv(ds, out / "lyapunov.csv")
    except OSError as exc:
        return _error(f"--out {out}: cannot write ({exc.strerror or exc}).")
    for f in ("weights.csv", "weights.nc", "weights.png") + (("lyapunov.csv",) if args.lyapunov else ()):
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
