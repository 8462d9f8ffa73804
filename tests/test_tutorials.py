"""Tutorials are executed (with few epochs) so that they cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.py"))


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs(path, tmp_path):
    env = dict(os.environ, CELLVI_TUTORIAL_FAST="1", MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical latents" in result.stdout


def test_tutorials_are_jupytext_percent_notebooks():
    import jupytext

    assert TUTORIALS
    for path in TUTORIALS:
        nb = jupytext.read(path)
        kinds = {c.cell_type for c in nb.cells}
        assert kinds == {"markdown", "code"}
