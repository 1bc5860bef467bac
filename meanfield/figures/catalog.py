"""Name -> figure module. Each module defines ``render(out_dir, quick=False) -> FigureResult``.

Modules are imported lazily so ``meanfield figures --list`` is instant and one broken figure does not
stop the others.
"""

from __future__ import annotations

import importlib
import pathlib

from .style import FigureResult

#: figure name -> (module under meanfield.figures, one-line description)
FIGURES: dict[str, tuple[str, str]] = {}


def register(name: str, module: str, description: str) -> None:
    FIGURES[name] = (module, description)


def render(name: str, out_dir=None, quick: bool = False) -> FigureResult:
    """Render one catalogued figure into ``out_dir`` (default: ``figures/`` of the working directory)."""
    if name not in FIGURES:
        raise KeyError(f"unknown figure {name!r}; known: {', '.join(sorted(FIGURES))}")
    module, _ = FIGURES[name]
    mod = importlib.import_module(f"meanfield.figures.{module}")
    out = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path("figures")
    return mod.render(out, quick=quick)
register("rule_synthetic", "rule_synthetic", "The 1:1 rule's synthetic experiment re-run with its own construction: min erank vs rho, erank vs layer")
register("one_to_one_rule", "one_to_one_rule", "1:1 rule in nonlinear particles (regimes, Lyapunov) and an NNX decoder (linear proxy vs forward pass)")
register("shaped_sde", "shaped_sde", "Shaped transformer (finite width, exact in law) vs its kernel SDE: correlations over depth, KS distance vs width")
register("consensus", "consensus", "Consensus on the sphere, full and causal attention: distance vs depth with fitted rates (theory -1 and -1/2)")
register("clustering", "clustering", "Clustering and metastability on the circle and the sphere for beta in {1, 4, 9}: token angles and cluster counts over depth")
register("density_convergence", "density_convergence", "Particles -> density PDE on the circle: W1 vs n with fitted rate (~n^-1/2)")
register("density_metastability", "density_metastability", "Density PDE peaks vs particle clusters over depth for beta = 1, 4, 9")
register("million_tokens", "million_tokens", "10^6 tokens clustering on S^2 to t = 20 through the fast low-rank attention: density (Mollweide) at several depths")
register("gaussian_tracking", "gaussian_tracking", "Gaussian tokens through a finite NNX transformer: distance to Gaussianity per layer, empirical vs moment-ODE covariance")
register("reachability", "reachability", "Steering N(m0, S0) to N(m1, S1) with piecewise-constant controls: covariance ellipses over depth, BW distance vs L-BFGS iteration")
register("covariance_regimes", "covariance_regimes", "tr S(t) for equilibrium, collapse and blow-up parameter sets with predicted blow-up times and equilibrium level")
register("training_telemetry", "training_telemetry", "Byte-level LMs trained with telemetry: rho per layer, centred hidden-state erank and validation loss vs step, init gain x norm x spectral guard")
