"""The public API: every name in `meanfield.__all__` exists and documents its equation or contract."""

import inspect
import re

import meanfield as mf


def test_every_public_name_has_a_docstring_with_an_equation_or_contract():
    missing = []
    for name in mf.__all__:
        obj = getattr(mf, name)  # AttributeError = a stale __all__
        doc = inspect.getdoc(obj) or ""
        if isinstance(obj, (tuple, str)):  # constants (REGIMES) are documented where defined
            continue
        # an equation ($...$, =, ->) or a stated contract (Returns / Arguments / shape) in >= 30 characters
        if len(doc) < 30 or not re.search(r"\$|=|->|[Rr]eturns|Arguments|Attributes|shape|\(n, d\)", doc):
            missing.append(f"{name}: {doc[:60]!r}")
    assert not missing, "public names without an equation/contract docstring:\n" + "\n".join(missing)


def test_all_is_unique_and_sorted_into_modules():
    assert len(mf.__all__) == len(set(mf.__all__))
    assert mf.__version__


def test_every_public_name_is_in_the_api_reference():
    """The docs' API pages (mkdocstrings `::: meanfield.X` or the index table) cover `mf.__all__`."""
    from pathlib import Path

    api = Path(__file__).resolve().parents[1] / "docs" / "api"
    text = "\n".join(p.read_text() for p in api.glob("*.md"))
    missing = [n for n in mf.__all__ if f"meanfield.{n}" not in text and f"`{n}`" not in text]
    assert not missing, f"public names missing from docs/api: {missing}"


def test_importing_the_library_leaves_the_matplotlib_backend_alone():
    """Notebooks keep their inline backend after `run_experiment` / the figure modules are imported
    (only the command line selects Agg)."""
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('svg'); import meanfield, meanfield.sweep.plots, "
        "meanfield.checkpoints.cli, meanfield.figures.shaped_sde, meanfield.figures.consensus; "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_sources_hold_no_control_characters():
    """A non-raw docstring turns `\\beta` into a backspace and `\\rangle` into a carriage return (seen twice)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = [str(p.relative_to(root)) for d in ("meanfield", "benchmarks", "tests") for p in (root / d).rglob("*.py")
           if any(c in p.read_bytes() for c in (b"\x08", b"\r", b"\x0b", b"\x0c", b"\x07"))]
    assert not bad, f"control characters in {bad}"
