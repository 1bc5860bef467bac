"""meanfield: transformers as continuous-depth dynamical systems.

    import meanfield as mf
    model = mf.Model.random(jax.random.key(0), d=3, norm="sphere")
    sol = mf.simulate_particles(model, X0, t1=20.0)
    mf.metrics.effective_rank(sol.xs[-1])
"""

from ._xla_flags import set_cpu_defaults as _set_cpu_defaults

_set_cpu_defaults()  # before JAX creates its CPU client (meanfield._xla_flags)

from . import metrics as metrics
from .model.attention import attention as attention
from .model.attention import blocked_attention as blocked_attention
from .model.attention import dense_attention as dense_attention
from .model.field import gaussian_closure_error as gaussian_closure_error
from .model.field import moment_field as moment_field
from .model.field import particle_field as particle_field
from .model.field import sphere_project as sphere_project
from .model.field import token_velocity as token_velocity
from .model.mlp import mlp as mlp
from .model.params import Model as Model
from .model.spectral import spectral_ratio as spectral_ratio
from .model.spectral import with_spectral_ratio as with_spectral_ratio
from .regimes import classify as classify
from .regimes import REGIMES as REGIMES
from . import regimes as regimes
from .initial_tokens import sphere_uniform as sphere_uniform
from .initial_tokens import hemisphere as hemisphere
from .initial_tokens import gaussian_tokens as gaussian_tokens
from .simulate.gaussian import GaussianSolution as GaussianSolution
from .simulate.gaussian import simulate_gaussian as simulate_gaussian
from .simulate.particles import ParticleSolution as ParticleSolution
from .simulate.particles import simulate_particles as simulate_particles
from .simulate.solvers import RK4 as RK4

__version__ = "0.1.0"

__all__ = [
    "Model", "simulate_particles", "simulate_gaussian", "ParticleSolution", "GaussianSolution",
    "with_spectral_ratio", "spectral_ratio", "metrics", "classify", "REGIMES",
    "attention", "dense_attention", "blocked_attention", "mlp", "token_velocity", "particle_field",
    "moment_field", "sphere_project", "gaussian_closure_error", "sphere_uniform", "hemisphere",
    "gaussian_tokens", "RK4",
]

from .sweep.store import load_run as load_run  # noqa: E402
from .sweep.run import run_experiment as run_experiment  # noqa: E402

__all__ += ["load_run", "run_experiment"]

from . import rule as rule  # noqa: E402
from .checkpoints import load_checkpoint as load_checkpoint  # noqa: E402
from .lyapunov import LyapunovResult as LyapunovResult  # noqa: E402
from .lyapunov import decoder_lyapunov as decoder_lyapunov  # noqa: E402
from .lyapunov import gaussian_lyapunov as gaussian_lyapunov  # noqa: E402
from .lyapunov import layer_lyapunov as layer_lyapunov  # noqa: E402
from .lyapunov import lyapunov_spectrum as lyapunov_spectrum  # noqa: E402
from .lyapunov import particle_lyapunov as particle_lyapunov  # noqa: E402

from .model.attention import Blocked as Blocked  # noqa: E402
from .model.attention import Dense as Dense  # noqa: E402
from .model.attention import LowRank as LowRank  # noqa: E402
from .model.lowrank import LowRankInfo as LowRankInfo  # noqa: E402
from .model.lowrank import choose_orders as choose_orders  # noqa: E402
from .model.lowrank import lowrank_attention as lowrank_attention  # noqa: E402
from .model.lowrank import truncation_bound as truncation_bound  # noqa: E402
from .simulate.attention_policy import Auto as Auto  # noqa: E402

__all__ += ["Dense", "Blocked", "LowRank", "Auto", "lowrank_attention", "choose_orders", "truncation_bound",
            "LowRankInfo"]
__all__ += ["rule", "load_checkpoint", "LyapunovResult", "lyapunov_spectrum", "particle_lyapunov", "gaussian_lyapunov",
            "layer_lyapunov", "decoder_lyapunov"]

from . import checkpoints as checkpoints  # noqa: E402
from . import density as density  # noqa: E402
from .checkpoints import layer_matrices as layer_matrices  # noqa: E402
from ._lazy import lazy_attributes  # noqa: E402

# Imported on first use: Flax (nets), optax (control), SciPy's optimisers (regimes.predicted) cost
# ~1 s together, which every `meanfield` command would otherwise pay.
__getattr__, __dir__ = lazy_attributes(__name__, {
    "nets": ".", "control": ".", "train": ".", "SteerResult": ".control", "bures_wasserstein": ".control",
    "steer": ".control", "predict_regime": ".regimes",
}, globals())
from .density import DensitySolution as DensitySolution  # noqa: E402
from .density import simulate_density as simulate_density  # noqa: E402

__all__ += ["checkpoints", "control", "regimes", "density", "nets", "layer_matrices", "steer", "SteerResult",
            "bures_wasserstein", "predict_regime", "simulate_density", "DensitySolution"]
