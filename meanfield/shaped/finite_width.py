r"""Finite-width shaped transformer at initialisation (Noci et al. 2023, arXiv 2306.17759).

The network is specified in docs/shaped_sde.md §1. Provenance tags follow that page (§5):
**[SRC]** read in a source, **[REC]** recalled from the paper (its equation numbers unverified),
**[DER]** derived there and checked numerically. We do not cite equation numbers of the paper.

m tokens, width n, depth L = round(T n) blocks, depth time t = l/n. State X_l in R^{m x n},
kernel $V_l = X_l X_l^\top / n$. All weights are i.i.d. N(0, 1) with explicit $1/\sqrt n$ factors.
Each residual branch has $\lambda^2 + \gamma^2 = 1$ [REC]. One block = attention, then MLP; no LayerNorm.

- Attention [REC form; DER coefficients]:
  $Z = \lambda_a X + \gamma_a A\, X W_V/\sqrt n$, with $Q = XW_Q/\sqrt n$, $K = XW_K/\sqrt n$
  ($W_Q, W_K \in \mathbb R^{n\times n_k}$) and

  - shaped: $A = I + \mathrm{softmax}(QK^\top/\tau) - \tfrac1m 11^\top$ [SRC],
    $\tau = \tau_0\sqrt{n\,n_k}$ [REC]; causal: masked softmax and the uniform-causal centring
    (row i: 1/i on j <= i) [SRC: He & Hofmann's simplified_transformers];
  - unshaped baseline (`shaped=False`): $A = \mathrm{softmax}(QK^\top/\sqrt{n_k})$, the standard
    attention (no identity, no centring, no extra $\sqrt n$), with the same residual weights.
- MLP [DER model]: $X' = \lambda_f Z + \gamma_f\sqrt{c/n}\,\varphi(ZW_\text{pre}/\sqrt n)\,W_\text{post}$,
  $W_\text{pre}, W_\text{post} \in \mathbb R^{n\times n}$, shaped leaky ReLU
  $\varphi(x) = s_+\max(x,0) + s_-\min(x,0)$, $s_\pm = 1 + c_\pm/\sqrt n$,
  $c = 2/(s_+^2 + s_-^2) = 1/E\varphi(g)^2$ [SRC form: Li, Nica, Roy, arXiv 2206.02768].
  `shaped=False` changes the attention only; the MLP stays as above.

Two forms:

- `ShapedTransformer`: a Flax NNX module holding the literal weights (cost O(L(m n^2))).
- `shaped_network_kernels`: exact in law, O(L m^2 n) (docs/shaped_sde.md §1). Every weight matrix multiplies
  exactly one matrix M that is known when it is used, and is independent of everything computed
  before. Given M (m x n'), the columns of $MW/\sqrt{n'}$ are i.i.d. $N(0, MM^\top/n')$. So
  $MW/\sqrt{n'}$ has the law of $F N$ with $FF^\top = MM^\top/n'$ and N fresh i.i.d. N(0,1). The
  network's law is invariant under $X \mapsto XO$ for orthogonal O, so it depends on $X_0$ only
  through $V_0$, and we start from $X_0 = \sqrt n\,[\,\mathrm{chol}(V_0)\;|\;0\,]$.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

Kernel = Float[Array, "m m"]
"""An m x m kernel (Gram matrix of m tokens)."""
KernelPath = Float[Array, "L m m"]
"""Kernels at layers 0..L."""
WideTokens = Float[Array, "m n"]
"""m tokens of width n (rows are tokens)."""


# -- hyperparameter checks ----------------------------------------------------------------------
def residual_weights(gamma2: float, *, name: str = "gamma2") -> tuple[float, float]:
    r"""$(\lambda, \gamma) = (\sqrt{1-\gamma^2}, \sqrt{\gamma^2})$, so $\lambda^2 + \gamma^2 = 1$ [REC].

    Raises:
        ValueError: if `gamma2` is not in [0, 1].
    """
    gamma2 = float(gamma2)
    if not 0.0 <= gamma2 <= 1.0:
        raise ValueError(f"`{name}` (the branch weight gamma^2) must lie in [0, 1]; got {gamma2!r}.")
    return math.sqrt(1.0 - gamma2), math.sqrt(gamma2)


def relu_slopes(n: int, c_plus: float, c_minus: float) -> tuple[float, float, float]:
    r"""$(s_+, s_-, c)$ with $s_\pm = 1 + c_\pm/\sqrt n$ and $c = 2/(s_+^2 + s_-^2)$ [SRC form]."""
    s_plus = 1.0 + float(c_plus) / math.sqrt(n)
    s_minus = 1.0 + float(c_minus) / math.sqrt(n)
    return s_plus, s_minus, 2.0 / (s_plus**2 + s_minus**2)


def _check_common(fn: str, *, n: int, n_k: int, tau0: float, m: int | None = None) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"{fn}: `n` (the width) must be a positive integer; got {n!r}.")
    if int(n_k) != n_k or n_k < 1:
        raise ValueError(f"{fn}: `n_k` (the query/key width) must be a positive integer; got {n_k!r}.")
    if not float(tau0) > 0.0:
        raise ValueError(f"{fn}: `tau0` must be > 0 (inf switches the logits off); got {tau0!r}.")
    if m is not None and m > n:
        raise ValueError(f"{fn}: the width `n` must be >= the number of tokens m = {m}; got n = {n}.")


def n_blocks_for(n: int, depth_ratio: float) -> int:
    """L = round(T n) blocks for depth-to-width ratio `depth_ratio` = T (at least one block)."""
    if not float(depth_ratio) > 0.0:
        raise ValueError(f"`depth_ratio` (T = L/n) must be > 0; got {depth_ratio!r}.")
    return max(1, int(round(float(depth_ratio) * n)))


# -- building blocks: pure functions of one network state -------------------------------------
def clipped_cholesky(V: Kernel) -> Kernel:
    r"""Lower-triangular L with $LL^\top = V$ for V positive definite, never NaN.

    Column-by-column Cholesky where a negative pivot $V_{jj} - \sum_{k<j} L_{jk}^2$ is clipped at 0
    and the column below a zero pivot is set to 0. For a positive-definite V this is the Cholesky
    factor. For a positive semi-definite or slightly indefinite V it gives the factor of a nearby
    PSD matrix. One example is a collapsed kernel with $\rho = 1$ to float precision. m is static and
    small, so the loop is unrolled.
    """
    m = V.shape[-1]
    tiny = jnp.finfo(V.dtype).tiny
    L = jnp.zeros_like(V)
    for j in range(m):
        pivot = V[j, j] - jnp.sum(L[j, :j] ** 2)
        ljj = jnp.sqrt(jnp.maximum(pivot, 0.0))
        L = L.at[j, j].set(ljj)
        if j + 1 < m:
            col = V[j + 1 :, j] - L[j + 1 :, :j] @ L[j, :j]
            safe = jnp.where(ljj > tiny, ljj, 1.0)
            L = L.at[j + 1 :, j].set(jnp.where(ljj > tiny, col / safe, 0.0))
    return L


def gram(X: WideTokens) -> Kernel:
    r"""$V = XX^\top/n$ for X of shape (m, n)."""
    return X @ X.T / X.shape[-1]


def gaussian_product(M: WideTokens, N: Float[Array, "m k"]) -> Float[Array, "m k"]:
    r"""A sample of $MW/\sqrt{n'}$ ($W \in \mathbb R^{n'\times k}$ i.i.d. N(0,1)) from standard normals N.

    Returns $FN$ with $F$ = `clipped_cholesky`$(MM^\top/n')$. Given M, the columns of
    $MW/\sqrt{n'}$ are i.i.d. $N(0, MM^\top/n')$, so this has exactly their law (docs/shaped_sde.md §1).
    """
    return clipped_cholesky(gram(M)) @ N


def shaped_leaky_relu(x, *, s_plus: float, s_minus: float):
    r"""$\varphi(x) = s_+\max(x,0) + s_-\min(x,0)$ (Li, Nica, Roy) [SRC form]."""
    return s_plus * jnp.maximum(x, 0.0) + s_minus * jnp.minimum(x, 0.0)


def attention_matrix(
    Q: Float[Array, "m k"], K: Float[Array, "m k"], *, n: int, tau0: float, causal: bool, shaped: bool
) -> Kernel:
    r"""The m x m attention matrix A.

    Shaped: $A = I + \mathrm{softmax}(QK^\top/\tau) - C$, with $\tau = \tau_0\sqrt{n\,n_k}$ [REC] and
    $C = \tfrac1m 11^\top$, or the uniform-causal matrix when `causal` [SRC].
    Unshaped: $A = \mathrm{softmax}(QK^\top/\sqrt{n_k})$ (row-wise, masked when `causal`).
    Here $n_k$ = `Q.shape[-1]`.
    """
    m, n_k = Q.shape
    tau = (float(tau0) * math.sqrt(n * n_k)) if shaped else math.sqrt(n_k)
    logits = (Q @ K.T) / tau
    mask = jnp.tril(jnp.ones((m, m), dtype=bool)) if causal else None
    if causal:
        logits = jnp.where(mask, logits, -jnp.inf)
    S = jax.nn.softmax(logits, axis=-1)
    if not shaped:
        return S
    if causal:
        C = jnp.where(mask, 1.0 / jnp.arange(1, m + 1, dtype=Q.dtype)[:, None], 0.0)
    else:
        C = jnp.full((m, m), 1.0 / m, Q.dtype)
    return jnp.eye(m, dtype=Q.dtype) + S - C


def attention_sublayer(
    X: WideTokens, Q, K, Y: WideTokens, *, gamma_attn2: float, tau0: float, causal: bool = False,
    shaped: bool = True,
) -> WideTokens:
    r"""$Z = \lambda_a X + \gamma_a A Y$ with $Y = XW_V/\sqrt n$ and A from `attention_matrix` [REC form].

    `Q`, `K` are $XW_Q/\sqrt n$, $XW_K/\sqrt n$ (literal or sampled in law), shape (m, n_k).
    """
    lam, gam = residual_weights(gamma_attn2, name="gamma_attn2")
    A = attention_matrix(Q, K, n=X.shape[-1], tau0=tau0, causal=causal, shaped=shaped)
    return lam * X + gam * (A @ Y)


def mlp_sublayer(Z: WideTokens, R: WideTokens, *, gamma_mlp2: float, c: float) -> WideTokens:
    r"""$X' = \lambda_f Z + \gamma_f\sqrt c\,R$ with $R = \varphi(ZW_\text{pre}/\sqrt n)W_\text{post}/\sqrt n$ [DER model].

    This equals $\lambda_f Z + \gamma_f\sqrt{c/n}\,\varphi(ZW_\text{pre}/\sqrt n)W_\text{post}$.
    """
    lam, gam = residual_weights(gamma_mlp2, name="gamma_mlp2")
    return lam * Z + (gam * math.sqrt(c)) * R


# -- fast, exact-in-law simulator ------------------------------------------------------------------
def block_noise(key, m: int, n: int, n_k: int, dtype) -> dict:
    """The standard normals one block consumes: N_Q, N_K (m, n_k) and N_V, N_pre, N_post (m, n).

    One `jax.random.normal` call, sliced (one threefry kernel to compile instead of five).
    """
    z = jax.random.normal(key, (m, 2 * n_k + 3 * n), dtype)
    cuts = np.cumsum([n_k, n_k, n, n])
    N_Q, N_K, N_V, N_pre, N_post = jnp.split(z, cuts, axis=1)
    return {"N_Q": N_Q, "N_K": N_K, "N_V": N_V, "N_pre": N_pre, "N_post": N_post}


def attention_in_law(X: WideTokens, noise: dict, *, gamma_attn2, tau0, causal=False, shaped=True) -> WideTokens:
    r"""Attention sub-layer with every $XW/\sqrt n$ sampled in law: $Q = FN_Q$, $K = FN_K$, $Y = FN_V$,
    $FF^\top = XX^\top/n$ (one factor, since all three multiply X)."""
    F = clipped_cholesky(gram(X))
    return attention_sublayer(
        X, F @ noise["N_Q"], F @ noise["N_K"], F @ noise["N_V"],
        gamma_attn2=gamma_attn2, tau0=tau0, causal=causal, shaped=shaped,
    )


def mlp_in_law(Z: WideTokens, noise: dict, *, gamma_mlp2, c_plus, c_minus) -> WideTokens:
    r"""MLP sub-layer in law: $U = F_Z N_\text{pre}$ (the pre-activation), $H = \varphi(U)$,
    $R = F_H N_\text{post}$, with $F_ZF_Z^\top = ZZ^\top/n$ and $F_HF_H^\top = HH^\top/n$."""
    n = Z.shape[-1]
    s_plus, s_minus, c = relu_slopes(n, c_plus, c_minus)
    H = shaped_leaky_relu(gaussian_product(Z, noise["N_pre"]), s_plus=s_plus, s_minus=s_minus)
    return mlp_sublayer(Z, gaussian_product(H, noise["N_post"]), gamma_mlp2=gamma_mlp2, c=c)


def block_in_law(X: WideTokens, noise: dict, **hyper) -> WideTokens:
    """One block, attention then MLP, in law (`hyper`: the attention and MLP keywords)."""
    Z = attention_in_law(X, noise, gamma_attn2=hyper["gamma_attn2"], tau0=hyper["tau0"],
                       causal=hyper.get("causal", False), shaped=hyper.get("shaped", True))
    return mlp_in_law(Z, noise, gamma_mlp2=hyper["gamma_mlp2"], c_plus=hyper["c_plus"], c_minus=hyper["c_minus"])


def tokens_from_kernel(V0: Kernel, n: int) -> WideTokens:
    r"""$X_0 = \sqrt n\,[\,\mathrm{chol}(V_0)\;|\;0\,] \in \mathbb R^{m\times n}$, so $X_0X_0^\top/n = V_0$."""
    m = V0.shape[-1]
    if V0.shape != (m, m):
        raise ValueError(f"tokens_from_kernel: `V0` must be a square (m, m) kernel; got shape {V0.shape}.")
    if n < m:
        raise ValueError(f"tokens_from_kernel: the width `n` must be >= m = {m}; got n = {n}.")
    L0 = clipped_cholesky(V0)
    return jnp.concatenate([math.sqrt(n) * L0, jnp.zeros((m, n - m), V0.dtype)], axis=1)


_STATIC = ("n", "depth_ratio", "n_blocks", "gamma_attn2", "gamma_mlp2", "tau0", "c_plus", "c_minus",
           "n_k", "causal", "shaped")


@functools.partial(jax.jit, static_argnames=_STATIC)
def shaped_network_kernels(
    key,
    V0: Kernel,
    *,
    n: int,
    depth_ratio: float = 1.0,
    gamma_attn2: float,
    gamma_mlp2: float,
    tau0: float,
    c_plus: float = 0.0,
    c_minus: float = 0.0,
    n_k: int = 16,
    causal: bool = False,
    shaped: bool = True,
    n_blocks: int | None = None,
) -> KernelPath:
    r"""Kernels $V_l = X_lX_l^\top/n$, l = 0..L, of one random shaped transformer at initialisation.

    The network is exact in law (module docstring; docs/shaped_sde.md §1), costs O(L m^2 n) and
    starts from $X_0 = \sqrt n[\mathrm{chol}(V_0)|0]$. It is a pure function of `key`, so
    `jax.vmap` over keys runs many networks at once:
    `jax.vmap(lambda k: shaped_network_kernels(k, V0, n=64, ...))(jax.random.split(key, B))`.
    Every keyword argument is static (jit compiles once per configuration and width).

    Arguments:
        key: PRNG key (one network).
        V0: initial kernel (m, m), positive definite; its dtype sets the computation's dtype.
        n: width. `depth_ratio`: T = L/n, with L = round(T n) blocks (`n_blocks` overrides L).
        gamma_attn2, gamma_mlp2: $\gamma_a^2, \gamma_f^2 \in [0, 1]$; $\lambda^2 = 1 - \gamma^2$.
        tau0: temperature scale, $\tau = \tau_0\sqrt{n n_k}$ (shaped only).
        c_plus, c_minus: shaped leaky-ReLU offsets, $s_\pm = 1 + c_\pm/\sqrt n$.
        n_k: query/key width. causal: masked attention. shaped: False for standard softmax.

    Returns:
        (L + 1, m, m) kernels; layer l sits at depth time t = l/n.
    """
    V0 = jnp.asarray(V0)
    if not jnp.issubdtype(V0.dtype, jnp.floating):
        V0 = V0.astype(jnp.zeros(()).dtype)
    m = V0.shape[-1]
    _check_common("shaped_network_kernels", n=n, n_k=n_k, tau0=tau0, m=m)
    residual_weights(gamma_attn2, name="gamma_attn2")
    residual_weights(gamma_mlp2, name="gamma_mlp2")
    L = n_blocks_for(n, depth_ratio) if n_blocks is None else int(n_blocks)
    if L < 1:
        raise ValueError(f"shaped_network_kernels: `n_blocks` must be >= 1; got {n_blocks!r}.")
    hyper = dict(gamma_attn2=gamma_attn2, gamma_mlp2=gamma_mlp2, tau0=tau0, c_plus=c_plus,
                 c_minus=c_minus, causal=causal, shaped=shaped)

    def step(X, k):
        X = block_in_law(X, block_noise(k, m, n, n_k, V0.dtype), **hyper)
        return X, gram(X)

    X0 = tokens_from_kernel(V0, n)
    _, Vs = jax.lax.scan(step, X0, jax.random.split(key, L))
    return jnp.concatenate([gram(X0)[None], Vs], axis=0)


# -- literal weights: Flax NNX ----------------------------------------------------------------------
def literal_block(X: WideTokens, W_Q, W_K, W_V, W_pre, W_post, *, gamma_attn2, gamma_mlp2, tau0,
                  c_plus, c_minus, causal=False, shaped=True) -> WideTokens:
    r"""One block with given weights: $Q = XW_Q/\sqrt n$, $K = XW_K/\sqrt n$, $Y = XW_V/\sqrt n$,
    $Z$ = `attention_sublayer`, $R = \varphi(ZW_\text{pre}/\sqrt n)W_\text{post}/\sqrt n$,
    $X'$ = `mlp_sublayer` (docs/shaped_sde.md §1)."""
    n = X.shape[-1]
    r = 1.0 / math.sqrt(n)
    Z = attention_sublayer(X, (X @ W_Q) * r, (X @ W_K) * r, (X @ W_V) * r,
                           gamma_attn2=gamma_attn2, tau0=tau0, causal=causal, shaped=shaped)
    s_plus, s_minus, c = relu_slopes(n, c_plus, c_minus)
    H = shaped_leaky_relu((Z @ W_pre) * r, s_plus=s_plus, s_minus=s_minus)
    return mlp_sublayer(Z, (H @ W_post) * r, gamma_mlp2=gamma_mlp2, c=c)


class ShapedTransformer(nnx.Module):
    r"""The finite shaped transformer with literal i.i.d. N(0,1) weights (docs/shaped_sde.md §1).

    Block l holds $W_Q^{(l)}, W_K^{(l)} \in \mathbb R^{n\times n_k}$ and
    $W_V^{(l)}, W_\text{pre}^{(l)}, W_\text{post}^{(l)} \in \mathbb R^{n\times n}$. They are stored
    stacked along a leading depth axis (flax `nnx_toy_examples/06_scan_over_layers.py`) and applied
    with `jax.lax.scan`. Calling the module on X (m, n) returns the kernels $V_l = X_lX_l^\top/n$ at
    l = 0..L. Memory is O(L n^2), so use it for small widths. `shaped_network_kernels` has the same law.

    Arguments:
        n: width. n_blocks: depth L.
        n_k, gamma_attn2, gamma_mlp2, tau0, c_plus, c_minus, causal, shaped: as in
            `shaped_network_kernels`.
        dtype: weight dtype (default: JAX's default float).
        rngs: `nnx.Rngs`; the weights come from `rngs.params()`.
    """

    def __init__(self, n: int, n_blocks: int, *, n_k: int = 16, gamma_attn2: float, gamma_mlp2: float,
                 tau0: float, c_plus: float = 0.0, c_minus: float = 0.0, causal: bool = False,
                 shaped: bool = True, dtype=None, rngs: nnx.Rngs):
        _check_common("ShapedTransformer", n=n, n_k=n_k, tau0=tau0)
        residual_weights(gamma_attn2, name="gamma_attn2")
        residual_weights(gamma_mlp2, name="gamma_mlp2")
        if int(n_blocks) != n_blocks or n_blocks < 1:
            raise ValueError(f"ShapedTransformer: `n_blocks` must be a positive integer; got {n_blocks!r}.")
        dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
        self.n, self.n_blocks, self.n_k = int(n), int(n_blocks), int(n_k)
        self.hyper = dict(gamma_attn2=float(gamma_attn2), gamma_mlp2=float(gamma_mlp2), tau0=float(tau0),
                          c_plus=float(c_plus), c_minus=float(c_minus), causal=bool(causal), shaped=bool(shaped))
        L, nk = self.n_blocks, self.n_k
        # One normal draw, sliced: a single threefry kernel to compile instead of five.
        z = jax.random.normal(rngs.params(), (L, n, 2 * nk + 3 * n), dtype)
        W_Q, W_K, W_V, W_pre, W_post = jnp.split(z, np.cumsum([nk, nk, n, n]), axis=-1)
        self.W_Q, self.W_K, self.W_V = nnx.Param(W_Q), nnx.Param(W_K), nnx.Param(W_V)
        self.W_pre, self.W_post = nnx.Param(W_pre), nnx.Param(W_post)

    def __call__(self, X: WideTokens) -> KernelPath:
        if X.ndim != 2 or X.shape[-1] != self.n:
            raise ValueError(f"ShapedTransformer: `X` must have shape (m, n) with n = {self.n}; got {X.shape}.")
        weights = (self.W_Q[...], self.W_K[...], self.W_V[...], self.W_pre[...], self.W_post[...])

        def step(X, w):
            X = literal_block(X, *w, **self.hyper)
            return X, gram(X)

        _, Vs = jax.lax.scan(step, X, weights)
        return jnp.concatenate([gram(X)[None], Vs], axis=0)
