r"""Training small byte-level language models with spectral telemetry (`meanfield train`).

    cfg = load_train_config("experiments/training/training_telemetry.yaml")
    ds = train(cfg.runs()[0][1], "runs/demo")        # telemetry.nc as an xarray Dataset (step x layer)

The model is the NNX `Decoder` with a byte embedding and an unembedding (`LanguageModel`); the optimiser
optax AdamW with warm-up, cosine decay and clipping; telemetry records the 1:1 rule's per-layer rho and
linear-propagation erank with `meanfield weights`'s code, the hidden states' effective rank and the
finite-time Lyapunov exponents of the block map; `spectral_guard` keeps rho inside a band.
"""

from .._lazy import lazy_attributes

# Imported on first use (Flax, optax, xarray): `meanfield train --help` and the other commands'
# parsers (which import `train.cli`) do not pay for them.
__getattr__, __dir__ = lazy_attributes(__name__, {
    "TrainConfig": ".config", "load_train_config": ".config", "spectral_guard": ".guard", "LanguageModel": ".lm",
    "TrainingInterrupted": ".loop", "train": ".loop", "train_grid": ".loop",
}, globals())

__all__ = ["TrainConfig", "load_train_config", "spectral_guard", "LanguageModel", "TrainingInterrupted", "train",
           "train_grid"]
