"""End-to-end: one topic per name per Space, across hubs, exactly once through cut links
and restarts (docs/data-spaces.md).

A real `cpm` (TLS, its own CA) and real `sth` hubs joined to it; links that must be cut
go through a TCP forwarder the test controls (harness/tcpproxy.py), which closes every
connection and refuses new ones for the length of the cut. Every record is a numbered
NDJSON line, so each consumer's copy is checked for gaps, repeats and order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from harness.tcpproxy import TcpForwarder
from tests.console_helpers import sign_in
from tests.cpm_helpers import ManagerProcess, cpm, run_cpm
from tests.helpers import HubProcess, python_package, run_sth

from .test_link_e2e import FAST, TIMEOUT, ssl_context, wait_hub

pytest.importorskip("agent.link.client")

#: A producer of topic "t": records {"hub": ..., "n": 0, 1, ...} every few ms, forever.
PRODUCER = """
import asyncio, json, os
provides = {"provides": "t", "contentType": "application/x-ndjson"}
async def run(context, input, *args):
    name, count, pause = args[0], int(args[1]), float(args[2])
    for n in range(count):
        yield {"from": name, "n": n}
        await asyncio.sleep(pause)
    await asyncio.sleep(3600)
"""

#: A consumer of topic "t": each record as one output line.
CONSUMER = """
import hashlib
import itertools
import json
requires = {"requires": "t", "contentType": "application/x-ndjson"}
async def run(context, input, *args):
    async for record in input:
        yield json.dumps(record) + "\\n"
"""


@asynccontextmanager
async def client_of(base: str, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT, **options) as http:
        yield http


def join_token(data: Path, space: str = "demo") -> str:
    return cpm(data, "join-token", "create", "--space", space)


@contextmanager
def linked_hub(
    tmp: Path,
    link_url: str,
    manager: ManagerProcess,
    name: str,
    *args: str,
    space: str = "demo",
    **options: Any,
) -> Iterator[HubProcess]:
    data = tmp / name
    data.mkdir(exist_ok=True)
    link = [
        "--data-dir",
        str(data),
        "--cpm-url",
        link_url,
        "--space",
        space,
        "--cpm-ca",
        str(manager.ca_file),
    ]
    link += ["--link-backoff-cap", "2", "--kill-grace", "1"]
    with run_sth(data / "sequences", *link, *args, **options) as hub:
        yield hub


async def start(hub: httpx.AsyncClient, source: str, *args: str) -> str:
    uploaded = await hub.post("/sequence", content=python_package(source))
    assert uploaded.status_code == 202, uploaded.text
    started = await hub.post(f"/sequence/{uploaded.json()['id']}/start", json={"args": list(args)})
    assert started.status_code == 200, started.text
    return str(started.json()["id"])


async def wait_wanted(hub: httpx.AsyncClient, name: str) -> None:
    """Until the hub knows the Space has consumers of ``name``."""
    with trio.fail_after(30):
        while name not in (await hub.get("/status")).json().get("spaceTopics", {}).get("wanted", []):
            await trio.sleep(0.1)


class Records:
    """Numbered records as they arrive on one stream, checked as they come."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {}
        self.arrived = trio.Event()
        self.bytes = 0

    def take(self, line: bytes) -> None:
        record = json.loads(line)
        self.seen.setdefault(record["from"], []).append(record["n"])

    def count(self, origin: str) -> int:
        return len(self.seen.get(origin, []))

    def check(self, origin: str, total: int) -> None:
        numbers = self.seen.get(origin, [])
        assert numbers == list(range(total)), _describe(numbers, total)


def _describe(numbers: list[int], total: int) -> str:
    repeated = len(numbers) - len(set(numbers))
    missing = sorted(set(range(total)) - set(numbers))
    out_of_order = sum(1 for a, b in itertools.pairwise(numbers) if b <= a)
    return (
        f"{len(numbers)} records of {total}: {repeated} repeated, {len(missing)} missing"
        f" (first {missing[:5]}), {out_of_order} out of order"
    )


async def follow(http: httpx.AsyncClient, path: str, records: Records, *, offset: bool = False) -> None:
    """Read ``path`` (an output or a topic) line by line into ``records``, for ever; with
    ``offset``, an instance's output resumed with ?offset= after any break (a hub restart)."""
    position = 0
    while True:
        try:
            query = f"?offset={position}" if offset else ""
            async with http.stream("GET", path + query, timeout=httpx.Timeout(20, read=None)) as response:
                assert response.status_code == 200, await response.aread()
                pending = b""
                async for chunk in response.aiter_raw():
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        position += len(line) + 1
                        if line.strip():
                            records.take(line)
        except (httpx.TransportError, httpx.RemoteProtocolError):
            if not offset:
                raise
        await trio.sleep(0.2)


async def until(condition: Any, seconds: float, what: str) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.1)


async def test_a_topic_spans_the_hubs_of_a_space(tmp_path: Path) -> None:
    """Producer on A; consumers on B and C and a Space API reader each get every record,
    in order; records posted to the Space's topic reach the hubs too; GET /topics shows it."""
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    token = cpm(data, "token", "create", "--space", "demo")
    with run_cpm(data, *FAST) as manager:
        joins = [join_token(data) for _ in range(3)]
        with (
            linked_hub(tmp_path, manager.link_url, manager, "a", "--join-token", joins[0]) as a,
            linked_hub(tmp_path, manager.link_url, manager, "b", "--join-token", joins[1]) as b,
            linked_hub(tmp_path, manager.link_url, manager, "c", "--join-token", joins[2]) as c,
        ):
            space_options = {"headers": {"Authorization": f"Bearer {token}"}, "verify": ssl_context(manager)}
            async with (
                client_of(manager.space_url("demo"), **space_options) as space,
                client_of(a.url) as hub_a,
                client_of(b.url) as hub_b,
                client_of(c.url) as hub_c,
                trio.open_nursery() as nursery,
            ):
                for _ in range(3):
                    await wait_hub(space)
                on_b, on_c, on_space = Records(), Records(), Records()
                consumer_b = await start(hub_b, CONSUMER)
                consumer_c = await start(hub_c, CONSUMER)
                nursery.start_soon(follow, hub_b, f"/instance/{consumer_b}/output", on_b)
                nursery.start_soon(follow, hub_c, f"/instance/{consumer_c}/output", on_c)
                nursery.start_soon(follow, space, "/topic/t", on_space)
                await wait_wanted(hub_a, "t")
                total = 300
                # Producers on two hubs at once: C's records reach B and the Space reader, and
                # C's own consumer once (locally), never a second time back from the manager.
                await start(hub_a, PRODUCER, "a", str(total), "0.002")
                await start(hub_c, PRODUCER, "c", str(total), "0.002")
                await until(
                    lambda: min(r.count(o) for r in (on_b, on_c, on_space) for o in "ac") >= total,
                    60,
                    "every record",
                )
                # Records posted to the Space's topic reach every consumer hub as well.
                posted = b"".join(json.dumps({"from": "api", "n": n}).encode() + b"\n" for n in range(50))
                response = await space.post(
                    "/topic/t", content=posted, headers={"content-type": "application/x-ndjson"}
                )
                assert response.status_code == 202, response.text
                await until(lambda: min(r.count("api") for r in (on_b, on_c, on_space)) >= 50, 30, "posted")
                await trio.sleep(1)  # anything echoed back would arrive now
                for records in (on_b, on_c, on_space):
                    records.check("a", total)
                    records.check("c", total)
                    records.check("api", 50)
                listing = (await space.get("/topics")).json()
                [topic] = [item for item in listing if item["name"] == "t"]
                assert topic["contentType"] == "application/x-ndjson"
                hub_ids = {h: (await h.get("/status")).json()["cpm"]["hubId"] for h in (hub_a, hub_b, hub_c)}
                assert topic["producers"] == sorted([hub_ids[hub_a], hub_ids[hub_c]])
                assert set(topic["consumers"]) == {hub_ids[hub_b], hub_ids[hub_c]}
                assert topic["records"] >= total + 50 and topic["bytes"] > 0
                assert set(topic["consumerBacklogs"]) == {hub_ids[hub_b], hub_ids[hub_c]}
                assert topic["readers"] == 1

                def console_topics() -> str:
                    with httpx.Client(
                        base_url=manager.base, verify=ssl_context(manager), timeout=20
                    ) as browser:
                        sign_in(browser, token)
                        return browser.get("/console/topics").text

                page = await trio.to_thread.run_sync(console_topics)
                assert "<b>t</b>" in page and "1 API reader" in page
                assert all(hub_ids[h] in page for h in (hub_a, hub_b, hub_c))
                nursery.cancel_scope.cancel()
        assert manager.alive()


async def test_records_arrive_exactly_once_across_cut_links(tmp_path: Path) -> None:
    """A's link (the producer's) and B's link (a consumer's) cut for 30 s mid-stream: A spools
    what it makes meanwhile, the manager keeps what B has not taken; after the cut, B, C and a
    Space API reader each have every record once, in order."""
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    token = cpm(data, "token", "create", "--space", "demo")
    with run_cpm(data, *FAST) as manager:
        host, port = manager.address.rsplit(":", 1)
        async with trio.open_nursery() as network:
            to_a = TcpForwarder(host, int(port))
            to_b = TcpForwarder(host, int(port))
            url_a = f"wss://127.0.0.1:{await network.start(to_a.run)}"
            url_b = f"wss://127.0.0.1:{await network.start(to_b.run)}"
            joins = [join_token(data) for _ in range(3)]
            with (
                linked_hub(tmp_path, url_a, manager, "a", "--join-token", joins[0]) as a,
                linked_hub(tmp_path, url_b, manager, "b", "--join-token", joins[1]) as b,
                linked_hub(tmp_path, manager.link_url, manager, "c", "--join-token", joins[2]) as c,
            ):
                space_options = {
                    "headers": {"Authorization": f"Bearer {token}"},
                    "verify": ssl_context(manager),
                }
                async with (
                    client_of(manager.space_url("demo"), **space_options) as space,
                    client_of(a.url) as hub_a,
                    client_of(b.url) as hub_b,
                    client_of(c.url) as hub_c,
                    trio.open_nursery() as nursery,
                ):
                    for _ in range(3):
                        await wait_hub(space)
                    on_b, on_c, on_space = Records(), Records(), Records()
                    consumer_b = await start(hub_b, CONSUMER)
                    consumer_c = await start(hub_c, CONSUMER)
                    nursery.start_soon(follow, hub_b, f"/instance/{consumer_b}/output", on_b)
                    nursery.start_soon(follow, hub_c, f"/instance/{consumer_c}/output", on_c)
                    nursery.start_soon(follow, space, "/topic/t", on_space)
                    await wait_wanted(hub_a, "t")
                    total = 3000
                    await start(hub_a, PRODUCER, "a", str(total), "0.01")
                    await until(lambda: on_b.count("a") >= 100, 30, "records before the cut")
                    async with trio.open_nursery() as cuts:
                        cuts.start_soon(to_a.cut, 30.0)
                        cuts.start_soon(to_b.cut, 30.0)
                        await trio.sleep(5)
                        # Meanwhile A spools: its backlog shows on the hub.
                        status = (await hub_a.get("/status")).json()
                        assert status["cpm"]["connected"] is False
                        assert status["spaceTopics"]["spoolBacklogBytes"] > 0
                    await until(
                        lambda: min(r.count("a") for r in (on_b, on_c, on_space)) >= total, 90, "every record"
                    )
                    await trio.sleep(1)  # anything repeated would arrive now
                    for records in (on_b, on_c, on_space):
                        records.check("a", total)
                    assert (await hub_a.get("/status")).json()["spaceTopics"]["spoolBacklogBytes"] == 0
                    nursery.cancel_scope.cancel()
            network.cancel_scope.cancel()
        assert manager.alive()


async def test_a_consumer_hub_restarted_mid_stream_misses_nothing(tmp_path: Path) -> None:
    """Hub B, whose instance consumes t, is killed (-9) mid-stream and started again: its
    instance, taken back, goes on with every record once, in order."""
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    with run_cpm(data, *FAST) as manager:
        joins = [join_token(data) for _ in range(2)]
        with linked_hub(tmp_path, manager.link_url, manager, "a", "--join-token", joins[0]) as a:
            b_dir = tmp_path / "b"
            first = linked_hub(
                tmp_path, manager.link_url, manager, "b", "--join-token", joins[1], keep_instances=True
            )
            hub = first.__enter__()
            port = hub.address.rsplit(":", 1)[1]
            try:
                async with (
                    client_of(a.url) as hub_a,
                    client_of(hub.url) as hub_b,
                    trio.open_nursery() as nursery,
                ):
                    consumer = await start(hub_b, CONSUMER)
                    on_b = Records()
                    nursery.start_soon(partial_follow(hub_b, f"/instance/{consumer}/output", on_b))
                    await wait_wanted(hub_a, "t")
                    total = 2000
                    await start(hub_a, PRODUCER, "a", str(total), "0.005")
                    await until(lambda: on_b.count("a") >= 200, 30, "records before the restart")
                    hub.process.send_signal(signal.SIGKILL)
                    hub.process.wait(10)
                    first.__exit__(None, None, None)
                    await trio.sleep(2)
                    with linked_hub(
                        tmp_path, manager.link_url, manager, "b", "-P", port, keep_instances=True
                    ) as again:
                        assert again.address.endswith(f":{port}")
                        await until(lambda: on_b.count("a") >= total, 90, "every record")
                        await trio.sleep(1)
                        on_b.check("a", total)
                        nursery.cancel_scope.cancel()
            finally:
                from harness.daemons import stop_instances

                stop_instances(b_dir / "sequences")
        assert manager.alive()


def partial_follow(http: httpx.AsyncClient, path: str, records: Records) -> Any:
    async def run() -> None:
        await follow(http, path, records, offset=True)

    return run


async def test_two_spaces_never_cross(tmp_path: Path) -> None:
    """Spaces "demo" and "other" on one manager, each with a producer and a consumer of "t":
    each consumer gets its own Space's records only."""
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    cpm(data, "space", "create", "other")
    with run_cpm(data, *FAST) as manager:
        joins = [
            join_token(data, "demo"),
            join_token(data, "demo"),
            join_token(data, "other"),
            join_token(data, "other"),
        ]
        spaces = ["demo", "demo", "other", "other"]
        async with AsyncExitStack() as stack:
            hubs = [
                stack.enter_context(
                    linked_hub(
                        tmp_path,
                        manager.link_url,
                        manager,
                        f"h{i}",
                        "--join-token",
                        joins[i],
                        space=spaces[i],
                    )
                )
                for i in range(4)
            ]
            async with trio.open_nursery() as nursery:
                clients = [await stack.enter_async_context(client_of(hub.url)) for hub in hubs]
                consumers = [Records(), Records()]
                for index, client in ((1, clients[1]), (3, clients[3])):
                    consumer = await start(client, CONSUMER)
                    nursery.start_soon(follow, client, f"/instance/{consumer}/output", consumers[index // 2])
                await wait_wanted(clients[0], "t")
                await wait_wanted(clients[2], "t")
                await start(clients[0], PRODUCER, "demo", "100", "0.002")
                await start(clients[2], PRODUCER, "other", "100", "0.002")
                await until(
                    lambda: consumers[0].count("demo") >= 100 and consumers[1].count("other") >= 100,
                    60,
                    "both",
                )
                await trio.sleep(1)
                assert set(consumers[0].seen) == {"demo"} and set(consumers[1].seen) == {"other"}
                consumers[0].check("demo", 100)
                consumers[1].check("other", 100)
                nursery.cancel_scope.cancel()
        assert manager.alive()


async def test_a_manager_restarted_mid_stream_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """The manager stopped and started again (same data dir and port) while records flow from
    A to B: every record reaches B once, in order."""
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    joins = [join_token(data) for _ in range(2)]
    with run_cpm(data, *FAST) as manager:
        port = int(manager.address.rsplit(":", 1)[1])
        a_cm = linked_hub(tmp_path, manager.link_url, manager, "a", "--join-token", joins[0])
        b_cm = linked_hub(tmp_path, manager.link_url, manager, "b", "--join-token", joins[1])
        with a_cm as a, b_cm as b:
            async with client_of(a.url) as hub_a, client_of(b.url) as hub_b, trio.open_nursery() as nursery:
                consumer = await start(hub_b, CONSUMER)
                on_b = Records()
                nursery.start_soon(follow, hub_b, f"/instance/{consumer}/output", on_b)
                await wait_wanted(hub_a, "t")
                total = 2000
                await start(hub_a, PRODUCER, "a", str(total), "0.005")
                await until(lambda: on_b.count("a") >= 200, 30, "records before the restart")
                manager.process.terminate()
                manager.process.wait(20)
                await trio.sleep(2)
                with run_cpm(data, *FAST, port=port) as again:
                    await until(lambda: on_b.count("a") >= total, 90, "every record")
                    await trio.sleep(1)
                    on_b.check("a", total)
                    nursery.cancel_scope.cancel()
                    assert again.alive()


async def test_a_slow_consumer_holds_back_only_its_own_topic(tmp_path: Path) -> None:
    """B reads topic "slow" not at all: the manager's log and A's spool for it fill to their
    bounds and A's producer of it waits, while topic "fast" flows, calls through the Space
    answer and heartbeats go on; once B reads again, every byte of "slow" arrives."""
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    token = cpm(data, "token", "create", "--space", "demo")
    joins = [join_token(data) for _ in range(2)]
    spool = ("--topic-spool-bytes", "2M", "--topic-spool-total-bytes", "16M")
    with run_cpm(data, *FAST, "--topic-log-bytes", "2M") as manager:
        with (
            linked_hub(tmp_path, manager.link_url, manager, "a", "--join-token", joins[0], *spool) as a,
            linked_hub(tmp_path, manager.link_url, manager, "b", "--join-token", joins[1]) as b,
        ):
            space_options = {"headers": {"Authorization": f"Bearer {token}"}, "verify": ssl_context(manager)}
            async with (
                client_of(manager.space_url("demo"), **space_options) as space,
                client_of(a.url) as hub_a,
                client_of(b.url) as hub_b,
                trio.open_nursery() as nursery,
            ):
                for _ in range(2):
                    await wait_hub(space)
                b_id = (await hub_b.get("/status")).json()["cpm"]["hubId"]
                total = 32 * 1024 * 1024
                block = bytes(range(256)) * 4096  # 1 MiB
                posted = trio.Event()
                async with hub_b.stream(
                    "GET", "/topic/slow", headers={"content-type": "application/octet-stream"}
                ) as stalled:
                    assert stalled.status_code == 200
                    await wait_wanted(hub_a, "slow")

                    async def flood() -> None:
                        async def body() -> AsyncIterator[bytes]:
                            for _ in range(total // len(block)):
                                yield block

                        response = await hub_a.post(
                            "/topic/slow",
                            content=body(),
                            headers={"content-type": "application/octet-stream"},
                            timeout=httpx.Timeout(20, write=None, read=None),
                        )
                        assert response.status_code == 202
                        posted.set()

                    nursery.start_soon(flood)
                    consumer = await start(hub_b, CONSUMER)
                    on_b = Records()
                    nursery.start_soon(follow, hub_b, f"/instance/{consumer}/output", on_b)
                    await wait_wanted(hub_a, "t")
                    await start(hub_a, PRODUCER, "a", "300", "0.002")
                    await until(lambda: on_b.count("a") >= 300, 60, "the fast topic")
                    on_b.check("a", 300)
                    # The slow topic is held back at its bounds, not dropped and not buffered whole.
                    assert not posted.is_set()
                    backlog = (await hub_a.get("/status")).json()["spaceTopics"]["spools"]["slow"]
                    assert 0 < backlog <= 2 * 1024 * 1024 + 256 * 1024
                    for _ in range(5):
                        assert (await space.get(f"/sth/{b_id}/api/v1/version")).status_code == 200
                    record = (await space.get(f"/sth/{b_id}/info")).json()
                    assert record["healthy"] is True
                    # B reads again: all of it arrives, in order.
                    received = hashlib.sha256()
                    count = 0
                    expected = hashlib.sha256()
                    for _ in range(total // len(block)):
                        expected.update(block)
                    with trio.fail_after(120):
                        async for chunk in stalled.aiter_raw():
                            received.update(chunk)
                            count += len(chunk)
                            if count >= total:
                                break
                    assert count == total and received.hexdigest() == expected.hexdigest()
                with trio.fail_after(30):
                    await posted.wait()
                nursery.cancel_scope.cancel()
        assert manager.alive()


async def test_a_producer_hub_killed_with_a_backlog_sends_it_all_after(tmp_path: Path) -> None:
    """A's link is cut, its spool fills with what its instance makes, A is killed (-9) and
    started again while still cut: its instance is taken back, and once the link returns the
    spool (kept on disk) and everything after reach B once, in order."""
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    joins = [join_token(data) for _ in range(2)]
    with run_cpm(data, *FAST) as manager:
        host, port = manager.address.rsplit(":", 1)
        async with trio.open_nursery() as network:
            to_a = TcpForwarder(host, int(port))
            url_a = f"wss://127.0.0.1:{await network.start(to_a.run)}"
            a_dir = tmp_path / "a"
            with linked_hub(tmp_path, manager.link_url, manager, "b", "--join-token", joins[1]) as b:
                first = linked_hub(
                    tmp_path, url_a, manager, "a", "--join-token", joins[0], keep_instances=True
                )
                a = first.__enter__()
                a_port = a.address.rsplit(":", 1)[1]
                try:
                    async with client_of(b.url) as hub_b, trio.open_nursery() as nursery:
                        async with client_of(a.url) as hub_a:
                            consumer = await start(hub_b, CONSUMER)
                            on_b = Records()
                            nursery.start_soon(follow, hub_b, f"/instance/{consumer}/output", on_b)
                            await wait_wanted(hub_a, "t")
                            total = 1500
                            await start(hub_a, PRODUCER, "a", str(total), "0.005")
                            await until(lambda: on_b.count("a") >= 100, 30, "records before the cut")
                            to_a.hold()
                            with trio.fail_after(20):
                                while (await hub_a.get("/status")).json()["spaceTopics"][
                                    "spoolBacklogBytes"
                                ] < 2000:
                                    await trio.sleep(0.1)
                        a.process.send_signal(signal.SIGKILL)
                        a.process.wait(10)
                        first.__exit__(None, None, None)
                        with linked_hub(
                            tmp_path, url_a, manager, "a", "-P", a_port, keep_instances=True
                        ) as again:
                            async with client_of(again.url) as hub_a:
                                status = (await hub_a.get("/status")).json()
                                assert status["spaceTopics"]["spoolBacklogBytes"] >= 2000  # kept on disk
                                assert status["cpm"]["connected"] is False
                                # The producer taken back keeps its topic's declared type.
                                [topic] = (await hub_a.get("/topics")).json()
                                assert topic["contentType"] == "application/x-ndjson"
                                to_a.release()
                                await until(lambda: on_b.count("a") >= total, 90, "every record")
                                await trio.sleep(1)
                                on_b.check("a", total)
                                nursery.cancel_scope.cancel()
                finally:
                    from harness.daemons import stop_instances

                    stop_instances(a_dir / "sequences")
            network.cancel_scope.cancel()
        assert manager.alive()
