"""The studio page in a real headless Chromium (Debian's chromium + chromedriver, via Selenium).

Loads the page from a real server on the real model, picks an example and a persona, moves the
strength slider, runs a compare and checks both panes fill with different text and that the
request (and the server's echo of it) carries the slider's strength. Saves a screenshot to
``artifacts/studio.png``. Skips, saying how to get a browser, where none is installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


pytestmark = [pytest.mark.browser, pytest.mark.model, pytest.mark.usefixtures("one_torch_thread")]

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1440,1250"]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (in the test extra)")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not browser or not chromedriver:
        pytest.skip("no chromium/chromedriver: run `make browser` (Debian: apt-get install chromium chromium-driver)")
    mp = pytest.MonkeyPatch()
    mp.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    drv.set_script_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()
        mp.undo()


def test_compare_in_the_page(driver, real_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(real_server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples .chip")
               and d.find_elements(By.CSS_SELECTOR, ".persona[data-name=tabby_cats]"))
    assert "tabby_cats" in driver.find_element(By.ID, "personas").text
    assert "layers" in driver.find_element(By.ID, "model-name").text

    # A server refusal is shown on the page, in words.
    driver.find_element(By.ID, "prompt").send_keys("hello")
    driver.find_element(By.CSS_SELECTOR, "label[for=use-tabby_cats]").click()
    driver.find_element(By.ID, "seed").send_keys("-5")
    driver.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "seed" in driver.find_element(By.ID, "error").text
    driver.find_element(By.ID, "seed").clear()

    # Pick an example, move the slider and the length, compare.
    chip = driver.find_elements(By.CSS_SELECTOR, "#examples .chip")[2]
    chip.click()
    prompt = driver.find_element(By.ID, "prompt").get_attribute("value")
    assert prompt == chip.get_attribute("title") and prompt != "hello"
    slider = driver.find_element(By.ID, "strength-tabby_cats")
    before = float(slider.get_attribute("value"))
    slider.send_keys(Keys.ARROW_RIGHT)  # one step up (down could reach 0 = no steering)
    after = float(slider.get_attribute("value"))
    assert after > before
    assert driver.find_element(By.ID, "strength-value-tabby_cats").text == f"{after:.2f}"
    driver.find_element(By.ID, "length").send_keys(Keys.ARROW_LEFT * 2)  # 48 -> 32 new tokens
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, 400).until(lambda d: d.execute_script("return window.steerlab.runs") >= 1)

    base = driver.find_element(By.ID, "base-out").text
    steered = driver.find_element(By.ID, "steered-out").text
    assert base and steered and base != steered
    assert not driver.find_element(By.ID, "error").is_displayed()
    sent = driver.execute_script("return window.steerlab.lastRequest")
    assert sent["prompt"] == prompt and sent["max_length"] == 32 and sent["stream"] is True
    assert [s["vector"] for s in sent["steering"]] == ["tabby_cats"]
    assert sent["steering"][0]["strength"] == pytest.approx(after)  # the slider's value went out
    echoed = driver.execute_script("return window.steerlab.lastResult.applied")
    assert echoed[0]["strength"] == pytest.approx(after)  # and the server applied it
    assert f"×{after:.2f}" in driver.find_element(By.ID, "steered-tag").text
    assert "curl" in driver.find_element(By.ID, "api-call").get_attribute("textContent")
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(ARTIFACTS / "studio.png"))


def test_the_page_sends_the_api_key_from_its_field(driver, tiny_dir, tmp_path):
    """With STEERLAB_API_KEY_ALL the page is useless without a key: its field (kept in
    sessionStorage, per tab) makes every call carry it."""
    from helpers import random_vector
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from steerlab.models import load_model
    from steerlab.server import ServerSettings, create_app
    from steerlab.server.background import serve_in_thread
    from steerlab.store import VectorStore

    lm = load_model(str(tiny_dir), device="cpu")
    store = VectorStore(tmp_path / "v", lm)
    store.add(random_vector(lm, range(lm.n_layers), name="kittens"), overwrite=True)
    app = create_app(lm, store, ServerSettings(api_key="page-key-\u00e9", api_key_all=True))
    wait = WebDriverWait(driver, 60)
    with serve_in_thread(app) as url:
        driver.get(url)
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "API key" in driver.find_element(By.ID, "error").text  # 401, and where to put the key
        field = driver.find_element(By.ID, "api-key")
        field.send_keys("page-key-\u00e9", Keys.TAB)  # a non-ASCII key works too
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".persona[data-name=kittens]"))
        assert driver.execute_script("return sessionStorage.getItem('steerlab.apiKey')") == "page-key-\u00e9"
        assert driver.execute_script("return localStorage.length") == 0
