"""Discrete transformers (Flax NNX) beside the continuous-depth models."""

from .decoder import Decoder as Decoder
from .decoder import DecoderConfig as DecoderConfig
from .decoder import residual_ranks as residual_ranks
from .decoder import second_moment_erank as second_moment_erank

__all__ = ["Decoder", "DecoderConfig", "residual_ranks", "second_moment_erank"]
