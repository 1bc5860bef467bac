"""The training file's schema (`meanfield train FILE.yaml`): pydantic models, every field checked.

A file names one run, or a `grid` of runs (the cartesian product of the listed values of dotted fields,
each run in its own directory under the experiment's). Unknown fields are refused with their path, so a
typo is an error, not a silent default.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..rule.band import BAND
from ..sweep.plan import ConfigError, format_validation, read_yaml_file, set_path, validate_mapping


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataConfig(_Section):
    """Byte-level text. `corpus: stdlib` reads this Python's standard-library `.py` sources in sorted
    order (offline on any machine; its bytes differ between Python versions, so its hash is recorded);
    any other value is a path to a UTF-8 (or any byte) text file, relative to the training file."""

    corpus: str = "stdlib"
    max_bytes: int = Field(4_000_000, ge=10_000, le=2_000_000_000)
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    seq_len: int = Field(128, ge=4, le=8192)
    batch_size: int = Field(16, ge=1, le=4096)


class ModelConfig(_Section):
    """A causal byte-level language model: embedding (256 x d), learned positions or rotary, the NNX
    `Decoder` blocks, a final norm (pre-LN only), and an unembedding (d x 256)."""

    d_model: int = Field(128, ge=4, le=8192)
    n_layers: int = Field(4, ge=1, le=256)
    num_heads: int = Field(4, ge=1)
    hidden: int | None = Field(None, ge=1, description="MLP width (default 4 d_model; SwiGLU: 8/3 d_model rounded)")
    norm: Literal["pre_ln", "post_ln", "none"] = "pre_ln"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(10_000.0, gt=1.0)
    bias: bool = True
    init_std: float = Field(0.02, gt=0.0, le=10.0)
    mlp_out_gain: float = Field(1.0, gt=0.0, le=1000.0, description="W_down's init std = mlp_out_gain x init_std")

    @model_validator(mode="after")
    def _heads(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads: must divide d_model = {self.d_model}; got {self.num_heads}")
        if self.positions == "rope" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"positions: rope needs an even head dimension; d_model / num_heads = "
                             f"{self.d_model // self.num_heads}")
        return self

    @property
    def mlp_hidden(self) -> int:
        if self.hidden is not None:
            return self.hidden
        return 4 * self.d_model if self.mlp == "gelu" else 8 * ((8 * self.d_model // 3 + 7) // 8)


class OptimizerConfig(_Section):
    """optax AdamW on a warm-up + cosine schedule, after clipping the global gradient norm."""

    learning_rate: float = Field(1e-3, gt=0.0, le=10.0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final learning rate / peak")
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    b1: float = Field(0.9, ge=0.0, lt=1.0)
    b2: float = Field(0.95, ge=0.0, lt=1.0)
    clip_norm: float = Field(1.0, gt=0.0)


class TelemetryConfig(_Section):
    """What is measured every `every` steps (and at step 0), on fixed validation windows."""

    every: int = Field(50, ge=1)
    val_batches: int = Field(4, ge=1, le=1000, description="validation windows: val_batches x batch_size")
    probe_sequences: int = Field(8, ge=1, le=1024, description="sequences of the hidden-state effective rank")
    lyapunov_every: int = Field(250, ge=0, description="steps between Lyapunov spectra (0: none); a multiple of `every`")
    lyapunov_k: int = Field(8, ge=1, le=256)
    lyapunov_tokens: int = Field(32, ge=2, le=8192, description="tokens of the Lyapunov probe sequence")

    @model_validator(mode="after")
    def _multiple(self):
        if self.lyapunov_every and self.lyapunov_every % self.every:
            raise ValueError(f"lyapunov_every: must be a multiple of every = {self.every} (or 0); got {self.lyapunov_every}")
        return self


class CheckpointConfig(_Section):
    """Safetensors checkpoints (the names `meanfield weights` reads) every `every` steps and at the end;
    the newest `keep` are kept (0: all). Only the newest holds the optimiser state."""

    every: int = Field(250, ge=1)
    keep: int = Field(2, ge=0)


class GuardConfig(_Section):
    """The spectral guard: after each optimiser update (every `every` steps), W_down of each layer is
    rescaled so that rho = ||W_down W_up||_2 / ||W_attn||_2 lies in `band`."""

    enabled: bool = False
    band: tuple[float, float] = BAND
    attention: Literal["wo", "value"] = "wo"
    every: int = Field(1, ge=1)

    @field_validator("band")
    @classmethod
    def _band(cls, v):
        lo, hi = v
        if not (0.0 < lo < hi):
            raise ValueError(f"must be two numbers 0 < low < high; got {list(v)}")
        return v


class TrainConfig(_Section):
    """One training run (or a grid of them): `meanfield train FILE.yaml`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    description: str = ""
    seed: int = Field(0, ge=0, lt=2**32)
    steps: int = Field(1000, ge=1, le=10_000_000)
    dtype: Literal["float32", "float64"] = "float32"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    guard: GuardConfig = GuardConfig()
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted field -> values; one run per combination")

    @model_validator(mode="after")
    def _check(self):
        if self.telemetry.lyapunov_tokens > self.data.seq_len:
            raise ValueError(f"telemetry.lyapunov_tokens: at most data.seq_len = {self.data.seq_len}; "
                             f"got {self.telemetry.lyapunov_tokens}")
        if self.telemetry.lyapunov_k > self.telemetry.lyapunov_tokens * self.model.d_model:
            raise ValueError("telemetry.lyapunov_k: at most lyapunov_tokens x d_model")
        for path, values in self.grid.items():
            if path.split(".")[0] in ("grid", "name"):
                raise ValueError(f"grid: cannot vary {path!r}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.{path}: must be a non-empty list of values")
        n = math.prod(len(v) for v in self.grid.values()) if self.grid else 1
        if n > 1000:
            raise ValueError(f"grid: {n} runs; at most 1000")
        return self

    def runs(self) -> list[tuple[str, "TrainConfig"]]:
        """(label, config without grid) for every combination; one run `("", self)` without a grid.
        Each combination is validated on its own (a bad value names its grid field)."""
        if not self.grid:
            return [("", self)]
        base = self.model_dump(mode="json", exclude={"grid"})
        out = []
        for combo in itertools.product(*self.grid.values()):
            tree = json.loads(json.dumps(base))
            for path, value in zip(self.grid, combo):
                try:
                    set_path(tree, path, value)
                except (KeyError, IndexError, TypeError, ValueError):
                    raise ConfigError(f"field `grid.{path}`: no such field") from None
            try:
                cfg = TrainConfig.model_validate(tree)
            except ValidationError as err:
                raise ConfigError(format_validation(err, f"grid point {dict(zip(self.grid, combo))}")) from None
            out.append((run_label(dict(zip(self.grid, combo))), cfg))
        return out

    def digest(self) -> str:
        """Hash of everything that decides the numbers (not the description): a resumed run must match."""
        data = self.model_dump(mode="json", exclude={"description"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_label(values: dict[str, Any]) -> str:
    """A directory name for one grid combination: `mlp_out_gain=4,norm=none,guard=true` (a field
    `enabled` is named by its section)."""
    parts = []
    for path, v in values.items():
        names = path.split(".")
        key = names[-2] if names[-1] == "enabled" and len(names) > 1 else names[-1]
        val = json.dumps(v) if not isinstance(v, str) else v
        parts.append(f"{key}={val}".replace("/", "_").replace(" ", ""))
    return ",".join(parts)


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a training file. Raises ConfigError naming the file and the field."""
    raw = read_yaml_file(path, "training file")
    return train_config_from_dict(raw, str(path))


def train_config_from_dict(raw: Any, source: str = "<config>") -> TrainConfig:
    cfg = validate_mapping(TrainConfig, raw, source)
    cfg.runs()  # every grid combination must be valid before anything runs
    return cfg
