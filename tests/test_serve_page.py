"""The web page of `nmt serve` in a real headless Chromium (Debian's package, driven by
Playwright): type a sentence, its translation appears, and the heat-map has one cell per source
piece and output piece. The screenshot is kept in test-artifacts/."""

import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY_TRANSFORMER, prepare_toy_data, toy_pairs, train_tiny

from nmt.models.attention import AttentionChoice
from nmt.serve import BackgroundServer, load_served_models
from nmt.serve.api import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a closed network: no sandbox, and none of Chromium's own connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: `make browser` installs Debian's package")
        pytest.skip("chromium is not installed (`make browser` installs Debian's package)")
    return CHROMIUM


@pytest.mark.slow
def test_typing_shows_the_translation_and_a_cell_per_source_and_output_piece(chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    data = prepare_toy_data(tmp_path, train=200)
    models = load_served_models([train_tiny(data, tmp_path / "model", TINY_TRANSFORMER)], device="cpu")
    line = toy_pairs(1, seed=12)[0][0]
    expected = models[0].translator.translate([line], attention=AttentionChoice())
    amap = expected.attention_maps[0]
    ARTIFACTS.mkdir(exist_ok=True)
    # Fewer alternatives allowed than the page would show: it asks for what the server allows.
    with BackgroundServer(models, ServeSettings(max_alternatives=2, max_line_chars=200)) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server.url + "/")
            page.wait_for_selector("#pair option", state="attached")
            page.locator("#source").press_sequentially(line, delay=20)
            # A pause while typing (a loaded machine) may show a prefix's translation first: wait for the whole line's.
            page.wait_for_function(
                "([text, cells]) => document.querySelector('#translation').textContent === text"
                " && document.querySelectorAll('.heatmap td.cell').length === cells",
                arg=[expected.texts[0][0], len(amap.source) * len(amap.output)],
                timeout=20_000,
            )
            assert page.text_content("#translation") == expected.texts[0][0]
            assert page.locator(".heatmap").count() == 1
            assert page.locator(".heatmap th.src-piece").all_text_contents() == amap.source
            assert page.locator(".heatmap th.out-piece").all_text_contents() == amap.output
            assert page.locator(".heatmap td.cell").count() == len(amap.source) * len(amap.output)
            assert 1 <= page.locator("#alternatives li").count() <= 2
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)
            style = "(selector) => getComputedStyle(document.querySelector(selector)).whiteSpace"
            assert page.evaluate(style, "#alternatives li") == "pre-wrap"  # an alternative keeps its lines
            # An unbroken word as long as a line wraps: the box typed into keeps its half of the page.
            page.evaluate("document.querySelector('#translation').textContent = 'x'.repeat(400)")
            assert page.locator("#source").bounding_box()["width"] > 400
            # An error answer (a line past the server's limit) clears the translation of the text before.
            page.locator("#source").fill("w1 " * 100)
            page.wait_for_function("() => document.querySelector('#status').className === 'error'", timeout=20_000)
            assert page.text_content("#translation") == "" and page.locator(".heatmap").count() == 0
        finally:
            browser.close()


@pytest.mark.slow
def test_the_page_keeps_going_when_things_go_wrong(chromium, tmp_path):
    """Languages that fail to load are asked for again; a proxy's HTML error page gives its
    status; lines whose maps the answer leaves out are named; right-to-left text runs right to
    left; a wide map scrolls by itself."""
    from playwright.sync_api import sync_playwright

    data = prepare_toy_data(tmp_path, train=200)
    models = load_served_models([train_tiny(data, tmp_path / "model", TINY_TRANSFORMER)], device="cpu")
    first, second = (src for src, _ in toy_pairs(2, seed=14))
    one_map = models[0].translator.translate([first], attention=AttentionChoice()).attention_maps[0].weights.size
    settings = ServeSettings(max_attention_weights=one_map, max_line_chars=2000, max_chars=4000)
    with BackgroundServer(models, settings) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.route("**/languages", lambda route: route.abort())
            page.goto(server.url + "/")
            page.wait_for_function("() => document.querySelector('#status').className === 'error'", timeout=20_000)
            page.unroute("**/languages")
            page.locator("#source").fill(f"{first}\n\n{second}")  # typing asks for the languages again
            page.wait_for_function("() => document.querySelectorAll('.heatmap').length === 1", timeout=20_000)
            assert page.text_content(".heatmap caption") == "line 1"
            assert "line 3" in page.text_content("#attention-note")  # the empty line 2 has no map to miss
            assert len(page.text_content("#translation").split("\n")) == 3
            page.route("**/translate", lambda route: route.fulfill(status=502, content_type="text/html", body="<html>bad gateway</html>"))
            page.locator("#source").fill(first + " ")
            page.wait_for_function("() => document.querySelector('#status').textContent === 'error 502'", timeout=20_000)
            page.unroute("**/translate")
            direction = "(selector) => getComputedStyle(document.querySelector(selector)).direction"
            page.locator("#source").fill("שלום עולם")
            assert page.evaluate(direction, "#source") == "rtl"
            wide = {"translatedText": "v1", "attentionDescription": "d", "attention": [
                {"line": 1, "source": ["▁w1"] * 200, "output": ["▁v1", "</s>"], "weights": [[0.005] * 200] * 2}]}
            page.route("**/translate", lambda route: route.fulfill(status=200, json=wide))
            page.locator("#source").fill("w1 " * 200)
            page.wait_for_function("() => document.querySelectorAll('.heatmap td.cell').length === 400", timeout=20_000)
            assert page.evaluate("document.documentElement.scrollWidth") <= 1000
        finally:
            browser.close()
