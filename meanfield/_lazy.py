"""Module attributes imported on first use (PEP 562), so `import meanfield` and the `meanfield` command
do not pay for Flax, optax and SciPy until a caller needs them.

    __getattr__, __dir__ = lazy_attributes(__name__, {"steer": ".control", "nets": "."}, globals())

maps a public name to the module that defines it (relative to the package); `"."` means the name is
itself a submodule of the package.
"""

from __future__ import annotations

import importlib


def lazy_attributes(package: str, names: dict[str, str], namespace: dict):
    """(`__getattr__`, `__dir__`) for `package`: `names[name]` is the module holding `name` ("." for
    a submodule named `name`); the first access imports it and caches the value in `namespace`."""

    def __getattr__(name: str):
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if where == ".":
            value = importlib.import_module(f"{package}.{name}")
        else:
            value = getattr(importlib.import_module(where, package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
