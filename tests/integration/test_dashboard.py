"""The web dashboard end to end: headless Chromium against the real daemon and engines."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.rig import REPO_ROOT, Rig

pytestmark = pytest.mark.integration

SCREENSHOT = REPO_ROOT / "tests" / "artifacts" / "dashboard.png"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    driver_path = shutil.which("chromedriver")
    chromium = shutil.which("chromium")
    if driver_path is None or chromium is None:
        pytest.fail("the dashboard test needs Debian's chromium and chromium-driver (.ci/run)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def row_state(browser: webdriver.Chrome, model: str) -> str:
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-model="{model}"]')
    return str(row.get_attribute("data-state"))


def test_switch_from_the_dashboard(rig: Rig, browser: webdriver.Chrome) -> None:
    """Open the page, click Switch, watch the model become ready with its log, keep a picture."""
    rig.start_daemon()
    browser.get(rig.url + "/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    wait.until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, 'tr[data-model="alpha"]'))
    )
    assert browser.find_element(By.ID, "state-badge").text == "idle"
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#models td.name")]
    assert "alpha" in names and "beta" in names
    uncached = browser.find_element(By.CSS_SELECTOR, 'tr[data-model="nocache"]')
    assert "missing" in uncached.text
    assert not uncached.find_element(By.CSS_SELECTOR, "button").is_enabled()

    browser.find_element(
        By.CSS_SELECTOR, 'tr[data-model="alpha"] button[data-action="switch"]'
    ).click()
    wait.until(lambda b: row_state(b, "alpha") == "starting")
    wait.until(lambda b: row_state(b, "alpha") == "ready")
    row = browser.find_element(By.CSS_SELECTOR, 'tr[data-model="alpha"]')
    assert "active" in str(row.get_attribute("class"))
    assert browser.find_element(By.ID, "state-badge").text == "ready: alpha"
    wait.until(lambda b: "Application startup complete" in b.find_element(By.ID, "log").text)
    wait.until(lambda b: "ok" in b.find_element(By.CSS_SELECTOR, "#history tbody").text)
    assert rig.model_containers() == ["engine-alpha"]

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert Path(SCREENSHOT).stat().st_size > 10_000
