"""Hub benchmarks: idle footprint, instance start, per-instance memory, passthrough, topic.

.venv/bin/python bench/hub.py            # everything (BENCH_MB=1024 by default)
.venv/bin/python bench/hub.py start      # one part: idle, start, overhead, passthrough, topic
BENCH_MB=256 .venv/bin/python bench/hub.py passthrough
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil

from bench.common import hub, report, summary
from harness.packages import make_package, python_package

MB = 1024 * 1024
TOTAL_MB = int(os.environ.get("BENCH_MB", "1024"))
RUNS = int(os.environ.get("BENCH_RUNS", "5"))

TRIVIAL = "def run(context, input, *args):\n    return 'x'\n"
IDLE = "import asyncio\nasync def run(context, input, *args):\n    await asyncio.sleep(3600)\n"
IDENTITY_BYTES = (
    "provides = {'provides': '', 'contentType': 'application/octet-stream'}\n"
    "async def run(context, input, *args):\n    async for chunk in input:\n        yield chunk\n"
)
#: A Node.js identity: the input stream is returned as the output.
NODE_IDENTITY_PACKAGE = make_package(
    {"index.js": "module.exports = function (input) { return input; };\n"},
    package_json={"name": "bench-node-identity", "version": "1.0.0", "main": "index.js"},
)
IDENTITY_TEXT = "async def run(context, input, *args):\n    async for line in input:\n        yield line\n"


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MB


def bare_python_rss() -> float:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(1.0)
        return rss_mb(process.pid)
    finally:
        process.kill()
        process.wait()


def upload(client: httpx.Client, source: str | bytes) -> str:
    """Upload a Python sequence given as its main.py source, or a ready package (bytes)."""
    package = source if isinstance(source, bytes) else python_package(source)
    response = client.post("/sequence", content=package)
    response.raise_for_status()
    return str(response.json()["id"])


def start(client: httpx.Client, sequence_id: str) -> str:
    response = client.post(f"/sequence/{sequence_id}/start", json={})
    response.raise_for_status()
    return str(response.json()["id"])


# ---------------------------------------------------------------------------------------
def bench_idle() -> None:
    """The hub alone, and the hub joined to a ``cpm`` over wss (the issue's figure), after 30 s."""
    from bench.link import linked  # the manager, a Space and a joined hub, as bench.link sets them up

    seconds = float(os.environ.get("BENCH_IDLE_SECONDS", "30"))
    with hub() as h:
        time.sleep(seconds)
        alone = rss_mb(h.process.pid)
    with linked() as (env, _):
        time.sleep(seconds)
        joined = rss_mb(env.hub.pid)
    baseline = bare_python_rss()
    report(
        "hub idle",
        [
            (
                "hub idle RSS, linked to a cpm (MB)",
                round(joined, 1),
                f"bare python sleep {baseline:.1f} MB",
                "<= 40 MB",
            ),
            ("hub idle RSS, alone (MB)", round(alone, 1), f"bare python sleep {baseline:.1f} MB", "<= 40 MB"),
        ],
    )


def bench_start() -> None:
    with hub() as h, httpx.Client(base_url=h.url, timeout=30) as client:
        sequence_id = upload(client, TRIVIAL)
        start(client, sequence_id)  # warm-up (page cache, imports)
        times = []
        for _ in range(max(RUNS, 10)):
            began = time.perf_counter()
            instance_id = start(client, sequence_id)
            with client.stream("GET", f"/instance/{instance_id}/output") as response:
                next(response.iter_bytes())
            times.append((time.perf_counter() - began) * 1000)
    baseline = []
    for _ in range(10):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append((time.perf_counter() - began) * 1000)
    report(
        "instance start",
        [
            (
                "Python start -> first output (ms)",
                summary(times),
                f"python -c pass {summary(baseline)['median']} ms",
                "p50 <= 60 ms",
            )
        ],
    )


def bench_overhead() -> None:
    count = 20
    with hub() as h, httpx.Client(base_url=h.url, timeout=30) as client:
        sequence_id = upload(client, IDLE)
        hub_before = rss_mb(h.process.pid)
        for _ in range(count):
            start(client, sequence_id)
        time.sleep(2.0)
        # Each instance is its holder (agent/runners/holder.py) and the runner under it.
        holders = psutil.Process(h.process.pid).children()
        runner_rss = [sum(c.memory_info().rss for c in holder.children()) / MB for holder in holders]
        runner_uss = [sum(c.memory_full_info().uss for c in holder.children()) / MB for holder in holders]
        holder_rss = [holder.memory_info().rss / MB for holder in holders]
        holder_uss = [holder.memory_full_info().uss / MB for holder in holders]
        hub_growth = rss_mb(h.process.pid) - hub_before
    per_instance = [r + hub_growth / count for r in runner_rss]
    report(
        "instance overhead",
        [
            (
                f"RSS per idle Python instance, {count} (MB)",
                summary(per_instance),
                f"bare interpreter {bare_python_rss():.1f} MB",
                "<= 15 MB",
            ),
            ("  its runner's private memory, USS (MB)", summary(runner_uss), "", ""),
            ("  its holder's RSS (MB)", summary(holder_rss), "", ""),
            ("  its holder's private memory, USS (MB)", summary(holder_uss), "", ""),
        ],
    )


class _Crc:
    """A running CRC-32 and byte count: a check that costs the client little CPU.

    The client shares the machine's cores with the hub and the instance, so every CPU
    second it spends is one the system under test does not get; SHA-256 of both sides
    cost it about 1.5 s per GB, CRC-32 0.45 s. The byte count is compared as well.
    """

    def __init__(self) -> None:
        self.crc = 0
        self.size = 0

    def update(self, data: bytes) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)

    def hexdigest(self) -> str:
        return f"{self.size}:{self.crc:08x}"


def _pump(
    client: httpx.Client,
    post_path: str,
    get_path: str,
    body: Callable[[], Iterator[bytes]],
    total: int,
    headers: dict[str, str],
) -> tuple[float, str, str]:
    """Write ``body`` to post_path while reading get_path; MB/s and both checks (size:CRC-32)."""
    sent = _Crc()
    got = _Crc()
    ready = threading.Event()

    def reader() -> None:
        with client.stream("GET", get_path, headers=headers) as response:
            ready.set()
            for chunk in response.iter_raw():
                got.update(chunk)
                if got.size >= total:
                    break

    def counted() -> Iterator[bytes]:
        for chunk in body():
            sent.update(chunk)
            yield chunk

    thread = threading.Thread(target=reader)
    began = time.perf_counter()
    thread.start()
    ready.wait(10)
    client.post(post_path, content=counted(), headers=headers, timeout=600)
    thread.join(600)
    elapsed = time.perf_counter() - began
    return total / MB / elapsed, sent.hexdigest(), got.hexdigest()


def _blocks(total: int) -> Callable[[], Iterator[bytes]]:
    block = os.urandom(MB)

    def body() -> Iterator[bytes]:
        for _ in range(total // MB):
            yield block

    return body


def _lines(total: int, width: int) -> Callable[[], Iterator[bytes]]:
    line = b"x" * (width - 1) + b"\n"
    chunk = line * (256 * 1024 // width)

    def body() -> Iterator[bytes]:
        for _ in range(total // len(chunk)):
            yield chunk

    return body


def cat_pipe_mbps(total: int) -> float:
    began = time.perf_counter()
    process = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    block = os.urandom(MB)
    assert process.stdin is not None
    for _ in range(total // MB):
        process.stdin.write(block)
    process.stdin.close()
    process.wait()
    return total / MB / (time.perf_counter() - began)


def bench_passthrough() -> None:
    total = TOTAL_MB * MB
    rows: list[tuple[str, Any, str, str]] = []
    with hub() as h, httpx.Client(base_url=h.url, timeout=60) as client:
        octet = {"content-type": "application/octet-stream"}
        no_instance, _, _ = _pump(client, "/topic/base", "/topic/base", _blocks(total), total, octet)
        cat = cat_pipe_mbps(total)
        baseline = f"cat {cat:.0f}; HTTP no instance {no_instance:.0f}"
        cases: list[tuple[str, str | bytes, Callable[[], Iterator[bytes]], dict[str, str], int, str]] = [
            ("Python bytes (MB/s)", IDENTITY_BYTES, _blocks(total), octet, total, ">= 300"),
            (
                "Python text, 76-byte lines (MB/s)",
                IDENTITY_TEXT,
                _lines(total // 4, 76),
                {"content-type": "text/plain"},
                (total // 4) // (256 * 1024 // 76 * 76) * (256 * 1024 // 76 * 76),
                ">= 20",
            ),
        ]
        if shutil.which("node"):
            cases.append(("Node bytes (MB/s)", NODE_IDENTITY_PACKAGE, _blocks(total), octet, total, ">= 300"))
        for label, source, body, headers, size, target in cases:
            results = []
            for _ in range(max(1, RUNS // 2)):
                instance_id = start(client, upload(client, source))
                speed, sent, got = _pump(
                    client,
                    f"/instance/{instance_id}/input",
                    f"/instance/{instance_id}/output",
                    body,
                    size,
                    headers,
                )
                if sent != got:
                    raise SystemExit(f"{label}: checksum mismatch")
                results.append(speed)
            rows.append((label, summary(results), baseline, target))
    report(f"passthrough ({TOTAL_MB} MB)", rows)


def bench_topic() -> None:
    total = TOTAL_MB * MB
    line = b'{"n":1234567890,"v":"abcdefghijkl"}\n'
    assert len(line) == 36
    chunk = line * (256 * 1024 // 36)

    def body() -> Iterator[bytes]:
        for _ in range(total // len(chunk)):
            yield chunk

    size = total // len(chunk) * len(chunk)
    results = []
    with hub() as h, httpx.Client(base_url=h.url, timeout=60) as client:
        octet = {"content-type": "application/octet-stream"}
        no_instance, _, _ = _pump(client, "/topic/base", "/topic/base", _blocks(total), total, octet)
        for n in range(max(1, RUNS // 2)):
            speed, sent, got = _pump(
                client,
                f"/topic/lines{n}",
                f"/topic/lines{n}",
                body,
                size,
                {"content-type": "application/x-ndjson"},
            )
            if sent != got:
                raise SystemExit("topic: checksum mismatch")
            results.append(speed)
    lines_per_s = summary([r * MB / 36 for r in results])
    report(
        f"topic ({TOTAL_MB} MB of 36-byte NDJSON lines)",
        [
            ("topic API->API (MB/s)", summary(results), f"HTTP no instance {no_instance:.0f} MB/s", ">= 250"),
            ("topic lines/s", lines_per_s, "", ""),
        ],
    )


PARTS = {
    "idle": bench_idle,
    "start": bench_start,
    "overhead": bench_overhead,
    "passthrough": bench_passthrough,
    "topic": bench_topic,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(PARTS):
        PARTS[name]()
