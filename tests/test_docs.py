"""The docs site stays consistent with the code (fast checks; CI also runs ``mkdocs build --strict``)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_files(value) if isinstance(value, list) else [value]
    return out


def _config() -> dict:
    # mkdocs.yml has no python tags, so a plain safe load reads it
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_every_page_is_in_the_nav_and_every_nav_entry_exists_or_is_the_benchmark_page():
    nav = _nav_files(_config()["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert pages <= set(nav), f"pages missing from the nav: {sorted(pages - set(nav))}"
    # benchmarks-training.md is written by the benchmark run; every other nav entry is a page here
    assert set(nav) - pages <= {"benchmarks-training.md"}


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_snippets_and_api_references_resolve(page):
    text = page.read_text()
    for ref in re.findall(r'--8<-- "([^"]+)"', text):
        path, _, section = ref.partition(":")
        source = (ROOT / path).read_text()
        if section:
            assert f"--8<-- [start:{section}]" in source and f"--8<-- [end:{section}]" in source, ref
    for module in re.findall(r"^::: ([\w.]+)", text, re.M):
        importlib.import_module(module)
