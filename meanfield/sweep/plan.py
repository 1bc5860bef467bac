"""From a YAML file to a list of sweep points grouped into compile-once batches (pure, no I/O
except reading the file).

Points = product(grid axes) x zip rows x explicit `points`, then `derived` fields evaluated per
point. Each point's full config is validated, so an impossible value anywhere in the sweep
(beta < 0, rho <= 0, n <= 0, a wrong shape) is reported before anything runs.

Points whose configs differ only in traced numbers (floats and seeds, not shapes) share a
`Group`: one jit-compiled, vmapped function runs all of them. Shape-defining integers
(`STATIC_PATHS`) and all strings/booleans split groups.
"""

from __future__ import annotations

import ast
import copy
import pickle
import hashlib
import itertools
import json
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from .config import ExperimentConfig, axis_values

STATIC_PATHS = frozenset(
    {"model.d", "model.hidden", "model.qk_dim", "initial.n", "simulator.n_save", "simulator.max_steps", "dtype"}
)
"""Numeric fields that set array shapes or loop bounds: sweeping them splits compile groups."""


class ConfigError(ValueError):
    """A bad experiment file: the message names the file, the field path and what is allowed."""


@dataclass
class Group:
    """Points that run as one compiled batch."""

    config: ExperimentConfig  # the config of the group's first point
    traced_paths: tuple[str, ...]  # numbers that vary inside the group (passed as arrays)
    indices: np.ndarray  # global point indices
    values: dict[str, np.ndarray]  # traced path -> values per point of the group


@dataclass
class Plan:
    config: ExperimentConfig
    points: list[dict[str, Any]]  # per point: swept path -> value (grid, zip, points, derived)
    axes: list[str]  # swept paths, in order
    groups: list[Group] = field(default_factory=list)

    @property
    def n_points(self) -> int:
        return len(self.points)

    def coords(self) -> dict[str, list]:
        return {a: [p.get(a) for p in self.points] for a in self.axes}

    def grid_axes(self) -> list[str]:
        """Axes of the cartesian grid (in order), for reshaping results into a grid."""
        return list(self.config.sweep.grid)


def _loc(loc) -> str:
    return ".".join(str(x) for x in loc if not (isinstance(x, str) and x in ("function-after", "function-before")))


def _format_validation(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        path = _loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        got_s = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        lines.append(f"{where}: field `{path}`: {msg}{got_s}")
    # pydantic reports every union branch; keep the distinct lines, at most eight.
    seen, out = set(), []
    for line in lines:
        if line not in seen:
            seen.add(line)
            out.append(line)
    return "\n".join(out[:8])


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file.

    Raises:
        ConfigError: missing file, YAML syntax error (with line), or a schema violation
            (with the field path).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such experiment file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: Any, source: str = "<config>", *, check_files: bool = True) -> ExperimentConfig:
    """Validate a parsed config; `check_files` also requires `initial.path` to exist."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the file must hold a mapping (name:, model:, ...); got {type(raw).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, source)) from None
    if cfg.initial.kind == "file" and check_files:
        f = Path(cfg.initial.path)
        if not f.is_absolute() and source not in ("<config>",):
            f = Path(source).parent / f
        if not f.is_file():
            raise ConfigError(f"{source}: field `initial.path`: no such file {str(f)!r}")
    return cfg


def config_hash(cfg: ExperimentConfig) -> str:
    """Hash of everything that changes results (not output location, plots or description)."""
    payload = cfg.model_dump(mode="json", exclude={"output", "plots", "description"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# -- paths into nested configs -----------------------------------------------------------------
def _split(path: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def get_path(tree: Any, path: str) -> Any:
    node = tree
    for part in _split(path):
        node = node[part]
    return node


def set_path(tree: dict, path: str, value: Any) -> None:
    """Set `tree[a][b]... = value` for `path = "a.b..."` (list indices as digits)."""
    parts = _split(path)
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node[part] if (isinstance(node, list) or part in node) else None
        if nxt is None or not isinstance(nxt, (dict, list)):
            # A scalar spec like `V: random` addressed as `V.eye`: replace it with a mapping.
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


# -- derived fields ------------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "exp": math.exp, "abs": abs, "min": min, "max": max,
          "sin": math.sin, "cos": math.cos, "int": int, "float": float}


def evaluate_expression(expr: str, tree: dict) -> float:
    """Arithmetic over config fields, e.g. `"1 / model.beta"` or `"sqrt(model.d) * 2"`.

    Only numbers, + - * / ** % //, field paths and sqrt/log/exp/abs/min/max/sin/cos/int/float.
    """
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        if isinstance(node, (ast.Name, ast.Attribute)):
            parts = []
            while isinstance(node, ast.Attribute):
                parts.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name):
                parts.append(node.id)
                return get_path(tree, ".".join(reversed(parts)))
        raise ValueError(f"unsupported expression element {ast.dump(node)[:40]}")

    return ev(ast.parse(expr, mode="eval"))


# -- planning ------------------------------------------------------------------------------------
def expand_points(cfg: ExperimentConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Sweep points (path -> value) and the ordered list of swept paths (derived last)."""
    sw = cfg.sweep
    grid_axes = list(sw.grid)
    grid_vals = [axis_values(sw.grid[a]) for a in grid_axes]
    zip_axes = list(sw.zip)
    zip_rows = list(zip(*[axis_values(sw.zip[a]) for a in zip_axes])) if zip_axes else [()]
    explicit = sw.points or [{}]
    point_axes = []
    for p in sw.points:
        for k in p:
            if k not in point_axes:
                point_axes.append(k)
    points = []
    for combo in itertools.product(*grid_vals):
        for zrow in zip_rows:
            for extra in explicit:
                pt = dict(zip(grid_axes, combo))
                pt.update(zip(zip_axes, zrow))
                pt.update(extra)
                points.append(pt)
    axes = grid_axes + zip_axes + [a for a in point_axes if a not in grid_axes + zip_axes] + list(sw.derived)
    return points, axes


SHAPED_STATIC_PATHS = frozenset({"simulator.t1", "simulator.dt0", "shaped.m", "shaped.n_paths", "shaped.explode_threshold"})
"""For the shaped SDE the depth T and the step fix the number of Euler-Maruyama steps."""


LYAPUNOV_STATIC_PATHS = frozenset({"simulator.t1"})
"""With `simulator.lyapunov` the depth fixes the number of re-orthonormalisation intervals."""


def _is_traced(path: str, value: Any, kind: str = "particles", lyapunov: bool = False) -> bool:
    static = STATIC_PATHS | (SHAPED_STATIC_PATHS if kind == "shaped_sde" else frozenset())
    if lyapunov:
        static = static | LYAPUNOV_STATIC_PATHS
    if path.startswith("simulator.lyapunov."):
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool) and path not in static


def make_plan(cfg: ExperimentConfig, source: str = "<config>") -> Plan:
    """Expand and validate every sweep point; group them by compiled signature."""
    points, axes = expand_points(cfg)
    base = cfg.model_dump(mode="python", exclude={"sweep"})
    groups: dict[str, dict] = {}
    base_bytes = pickle.dumps(base)  # a fresh copy per point: unpickling is ~5x faster than deepcopy
    for i, pt in enumerate(points):
        tree = pickle.loads(base_bytes)
        for path, value in pt.items():
            if path.split(".")[0] in ("sweep", "output", "plots", "name"):
                raise ConfigError(f"{source}: sweep axis `{path}`: only model, initial, simulator, regimes, seed and dtype fields can be swept")
            set_path(tree, path, value)
        for path, expr in cfg.sweep.derived.items():
            try:
                value = evaluate_expression(expr, tree)
            except Exception as exc:  # noqa: BLE001 - reported with the field path
                raise ConfigError(f"{source}: field `sweep.derived.{path}`: cannot evaluate {expr!r}: {exc}") from None
            set_path(tree, path, value)
            pt[path] = value
        tree["sweep"] = {}
        try:
            point_cfg = ExperimentConfig.model_validate(tree)
        except ValidationError as err:
            desc = ", ".join(f"{k}={v!r}" for k, v in pt.items())
            raise ConfigError(_format_validation(err, f"{source}: sweep point {i} ({desc})")) from None
        dumped = point_cfg.model_dump(mode="python")
        traced = tuple(p for p in pt if _is_traced(p, pt[p], point_cfg.simulator.kind,
                                                      point_cfg.simulator.lyapunov is not None))
        sig_tree = point_cfg.model_dump(mode="json")  # a new dict already
        for p in traced:
            set_path(sig_tree, p, None)
        sig = json.dumps([sig_tree, traced], sort_keys=True, default=str)
        g = groups.setdefault(sig, {"config": point_cfg, "traced": traced, "indices": [], "values": {p: [] for p in traced}})
        g["indices"].append(i)
        for p in traced:
            g["values"][p].append(get_path(dumped, p))
    plan = Plan(config=cfg, points=points, axes=axes)
    for g in groups.values():
        plan.groups.append(
            Group(
                config=g["config"], traced_paths=g["traced"], indices=np.asarray(g["indices"], dtype=np.int64),
                values={p: np.asarray(v) for p, v in g["values"].items()},
            )
        )
    return plan
