"""The report's static assets (report.js / report.css) in a real headless Chromium, on a synthetic page."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser import (
    broken_images,
    chromium_available,
    console_errors,
    headless_chromium,
    hover_scatter_point,
    load_all_images,
    wait_ready,
)

ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "report_assets"
LABELS = ["cat", "dog", "ship"]
SCRIPT_ID = "<script>alert(1)</script>.jpg"
N_POINTS = 2000
N_ITEMS = 50
UNITS = [3, 10, 1, 9, 12, 2, 11, 4, 8, 5, 7, 6]


def _png(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((size, size), Image.NEAREST).save(path)


def _data_script(name: str, title: str, labels: list[str], points: list) -> str:
    payload = json.dumps({"title": title, "labels": labels, "points": points}, separators=(",", ":"))
    return f"(window.CONVSCOPE_DATA = window.CONVSCOPE_DATA || {{}})[{json.dumps(name)}] = {payload};\n"


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="assets/report.css">
<script>window.__alerted = false; window.alert = function () {{ window.__alerted = true; }};</script>
<script src="assets/report.js" defer></script>
</head><body>
<nav class="top"><a class="brand" href="index.html">convscope</a><a href="index.html" aria-current="page">overview</a>
<a href="index.html">embedding</a><a href="index.html">features</a><a href="index.html">attribution</a></nav>
<main>
{body}
</main>
<footer>convscope report &middot; synthetic test page</footer>
</body></html>
"""


def _points(rng: np.random.Generator) -> list:
    centres = np.array([[-5.0, 0.0], [5.0, 0.0], [0.0, 7.0]])
    pts = []
    for i in range(N_POINTS):
        label = int(i % 3) if i % 40 else -1
        cx, cy = centres[max(label, 0)]
        x, y = rng.normal(cx, 1.5), rng.normal(cy, 1.5)
        thumb = f"img/thumb-{i % 5}.png" if i % 10 == 0 else None
        pts.append([round(float(x), 4), round(float(y), 4), label, f"img-{i:04d}.png", thumb])
    # Two isolated points the hover tests aim at.
    pts[0] = [-14.0, -8.0, 1, "img-0000.png", "img/thumb-0.png"]
    pts[1] = [14.0, -8.0, 2, SCRIPT_ID, "img/thumb-1.png"]
    return pts


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(ASSETS, root / "assets")
    (root / "img").mkdir()
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        _png(root / "img" / f"thumb-{i}.png", 32, i)
    for i in range(N_ITEMS):
        _png(root / "img" / f"item-{i:02d}.png", 32, 100 + i)
    for i in range(8):
        _png(root / "img" / f"grid-{i}.png", 16, 200 + i)
    (root / "data" / "embedding-layer3-tsne.js").write_text(
        _data_script("embedding-layer3-tsne", "layer3 \u00b7 tsne", LABELS, _points(rng)), encoding="utf-8")

    grid = "".join(f'<figure><img class="pixelated" loading="lazy" src="img/grid-{i}.png" alt="unit {i}">'
                   f"<figcaption>unit {i} &middot; act 0.{i}3</figcaption></figure>" for i in range(8))
    items = "".join(f'<figure class="item"><img class="pixelated" data-src="img/item-{i:02d}.png" alt="item {i}">'
                    f"<figcaption>item {i}</figcaption></figure>" for i in range(N_ITEMS))
    rows = "".join(f'<tr><td>layer{u}</td><td class="num">{u}</td><td class="num">{u / 13:.3f}</td>'
                   f'<td><span class="badge {"ok" if u % 4 else "failed"}">'
                   f'{"ok" if u % 4 else "failed"}</span></td></tr>'
                   for u in UNITS)
    body = f"""
<h1>Synthetic report</h1>
<div class="card"><h3>run</h3><p>Status <span class="badge ok">ok</span> <span class="badge failed">failed</span>
<span class="badge skipped">skipped</span> <span class="badge missing">missing</span></p></div>
<h2>Embedding</h2>
<div class="scatter" data-points="embedding-layer3-tsne"></div>
<script src="data/embedding-layer3-tsne.js"></script>
<h2>Units</h2>
<div class="grid">{grid}</div>
<h2>Table</h2>
<div class="table-wrap"><table class="sortable" id="units"><thead><tr><th>layer</th><th class="num">units</th>
<th class="num">score</th><th>status</th></tr></thead><tbody>{rows}</tbody></table></div>
<h2>Items</h2>
<div class="paged grid" id="items" data-page-size="24">{items}</div>
"""
    (root / "index.html").write_text(_page("synthetic report", body), encoding="utf-8")

    big = np.random.default_rng(1).normal(size=(50_000, 2)).round(4)
    big_pts = [[float(x), float(y), i % 10, f"b{i}", None] for i, (x, y) in enumerate(big)]
    (root / "data" / "big.js").write_text(_data_script("big", "50k", [f"c{i}" for i in range(10)], big_pts))
    (root / "big.html").write_text(_page("big", '<div class="scatter" data-points="big"></div>'
                                                '<script src="data/big.js"></script>'), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def driver():
    reason = chromium_available()
    if reason:
        pytest.skip(reason)
    with headless_chromium() as d:
        yield d


@pytest.fixture
def page(driver, site):
    driver.get_log("browser")  # drop what earlier tests left
    driver.get((site / "index.html").as_uri())
    wait_ready(driver)
    return driver


def test_page_initialises_without_console_errors(page):
    assert console_errors(page) == []
    assert page.execute_script("return window.convscope.ready") is True
    info = page.execute_script(
        "const s = window.convscope.scatters; return s.map(x => [x.id, x.count, x.canvas.tagName, x.canvas.width]);")
    assert info == [["embedding-layer3-tsne", N_POINTS, "CANVAS", info[0][3]]] and info[0][3] > 100
    assert page.execute_script("return window.convscope.errors") == []


def test_hover_shows_label_id_and_thumbnail(page):
    text = hover_scatter_point(page, 0, 0)
    assert "dog" in text and "img-0000.png" in text
    assert page.execute_script("return window.convscope.scatters[0].hovered") == 0
    loaded = page.execute_async_script("""
        const done = arguments[0], img = document.querySelector('.scatter-tip img');
        const check = () => img.complete ? done([img.naturalWidth, img.getAttribute('src')]) : setTimeout(check, 20);
        check();""")
    assert loaded[0] > 0 and loaded[1] == "img/thumb-0.png"
    # Leaving the plot hides the tooltip.
    page.execute_script("window.scrollTo(0, 0)")
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    b = ActionBuilder(page)
    b.pointer_action.move_to_location(2, 2)
    b.perform()
    assert not page.find_element("css selector", ".scatter-tip").is_displayed()


def test_hover_on_script_id_is_text_only(page):
    from selenium.common.exceptions import NoAlertPresentException

    n_scripts = page.execute_script("return document.scripts.length")
    text = hover_scatter_point(page, 0, 1)
    assert SCRIPT_ID in text and "ship" in text
    with pytest.raises(NoAlertPresentException):
        page.switch_to.alert  # noqa: B018
    assert page.execute_script("return window.__alerted") is False
    assert page.execute_script("return document.scripts.length") == n_scripts
    assert page.execute_script("return document.querySelector('.scatter-tip script')") is None
    assert "&lt;script&gt;" in page.execute_script("return document.querySelector('.scatter-tip').innerHTML")


def test_isolated_point_hover(page):
    text = hover_scatter_point(page, 0, None)
    k = page.execute_script("return window.convscope.scatters[0].hovered")
    info = page.execute_script("return window.convscope.scatters[0].pointInfo(arguments[0])", k)
    assert info["name"] in text and info["id"] in text


def test_wheel_zoom_pan_and_reset(page):
    from selenium.webdriver.common.action_chains import ActionChains

    before = page.execute_script("""
        const s = window.convscope.scatters[0]; s.canvas.scrollIntoView({block: 'center'});
        return s.screenPoint(0);""")
    after = page.execute_script("""
        const s = window.convscope.scatters[0], r = s.canvas.getBoundingClientRect();
        const cx = r.left + r.width / 2, cy = r.top + r.height / 2;
        s.canvas.dispatchEvent(new WheelEvent('wheel', {deltaY: -300, clientX: cx, clientY: cy,
                                                        bubbles: true, cancelable: true}));
        return s.screenPoint(0);""")
    assert abs(after["x"] - before["x"]) > 20 and abs(after["y"] - before["y"]) > 10
    canvas = page.execute_script("return window.convscope.scatters[0].canvas")
    ActionChains(page).move_to_element(canvas).click_and_hold().move_by_offset(40, 25).release().perform()
    panned = page.execute_script("return window.convscope.scatters[0].screenPoint(0)")
    assert abs(panned["x"] - after["x"] - 40) < 2 and abs(panned["y"] - after["y"] - 25) < 2
    ActionChains(page).double_click(canvas).perform()
    reset = page.execute_script("return window.convscope.scatters[0].screenPoint(0)")
    assert abs(reset["x"] - before["x"]) < 1 and abs(reset["y"] - before["y"]) < 1
    assert console_errors(page) == []


def test_paged_list_loads_images_per_page(page):
    state = page.execute_script("""
        const items = Array.from(document.querySelectorAll('#items > .item'));
        return {n: items.length, visible: items.filter(i => !i.hidden && i.offsetParent !== null).length,
                p2src: items.slice(24, 48).map(i => i.querySelector('img').getAttribute('src')),
                p1src: items.slice(0, 24).map(i => i.querySelector('img').getAttribute('src')),
                status: document.querySelector('.pager .pager-status').textContent};""")
    assert state["n"] == N_ITEMS and state["visible"] == 24
    assert all(s is None for s in state["p2src"]) and all(state["p1src"])
    assert state["status"] == "page 1 of 3"
    page.find_element("css selector", ".pager .pager-next").click()
    assert page.find_element("css selector", ".pager .pager-status").text == "page 2 of 3"
    widths = page.execute_async_script("""
        const done = arguments[0];
        const imgs = Array.from(document.querySelectorAll('#items > .item')).slice(24, 48)"""
        """.map(i => i.querySelector('img'));
        const check = () => imgs.every(i => i.complete) ? done(imgs.map(i => i.naturalWidth)) : setTimeout(check, 20);
        check();""")
    assert len(widths) == 24 and all(w > 0 for w in widths)
    visible = page.execute_script(
        "return Array.from(document.querySelectorAll('#items > .item')).map((i, k) => i.hidden ? -1 : k)"
        ".filter(k => k >= 0)")
    assert visible == list(range(24, 48))
    jump = page.find_element("css selector", ".pager input")
    jump.clear()
    jump.send_keys("3\n")
    visible = page.execute_script(
        "return Array.from(document.querySelectorAll('#items > .item')).map((i, k) => i.hidden ? -1 : k)"
        ".filter(k => k >= 0)")
    assert visible == [48, 49]
    assert page.find_element("css selector", ".pager .pager-next").get_attribute("disabled") is not None


def test_sortable_table_sorts_numbers_numerically(page):
    def column(i):
        return page.execute_script(
            "return Array.from(document.querySelectorAll('#units tbody tr'))"
            ".map(r => r.cells[arguments[0]].textContent)", i)

    headers = page.find_elements("css selector", "#units thead th")
    headers[1].click()
    assert [int(v) for v in column(1)] == sorted(UNITS)
    assert "sort-asc" in headers[1].get_attribute("class")
    headers[1].click()
    assert [int(v) for v in column(1)] == sorted(UNITS, reverse=True)
    assert "sort-desc" in headers[1].get_attribute("class")
    headers[0].click()  # strings, with natural order: layer9 before layer10
    assert column(0) == [f"layer{u}" for u in sorted(UNITS)]


def test_no_broken_images_and_helper_detects_one(page):
    load_all_images(page)
    assert broken_images(page) == []
    page.execute_script("const i = document.createElement('img'); i.src = 'img/does-not-exist.png'; "
                        "document.body.appendChild(i);")
    load_all_images(page)
    assert [s.rsplit("/", 1)[-1] for s in broken_images(page)] == ["does-not-exist.png"]
    assert any("does-not-exist.png" in e for e in console_errors(page))


def test_screenshot_is_not_blank(page, tmp_path):
    hover_scatter_point(page, 0, 0)
    shot = tmp_path / "report.png"
    assert page.save_screenshot(str(shot))
    img = Image.open(shot).convert("RGB")
    assert img.width >= 800 and img.height >= 600
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50


def test_fifty_thousand_points_draw_fast(driver, site):
    driver.get_log("browser")
    driver.get((site / "big.html").as_uri())
    wait_ready(driver)
    assert console_errors(driver) == []
    ms = driver.execute_script("""
        const s = window.convscope.scatters[0], t0 = performance.now();
        for (let k = 0; k < 3; k++) { s.redraw(); s.canvas.getContext('2d').getImageData(0, 0, 1, 1); }
        return (performance.now() - t0) / 3;""")
    assert ms < 500, f"a redraw of 50,000 points took {ms:.0f} ms"
    text = hover_scatter_point(driver, 0, None)
    assert text.startswith("c")
