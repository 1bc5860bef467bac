r"""`train(cfg, run_dir)`: AdamW on next-byte cross-entropy, with telemetry, checkpoints and resume.

The learning rate warms up linearly over `warmup_steps` to `learning_rate`, then follows a cosine
down to `min_lr_ratio x learning_rate` at the last step; gradients are clipped to global norm
`clip_norm` first; weight decay acts on matrices only (kernels and embeddings). Batch s is a function
of (seed, s) alone and the initial weights of the seed alone, so a run resumed from its checkpoint
at step s reproduces the uninterrupted run's numbers (same program, same machine).

Run directory: `train.json` (what made it: config, digest, corpus hash), `config.yaml`, `telemetry.nc`
(rewritten whole after every record), `checkpoints/step_NNNNNNN/`, `telemetry.png`.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import xarray as xr
import yaml
from flax import nnx

from ..sweep.plan import ConfigError
from ..sweep.store import atomic_write_dataset, atomic_write_text
from . import checkpoint as ckpt_io
from .config import TrainConfig
from .corpus import Corpus, fixed_windows, load_corpus, train_batch
from .guard import spectral_guard
from .lm import LanguageModel, cross_entropy, load_model_tensors, model_config_json, model_tensors
from .telemetry import Recorder

RUN_FILES = ("train.json", "config.yaml", "telemetry.nc", "telemetry.png", "checkpoints")
MARKER = "train.json"
GRID_MARKER = "grid.json"  # the directory of a grid: one run directory per combination


class TrainingInterrupted(Exception):
    """Raised by `train(..., stop_after=s)` after checkpointing step s (tests of resume)."""


def schedule(cfg: TrainConfig) -> optax.Schedule:
    o = cfg.optimizer
    warm = min(o.warmup_steps, max(cfg.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0 if warm else o.learning_rate, o.learning_rate, warm,
                                              max(cfg.steps, warm + 1), o.learning_rate * o.min_lr_ratio)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip -> AdamW (decay on arrays of rank >= 2) [-> spectral guard]."""
    o = cfg.optimizer
    parts = [optax.clip_by_global_norm(o.clip_norm),
             optax.adamw(schedule(cfg), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                         mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))]
    if cfg.guard.enabled:
        g = cfg.guard
        parts.append(spectral_guard(g.band, attention=g.attention, num_heads=cfg.model.num_heads, every=g.every))
    return optax.chain(*parts)


def _guard_scale(opt_state):
    """The guard's last factors, or None (the guard is the chain's last element when enabled)."""
    last = opt_state[-1]
    return getattr(last, "scale", None)


def data_devices(batch_size: int, devices: int | None = None) -> list:
    """The local devices a step's batch is split over: the most of them (at most `devices`) that
    divide `batch_size`. Each computes the loss and gradient of its slice of the batch on a copy of
    the parameters, and the gradients are summed across them (data parallelism). On a CPU, JAX shows
    one device unless `--xla_force_host_platform_device_count` says otherwise (`meanfield train` sets
    it to the cores it may use); small models run their kernels one after another, so a device per
    core is how a step uses more than one core."""
    local = jax.local_devices()
    n = len(local) if devices is None else max(1, min(int(devices), len(local)))
    while batch_size % n:
        n -= 1
    return local[:n]


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool, digest: str) -> dict | None:
    """A run directory is one `meanfield train` made (it holds train.json); refuse anything else.
    Returns the train.json of the run being resumed (None for a new or replaced run)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: exists and is not a directory")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    marker = run_dir / MARKER
    if not marker.is_file():
        raise ConfigError(f"--out {run_dir}: a non-empty directory that `meanfield train` did not make (no {MARKER}); "
                          "choose another directory")
    if overwrite:
        for name in RUN_FILES:
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        return None
    if not resume:
        raise ConfigError(f"--out {run_dir}: holds a training run; --resume to continue it, --overwrite to replace it")
    try:
        old = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{marker}: unreadable ({exc}); --overwrite to start again") from None
    if old.get("config_digest") != digest:
        raise ConfigError(f"--out {run_dir}: was trained with another configuration (digest {old.get('config_digest')}, "
                          f"this file's is {digest}); --overwrite to replace it, or choose another directory")
    return old


def train(cfg: TrainConfig, run_dir, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
          base_dir: Path | None = None, stop_after: int | None = None, corpus: Corpus | None = None,
          devices: int | None = None) -> xr.Dataset:
    """Train one configuration (no grid) into `run_dir`; returns the telemetry dataset.

    `resume`: continue from the newest checkpoint (a run with none starts over). `stop_after`: stop
    (raise `TrainingInterrupted`) right after the checkpoint at that step, as a kill would.
    `devices`: split each batch over at most this many local devices (default: all that divide the
    batch, `data_devices`; one with the spectral guard on). The numbers depend on the split only through float rounding.
    Raises ConfigError for a bad run directory or corpus (nothing written)."""
    if cfg.grid:
        raise ConfigError("train: this configuration has a grid; use train_grid")
    run_dir = Path(run_dir)
    digest = cfg.digest()
    old = _check_run_dir(run_dir, resume, overwrite, digest)
    d = cfg.data
    corpus = corpus or load_corpus(d.corpus, d.max_bytes, d.val_fraction, d.seq_len, base_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"config_digest": digest, "corpus": corpus.source, "corpus_sha256": corpus.sha256,
            "corpus_bytes": {"train": int(len(corpus.train)), "val": int(len(corpus.val))},
            "jax": jax.__version__, "backend": jax.default_backend()}
    if cfg.guard.enabled and (devices is None or jax.default_backend() == "cpu"):
        # The guard's SVDs, run on every device of a split step, cost more than the split gains
        # (d_model 128, 2 CPU devices: 282-299 ms/step against 271-308 on one; 209 against 277 without
        # the guard), so a guarded run keeps one device unless `devices` asks for more. On CPU it
        # always keeps one: jaxlib 0.10's LAPACK kernels hang when several run at once on the CPU
        # thread pool (`meanfield.sweep.schedule._Compiled`).
        if devices not in (None, 1) and jax.default_backend() == "cpu":
            warnings.warn("a run with the spectral guard trains on one CPU device: its SVDs (LAPACK) can hang "
                          "when several CPU devices run them at once", stacklevel=2)
        devices = 1
    split = data_devices(d.batch_size, devices)
    info["data_devices"] = len(split)
    if resume and old is not None and old.get("data_devices", len(split)) != len(split):
        warnings.warn(f"{run_dir}: began with each batch split over {old['data_devices']} device(s), resumes on "
                      f"{len(split)}: its numbers differ from an uninterrupted run's by float rounding", stacklevel=2)
    if old is not None and old.get("corpus_sha256") != corpus.sha256:
        raise ConfigError(f"--out {run_dir}: was trained on other bytes (corpus sha256 {str(old.get('corpus_sha256'))[:12]}..., "
                          f"now {corpus.sha256[:12]}...; another Python's stdlib or an edited file); --overwrite to start again")
    atomic_write_text(json.dumps(info, indent=1), run_dir / MARKER)
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    atomic_write_text(config_yaml, run_dir / "config.yaml")

    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ConfigError("field `dtype`: float64 needs JAX_ENABLE_X64=1 in the environment")
    model = LanguageModel(cfg.model, d.seq_len, rngs=nnx.Rngs(params=cfg.seed))
    if dtype == jnp.float64:
        g, st = nnx.split(model)
        model = nnx.merge(g, jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, st))
    graphdef, template = nnx.split(model)
    params = nnx.to_pure_dict(template)
    tx = optimizer(cfg)
    opt_state = tx.init(params)
    config_json = model_config_json(cfg.model, d.seq_len)
    t = cfg.telemetry
    recorder = Recorder(cfg.model.n_layers, t.lyapunov_k, {
        "name": cfg.name, "config_digest": digest, "corpus": corpus.source, "corpus_sha256": corpus.sha256,
        "config_yaml": config_yaml})

    start = 0
    tel = run_dir / "telemetry.nc"
    if resume and tel.is_file():
        done = _finished(tel, digest, cfg.steps)
        if done is not None:  # nothing left to train: the run's record as it is
            if not (run_dir / "telemetry.png").is_file():
                from .plots import plot_telemetry

                plot_telemetry(done, run_dir / "telemetry.png", band=cfg.guard.band)
            return done
    if resume:
        try:
            got = ckpt_io.load_latest(run_dir, params, opt_state, digest)
        except ValueError as exc:
            raise ConfigError(f"--resume: {exc}") from None
        if got is not None:
            start, tensors, opt_state, _ = got
            load_model_tensors(model, tensors)
            params = nnx.to_pure_dict(nnx.split(model)[1])
            opt_state = jax.tree.map(jnp.asarray, opt_state)
            if tel.is_file():
                recorder.load(xr.load_dataset(tel, engine="h5netcdf"), start)
            recorder.attrs["resumed_from"] = " ".join(filter(None, [recorder.attrs.get("resumed_from", ""), str(start)]))

    def build(p):
        s = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(s, p)
        return nnx.merge(graphdef, s)

    def step(p, o, window):
        loss, grads = jax.value_and_grad(lambda q: cross_entropy(build(q), window))(p)
        gnorm = optax.tree.norm(grads)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss, gnorm

    if len(split) > 1:  # parameters and optimiser state copied on every device, the batch split over them
        mesh = jax.sharding.Mesh(np.array(split), ("data",))
        copied = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        step_fn = jax.jit(step, in_shardings=(copied, copied, rows), out_shardings=copied)
        params, opt_state = jax.device_put((params, opt_state), copied)
    else:
        step_fn = jax.jit(step)
    first = split[0]

    # Fixed for the whole run: on the device once, not at every record.
    val_windows = jnp.asarray(fixed_windows(corpus.val, t.val_batches * d.batch_size, d.seq_len).reshape(
        t.val_batches, d.batch_size, d.seq_len + 1))
    probe = jnp.asarray(fixed_windows(corpus.val, t.probe_sequences, d.seq_len)[:, :-1])
    lyap_tokens = probe[0, : t.lyapunov_tokens]
    lr = schedule(cfg)

    train_seconds = recorder.rows[-1]["train_seconds"] if recorder.rows else 0.0
    losses, gnorms = [], []

    def record(step):
        # Telemetry runs on one device: the same programs and numbers whatever the split.
        model = build(jax.device_put(params, first))
        row = recorder.measure(
            step, model, config_json=config_json, val_windows=val_windows, probe=probe,
            lyapunov_tokens=lyap_tokens, lyapunov=bool(t.lyapunov_every) and (step % t.lyapunov_every == 0 or step == cfg.steps),
            train_loss=float(np.mean(losses)) if losses else float("nan"),
            grad_norm=float(np.mean(gnorms)) if gnorms else float("nan"), learning_rate=float(lr(step)),
            guard_scale=None if not cfg.guard.enabled else np.asarray(_guard_scale(opt_state)),
            train_seconds=train_seconds)
        atomic_write_dataset(recorder.dataset(), run_dir / "telemetry.nc")
        losses.clear()
        gnorms.clear()
        return row

    def checkpoint(step):
        ckpt_io.save(run_dir, step, model_tensors(build(params)), config_json, opt_state,
                     {"step": step, "config_digest": digest, "corpus_sha256": corpus.sha256}, cfg.checkpoint.keep)

    if start == 0:
        record(0)
    bar = None
    if not quiet and start < cfg.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", desc=cfg.name, dynamic_ncols=True)
    pending = []
    for step in range(start + 1, cfg.steps + 1):
        window = train_batch(corpus, cfg.seed, step, d.batch_size, d.seq_len)
        t0 = time.perf_counter()
        params, opt_state, loss, gnorm = step_fn(params, opt_state, window)
        pending.append((loss, gnorm))
        at_record = step % t.every == 0 or step == cfg.steps
        at_ckpt = step % cfg.checkpoint.every == 0 or step == cfg.steps
        if at_record or at_ckpt or len(pending) >= 10:
            jax.block_until_ready(params)
            for lo, gn in pending:
                losses.append(float(lo))
                gnorms.append(float(gn))
            pending.clear()
        train_seconds += time.perf_counter() - t0
        if bar is not None:
            bar.update(1)
            if losses and step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if at_record:
            row = record(step)
            if bar is not None:
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}")
        if at_ckpt:
            checkpoint(step)
            if stop_after is not None and step >= stop_after:
                if bar is not None:
                    bar.close()
                raise TrainingInterrupted(f"stopped after step {step}")
    if bar is not None:
        bar.close()
    ds = recorder.dataset()
    try:
        from .plots import plot_telemetry

        plot_telemetry(ds, run_dir / "telemetry.png", band=cfg.guard.band)
    except ImportError:
        pass
    return ds


def _finished(path: Path, digest: str, steps: int) -> xr.Dataset | None:
    """The telemetry of a finished run of this configuration, or None (unreadable, another config, or
    not at the last step)."""
    try:
        ds = xr.load_dataset(path, engine="h5netcdf")
    except Exception:  # noqa: BLE001 - a damaged file: the run resumes from its checkpoint instead
        return None
    if ds.attrs.get("config_digest") != digest or ds.sizes.get("step", 0) == 0 or int(ds.step.values[-1]) != steps:
        return None
    return ds


def train_grid(cfg: TrainConfig, out_dir, **kwargs) -> dict[str, xr.Dataset]:
    """Every run of the grid (or the one run) in `out_dir/<label>/`; label -> telemetry dataset."""
    out_dir = Path(out_dir)
    runs = cfg.runs()
    if not cfg.grid:
        return {"": train(cfg, out_dir, **kwargs)}
    marker = out_dir / GRID_MARKER
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not marker.is_file():
        raise ConfigError(f"--out {out_dir}: a non-empty directory that `meanfield train` did not make (no "
                          f"{GRID_MARKER}); choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"name": cfg.name, "runs": [label for label, _ in runs]}, indent=1), marker)
    corpus_cache: dict[tuple, Corpus] = {}
    results = {}
    for label, c in runs:
        d = c.data
        key = (d.corpus, d.max_bytes, d.val_fraction, d.seq_len)
        if key not in corpus_cache:
            corpus_cache[key] = load_corpus(d.corpus, d.max_bytes, d.val_fraction, d.seq_len, kwargs.get("base_dir"))
        results[label] = train(c, out_dir / label, corpus=corpus_cache[key], **kwargs)
    return results
