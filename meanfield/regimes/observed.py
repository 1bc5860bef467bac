r"""Label a run: collapse, stable, blow-up, or failed.

Thresholds (keyword arguments, documented defaults):

- **blow-up** (code 2): the solve stopped at its blow-up event (the Gaussian moments' exact
  `blowup_time < inf`, or the particles' growth event), or the token scale grew by more than
  `growth_limit` (default 1e6: $\mathrm{rms}|x|(T)/\mathrm{rms}|x|(0) > 10^6$) with finite values.
- **failed** (code 3): the solve neither reached t1 nor a blow-up event (max_steps: e.g. a fixed
  step too small for t1, or a saturated softmax making the field nonsmooth), or its final state is
  not finite. A failure is a recorded fact about the numerics, never a regime of the dynamics: its
  observables are NaN in a sweep, and `success` is 0.
- **collapse** (code 0): otherwise, if the final state is within `collapse_tol` (default 1e-2) of
  rank one: particles `rank_one_distance(X_T)` $=\sqrt{1 - s_1^2/\sum s^2}$, moments the same
  quantity for $G = mm^\top + S$. Consensus (all tokens equal) is a special case.
- **stable** (code 1): neither.

The collapse test is scale-free on purpose: it asks whether the token *configuration* has become
one-dimensional. A cloud that shrinks to a point while keeping an isotropic shape (e.g. the Gaussian
moment ODE with V = vI, K^T Q = aI, va < 0 and m = 0: every eigenvalue of S decays like
1/(2|va| t)) is labelled stable; look at `cov_trace` or `rms_norm` for its size. Two antipodal
clusters are rank one and count as collapse.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import metrics
from ..simulate.gaussian import GaussianSolution
from ..simulate.particles import ParticleSolution

REGIMES = ("collapse", "stable", "blowup", "failed")
COLLAPSE, STABLE, BLOWUP, FAILED = 0, 1, 2, 3


def regime_code(rank_one_distance, growth, blown_up, *, failed=False, collapse_tol: float = 1e-2,
                growth_limit: float = 1e6):
    """The regime code from final observables (vectorised; any broadcastable shapes).

    A blow-up event wins; otherwise a failed solve (`failed`) or a non-finite final observable is
    FAILED; otherwise growth above `growth_limit` is BLOWUP, then the collapse test."""
    rank_one_distance = jnp.asarray(rank_one_distance)
    growth = jnp.asarray(growth)
    bad = jnp.asarray(failed) | ~jnp.isfinite(growth) | ~jnp.isfinite(rank_one_distance)
    code = jnp.where(growth > growth_limit, BLOWUP, jnp.where(rank_one_distance < collapse_tol, COLLAPSE, STABLE))
    return jnp.where(jnp.asarray(blown_up), BLOWUP, jnp.where(bad, FAILED, code))


def judged_save(reached, blown_up):
    """Index of the save a particle run is judged on: after a blow-up event (the solve stopped early)
    its last reached save, otherwise the final one. `reached` (T,): the saves whose tokens are finite."""
    return jnp.where(blown_up, jnp.max(jnp.where(reached, jnp.arange(reached.shape[0]), 0)), reached.shape[0] - 1)


def particle_regime(rank_one_distance, rms_norm, rms_norm0, blown_up, *, failed=False, collapse_tol: float = 1e-2,
                    growth_limit: float = 1e6):
    r"""The regime code of a particle run from its judged state X_T (`judged_save`) and X_0:
    `regime_code` with growth $\mathrm{rms}|x|(T)/\max(\mathrm{rms}|x|(0), \text{tiny})$.

    `rank_one_distance`, `rms_norm`: of X_T; `rms_norm0`: of X_0. The one particle rule, used by
    `classify` and by the sweeps' saved observables."""
    rms_norm = jnp.asarray(rms_norm)
    growth = rms_norm / jnp.maximum(rms_norm0, jnp.finfo(rms_norm.dtype).tiny)
    return regime_code(rank_one_distance, growth, blown_up, failed=failed, collapse_tol=collapse_tol,
                       growth_limit=growth_limit)


def classify(solution, *, collapse_tol: float = 1e-2, growth_limit: float = 1e6):
    """Returns the regime code (0 collapse, 1 stable, 2 blow-up, 3 failed; names in `REGIMES`) of a finished run.

    Accepts a `GaussianSolution` or a `ParticleSolution` that saved token states; for a batched
    solution (a leading axis B) it returns the B codes.
    """
    kw = dict(collapse_tol=collapse_tol, growth_limit=growth_limit)
    batched = (isinstance(solution, GaussianSolution) and solution.means.ndim == 3) or (
        isinstance(solution, ParticleSolution) and getattr(solution.xs, "ndim", 0) == 4)
    if batched:  # the shared save times broadcast to every point, then one classify per point
        ts = jnp.broadcast_to(solution.ts, solution.success.shape + solution.ts.shape[-1:])  # (T,) or (B, T)
        return jax.vmap(lambda s: classify(s, **kw))(eqx.tree_at(lambda s: s.ts, solution, ts))
    if isinstance(solution, GaussianSolution):
        m, S = solution.means[-1], solution.covs[-1]
        r1 = metrics.gaussian_rank_one_distance(m, S)
        blown = jnp.isfinite(solution.blowup_time)
        return regime_code(r1, jnp.ones_like(r1), blown, failed=~solution.success, collapse_tol=collapse_tol,
                           growth_limit=growth_limit)
    if isinstance(solution, ParticleSolution):
        xs = solution.xs
        if not hasattr(xs, "ndim") or xs.ndim != 3:
            raise ValueError(
                "classify: the ParticleSolution saved observables, not tokens; call "
                "`regime_code(rank_one_distance, growth, blown_up)` with the saved values instead."
            )
        # A blow-up event stops the solve early: judge it on its last reached save; otherwise on X(t1).
        XT = xs[judged_save(jnp.all(jnp.isfinite(xs), axis=(-2, -1)), solution.blown_up)]
        return particle_regime(metrics.rank_one_distance(XT), metrics.rms_norm(XT), metrics.rms_norm(xs[0]),
                               solution.blown_up, failed=~solution.success, **kw)
    raise TypeError(f"classify: expected a GaussianSolution or ParticleSolution; got {type(solution).__name__}.")
