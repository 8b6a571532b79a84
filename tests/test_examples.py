"""Every script in examples/ runs, once, so the tutorials never rot.

A script whose every line of code is on the docs pages (included with ``--8<--`` into
```python blocks) is run there, block by block, by ``tests/test_docs.py``; running it again
here would only repeat that work. Every other script runs here as a script, with ``--quick``
(small sizes).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_docs import _FENCE, _MARKER, _SNIPPET, MD_PAGES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _run_lines(source: str, includes: list[str]) -> set[int]:
    """Line numbers (1-based) of ``source`` that ``includes`` (whole file ``""`` or section names) bring in."""
    lines = source.splitlines()
    if "" in includes:
        return set(range(1, len(lines) + 1))
    covered, open_section = set(), None
    for i, line in enumerate(lines, 1):
        m = _MARKER.search(line)
        if m:
            open_section = m.group(2) if m.group(1) == "start" else None
        elif open_section in includes:
            covered.add(i)
    return covered


def uncovered_code(source: str, includes: list[str]) -> list[int]:
    """Lines of code of ``source`` that the included parts miss (blank lines, comments, markers and the
    module docstring are not code)."""
    covered = _run_lines(source, includes)
    tree = ast.parse(source)
    doc = set()
    if ast.get_docstring(tree) is not None:
        node = tree.body[0]
        doc = set(range(node.lineno, node.end_lineno + 1))
    return [i for i, line in enumerate(source.splitlines(), 1)
            if i not in covered and i not in doc and line.strip() and not line.strip().startswith("#")]


def page_includes() -> dict[str, list[str]]:
    """``{examples/x.py: [section, ...]}`` included into the ```python blocks of README.md and docs/, which
    ``tests/test_docs.py`` runs (``""``: the whole file)."""
    out: dict[str, list[str]] = {}
    for page in MD_PAGES:
        for fence in _FENCE.finditer(page.read_text()):
            if fence.group("info").strip().split(" ")[0].lstrip(".").lower() not in ("python", "py"):
                continue
            for ref in _SNIPPET.finditer(textwrap.dedent(fence.group("body"))):
                path, _, section = ref.group(2).partition(":")
                out.setdefault(path, []).append(section)
    return out


INCLUDES = page_includes()
ON_PAGES = [p for p in EXAMPLES if not uncovered_code(p.read_text(), INCLUDES.get(f"examples/{p.name}", []))]
AS_SCRIPTS = [p for p in EXAMPLES if p not in ON_PAGES]


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"sheaves_basics.py", "network_tour.py", "custom_op.py", "train_distributed.py"} <= names
    # the tutorials show every line of their scripts: those run in the page test, not again here
    assert {"sheaves_basics.py", "network_tour.py", "custom_op.py"} <= {p.name for p in ON_PAGES}


def test_a_line_outside_the_included_sections_is_not_covered():
    src = '"""doc"""\nimport os\n# --8<-- [start:a]\nx = 1\n# --8<-- [end:a]\ny = 2\n\n# note\n'
    assert uncovered_code(src, ["a"]) == [2, 6]
    assert uncovered_code(src, [""]) == []
    assert uncovered_code(src, []) == [2, 4, 6]


@pytest.mark.parametrize("script", AS_SCRIPTS, ids=[p.name for p in AS_SCRIPTS])
def test_example_runs(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, f"{script.name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert res.stdout.strip(), f"{script.name} printed nothing"
    assert "Traceback" not in res.stderr
