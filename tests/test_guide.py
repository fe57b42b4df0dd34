"""The guide cannot rot: every ```python block of docs/guide/*.md runs, in order, one namespace per page.

Each page is one test. Its blocks are compiled with the markdown file's name and line numbers, so
a failing snippet's traceback points at the line of the guide. Blocks run in a temporary working
directory on one torch thread with a fixed seed (conftest.py). The remaining tests check what the
site promises: every chapter is in the mkdocs nav, every picture exists, is small, and has the
command that draws it written beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide"
PAGES = sorted(GUIDE.glob("*.md"))
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
IMAGE = re.compile(r"!\[[^\]]*\]\((img/[^)\s]+)\)")
FIGURE_COMMAND = "make_figures.py"
MAX_IMAGE_BYTES = 200_000


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block, line numbers 1-based as in the file."""
    blocks = []
    for match in FENCE.finditer(text):
        first_line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((first_line, match.group(1)))
    return blocks


def run_page(path: Path) -> dict:
    """Execute the page's blocks in one namespace; returns the namespace."""
    namespace: dict = {"__name__": f"guide_{path.stem.replace('-', '_')}"}
    for first_line, code in python_blocks(path.read_text(encoding="utf-8")):
        padded = "\n" * (first_line - 1) + code  # tracebacks show the guide's own line numbers
        exec(compile(padded, str(path), "exec"), namespace)  # noqa: S102 - the guide is our own code
    return namespace


def test_collector_finds_blocks_and_lines():
    text = "intro\n```python\nx = 1\n```\ntext\n```bash\nls\n```\n```python title=\"t\"\ny = x + 1\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = x + 1\n")]


def test_collector_reports_the_guide_line(tmp_path):
    page = tmp_path / "broken.md"
    page.write_text("# t\n\n```python\nok = 1\nraise RuntimeError('here')\n```\n", encoding="utf-8")
    with pytest.raises(RuntimeError) as info:
        run_page(page)
    frames = [f for f in info.traceback if str(f.path) == str(page)]
    assert frames and frames[-1].lineno + 1 == 5  # pytest's lineno is 0-based


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_guide_page_runs(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if page.name != "index.md":
        assert blocks, f"{page.name} has no ```python block: every chapter pairs its concept with code"
    monkeypatch.chdir(tmp_path)  # a snippet that writes files writes them here
    torch.manual_seed(0)
    run_page(page)


def test_every_chapter_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.name for p in PAGES if f"guide/{p.name}" not in nav]
    assert not missing, f"guide pages missing from mkdocs.yml nav: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_pictures_exist_are_small_and_say_how_they_were_drawn(page):
    lines = page.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        for image in IMAGE.findall(line):
            path = GUIDE / image
            assert path.is_file(), f"{page.name}:{i + 1}: {image} does not exist"
            assert path.stat().st_size < MAX_IMAGE_BYTES, f"{image} is {path.stat().st_size} bytes"
            nearby = "\n".join(lines[max(0, i - 3): i + 4])
            assert FIGURE_COMMAND in nearby, f"{page.name}:{i + 1}: no command beside {image}"
