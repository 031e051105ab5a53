"""Make docs/stop.png: the chat page right after Stop, with the partial reply kept.

Run from the repository root, with the project installed (``pip install -e ".[dev]"``)
and Debian's chromium: ``python docs/screenshot.py``. It starts its own
``trio-agent serve --port 0`` on a throwaway database and stops it when done.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

OUT = Path(__file__).resolve().parent / "stop.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TRIO_AGENT_TOKEN"}
        command = [sys.executable, "-m", "adapters.cli", "serve", "--port", "0"]
        server = subprocess.Popen(
            [*command, "--db", f"{tmp}/agent.db"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        try:
            assert server.stdout is not None
            url = re.findall(
                r"http://\S+",
                server.stdout.readline().decode() + "\n" + server.stdout.readline().decode(),
            )[0]
            shoot(url)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
            assert server.stdout is not None
            server.stdout.close()
    print(f"wrote {OUT}")


def shoot(url: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1100, "height": 680})
        expect.set_options(timeout=20_000)
        page.goto(url)
        expect(page.get_by_text("Connected", exact=True)).to_be_visible()
        box = page.get_by_label("Message", exact=True)
        send = page.get_by_role("button", name="Send", exact=True)
        box.fill("Hello! Who are you?\n#sim words=24 rate=60")
        send.click()
        expect(send).to_be_visible()
        box.fill("Tell me a long story about rivers.\n#sim words=400 rate=12")
        send.click()
        reply = page.get_by_role("article", name="Assistant").last
        expect(reply.locator(".text")).to_have_text(re.compile(r"(\S+\s+){30}"))
        page.get_by_role("button", name="Stop", exact=True).click()
        expect(page.get_by_role("status")).to_have_text("Stopped by user.")
        expect(reply.get_by_role("button", name="Retry")).to_be_visible()
        page.screenshot(path=OUT)
        browser.close()


if __name__ == "__main__":
    main()
