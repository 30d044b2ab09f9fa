"""Receipts page in real headless Chromium, driven over WebDriver (chromedriver).

chromedriver is a local HTTP server; the test speaks the W3C WebDriver protocol
to it with urllib, so no browser-automation package is needed.  Under CI=true
these tests must run: a missing browser fails them instead of skipping.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from api_helpers import (  # noqa: F401  (fixtures)
    api_env,
    button,
    install,
    installed,
    registry,
    server_factory,
    write_registry,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
#: The flags this machine's Chromium needs to run headless as root, offline.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
]
#: Hostile registry text the page must show as text, never as markup.
HOSTILE_LABEL = "<img src=x onerror=\"document.title='pwned'\">"


def _require_browser():
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("chromium and chromium-driver are required under CI=true")
    pytest.skip("chromium or chromedriver not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Browser:
    """A minimal W3C WebDriver client for one Chromium session."""

    def __init__(self, port: int, session: str):
        self.base = f"http://127.0.0.1:{port}/session/{session}"

    def _call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(
                f"webdriver {method} {path}: {exc.read()[:500]!r}"
            ) from None

    def open(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self._call("POST", "/element", {"using": "css selector", "value": css})[
            ELEMENT
        ]

    def click(self, css: str) -> None:
        self._call("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        self._call("POST", f"/element/{self.find(css)}/value", {"text": text})

    def text(self, css: str) -> str:
        return self._call("GET", f"/element/{self.find(css)}/text")

    def run(self, script: str, *args):
        return self._call(
            "POST", "/execute/sync", {"script": script, "args": list(args)}
        )

    def wait_for(self, script: str, timeout: float = 20.0, *args):
        """Poll a script until it returns something truthy; return that."""
        give_up = time.monotonic() + timeout
        while True:
            value = self.run(script, *args)
            if value:
                return value
            assert time.monotonic() < give_up, f"timed out waiting for: {script}"
            time.sleep(0.1)

    def screenshot(self, path: str) -> None:
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(self._call("GET", "/screenshot")))


@pytest.fixture
def browser(tmp_path):
    _require_browser()
    port = _free_port()
    driver = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    profile = tempfile.mkdtemp(prefix="spell-chromium-")
    try:
        give_up = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/status", timeout=2
                ).read()
                break
            except OSError:
                assert time.monotonic() < give_up, "chromedriver did not start"
                time.sleep(0.1)
        options = {
            "binary": CHROMIUM,
            "args": CHROMIUM_FLAGS + [f"--user-data-dir={profile}"],
        }
        body = json.dumps(
            {
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": options,
                    }
                }
            }
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/session",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            session = json.loads(response.read())["value"]["sessionId"]
        browser = Browser(port, session)
        yield browser
        try:
            browser._call("DELETE", "")
        except AssertionError:
            pass
    finally:
        driver.terminate()
        try:
            driver.wait(10)
        except subprocess.TimeoutExpired:
            driver.kill()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def ui_server(server_factory, tmp_path):
    reg = write_registry(
        tmp_path,
        [
            button(
                "risky",
                "fixtures/risk-high",
                label="Delete the demo resource",
                description="High risk: asks for consent",
                allowed_roles=["admin"],
                required_confirmations={"risk": True, "billing": False},
            ),
            button(
                "hello",
                "fixtures/hello-host",
                label=HOSTILE_LABEL,
                description="</script><b>bold?</b>",
                defaults={"name": "ui"},
            ),
        ],
        name="ui.json",
    )
    return server_factory(registryPath=str(reg), authKeys=["admin=ui-key"])


def test_page_launches_a_confirmed_button_and_shows_its_receipt(
    browser, ui_server, tmp_path
):
    url = f"http://127.0.0.1:{ui_server.port}/"
    browser.open(url)
    assert browser.run("return document.title") == "Spell Receipts UI"
    # Without a key the server says so, and the page passes that on.
    browser.wait_for("return document.querySelector('#formMessage .message')")
    assert "AUTH_REQUIRED" in browser.text("#formMessage")
    browser.type("#apiToken", "ui-key")
    browser.click("#saveToken")
    browser.wait_for("return document.querySelectorAll('#buttons .card').length === 2")
    assert browser.run("return sessionStorage.getItem('spell.apiKey')") == "ui-key"

    # Hostile registry strings are shown as text and never become markup.
    card = browser.text('[data-button-id="hello"]')
    assert HOSTILE_LABEL in card and "</script><b>bold?</b>" in card
    assert (
        browser.run(
            "return document.querySelectorAll('#buttons img, #buttons b').length"
        )
        == 0
    )
    assert browser.run("return document.title") == "Spell Receipts UI"

    browser.click('[data-button-id="risky"] .select-button')
    assert browser.run("return document.getElementById('buttonId').value") == "risky"
    assert "risk consent" in browser.text("#guardHint")
    browser.click("#launch")
    browser.wait_for("return document.getElementById('confirmDialog').open")
    summary = browser.text("#confirmSummary")
    assert "fixtures/risk-high@1.0.0" in summary and "high" in summary
    assert "delete → demo-resource (changes it)" in summary
    assert (
        browser.run("return document.getElementById('confirmLaunch').disabled") is True
    )
    browser.click("#riskAck")
    assert (
        browser.run("return document.getElementById('confirmLaunch').disabled") is False
    )
    browser.click("#confirmLaunch")

    browser.wait_for(
        "return document.getElementById('detailStatus') && "
        "document.getElementById('detailStatus').textContent === 'succeeded'"
    )
    steps = browser.text("#receiptSteps")
    assert "step" in steps and "ok" in steps
    assert "exit_code" in browser.text("#receiptChecks")
    assert "stdout_head" not in browser.text("#executionDetail")
    browser.wait_for("return document.querySelector('#executions .status.succeeded')")
    browser.screenshot(str(tmp_path / "receipt.png"))

    # The status filter narrows the list; it refreshes by itself.
    browser.run(
        "const s = document.getElementById('executionStatus');"
        "s.value = 'failed'; s.dispatchEvent(new Event('change'));"
    )
    browser.wait_for(
        "return document.getElementById('executions').textContent"
        ".includes('No executions match')"
    )


def test_page_without_a_key_reports_a_refused_role(browser, server_factory, tmp_path):
    reg = write_registry(
        tmp_path,
        [
            button(
                "risky",
                "fixtures/risk-high",
                allowed_roles=["admin"],
                required_confirmations={"risk": True, "billing": False},
            )
        ],
        name="norole.json",
    )
    server = server_factory(registryPath=str(reg))
    browser.open(f"http://127.0.0.1:{server.port}/")
    browser.wait_for("return document.querySelectorAll('#buttons .card').length === 1")
    browser.click('[data-button-id="risky"] .select-button')
    browser.run("document.getElementById('actorRole').value = 'viewer'")
    browser.click("#launch")
    browser.wait_for(
        "return document.getElementById('formMessage').textContent"
        ".includes('actor role not allowed for selected button: viewer')"
    )
    assert browser.run("return document.getElementById('confirmDialog').open") is False
