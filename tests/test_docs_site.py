"""The documentation site opened from files, as docs/index.md tells a reader to: nav links land on pages.

Builds the site (mkdocs, `make docs`'s settings) into a temporary folder, opens its index.html from
file:// in headless Chromium, clicks three nav links like a reader would and checks that each lands
on a rendered page, never a directory listing; and that long code lines wrap instead of being cut.
Needs mkdocs (the ``docs`` extra) and Debian's ``chromium``; skipped with a message without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cdp import Browser, find_chromium

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None,
                       reason="chromium is not installed (apt-get install chromium; .ci/run does it)"),
    pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                       reason="mkdocs is not installed (pip install -e '.[docs]'; make docs does it)"),
]
NAV_PAGES = ("The block", "Architecture", "Attention gallery")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def browser():
    b = Browser(CHROMIUM)
    yield b
    b.close()


def _nav_link(b: Browser, title: str) -> str:
    """The href of the nav entry whose text is ``title`` (the primary sidebar, as a reader sees it)."""
    href = b.eval("(() => { const links = Array.from(document.querySelectorAll('nav.md-nav--primary a.md-nav__link'));"
                  f" const a = links.find((l) => l.textContent.trim() === {json.dumps(title)});"
                  " return a ? a.href : null; })()")
    assert href, f"no nav link {title!r} on the page"
    return href


def _click(b: Browser, href: str) -> None:
    """Click the first visible link to ``href`` with the mouse, as a reader would, and wait for the new page.

    The link is scrolled into view first and clicked only once the element under its centre is that
    link (a layout still settling would send the click elsewhere); a link hidden in a collapsed
    section is followed as the browser would follow it.
    """
    after = len(b.events)
    find = ("Array.from(document.querySelectorAll('a')).find((l) => l.href === " + json.dumps(href)
            + " && l.offsetParent !== null)")
    if not b.eval(f"(() => {{ const a = {find}; if (!a) return false; a.scrollIntoView({{block: 'center'}}); "
                  "return true; })()"):
        b.send("Page.navigate", {"url": href})
    else:
        box = None
        for _ in range(50):
            time.sleep(0.05)
            box = b.eval(f"(() => {{ const a = {find}; const r = a.getBoundingClientRect(); "
                         "const x = r.left + r.width / 2, y = r.top + r.height / 2; "
                         "return a.contains(document.elementFromPoint(x, y)) ? [x, y] : null; })()")
            if box:
                break
        assert box, f"the link to {href} never became clickable"
        b.click_at(*box)
    b.wait_event("Page.loadEventFired", after=after)
    time.sleep(0.2)


@pytest.mark.parametrize("title", NAV_PAGES)
def test_a_nav_link_opens_a_page_from_file_urls(site, browser, title):
    browser.open((site / "index.html").as_uri())
    href = _nav_link(browser, title)
    assert href.startswith("file://") and href.endswith(".html"), f"{title!r} links to {href}, not a page file"
    _click(browser, href)
    page = browser.eval("({url: location.href, title: document.title, "
                        "content: !!document.querySelector('article.md-content__inner'), "
                        "listing: document.body.innerText.startsWith('Index of')})")
    assert page["url"] == href
    assert page["content"] and not page["listing"], f"{title!r} opened {page['url']} without its content"


def test_long_code_lines_wrap(site, browser):
    browser.open((site / "architecture.html").as_uri())
    wrap = browser.eval("getComputedStyle(document.querySelector('.md-typeset pre > code')).whiteSpace")
    assert wrap == "pre-wrap"
