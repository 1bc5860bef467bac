"""The package's import graph keeps the layers of docs/architecture.md: no cycle between modules (imports
inside functions included), no private name borrowed across modules, and no arrow back up (a lower layer
importing a higher one). Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "meanfield"

# Layers from the bottom up; a module may import its own layer and the layers below it.
LAYERS = [
    ("meanfield._types", "meanfield._xla_flags", "meanfield._linalg", "meanfield._symeig", "meanfield._display",
     "meanfield._compat", "meanfield._lazy"),
    ("meanfield.model", "meanfield.metrics", "meanfield.initial_tokens", "meanfield.initial"),
    ("meanfield.simulate", "meanfield.regimes", "meanfield.density", "meanfield.shaped", "meanfield.lyapunov",
     "meanfield.control", "meanfield.rule", "meanfield.nets", "meanfield.checkpoints"),
    ("meanfield.sweep", "meanfield.train"),
    ("meanfield.figures",),
    ("meanfield.cli", "meanfield.__main__", "meanfield.checkpoints.cli", "meanfield.train.cli"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(("meanfield",) + p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str):
    """(target module, imported name or None, line) for every import in `name`, at any depth."""
    pkg = name if _is_package(name) else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                yield (sub, None, node.lineno) if sub in MODULES else (mod, a.name, node.lineno)


EDGES = {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def _layer(name: str) -> int:
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > depth:
                best, depth = i, len(p)
    return best


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "meanfield" and _layer(m) is None] == []


def test_no_import_cycle():
    """Package __init__ files only re-export, so they are left out of the cycle search."""
    graph = {m: {t for t in ts if not _is_package(t)} for m, ts in EDGES.items() if not _is_package(m)}
    cycles = []
    for a in graph:
        for b in graph[a]:
            seen, stack = set(), [b]
            while stack:
                x = stack.pop()
                if x == a:
                    cycles.append(f"{a} -> {b} -> ... -> {a}")
                    break
                if x not in seen:
                    seen.add(x)
                    stack.extend(graph.get(x, ()))
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_modules():
    bad = []
    for m in MODULES:
        for target, name, line in _imports(m):
            if name and name.startswith("_") and not name.startswith("__") and target in MODULES:
                if not target.rsplit(".", 1)[-1].startswith("_"):  # a private module's names are its package's
                    bad.append(f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {target}.{name}")
    assert not bad, "\n".join(bad)


def test_no_arrow_back_up():
    up = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
          for m in sorted(MODULES) if m != "meanfield" and not _is_package(m)
          for t in sorted(EDGES[m]) if not _is_package(t) and _layer(t) > _layer(m)]
    assert not up, "\n".join(up)
