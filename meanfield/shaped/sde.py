r"""The shaped-transformer kernel SDE (Noci et al. 2023, arXiv 2306.17759; docs/shaped_sde.md §2 [DER]).

The m x m kernel $V_t$ of the shaped transformer in the limit $n, L \to \infty$, $t = l/n$,
solves the Itô SDE $dV = b(V)\,dt + dM$. With $P = I - 11^\top/m$, $\tilde V = PVP$,
$d = \operatorname{diag}V$, $u = \operatorname{diag}\tilde V - (\operatorname{tr}\tilde V/m)1$,
$G = VPVPV$, $\rho_{ab} = V_{ab}/\sqrt{V_{aa}V_{bb}}$:

$$ b(V) = \frac{\gamma_a^2}{\tau_0^2}\Big[\frac{\operatorname{tr}(\tilde VV)}{m^2}V
   + \frac{d(Vu)^\top + (Vu)d^\top}{2m}\Big] + \gamma_f^2\,\nu(\rho)\odot\sqrt{dd^\top}, $$

$$ \nu(\rho) = \frac{(c_+-c_-)^2}{2\pi}\big(\sqrt{1-\rho^2} - \rho\arccos\rho\big), $$

$$ \frac{d\langle M_{ab}, M_{cd}\rangle}{dt} = a_\text{lin}(V_{ac}V_{bd} + V_{ad}V_{bc})
   + a_G(V_{ac}G_{bd} + V_{ad}G_{bc} + V_{bc}G_{ad} + V_{bd}G_{ac}), $$

with $a_\text{lin} = \gamma_a^2(2-\gamma_a^2) + 2\gamma_f^2$ and $a_G = \gamma_a^4/(\tau_0^2m^2)$.
All of §2 is [DER] in docs/shaped_sde.md: derived there and checked against finite networks (§3). Its shape
matches the recalled Theorem 4.2 of the paper [REC]; that theorem number is unverified.

Noise, exactly. Let $LL^\top = V$ (Cholesky), $F = VPL$ (so $FF^\top = G$), and let $W_1, W_2$ be
independent m x m matrices of independent Brownian motions. Then

$$ dM = \sqrt{a_\text{lin}/2}\,(L\,dW_1L^\top + L\,dW_1^\top L^\top)
      + \sqrt{a_G}\,(L\,dW_2F^\top + F\,dW_2^\top L^\top) $$

has exactly the quadratic covariation above, because
$E[(N+N^\top)_{ij}(N+N^\top)_{kl}] = 2(\delta_{ik}\delta_{jl}+\delta_{il}\delta_{jk})$
and $E[(LNF^\top)_{ab}(LNF^\top)_{cd}] = V_{ac}G_{bd}$.
We use diffrax with a 2 x m x m Brownian motion as the control. The term `KernelNoiseTerm` maps
its increment to dM with the formula above. It is a custom `diffrax.AbstractTerm`, because
the diffusion is a bilinear map of a matrix increment, not a matrix-vector product. With
`diffrax.Euler` this is exactly the Euler–Maruyama step
$V_{k+1} = V_k + b(V_k)\Delta t + dM(V_k; \Delta W)$, $\Delta W \sim N(0, \Delta t)$. The SDE is Itô,
so we add no Stratonovich correction (docs/shaped_sde.md §2).

Blow-up and PSD. The attention drift is cubic in V, so paths can explode in finite time.
A path whose $\operatorname{tr}V$ (or, for an indefinite iterate, any $|V_{ab}|$) exceeds
`explode_threshold`, or which becomes non-finite, is frozen: both vector fields return 0 from
then on. It is flagged in `exploded` and never becomes NaN. Euler–Maruyama can leave the PSD cone
near $\rho = \pm1$. The diffusion then uses `clipped_cholesky`, which equals the Cholesky factor for
PD V and never gives NaN; $\nu$ clips $\rho$ to [-1, 1]. Such iterates are not projected back; the
smallest eigenvalue of every save is reported in `min_eig`, so they can be counted.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._symeig import eigvalsh
from ..simulate.checks import check_covariance, check_number
from .finite_width import Kernel, clipped_cholesky, residual_weights

DiffusionTensor = Float[Array, "m m m m"]


def diffusion_coefficients(*, gamma_attn2: float, gamma_mlp2: float, tau0: float, m: int) -> tuple[float, float]:
    r"""$(a_\text{lin}, a_G)$: $a_\text{lin} = \gamma_a^2(2-\gamma_a^2) + 2\gamma_f^2$, $a_G = \gamma_a^4/(\tau_0^2m^2)$ [DER].

    In the general form $a_\text{lin} = \gamma_a^2(2\lambda_a^2+\gamma_a^2) + 2\gamma_f^2(\lambda_f^2+\gamma_f^2)$,
    with $\lambda^2 + \gamma^2 = 1$.
    """
    ga2, gf2 = gamma_attn2, gamma_mlp2
    if all(_is_concrete(v) for v in (gamma_attn2, gamma_mlp2, tau0)):  # traced values (sweeps) are checked upstream
        residual_weights(gamma_attn2, name="gamma_attn2")
        residual_weights(gamma_mlp2, name="gamma_mlp2")
        if not float(tau0) > 0.0:
            raise ValueError(f"`tau0` must be > 0 (inf removes the logit terms); got {tau0!r}.")
        ga2, gf2, tau0 = float(ga2), float(gf2), float(tau0)
    return ga2 * (2.0 - ga2) + 2.0 * gf2, ga2**2 / (tau0**2 * m**2)


def _is_concrete(x) -> bool:
    try:
        float(x)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False
    return True


def _centring(m: int, dtype) -> Kernel:
    return jnp.eye(m, dtype=dtype) - jnp.full((m, m), 1.0 / m, dtype)


def shaped_drift(V: Kernel, *, gamma_attn2: float, gamma_mlp2: float, tau0: float, c_plus: float = 0.0,
                 c_minus: float = 0.0) -> Kernel:
    r"""The drift $b(V)$ of docs/shaped_sde.md §2 [DER] (module docstring).

    The first bracket is $E[SVS^\top]$ for the linear softmax term $S = \tfrac1m(QK^\top/\tau)P$. The
    u-term is the mean of the quadratic softmax term; it vanishes for m = 2. The last term is the
    shaped-ReLU correction, with $\nu$ as in Li, Nica, Roy (arXiv 2206.02768).
    """
    m = V.shape[-1]
    P = _centring(m, V.dtype)
    Vt = P @ V @ P
    d = jnp.diagonal(V)
    u = jnp.diagonal(Vt) - jnp.trace(Vt) / m
    Vu = V @ u
    attn = (jnp.trace(Vt @ V) / m**2) * V + (jnp.outer(d, Vu) + jnp.outer(Vu, d)) / (2 * m)
    sq = jnp.sqrt(jnp.maximum(jnp.outer(d, d), 0.0))
    corr = jnp.clip(V / jnp.where(sq > 0, sq, 1.0), -1.0, 1.0)
    nu = (c_plus - c_minus) ** 2 / (2 * math.pi) * (
        jnp.sqrt(jnp.maximum(1.0 - corr**2, 0.0)) - corr * jnp.arccos(corr)
    )
    return (gamma_attn2 / tau0**2) * attn + gamma_mlp2 * nu * sq


def shaped_diffusion_cov(V: Kernel, *, gamma_attn2: float, gamma_mlp2: float, tau0: float) -> DiffusionTensor:
    r"""$\Sigma_{abcd}(V) = d\langle M_{ab}, M_{cd}\rangle/dt$ of docs/shaped_sde.md §2 [DER], shape (m, m, m, m)."""
    m = V.shape[-1]
    a_lin, a_G = diffusion_coefficients(gamma_attn2=gamma_attn2, gamma_mlp2=gamma_mlp2, tau0=tau0, m=m)
    P = _centring(m, V.dtype)
    G = V @ P @ V @ P @ V
    e = functools.partial(jnp.einsum, optimize=False)
    lin = e("ac,bd->abcd", V, V) + e("ad,bc->abcd", V, V)
    att = e("ac,bd->abcd", V, G) + e("ad,bc->abcd", V, G) + e("bc,ad->abcd", V, G) + e("bd,ac->abcd", V, G)
    return a_lin * lin + a_G * att


def noise_factors(V: Kernel) -> tuple[Kernel, Kernel]:
    r"""$(L, F)$ with $LL^\top = V$ (`clipped_cholesky`) and $F = VPL$, so $FF^\top = G = VPVPV$."""
    L = clipped_cholesky(V)
    return L, V @ _centring(V.shape[-1], V.dtype) @ L


def shaped_noise(L: Kernel, F: Kernel, dW: Float[Array, "2 m m"], *, a_lin: float, a_G: float) -> Kernel:
    r"""$dM = \sqrt{a_\text{lin}/2}(L\,dW_1L^\top + \cdot^\top) + \sqrt{a_G}(L\,dW_2F^\top + \cdot^\top)$ (docs/shaped_sde.md §2)."""
    S = jnp.sqrt(a_lin / 2.0) * (L @ dW[0] @ L.T) + jnp.sqrt(a_G) * (L @ dW[1] @ F.T)
    return S + S.T


class KernelNoiseTerm(diffrax.AbstractTerm):
    r"""$dM(V; \Delta W)$ as a diffrax term: `vf` gives the factors (L, F), `contr` gives the Brownian
    increment (2, m, m), and `prod` applies `shaped_noise`. Frozen paths get L = F = 0."""

    factors: Callable
    control: diffrax.AbstractPath
    a_lin: jax.Array
    a_G: jax.Array

    def vf(self, t, y, args):
        return self.factors(t, y, args)

    def contr(self, t0, t1, **kwargs):
        return self.control.evaluate(t0, t1, **kwargs)

    def prod(self, vf, control):
        L, F = vf
        return shaped_noise(L, F, control, a_lin=self.a_lin, a_G=self.a_G)


def kernel_correlations(V: Float[Array, "... m m"]) -> Float[Array, "... m m"]:
    r"""$\rho_{ab} = V_{ab}/\sqrt{V_{aa}V_{bb}}$, over any leading axes (0 where a diagonal entry is <= 0;
    NaN for every entry of a kernel holding NaN or inf)."""
    d = jnp.diagonal(V, axis1=-2, axis2=-1)
    sq = jnp.sqrt(jnp.maximum(d[..., :, None] * d[..., None, :], 0.0))
    corr = jnp.where(sq > 0, V / jnp.where(sq > 0, sq, 1.0), 0.0)
    finite = jnp.all(jnp.isfinite(V), axis=(-2, -1), keepdims=True)
    return jnp.where(finite, corr, jnp.nan)  # a non-finite kernel has no correlations (not 0)


def offdiag_correlations(V: Float[Array, "... m m"]) -> Float[Array, "... p"]:
    r"""The p = m(m-1)/2 correlations $(\rho_{12}, \rho_{13}, \ldots, \rho_{m-1,m})$ (row-major upper triangle)."""
    m = V.shape[-1]
    i, j = np.triu_indices(m, k=1)
    return kernel_correlations(V)[..., i, j]


def ks_distance(a, b) -> float:
    r"""Two-sample Kolmogorov–Smirnov statistic $\sup_x |F_a(x) - F_b(x)|$ of two 1-d samples (NumPy only).

    Both empirical CDFs are evaluated at every pooled sample point (right-continuous), which attains the sup.
    """
    a = np.sort(np.asarray(a, np.float64).ravel())
    b = np.sort(np.asarray(b, np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise ValueError(f"ks_distance: both samples must be non-empty; got sizes {a.size} and {b.size}.")
    x = np.concatenate([a, b])
    Fa = np.searchsorted(a, x, side="right") / a.size
    Fb = np.searchsorted(b, x, side="right") / b.size
    return float(np.max(np.abs(Fa - Fb)))


class ShapedSDESolution(eqx.Module):
    """Result of `simulate_shaped_sde` (unpacks as `ts, kernels, exploded`).

    Attributes:
        ts: save times (T,).
        kernels: (paths, T, m, m). Exploded paths stay frozen at their first state past the threshold.
        exploded: (paths,) bool: tr V crossed `explode_threshold`, or V became non-finite, before the end.
        min_eig: (paths, T) smallest eigenvalue of each saved kernel; a negative value means Euler–Maruyama
            left the PSD cone there; NaN for a non-finite kernel.
        failed: (paths,) bool: the path's final kernel is NaN / inf (one step overflowed before the
            threshold could freeze it): a recorded failure, not a blow-up measurement. Such paths are
            also in `exploded` (which has always counted non-finite paths).
    """

    ts: jax.Array
    kernels: jax.Array
    exploded: jax.Array
    min_eig: jax.Array
    failed: jax.Array

    def __iter__(self):
        return iter((self.ts, self.kernels, self.exploded))

    @property
    def correlations(self) -> jax.Array:
        """(paths, T, m(m-1)/2) off-diagonal correlations."""
        return offdiag_correlations(self.kernels)


def _alive(V, threshold):
    """Finite, tr V <= threshold and max |V_ab| <= threshold (the latter is implied by the former for
    PSD V, and bounds an indefinite Euler–Maruyama iterate so that the next step cannot overflow)."""
    return jnp.all(jnp.isfinite(V)) & (jnp.trace(V) <= threshold) & (jnp.max(jnp.abs(V)) <= threshold)


def simulate_shaped_sde(
    key,
    V0: Kernel,
    T: float,
    *,
    dt: float,
    gamma_attn2: float,
    gamma_mlp2: float,
    tau0: float,
    c_plus: float = 0.0,
    c_minus: float = 0.0,
    n_paths: int,
    n_save: int = 101,
    explode_threshold: float = 1e4,
    brownian: str = "unsafe",
    batch_size: int | None = None,
) -> ShapedSDESolution:
    r"""Euler–Maruyama paths of $dV = b(V)dt + dM$ (docs/shaped_sde.md §2), vmapped over `n_paths`.

    Arguments:
        key: PRNG key; path i uses `jax.random.split(key, n_paths)[i]`, so results do not depend on `batch_size`.
        V0: initial kernel (m, m). Its dtype (float32 or float64) is the dtype of the solve.
        T: final depth time (T = L/n for a network). dt: step; T/dt must be an integer.
        gamma_attn2, gamma_mlp2, tau0, c_plus, c_minus: as in `shaped_network_kernels`.
        n_paths: number of independent paths. n_save: saved times, equally spaced on the step grid.
        explode_threshold: freeze and flag a path once tr V exceeds it.
        brownian: `"unsafe"` (`diffrax.UnsafeBrownianPath`: a fresh normal per step, fast) or
            `"virtual"` (`diffrax.VirtualBrownianTree`: one continuous Brownian path per key).
        batch_size: solve paths in chunks of this size (default: all at once).

    Returns:
        `ShapedSDESolution` (ts, kernels (paths, T, m, m), exploded (paths,), min_eig (paths, T),
        failed (paths,)).

    Raises:
        ValueError: naming the argument: `T`, `dt` not finite and > 0 (or T / dt not an integer);
            a concrete `V0` holding NaN / inf, not symmetric or not positive semidefinite (beyond
            rounding, `meanfield.simulate.checks.covariance_rtol`); `c_plus`, `c_minus` not
            finite; `gamma_attn2`, `gamma_mlp2` outside [0, 1]; `tau0` not > 0;
            `explode_threshold` NaN or <= 0; bad `n_paths`, `n_save`, `batch_size`, `brownian`.
    """
    V0 = jnp.asarray(V0)
    if not jnp.issubdtype(V0.dtype, jnp.floating):
        V0 = V0.astype(jnp.zeros(()).dtype)
    m = V0.shape[-1]
    if V0.shape != (m, m):
        raise ValueError(f"simulate_shaped_sde: `V0` must be a square (m, m) kernel; got shape {V0.shape}.")
    where = "simulate_shaped_sde"
    check_number(where, "T", T, gt=0)
    check_number(where, "dt", dt, gt=0)
    # V0 is a kernel (a Gram matrix): finite, symmetric, positive semidefinite (checked when concrete).
    check_covariance(where, "V0", V0)
    for name, v in (("c_plus", c_plus), ("c_minus", c_minus)):
        check_number(where, name, v)
    check_number(where, "explode_threshold", explode_threshold, gt=0, allow_inf=True)
    n_steps = int(round(float(T) / float(dt)))
    if n_steps < 1 or abs(n_steps * float(dt) - float(T)) > 1e-9 * max(1.0, float(T)):
        raise ValueError(f"simulate_shaped_sde: `T / dt` must be a positive integer; got T = {T}, dt = {dt}.")
    if int(n_paths) != n_paths or n_paths < 1:
        raise ValueError(f"simulate_shaped_sde: `n_paths` must be a positive integer; got {n_paths!r}.")
    if int(n_save) != n_save or not 2 <= n_save <= n_steps + 1:
        raise ValueError(f"simulate_shaped_sde: `n_save` must be an integer in [2, T/dt + 1 = {n_steps + 1}]; got {n_save!r}.")
    if brownian not in ("unsafe", "virtual"):
        raise ValueError(f"simulate_shaped_sde: `brownian` must be 'unsafe' or 'virtual'; got {brownian!r}.")
    a_lin, a_G = diffusion_coefficients(gamma_attn2=gamma_attn2, gamma_mlp2=gamma_mlp2, tau0=tau0, m=m)
    save_idx = np.unique(np.round(np.linspace(0, n_steps, int(n_save))).astype(int))
    keys = jax.random.split(key, int(n_paths))
    bs = int(n_paths) if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"simulate_shaped_sde: `batch_size` must be >= 1; got {batch_size!r}.")
    bs = min(bs, int(n_paths))
    dtype = V0.dtype
    params = tuple(jnp.asarray(v, dtype) for v in (gamma_attn2, gamma_mlp2, tau0, c_plus, c_minus, a_lin, a_G,
                                                    explode_threshold))
    solve = functools.partial(_solve_paths, T=float(T), n_steps=n_steps, save_idx=tuple(int(i) for i in save_idx),
                              brownian=brownian)
    n_chunks = -(-int(n_paths) // bs)
    padded = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (n_chunks * bs - int(n_paths),))])
    outs = [solve(padded[i * bs : (i + 1) * bs], V0, params) for i in range(n_chunks)]
    ts = outs[0][0]
    Vs, exploded, min_eig = (jnp.concatenate([o[k] for o in outs])[: int(n_paths)] for k in (1, 2, 3))
    failed = ~jnp.all(jnp.isfinite(Vs[:, -1]), axis=(-2, -1))
    return ShapedSDESolution(ts=ts, kernels=Vs, exploded=exploded, min_eig=min_eig, failed=failed)


@functools.partial(jax.jit, static_argnames=("T", "n_steps", "save_idx", "brownian"))
def _solve_paths(keys, V0, params, *, T, n_steps, save_idx, brownian):
    """One compiled solve per (shapes, T, grid, brownian); the hyperparameters in `params` are traced."""
    gamma_attn2, gamma_mlp2, tau0, c_plus, c_minus, a_lin, a_G, threshold = params
    m, dtype = V0.shape[-1], V0.dtype
    grid = jnp.linspace(0.0, T, n_steps + 1, dtype=dtype)
    ts = grid[np.asarray(save_idx)]
    shape = jax.ShapeDtypeStruct((2, m, m), dtype)

    def drift(t, V, args):
        alive = _alive(V, threshold)
        Vs = jnp.where(alive, V, jnp.eye(m, dtype=dtype))
        b = shaped_drift(Vs, gamma_attn2=gamma_attn2, gamma_mlp2=gamma_mlp2, tau0=tau0,
                         c_plus=c_plus, c_minus=c_minus)
        return jnp.where(alive, b, 0.0)

    def factors(t, V, args):
        alive = _alive(V, threshold)
        L, F = noise_factors(jnp.where(alive, V, jnp.eye(m, dtype=dtype)))
        return jnp.where(alive, L, 0.0), jnp.where(alive, F, 0.0)

    def one_path(k):
        if brownian == "unsafe":
            bm = diffrax.UnsafeBrownianPath(shape=shape, key=k)
        else:
            bm = diffrax.VirtualBrownianTree(0.0, T, tol=T / n_steps / 2, shape=shape, key=k)
        terms = diffrax.MultiTerm(diffrax.ODETerm(drift), KernelNoiseTerm(factors, bm, a_lin, a_G))
        sol = diffrax.diffeqsolve(
            terms, diffrax.Euler(), 0.0, T, None, V0,
            saveat=diffrax.SaveAt(ts=ts), stepsize_controller=diffrax.StepTo(ts=grid),
            max_steps=n_steps + 1, throw=False, adjoint=diffrax.ForwardMode(),
        )
        return sol.ys

    Vs = jax.vmap(one_path)(keys)
    exploded = ~jax.vmap(_alive, in_axes=(0, None))(Vs[:, -1], threshold)
    ok = jnp.all(jnp.isfinite(Vs), axis=(-2, -1))
    finite = jnp.where(ok[..., None, None], Vs, 0.0)
    min_eig = jnp.where(ok, eigvalsh(finite)[..., 0], jnp.nan)
    return ts, Vs, exploded, min_eig
