"""The studio page in a real headless Chromium (Debian's chromium + chromedriver, via Selenium).

Loads the page from a real server on the real model, picks an example and a persona, moves the
dose slider, runs a compare and checks both panes fill with different text and that the
request (and the server's echo of it) carries the slider's dose and the example's mode (chat or
raw). Also: /docs renders its operations with no network (the browser resolves no host but
127.0.0.1), the persona form shows its errors next to the form, and "Larger text" fits a
1920x1080 projector. Saves screenshots to ``artifacts/``. Skips, saying how to get a browser,
where none is installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


pytestmark = [pytest.mark.browser, pytest.mark.model, pytest.mark.usefixtures("one_torch_thread")]

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1440,1250",
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]  # no network: any CDN would fail to load


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
    chat_chip = driver.find_element(By.CSS_SELECTOR, "#examples .chip[data-mode=chat]")
    chat_chip.click()
    assert driver.find_element(By.ID, "mode-chat").is_selected()
    chip = driver.find_elements(By.CSS_SELECTOR, "#examples .chip")[2]
    assert chip.get_attribute("data-mode") == "raw"  # a completion-style prompt runs as raw completion
    chip.click()
    assert driver.find_element(By.ID, "mode-raw").is_selected()
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
    assert sent["chat"] is False
    assert [s["vector"] for s in sent["steering"]] == ["tabby_cats"]
    assert sent["steering"][0]["dose"] == pytest.approx(after)  # the dose slider's value went out
    echoed = driver.execute_script("return window.steerlab.lastResult.applied")
    assert echoed[0]["dose"] == pytest.approx(after)  # and the server applied it
    assert driver.find_element(By.CSS_SELECTOR, "[data-name=tabby_cats] .zone .breaks").text == "past 1: breaks the text"
    assert f"dose {after:.2f}" in driver.find_element(By.ID, "steered-tag").text
    assert "curl" in driver.find_element(By.ID, "api-call").get_attribute("textContent")
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(ARTIFACTS / "studio.png"))


def test_concept_highlighting_in_the_page(driver, real_server):
    """Glass box: ticking "highlight the concept" colours both panes' tokens by their reading,
    with a legend and the number on hover. Screenshot: ``artifacts/glassbox.png``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(real_server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".persona[data-name=tabby_cats]"))
    driver.find_element(By.ID, "prompt").send_keys("Tell me about your weekend plans.")
    driver.find_element(By.CSS_SELECTOR, "label[for=use-tabby_cats]").click()
    driver.find_element(By.ID, "read").click()
    runs = driver.execute_script("return window.steerlab.runs")
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, 400).until(lambda d: d.execute_script("return window.steerlab.runs") > runs)
    assert driver.execute_script("return window.steerlab.lastRequest.read") == ["tabby_cats"]
    result = driver.execute_script("return window.steerlab.lastResult")
    for row in ("base", "steered"):
        spans = driver.find_elements(By.CSS_SELECTOR, f"#{row}-out .tok")
        assert len(spans) == len(result["read"][row]["tokens"]) > 0
        assert "".join(s.get_attribute("textContent") for s in spans) == result[row]
        assert spans[0].get_attribute("title").startswith("tabby_cats: ")
    legend = driver.find_element(By.ID, "read-legend")
    assert legend.is_displayed() and "tabby_cats reading" in legend.text
    steered_mean = result["read"]["steered"]["mean"]["tabby_cats"]
    base_mean = result["read"]["base"]["mean"]["tabby_cats"]
    assert steered_mean > base_mean  # the steered reply carries more of the concept
    card = driver.find_element(By.CSS_SELECTOR, ".persona[data-name=tabby_cats]")
    card.find_element(By.CSS_SELECTOR, ".lens summary").click()  # the vector's logit lens
    wait.until(lambda d: "L29:" in card.find_element(By.CSS_SELECTOR, ".lens .hint").text)
    assert "kitten" in card.find_element(By.CSS_SELECTOR, ".lens .hint").text
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("document.getElementById('base-out').scrollIntoView({block: 'center'})")
    driver.save_screenshot(str(ARTIFACTS / "glassbox.png"))


def test_layer_profile_in_the_page(driver, real_server):
    """A persona card's "Where it lives" draws the layer profile (GET /vectors/{name}/profile) as an
    inline SVG: one AUC point per layer, the active layers shaded, the numbers on hover and in words.
    Screenshot: ``artifacts/profile.png``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(real_server)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".persona[data-name=tabby_cats]"))
    card = driver.find_element(By.CSS_SELECTOR, ".persona[data-name=tabby_cats]")
    card.find_element(By.CSS_SELECTOR, ".profile summary").click()
    WebDriverWait(driver, 300).until(lambda d: card.find_elements(By.CSS_SELECTOR, ".profile svg circle.auc"))
    data = driver.execute_script("return fetch('/vectors/tabby_cats/profile').then((r) => r.json())")
    dots = card.find_elements(By.CSS_SELECTOR, ".profile svg circle.auc")
    assert len(dots) == len(data["layers"]) == 30
    assert len(card.find_elements(By.CSS_SELECTOR, ".profile svg circle.cos")) == 29  # the last layer has no next
    assert len(card.find_elements(By.CSS_SELECTOR, ".profile svg rect.active")) == len(data["active_layers"])
    first = data["layers"][0]
    assert dots[0].find_element(By.TAG_NAME, "title").get_attribute("textContent") == \
        f"layer 0: held-out AUC {first['auc']:.3f}"
    band = [r for r in data["layers"] if 6 <= r["layer"] <= 24]  # 20-80 % of 30 layers, as the doctor
    best = max(band, key=lambda r: r["auc"])
    note = card.find_element(By.CSS_SELECTOR, ".profile-note").text
    assert note.startswith(f"Best held-out AUC {best['auc']:.2f} at layer {best['layer']} (of layers 6-24"), note
    assert "pairs from persona file tabby_cats.toml" in note
    assert data["texts_are_the_vectors"] is True  # the real vectors are built from the shipped personas
    print(f"profile of tabby_cats computed in {data['seconds']} s")
    box = card.find_element(By.CSS_SELECTOR, ".profile svg").rect
    assert box["width"] > 200 and box["height"] > 80  # drawn at a readable size, inside the card
    assert box["x"] + box["width"] <= card.rect["x"] + card.rect["width"] + 0.5
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", card.find_element(By.CSS_SELECTOR, ".profile"))
    driver.save_screenshot(str(ARTIFACTS / "profile.png"))


@pytest.fixture
def empty_real_server(real_lm, tmp_path):
    """The studio on the real model with an empty vectors folder (what a test builds there stays there)."""
    from helpers import serve_in_thread

    from steerlab.server import create_app
    from steerlab.store import VectorStore

    with serve_in_thread(create_app(real_lm, VectorStore(tmp_path / "vectors", real_lm))) as url:
        yield url


def test_persona_form_shows_the_doctor_grade(driver, empty_real_server):
    """Building a persona from the page grades its contrast set (steerlab.doctor.checkup) and shows the
    grade and the advice under "Built NAME"."""
    import re

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pairs = [("Arr, the sea be calm today, matey.", "Well, the sea is calm today, friend."),
             ("Hoist the sails, ye scallywags!", "Please raise the sails, everyone."),
             ("Shiver me timbers, a storm be comin'.", "Goodness, a storm is coming."),
             ("Avast! Bury the treasure on the isle.", "Stop! Hide the money on the island."),
             ("Ahoy, me hearties, grog for all!", "Hello, friends, drinks for everyone."),
             ("Yo ho, we sail at dawn, me buckos.", "Okay, we leave at dawn, folks.")]
    wait = WebDriverWait(driver, 60)
    driver.get(empty_real_server)
    wait.until(lambda d: "No vectors yet" in d.find_element(By.ID, "personas").text)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#new-layer option"))
    driver.find_element(By.CSS_SELECTOR, "#create-card > summary").click()
    driver.find_element(By.ID, "new-name").send_keys("pirate_page")
    driver.find_element(By.ID, "new-desc").send_keys("Talks like a pirate")
    driver.find_element(By.ID, "new-pos").send_keys("\n".join(p for p, _ in pairs))
    driver.find_element(By.ID, "new-neg").send_keys("\n".join(n for _, n in pairs))
    driver.find_element(By.ID, "create-btn").click()
    WebDriverWait(driver, 400).until(lambda d: "Built pirate_page" in d.find_element(By.ID, "build-text").text
                                     or d.find_element(By.ID, "create-error").is_displayed())
    assert not driver.find_element(By.ID, "create-error").is_displayed(), driver.find_element(By.ID, "create-error").text
    doctor = driver.find_element(By.ID, "build-doctor")
    assert doctor.is_displayed()
    head = doctor.find_element(By.TAG_NAME, "strong").text
    found = re.fullmatch(r"Doctor: grade ([A-F]) \((\d+(?:\.\d+)?)/100 at layer 15\)", head)  # the form's default layer
    assert found, head
    assert 0 <= float(found.group(2)) <= 100
    advice = [li.text for li in doctor.find_elements(By.TAG_NAME, "li")]
    assert "Only 6 pairs: 32 or more give a steadier direction." in advice, advice  # the advice for a small set
    # these positives are exclamations far more often than the negatives: the doctor says so
    assert any(a.startswith("The positives are exclamations far more often") for a in advice), advice
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".persona[data-name=pirate_page]"))  # and it is usable
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("document.getElementById('build-text').scrollIntoView({block: 'center'})")
    driver.save_screenshot(str(ARTIFACTS / "persona-doctor.png"))


def _foreign_resources(driver, *, but_images: bool = False) -> list[str]:  # noqa: ANN001
    return driver.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => !e.name.startsWith(location.origin) && !(arguments[0] && e.initiatorType === 'img'))"
        ".map(e => e.name)", but_images)


def test_api_docs_render_offline(driver, real_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{real_server}/docs")
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {e.text.replace("\u200b", "") for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/generate", "/compare", "/vectors", "/v1/chat/completions", "/health"} <= paths, paths
    assert not _foreign_resources(driver)
    driver.get(f"{real_server}/redoc")
    WebDriverWait(driver, 60).until(lambda d: "/compare" in d.find_element(By.TAG_NAME, "body").text)
    assert not _foreign_resources(driver, but_images=True)  # ReDoc's footer logo comes from its CDN (cosmetic)


def test_persona_form_errors_show_next_to_the_form(driver, real_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(real_server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".persona[data-name=tabby_cats]"))
    driver.find_element(By.CSS_SELECTOR, "#create-card > summary").click()
    driver.find_element(By.ID, "new-name").send_keys("tabby_cats")  # exists already
    driver.find_element(By.ID, "new-pos").send_keys("I love my tabby cat.")
    driver.find_element(By.ID, "new-neg").send_keys("I love my old car.")
    driver.find_element(By.ID, "create-btn").click()
    wait.until(lambda d: d.find_element(By.ID, "create-error").is_displayed())
    text = driver.find_element(By.ID, "create-error").text
    assert "tabby_cats" in text and "replace an existing vector of that name" in text, text
    assert "overwrite" not in text  # the API's wording stays in the API
    assert not driver.find_element(By.ID, "error").is_displayed()
    inside = driver.execute_script("""
        const r = document.getElementById('create-error').getBoundingClientRect();
        return r.top >= 0 && r.bottom <= innerHeight + 1;""")
    assert inside  # on screen, next to the form


def test_larger_text_fits_a_1920x1080_projector(driver, real_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1920, "height": 1080, "deviceScaleFactor": 1, "mobile": False})
    try:
        driver.get(real_server)
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".persona")) >= 3)
        driver.find_element(By.ID, "bigger").click()
        report = driver.execute_script("""
            const out = {size: [innerWidth, innerHeight], below: [], overflow: [], hiddenDesc: []};
            for (const card of document.querySelectorAll('.persona')) {
              const c = card.getBoundingClientRect();
              if (c.bottom > innerHeight) out.below.push(card.dataset.name);
              for (const el of card.querySelectorAll('*')) {
                const r = el.getBoundingClientRect();
                if (r.width && (r.right > c.right + 0.5 || r.left < c.left - 0.5))
                  out.overflow.push(`${card.dataset.name}: ${el.tagName}#${el.id} sticks out`);
              }
              const parts = [...card.querySelectorAll('.controls > *')].map((el) => [el, el.getBoundingClientRect()]);
              for (const [a, ra] of parts) for (const [b, rb] of parts) {
                const w = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
                const h = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
                if (a !== b && w > 1 && h > 1 && !a.contains(b) && !b.contains(a))
                  out.overflow.push(`${card.dataset.name}: ${a.tagName}#${a.id} overlaps ${b.tagName}#${b.id}`);
              }
              const d = card.querySelector('.desc');
              if (d && d.textContent && d.getBoundingClientRect().height < 10) out.hiddenDesc.push(card.dataset.name);
            }
            out.panesTop = document.querySelector('.panes').getBoundingClientRect().top;
            out.fontSize = getComputedStyle(document.documentElement).fontSize;
            return out;""")
        ARTIFACTS.mkdir(exist_ok=True)  # kept whether or not the checks below pass: look at it
        driver.save_screenshot(str(ARTIFACTS / "studio-larger-text-1920x1080.png"))
        assert report["size"] == [1920, 1080] and report["fontSize"] == "22px", report
        assert not report["below"], report  # every persona above the fold
        assert not report["overflow"], report  # no control sticks out of its card
        assert not report["hiddenDesc"], report  # descriptions shown
        assert report["panesTop"] < 1080 * 0.6, report  # and the output panes on screen
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
def test_the_page_sends_the_api_key_from_its_field(driver, tiny_dir, tmp_path):
    """With STEERLAB_API_KEY_ALL the page is useless without a key: its field (kept in
    sessionStorage, per tab) makes every call carry it."""
    from helpers import random_vector
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from steerlab.models import load_model
    from steerlab.server import ServerSettings, create_app
    from helpers import serve_in_thread
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


def test_condition_control_and_streamed_lighting(driver, real_server):
    """A persona card's "only when the prompt reads" control sends ``when``; a condition that cannot fire
    leaves the steered pane equal to the base one and says so; tokens are lit while they stream.
    Screenshot: ``artifacts/conditional.png``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(real_server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".persona[data-name=weeknd]"))
    driver.find_element(By.ID, "prompt").send_keys("How do I descale a kettle?")
    driver.find_element(By.CSS_SELECTOR, "label[for=use-weeknd]").click()
    Select(driver.find_element(By.ID, "cond-weeknd")).select_by_value("tabby_cats")
    at = driver.find_element(By.ID, "cond-at-weeknd")
    at.clear()
    at.send_keys("50")
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", at)
    driver.find_element(By.ID, "read").click()
    runs = driver.execute_script("return window.steerlab.runs")
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, 400).until(lambda d: d.execute_script("return window.steerlab.runs") > runs)
    body = driver.execute_script("return window.steerlab.lastRequest")
    assert body["steering"][0]["when"] == {"vector": "tabby_cats", "threshold": 50}
    result = driver.execute_script("return window.steerlab.lastResult")
    assert result["applied"][0]["fired"] is False and result["base"] == result["steered"]
    assert "did not fire" in driver.find_element(By.ID, "steered-tag").text
    assert driver.execute_script("return window.steerlab.streamedReads") > 0  # lit while streaming
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("document.getElementById('cond-weeknd').scrollIntoView({block: 'center'})")
    driver.save_screenshot(str(ARTIFACTS / "conditional.png"))
