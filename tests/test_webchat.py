"""The web chat page at `/`: served with its static files (open even when the API needs a key), and driven in a real
headless chromium over the DevTools protocol: send a message, watch the streamed reply equal the API's, stop a long
generation (the server aborts it), keep and send an API key.

LMFORGE_WEBCHAT_SCREENSHOT=docs/webchat.png writes the screenshot of the first exchange there.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from lmforge.serve.config import ServeConfig
from lmforge.serve.webchat import PAGE_PATHS
from test_serve import running

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
KEY = "sk-webchat-test"


@pytest.fixture(scope="module")
def server(base):
    with running(ServeConfig(model=[str(base)], name=["tiny"])) as served:
        yield served


@pytest.fixture(scope="module")
def keyed_server(base):
    with running(ServeConfig(model=[str(base)], name=["tiny"], api_key=[KEY])) as served:
        yield served


class Browser:
    """Headless chromium with one page, driven over the DevTools protocol (a websocket of JSON commands)."""

    def __init__(self, profile: Path) -> None:
        from websockets.sync.client import connect

        # port 0: chromium picks a free port and writes it to DevToolsActivePort in the profile (no race)
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--window-size=1200,800", "--no-first-run", "--no-default-browser-check",
             "--hide-scrollbars", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.process.poll() is None, f"chromium exited with {self.process.returncode}"
            assert time.time() < deadline, "chromium did not open its DevTools port in 30 s"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        self.connection = contextlib.ExitStack()
        self.socket = self.connection.enter_context(connect(pages[0]["webSocketDebuggerUrl"], max_size=None))
        self.last_id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=1200, height=800, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.last_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        deadline = time.time() + timeout
        while not (value := self.evaluate(expression)):
            assert time.time() < deadline, (f"timed out waiting for {expression}; page state "
                                            f"{self.evaluate('document.body && document.body.dataset.state')}")
            time.sleep(0.03)
        return value

    def open(self, url: str) -> None:
        """Load `url` and wait until the page has listed the models (or failed to)."""
        self.evaluate("window.leaving = true")  # a mark the new document does not have
        self.call("Page.navigate", url=url)
        self.wait_for("!window.leaving && document.readyState === 'complete' && "
                      "['loading', undefined].indexOf(document.body.dataset.state) < 0")

    def fill(self, values: dict[str, str]) -> None:
        """Set form fields by id, as typing would (input and change events)."""
        self.evaluate(f"""for (const [id, value] of Object.entries({json.dumps(values)})) {{
            const field = document.getElementById(id);
            field.value = value;
            field.dispatchEvent(new Event("input", {{bubbles: true}}));
            field.dispatchEvent(new Event("change", {{bubbles: true}}));
        }}""")

    def type(self, element_id: str, text: str) -> None:
        self.evaluate(f"document.getElementById({json.dumps(element_id)}).focus()")
        self.call("Input.insertText", text=text)

    def click(self, element_id: str) -> None:
        """A real mouse click at the element's centre (it must be visible and on top)."""
        x, y = self.evaluate(f"""(() => {{ const r = document.getElementById({json.dumps(element_id)})
            .getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def last(self, selector: str) -> str:
        """The text of the last element matching `selector` ("" when none)."""
        return self.evaluate(f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.textContent)"
                             ".pop() || ''")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    chromium = Browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield chromium
    finally:
        chromium.close()


def metric(url: str, name: str) -> float:
    """One model's value of a /metrics series."""
    text = httpx.get(url + "/metrics").text
    return float(re.search(rf'^{name}{{model="tiny"}} (\S+)$', text, re.M).group(1))


def test_the_page_and_its_files_are_served_and_load_nothing_from_elsewhere(server):
    url = server[1]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/chat.js"' in page.text and 'href="static/chat.css"' in page.text
    for path in PAGE_PATHS:
        response = httpx.get(url + path)
        assert response.status_code == 200, path
        assert not re.search(r"https?://|//cdn|@import", response.text), f"{path} loads something from elsewhere"
    assert httpx.get(url + "/static/chat.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(url + "/static/missing.js").status_code == 404
    assert "innerHTML" not in httpx.get(url + "/static/chat.js").text  # model output only ever as text


def test_a_stream_to_a_browser_closes_its_connection_and_others_keep_alive(server):
    """A browser drains an aborted body to reuse the connection (the page's stop would not reach the server for
    up to 5 s); `Connection: close` makes it drop the connection instead."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 2, "stream": True}
    for headers, closes in (({"Sec-Fetch-Mode": "cors"}, True), ({}, False)):
        with httpx.stream("POST", server[1] + "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert (response.headers.get("connection") == "close") == closes
            assert list(response.iter_lines())[-2:] == ["data: [DONE]", ""]
    page = httpx.get(server[1] + "/", headers={"Sec-Fetch-Mode": "navigate"})
    assert page.status_code == 200 and page.headers.get("connection") != "close"


def test_the_page_is_open_while_the_api_needs_a_key(keyed_server):
    url = keyed_server[1]
    for path in PAGE_PATHS:
        assert httpx.get(url + path).status_code == 200, \
            f"{path} needs a key: lmforge.serve.guard.OPEN_PATHS must hold webchat.PAGE_PATHS"
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@needs_chromium
def test_a_message_streams_the_reply_the_api_gives_and_errors_show_in_the_conversation(server, browser):
    url = server[1]
    browser.open(url + "/")
    assert browser.evaluate("document.body.dataset.state") == "idle"
    assert browser.evaluate("document.getElementById('title').textContent") == "tiny"
    system, question = "Answer briefly.", "a dog is a kind of"
    browser.fill({"system": system, "temperature": "0", "max_tokens": "12"})
    browser.type("input", question)
    browser.click("send")
    browser.wait_for("document.body.dataset.state === 'done'")

    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    want = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": messages, "temperature": 0,
                                                          "max_tokens": 12}).json()["choices"][0]
    reply = browser.last(".message.assistant .content")
    assert reply and reply == want["message"]["content"]
    assert browser.last(".message.user .content") == question and browser.evaluate(
        "document.getElementById('input').value") == ""
    meta = browser.last(".message.assistant .meta")
    assert "tokens/s" in meta and ("cut at max tokens" in meta) == (want["finish_reason"] == "length")

    png = browser.screenshot()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1200, 800)
    if os.environ.get("LMFORGE_WEBCHAT_SCREENSHOT"):
        Path(os.environ["LMFORGE_WEBCHAT_SCREENSHOT"]).write_bytes(png)

    # a 400 from the server: its message in the conversation, the text back in the box, Enter sends
    browser.fill({"max_tokens": "100000"})
    browser.type("input", "the cat")
    browser.press_enter()
    browser.wait_for("document.body.dataset.state === 'error'")
    assert "above this server's limit" in browser.last(".message.error .content")
    assert browser.evaluate("document.getElementById('input').value") == "the cat"
    assert browser.evaluate("[...document.querySelectorAll('.message.user')].pop().classList.contains('failed')")


@needs_chromium
def test_an_error_event_in_the_stream_shows_in_the_conversation(server, browser, monkeypatch):
    from lmforge.errors import LmforgeError

    def failing_step() -> None:
        raise LmforgeError("the engine failed on purpose")

    monkeypatch.setattr(server[0].config.app.state.models["tiny"].engine.engine, "step", failing_step)
    browser.open(server[1] + "/")
    browser.type("input", "the cat")
    browser.press_enter()
    browser.wait_for("document.body.dataset.state === 'error'")
    assert browser.last(".message.error .content") == "the engine failed on purpose"
    assert not browser.evaluate("document.querySelector('.message.assistant')")  # no empty reply left behind


@needs_chromium
def test_the_stop_button_aborts_the_generation_on_the_server(server, browser, monkeypatch):
    srv, url = server
    engine = srv.config.app.state.models["tiny"].engine.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.1), step())[1])  # ~6 s for the whole reply
    browser.open(url + "/")
    browser.fill({"temperature": "0", "max_tokens": "64"})
    generated = metric(url, "lmforge_generation_tokens_total")
    browser.type("input", "the cat")
    browser.click("send")
    browser.wait_for("document.querySelector('.message.assistant .content')?.textContent.length > 0")
    assert metric(url, "lmforge_running_sequences") == 1
    assert browser.evaluate("document.getElementById('send').hidden && !document.getElementById('stop').hidden")
    browser.click("stop")
    browser.wait_for("document.body.dataset.state === 'stopped'", timeout=3)
    deadline = time.time() + 3
    while metric(url, "lmforge_running_sequences") and time.time() < deadline:
        time.sleep(0.05)
    assert metric(url, "lmforge_running_sequences") == 0 and metric(url, "lmforge_kv_cache_usage") == 0
    time.sleep(0.3)  # an engine still generating would go on counting tokens
    assert metric(url, "lmforge_generation_tokens_total") - generated < 30
    assert browser.last(".message.assistant .content") and "stopped" in browser.last(".message.assistant .meta")


@needs_chromium
def test_the_page_asks_for_a_key_keeps_it_and_sends_it(keyed_server, browser):
    url = keyed_server[1]
    browser.open(url + "/")
    assert browser.evaluate("document.body.dataset.state") == "needs-key"
    browser.fill({"api_key": KEY})  # the change event: the page keeps the key and lists the models with it
    browser.wait_for("document.body.dataset.state === 'idle'")
    browser.open(url + "/")  # the key was kept in localStorage: none to type again
    assert browser.evaluate("document.body.dataset.state") == "idle"
    assert browser.evaluate("localStorage.getItem('lmforge.api_key')") == KEY
    browser.fill({"max_tokens": "4"})
    browser.type("input", "the cat")
    browser.press_enter()
    browser.wait_for("document.body.dataset.state === 'done'")
    assert browser.last(".message.assistant .content")
