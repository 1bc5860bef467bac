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
