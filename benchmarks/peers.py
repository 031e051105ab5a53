"""Peers on the same work: stopping a model stream, against the same simulated provider.

The sim runs in its own process and stamps when each client hung up. Ours runs here (a
Runtime, stopped by ``Runtime.abort``, on each adapter); each peer runs in its own child
process (``peer_driver.py``): kosong, the LLM layer of kimi-cli, in its own virtual
environment, stopped by cancelling its task while it waits on the network and while its
``on_message_part`` callback is busy; a plain asyncio service on httpx stopped by
``task.cancel()``; and the cooperative stop flag of kimi-cli issue #2375, checked between
chunks, against models that stay silent for longer and longer. Every time is measured
the same way: from the stop to the stopped task, and to the provider's record of the close.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Final

import attrs
import httpx
import trio

from adapters.anthropic import open_anthropic
from adapters.openai_compat import open_openai_compat
from runtime import Model, Runtime

from ._report import Plot, Section, Series, Summary, ms, ratio
from ._venv import kosong_venv
from .provider_close import _closed, _poll, sim_process

DRIVER: Final = pathlib.Path(__file__).resolve().parent / "peer_driver.py"
CASES: Final = {  # our case -> the message the run sends
    "silent": "Wait for it.\n#sim think=60",
    "streaming": "Keep going.\n#sim words=100000 rate=200",
}
SETTLE: Final = 0.01  # after the headers, before the stop (as the driver does)
PEER_BOUND: Final = 300.0  # seconds for one peer's trials; longer is a hang


@attrs.frozen
class Row:
    system: str
    case: str
    stop: Summary | None  # None: the peer could not run (``note`` says why)
    closed: int = 0  # trials where the provider saw the client close the connection
    close: Summary | None = None
    ours: Row | None = None  # what the ratios compare with
    note: str = ""

    def cells(self) -> tuple[str, ...]:
        if self.stop is None:
            return (self.system, self.case, "0", "", "", "", "", "", "", self.note)
        stop, close = self.stop, self.close
        base = self.ours or self
        assert base.stop is not None
        return (
            self.system,
            self.case,
            str(stop.trials),
            ms(stop.median),
            ms(stop.p99),
            ratio(stop.median, base.stop.median),
            f"{self.closed}/{stop.trials}",
            ms(close.median) if close else "never",
            ratio(close.median, base.close.median) if close and base.close else "",
            self.note,
        )


async def ours(adapter: str, case: str, url: str, trials: int) -> Row:
    """Our runtime: ``Runtime.abort`` to the run's end, and to the provider's close."""
    opened: AbstractAsyncContextManager[Model]
    if adapter == "anthropic":
        path, opened = "/v1/messages", open_anthropic(model="sim", api_key="bench", base_url=url)
    else:
        path, opened = "/v1/chat/completions", open_openai_compat(model="sim", base_url=url + "/v1")
    stops, closes = [], []
    async with httpx.AsyncClient() as probe, opened as model, Runtime(model=model) as runtime:
        for trial in range(trials):
            await probe.delete(url + "/v1/_sim/connections")
            run = await runtime.start_run(f"peers-{trial}", CASES[case])
            record = await _poll(probe, url, lambda r: r["path"] == path and r["status"] == 200)
            await trio.sleep(SETTLE)
            asked = time.monotonic()
            runtime.abort(run_id=run.run_id)
            await run.wait()
            stops.append((time.monotonic() - asked) * 1000)
            closed = await _poll(probe, url, _closed(record["id"]))
            if closed["closed_by"] != "client":
                raise RuntimeError(f"ours ({adapter}): the provider closed the stream, not us")
            closes.append((closed["closed_at"] - asked) * 1000)
    name = "anthropic (SDK)" if adapter == "anthropic" else "openai-compatible (httpx)"
    return Row(f"ours, {name}", case, Summary.of(stops), trials, Summary.of(closes))


async def peer(
    python: pathlib.Path | str, args: Sequence[str], url: str, trials: int
) -> tuple[Summary, int, Summary | None]:
    """Run the driver for one peer; its stop times, closes seen, and close times."""
    command = [str(python), str(DRIVER), *args, "--url", url, "--trials", str(trials)]
    with trio.fail_after(PEER_BOUND):
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    results = [json.loads(line) for line in done.stdout.decode().splitlines()]
    if len(results) != trials:
        raise RuntimeError(f"{args[0]}: {len(results)} of {trials} trials reported")
    closes = [r["close_ms"] for r in results if r["closed"]]
    return (
        Summary.of([r["stop_ms"] for r in results]),
        len(closes),
        Summary.of(closes) if closes else None,
    )


KOSONG: Final = "kosong (kimi-cli's LLM layer), Anthropic provider, task.cancel()"
KOSONG_CASES: Final = {  # driver case -> (our case it compares with, the row's label)
    "silent": ("silent", "silent"),
    "busy": ("streaming", "streaming, on_message_part busy"),
}
COOPERATIVE: Final = "cooperative stop flag (kimi-cli #2375)"


async def run(quick: bool) -> Section:
    trials = 5 if quick else 50
    silences = (0.1, 0.3) if quick else (0.1, 0.3, 1.0, 3.0, 10.0)
    venv = await kosong_venv()
    async with sim_process() as url:
        mine = {
            (adapter, case): await ours(adapter, case, url, trials)
            for adapter in ("openai", "anthropic")
            for case in CASES
        }
        silent = mine["openai", "silent"]

        async def measure(
            system: str,
            case: str,
            base: Row,
            python: pathlib.Path | str,
            *args: str,
            n: int = trials,
        ) -> Row:
            stop, closed, close = await peer(python, args, url, n)
            return Row(
                system, case, stop, closed, close, base, venv.note if system == KOSONG else ""
            )

        kosong = []
        for case, (base, label) in KOSONG_CASES.items():
            if venv.python is None:
                kosong.append(Row(KOSONG, label, None, note=venv.note))
            else:
                kosong.append(
                    await measure(
                        KOSONG,
                        label,
                        mine["anthropic", base],
                        venv.python,
                        "kosong",
                        "--case",
                        case,
                    )
                )
        plain = await measure(
            "asyncio + httpx, task.cancel()", "silent", silent, sys.executable, "httpx-cancel"
        )
        cooperative = [
            await measure(
                COOPERATIVE,
                f"silent {silence:g} s",
                silent,
                sys.executable,
                "cooperative",
                "--silence",
                f"{silence:g}",
                n=3 if quick else max(3, min(20, int(20 / silence))),
            )
            for silence in silences
        ]
    rows = [*mine.values(), *kosong, plain, *cooperative]
    return Section(
        "Peers: stopping the same stream (ratios against ours)",
        (
            "system",
            "provider when stopped",
            "trials",
            "stop median ms",
            "stop p99 ms",
            "stop ratio",
            "provider saw the close",
            "close median ms",
            "close ratio",
            "versions / note",
        ),
        tuple(row.cells() for row in rows),
        _notes(cooperative, silences),
        Plot(
            "how long the model stays silent (s)",
            "ms from the stop to the stopped task",
            (
                Series(
                    "cooperative stop flag", silences, tuple(_stop(r).median for r in cooperative)
                ),
                Series("ours (Runtime.abort)", silences, (_stop(silent).median,) * len(silences)),
            ),
            log_x=True,
            log_y=True,
        ),
    )


def _stop(row: Row) -> Summary:
    assert row.stop is not None
    return row.stop


def _notes(cooperative: Sequence[Row], silences: Sequence[float]) -> str:
    worst = min(
        (_stop(r).median / _stop(r.ours).median for r in cooperative if r.ours is not None),
        default=0.0,
    )
    met = "met" if worst >= 10 else "MISSED"
    return (
        "Every system stops a request to the same simulated provider (its own process), "
        f"{SETTLE * 1000:g} ms after the response headers: silent (`#sim think=60`), or "
        "streaming 200 words/s. Ours (a Runtime here, stopped by `Runtime.abort`) and each "
        "peer (a child process: kosong in its own Python 3.12 venv, the others on httpx "
        "here) measure from the stop to the stopped task; the provider stamps when the "
        "client closed the connection, on the same monotonic clock. Ratios are the peer's "
        "median over ours on the same work (for kosong, our Anthropic adapter; for the "
        "others, our OpenAI-compatible one): above 1x, ours is faster. kosong's "
        "`on_message_part` callback awaits 50 ms per part (a UI render) and the cancel "
        "lands inside it. The cooperative pattern checks its flag between chunks, so it "
        "stops when the model next speaks: the model is silent for "
        f"{', '.join(f'{s:g}' for s in silences)} s. Target: ours at least 10x faster to "
        f"stop than the cooperative pattern when the model is silent for more than 100 ms; "
        f"now the smallest ratio is {worst:.0f}x, {met}."
    )
