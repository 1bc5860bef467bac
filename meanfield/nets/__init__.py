r"""Discrete transformers (Flax NNX) beside the continuous-depth models.

`Decoder` (`DecoderConfig`): a decoder stack, pre-LN $h = x + \mathrm{Attn}(\mathrm{LN}_1 x)$,
$x' = h + \mathrm{MLP}(\mathrm{LN}_2 h)$ (parallel and post-LN variants too), loadable from the
checkpoints `meanfield.checkpoints` reads; `residual_ranks` returns the effective rank of the residual
stream layer by layer. `tracking.DiscreteTransformer` is the Euler discretisation
$x_{l+1} = x_l + h\,v(x_l)$ of a `Model`, for Gaussian tracking.
"""

from .decoder import Decoder as Decoder
from .decoder import DecoderConfig as DecoderConfig
from .decoder import residual_ranks as residual_ranks
from .decoder import second_moment_erank as second_moment_erank

__all__ = ["Decoder", "DecoderConfig", "residual_ranks", "second_moment_erank"]
