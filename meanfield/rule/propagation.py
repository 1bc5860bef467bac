r"""The 1:1 rule's own method, reproduced (Gamaleldin 2025, repository yousef-rafat/the-1-1-rule; MISSION §5).

Spectral balance ratio of one layer, with $W_\text{mlp} = W_\text{down} W_\text{up}$ (gate dropped for
SwiGLU) and $W_\text{attn} = W_o$ ($W_o W_o^\top$ when $W_o$ is not square):

$$ \rho = \lVert W_\text{mlp}\rVert_2 / \lVert W_\text{attn}\rVert_2 . $$

Its "Lyapunov propagation" is a product of fixed matrices (no Jacobian, no nonlinearity, no tokens):

$$ C_0 = I,\qquad A_l = I + W_\text{mlp}^{(l)} + W_\text{attn}^{(l)},\qquad
   C_{l+1} = \frac{A_l C_l A_l^\top}{\lVert A_l C_l A_l^\top\rVert_2}, $$

reported per layer as the effective rank $\operatorname{erank}(C) = \exp(-\sum_i p_i\log p_i)$,
$p_i = \lambda_i/\sum_j\lambda_j$, and the condition number $\lambda_1/\lambda_\text{min}$, where, as in
its code, $\lambda_\text{min}$ is the smallest eigenvalue above $\varepsilon\,\max(1,\lambda_1)\,d$
($\varepsilon$ the machine epsilon of the compute dtype). After normalisation $\lambda_1 = 1$, so the
condition number can never exceed $1/(\varepsilon d)$: about $1.6\cdot10^4$ in float32 at $d = 512$ and
$2\cdot10^{12}$ in float64 at $d = 2048$. The $\sim 10^{12}$ values the rule reports for real models
sit at that floating-point floor, not in the dynamics.

Precision, matching its two scripts: the synthetic experiment computes and stores $C$ in float32
(``dtype="float32"``, the default); the per-model analysis computes each step in float64 and stores
$C$ back in float32 (``dtype="float64", store_dtype="float32"``). ``dtype="float64"`` alone keeps
float64 throughout. One difference in rounding only: $C$ is normalised by the top eigenvalue of the
same ``eigvalsh`` call that gives the reported spectrum (its code calls ``eigvalsh`` twice).

Synthetic experiment (`spiked_pair`, `synthetic_sweep`): $W_\text{mlp} = U\,\mathrm{diag}(5\rho,
b, \dots, b)\,V^\top$ and $W_\text{attn} = U'\,\mathrm{diag}(5, b, \dots, b)\,V^\top$ with shared random
orthogonal $U, V$, $U'$ = $U$ with its first column negated and bulk $b = 0.5$, so

$$ W_\text{mlp} + W_\text{attn} = U\,\mathrm{diag}(5(\rho - 1), 2b, \dots, 2b)\,V^\top,\qquad
   \sigma_1(W_\text{mlp} + W_\text{attn}) = \max(5|\rho - 1|, 2b): $$

the dip of the effective rank at $\rho = 1$ is built into the data. The same $A$ is used at every
layer, as in its script.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..metrics import entropy_rank

Layers = Float[Array, "L d d"]
Matrix = Float[Array, "d d"]

#: rho values of the rule's right panel.
SELECT_RHOS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
#: The rule's appendix: min effective rank claimed at rho = 0.1 / 0.97 / 20 (not what its script gives).
APPENDIX_CLAIMS = {0.1: 48.0, 0.97: 14.0, 20.0: 91.0}


class RuleTrajectory(NamedTuple):
    """Per-layer statistics of the propagated $C_{l+1}$ (leading axes: any vmapped batch, last: layer).

    ``erank``: $\\exp(-\\sum p\\log p)$; ``cond``: $\\lambda_1/\\lambda_\\text{min}$ over eigenvalues above
    $\\varepsilon\\max(1,\\lambda_1) d$ (the rule's floor); ``lam_min``: the smallest eigenvalue of the
    normalised $C$ (clamped at 0, no floor); ``scale``: $\\lVert A C A^\\top\\rVert_2$ before normalising.
    """

    erank: Array
    cond: Array
    lam_min: Array
    scale: Array


def _dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"rule: dtype must be float32 or float64; got {dtype!r}.")
    return dt


def _x64(*dtypes):
    """A jax.enable_x64(True) context when any dtype is float64, else a no-op."""
    if any(np.dtype(d) == np.float64 for d in dtypes if d is not None):
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def spectrum_stats(lam: Float[Array, "d"], d: int):
    r"""(erank, cond, lam_min) of eigenvalues ``lam`` (ascending, as from ``eigvalsh``), as the rule's code.

    $\lambda$ is clamped at 0; erank $= \exp(-\sum p\log p)$ with $p = \lambda/\sum\lambda$;
    cond $= \lambda_1/\min\{\lambda_i > \varepsilon\max(1, \lambda_1) d\}$ (the floor itself when none is above).
    """
    lam = jnp.clip(lam, 0.0, None)
    lam_max = lam[-1]
    floor = jnp.finfo(lam.dtype).eps * jnp.maximum(1.0, lam_max) * d
    above = lam > floor
    lam_min_above = jnp.where(jnp.any(above), jnp.min(jnp.where(above, lam, jnp.inf)), floor)
    cond = jnp.where(lam_min_above > 0, lam_max / lam_min_above, jnp.inf)
    p = lam / jnp.where(jnp.sum(lam) > 0, jnp.sum(lam), 1.0)
    erank = jnp.where(jnp.sum(lam) > 0, entropy_rank(p), 1.0)
    return erank, cond, lam[0]


def rule_step(C: Matrix, A: Matrix, *, store_dtype) -> tuple[Matrix, tuple]:
    r"""One layer: $C' = A C A^\top / \lVert A C A^\top\rVert_2$, computed in ``A.dtype``, stored in ``store_dtype``.

    Returns ``(C', (erank, cond, lam_min, scale))`` with the statistics of $C'$ (see `spectrum_stats`).
    """
    C = C.astype(A.dtype)
    M = A @ C @ A.T
    lam = jnp.linalg.eigvalsh(M)
    s = lam[-1]
    s = jnp.where(s > 1e-15, s, 1.0)
    erank, cond, lam_min = spectrum_stats(lam / s, A.shape[-1])
    return (M / s).astype(store_dtype), (erank, cond, lam_min, s)


def _scan(As, num_layers: int, compute, store) -> RuleTrajectory:
    """Propagate from C_0 = I through `As` ((L, d, d), or one (d, d) A repeated `num_layers` times)."""
    d = As.shape[-1]
    As = As.astype(compute)
    C0 = jnp.eye(d, dtype=store)
    step = functools.partial(rule_step, store_dtype=store)
    if As.ndim == 2:
        _, out = jax.lax.scan(lambda C, _: step(C, As), C0, None, length=num_layers)
    else:
        _, out = jax.lax.scan(step, C0, As)
    return RuleTrajectory(*out)


def transition_matrices(W_mlp: Layers, W_attn: Layers) -> Layers:
    r"""$A_l = I + W_\text{mlp}^{(l)} + W_\text{attn}^{(l)}$ (the rule's parallel-block form)."""
    return jnp.eye(W_mlp.shape[-1], dtype=W_mlp.dtype) + W_mlp + W_attn


@functools.partial(jax.jit, static_argnames=("num_layers", "compute", "store"))
def _propagate(As, num_layers, compute, store):
    return _scan(As, num_layers, compute, store)


def propagate(W_mlp: Layers, W_attn: Layers, *, dtype="float32", store_dtype=None) -> RuleTrajectory:
    r"""The rule's covariance propagation through a model's layers.

    $C_0 = I$, $A_l = I + W_\text{mlp}^{(l)} + W_\text{attn}^{(l)}$,
    $C_{l+1} = A_l C_l A_l^\top/\lVert A_l C_l A_l^\top\rVert_2$; each step is computed in ``dtype`` and
    $C$ stored in ``store_dtype`` (default: ``dtype``). The rule's per-model script is
    ``dtype="float64", store_dtype="float32"``; its synthetic script ``dtype="float32"``. float64 is
    enabled for the call (no global ``jax_enable_x64`` needed).

    Arguments:
        W_mlp, W_attn: (L, d, d) per-layer matrices (NumPy or JAX).

    Returns:
        `RuleTrajectory` of (L,) arrays, entry l describing $C_{l+1}$.

    Raises:
        ValueError: if the shapes are not both (L, d, d) or a dtype is not float32/float64.
    """
    compute = _dtype(dtype)
    store = _dtype(store_dtype if store_dtype is not None else dtype)
    W_mlp = np.asarray(W_mlp)
    W_attn = np.asarray(W_attn)
    if W_mlp.ndim != 3 or W_mlp.shape != W_attn.shape or W_mlp.shape[1] != W_mlp.shape[2]:
        raise ValueError(f"propagate: W_mlp and W_attn must both be (L, d, d); got {W_mlp.shape} and {W_attn.shape}.")
    with _x64(compute, store):
        A = np.eye(W_mlp.shape[-1], dtype=compute) + W_mlp.astype(compute) + W_attn.astype(compute)
        out = _propagate(jnp.asarray(A, dtype=compute), W_mlp.shape[0], compute.name, store.name)
        return RuleTrajectory(*(np.asarray(x) for x in out))


def spectral_norms(W: Layers) -> np.ndarray:
    r"""$\lVert W^{(l)}\rVert_2$ per layer (largest singular value), in float64 NumPy."""
    W = np.asarray(W, dtype=np.float64)
    return np.linalg.norm(W, ord=2, axis=(-2, -1))


def balance_ratio(W_mlp: Layers, W_attn: Layers) -> np.ndarray:
    r"""$\rho_l = \lVert W_\text{mlp}^{(l)}\rVert_2 / \lVert W_\text{attn}^{(l)}\rVert_2$ (the rule's model $\rho$ is their mean)."""
    return spectral_norms(W_mlp) / spectral_norms(W_attn)


# ----------------------------------------------------------------------------- synthetic experiment


def random_bases(key, d: int) -> tuple[Matrix, Matrix]:
    """(U, V): Q factors of two (d, d) standard Gaussian matrices (as the rule's script, no sign fix)."""
    k1, k2 = jax.random.split(key)
    U = jnp.linalg.qr(jax.random.normal(k1, (d, d)))[0]
    V = jnp.linalg.qr(jax.random.normal(k2, (d, d)))[0]
    return U, V


def spiked_pair(U: Matrix, V: Matrix, rho, *, attn_norm: float = 5.0, bulk: float = 0.5) -> tuple[Matrix, Matrix]:
    r"""The rule's synthetic layer: $W_\text{mlp} = U\,\mathrm{diag}(\rho a, b, \dots)\,V^\top$,
    $W_\text{attn} = U'\,\mathrm{diag}(a, b, \dots)\,V^\top$, $U'$ = $U$ with column 0 negated.

    $a$ = ``attn_norm``, $b$ = ``bulk``. Then $\lVert W_\text{mlp}\rVert_2/\lVert W_\text{attn}\rVert_2 = \rho$
    when $\rho a \ge b$ and $a \ge b$, and $\sigma_1(W_\text{mlp} + W_\text{attn}) = \max(a|\rho - 1|, 2b)$.
    """
    d = U.shape[-1]
    s_attn = jnp.full((d,), bulk, U.dtype).at[0].set(attn_norm)
    s_mlp = s_attn.at[0].set(rho * attn_norm)
    U_flip = U.at[:, 0].multiply(-1.0)
    return (U * s_mlp) @ V.T, (U_flip * s_attn) @ V.T


def sum_top_singular_value(rho, *, attn_norm: float = 5.0, bulk: float = 0.5):
    r"""Closed form $\sigma_1(W_\text{mlp} + W_\text{attn}) = \max(a|\rho - 1|, 2b)$ of `spiked_pair`."""
    return np.maximum(attn_norm * np.abs(np.asarray(rho, dtype=np.float64) - 1.0), 2.0 * bulk)


@functools.partial(jax.jit, static_argnames=("num_layers", "attn_norm", "bulk", "dtype"))
def _synthetic_point(U, V, rho, num_layers, attn_norm, bulk, dtype):
    """Vmapped over seeds (U, V batched): erank, cond (seeds, L) and sigma_1 of the sum (seeds,)."""
    dt = np.dtype(dtype)

    def one(U, V):
        W_mlp, W_attn = spiked_pair(U.astype(dt), V.astype(dt), rho.astype(dt), attn_norm=attn_norm, bulk=bulk)
        S = W_mlp + W_attn
        traj = _scan(jnp.eye(S.shape[-1], dtype=dt) + S, num_layers, dt, dt)
        sigma1 = jnp.sqrt(jnp.linalg.eigvalsh(S.T @ S)[-1])
        return traj.erank, traj.cond, sigma1

    return jax.vmap(one)(U, V)


def synthetic_sweep(key, rhos, *, d: int = 512, num_layers: int = 24, n_seeds: int = 5, attn_norm: float = 5.0,
                    bulk: float = 0.5, dtype="float32") -> dict[str, np.ndarray]:
    r"""The rule's synthetic experiment (its script: ``dtype="float32"``): for each $\rho$ and seed, `spiked_pair` with that seed's
    bases (shared across $\rho$, as in its script), the same $A = I + W_\text{mlp} + W_\text{attn}$ at
    every layer, `propagate`d ``num_layers`` times.

    Returns a dict of NumPy arrays: ``rho`` (R,), ``erank`` and ``cond`` (R, n_seeds, num_layers),
    ``sigma_sum`` (R, n_seeds) = measured $\sigma_1(W_\text{mlp} + W_\text{attn})$ and ``sigma_sum_expected``
    (R,) from `sum_top_singular_value`. One compile for all $\rho$ (it is traced); seeds are vmapped.
    The bases are drawn in float32 for either ``dtype``, so float64 runs see the same matrices (the
    mean min erank at rho = 0.1 / 0.97 / 20 agrees to 2e-5 relative between the two at d = 512; the condition
    number is at its floor $1/(\varepsilon d)$ in both: 1.6e4 in float32, 8.7e12 in float64). float64 is an order
    of magnitude slower on CPU.
    """
    dt = _dtype(dtype)
    rhos = np.asarray(rhos, dtype=np.float64)
    keys = jax.random.split(key, n_seeds)
    U, V = jax.jit(jax.vmap(lambda k: random_bases(k, d)))(keys)
    er, co, sg = [], [], []
    with _x64(dt):
        for rho in rhos:
            e, c, s = _synthetic_point(U, V, jnp.asarray(rho, dt), num_layers, float(attn_norm), float(bulk), dt.name)
            er.append(np.asarray(e))
            co.append(np.asarray(c))
            sg.append(np.asarray(s))
    return {"rho": rhos, "erank": np.stack(er), "cond": np.stack(co), "sigma_sum": np.stack(sg),
            "sigma_sum_expected": sum_top_singular_value(rhos, attn_norm=attn_norm, bulk=bulk)}


__all__ = ["RuleTrajectory", "propagate", "rule_step", "spectrum_stats", "transition_matrices", "spectral_norms",
           "balance_ratio", "random_bases", "spiked_pair", "sum_top_singular_value", "synthetic_sweep",
           "SELECT_RHOS", "APPENDIX_CLAIMS"]
