"""Every script in examples/ runs (with --quick: small sizes) so the tutorials never rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"sheaves_basics.py", "network_tour.py"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, f"{script.name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert res.stdout.strip(), f"{script.name} printed nothing"
    assert "Traceback" not in res.stderr
