"""Space-wide topics: cross-hub throughput, records/s, manager CPU per GB, spool drain.

.venv/bin/python -m bench.spacetopics
BENCH_MB=256 BENCH_RUNS=2 BENCH_DRAIN_MB=256 .venv/bin/python -m bench.spacetopics   # a quick run

A real `cpm serve` (TLS with its own CA unless BENCH_TLS=0) and two real hubs A and B joined to
Space demo; A's link goes through a TCP forwarder the benchmark can cut (harness/tcpproxy.py).
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import trio

from bench.common import report, summary
from bench.link import (
    MB,
    OCTET,
    RUNS,
    TOTAL_MB,
    Manager,
    cpm_cli,
    cpu_seconds,
    linked_hub,
    manager,
    pump,
)
from harness.packages import python_package
from harness.tcpproxy import TcpForwarder

#: MB put in hub A's spool while its link is cut, then drained
DRAIN_MB = int(os.environ.get("BENCH_DRAIN_MB", "1024"))
SPACE = "demo"
LINE = b'{"n":1234567890,"v":"abcdefghijkl"}\n'


def producer(topic: str) -> str:
    return (
        f"provides = {{'provides': '{topic}', 'contentType': 'application/octet-stream'}}\n"
        "async def run(context, input, *args):\n    async for chunk in input:\n        yield chunk\n"
    )


def consumer(topic: str) -> str:
    return (
        f"requires = {{'requires': '{topic}', 'contentType': 'application/octet-stream'}}\n"
        "async def run(context, input, *args):\n    async for chunk in input:\n        yield chunk\n"
    )


class Forwarder:
    """harness.tcpproxy.TcpForwarder in a thread of its own (the benchmark is synchronous)."""

    def __init__(self, port: int) -> None:
        self._forwarder = TcpForwarder("127.0.0.1", port)
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the forwarder did not start")

    @property
    def port(self) -> int:
        return self._forwarder.port

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._forwarder.run)
            self._ready.set()

    def cut(self) -> None:
        """Cut the link now, until :meth:`restore`."""
        trio.from_thread.run_sync(self._forwarder.hold, trio_token=self._token)

    def restore(self) -> None:
        trio.from_thread.run_sync(self._forwarder.release, trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._nursery is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
        self._thread.join(10)


class Space:
    """A manager and hubs A (through a forwarder) and B, joined to Space demo."""

    def __init__(self, mgr: Manager, token: str, a: str, b: str, a_url: str, b_url: str) -> None:
        self.mgr, self.token = mgr, token
        self.a_id, self.b_id = a, b
        self.a_url, self.b_url = a_url, b_url

    def client(self) -> httpx.Client:
        return httpx.Client(
            verify=self.mgr.verify(), headers={"Authorization": f"Bearer {self.token}"}, timeout=60
        )

    @property
    def space(self) -> str:
        return self.mgr.space_url(SPACE)


def _linked_ids(mgr: Manager, token: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(verify=mgr.verify(), headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:
        while time.monotonic() < deadline:
            listed = c.get(f"{mgr.space_url(SPACE)}/list").json()
            if sum(1 for r in listed if r["isConnectionActive"] and r["healthy"]) >= count:
                return
            time.sleep(0.2)
    raise SystemExit("the hubs did not link")


def hub_id(url: str) -> str:
    return str(httpx.get(f"{url}/status", timeout=10).json()["cpm"]["hubId"])


@contextlib.contextmanager
def space() -> Iterator[tuple[Space, Forwarder]]:
    with tempfile.TemporaryDirectory(prefix="spacehub-bench-topics-") as tmp:
        root = Path(tmp)
        data = root / "cpm"
        data.mkdir()
        cpm_cli(data, "space", "create", SPACE)
        token = cpm_cli(data, "token", "create", "--space", SPACE)
        joins = [cpm_cli(data, "join-token", "create", "--space", SPACE) for _ in range(2)]
        with manager(root, "--heartbeat-interval", "10", "--topic-log-bytes", "4G") as mgr:
            forwarder = Forwarder(mgr.port)
            spool = (
                "--topic-spool-bytes",
                "4G",
                "--topic-spool-total-bytes",
                "4G",
                "--link-backoff-cap",
                "1",
            )
            try:
                with (
                    linked_hub(root / "a", mgr, joins[0], *spool, link_port=forwarder.port) as a,
                    linked_hub(root / "b", mgr, joins[1]) as b,
                ):
                    _linked_ids(mgr, token, 2)
                    a_url, b_url = f"http://{a.address}/api/v1", f"http://{b.address}/api/v1"
                    yield Space(mgr, token, hub_id(a_url), hub_id(b_url), a_url, b_url), forwarder
            finally:
                forwarder.stop()


def wait_wanted(hub_url: str, topic: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if topic in httpx.get(f"{hub_url}/status", timeout=10).json().get("spaceTopics", {}).get(
            "wanted", []
        ):
            return
        time.sleep(0.05)
    raise SystemExit(f"hub {hub_url} never heard that topic {topic} is wanted")


def start(url: str, source: str) -> str:
    uploaded = httpx.post(f"{url}/sequence", content=python_package(source), timeout=60)
    uploaded.raise_for_status()
    started = httpx.post(f"{url}/sequence/{uploaded.json()['id']}/start", json={}, timeout=60)
    started.raise_for_status()
    return str(started.json()["id"])


class Reader:
    """GET ``url`` in a thread until ``total`` bytes came, hashing them."""

    def __init__(self, url: str, total: int, headers: dict[str, str]) -> None:
        self.url, self.total, self.headers = url, total, headers
        self.received = 0
        self.digest = hashlib.sha256()
        self.opened = threading.Event()
        self.done = threading.Event()
        self.failure: str | None = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self.opened.wait(30):
            raise SystemExit(f"GET {url} did not answer")

    def _read(self) -> None:
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(60, read=600)) as client,
                client.stream("GET", self.url, headers=self.headers) as response,
            ):
                self.opened.set()
                # Raw chunks as they come: iter_bytes(n) would hold back a last partial chunk.
                for chunk in response.iter_raw():
                    self.digest.update(chunk)
                    self.received += len(chunk)
                    if self.received >= self.total:
                        break
        except httpx.HTTPError as exc:
            self.failure = f"GET {self.url}: {exc!r}"
        finally:
            self.opened.set()
            self.done.set()

    def wait(self, timeout: float = 600) -> None:
        if not self.done.wait(timeout) or self.failure or self.received < self.total:
            raise SystemExit(self.failure or f"GET {self.url}: {self.received} of {self.total} bytes")


def cross_pump(
    post_url: str,
    get_url: str,
    body: Iterator[bytes],
    total: int,
    headers: dict[str, str],
    ready: Callable[[], None],
) -> float:
    """GET ``get_url`` (opened first), wait for ``ready()``, POST ``body`` to ``post_url``; MB/s,
    the digests of both sides checked."""
    sent = hashlib.sha256()
    reader = Reader(get_url, total, headers)
    ready()

    def chunks() -> Iterator[bytes]:
        for chunk in body:
            sent.update(chunk)
            yield chunk

    began = time.perf_counter()
    response = httpx.post(post_url, content=chunks(), headers=headers, timeout=600)
    if response.status_code >= 300:
        raise SystemExit(f"POST {post_url}: {response.status_code}")
    reader.wait()
    elapsed = time.perf_counter() - began
    if sent.hexdigest() != reader.digest.hexdigest():
        raise SystemExit(f"checksum mismatch on {get_url}")
    return total / MB / elapsed


def _blocks(total: int) -> Iterator[bytes]:
    block = os.urandom(MB)
    for _ in range(total // MB):
        yield block


def bench_cross_hub() -> None:
    total = TOTAL_MB * MB
    gb = total / 1024 / MB
    one_link: list[float] = []
    cross: list[float] = []
    cpm_per_gb: list[float] = []
    lines: list[float] = []
    line_chunk = LINE * (256 * 1024 // len(LINE))
    line_total = (total // 4) // len(line_chunk) * len(line_chunk)
    with space() as (env, _forwarder), env.client() as space_client, httpx.Client(timeout=60) as plain:
        for run in range(RUNS):
            # The baseline: one link, a topic GET through the Space from hub A.
            one_link.append(
                pump(
                    plain,
                    f"{env.a_url}/topic/base{run}",
                    space_client,
                    f"{env.space}/sth/{env.a_id}/api/v1/topic/base{run}",
                    total,
                )
            )
            # An instance on A provides x<run>; an instance on B requires it.
            topic = f"x{run}"
            made = start(env.a_url, producer(topic))
            taken = start(env.b_url, consumer(topic))
            cpm0 = cpu_seconds(env.mgr.daemon.pid)
            cross.append(
                cross_pump(
                    f"{env.a_url}/instance/{made}/input",
                    f"{env.b_url}/instance/{taken}/output",
                    _blocks(total),
                    total,
                    OCTET,
                    partial(wait_wanted, env.a_url, topic),
                )
            )
            cpm_per_gb.append((cpu_seconds(env.mgr.daemon.pid) - cpm0) / gb)
            for instance, url in ((made, env.a_url), (taken, env.b_url)):
                httpx.post(f"{url}/instance/{instance}/_kill", json={}, timeout=30)
            # 36-byte NDJSON records, API producer on A -> API consumer on B.
            name = f"lines{run}"
            speed = cross_pump(
                f"{env.a_url}/topic/{name}",
                f"{env.b_url}/topic/{name}",
                iter([line_chunk] * (line_total // len(line_chunk))),
                line_total,
                {"content-type": "application/x-ndjson"},
                partial(wait_wanted, env.a_url, name),
            )
            lines.append(speed * MB / len(LINE))
    ratio = [100 * c / o for c, o in zip(cross, one_link, strict=True)]
    base = f"one link {summary(one_link)['median']} MB/s"
    report(
        f"Space-wide topics ({TOTAL_MB} MB, TLS manager, instance on A -> instance on B)",
        [
            ("cross-hub, instance -> instance (MB/s)", summary(cross), base, ">= 80"),
            ("cross-hub / one-link topic GET (%)", summary(ratio), base, ">= 50 %"),
            ("one-link topic GET through the Space (MB/s)", summary(one_link), "", ""),
            ("cross-hub 36-byte NDJSON records/s", summary(lines), f"{line_total // MB} MB a run", ""),
            ("cpm CPU per GB cross-hub (s)", summary(cpm_per_gb), "", ""),
        ],
    )


def _backlog(url: str) -> int:
    return int(httpx.get(f"{url}/status", timeout=10).json()["spaceTopics"]["spoolBacklogBytes"])


def bench_drain() -> None:
    total = DRAIN_MB * MB
    drained: list[float] = []
    reconnect: list[float] = []
    with space() as (env, forwarder):
        for run in range(RUNS):
            name = f"drain{run}"
            reader = Reader(f"{env.b_url}/topic/{name}", total, OCTET)
            wait_wanted(env.a_url, name)
            forwarder.cut()
            deadline = time.monotonic() + 30
            while httpx.get(f"{env.a_url}/status", timeout=10).json()["cpm"]["connected"]:
                if time.monotonic() > deadline:
                    raise SystemExit("A's link did not drop")
                time.sleep(0.1)
            response = httpx.post(
                f"{env.a_url}/topic/{name}", content=_blocks(total), headers=OCTET, timeout=600
            )
            response.raise_for_status()
            backlog = _backlog(env.a_url)
            if backlog < total:
                raise SystemExit(f"A's spool holds {backlog} bytes, not {total}")
            restored = time.perf_counter()
            forwarder.restore()
            while not httpx.get(f"{env.a_url}/status", timeout=10).json()["cpm"]["connected"]:
                time.sleep(0.02)
            reconnect.append(time.perf_counter() - restored)
            reader.wait()
            drained.append(total / MB / (time.perf_counter() - restored))
    report(
        f"spool drain ({DRAIN_MB} MB kept on hub A while its link was cut)",
        [
            (
                "backlog drained to B after the link is back (MB/s)",
                summary(drained),
                "reconnect included",
                "",
            ),
            ("link back after the cut ended (s)", summary(reconnect), "", ""),
        ],
    )


PARTS: dict[str, Callable[[], None]] = {"cross": bench_cross_hub, "drain": bench_drain}


def main(argv: list[str]) -> None:
    for name in argv or list(PARTS):
        PARTS[name]()


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
