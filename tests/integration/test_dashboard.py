"""The web dashboard end to end: headless Chromium against the real daemon and engines."""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.rig import REPO_ROOT, Rig

pytestmark = pytest.mark.integration

SCREENSHOT = REPO_ROOT / "tests" / "artifacts" / "dashboard.png"


def row_state(browser: webdriver.Chrome, model: str) -> str:
    # The page rebuilds its table on every event, so an element found in one call can be
    # gone by the next; one script reads the row in the page's own turn.
    return str(
        browser.execute_script(
            'const row = document.querySelector(`tr[data-model="${arguments[0]}"]`);'
            "return row ? row.dataset.state : '';",
            model,
        )
    )


def row_facts(browser: webdriver.Chrome, model: str) -> dict[str, object]:
    facts = browser.execute_script(
        'const row = document.querySelector(`tr[data-model="${arguments[0]}"]`);'
        "if (!row) return null;"
        "const button = row.querySelector('button');"
        "return {text: row.innerText, classes: row.className,"
        " button_enabled: button ? !button.disabled : null};",
        model,
    )
    assert facts is not None, f"no row for {model}"
    return dict(facts)


def click_switch(browser: webdriver.Chrome, model: str) -> bool:
    selector = f'tr[data-model="{model}"] button[data-action="switch"]'
    browser.find_element(By.CSS_SELECTOR, selector).click()
    return True


def test_switch_from_the_dashboard(rig: Rig, browser: webdriver.Chrome) -> None:
    """Open the page, click Switch, watch the model become ready with its log, keep a picture."""
    rig.start_daemon()
    browser.get(rig.url + "/")
    wait = WebDriverWait(
        browser, 60, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    )
    wait.until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, 'tr[data-model="alpha"]'))
    )
    assert browser.find_element(By.ID, "state-badge").text == "idle"
    names = browser.execute_script(
        "return [...document.querySelectorAll('#models td.name')].map((cell) => cell.innerText);"
    )
    assert "alpha" in names and "beta" in names
    uncached = row_facts(browser, "nocache")
    assert "missing" in str(uncached["text"])
    assert uncached["button_enabled"] is False

    # A click on a button the page has just replaced goes stale; the wait retries it.
    wait.until(lambda b: click_switch(b, "alpha"))
    wait.until(lambda b: row_state(b, "alpha") == "starting")
    wait.until(lambda b: row_state(b, "alpha") == "ready")
    assert "active" in str(row_facts(browser, "alpha")["classes"])
    assert browser.find_element(By.ID, "state-badge").text == "ready: alpha"
    wait.until(lambda b: "Application startup complete" in b.find_element(By.ID, "log").text)
    wait.until(lambda b: "ok" in b.find_element(By.CSS_SELECTOR, "#history tbody").text)
    assert rig.model_containers() == ["engine-alpha"]

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert Path(SCREENSHOT).stat().st_size > 10_000
