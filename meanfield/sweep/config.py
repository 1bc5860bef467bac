"""The experiment file schema (YAML), validated with pydantic v2.

Every section forbids unknown keys (a typo is an error, never silently dropped) and every
number is range-checked, so a bad file fails before anything runs, with the field path named.

    name: quickstart
    seed: 0                      # weights and initial tokens derive from it
    model:       {d: 3, attention: softmax, beta: 1.0, mlp: two_layer, norm: sphere, ...}
    initial:     {kind: sphere, n: 32}
    simulator:   {kind: particles, t1: 10.0, n_save: 51, solver: tsit5}
    observables: [effective_rank, rank_one_distance]
    sweep:
      grid:    {model.spectral_ratio: {log: [0.05, 20, 16]}, seed: [0, 1, 2]}
      zip:     {model.beta: [1, 4], model.a_attn: [1, 0.5]}      # advanced together
      points:  [{initial.n: 16}, {initial.n: 64}]                 # explicit list
      derived: {model.a_attn: "1 / model.beta"}                   # computed per point
    output:      {dir: runs/quickstart, memory_budget_gb: 2.0}
    plots:       {regime_map: {x: model.spectral_ratio, y: model.beta}}

Matrices (`Q, K, V, W, W1, W2`, and `initial.cov`) are `random` (seeded, `Model.random`
scalings), an explicit nested list, `{eye: a}` (a I) or `{diag: [...]}`; a sweep can address
their numbers, e.g. `model.V.eye` or `model.V.diag.0`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..metrics import observable_names
from ..model.attention import Blocked, Dense, LowRank
from ..model.params import ATTENTION_ALIASES, ATTENTIONS
from ..simulate.attention_policy import Auto
from ..simulate.solvers import SOLVERS

DEFAULT_OBSERVABLES = {
    "particles": ("effective_rank", "stable_rank", "rank_one_distance", "consensus_distance", "mean_cosine", "rms_norm"),
    "gaussian": ("cov_trace", "cov_logdet", "cov_condition", "numerical_rank", "effective_rank", "rank_one_distance",
                 "mean_norm"),
    "shaped_sde": ("corr_mean", "corr_q10", "corr_q90", "exploded_fraction", "min_eig"),
}
"""The observables recorded when `observables:` is not given, per simulator (names of `metrics.OBSERVABLES`)."""


DEFAULT_MAX_POINTS = 1_000_000
"""`output.max_points`: a sweep larger than this is refused before any point is expanded."""


FLOAT32_MAX = 3.4028234663852886e38


def float32_overflow(node, path: str) -> str | None:
    """A message for the first number in `node` (nested dicts/lists under `path`) beyond float32's
    range, else None: a finite YAML number can still be inf in a float32 solve (`meanfield.sweep.plan`
    checks the base config once and each sweep point's swept values)."""
    if isinstance(node, float) and abs(node) > FLOAT32_MAX:
        return f"field `{path}`: {node:g} overflows float32 (largest {FLOAT32_MAX:.3g}); use `dtype: float64`"
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for k, v in items:
        if (msg := float32_overflow(v, f"{path}.{k}")) is not None:
            return msg
    return None


class _Strict(BaseModel):
    # NaN and inf are never valid inputs: a NaN weight would run and be labelled a regime.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Eye(_Strict):
    """a * identity."""

    eye: float


class Diag(_Strict):
    """diag(values)."""

    diag: list[float] = Field(min_length=1)


MatrixSpec = Literal["random"] | Eye | Diag | list[list[float]]


class ModelConfig(_Strict):
    d: int = Field(ge=1, le=4096, description="token dimension")
    attention: str = "softmax"
    causal: bool = False
    beta: float = Field(1.0, ge=0, description="inverse temperature")
    a_attn: float = 1.0
    mlp: Literal["none", "affine", "two_layer"] = "two_layer"
    activation: Literal["relu", "tanh", "gelu"] = "gelu"
    hidden: int | None = Field(None, ge=1, description="MLP hidden width (default 4d)")
    qk_dim: int | None = Field(None, ge=1, description="query/key dimension (default d)")
    a_mlp: float = 1.0
    norm: Literal["none", "sphere"] = "none"
    Q: MatrixSpec = "random"
    K: MatrixSpec = "random"
    V: MatrixSpec = "random"
    W: MatrixSpec = "random"
    W1: MatrixSpec = "random"
    W2: MatrixSpec = "random"
    b: float | list[float] = 0.0
    spectral_ratio: float | None = Field(
        None, gt=0, description="rescale the MLP branch so ||a_mlp W_eff|| / ||a_attn V|| equals this"
    )

    @field_validator("attention")
    @classmethod
    def _attention(cls, v: str) -> str:
        if v.lower() not in ATTENTIONS and v.lower() not in ATTENTION_ALIASES:
            raise ValueError(f"must be one of {list(ATTENTIONS) + sorted(ATTENTION_ALIASES)}; got {v!r}")
        return v.lower()

    @model_validator(mode="after")
    def _shapes(self):
        d = self.d
        k = self.qk_dim or d
        h = self.hidden or 4 * d
        expect = {"Q": (k, d), "K": (k, d), "V": (d, d), "W": (d, d), "W1": (h, d), "W2": (d, h)}
        for name, shape in expect.items():
            spec = getattr(self, name)
            if isinstance(spec, list):
                got = (len(spec), len(spec[0]) if spec else 0)
                if got != shape or any(len(row) != shape[1] for row in spec):
                    raise ValueError(f"{name}: explicit matrix must have shape {shape}; got {got}")
            elif isinstance(spec, Eye) and shape[0] != shape[1]:
                raise ValueError(f"{name}: {{eye: ...}} needs a square matrix; shape is {shape}")
            elif isinstance(spec, Diag) and len(spec.diag) != min(shape):
                raise ValueError(f"{name}: {{diag: [...]}} must hold {min(shape)} values; got {len(spec.diag)}")
        if isinstance(self.b, list) and len(self.b) != d:
            raise ValueError(f"b: must hold d = {d} values; got {len(self.b)}")
        if self.spectral_ratio is not None and (self.mlp == "none" or self.attention == "none"):
            raise ValueError("spectral_ratio: needs both an MLP and attention")
        return self


class InitialConfig(_Strict):
    kind: Literal["gaussian", "sphere", "hemisphere", "file"] = "gaussian"
    n: int = Field(64, ge=1, le=10_000_000, description="number of tokens (particles)")
    mean: float | list[float] = 0.0
    cov: float | Eye | Diag | list[list[float]] = Field(1.0, description="a scalar s means s * I")
    direction: list[float] | None = None
    path: str | None = Field(None, description="a .npy file of shape (n, d) (kind: file)")

    @model_validator(mode="after")
    def _kind(self):
        if self.kind == "file" and not self.path:
            raise ValueError("path: required when kind is 'file'")
        if isinstance(self.cov, float) and self.cov < 0:
            raise ValueError(f"cov: a scalar covariance must be >= 0; got {self.cov}")
        if isinstance(self.cov, Eye) and self.cov.eye < 0:
            raise ValueError(f"cov: {{eye: a}} must have a >= 0; got {self.cov.eye}")
        if isinstance(self.cov, Diag) and min(self.cov.diag) < 0:
            raise ValueError(f"cov: a covariance's diagonal must be >= 0; got {self.cov.diag}")
        if isinstance(self.cov, list):
            _check_covariance(self.cov)
        return self


def _check_covariance(rows: list[list[float]]) -> None:
    """An explicit covariance must be symmetric and positive semidefinite (it is never "repaired")."""
    import numpy as np

    if not rows or any(len(r) != len(rows) for r in rows):
        raise ValueError(f"cov: an explicit covariance must be square; got {len(rows)} rows of lengths "
                         f"{sorted({len(r) for r in rows})}")
    S = np.asarray(rows, dtype=np.float64)
    scale = max(float(np.max(np.abs(S))), np.finfo(np.float64).tiny)
    asym = float(np.max(np.abs(S - S.T)))
    if asym > 1e-12 * scale:
        raise ValueError(f"cov: not symmetric (largest |S - S^T| entry {asym:.3g})")
    lam = float(np.linalg.eigvalsh(S)[0])
    if lam < -1e-12 * scale * len(rows):
        raise ValueError(f"cov: not positive semidefinite (smallest eigenvalue {lam:.3g})")


class ShapedConfig(_Strict):
    """The shaped transformer's kernel SDE (Noci et al. 2023; meanfield.shaped, docs/shaped_sde.md)."""

    m: int = Field(2, ge=2, le=64, description="number of tokens (kernel size)")
    corr0: float = Field(0.3, gt=-1, lt=1, description="initial correlation: V0 = (1 - corr0) I + corr0 11^T")
    gamma_attn2: float = Field(0.3, ge=0, le=1, description="attention branch weight gamma_a^2")
    gamma_mlp2: float = Field(0.2, ge=0, le=1, description="MLP branch weight gamma_f^2")
    tau0: float = Field(0.5, gt=0, description="logit temperature scale (tau = tau0 sqrt(n n_k))")
    c_plus: float = 1.0
    c_minus: float = -1.0
    n_paths: int = Field(1000, ge=1, le=1_000_000)
    explode_threshold: float = Field(1e4, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data):
        if isinstance(data, dict) and "rho0" in data:  # rho is the spectral ratio everywhere else
            raise ValueError(f"shaped.rho0 was replaced by shaped.corr0 (the initial correlation): corr0: {data['rho0']}")
        return data


def _solver_name(v: str) -> str:
    if v.lower() not in SOLVERS:
        raise ValueError(f"must be one of {list(SOLVERS)}; got {v!r}")
    return v.lower()


SolverName = Annotated[str, AfterValidator(_solver_name)]


class LyapunovConfig(_Strict):
    """Leading Lyapunov exponents over [discard, t1] (QR method, `meanfield.lyapunov`), stored per point."""

    k: int = Field(3, ge=1, le=64, description="number of exponents")
    interval: float = Field(0.5, gt=0, description="re-orthonormalisation interval (depth)")
    discard: float = Field(0.0, ge=0, description="initial depth left out of the average")
    solver: SolverName = Field("rk4", description="solver of the tangent system (fixed-step rk4 is lockstep-friendly)")
    dt0: float = Field(0.05, gt=0, description="step of a fixed-step tangent solver")


FIXED_STEP_SOLVERS = ("rk4", "euler", "heun", "midpoint")


class AutoAttentionConfig(_Strict):
    """`auto`: the low-rank sum where its a priori bound meets `rtol` and it is faster (from 2048 tokens,
    small d; the group then runs point by point), else the direct sum (dense up to 4096 tokens)."""

    kind: Literal["auto"] = "auto"
    rtol: float | None = Field(None, gt=0, lt=1, description="error bound of the low-rank path "
                                                             "(default 1e-6 float32, 1e-12 float64)")

    def evaluator(self):
        return Auto(rtol=self.rtol)


class DenseAttentionConfig(_Strict):
    """`dense`: the direct sum with the (n, n) logit matrix."""

    kind: Literal["dense"] = "dense"

    def evaluator(self):
        return Dense()


class BlockedAttentionConfig(_Strict):
    """`blocked`: the direct sum by the online softmax over key blocks (O(n) memory)."""

    kind: Literal["blocked"] = "blocked"
    block_size: int = Field(1024, ge=1, le=1 << 16, description="tokens per block")

    def evaluator(self):
        return Blocked(block_size=self.block_size)


class LowRankAttentionConfig(_Strict):
    """`lowrank`: separable Chebyshev attention for d <= 4 (orders planned per group; points then run one
    at a time, unvmapped, so the in-jit fallback to the blocked sum stays a real branch)."""

    kind: Literal["lowrank"] = "lowrank"
    rtol: float | None = Field(None, gt=0, lt=1, description="error bound of the low-rank path "
                                                             "(default 1e-6 float32, 1e-12 float64)")

    def evaluator(self):
        return LowRank(rtol=self.rtol)


AttentionConfig = Annotated[
    AutoAttentionConfig | DenseAttentionConfig | BlockedAttentionConfig | LowRankAttentionConfig,
    Field(discriminator="kind"),
]
"""`simulator.attention`: one of the evaluators `meanfield.Auto`, `Dense`, `Blocked`, `LowRank`, by `kind`."""

REPLACED_ATTENTION_KEYS = ("attention_impl", "attention_method", "attention_rtol")
"""Simulator keys of earlier versions, refused with the `attention` value that replaces them."""


def _attention_replacement(data: dict) -> str:
    """The `simulator.attention` value (YAML) equivalent to the replaced keys in `data`."""
    impl, method, rtol = (data.get(k) for k in REPLACED_ATTENTION_KEYS)
    if method == "lowrank":
        return "lowrank" if rtol is None else f"{{kind: lowrank, rtol: {rtol}}}"
    if impl in ("dense", "blocked"):
        return impl
    return "auto" if rtol is None else f"{{kind: auto, rtol: {rtol}}}"


class SimulatorConfig(_Strict):
    kind: Literal["particles", "gaussian", "shaped_sde"] = "particles"
    t1: float = Field(10.0, gt=0, description="final depth")
    n_save: int = Field(51, ge=2, le=100_000)
    solver: SolverName = "tsit5"
    dt0: float | None = Field(None, gt=0)
    rtol: float | None = Field(None, gt=0)
    atol: float | None = Field(None, gt=0)
    max_steps: int = Field(16_384, ge=1)
    attention: AttentionConfig = Field(
        default_factory=AutoAttentionConfig,
        description="attention evaluator of particle simulations: auto | dense | blocked | lowrank, or a mapping "
                    "such as {kind: blocked, block_size: 512} / {kind: lowrank, rtol: 1.0e-4}")
    blowup_threshold: float | None = Field(None, gt=1)
    lyapunov: LyapunovConfig | None = Field(None, description="also compute Lyapunov exponents (particles, gaussian)")

    @model_validator(mode="before")
    @classmethod
    def _replaced_attention_keys(cls, data):
        if isinstance(data, dict):
            for key in REPLACED_ATTENTION_KEYS:
                if key in data:
                    raise ValueError(f"simulator.{key} was replaced by simulator.attention: "
                                     f"{_attention_replacement(data)}")
        return data

    @field_validator("attention", mode="before")
    @classmethod
    def _attention_shorthand(cls, v):
        return {"kind": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _fixed_step(self):
        if self.solver in FIXED_STEP_SOLVERS:
            if self.dt0 is None:
                raise ValueError(f"dt0: the fixed-step solver {self.solver!r} needs a step size")
            needed = math.ceil(self.t1 / self.dt0 - 1e-9)
            if self.kind != "shaped_sde" and needed > self.max_steps:
                raise ValueError(f"max_steps: the fixed-step solver {self.solver!r} with dt0 = {self.dt0:g} needs "
                                 f"{needed} steps to reach t1 = {self.t1:g}; max_steps is {self.max_steps} "
                                 "(raise max_steps or dt0)")
        return self


class RegimeConfig(_Strict):
    collapse_tol: float = Field(1e-2, gt=0, lt=1)
    growth_limit: float = Field(1e6, gt=1)


class LinSpec(_Strict):
    lin: tuple[float, float, int]


class LogSpec(_Strict):
    log: tuple[float, float, int]

    @field_validator("log")
    @classmethod
    def _positive(cls, v):
        if v[0] <= 0 or v[1] <= 0:
            raise ValueError(f"log-spaced bounds must be > 0; got {list(v)}")
        return v


class RangeSpec(_Strict):
    range: tuple[float, float, float]


AxisSpec = Annotated[LinSpec | LogSpec | RangeSpec | list[Any], Field(union_mode="left_to_right")]


def axis_length(spec) -> int:
    """The number of values of one sweep axis, without making them (a 10^11-point axis costs nothing)."""
    if isinstance(spec, (LinSpec, LogSpec)):
        return max(0, (spec.lin if isinstance(spec, LinSpec) else spec.log)[2])
    if isinstance(spec, RangeSpec):
        start, stop, step = spec.range
        if step == 0:
            raise ValueError("range step must be non-zero")
        return max(0, math.ceil((stop - start) / step))
    return len(spec)


def axis_values(spec) -> list:
    """The values of one sweep axis."""
    if isinstance(spec, LinSpec):
        a, b, n = spec.lin
        return [a + (b - a) * i / (n - 1) if n > 1 else a for i in range(n)]
    if isinstance(spec, LogSpec):
        a, b, n = spec.log
        la, lb = math.log(a), math.log(b)
        return [math.exp(la + (lb - la) * i / (n - 1)) if n > 1 else a for i in range(n)]
    if isinstance(spec, RangeSpec):
        start, stop, step = spec.range
        if step == 0:
            raise ValueError("range step must be non-zero")
        n = max(0, math.ceil((stop - start) / step))
        vals = [start + i * step for i in range(n)]
        return [int(v) if float(v).is_integer() and all(float(x).is_integer() for x in spec.range) else v for v in vals]
    return list(spec)


class SweepConfig(_Strict):
    grid: dict[str, AxisSpec] = Field(default_factory=dict)
    zip: dict[str, AxisSpec] = Field(default_factory=dict)
    points: list[dict[str, Any]] = Field(default_factory=list)
    derived: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _axes(self):
        for section in ("grid", "zip"):
            for path, spec in getattr(self, section).items():
                if axis_length(spec) == 0:
                    raise ValueError(f"{section}.{path}: the axis has no values")
        lengths = {p: axis_length(s) for p, s in self.zip.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"zip: every zipped axis must have the same length; got {lengths}")
        seen: dict[str, str] = {}
        for section, paths in (("grid", self.grid), ("zip", self.zip), ("derived", self.derived)):
            for p in paths:
                if p in seen:
                    raise ValueError(f"{section}.{p}: the field is already swept in {seen[p]}")
                seen[p] = section
        return self

    def n_points(self) -> int:
        """grid product x zip length x explicit points, counted from the axis sizes alone."""
        n = math.prod(axis_length(s) for s in self.grid.values())
        if self.zip:
            n *= axis_length(next(iter(self.zip.values())))
        return n * max(1, len(self.points))

    def axis_names(self) -> list[str]:
        """Every swept path: grid, zip, explicit points' keys, derived."""
        names = list(self.grid) + list(self.zip)
        for p in self.points:
            names += [k for k in p if k not in names]
        return names + [k for k in self.derived if k not in names]


class RegimeMapPlot(_Strict):
    x: str
    y: str
    observable: str | None = Field(None, description="annotated final value (default: effective_rank if recorded, "
                                                     "else the first recorded observable)")
    facet: str | None = Field(None, description="a third axis: one panel per value")


class CurvesPlot(_Strict):
    observable: str | None = Field(None, description="default: effective_rank if recorded, else the first recorded")
    hue: str | None = None


class PlotsConfig(_Strict):
    regime_map: RegimeMapPlot | None = None
    curves: CurvesPlot | None = Field(default_factory=CurvesPlot)
    formats: list[Literal["png", "pdf"]] = Field(default_factory=lambda: ["png", "pdf"])


class OutputConfig(_Strict):
    dir: str | None = Field(None, description="default: runs/<name>")
    chunk_size: int | None = Field(None, ge=1, description="points per compiled batch (default: from the memory budget)")
    memory_budget_gb: float = Field(2.0, gt=0)
    lanes: int | None = Field(None, ge=1, description="ensemble integrator lanes per device (default: min(chunk, 256))")
    max_points: int = Field(DEFAULT_MAX_POINTS, ge=1, description="refuse sweeps with more points (counted before "
                                                                  "anything is expanded)")


class ExperimentConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seed: int = Field(0, ge=0, lt=2**31)
    dtype: Literal["float32", "float64"] = "float32"
    model: ModelConfig | None = None
    shaped: ShapedConfig | None = None
    initial: InitialConfig = Field(default_factory=InitialConfig)
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    observables: list[str] | None = None
    regimes: RegimeConfig = Field(default_factory=RegimeConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    plots: PlotsConfig = Field(default_factory=PlotsConfig)

    @model_validator(mode="after")
    def _consistency(self):
        sim, model, init = self.simulator, self.model, self.initial
        n = self.sweep.n_points()
        if n > self.output.max_points:
            raise ValueError(f"sweep: {n:,} points is more than output.max_points = {self.output.max_points:,}; "
                             "raise output.max_points if you mean it")
        self._check_plots()
        if sim.kind == "shaped_sde":
            if self.shaped is None:
                raise ValueError("shaped: the shaped_sde simulator needs a `shaped:` section")
            if sim.dt0 is None:
                raise ValueError("simulator.dt0: the shaped_sde simulator needs the Euler-Maruyama step")
            n_steps = round(sim.t1 / sim.dt0)
            if abs(n_steps * sim.dt0 - sim.t1) > 1e-9 * max(1.0, sim.t1) or sim.n_save > n_steps + 1:
                raise ValueError(f"simulator.dt0: t1 / dt0 must be an integer >= n_save - 1; got t1 = {sim.t1}, dt0 = {sim.dt0}")
            if sim.lyapunov is not None:
                raise ValueError("simulator.lyapunov: not available for shaped_sde (a stochastic kernel flow)")
            self._check_observables()
            return self
        if model is None:
            raise ValueError(f"model: required for the {sim.kind} simulator")
        if sim.attention.kind == "lowrank":
            if sim.kind != "particles":
                raise ValueError(f"simulator.attention: 'lowrank' is for particle simulations; got kind {sim.kind!r}")
            if model.attention not in ("softmax", "unnormalised", "causal"):
                raise ValueError("simulator.attention: 'lowrank' needs softmax or unnormalised attention; "
                                 f"got model.attention = {model.attention!r}")
        if sim.lyapunov is not None:
            if sim.kind == "particles":  # on the sphere: the product of spheres' dimension
                dim = init.n * (model.d - 1 if model.norm == "sphere" else model.d)
            else:
                dim = model.d + model.d * (model.d + 1) // 2
            if sim.lyapunov.k > dim:
                raise ValueError(f"simulator.lyapunov.k: at most the state dimension {dim}; got {sim.lyapunov.k}")
            if sim.lyapunov.discard >= sim.t1:
                raise ValueError(f"simulator.lyapunov.discard: must be < t1 = {sim.t1}; got {sim.lyapunov.discard}")
        self._check_observables()
        if sim.kind == "gaussian":
            if init.kind != "gaussian":
                raise ValueError(f"initial.kind: the gaussian simulator needs kind 'gaussian'; got {init.kind!r}")
            from ..model.field import gaussian_closure_error
            from types import SimpleNamespace

            # The closure depends on the structural choices alone: a plain probe (building a Model
            # here cost 3 ms per sweep point, 43 s of planning for 10^4 points).
            attention, causal = model.attention.lower(), model.causal
            if attention in ATTENTION_ALIASES:
                attention, implied = ATTENTION_ALIASES[attention]
                causal = causal or implied
            why = gaussian_closure_error(SimpleNamespace(attention=attention, causal=causal, mlp=model.mlp,
                                                         norm=model.norm))
            if why:
                raise ValueError(f"simulator.kind: 'gaussian' has no exact closure here: {why}")
        if isinstance(init.mean, list) and len(init.mean) != model.d:
            raise ValueError(f"initial.mean: must hold d = {model.d} values; got {len(init.mean)}")
        if isinstance(init.cov, list) and (len(init.cov) != model.d or any(len(r) != model.d for r in init.cov)):
            raise ValueError(f"initial.cov: explicit covariance must be {model.d} x {model.d}")
        if isinstance(init.cov, Diag) and len(init.cov.diag) != model.d:
            raise ValueError(f"initial.cov: {{diag: [...]}} must hold d = {model.d} values")
        if init.direction is not None and len(init.direction) != model.d:
            raise ValueError(f"initial.direction: must hold d = {model.d} values")
        return self

    def _check_observables(self) -> None:
        """Every named observable must be one the simulator can record (`metrics.OBSERVABLES`)."""
        allowed = observable_names(self.simulator.kind)
        for name in self.observables or ():
            if name not in allowed:
                raise ValueError(f"observables: {name!r} is not available for {self.simulator.kind}; "
                                 f"allowed: {list(allowed)}")

    def _check_plots(self) -> None:
        """Plot axes must be swept and plot observables recorded: a typo fails here, not after the run."""
        axes = self.sweep.axis_names()
        names = self.observable_names()
        rm, curves = self.plots.regime_map, self.plots.curves
        for field, axis in (("regime_map.x", rm and rm.x), ("regime_map.y", rm and rm.y),
                            ("regime_map.facet", rm and rm.facet), ("curves.hue", curves and curves.hue)):
            if axis and axis not in axes:
                raise ValueError(f"plots.{field}: {axis!r} is not a sweep axis; swept: {axes or 'nothing'}")
        for field, obs in (("regime_map.observable", rm and rm.observable), ("curves.observable", curves and curves.observable)):
            if obs and obs not in names:
                raise ValueError(f"plots.{field}: {obs!r} is not recorded; recorded: {names}")

    def plot_observable(self, chosen: str | None) -> str:
        """The observable a plot shows: the chosen one, else effective_rank if recorded, else the first."""
        names = self.observable_names()
        return chosen or ("effective_rank" if "effective_rank" in names else names[0])

    def observable_names(self) -> list[str]:
        """The observables recorded over depth (defaults per simulator)."""
        if self.observables:
            return list(self.observables)
        return list(DEFAULT_OBSERVABLES[self.simulator.kind])
