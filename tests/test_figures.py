"""The figure catalog: every figure regenerates at --quick size and its key check holds (slow step);
the `meanfield figures` command itself (default suite)."""

import json

import pytest

from meanfield.cli import main
from meanfield.figures import FIGURES, render


def test_figures_command_lists_and_refuses_unknown_names(capsys):
    assert main(["figures"]) == 0
    out = capsys.readouterr().out
    for name in FIGURES:
        assert name in out
    assert main(["figures", "no_such_figure"]) == 2
    assert "unknown figure(s) no_such_figure" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_regenerates_quick_and_its_check_holds(name, tmp_path):
    res = render(name, tmp_path / "out", quick=True)
    assert res.ok, f"{name}: {res.key} = {res.value} (expected {res.expected} +- {res.tolerance})"
    files = list(res.files)
    assert any(f.endswith(".png") for f in files) and any(f.endswith(".json") for f in files)
    payload = json.loads(open(next(f for f in files if f.endswith(".json"))).read())
    assert payload["quick"] is True and payload["check"]["ok"] is True and payload["data"]
