"""Feature pages in a real headless browser (Debian's chromium + chromedriver, driven by selenium),
opened from disk as a user would: file:// URLs, no server.

The browser is a test dependency: `bash scripts/install-browser.sh` installs it. Without it these tests
FAIL (they do not skip), so CI cannot pass while silently not looking at the pages.
Screenshots land in tests/artifacts/ (which ignores itself in git).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pages_testdata import (
    BRIDGE,
    DEAD,
    N_FEATURES,
    OTHER,
    SAE,
    make_run,
    word_tokenizer,
)
from saecore.pages import build_pages, feature_href

ARTIFACTS = Path(__file__).parent / "artifacts"
INSTALL_HINT = "run `bash scripts/install-browser.sh` (apt: chromium chromium-driver; pip: selenium)"


def _browser_paths() -> tuple[str, str]:
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail(f"no headless browser (chromium: {binary}, chromedriver: {driver}); {INSTALL_HINT}")
    return binary, driver


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed; {INSTALL_HINT}")
    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = make_run(tmp_path_factory.mktemp("browser"))
    build_pages(data.run, tokenizer=word_tokenizer(), activations=data.activations, progress=False)
    return data


def url(site, *parts: str) -> str:
    return (site.run / "pages").joinpath(*parts).resolve().as_uri()


def console_problems(driver) -> list[dict]:
    """Console entries at error level (uncaught exceptions, failed script loads)."""
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def wait_for(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def open_index(driver, site):
    driver.get(url(site, SAE, "index.html"))
    wait_for(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded") == "true")


def table_features(driver) -> list[int]:
    return [int(r.get_attribute("data-feature")) for r in driver.find_elements("css selector", "#feature-table tr[data-feature]")]


def save_screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"screenshot {path} not written"
    assert path.stat().st_size > 10_000
    return path


def test_root_and_index_load_without_console_errors(browser, site):
    browser.get(url(site, "index.html"))
    links = [a.text for a in browser.find_elements("css selector", ".sae-list a")]
    assert links == [SAE, OTHER]
    open_index(browser, site)
    assert console_problems(browser) == []
    # Dead features are hidden by default; unticking shows them.
    assert table_features(browser) == [f for f in range(N_FEATURES) if f != DEAD]
    browser.find_element("id", "hide-dead").click()
    assert table_features(browser) == list(range(N_FEATURES))
    save_screenshot(browser, "pages-index.png")


def test_index_search_and_sort(browser, site):
    from selenium.webdriver.support.ui import Select

    open_index(browser, site)
    box = browser.find_element("id", "search")
    box.send_keys(str(BRIDGE))
    assert table_features(browser) == [BRIDGE]
    box.clear()
    box.send_keys("bridge")
    shown = table_features(browser)
    rows = browser.find_elements("css selector", "#feature-table tr[data-feature] td.mono")
    assert BRIDGE in shown and all("bridge" in r.text for r in rows)
    box.clear()
    box.send_keys("x")  # clear() fires no input event; a keystroke and a backspace do
    box.send_keys("\b")
    Select(browser.find_element("id", "sort")).select_by_value("max")
    maxes = site.acts.max(0)
    alive = [f for f in np.argsort(-maxes, kind="stable") if maxes[f] > 0]
    assert table_features(browser) == [int(f) for f in alive]
    Select(browser.find_element("id", "sort")).select_by_value("density")
    counts = (site.acts > 0).sum(0)
    assert table_features(browser)[0] == int(np.argmax(counts))
    assert console_problems(browser) == []


def test_map_point_click_opens_that_feature(browser, site):
    from selenium.webdriver.common.action_chains import ActionChains

    open_index(browser, site)
    canvas = browser.find_element("id", "map")
    points = browser.execute_script("return {x: Array.from(window.SAECORE_MAP_POINTS.px),"
                                    " y: Array.from(window.SAECORE_MAP_POINTS.py)};")
    i = BRIDGE  # map.parquet lists sae_a's features first, in order
    size = canvas.size
    dx, dy = points["x"][i] - size["width"] / 2, points["y"][i] - size["height"] / 2
    ActionChains(browser).move_to_element_with_offset(canvas, round(dx), round(dy)).click().perform()
    wait_for(browser, lambda d: d.current_url.endswith(f"/{SAE}/{feature_href(BRIDGE)}"))
    wait_for(browser, lambda d: d.find_elements("css selector", "#top .example"))


def test_feature_page_shows_the_top_example_with_its_token_highlighted(browser, site):
    browser.get(url(site, SAE, feature_href(BRIDGE)))
    wait_for(browser, lambda d: d.find_elements("css selector", "#top .example"))
    assert console_problems(browser) == []
    assert browser.find_element("tag name", "h1").text == f"{SAE} · feature {BRIDGE}"
    first = browser.find_elements("css selector", "#top .example")[0]
    hit = first.find_element("css selector", ".tok.hit")
    assert hit.is_displayed() and hit.text.strip() == "bridge"
    best = int(np.argmax(site.acts[:, BRIDGE]))
    assert first.get_attribute("data-row") == str(best)
    assert first.find_element("css selector", ".val").text == f"{site.acts[best, BRIDGE]:.3g}"
    background = hit.value_of_css_property("background-color")
    assert background.startswith("rgba(247, 103, 7") and not background.endswith(", 0)")
    # Full per-token shading: the weakly active next token is lighter but shaded; inactive ones are not.
    tokens = first.find_elements("css selector", ".tok")
    c = tokens.index(hit)
    weak = tokens[c + 1].value_of_css_property("background-color")
    assert tokens[c + 1].text.strip() == "gate" and weak.startswith("rgba(247, 103, 7")
    assert float(weak.split(",")[3].rstrip(")")) < float(background.split(",")[3].rstrip(")"))
    off = [t for t in tokens if t.get_attribute("data-act") == "0"]
    assert off and all(t.value_of_css_property("background-color") == "rgba(0, 0, 0, 0)" for t in off)
    # The other sections drew from their tables.
    assert len(browser.find_elements("css selector", "#samples .bin")) >= 2
    assert len(browser.find_elements("css selector", "#histogram rect.bar")) == 4
    assert browser.find_elements("css selector", "#logit-lens td.tokcell")
    assert "per-token-note" not in browser.page_source
    shot = save_screenshot(browser, "pages-feature.png")
    assert shot.exists()


def test_neighbour_links_navigate_within_and_across_saes(browser, site):
    browser.get(url(site, SAE, feature_href(BRIDGE)))
    wait_for(browser, lambda d: d.find_elements("css selector", "a.neighbour"))
    browser.find_element("css selector", f'a.neighbour[data-sae="{SAE}"][data-feature="4"]').click()
    wait_for(browser, lambda d: d.current_url.endswith(f"/{SAE}/{feature_href(4)}"))
    wait_for(browser, lambda d: d.find_elements("tag name", "h1"))
    assert browser.find_element("tag name", "h1").text == f"{SAE} · feature 4"
    assert console_problems(browser) == []
    browser.find_element("css selector", f'a.neighbour[data-sae="{OTHER}"]').click()
    wait_for(browser, lambda d: d.current_url.endswith(f"/{OTHER}/{feature_href(2)}"))
    wait_for(browser, lambda d: d.find_elements("css selector", "#top .example"))
    # sae_b has no histogram, samples, lens or neighbours tables: those sections are absent, not broken.
    for section in ("histogram", "samples", "logit-lens", "neighbours"):
        assert not browser.find_elements("id", section)
    assert browser.find_element("id", "per-token-note").is_displayed()
    assert console_problems(browser) == []


def test_feature_page_shows_synthetic_text_as_text_and_both_lenses(browser, tmp_path):
    # saecore maximise's result and the encoder logit lens, drawn by feature.js; the optimised tokens are
    # data (here markup that would run if inserted as HTML) and must show as text.
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from saecore import tables
    from saecore.run import Run, maximise_dir, maximise_file

    data = make_run(tmp_path)
    index = Run(data.run).index(SAE)
    lens = pq.read_table(tables.LOGIT_LENS.path(index))
    tables.LOGIT_LENS_ENCODER.write(lens.set_column(4, "token", pa.array([t.upper() for t in lens["token"].to_pylist()])),
                                    tables.LOGIT_LENS_ENCODER.path(index))
    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    seq = {"tokens": [hostile, " bridge"], "activation": 2.5, "pre": 2.5, "retokenized_activation": 2.0, "nll": None}
    result = {"gcg": [seq], "random": [seq | {"activation": 1.0}], "evaluations_per_search": 10,
              "config": {"position": "last", "fluency": 0.0}, "dataset_top": [{"value": 3.0, "text": "the «bridge»"}]}
    folder = maximise_dir(Run(data.run).sae(SAE))
    folder.mkdir(parents=True)
    (folder / maximise_file(BRIDGE)).write_text(json.dumps(result))
    build_pages(data.run, tokenizer=word_tokenizer(), activations=data.activations, progress=False)
    browser.get((data.run / "pages").joinpath(SAE, feature_href(BRIDGE)).resolve().as_uri())
    wait_for(browser, lambda d: d.find_elements("css selector", "#synthetic tr.synth-GCG"))
    assert console_problems(browser) == []
    row = browser.find_element("css selector", "#synthetic tr.synth-GCG")
    assert hostile in row.text and not browser.find_elements("css selector", "#synthetic img")
    assert "pwned" not in browser.title
    assert browser.find_element("css selector", "#synthetic-dataset").text.count("«bridge»") == 1
    decoder = browser.find_elements("css selector", "#lens-decoder td.tokcell")
    encoder = browser.find_elements("css selector", "#lens-encoder td.tokcell")
    assert decoder and [e.text for e in encoder] == [d.text.upper() for d in decoder]
    assert "encoder · decoder cosine" in browser.find_element("id", "lens-cosine").text
    save_screenshot(browser, "pages-feature-synthetic.png")
