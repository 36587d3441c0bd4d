"""The browser playground at ``/``, driven in headless Chromium against a real server.

Chromium and its driver come from Debian (``chromium``, ``chromium-driver``) and are driven with
Selenium pointed at ``/usr/bin/chromedriver``, so Selenium Manager never downloads anything;
``scripts/setup-browser`` installs all three. A missing browser fails the test (it is not skipped).

The server is a test-target ``upscale-server serve`` (the resize engine: the page shows sizes, formats and
errors, which are the same; how the pixels look is not checked). A screenshot of the finished comparison
is saved to ``tests/artifacts/playground.png``.
"""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import PHOTO, REPO
from tests.e2e.conftest import live_server_at
from upscale_server.testing import UpscaleTestServer
from upscale_server.web.routes import STATIC_DIR

FAST_MODEL = "local:realesr-animevideov3@1"
API_KEY = "test-key"
ARTIFACTS = REPO / "tests" / "artifacts"
SETUP_HINT = "run scripts/setup-browser (Debian chromium + chromium-driver, and selenium in .venv)"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


# ---------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpscaleTestServer]:
    with live_server_at(tmp_path_factory.mktemp("playground-server"), api_key=API_KEY) as live:
        yield live


# ---------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    chromium = shutil.which("chromium")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.fail(f"headless Chromium is not installed: {SETUP_HINT}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"the selenium package is not installed: {SETUP_HINT}", pytrace=False)

    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(chromedriver, log_output=str(profile / "chromedriver.log"))  # a path: no Selenium Manager
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def small_photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48x32 crop of the Grace Hopper photo, as a PNG file to pick in the page."""
    path = tmp_path_factory.mktemp("playground-input") / "hopper.png"
    with Image.open(PHOTO) as image:
        image.convert("RGB").crop((220, 200, 268, 232)).save(path)
    return path


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def open_page(driver: Any, server: UpscaleTestServer) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{server.url}/")
    WebDriverWait(driver, 20).until(lambda d: js(d, "return document.getElementById('model').dataset.loaded"))


def fill_form(
    driver: Any, *, key: str, image: Path, model: str = FAST_MODEL, factor: str = "2", fmt: str = "PNG"
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    field = driver.find_element(By.ID, "api-key")
    field.clear()
    if key:
        field.send_keys(key)
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    Select(driver.find_element(By.ID, "factor")).select_by_value(factor)
    Select(driver.find_element(By.ID, "format")).select_by_value(fmt)
    driver.find_element(By.ID, "file").send_keys(str(image))


def run_and_wait(driver: Any, server: UpscaleTestServer, timeout: float = 180) -> str:
    """Click Run and wait for the page to finish; the page's final state (``done`` or ``error``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = driver.find_element(By.ID, "run")
    assert run.is_enabled(), "Run stays disabled after a file was picked"
    run.click()
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        lambda d: js(d, "return document.body.dataset.state") in {"done", "error"},
        message=f"the page never finished; server log:\n{server.log()}",
    )
    state: str = js(driver, "return document.body.dataset.state")
    return state


# ---------------------------------------------------------------------------------------- the tests


def test_page_and_assets_are_served_without_the_internet(server: UpscaleTestServer) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        asset = httpx.get(f"{server.url}/playground/{name}")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(kind)
    assert httpx.get(f"{server.url}/playground/../app.py").status_code == 404
    assert httpx.get(f"{server.url}/playground/routes.py").status_code == 404

    models = httpx.get(f"{server.url}/playground/models").json()
    assert FAST_MODEL in [m["id"] for m in models["models"]]
    assert models["keysRequired"] is True

    # Nothing the page loads may come from another host: no absolute URLs, no @import, no web fonts.
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), path.name
        assert "@import" not in text
        assert "@font-face" not in text


def test_upscale_in_the_browser(browser: Any, server: UpscaleTestServer, small_photo: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver = browser
    open_page(driver, server)
    assert driver.title == "Upscale Server playground"
    assert driver.find_element(By.ID, "api-key").get_attribute("placeholder") == "required by this server"

    # Quality only shows for the lossy formats.
    quality = driver.find_element(By.ID, "quality-field")
    assert not quality.is_displayed()
    Select(driver.find_element(By.ID, "format")).select_by_value("WEBP")
    assert quality.is_displayed()

    fill_form(driver, key=API_KEY, image=small_photo)
    assert not quality.is_displayed()
    assert "hopper.png" in driver.find_element(By.ID, "picked-name").text
    state = run_and_wait(driver, server)
    assert state == "done", driver.find_element(By.ID, "error").text

    # The result at full resolution: exactly 2x the 48x32 input, with the input stretched under it.
    after = driver.find_element(By.ID, "after")
    before = driver.find_element(By.ID, "before")
    assert js(driver, "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", after) == [96, 64]
    assert js(driver, "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", before) == [48, 32]
    assert after.size == {"width": 96, "height": 64}
    assert before.size == {"width": 96, "height": 64}
    assert "96 × 64 px" in driver.find_element(By.ID, "result-size").text
    assert "Done in" in driver.find_element(By.ID, "status").text
    assert re.fullmatch(r"\d+\.\d s", driver.find_element(By.ID, "elapsed").text)

    # Download: the result's imageURL, under a useful file name; it is the 96x64 PNG.
    image_url = after.get_attribute("src")
    assert re.fullmatch(rf"{re.escape(server.url)}/image/[0-9a-f-]{{36}}\.png", image_url)
    download = driver.find_element(By.ID, "download")
    assert download.get_attribute("href") == image_url
    assert download.get_attribute("download") == "hopper_x2.png"
    fetched = httpx.get(image_url)
    assert fetched.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(fetched.content)) as result:
        assert result.size == (96, 64)

    # The slider clips the result: keyboard on the range input, then a click on the images.
    def clip() -> str:
        value: str = js(driver, "return getComputedStyle(arguments[0]).clipPath", after)
        return value

    assert clip() == "inset(0px 0px 0px 50%)"
    slider = driver.find_element(By.ID, "slider")
    slider.send_keys(Keys.HOME)
    assert clip() == "inset(0px 0px 0px 0%)"
    slider.send_keys(Keys.END)
    assert clip() == "inset(0px 0px 0px 100%)"
    compare = driver.find_element(By.ID, "compare")
    ActionChains(driver).move_to_element_with_offset(compare, -24, 0).click().perform()  # 24 px left of centre
    assert float(slider.get_attribute("value")) == pytest.approx(25, abs=2)
    assert clip().startswith("inset(0px 0px 0px 2")

    assert js(driver, "return localStorage.getItem('upscale-playground.apiKey')") == API_KEY

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    js(driver, "arguments[0].value = 50; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert driver.save_screenshot(str(ARTIFACTS / "playground.png"))


@pytest.mark.parametrize(
    ("key", "expected"),
    [("wrong-key", ("invalidApiKey", "Invalid API key.")), ("", ("missingApiKey", "no API key"))],
    ids=["wrong-key", "no-key"],
)
def test_api_errors_are_shown(
    browser: Any, server: UpscaleTestServer, small_photo: Path, key: str, expected: tuple[str, str]
) -> None:
    """A Runware error is shown in the page with its code and message, and the page can run again."""
    from selenium.webdriver.common.by import By

    driver = browser
    open_page(driver, server)
    fill_form(driver, key=key, image=small_photo)
    assert run_and_wait(driver, server, timeout=30) == "error"
    error = driver.find_element(By.ID, "error")
    assert error.is_displayed()
    assert error.get_attribute("role") == "alert"
    code, message = expected
    assert f"{code} (apiKey): {message}" in error.text
    assert driver.find_element(By.ID, "status").text == "Failed."
    assert not driver.find_element(By.ID, "result").is_displayed()
    assert driver.find_element(By.ID, "run").is_enabled()  # ready to try again
