"""The chat page in a real headless Chromium, against a real ``trio-agent serve`` child.

Playwright's sync API drives Debian's chromium (``.ci/run`` installs it). Plain test
functions, not trio ones: Playwright runs its own event loop. One gateway serves the
module (each test has its own session); the restart and token tests start their own.
A failing test leaves a screenshot in ``test-artifacts/``. Bounds are generous and never
tight: a stop "quickly" means well before the model's 30 s of silence would end.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from adapters.chat_client import DEFAULT_SESSION
from tests.gateway_client import open_client
from tests.helpers import MCP_SERVER
from tests.openclaw_schema import payload_errors

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BOUND = 20.0  # seconds for any one thing the page should do
SILENT = "Think hard.\n#sim think=30"  # silent far longer than BOUND: a stop must cut it

expect.set_options(timeout=BOUND * 1000)


class Served:
    """``trio-agent serve`` as a child process; its first line names its port."""

    def __init__(self, tmp: Path, *extra: str, port: int = 0) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRIO_AGENT_TOKEN"}
        env["XDG_DATA_HOME"] = str(tmp / "data")
        command = [sys.executable, "-m", "adapters.cli", "serve", "--port", str(port)]
        self.log = (tmp / f"serve-{port}.log").open("wb")
        self.process = subprocess.Popen(
            [*command, "--db", str(tmp / "agent.db"), *extra],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], BOUND)
        banner = self.process.stdout.readline().decode() if ready else ""
        found = re.search(r"ws://127\.0\.0\.1:(\d+)", banner)
        if found is None:
            self.stop()
            raise AssertionError(f"trio-agent serve did not start: {banner!r}")
        self.port = int(found.group(1))
        self.url = f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=BOUND)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = Served(tmp_path_factory.mktemp("web"))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:  # this test's call failed
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"{request.node.name}.png", full_page=True)
    context.close()


def open_session(page: Page, url: str, session: str) -> None:
    page.goto(f"{url}#session={session}")
    expect(page.get_by_text("Connected", exact=True)).to_be_visible()


def send(page: Page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_role("button", name="Send", exact=True).click()


def transcript(page: Page) -> Locator:
    return page.get_by_role("region", name="Transcript")


def replies(page: Page) -> Locator:
    return transcript(page).get_by_role("article", name="Assistant")


def prompts(page: Page) -> Locator:
    return transcript(page).get_by_role("article", name="You")


def reply_text(reply: Locator) -> str:
    return reply.locator(".text").inner_text() if reply.locator(".text").count() else ""


def wait_for_words(reply: Locator, count: int) -> str:
    """The reply's text once it has at least ``count`` words."""
    expect(reply.locator(".text")).to_have_text(re.compile(rf"(\S+\s+){{{count}}}"))
    return reply_text(reply)


def record_statuses(page: Page) -> None:
    """From now on, collect every text the status element shows, however briefly."""
    page.evaluate(
        """() => {
        const status = document.querySelector('[role=status]');
        window.statuses = [];
        new MutationObserver(() => window.statuses.push(status.textContent))
            .observe(status, {childList: true, characterData: true, subtree: true});
    }"""
    )


# -- the HTTP side of the gateway's port -------------------------------------------------


def test_the_page_is_served_with_strict_headers_beside_the_gateway(server: Served) -> None:
    def fetch(method: str, path: str, **headers: str) -> tuple[http.client.HTTPResponse, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=BOUND)
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        return response, body

    index, body = fetch("GET", "/")
    assert index.status == 200 and b'<script src="/app.js"' in body
    assert index.getheader("Content-Type") == "text/html; charset=utf-8"
    assert index.getheader("Cache-Control") == "no-store"
    assert index.getheader("X-Content-Type-Options") == "nosniff"
    assert "default-src 'none'" in index.getheader("Content-Security-Policy", "")
    script, body = fetch("HEAD", "/app.js")
    assert script.status == 200 and body == b""
    assert script.getheader("Content-Type") == "text/javascript; charset=utf-8"
    assert int(script.getheader("Content-Length", "0")) > 1000
    assert fetch("GET", "/style.css?v=1")[0].status == 200
    assert fetch("GET", "/../pyproject.toml")[0].status == 404
    assert fetch("POST", "/")[0].getheader("Allow") == "GET, HEAD"
    # Without a token, another site's page may not open the gateway's WebSocket.
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    assert fetch("GET", "/", Origin="http://evil.example", **upgrade)[0].status == 403
    assert fetch("GET", "/", Origin=server.url.rstrip("/"), **upgrade)[0].status == 101


async def test_sessions_list_names_the_stored_sessions(server: Served) -> None:
    with trio.fail_after(BOUND):
        async with open_client(server.port) as client:
            configure = {"sessionKey": "web-listed", "stopPolicy": "rollback"}
            await client.ok("runtime.sessions.configure", configure)
            listed = await client.ok("sessions.list", {"limit": 1000, "includeGlobal": True})
            rows = listed["sessions"]
            assert rows[0] == {"key": "web-listed", "sessionId": "web-listed", "kind": "direct"}
            assert listed["count"] == len(rows)
            assert [error for row in rows for error in payload_errors("SessionRow", row)] == []
            refused = await client.call("sessions.list", {"limit": 0})
            assert refused["error"]["code"] == "INVALID_REQUEST"


async def test_hello_names_the_main_session_the_page_and_the_cli_open(server: Served) -> None:
    with trio.fail_after(BOUND):
        async with open_client(server.port) as client:
            assert client.hello is not None
            assert client.hello["snapshot"]["sessionDefaults"] == {
                "defaultAgentId": "main",
                "mainKey": "main",
                "mainSessionKey": DEFAULT_SESSION,
            }


# -- chatting ------------------------------------------------------------------------------


def test_a_reply_streams_in_then_send_comes_back(server: Served, page: Page) -> None:
    open_session(page, server.url, "web-stream")
    send(page, "Tell me.\n#sim words=40 rate=15")
    stop = page.get_by_role("button", name="Stop", exact=True)
    expect(stop).to_be_visible()
    early = wait_for_words(replies(page).last, 3)
    expect(stop).to_be_visible()  # the text arrived while the run was live
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    final = reply_text(replies(page).last)
    assert final.startswith(early.strip()) and len(final.split()) == 40
    expect(prompts(page)).to_have_count(1)
    expect(page.get_by_role("status")).to_have_text("")


def test_stop_while_the_model_is_silent(server: Served, page: Page) -> None:
    open_session(page, server.url, "web-silent")
    send(page, SILENT)
    expect(replies(page).last).to_contain_text("Thinking…")
    record_statuses(page)
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Stopped by user.")
    assert page.evaluate("window.statuses")[0] == "Stopping…"
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    expect(transcript(page).get_by_text("Thinking…")).to_have_count(0)


def test_a_tool_call_shows_running_then_stop_marks_it_cancelled(page: Page, tmp_path: Path) -> None:
    """With an MCP server attached (``--mcp``): the call's status and progress while it
    runs; Stop cancels it at the server and says so; the next turn runs a tool to its end."""
    log = tmp_path / "mcp.log"
    server_command = f"{sys.executable} {MCP_SERVER} --log {log}"
    served = Served(tmp_path, "--mcp", f"tests={server_command}")
    try:
        open_session(page, served.url, "web-tools")
        expect(page.get_by_text("Tools: slow, echo, hang, crash", exact=True)).to_be_visible()
        send(page, 'Research.\n#sim tool=slow rate=500 args={"seconds": 60, "text": "x"}')
        tool = transcript(page).locator("li.tool").first
        expect(tool).to_have_text(re.compile(r"Tool slow: running… \d+%, step \d+ of 600"))
        expect(tool).to_have_attribute("data-status", "running")
        page.get_by_role("button", name="Stop", exact=True).click()
        expect(page.get_by_role("status")).to_have_text(
            "Stopped by user. Cancelled: slow (its server was told)."
        )
        expect(tool).to_have_attribute("data-status", "cancelled")
        expect(tool).to_have_text(
            "Tool slow: cancelled (stopped while running); its server was told to stop"
        )
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        assert [(e["event"], e.get("reason")) for e in entries if "cancel" in e["event"]] != []
        assert ("cancel-notification", "rpc") in [(e["event"], e.get("reason")) for e in entries]
        # the history is valid for the next turn
        send(page, 'Again.\n#sim tool=echo rate=500 args={"text": "fine"}')
        expect(transcript(page).locator("li.tool")).to_have_count(2)
        expect(transcript(page).locator("li.tool").nth(1)).to_have_text("Tool echo: done")
        expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
        expect(replies(page).last.locator(".text")).not_to_be_empty()
        expect(transcript(page).locator("li.tool").first).to_have_attribute(
            "data-status", "cancelled"
        )
    finally:
        served.stop()


def test_a_kept_partial_survives_a_reload_and_retry_sends_the_prompt_again(
    server: Served, page: Page
) -> None:
    prompt = "Go on.\n#sim words=400 rate=40"
    open_session(page, server.url, "web-partial")
    send(page, prompt)
    wait_for_words(replies(page).last, 5)
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Stopped by user.")
    partial = reply_text(replies(page).last)
    assert 5 <= len(partial.split()) < 400

    page.reload()
    expect(page.get_by_text("Connected", exact=True)).to_be_visible()
    reply = replies(page).last
    expect(reply.locator(".text")).to_have_text(partial)
    expect(reply).to_contain_text("Stopped by user.")

    reply.get_by_role("button", name="Retry").click()
    expect(prompts(page)).to_have_count(2)
    expect(prompts(page).last).to_have_text(re.compile(re.escape(prompt)))
    wait_for_words(replies(page).last, 3)  # the same prompt, a new reply
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Stopped by user.")


def test_roll_back_puts_the_prompt_back_in_the_box(server: Served, page: Page) -> None:
    open_session(page, server.url, "web-rollback")
    send(page, "Earlier.\n#sim words=3 rate=100")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    on_stop = page.get_by_label("On stop")
    on_stop.select_option(label="Roll back")
    page.reload()  # the policy lives on the server
    expect(page.get_by_text("Connected", exact=True)).to_be_visible()
    expect(on_stop).to_have_value("rollback")

    send(page, SILENT)
    expect(prompts(page)).to_have_count(2)
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text("Stopped by user.")
    box = page.get_by_label("Message", exact=True)
    expect(box).to_have_value(SILENT)
    expect(box).to_be_focused()
    assert page.evaluate("document.activeElement.selectionStart") == len(SILENT)
    expect(prompts(page)).to_have_count(1)
    expect(prompts(page)).to_have_text(re.compile("Earlier"))
    page.reload()
    expect(page.get_by_text("Connected", exact=True)).to_be_visible()
    expect(replies(page)).to_have_count(1)
    expect(prompts(page)).to_have_count(1)


def test_sending_while_busy_follows_the_sessions_policy(server: Served, page: Page) -> None:
    open_session(page, server.url, "web-busy")
    page.get_by_label("If busy").select_option(label="Refuse")
    send(page, SILENT)
    box = page.get_by_label("Message", exact=True)
    expect(page.get_by_role("button", name="Stop", exact=True)).to_be_visible()
    box.fill("And another thing.")
    box.press("Enter")
    expect(page.get_by_role("status")).to_contain_text("Not sent:")
    expect(page.get_by_role("status")).to_contain_text("rejects new messages")
    expect(box).to_have_value("And another thing.")

    page.get_by_label("If busy").select_option(label="Queue")
    box.press("Enter")
    expect(page.get_by_role("status")).to_have_text(
        "Queued: your message runs when the current reply ends."
    )
    expect(replies(page).last).to_contain_text("Queued…")
    page.get_by_role("button", name="Stop", exact=True).click()  # stops both
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()


def test_an_error_is_shown_in_words(server: Served, page: Page) -> None:
    open_session(page, server.url, "web-error")
    send(page, "Hello.\n#sim fail=429 retry_after=0.1")
    expect(page.get_by_role("status")).to_contain_text("The reply failed:")
    expect(page.get_by_role("status")).to_contain_text(re.compile("rate", re.IGNORECASE))
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    expect(transcript(page).get_by_text("Thinking…")).to_have_count(0)


def test_sessions_can_be_created_and_switched(server: Served, page: Page) -> None:
    open_session(page, server.url, "web-first")
    send(page, "First.\n#sim words=2 rate=100")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    page.get_by_role("button", name="New session").click()
    sessions = page.get_by_role("navigation", name="Sessions")
    current = sessions.locator("[aria-current=true]")
    expect(current).not_to_have_text("web-first")
    expect(prompts(page)).to_have_count(0)
    send(page, "Second.\n#sim words=2 rate=100")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    sessions.get_by_role("button", name="web-first").click()
    expect(prompts(page)).to_have_text([re.compile("First")])
    expect(sessions.get_by_role("button", name=re.compile("^web:"))).to_have_count(1)


def test_stop_is_hidden_for_a_run_that_does_not_allow_cancel(server: Served, page: Page) -> None:
    open_session(page, server.url, "web-keep")

    async def start() -> None:  # another client starts it: the page only follows it
        with trio.fail_after(BOUND):
            async with open_client(server.port) as client:
                params = {
                    "sessionKey": "web-keep",
                    "message": "Go on.\n#sim words=80 rate=10",
                    "idempotencyKey": "web-keep-1",
                    "allowCancel": False,
                }
                await client.ok("runtime.chat.send", params)

    trio.run(start)
    stop = page.get_by_role("button", name="Stop", exact=True)
    wait_for_words(replies(page).last, 3)
    expect(replies(page).last).to_contain_text("This reply cannot be stopped.")
    expect(stop).to_have_count(0)
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    page.reload()  # learnt again from chat.history's liveRuns
    expect(page.get_by_text("Connected", exact=True)).to_be_visible()
    seen = len(wait_for_words(replies(page).last, 5).split())
    wait_for_words(replies(page).last, seen + 3)  # still live
    expect(replies(page).last).to_contain_text("This reply cannot be stopped.")
    expect(stop).to_have_count(0)
    # it runs to its end, and the kept reply carries no such note
    expect(transcript(page).get_by_text("This reply cannot be stopped.")).to_have_count(0)
    assert len(reply_text(replies(page).last).split()) == 80


# -- following a run across reloads and restarts ------------------------------------------


def test_a_reload_mid_run_keeps_following_the_run(server: Served, page: Page) -> None:
    open_session(page, server.url, "web-reload")
    send(page, "Go.\n#sim words=400 rate=40")
    wait_for_words(replies(page).last, 5)
    page.reload()
    expect(page.get_by_text("Connected", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Stop", exact=True)).to_be_visible()
    seen = len(wait_for_words(replies(page).last, 5).split())
    wait_for_words(replies(page).last, seen + 10)  # still growing: the page follows the run
    expect(prompts(page)).to_have_count(1)
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Stopped by user.")


def incremental_deltas_only(page: Page) -> None:
    """From the next load on, the page gets chat deltas without their ``message``
    snapshot, as from a gateway that sends only ``deltaText``: it must rebuild the text
    by the resume rule alone (a base from inFlightRun, then the deltas after its seq)."""
    page.add_init_script(
        """(() => {
        const Native = window.WebSocket;
        window.WebSocket = class extends Native {
            set onmessage(handler) {
                super.onmessage = (event) => {
                    const frame = JSON.parse(event.data);
                    if (frame.event === "chat" && frame.payload.state === "delta") {
                        delete frame.payload.message;
                        return handler({ data: JSON.stringify(frame) });
                    }
                    return handler(event);
                };
            }
        };
    })()"""
    )


def watch_run_text_at_its_end(page: Page) -> None:
    """From now on, record in ``window.atEnd`` the text the page built for a run from its
    events when the run's terminal event arrives, before the page reads history again."""
    page.evaluate(
        """() => {
        window.atEnd = {};
        const original = window.onChat;
        window.onChat = (payload) => {
            const run = state.runs.get(payload.runId);
            if (payload.state !== "delta" && run) window.atEnd[payload.runId] = run.text;
            original(payload);
        };
    }"""
    )


async def stored_replies(port: int, session: str) -> list[str]:
    """The session's stored replies, once no run of it is in flight."""
    with trio.fail_after(BOUND):
        async with open_client(port) as client:
            while True:  # polled: nothing signals a run's end to another connection
                read = await client.ok("chat.history", {"sessionKey": session})
                if not read.get("inFlightRun"):
                    break
                await trio.sleep(0.05)
    return [
        "".join(b["text"] for b in m["content"] if b["type"] == "text")
        for m in read["messages"]
        if m["role"] == "assistant"
    ]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_reload_at_a_random_moment_rebuilds_exactly_the_stored_reply(
    server: Served, page: Page, seed: int
) -> None:
    """The page follows the resume rule (inFlightRun's text and seq, then only later
    deltas): what it built from events by the reply's end is the stored reply, whole."""
    draw = random.Random(seed)
    session = f"web-resume-{seed}"
    incremental_deltas_only(page)
    open_session(page, server.url, session)
    send(page, "Go.\n#sim words=150 rate=150")
    wait_for_words(replies(page).last, draw.randrange(1, 100))
    page.reload()
    expect(page.get_by_text("Connected", exact=True)).to_be_visible()
    watch_run_text_at_its_end(page)
    # the run's end, read from the gateway: the button says Send at once after a reload,
    # before the page has read that a run is in flight (CI once read the history then)
    stored = trio.run(stored_replies, server.port, session)
    assert len(stored) == 1 and len(stored[0].split()) == 150
    expect(replies(page).last.locator(".text")).to_have_text(stored[0].strip())
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    at_end = page.evaluate("window.atEnd")
    if at_end:  # absent only if the reply ended before the page had read the history
        assert list(at_end.values()) == stored
    assert reply_text(replies(page).last) == stored[0].strip()


def test_stop_after_a_reload_keeps_exactly_the_partial_shown(server: Served, page: Page) -> None:
    session = "web-resume-stop"
    incremental_deltas_only(page)
    open_session(page, server.url, session)
    send(page, "Go.\n#sim words=400 rate=40")
    wait_for_words(replies(page).last, 7)
    page.reload()
    expect(page.get_by_text("Connected", exact=True)).to_be_visible()
    watch_run_text_at_its_end(page)
    seen = len(wait_for_words(replies(page).last, 3).split())
    wait_for_words(replies(page).last, seen + 3)  # following it after the reload
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Stopped by user.")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    shown = list(page.evaluate("window.atEnd").values())
    stored = trio.run(stored_replies, server.port, session)
    assert len(stored) == 1 and shown == stored  # the partial the page showed is the one kept
    assert 10 <= len(stored[0].split()) < 400


def test_the_page_follows_only_its_session_and_builds_replies_from_new_text(
    server: Served, page: Page
) -> None:
    frames: list[dict] = []
    page.on(
        "websocket",
        lambda ws: ws.on("framereceived", lambda payload: frames.append(json.loads(payload))),
    )
    open_session(page, server.url, "web-mine")
    other = page.context.new_page()
    open_session(other, server.url, "web-other")
    send(other, "Elsewhere.\n#sim words=300 rate=100")
    send(page, "Mine.\n#sim words=300 rate=100")
    mid = wait_for_words(replies(page).last, 60)
    wait_for_words(replies(other).last, 60)
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible(timeout=30_000)
    final = reply_text(replies(page).last)
    assert len(final.split()) == 300 and final.startswith(mid.strip())
    events = [f["payload"] for f in frames if f.get("event") in ("chat", "agent")]
    keys = {p.get("sessionKey", p.get("data", {}).get("sessionKey")) for p in events}
    assert keys == {"web-mine"}  # nothing of web-other reached this page's connection
    chat = [p for p in events if "state" in p and p["state"] == "delta"]
    assert len(chat) > 100 and all("message" not in p for p in chat[1:])
    other.close()


def test_the_page_reconnects_after_a_gateway_restart(tmp_path: Path, page: Page) -> None:
    first = Served(tmp_path)
    try:
        open_session(page, first.url, "web-restart")
    finally:
        first.stop()
    expect(page.get_by_text("Disconnected; reconnecting…")).to_be_visible()
    second = Served(tmp_path, port=first.port)
    try:
        expect(page.get_by_text("Connected", exact=True)).to_be_visible()
        send(page, "Back?\n#sim words=4 rate=100")
        expect(replies(page)).to_have_count(1)
        expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
        assert len(reply_text(replies(page).last).split()) == 4
    finally:
        second.stop()


def test_with_a_token_the_page_asks_for_it(tmp_path: Path, page: Page) -> None:
    served = Served(tmp_path, "--token", "s3cret")
    try:
        page.goto(served.url)
        expect(page.get_by_role("status")).to_have_text("Enter the gateway's token to connect.")
        page.get_by_label("Token").fill("wrong")
        page.get_by_role("button", name="Connect").click()
        expect(page.get_by_role("status")).to_have_text("That token is wrong; try again.")
        page.get_by_label("Token").fill("s3cret")
        page.get_by_role("button", name="Connect").click()
        expect(page.get_by_text("Connected", exact=True)).to_be_visible()
        assert "s3cret" not in page.url
    finally:
        served.stop()


def test_a_named_token_chats_inside_its_own_namespace(tmp_path: Path, page: Page) -> None:
    tokens = {"alice": "tok-alice-5e1d", "bob": "tok-bob-9c2a"}
    token_file = tmp_path / "tokens"
    token_file.write_text("".join(f"{name} {token}\n" for name, token in tokens.items()))
    served = Served(tmp_path, "--token-file", str(token_file))

    async def bob_keeps_a_session() -> None:
        with trio.fail_after(BOUND):
            async with open_client(served.port, token=tokens["bob"]) as bob:
                assert bob.hello is not None
                main = bob.hello["snapshot"]["sessionDefaults"]["mainSessionKey"]
                assert main == "bob:agent:main:main"
                configure = {"sessionKey": main, "stopPolicy": "rollback"}
                await bob.ok("runtime.sessions.configure", configure)

    try:
        trio.run(bob_keeps_a_session)
        page.goto(served.url)
        page.get_by_label("Token").fill(tokens["alice"])
        page.get_by_role("button", name="Connect").click()
        expect(page.get_by_text("Connected", exact=True)).to_be_visible()
        title = page.locator("#session-title")
        expect(title).to_have_text("alice:agent:main:main")  # hello-ok's main session

        send(page, "Go on.\n#sim words=400 rate=40")
        wait_for_words(replies(page).last, 3)  # the run id was alice's too
        page.get_by_role("button", name="Stop", exact=True).click()
        expect(page.get_by_role("status")).to_have_text("Stopped by user.")

        page.get_by_role("button", name="New session").click()
        expect(title).to_have_text(re.compile(r"^alice:web:"))
        send(page, "Again.\n#sim words=4 rate=100")
        expect(replies(page)).to_have_count(1)
        expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
        assert len(reply_text(replies(page).last).split()) == 4
        expect(page.get_by_role("status")).to_have_text("")
        # both of alice's sessions are listed; bob's, stored first, is not
        sessions = page.get_by_role("navigation", name="Sessions").get_by_role("button")
        expect(sessions).to_have_text([re.compile(r"^alice:web:"), "alice:agent:main:main"])
    finally:
        served.stop()
