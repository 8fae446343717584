"""A hostile page in a real browser: headless Chromium opens a page of another site that
posts to the daemon the way a cross-site request forgery does; nothing may start.

The page is served from ``localhost`` while the daemon listens on ``127.0.0.1``: two
sites to the browser, so it sends what it sends across sites (an Origin, Sec-Fetch-Site:
cross-site, and a text/plain body in place of JSON in ``no-cors`` mode).
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.rig import STANDIN_IMAGE, Rig

pytestmark = pytest.mark.integration

ATTACK_PAGE = """<!doctype html>
<html><body>
<iframe name="sink" id="sink"></iframe>
<form id="form" target="sink" method="POST" enctype="text/plain" action="{daemon}/switch">
  <input name='{{"model": "alpha", "x": "' value='"}}'>
</form>
<script>
const daemon = "{daemon}";
const results = {{}};
async function post(name, path, body) {{
  try {{
    // no-cors drops the JSON content type: the body goes as text/plain, without preflight.
    await fetch(daemon + path, {{
      method: "POST", mode: "no-cors", body,
      headers: {{"Content-Type": "application/json"}},
    }});
    results[name] = "sent";
  }} catch (error) {{
    results[name] = "failed: " + error;
  }}
}}
(async () => {{
  await post("register", "/models",
    JSON.stringify({{repo: "Org/Name", id: "x", image: "attacker/image"}}));
  await post("switch", "/switch", JSON.stringify({{model: "alpha"}}));
  try {{
    const answer = await fetch(daemon + "/status");
    results.read = "read " + answer.status;
  }} catch (error) {{
    results.read = "blocked";
  }}
  await new Promise((resolve) => {{
    document.getElementById("sink").addEventListener("load", resolve, {{once: true}});
    document.getElementById("form").submit();
  }});
  results.form = "submitted";
  window.attackDone = results;
}})();
</script>
</body></html>
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def attack_site(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A web server of another site: http://localhost:<port>/ serves tmp_path."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield site, int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_a_hostile_page_cannot_start_anything(
    rig: Rig, browser: webdriver.Chrome, attack_site: tuple[Path, int]
) -> None:
    """Register, switch, read and a form post from another site: all refused, nothing runs;
    then the dashboard, from the daemon's own origin, still switches."""
    rig.start_daemon()
    site, port = attack_site
    (site / "attack.html").write_text(ATTACK_PAGE.format(daemon=rig.url))
    browser.get(f"http://localhost:{port}/attack.html")
    results = WebDriverWait(browser, 30, poll_frequency=0.1).until(
        lambda b: b.execute_script("return window.attackDone || null")
    )
    assert results["register"] == "sent" and results["switch"] == "sent", results
    assert results["read"] == "blocked", results  # 403, and no CORS header to read it by
    assert results["form"] == "submitted"

    # The browser sent them (the daemon logged each refusal) and the daemon ran nothing.
    log = (rig.root / "daemon-0.log").read_text()
    origin = f"http://localhost:{port}"
    refusals = [line for line in log.splitlines() if "request refused" in line and origin in line]
    paths = {path for path in ("/models", "/switch", "/status") if any(path in r for r in refusals)}
    assert paths == {"/models", "/switch", "/status"}, refusals
    assert '"audit"' not in log
    assert rig.ever_started() == []
    models = requests.get(f"{rig.url}/models", timeout=10).json()["models"]
    assert "x" not in {model["id"] for model in models}

    # The daemon's own page keeps working.
    browser.get(rig.url + "/")
    wait = WebDriverWait(
        browser, 60, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    )
    selector = 'tr[data-model="alpha"] button[data-action="switch"]'

    def click(browser: webdriver.Chrome) -> bool:
        browser.find_element(By.CSS_SELECTOR, selector).click()
        return True

    wait.until(click)
    wait.until(
        lambda b: b.execute_script(
            "const row = document.querySelector('tr[data-model=\"alpha\"]');"
            "return row && row.dataset.state === 'ready';"
        )
    )
    assert rig.model_containers() == ["engine-alpha"]
    assert all(STANDIN_IMAGE in c.image.tags for c in rig.containers())
