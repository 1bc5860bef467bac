r"""Training small byte-level language models with spectral telemetry (`meanfield train`).

    cfg = load_train_config("experiments/training/training_telemetry.yaml")
    ds = train(cfg.runs()[0][1], "runs/demo")        # telemetry.nc as an xarray Dataset (step x layer)

The model is the NNX `Decoder` with a byte embedding and an unembedding (`LanguageModel`); the optimiser
optax AdamW with warm-up, cosine decay and clipping; telemetry records the 1:1 rule's per-layer rho and
linear-propagation erank with `meanfield weights`'s code, the hidden states' effective rank and the
finite-time Lyapunov exponents of the block map; `spectral_guard` keeps rho inside a band.
"""

from .config import TrainConfig as TrainConfig
from .config import load_train_config as load_train_config
from .guard import spectral_guard as spectral_guard
from .lm import LanguageModel as LanguageModel
from .loop import TrainingInterrupted as TrainingInterrupted
from .loop import train as train
from .loop import train_grid as train_grid

__all__ = ["TrainConfig", "load_train_config", "spectral_guard", "LanguageModel", "TrainingInterrupted", "train",
           "train_grid"]
