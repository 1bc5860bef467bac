"""Shaped transformer at initialisation and its kernel SDE (Noci et al. 2023, arXiv 2306.17759).

    from meanfield import shaped
    Vs = shaped.shaped_network_kernels(key, V0, n=64, depth_ratio=1.0, gamma_attn2=.3, gamma_mlp2=.2,
                                       tau0=.5, c_plus=1., c_minus=-1.)
    sol = shaped.simulate_shaped_sde(key, V0, 1.0, dt=1e-3, gamma_attn2=.3, gamma_mlp2=.2, tau0=.5,
                                     c_plus=1., c_minus=-1., n_paths=1000)

Formulas, their derivation, checks and provenance: docs/shaped_sde.md (the documentation page
"The shaped transformer's kernel SDE").
"""

from .finite_width import ShapedTransformer as ShapedTransformer
from .finite_width import clipped_cholesky as clipped_cholesky
from .finite_width import literal_block as literal_block
from .finite_width import shaped_network_kernels as shaped_network_kernels
from .finite_width import tokens_from_kernel as tokens_from_kernel
from .sde import ShapedSDESolution as ShapedSDESolution
from .sde import diffusion_coefficients as diffusion_coefficients
from .sde import kernel_correlations as kernel_correlations
from .sde import ks_distance as ks_distance
from .sde import offdiag_correlations as offdiag_correlations
from .sde import shaped_diffusion_cov as shaped_diffusion_cov
from .sde import shaped_drift as shaped_drift
from .sde import simulate_shaped_sde as simulate_shaped_sde

__all__ = [
    "ShapedTransformer", "shaped_network_kernels", "literal_block", "tokens_from_kernel", "clipped_cholesky",
    "simulate_shaped_sde", "ShapedSDESolution", "shaped_drift", "shaped_diffusion_cov",
    "diffusion_coefficients", "kernel_correlations", "ks_distance", "offdiag_correlations",
]
