"""The search page at GET /, in a real headless browser (Debian's chromium driven by Selenium through
/usr/bin/chromedriver; `.ci/run` installs both). Saves a screenshot to artifacts/search_page.png."""

import tempfile
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import colbert_jax
from colbert_jax.search.explain import doc_token_spans
from colbert_jax.server import MAX_QUERY_CHARS, create_app
from tests.test_server import QUERIES, start

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# No network beyond loopback and no first-run work; a fresh profile per run.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,1500",
]


@pytest.fixture(scope="module")
def url(real_index, minilm_model):
    searcher = colbert_jax.Searcher(real_index, checkpoint=minilm_model, truncate=True)
    srv, thread, base = start(create_app(searcher))
    yield base, searcher
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path given, Selenium Manager downloads nothing
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def test_page_searches_and_highlights_the_matched_tokens(url, browser):
    base, searcher = url
    query = QUERIES[3]
    browser.get(f"{base}/")
    assert browser.title == "colbert-jax search"
    browser.find_element(By.ID, "query").send_keys(query)
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 180).until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "li.result.explained")) == 10
            and d.find_element(By.ID, "go").is_enabled()
        )  # re-enabled once everything is rendered
    )
    WebDriverWait(browser, 30).until(lambda d: "ready" in d.find_element(By.ID, "status").text)

    expected = searcher.search(query, k=100)[:10]
    items = browser.find_elements(By.CSS_SELECTOR, "li.result")
    assert [int(item.get_attribute("data-pid")) for item in items] == [pid for pid, _, _ in expected]
    first = items[0]
    assert f"score {expected[0][2]:.3f}" in first.find_element(By.CSS_SELECTOR, ".meta").text
    assert first.find_element(By.CSS_SELECTOR, ".text").text == " ".join(searcher.passages([expected[0][0]])[0].split())

    # The highlights are the explain API's matches: each marked span is a matched token's text.
    matches = searcher.explain(query, expected[0][0])
    text = searcher.passages([expected[0][0]])[0]
    marks = first.find_elements(By.CSS_SELECTOR, "mark.match")
    assert marks
    spans = doc_token_spans(searcher.model, text)
    matched = {text[slice(*spans[m.doc_position])] for m in matches if spans[m.doc_position]}
    assert {mark.text for mark in marks} == matched
    words = [m.query_token for m in matches if m.query_token not in ("[CLS]", "[SEP]", "[MASK]", "[unused0]")]
    assert any(w in mark.get_attribute("data-query-tokens").split() for mark in marks for w in words)

    # The alignment table, opened for the first result: a row per query token, the [MASK] padding in one,
    # summing to the score.
    assert first.find_element(By.TAG_NAME, "details").get_attribute("open") is not None
    rows = first.find_elements(By.CSS_SELECTOR, "table.alignment tr")[1:]
    masks = sum(m.query_token == "[MASK]" for m in matches)
    assert masks and len(rows) == len(matches) - masks + 1
    cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    assert [c[0] for c in cells[:2]] == ["[CLS]", "[Q]"] and cells[-1][0] == f"[MASK] ×{masks}"
    shown = {"[unused0]": "[Q]", "[unused1]": "[D]"}  # the markers under the ColBERT paper's names
    expected_tokens = [shown.get(m.doc_token, m.doc_token) for m in matches[2 : len(rows) - 1]]
    assert [c[1].split(" (#")[0] for c in cells[2:-1]] == expected_tokens
    total = sum(float(row.find_elements(By.TAG_NAME, "td")[2].text) for row in rows)
    assert total == pytest.approx(expected[0][2], abs=0.02)

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "search_page.png"))


def test_page_shows_server_errors(url, browser):
    base, _ = url
    browser.get(f"{base}/?q={'x' * (MAX_QUERY_CHARS + 1)}")  # a query too long: the server's message is shown
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert f"at most {MAX_QUERY_CHARS} are allowed" in browser.find_element(By.ID, "error").text
    assert browser.find_elements(By.CSS_SELECTOR, "li.result") == []


def test_page_assets_are_served_by_the_server(url):
    base, _ = url
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{base}/static/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert "http" not in page.text.replace(base, "")  # nothing from elsewhere: no CDN
