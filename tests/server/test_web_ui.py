"""The web UI in headless Chromium against the real server: the canvas, the replay slider, the answer, errors.

The browser is the system Chromium (Debian's ``chromium`` package; ``.ci/run`` installs it when it can),
driven by the ``playwright`` Python package through ``executable_path``. Playwright's own browser download
is never used (it needs a network this project cannot count on), and a recent Playwright speaks the
DevTools protocol of current Chromium releases. It was chosen over a hand-written DevTools client because
it waits for selectors and network by itself, reports console messages and page errors, and takes
screenshots: the test states what the page must show, not how to poll for it. Every test here skips, saying
why, where Chromium or playwright is missing.

Truth comes from the server itself, read independently with httpx: the non-streaming answer at
temperature 0 must equal the page's final message, and the step that decided each answer position, worked
out here from the raw server-sent events, must equal each cell's ``data-step``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                              "(pip install -e '.[test]')")

API_KEY = "web-ui-test-key"
CHROMIUM_ENV = "LLADA_CHROMIUM"  # path of a Chromium binary, when it is not on PATH
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Without the background-networking flags Chromium tries to reach Google's services at start, which a
# machine without internet refuses (slowly, and noisily).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps"]
SETTINGS = {"max_tokens": 16, "block_length": 8, "temperature": 0.0, "policy": "threshold", "threshold": 0.9,
            "cache": "dual", "remasking": "low_confidence", "cfg_scale": 0.0}
PROMPT = "The quick brown fox"
FOLLOW_UP = "And then?"
TIMEOUT_MS = 60_000


def chromium_path() -> str | None:
    if os.environ.get(CHROMIUM_ENV):
        return os.environ[CHROMIUM_ENV] if os.access(os.environ[CHROMIUM_ENV], os.X_OK) else None
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def server_url(checkpoint_dir: Path) -> Iterator[str]:
    """The real server with the tiny checkpoint and an API key, on a free loopback port."""
    from llada.model.tokenizer import Tokenizer
    from llada.model.transformer import LLaDAModel
    from llada.server.app import create_app
    from llada.server.background import serve_in_background
    from llada.server.config import ServerConfig

    config = ServerConfig(model_name="tiny", api_key=API_KEY, max_gen_length=512)
    app = create_app(config, LLaDAModel.from_pretrained(checkpoint_dir), Tokenizer.from_pretrained(checkpoint_dir))
    with serve_in_background(app) as live:
        yield live.url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    path = chromium_path()
    if path is None:
        pytest.skip(f"no Chromium to run the web UI in (looked for {', '.join(CHROMIUM_NAMES)} on PATH, or an "
                    f"executable ${CHROMIUM_ENV}); install it with `apt-get install chromium`")
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        except sync_api.Error as error:
            pytest.skip(f"Chromium at {path} did not start under playwright: {error.message.splitlines()[0]}")
        yield browser
        browser.close()


class Page:
    """A fresh browser page that records console errors and uncaught exceptions."""

    def __init__(self, browser: object, url: str, stored_api_key: str | None) -> None:
        self.context = browser.new_context(viewport={"width": 1200, "height": 820})
        if stored_api_key is not None:
            # What the page keeps after a user typed the key once.
            self.context.add_init_script(f"localStorage.setItem('llada.apiKey', {json.dumps(stored_api_key)})")
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url)
        self.page.wait_for_selector("#app[data-state]")

    def settings(self, **values: object) -> None:
        for field, value in values.items():
            selector = "#" + field.replace("_", "-")
            if self.page.locator(selector).evaluate("element => element.tagName") == "SELECT":
                self.page.select_option(selector, str(value))
            else:
                self.page.fill(selector, str(value))

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.click("#send")
        self.page.wait_for_selector("#app:not([data-state='generating'])")


@pytest.fixture
def open_page(browser: object, server_url: str) -> Iterator:
    pages: list[Page] = []

    def open_(stored_api_key: str | None = API_KEY) -> Page:
        pages.append(Page(browser, server_url, stored_api_key))
        return pages[-1]

    yield open_
    for page in pages:
        page.context.close()


def chat_body(messages: list[dict], **settings: object) -> dict:
    return {"model": "tiny", "messages": messages, **SETTINGS, **settings}


def server_reply(url: str, messages: list[dict], **settings: object) -> dict:
    """The server's non-streaming answer body."""
    response = httpx.post(url + "/v1/chat/completions", json=chat_body(messages, stream=False, **settings),
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    response.raise_for_status()
    return response.json()


def server_answer(url: str, messages: list[dict], **settings: object) -> str:
    return server_reply(url, messages, **settings)["choices"][0]["message"]["content"]


def server_steps(url: str, messages: list[dict], **settings: object) -> list[int]:
    """From the raw denoising stream: the step (1-based) that decided each answer position, 0 if none did."""
    body = chat_body(messages, stream=True, denoising=True, **settings)
    decided_at: dict[int, int] = {}
    steps = length = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as stream:
        stream.raise_for_status()
        for line in stream.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            canvas = json.loads(line[len("data: "):]).get("canvas")
            if canvas is None:
                continue
            steps += 1
            length = len(canvas["tokens"])
            for position, token in enumerate(canvas["tokens"]):
                if token is not None:
                    decided_at.setdefault(position, steps)
    return [decided_at.get(position, 0) for position in range(length)]


def assert_png(path: Path, width: int, height: int) -> None:
    """A real screenshot: a PNG of the viewport's size with many colours (not a blank page)."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    colours = {tuple(pixel) for pixel in pixels.reshape(-1, pixels.shape[-1])[::7].tolist()}
    assert len(colours) > 50, f"the screenshot has only {len(colours)} colours"


def cell_steps(page: Page) -> list[int | None]:
    steps = page.page.locator("#canvas .cell").evaluate_all("cells => cells.map(cell => cell.dataset.step ?? null)")
    return [None if step is None else int(step) for step in steps]


def test_chat_shows_the_canvas_the_replay_and_the_servers_answer(open_page, server_url: str,
                                                                  tmp_path: Path) -> None:
    """The canvas, its step colours and the replay follow the server's stream; the answers are the server's."""
    page = open_page()
    p = page.page
    p.wait_for_selector("#model option[value='tiny']", state="attached")
    page.settings(max_tokens=16, block_length=8, temperature=0, policy="threshold", threshold=0.9)
    page.send(PROMPT)
    assert p.get_attribute("#app", "data-state") == "done", p.text_content("#error")

    conversation = [{"role": "user", "content": PROMPT}]
    decided_at = server_steps(server_url, conversation)
    steps = max(decided_at)
    assert len(decided_at) == 16 and min(decided_at) >= 1  # the server decided every position
    cells = p.locator("#canvas .cell")
    assert cells.count() == 16
    assert p.locator("#canvas .cell.masked").count() == 0
    assert cell_steps(page) == decided_at
    colours = set(cells.evaluate_all("cells => cells.map(cell => getComputedStyle(cell).backgroundColor)"))
    assert len(colours) > 1
    assert p.text_content("#legend-last") == str(steps)

    replay = p.locator("#replay")
    assert replay.get_attribute("max") == str(steps)
    assert replay.input_value() == str(steps)
    replay.fill("1")
    assert cell_steps(page) == [1 if step == 1 else None for step in decided_at]
    assert 0 < p.locator("#canvas .cell.masked").count() < 16
    replay.fill(str(steps))
    assert cell_steps(page) == decided_at

    first_answer = server_answer(server_url, conversation)
    answers = p.locator("#messages .message.assistant .content")
    assert answers.count() == 1
    assert answers.text_content() == first_answer
    # The stream's last chunk (no choices, only usage) gave the answer's token count.
    tokens = server_reply(server_url, conversation)["usage"]["completion_tokens"]
    assert f"{steps} steps · {tokens} tokens ·" in p.text_content("#messages .message.assistant .meta")
    assert p.locator("#messages .message.user .content").text_content() == PROMPT

    screenshot = tmp_path / "web_ui.png"
    p.screenshot(path=str(screenshot))
    assert_png(screenshot, 1200, 820)

    # A follow-up, sampled (seeded): the history goes along, and the text is assembled from many pieces.
    page.settings(temperature=1.0, seed=3)
    page.send(FOLLOW_UP)
    assert p.get_attribute("#app", "data-state") == "done", p.text_content("#error")
    conversation += [{"role": "assistant", "content": first_answer}, {"role": "user", "content": FOLLOW_UP}]
    second_answer = server_answer(server_url, conversation, temperature=1.0, seed=3)
    assert len(set(second_answer)) > 5  # varied text, unlike the tiny model's greedy answer
    assert answers.count() == 2
    assert answers.nth(1).text_content() == second_answer
    assert cell_steps(page) == server_steps(server_url, conversation, temperature=1.0, seed=3)

    # The first answer's recording is still there.
    p.locator("#messages .message.assistant").nth(0).locator(".show-canvas").click()
    assert cell_steps(page) == decided_at
    assert replay.get_attribute("max") == str(steps)

    assert p.locator("#error").is_hidden()
    assert page.errors == []


def test_stop_cancels_the_generation(open_page, server_url: str) -> None:
    """Stop aborts the request: the page keeps the steps it saw and the server stops decoding."""
    page = open_page()
    p = page.page
    p.wait_for_selector("#model option[value='tiny']", state="attached")
    # One token per step over 480 positions: seconds of work on the tiny model, so Stop comes early.
    page.settings(max_tokens=480, block_length=480, policy="fixed", steps=480, temperature=0)
    p.fill("#prompt", PROMPT)
    p.click("#send")
    p.wait_for_selector("#canvas .cell.decided", state="attached")
    p.click("#stop")
    p.wait_for_selector("#app[data-state='stopped']")
    stopped_at = time.monotonic()

    recorded = int(p.get_attribute("#replay", "max"))
    assert 1 <= recorded < 480
    assert p.locator("#messages .message.assistant.stopped").count() == 1
    assert p.text_content("#status") == "Stopped"
    assert p.is_enabled("#send") and p.is_disabled("#stop")
    while (health := httpx.get(server_url + "/health", timeout=10).json())["active_rows"]:
        assert time.monotonic() - stopped_at < 3, f"the server is still decoding after Stop: {health}"
        time.sleep(0.05)
    assert page.errors == []


def test_errors_are_shown(open_page, server_url: str) -> None:
    """A missing API key, then an out-of-range setting: the server's messages appear and nothing is answered."""
    no_key = httpx.get(server_url + "/v1/models", timeout=60).json()["error"]["message"]
    bad_threshold = httpx.post(server_url + "/v1/chat/completions", timeout=60,
                               json=chat_body([{"role": "user", "content": PROMPT}], threshold=1.5),
                               headers={"Authorization": f"Bearer {API_KEY}"}).json()["error"]["message"]

    page = open_page(stored_api_key=None)
    p = page.page
    p.wait_for_selector("#error:not([hidden])")
    assert no_key in p.text_content("#error")
    assert p.get_attribute("#app", "data-state") == "error"

    p.fill("#api-key", API_KEY)
    p.dispatch_event("#api-key", "change")
    p.wait_for_selector("#model option[value='tiny']", state="attached")
    assert p.locator("#error").is_hidden()

    page.settings(max_tokens=16, block_length=8, threshold=1.5)
    page.send(PROMPT)
    assert p.get_attribute("#app", "data-state") == "error"
    assert bad_threshold in p.text_content("#error")
    assert p.locator("#messages .message").count() == 0
    assert p.input_value("#prompt") == PROMPT  # given back, to send again after a fix
    # The only console errors are the browser's own notes of the two refused requests.
    assert len(page.errors) == 2 and "401" in page.errors[0] and "400" in page.errors[1], page.errors
