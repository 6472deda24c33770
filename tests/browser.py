"""Headless-Chromium helpers for tests of the static HTML report (not a test module).

Everything runs offline: the system Chromium and chromedriver are used directly, so Selenium
Manager (which would download drivers) is never invoked.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

_CHROMIUM = ("/usr/bin/chromium", "chromium", "chromium-browser")
_CHROMEDRIVER = ("/usr/bin/chromedriver", "chromedriver")


def _find(candidates: tuple[str, ...]) -> str | None:
    for name in candidates:
        if os.path.isabs(name):
            if os.path.isfile(name) and os.access(name, os.X_OK):
                return name
        elif (found := shutil.which(name)):
            return found
    return None


def chromium_available() -> str | None:
    """None when headless Chromium can be driven here, else why not (for ``pytest.skip``)."""
    try:
        import selenium.webdriver  # noqa: F401
    except ImportError as e:
        return f"selenium is not importable: {e}"
    if _find(_CHROMIUM) is None:
        return "chromium is not installed (/usr/bin/chromium)"
    if _find(_CHROMEDRIVER) is None:
        return "chromedriver is not installed (/usr/bin/chromedriver)"
    return None


@contextmanager
def headless_chromium(width: int = 1280, height: int = 900) -> Iterator[WebDriver]:
    """A headless Chromium driven by Selenium; quit on exit. Makes no network requests of its own."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    reason = chromium_available()
    if reason:
        raise RuntimeError(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = _find(_CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--allow-file-access-from-files", f"--window-size={width},{height}",
                "--force-device-scale-factor=1", "--hide-scrollbars", "--no-first-run",
                "--no-default-browser-check", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-default-apps", "--disable-extensions",
                "--metrics-recording-only", "--mute-audio", "--disable-features=Translate,MediaRouter"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=_find(_CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_window_size(width, height)
        yield driver
    finally:
        driver.quit()


def console_errors(driver: WebDriver) -> list[str]:
    """Browser-console entries of level SEVERE since the last call (reading the log drains it)."""
    return [entry.get("message", "") for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


_LOAD_ALL_IMAGES = """
const done = arguments[arguments.length - 1];
const timeoutMs = arguments[0];
const imgs = Array.from(document.images);
for (const img of imgs) {
  if (!img.getAttribute('src') && img.getAttribute('data-src')) img.src = img.getAttribute('data-src');
  img.loading = 'eager';
}
const pending = () => imgs.filter(i => !i.complete).map(i => i.currentSrc || i.src);
Promise.race([
  Promise.all(imgs.map(img => img.complete ? null : new Promise(resolve => {
    img.addEventListener('load', resolve, {once: true});
    img.addEventListener('error', resolve, {once: true});
  }))),
  new Promise(resolve => setTimeout(resolve, timeoutMs)),
]).then(() => done(pending()));
"""


def load_all_images(driver: WebDriver, timeout: float = 10) -> None:
    """Give every <img> its src (from data-src when it has none), make it eager, and wait until all
    are complete (loaded or failed); raises TimeoutError naming the images still loading."""
    driver.set_script_timeout(timeout + 5)
    still = driver.execute_async_script(_LOAD_ALL_IMAGES, int(timeout * 1000))
    if still:
        raise TimeoutError(f"{len(still)} image(s) still loading after {timeout}s: {still[:10]}")


def broken_images(driver: WebDriver) -> list[str]:
    """src of every <img> that has finished but decoded to nothing (call load_all_images first)."""
    return driver.execute_script(
        "return Array.from(document.images)"
        ".filter(i => i.getAttribute('src') && i.complete && i.naturalWidth === 0)"
        ".map(i => i.currentSrc || i.src);")


def wait_ready(driver: WebDriver, timeout: float = 10) -> None:
    """Wait until report.js has initialised the page (window.convscope.ready), or, for a page
    without scatter plots and without report.js, until the document has loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(
        "if (window.convscope && window.convscope.ready) return true;"
        "return document.readyState === 'complete' && !document.querySelector('.scatter');"))


def hover_scatter_point(driver: WebDriver, index_of_scatter: int = 0, point: int | None = 0,
                        timeout: float = 5) -> str:
    """Move the mouse onto a point of a scatter plot and return the text of the tooltip shown.

    ``point=None`` picks a point with no neighbour within 16 px, so the tooltip is certainly
    that point's; window.convscope.scatters[k].hovered tells which point the tooltip shows.
    """
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.support.ui import WebDriverWait

    wait_ready(driver, timeout)
    k = index_of_scatter
    driver.execute_script("window.convscope.scatters[arguments[0]].canvas.scrollIntoView({block: 'center'});", k)
    if point is None:
        point = driver.execute_script("return window.convscope.scatters[arguments[0]].isolatedPoint();", k)
        if point < 0:
            raise RuntimeError("no isolated point in the scatter plot at this zoom")
    pt = driver.execute_script("return window.convscope.scatters[arguments[0]].screenPoint(arguments[1]);", k, point)
    x, y = int(round(pt["x"])), int(round(pt["y"]))
    # Approach from a few pixels away, so a pointermove fires even if the mouse was already there.
    builder = ActionBuilder(driver)
    builder.pointer_action.move_to_location(max(0, x - 3), max(0, y - 3))
    builder.pointer_action.move_to_location(x, y)
    builder.perform()
    tip = driver.execute_script("return window.convscope.scatters[arguments[0]].root.querySelector('.scatter-tip');", k)
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: tip.is_displayed())
    return tip.text
