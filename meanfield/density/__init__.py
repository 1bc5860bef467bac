r"""The mean-field limit on the circle: the token density as a PDE, and particles converging to it.

For tokens on $S^1$ (d = 2, `norm="sphere"`) the density $\rho(\theta,t)$ solves
$\partial_t\rho + \partial_\theta(\rho\,v[\rho]) = 0$, $v[\rho]$ the particle velocity averaged over
$\rho$ (`velocity`). `simulate_density` solves it pseudo-spectrally (`pde`); `initial_densities` builds
densities and samples them; `wasserstein` measures particles against densities;
`particles.simulate_angles` runs large particle systems; `theory` holds the linear rates.
"""

from .grid import count_peaks as count_peaks
from .grid import spectral_tail as spectral_tail
from .initial_densities import kernel_density as kernel_density
from .initial_densities import sample_density as sample_density
from .initial_densities import uniform_perturbed as uniform_perturbed
from .initial_densities import von_mises_mixture as von_mises_mixture
from .particles import simulate_angles as simulate_angles
from .pde import DensitySolution as DensitySolution
from .pde import UnderResolvedError as UnderResolvedError
from .pde import UnderResolvedWarning as UnderResolvedWarning
from .pde import choose_modes as choose_modes
from .pde import simulate_density as simulate_density
from .theory import consensus_rate as consensus_rate
from .theory import fastest_mode as fastest_mode
from .theory import uniform_growth_rate as uniform_growth_rate
from .velocity import angle_velocity as angle_velocity
from .velocity import density_velocity as density_velocity
from .wasserstein import w1_densities as w1_densities
from .wasserstein import w1_samples as w1_samples
from .wasserstein import w1_samples_density as w1_samples_density

__all__ = [
    "simulate_density", "DensitySolution", "UnderResolvedWarning", "UnderResolvedError", "choose_modes",
    "density_velocity", "angle_velocity", "simulate_angles", "uniform_perturbed", "von_mises_mixture",
    "kernel_density", "sample_density", "w1_samples", "w1_samples_density", "w1_densities",
    "count_peaks", "spectral_tail", "uniform_growth_rate", "fastest_mode", "consensus_rate",
]
