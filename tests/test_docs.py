"""The docs as written: formulas render as formulas, and every Python block runs.

A fenced ```python block runs with the blocks before it on its page, in one fresh module
per page, in a temporary working directory. A block that is not meant to run alone says so
in the markdown, on the line just before it:

    <!-- docs-test: skip (why it cannot run here) -->
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import markdown
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# the site's pages (docs/examples/ is excluded from it) and the README
SITE_PAGES = sorted(DOCS.glob("*.md"))
PAGES = [ROOT / "README.md", *SITE_PAGES]

# pages whose examples sample real models (seconds each)
SAMPLING_PAGES = {"README.md", "docs/python.md"}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- rendering ---------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """mkdocs.yml may hold tags (``!!python/name:...``, ``!ENV``); they do not matter here."""


_Loader.add_multi_constructor("", lambda loader, suffix, node: None)


@cache
def _markdown() -> markdown.Markdown:
    """A renderer with the markdown extensions mkdocs.yml configures, where installed."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)
    names, configs = [], {}
    for item in config.get("markdown_extensions") or []:
        name, options = next(iter(item.items())) if isinstance(item, dict) else (item, None)
        try:
            markdown.Markdown(extensions=[name], extension_configs={name: options or {}})
        except ImportError:
            continue  # "where available"
        names.append(name)
        configs[name] = options or {}
    return markdown.Markdown(extensions=names, extension_configs=configs)


def render(text: str) -> str:
    md = _markdown()
    md.reset()
    return md.convert(text)


# An emphasis element is formula-like when it is glued to the word before or after it
# (`alpha*x0 + sigma*eps` renders as alpha<em>x0 + sigma</em>eps) or holds an equation.
_EMPHASIS = re.compile(
    r"(?P<before>.?)<(?P<tag>em|strong)>(?P<inner>.*?)</(?P=tag)>(?P<after>.?)", re.S
)


def formula_like_emphasis(html: str) -> list[str]:
    found = []
    for m in _EMPHASIS.finditer(html):
        inner = re.sub(r"<[^>]+>", "", m["inner"])
        glued = re.match(r"[\w)\]]", m["before"]) or re.match(r"[\w(\[]", m["after"])
        if glued or re.search(r"\w\s*[=^]", inner):
            found.append(m[0])
    return found


def test_formula_detector_catches_bare_formulas():
    html = render("the process x_t = alpha*x0 + sigma*eps every plugin shares, *not* OpenAI's")
    assert formula_like_emphasis(html) == ["a<em>x0 + sigma</em>e"]
    assert formula_like_emphasis(render("`alpha*x0 + sigma*eps`, *not* this, **bold**")) == []


@pytest.mark.parametrize("page", SITE_PAGES, ids=rel)
def test_no_formula_renders_as_emphasis(page: Path):
    bad = formula_like_emphasis(render(page.read_text()))
    assert not bad, (
        f"{rel(page)}: `*` in a formula turned into emphasis; put the formula in a code span: {bad}"
    )


# --- the Python blocks -------------------------------------------------------------------

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
_MARKER = re.compile(r"<!--\s*docs-test:(?P<rest>.*?)-->")
_SKIP = re.compile(r"^\s*skip\s*\((?P<reason>[^)]*\S[^)]*)\)\s*$")


@dataclass
class Block:
    page: Path
    line: int  # of the block's first code line, 1-based
    lang: str
    code: str
    skip: str | None  # the marker's reason


def blocks(page: Path) -> list[Block]:
    """Every fenced block of a page, with the skip marker on the line before it, if any."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        lang = m["info"].strip().split(" ")[0].lstrip(".").lower()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.search(prev)
        skip = None
        if marker:
            s = _SKIP.match(marker["rest"])
            assert s, f"{rel(page)}:{i + 1}: write the marker as <!-- docs-test: skip (reason) -->"
            skip = s["reason"].strip()
        start, i = i + 1, i + 1
        while i < len(lines):
            close = lines[i].strip()
            if close.startswith(fence) and not close.strip(fence[0]):
                break
            i += 1
        code = "\n".join(
            line[indent:] if line[:indent].isspace() else line for line in lines[start:i]
        )
        found.append(Block(page, start + 1, lang, code, skip))
        i += 1
    return found


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.lang in ("python", "py")]


def test_every_marker_precedes_a_python_block():
    for page in PAGES:
        text = page.read_text()
        marked = sum(1 for b in blocks(page) if b.skip is not None)
        assert marked == len(_MARKER.findall(text)), (
            f"{rel(page)}: a docs-test marker not before a block"
        )
        for b in blocks(page):
            assert b.skip is None or b.lang in ("python", "py"), (
                f"{rel(page)}:{b.line}: a skip marker on a {b.lang or 'plain'} block, which never runs"
            )


def _page_params() -> list:
    params = []
    for page in PAGES:
        if not page.exists() or not python_blocks(page):
            continue
        marks = [pytest.mark.slow] if rel(page) in SAMPLING_PAGES else []
        params.append(pytest.param(page, id=rel(page), marks=marks))
    return params


@pytest.mark.parametrize("page", _page_params())
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    todo = python_blocks(page)
    runnable = [b for b in todo if b.skip is None]
    if not runnable:
        pytest.skip("; ".join(f"line {b.line}: {b.skip}" for b in todo))
    monkeypatch.chdir(tmp_path)
    name = "docs_" + re.sub(r"\W", "_", rel(page).removesuffix(".md"))
    module = types.ModuleType(name)  # a real module, so dataclasses and pickling work
    monkeypatch.setitem(sys.modules, name, module)
    for block in runnable:
        # padded so that tracebacks show the markdown file's own lines
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(page), "exec"), module.__dict__)
