r"""The 1:1 rule (Gamaleldin 2025), reproduced: the spectral balance ratio
$\rho = \lVert W_\text{mlp}\rVert_2/\lVert W_\text{attn}\rVert_2$, its stable band and its "Lyapunov propagation"
$C_{l+1} = A_l C_l A_l^\top/\lVert A_l C_l A_l^\top\rVert_2$, $A_l = I + W_\text{mlp}^{(l)} + W_\text{attn}^{(l)}$.

- `propagation`: the rule's method (`propagate`, `balance_ratio`, the synthetic experiment `synthetic_sweep`).
- `band`: the stable band `BAND = (0.5, 2.0)`.
- `checkpoint`: the rule on a real checkpoint (`analyse`), used by ``meanfield weights`` and the training telemetry.
"""

from . import band as band
from . import checkpoint as checkpoint
from . import propagation as propagation
from .band import BAND as BAND
from .checkpoint import analyse as analyse
from .propagation import APPENDIX_CLAIMS as APPENDIX_CLAIMS
from .propagation import SELECT_RHOS as SELECT_RHOS
from .propagation import Layers as Layers
from .propagation import Matrix as Matrix
from .propagation import RuleTrajectory as RuleTrajectory
from .propagation import balance_ratio as balance_ratio
from .propagation import propagate as propagate
from .propagation import random_bases as random_bases
from .propagation import rule_step as rule_step
from .propagation import spectral_norms as spectral_norms
from .propagation import spectrum_stats as spectrum_stats
from .propagation import spiked_pair as spiked_pair
from .propagation import sum_top_singular_value as sum_top_singular_value
from .propagation import synthetic_sweep as synthetic_sweep
from .propagation import transition_matrices as transition_matrices

__all__ = [
    "band", "checkpoint", "propagation", "BAND", "analyse", "APPENDIX_CLAIMS", "SELECT_RHOS", "Layers", "Matrix",
    "RuleTrajectory", "balance_ratio", "propagate", "random_bases", "rule_step", "spectral_norms", "spectrum_stats",
    "spiked_pair", "sum_top_singular_value", "synthetic_sweep", "transition_matrices",
]
