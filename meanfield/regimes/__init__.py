"""Regimes of a run: observed (label a simulated solution) and predicted (spectral criteria, a priori).

- `observed`: `classify(solution)` -> code into `REGIMES = ("collapse", "stable", "blowup", "failed")`
  from a finished particle or Gaussian solution (`regime_code` from saved observables).
- `predicted`: `predict_regime(model, m0, S0)` -> (label, details): the Gaussian moment ODE's long-depth
  label in `LABELS = ("equilibrium", "collapse", "blowup", "unknown")` and, where it can, the blow-up time,
  from the parameters alone; checked against `simulate_gaussian` (docs/criteria.md).
"""

from . import observed as observed
from .observed import BLOWUP as BLOWUP
from .observed import COLLAPSE as COLLAPSE
from .observed import FAILED as FAILED
from .observed import REGIMES as REGIMES
from .observed import STABLE as STABLE
from .observed import classify as classify
from .observed import judged_save as judged_save
from .observed import particle_regime as particle_regime
from .observed import regime_code as regime_code
from .._lazy import lazy_attributes

# `predicted` (SciPy's optimisers, ~0.4 s) is imported on first use.
__getattr__, __dir__ = lazy_attributes(__name__, {
    "predicted": ".", **{name: ".predicted" for name in (
        "CLASSES", "LABELS", "precision_flow", "predict_regime", "scalar_regime", "simulated_regime",
        "validation_grid")},
}, globals())

__all__ = [
    "observed", "predicted", "REGIMES", "COLLAPSE", "STABLE", "BLOWUP", "FAILED", "regime_code", "classify",
    "judged_save", "particle_regime", "LABELS", "CLASSES", "predict_regime", "scalar_regime", "precision_flow", "simulated_regime", "validation_grid",
]
