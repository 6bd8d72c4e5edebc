"""The live page at ``/ui`` in a real browser: Debian's Chromium, headless, driven by
Playwright, against a real ``sarai-router serve`` (an API key, the real models).

What a person would check: the page asks for the key once and keeps it out of the URL,
the models show, a request appears with its routing reason, the Unload button unloads,
and a prompt holding ``<script>`` is shown as text and never runs.

Playwright's own browser downloads are never used: the browser is /usr/bin/chromium
(``apt-get install chromium``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from conftest import base_toml
from sarai_router.testing import start_serve

API_KEY = "ui-key-1"
CHROMIUM = os.environ.get("SARAI_ROUTER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WAIT_MS = 60_000

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    config = tmp_path_factory.mktemp("ui") / "sarai.toml"
    config.write_text(base_toml(
        models_dir, cache="ttl_seconds = 600\nmax_loaded = 2",
        fast="pinned = true\nn_threads = 1", quality="n_threads = 1"), encoding="utf-8")
    with start_serve(config, args=["--api-key", API_KEY], echo=False,
                     env={**os.environ, "SARAI_ROUTER_NO_PLUGINS": "1"}) as served:
        yield served.url


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (Debian's "
                    "package; .ci/run installs it)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, server):
    """The page, opened once and given the key once, as a person would."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.errors = []  # uncaught script errors: any is a failure
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.requests = requests
    page.goto(server + "/ui")
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#key-input", API_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#conn.live")
    yield page
    context.close()


def chat(server: str, prompt: str, model: str = "auto") -> httpx.Response:
    answer = httpx.post(server + "/v1/chat/completions", timeout=120,
                        headers={"authorization": f"Bearer {API_KEY}"},
                        json={"model": model, "max_tokens": 4,
                              "messages": [{"role": "user", "content": prompt}]})
    assert answer.status_code == 200, answer.text
    return answer


def test_the_page_shows_the_models_and_keeps_the_key_out_of_urls(page, server):
    fast = page.locator("tr[data-model=fast]")
    quality = page.locator("tr[data-model=quality]")
    fast.locator(".state.loaded").wait_for()
    assert "pinned" in fast.inner_text() and "never (pinned)" in fast.inner_text()
    assert "MB" in fast.inner_text()  # its RSS against the budget
    assert quality.locator(".state").inner_text() == "unloaded"
    assert fast.locator("button.unload").is_disabled()  # pinned: the config holds it
    assert "MB of 12288 MB budget" in page.inner_text("#budget-text")
    assert page.evaluate("sessionStorage.getItem('sarai-router.api-key')") == API_KEY
    assert page.requests and not [url for url in page.requests if API_KEY in url]
    assert page.errors == []


def test_a_request_appears_with_its_routing_reason(page, server):
    answer = chat(server, "Me siento muy triste hoy")
    request_id = answer.headers["x-request-id"]
    row = page.locator(f"#feed tr[data-request-id='{request_id}']")
    row.locator("td.finish", has_text="length").or_(
        row.locator("td.finish", has_text="stop")).wait_for()
    assert row.locator("td.model").inner_text() == "fast"
    assert row.locator("td.plugin").inner_text() == "heuristic"
    assert row.locator("td.reason").inner_text().startswith("short emotional conversation")
    assert float(row.locator("td.empathy").inner_text()) > 0.8
    assert row.locator("td.chars").inner_text() == str(len("Me siento muy triste hoy"))
    assert row.locator("td.modality").inner_text() == "text"
    assert row.locator("td.tokens").inner_text().endswith(" + 4")
    assert page.errors == []


def test_the_load_and_unload_buttons_change_what_the_server_holds(page, server):
    quality = page.locator("tr[data-model=quality]")
    quality.locator("button.load").click()
    quality.locator(".state.loaded").wait_for()
    assert "loaded in" in page.inner_text("#models-message")
    held = httpx.get(server + "/admin/models", headers={"authorization": f"Bearer {API_KEY}"})
    assert {m["name"]: m["state"] for m in held.json()["models"]}["quality"] == "loaded"
    quality.locator("button.unload").click()
    quality.locator(".state.unloaded").wait_for()
    assert page.inner_text("#models-message") == "quality unloaded"
    held = httpx.get(server + "/admin/models", headers={"authorization": f"Bearer {API_KEY}"})
    assert {m["name"]: m["state"] for m in held.json()["models"]}["quality"] == "unloaded"
    page.locator("#model-log li", has_text="quality unloaded").first.wait_for()
    assert page.errors == []


def test_a_prompt_holding_script_is_shown_as_text_and_never_runs(page, server):
    prompt = ('<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
              " ¿qué ves en esta foto?")
    page.fill("#prompt", prompt)
    page.click("#route-form button[type=submit]")
    page.locator("#route-result .route-model").wait_for()
    assert page.inner_text("#route-result .prompt") == prompt
    assert page.locator("#route-result img, #route-result script").count() == 0
    assert page.evaluate("window.__pwned") is None
    # The decision and each routing plugin's answer, with nothing generated.
    assert page.inner_text("#route-result .route-model") == "quality"
    assert page.inner_text("#route-result .route-plugin") == "heuristic"
    assert "foto" in page.inner_text("#route-result .route-reason")
    assert "← decided" in page.inner_text("#route-result .trace li.decided")
    held = httpx.get(server + "/admin/models", headers={"authorization": f"Bearer {API_KEY}"})
    assert {m["name"]: m["state"] for m in held.json()["models"]}["quality"] == "unloaded"
    assert page.errors == []


def test_a_reloaded_page_asks_no_key_again_and_a_wrong_key_is_asked_again(browser, server,
                                                                          page):
    page.reload()
    page.wait_for_selector("#conn.live")
    assert page.locator("#key-form").is_hidden()
    other = browser.new_context().new_page()
    other.set_default_timeout(WAIT_MS)
    other.goto(server + "/ui")
    other.wait_for_selector("#key-form:not([hidden])")
    other.fill("#key-input", "not-the-key")
    other.click("#key-form button[type=submit]")
    other.wait_for_selector("#key-error:has-text('refused')")
    assert other.locator("#key-form").is_visible()
    other.context.close()


def test_without_an_api_key_the_page_asks_for_none(browser, tmp_path, models_dir):
    config = tmp_path / "sarai.toml"
    config.write_text(base_toml(models_dir, fast="pinned = true\nn_threads = 1"),
                      encoding="utf-8")
    with start_serve(config, echo=False) as served:
        page = browser.new_context().new_page()
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(served.url + "/ui")
        page.locator("tr[data-model=fast] .state.loaded").wait_for()
        assert page.locator("#key-form").is_hidden()
        assert page.locator("#forget-key").is_hidden()
        assert page.evaluate("sessionStorage.length") == 0
        assert errors == []
        page.context.close()
