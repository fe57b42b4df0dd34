"""The attention page in headless Chromium: switch layer and head, hover tokens, read back and screenshot.

Needs Debian's ``chromium`` (.ci/run installs it); skipped with a message when it is absent.
The page is driven through the DevTools protocol (tests/cdp.py, standard library only).
"""

from __future__ import annotations

import io
import time

import pytest
import torch
from PIL import Image

from qkv.attention_maps import AttentionGroup, AttentionSet
from qkv.attention_page import write_page
from tests.cdp import Browser, find_chromium

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; "
                                                         ".ci/run does it): the browser test is skipped")
RED = (255, 23, 68)


def peaked(T: int, S: int, shift) -> torch.Tensor:
    """(T, S) weights: query i puts 0.7 on key shift(i), the rest spread evenly."""
    w = torch.full((T, S), 0.3 / (S - 1))
    for i in range(T):
        w[i, shift(i) % S] = 0.7
    return w


def designed() -> AttentionSet:
    """Encoder self-attention (6 tokens) and cross-attention (4 x 6), 2 layers x 3 heads, each with a known peak."""
    src, tgt = ["Ein", "Hund", "läuft", "</script>", "schnell", "</s>"], ["A", "dog", "runs", "</s>"]
    enc = {n: torch.stack([peaked(6, 6, lambda i, h=h, n=n: i + h + n) for h in range(3)]) for n in range(2)}
    cross = {n: torch.stack([peaked(4, 6, lambda i, h=h, n=n: 2 * i + h + n) for h in range(3)]) for n in range(2)}
    groups = [AttentionGroup("encoder", src, src, enc), AttentionGroup("cross", tgt, src, cross)]
    return AttentionSet("designed", groups)


@pytest.fixture(scope="module")
def browser():
    b = Browser(CHROMIUM)
    yield b
    b.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    return write_page(designed(), tmp_path_factory.mktemp("page") / "designed.html")


def state(b: Browser) -> dict:
    return b.eval("(() => { const c = document.getElementById('heatmap'); return {...document.body.dataset, "
                  "row: c.dataset.row, col: c.dataset.col, "
                  "weights: Array.from(document.querySelectorAll('#keys .tok')).map((s) => s.dataset.w), "
                  "top: Array.from(document.querySelectorAll('#keys .tok.top')).map((s) => Number(s.dataset.i)), "
                  "readout: document.getElementById('readout').textContent}; })()")


def heatmap_pixel(b: Browser, row: int, col: int, *, edge: bool) -> tuple[int, int, int]:
    """The screenshot's colour at a heatmap cell: mid top edge (where the highlight box is drawn) or its centre."""
    box = b.eval("(() => { const r = document.getElementById('heatmap').getBoundingClientRect(); "
                 "return [r.left, r.top, r.width, r.height]; })()")
    cell = b.eval("document.getElementById('heatmap').width") // 6
    shot = Image.open(io.BytesIO(b.screenshot({"x": box[0], "y": box[1], "width": box[2], "height": box[3]})))
    return shot.convert("RGB").getpixel((col * cell + cell // 2, row * cell + (2 if edge else cell // 2)))


def test_switching_layer_and_head_moves_the_highlighted_cell(browser, page):
    b = browser
    b.open(page.as_uri())
    s = state(b)
    assert (s["group"], s["layer"], s["head"]) == ("cross", "1", "0")  # the alignment, last layer, first head
    b.hover('#queries .tok[data-i="1"]')
    expected = designed().groups[1].layers
    for layer, head in ((1, 0), (1, 2), (0, 2), (0, 1)):
        b.select("#layer", str(layer))
        b.select("#head", str(head))
        s = state(b)
        peak = (2 * 1 + head + layer) % 6
        assert (s["layer"], s["head"], s["query"]) == (str(layer), str(head), "1")
        assert (s["row"], s["col"], s["top"]) == ("1", str(peak), [peak])
        assert [float(w) for w in s["weights"]] == pytest.approx(expected[layer][head, 1].tolist(), abs=1e-4)
        assert s["readout"].startswith('query #1 "dog" -> ')
        assert heatmap_pixel(b, 1, peak, edge=True) == RED  # the screenshot shows the highlight there
        assert heatmap_pixel(b, 1, peak, edge=False) != RED
        for other in set(range(6)) - {peak}:
            assert heatmap_pixel(b, 1, other, edge=True) != RED
    assert b.problems() == []


def test_screenshots_differ_between_heads_and_match_when_switched_back(browser, page):
    b = browser
    b.open(page.as_uri())
    b.hover('#queries .tok[data-i="2"]')

    def shot():  # the heatmap and the token panels (the focused <select> itself changes its look)
        box = b.eval("(() => { const r = document.querySelector('main').getBoundingClientRect(); "
                     "return [r.left, r.top, r.width, r.height]; })()")
        return Image.open(io.BytesIO(b.screenshot(dict(zip(("x", "y", "width", "height"), box))))).convert("RGB")

    first = shot()
    b.select("#head", "1")
    second = shot()
    b.select("#head", "0")
    assert first.tobytes() != second.tobytes() and shot().tobytes() == first.tobytes()
    b.select("#head", "mean")
    s = state(b)
    mean = designed().groups[1].layers[1][:, 2].mean(0)
    assert [float(w) for w in s["weights"]] == pytest.approx(mean.tolist(), abs=1e-4)


def test_other_kind_and_hovering_keys(browser, page):
    b = browser
    b.open(page.as_uri())
    b.select("#group", "0")
    assert b.eval("document.querySelectorAll('#queries .tok').length") == 6
    assert b.eval("document.querySelectorAll('#keys .tok')[3].textContent") == "</script>"  # labels are text
    b.hover('#keys .tok[data-i="4"]')
    column = b.eval("Array.from(document.querySelectorAll('#queries .tok')).map((s) => Number(s.dataset.w))")
    expected = designed().groups[0].layers[1][0][:, 4]
    assert column == pytest.approx(expected.tolist(), abs=1e-4)
    b.hover('#heatmap')  # the mouse over the heatmap selects the query under it
    assert state(b)["query"] != "-1"
    assert b.problems() == []
    assert all(url.startswith("file://") for url in b.requests())  # nothing fetched from a network


def test_a_click_pins_the_query(browser, page):
    b = browser
    b.open(page.as_uri())
    b.eval("document.querySelector('#queries .tok[data-i=\"2\"]').click()")
    b.hover('#queries .tok[data-i="0"]')
    assert state(b)["query"] == "2"
    b.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape", "code": "Escape",
                                      "windowsVirtualKeyCode": 27})
    b.hover('#queries .tok[data-i="3"]')
    assert state(b)["query"] == "3"


def test_console_errors_are_caught(browser, page):
    b = browser
    b.open(page.as_uri())
    assert b.problems() == []
    b.eval("console.error('deliberate')")
    assert any("deliberate" in p for p in b.problems())  # the check above can fail


def test_a_thousand_tokens_stay_usable(browser, tmp_path):
    labels = [f"t{i}" for i in range(1000)]
    w = torch.softmax(torch.randn(2, 2, 1000, 1000, generator=torch.Generator().manual_seed(0)) * 4, dim=-1)
    path = write_page(AttentionSet("long", [AttentionGroup("decoder", labels, labels, {0: w[0], 1: w[1]})]),
                      tmp_path / "long.html")
    b = browser
    start = time.monotonic()
    b.open(path.as_uri())
    b.hover('#queries .tok[data-i="999"]')
    s = state(b)
    b.select("#layer", "0")
    s0 = state(b)
    assert time.monotonic() - start < 30
    assert s["readout"].startswith('query #999 "t999"') and s["top"] == [int(w[1, 0, 999].argmax())]
    assert s0["top"] == [int(w[0, 0, 999].argmax())]
    assert b.problems() == []


def test_image_run_draws_the_patches_over_the_image(browser, tmp_path):
    labels = ["[class]"] + [f"({r},{c})" for r in range(2) for c in range(2)]
    w = torch.zeros(1, 5, 5)
    w[0, :, 4] = 1.0  # everything attends to the bottom-right patch
    group = AttentionGroup("encoder", labels, labels, {0: w}, grid=(2, 2), n_special=1)
    path = write_page(AttentionSet("image", [group], image=torch.full((1, 8, 8), 0.5)), tmp_path / "img.html")
    b = browser
    b.open(path.as_uri())
    b.hover('#queries .tok[data-i="1"]')
    box = b.eval("(() => { const r = document.getElementById('image').getBoundingClientRect(); "
                 "return [r.left, r.top, r.width, r.height]; })()")
    assert box[2] > 100
    shot = Image.open(io.BytesIO(b.screenshot({"x": box[0], "y": box[1], "width": box[2], "height": box[3]})))
    shot = shot.convert("RGB")
    bottom_right = shot.getpixel((int(box[2] * 0.75), int(box[3] * 0.75)))
    top_right = shot.getpixel((int(box[2] * 0.75), int(box[3] * 0.25)))
    assert bottom_right[0] > bottom_right[1] + 60 and abs(top_right[0] - top_right[1]) < 10  # red only there
    assert b.problems() == []
