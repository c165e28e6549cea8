"""Console benchmark: the fleet page of a big Space, and many consoles open on its live updates.

.venv/bin/python -m bench.console                         # 5,000 hubs, 20 consoles
BENCH_CONSOLE_HUBS=500 BENCH_CONSOLE_WINDOW=20 .venv/bin/python -m bench.console   # a quick run

A real `cpm serve` (TLS with its own CA unless BENCH_TLS=0) and the simulated hubs of
`bench.link fleet` (worker processes, each hub a real link that joined with its own token, heartbeats
every BENCH_HEARTBEAT s). The benchmark signs in through the console's form like a browser, then:

- **page**: GET /console/fleet, the whole page read, timed at the client (so it includes TLS
  and the transfer over loopback: an upper bound on the server's time); "cold" right after the
  shared fleet snapshot expired (it is rebuilt for that request), "warm" while it is fresh,
  and a filtered page (one tag of fifty);
- **consoles**: `cpm`'s CPU over BENCH_CONSOLE_WINDOW s with no console open (baseline: the
  fleet's own links and heartbeats), then with BENCH_CONSOLES consoles, each its own session,
  reading /console/fleet/events; the window is a minute, so it holds one minute's turn, when
  every row's "last heartbeat" changes and is sent to every console again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import report, summary
from bench.link import (
    HEARTBEAT,
    TLS,
    Manager,
    Worker,
    _stop,
    cpu_seconds,
    manager,
    raise_fd_limit,
    start_workers,
)

HUBS = int(os.environ.get("BENCH_CONSOLE_HUBS", "5000"))
CONSOLES = int(os.environ.get("BENCH_CONSOLES", "20"))
PAGES = int(os.environ.get("BENCH_PAGES", "10"))
WINDOW = float(os.environ.get("BENCH_CONSOLE_WINDOW", "60"))
TAGS = 50
SPACE = "fleet"


def sign_in(client: httpx.Client, token: str) -> None:
    form = client.get("/console/login")
    found = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert found is not None, form.text[:500]
    answer = client.post(
        "/console/login", data={"csrf": found.group(1), "token": token, "next": "/console/fleet"}
    )
    assert answer.status_code == 303, answer.text[:500]


def timed_page(client: httpx.Client, path: str) -> tuple[float, int, int]:
    """(ms, bytes, rows) of one page read whole."""
    began = time.perf_counter()
    page = client.get(path)
    elapsed = (time.perf_counter() - began) * 1000
    assert page.status_code == 200, page.text[:500]
    return elapsed, len(page.content), page.text.count('<tr id="hub-')


@dataclass
class ConsoleReader:
    """One console on the live updates: counts what it is sent."""

    client: httpx.Client
    events: int = 0
    rows: int = 0
    bytes: int = 0
    first_rows: int = 0
    first_ms: float = 0.0
    error: str = ""

    def run(self, stop: threading.Event) -> None:
        began = time.perf_counter()
        try:
            with self.client.stream("GET", "/console/fleet/events", timeout=None) as events:
                data: list[str] = []
                for line in events.iter_lines():
                    self.bytes += len(line) + 1
                    if line.startswith("data: "):
                        data.append(line[6:])
                    elif line == "" and data:
                        update = json.loads("".join(data))
                        data = []
                        self.events += 1
                        self.rows += len(update["rows"])
                        if self.events == 1:
                            self.first_rows = len(update["rows"])
                            self.first_ms = (time.perf_counter() - began) * 1000
                    if stop.is_set():
                        return
        except httpx.HTTPError as exc:
            if not stop.is_set():
                self.error = repr(exc)


def cpm_cpu(mgr: Manager, seconds: float) -> float:
    """``cpm``'s CPU over ``seconds``, % of one core."""
    c0, t0 = cpu_seconds(mgr.daemon.pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(mgr.daemon.pid) - c0) / (time.monotonic() - t0)


def main() -> None:
    from cpm.registry import Registry

    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="spacehub-bench-console-") as tmp:
        root = Path(tmp)
        data = root / "cpm"
        data.mkdir()
        with Registry(data / "registry.sqlite3") as registry:
            registry.create_space(SPACE)
            api_token = registry.create_api_token(SPACE)
            tokens = [
                registry.issue_join_token(SPACE, 86400, f"sim {n}", ["edge", f"line{n % TAGS}"]).token
                for n in range(HUBS)
            ]
        args = ("--heartbeat-interval", f"{HEARTBEAT:g}", "--ping-interval", f"{HEARTBEAT:g}")
        with manager(root, *args) as mgr:
            workers = start_workers(root, mgr, SPACE, tokens)
            try:
                rows = measure(mgr, workers, api_token)
            finally:
                _stop(mgr.daemon.process)
                for worker in workers:
                    worker.process.kill()
                    worker.process.wait()
    report(
        f"console ({HUBS} simulated hubs, heartbeat {HEARTBEAT:g} s, {'TLS' if TLS else 'plain'})",
        rows,
    )


def measure(mgr: Manager, workers: list[Worker], api_token: str) -> list[tuple[str, Any, str, str]]:
    def connected() -> int:
        return sum(int(w.last.get("connected", 0)) for w in workers)

    began = time.monotonic()
    deadline = began + 120 + HUBS / 10
    while connected() < HUBS and time.monotonic() < deadline:
        if any(w.process.poll() is not None for w in workers):
            raise SystemExit(f"a fleet worker died; cpm log:\n{mgr.daemon.tail()}")
        time.sleep(0.5)
    ramp = time.monotonic() - began
    if connected() < HUBS:
        raise SystemExit(f"only {connected()} of {HUBS} hubs connected after {ramp:.0f} s")
    time.sleep(HEARTBEAT + 2)  # every hub has sent a heartbeat with its load

    verify = mgr.verify()
    with httpx.Client(base_url=mgr.base, verify=verify, timeout=60) as browser:
        sign_in(browser, api_token)
        # The first view after start makes every row (no earlier snapshot to take rows from).
        first_view = timed_page(browser, "/console/fleet")[0]
        cold, warm, filtered = [], [], []
        size = shown = tagged = 0
        for _ in range(PAGES):
            time.sleep(2.1)  # the shared snapshot (2 s) has expired: this page rebuilds it
            ms, size, shown = timed_page(browser, "/console/fleet")
            cold.append(ms)
            warm.append(timed_page(browser, "/console/fleet")[0])
            ms, _, tagged = timed_page(browser, "/console/fleet?tag=line7&state=healthy")
            filtered.append(ms)

    idle = [cpm_cpu(mgr, WINDOW / 3) for _ in range(3)]

    clients = [httpx.Client(base_url=mgr.base, verify=verify, timeout=60) for _ in range(CONSOLES)]
    stop = threading.Event()
    readers = [ConsoleReader(client) for client in clients]
    try:
        for client in clients:
            sign_in(client, api_token)
        threads = [threading.Thread(target=reader.run, args=(stop,), daemon=True) for reader in readers]
        for thread in threads:
            thread.start()
        wait_first = time.monotonic() + 60
        while any(r.events == 0 for r in readers) and time.monotonic() < wait_first:
            time.sleep(0.2)
        busy = [cpm_cpu(mgr, WINDOW / 3) for _ in range(3)]
    finally:
        stop.set()
        for client in clients:
            client.close()
    errors = [r.error for r in readers if r.error]
    if errors:
        print(f"console errors: {errors[:3]}", file=sys.stderr)
    first_ms = [r.first_ms for r in readers]
    per_console_kb = statistics.median(r.bytes for r in readers) / 1024
    rows_sent = statistics.median(r.rows for r in readers)
    return [
        (
            f"fleet page, {HUBS} hubs, snapshot rebuilt (ms)",
            summary(cold),
            f"{size // 1024} KB, {shown} rows",
            "<= 300",
        ),
        (f"fleet page, {HUBS} hubs, snapshot fresh (ms)", summary(warm), "same page", "<= 300"),
        (f"fleet page, {HUBS} hubs, first view after start (ms)", round(first_view, 1), "every row made", ""),
        ("fleet page, tag + state filter (ms)", summary(filtered), f"{tagged} rows", "<= 300"),
        ("cpm CPU, no console (% of one core)", summary(idle), f"{WINDOW:g} s in 3 parts", ""),
        (f"cpm CPU, {CONSOLES} consoles live (% of one core)", summary(busy), f"{WINDOW:g} s in 3 parts", ""),
        (
            "added CPU per console (% of one core)",
            round((statistics.median(busy) - statistics.median(idle)) / CONSOLES, 2),
            "median busy - idle",
            "",
        ),
        (f"first event, all {HUBS} rows (ms)", summary(first_ms), f"{CONSOLES} at once", ""),
        (
            "sent per console in the window",
            f"{per_console_kb:.0f} KB, {rows_sent:.0f} rows",
            f"errors {len(errors)}; ramp {ramp:.0f} s",
            "",
        ),
    ]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
