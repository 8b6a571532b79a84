"""The docs site stays consistent with the code (CI also runs ``mkdocs build --strict``).

Every ```python block of README.md and docs/**/*.md runs: a page's blocks, with
``--8<--`` snippet includes resolved as mkdocs resolves them, run in order in one
fresh interpreter per page (one torch thread, a CPU-time limit per page), so a page
copied block by block into a new session works as written.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import textwrap
import types
import zlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
PAGE_CPU_SECONDS = 30  # CPU-time limit of one page's blocks together (one thread: CPU time ~ time on a laptop)
PAGE_WALL_SECONDS = 600  # a hung page fails here even on a loaded machine


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


# ---- every python block of every page runs, page by page ------------------------------------------------------

_SNIPPET = re.compile(r'^([ \t]*)--8<-- "([^"]+)"[ \t]*$', re.M)
_MARKER = re.compile(r"--8<-- \[(start|end):([^\]]+)\]")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
                    re.M | re.S)


def _snippet(ref: str) -> str:
    """The text ``--8<-- "path[:section]"`` stands for (the snippets extension's rules, dedented sections)."""
    path, _, section = ref.partition(":")
    lines = (ROOT / path).read_text().splitlines()
    if section:
        start = next(i for i, l in enumerate(lines) if _MARKER.search(l) and _MARKER.search(l).groups() == ("start", section))
        end = next(i for i, l in enumerate(lines) if _MARKER.search(l) and _MARKER.search(l).groups() == ("end", section))
        lines = lines[start + 1:end]
    lines = [l for l in lines if not _MARKER.search(l)]
    return textwrap.dedent("\n".join(lines))


def resolve_snippets(text: str) -> str:
    """``text`` with every snippet line replaced by the (indented) text it includes."""
    return _SNIPPET.sub(lambda m: textwrap.indent(_snippet(m.group(2)), m.group(1)), text)


def python_blocks(text: str) -> list[str]:
    """The fenced code blocks of a markdown text whose language is ``python`` (or ``py``), in order."""
    blocks = []
    for m in _FENCE.finditer(resolve_snippets(text)):
        lang = m.group("info").strip().split(" ")[0].lstrip(".").lower()
        if lang in ("python", "py"):
            blocks.append(textwrap.dedent(m.group("body")))
    return blocks


_RUNNER = r"""
import json, sys, time, traceback, __main__
import torch
torch.set_num_threads(1)
page, blocks = json.load(sys.stdin)
for i, src in enumerate(blocks, 1):
    t0 = time.perf_counter()
    try:
        exec(compile(src, f"<{page} block {i}>", "exec"), __main__.__dict__)
    except BaseException:
        print(f"\n### {page}: block {i} of {len(blocks)} failed:\n{src}", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
    print(f"### block {i}: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
"""

MD_PAGES = [ROOT / "README.md", *PAGES]


def _page_id(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", MD_PAGES, ids=[_page_id(p) for p in MD_PAGES])
def test_page_code_runs_as_copied(page, tmp_path):
    blocks = python_blocks(page.read_text())
    if not blocks:
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")

    def limit_cpu():  # the kernel stops the page (SIGXCPU) once it has used its CPU time
        resource.setrlimit(resource.RLIMIT_CPU, (PAGE_CPU_SECONDS, PAGE_CPU_SECONDS + 5))

    try:
        res = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps([_page_id(page), blocks]), cwd=tmp_path,
                             capture_output=True, text=True, env=env, timeout=PAGE_WALL_SECONDS, preexec_fn=limit_cpu)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{_page_id(page)}: still running after {PAGE_WALL_SECONDS} s (a hang?); blocks done:\n{err.stderr}")
    over = res.returncode in (-9, -24)  # SIGKILL / SIGXCPU: the CPU-time limit
    assert not over, (f"{_page_id(page)}: its {len(blocks)} python blocks need more than {PAGE_CPU_SECONDS} s of CPU "
                      f"time; make the page's sizes smaller (blocks done:\n{res.stderr[-3000:]})")
    assert res.returncode == 0, f"{_page_id(page)}:\n{res.stdout[-2000:]}\n{res.stderr[-6000:]}"


def test_block_extraction_resolves_snippets_and_keeps_order():
    text = 'x\n```python\na = 1\n```\n\n```bash\nls\n```\n\n```python\n--8<-- "examples/sheaves_basics.py:constant"\n```\n'
    blocks = python_blocks(text)
    assert blocks[0] == "a = 1\n" and len(blocks) == 2
    assert "--8<--" not in blocks[1] and "cs.Sheaf()" in blocks[1]
    assert not blocks[1].startswith((" ", "\t"))


# ---- names written in the prose exist ----------------------------------------------------------------------------

_ALIASES = {"cs": "cellsheaf", "csnn": "cellsheaf_nn", "cellsheaf": "cellsheaf", "cellsheaf_nn": "cellsheaf_nn",
            "plots": "cellsheaf_nn.plots", "diagnostics": "cellsheaf_nn.diagnostics", "losses": "cellsheaf_nn.losses",
            "datasets": "cellsheaf_nn.datasets"}
_INSTANCES = ("S", "ns", "state")  # the pages' names for a sheaf, a compiled network and its inferred state
_DOTTED = re.compile(r"`((?:cs|csnn|cellsheaf|cellsheaf_nn|plots|diagnostics|losses|datasets|S|ns|state)"
                     r"(?:\.[A-Za-z_]\w*)+)")


def dotted_names(text: str) -> list[str]:
    """Dotted names such as ``cs.maps.ReLU``, ``csnn.train.SheafTrainer(...)`` or ``ns.infer`` that open an
    inline code span."""
    prose = _FENCE.sub("", text)
    return sorted(set(_DOTTED.findall(prose)))


@functools.cache
def _instances() -> dict:
    """What ``S``, ``ns`` and ``state`` are on the pages: a small sheaf, a compiled network, its state."""
    import torch

    import cellsheaf as cs
    import cellsheaf_nn as csnn

    S = cs.Sheaf()
    S.add_vertex("u", 1)
    S.add_vertex("v", 1)
    S.add_edge("u", "v", torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64))
    S.laplacian()  # fills the operator cache the architecture page describes
    ns = csnn.compile(csnn.mlp([2, 3, 1], seed=0))
    _, state = ns.infer(torch.zeros(1, 2, dtype=ns.dtype), return_state=True)
    return {"S": S, "ns": ns, "state": state}


def _resolve(name: str):
    """What a user typing ``name`` (with ``import cellsheaf as cs, cellsheaf_nn as csnn``) gets: attribute access
    from the top package, as written (``cs.energy.gradient`` fails: ``cs.energy`` is the function)."""
    head, *rest = name.split(".")
    obj = _instances()[head] if head in _INSTANCES else importlib.import_module(_ALIASES[head])
    for part in rest:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if not isinstance(obj, types.ModuleType):
                raise
            try:  # a submodule the package does not import itself (cellsheaf_nn.plots: matplotlib is optional)
                obj = importlib.import_module(f"{obj.__name__}.{part}")
            except ModuleNotFoundError:
                raise AttributeError(f"module {obj.__name__!r} has no attribute or submodule {part!r}") from None
    return obj


def test_dotted_names_resolve_as_written():
    assert _resolve("cs.energy") is importlib.import_module("cellsheaf.energy").energy  # the function
    with pytest.raises(AttributeError):
        _resolve("cs.energy.gradient")  # so this is not a name: the paper map writes `from cellsheaf.energy import`
    assert callable(_resolve("ns.infer")) and _resolve("state.info.converged") is True
    assert dotted_names("`ns.pin(...)`, `S.laplacian()` and `plots.sheaf_graph`") == \
        ["S.laplacian", "ns.pin", "plots.sheaf_graph"]


@pytest.mark.parametrize("page", MD_PAGES, ids=[_page_id(p) for p in MD_PAGES])
def test_dotted_names_in_the_prose_exist(page):
    missing = []
    for name in dotted_names(page.read_text()):
        try:
            _resolve(name)
        except AttributeError as err:
            missing.append(f"{name}: {err}")
    assert not missing, f"{_page_id(page)} names things that do not exist:\n" + "\n".join(missing)


# ---- the built site: no raw roles, maths and highlighting served from the site itself ---------------------------

_RAW_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|data|exc|obj|ref|const|term):")
_REMOTE = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return out


def test_built_site_has_no_raw_sphinx_roles(site):
    bad = {p.relative_to(site).as_posix(): sorted(set(_RAW_ROLE.findall(p.read_text())))
           for p in site.rglob("*.html") if _RAW_ROLE.search(p.read_text())}
    assert not bad, f"raw Sphinx roles in the built site (write `Name` in docstrings): {bad}"


def test_built_site_loads_maths_and_styles_from_itself(site):
    pages = sorted(site.rglob("*.html"))
    remote = {p.relative_to(site).as_posix(): _REMOTE.findall(p.read_text()) for p in pages}
    assert not {k: v for k, v in remote.items() if v}, f"pages load scripts or styles from the network: {remote}"
    home = (site / "index.html").read_text()
    assert 'class="arithmatex"' in home and "assets/katex/katex.min.js" in home and "assets/math.js" in home
    for asset in ("assets/katex/katex.min.js", "assets/katex/katex.min.css", "assets/math.js"):
        assert (site / asset).is_file(), asset
    fonts = set(re.findall(r"url\((fonts/[^)]+)\)", (site / "assets/katex/katex.min.css").read_text()))
    assert fonts and all((site / "assets/katex" / f).is_file() for f in fonts), "a KaTeX font is missing"


def test_nothing_cites_files_outside_the_repository():
    name = "DESIGN" + ".md"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    hits = [f for f in tracked if (ROOT / f).is_file() and not f.endswith((".woff2", ".png"))
            and name in (ROOT / f).read_text(errors="ignore")]
    assert not hits, f"{name} is not part of the repository, but these files cite it: {hits}"


# ---- cross-references: every [`Name`][dotted.path] resolves, and docstrings link what they name ---------------

_UNRESOLVED = re.compile(r"\]\[(?:cellsheaf|cellsheaf_nn)(?:\.\w+)*\]")


def test_built_site_has_no_unresolved_cross_references(site):
    # mkdocs build --strict already fails on one (autorefs warns); this also catches a non-strict build
    bad = {p.relative_to(site).as_posix(): sorted(set(_UNRESOLVED.findall(p.read_text())))
           for p in site.rglob("*.html") if _UNRESOLVED.search(p.read_text())}
    assert not bad, f"cross-references that resolve to no reference entry: {bad}"
    assert 'class="autorefs autorefs-internal"' in (site / "api/solvers/index.html").read_text()


def inventory(site: Path) -> set[str]:
    """The identifiers mkdocstrings registered (objects.inv): what ``[text][identifier]`` can name."""
    raw = (site / "objects.inv").read_bytes().split(b"\n", 4)[4]
    return {line.split(" ", 1)[0] for line in zlib.decompress(raw).decode().splitlines()}


_SPAN = re.compile(r"``.*?``|(?<!\[)`((?:cs|csnn|cellsheaf|cellsheaf_nn)(?:\.[A-Za-z_]\w*)+)(?:\(\))?`(?!\])")


def unlinked_names(source: str, documented: set[str]) -> list[tuple[int, str]]:
    """``(line, name)`` for each full dotted name of a documented object that a docstring writes as a plain
    code span instead of a cross-reference (the Examples sections, which are code, are left alone)."""
    out = []
    lines = source.splitlines()

    def rendered(node):  # the docstrings mkdocstrings shows: module, public classes and functions, __init__
        yield node
        for child in node.body:
            public = not child.name.startswith("_") or child.name == "__init__" if hasattr(child, "name") else False
            if isinstance(child, ast.ClassDef) and public:
                yield from rendered(child)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and public:
                yield child

    for node in rendered(ast.parse(source)):
        if ast.get_docstring(node, clean=False) is None:
            continue
        doc = node.body[0]
        for i in range(doc.lineno - 1, doc.end_lineno):
            if lines[i].strip() in ("Examples", "Example"):
                break
            for m in _SPAN.finditer(lines[i]):
                name = m.group(1)
                if name:
                    head, _, rest = name.partition(".")
                    if f"{_ALIASES[head]}.{rest}" in documented:
                        out.append((i + 1, name))
    return out


def test_docstrings_cross_reference_the_documented_objects_they_name(site):
    documented = inventory(site)
    assert {"cellsheaf.Sheaf", "cellsheaf.sheaf.Sheaf.add_edge", "cellsheaf_nn.neural.NeuralSheaf.infer"} <= documented
    assert unlinked_names('def f():\n    """See `cellsheaf.Sheaf` and [`cs.Sheaf`][cellsheaf.Sheaf]."""\n',
                          documented) == [(2, "cellsheaf.Sheaf")]
    bad = []
    for path in sorted([*(ROOT / "cellsheaf").rglob("*.py"), *(ROOT / "cellsheaf_nn").rglob("*.py")]):
        bad += [f"{path.relative_to(ROOT)}:{line}: `{name}` -> [`{name}`][...]"
                for line, name in unlinked_names(path.read_text(), documented)]
    assert not bad, "write references to documented objects as [`Name`][dotted.path]:\n" + "\n".join(bad)
