"""End-to-end: a Space served by three `cpm` replicas sharing one real PostgreSQL
(docs/replicas.md).

Each test takes a fresh database of the session's throw-away cluster (harness/postgres.py)
and starts three real `cpm serve --registry postgresql://...` processes, each with its own
data dir; real `sth` hubs link to them. The replicas share one CA (the first one's, kept in
the database), so a hub trusting the CA file of any of them can link to all.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from harness.postgres import TemporaryPostgres
from tests.cpm_helpers import ManagerProcess, cpm, run_cpm
from tests.helpers import HubProcess, python_package, run_sth

from .test_link_e2e import FAST, TIMEOUT, space_client, ssl_context

pytest.importorskip("agent.link.client")

ECHO = """
async def run(context, input, *args):
    async for chunk in input:
        yield chunk
"""


@contextmanager
def replicas(tmp: Path, url: str, count: int = 3, *args: str) -> Iterator[list[ManagerProcess]]:
    with ExitStack() as stack:
        started = [
            stack.enter_context(run_cpm(tmp / f"r{i}", "--registry", url, *FAST, *args)) for i in range(count)
        ]
        yield started


def admin(data: Path, url: str, *args: str) -> str:
    return cpm(data, *args, "--registry", url)


def demo_space(data: Path, url: str, hubs: int) -> tuple[str, list[str]]:
    """Space "demo" in the shared registry: an API token, and a join token for each of ``hubs``."""
    admin(data, url, "space", "create", "demo")
    token = admin(data, url, "token", "create", "--space", "demo")
    return token, [admin(data, url, "join-token", "create", "--space", "demo") for _ in range(hubs)]


@contextmanager
def hub_on(
    tmp: Path, name: str, managers: list[ManagerProcess], join: str | None = None
) -> Iterator[HubProcess]:
    """A hub dialling ``managers`` in turn (the first one first)."""
    data = tmp / name
    data.mkdir(exist_ok=True)
    args = ["--data-dir", str(data), "--space", "demo", "--cpm-ca", str(managers[0].ca_file)]
    for manager in managers:
        args += ["--cpm-url", manager.link_url]
    if join is not None:
        args += ["--join-token", join]
    args += ["--link-backoff-cap", "2", "--kill-grace", "1"]
    with run_sth(data / "sequences", *args) as hub:
        yield hub


async def hub_id_of(hub: HubProcess) -> str:
    async with httpx.AsyncClient(base_url=hub.url, timeout=TIMEOUT) as http:
        with trio.fail_after(30):
            while True:
                link = (await http.get("/status")).json().get("cpm") or {}
                if link.get("connected") and link.get("hubId"):
                    return str(link["hubId"])
                await trio.sleep(0.1)


async def until_listed(space: httpx.AsyncClient, hubs: set[str], seconds: float = 30) -> list[dict[str, Any]]:
    """The space's /list once every hub in ``hubs`` shows connected and healthy."""
    with trio.fail_after(seconds):
        while True:
            response = await space.get("/list")
            if response.status_code == 200:
                listed = response.json()
                healthy = {r["id"] for r in listed if r["isConnectionActive"] and r["healthy"]}
                if hubs <= healthy:
                    return list(listed)
            await trio.sleep(0.2)


def owners(url: str) -> dict[str, tuple[str, int]]:
    with psycopg.connect(url) as connection:
        rows = connection.execute("SELECT hub_id, replica, epoch FROM hub_owners").fetchall()
    return {hub: (replica, epoch) for hub, replica, epoch in rows}


def manager_id(manager: ManagerProcess) -> str:
    return (manager.data_dir / "manager-id").read_text().strip()


async def test_every_route_answers_the_same_from_every_replica(
    tmp_path: Path, postgres: TemporaryPostgres
) -> None:
    url = postgres.new_database()
    data = tmp_path / "r0"
    with replicas(tmp_path, url) as managers:
        token, joins = demo_space(data, url, len(managers))
        # All three replicas serve under the one CA the first made.
        assert len({m.ca_file.read_bytes() for m in managers}) == 1
        assert len({m.fingerprint for m in managers}) == 1
        with ExitStack() as stack:
            # Hub i links to replica i (each told only its own replica).
            hubs = [
                stack.enter_context(hub_on(tmp_path, f"h{i}", [m], joins[i])) for i, m in enumerate(managers)
            ]
            ids = [await hub_id_of(hub) for hub in hubs]
            held = owners(url)
            assert [held[hub_id][0] for hub_id in ids] == [manager_id(m) for m in managers]
            async with (
                space_client(managers[0], token) as s0,
                space_client(managers[1], token) as s1,
                space_client(managers[2], token) as s2,
            ):
                spaces = [s0, s1, s2]
                for space in spaces:
                    listed = await until_listed(space, set(ids))
                    assert sorted(r["id"] for r in listed) == sorted(ids)
                # Every hub through every replica: two of three calls are forwarded.
                for space in spaces:
                    for hub_id in ids:
                        version = await space.get(f"/sth/{hub_id}/api/v1/version")
                        assert version.status_code == 200, version.text
                        info = await space.get(f"/sth/{hub_id}/info")
                        assert info.status_code == 200 and info.json()["healthy"], info.text
                # A streamed upload through replica 1 to the hub on replica 2; started through
                # replica 0; input through replica 1 and output read through replica 0.
                package = python_package(ECHO)
                uploaded = await s1.post(f"/sth/{ids[2]}/api/v1/sequence", content=package)
                assert uploaded.status_code == 202, uploaded.text
                sequence = uploaded.json()["id"]
                started = await s0.post(f"/sth/{ids[2]}/api/v1/sequence/{sequence}/start", json={})
                assert started.status_code == 200, started.text
                instance = started.json()["id"]
                lines = [f"line {n}\n".encode() for n in range(2000)]

                async def chunks() -> AsyncIterator[bytes]:
                    for line in lines:
                        yield line

                sent = await s1.post(
                    f"/sth/{ids[2]}/api/v1/instance/{instance}/input",
                    content=chunks(),  # chunked: streamed through both replicas' links
                    headers={"content-type": "text/plain"},
                )
                assert sent.status_code == 200, sent.text
                received = bytearray()
                with trio.fail_after(30):
                    async with s0.stream(
                        "GET", f"/sth/{ids[2]}/api/v1/instance/{instance}/output"
                    ) as response:
                        assert response.status_code == 200
                        async for chunk in response.aiter_raw():
                            received.extend(chunk)
                assert bytes(received) == b"".join(lines)
                # The Space's listings are the same from every replica.
                for kind in ("sequences", "instances", "topics"):
                    answers = []
                    for space in spaces:
                        with trio.fail_after(15):
                            while True:
                                answer = (await space.get(f"/{kind}", params={"detail": "true"})).json()
                                if kind == "topics" or any(i.get("hub") == ids[2] for i in answer):
                                    break
                                await trio.sleep(0.3)
                        answers.append(json.dumps(answer, sort_keys=True))
                    assert answers[0] == answers[1] == answers[2], kind
                states = [
                    sorted(
                        (r["id"], r["state"], r["isConnectionActive"]) for r in (await s.get("/list")).json()
                    )
                    for s in spaces
                ]
                assert states[0] == states[1] == states[2]
                # An unknown hub is a 404 from every replica; a bad token is refused everywhere.
                for space in spaces:
                    assert (await space.get("/sth/sth-00000000/api/v1/version")).status_code == 404
                    refused = await space.get("/list", headers={"Authorization": "Bearer shk_nope"})
                    assert refused.status_code == 403
                # A token revoked through one replica stops working on the others within seconds.
                admin(data, url, "token", "revoke", "--space", "demo", token)
                with trio.fail_after(10):
                    while [(await s.get("/list")).status_code for s in spaces] != [403, 403, 403]:
                        await trio.sleep(0.3)


async def test_a_replica_killed_its_hubs_come_back_on_the_others(
    tmp_path: Path, postgres: TemporaryPostgres
) -> None:
    url = postgres.new_database()
    data = tmp_path / "r0"
    with replicas(tmp_path, url) as managers:
        token, joins = demo_space(data, url, 3)
        doomed, survivors = managers[2], managers[:2]
        with ExitStack() as stack:
            # Two hubs start on the doomed replica and know the others; one knows only it.
            movers = [
                stack.enter_context(hub_on(tmp_path, f"m{i}", [doomed, *survivors], joins[i]))
                for i in range(2)
            ]
            stranded = stack.enter_context(hub_on(tmp_path, "stranded", [doomed], joins[2]))
            mover_ids = [await hub_id_of(hub) for hub in movers]
            stranded_id = await hub_id_of(stranded)
            doomed_id = manager_id(doomed)
            assert {owners(url)[h][0] for h in [*mover_ids, stranded_id]} == {doomed_id}
            async with space_client(survivors[0], token) as s0, space_client(survivors[1], token) as s1:
                await until_listed(s0, {*mover_ids, stranded_id})
                doomed.process.send_signal(signal.SIGKILL)
                doomed.process.wait(timeout=10)
                killed_at = trio.current_time()
                # A call made now either reaches the hub (it moved already) or is a clear 503.
                early = await s0.get(f"/sth/{mover_ids[0]}/api/v1/version")
                assert early.status_code in (200, 503), early.text
                if early.status_code == 503:
                    assert early.json()["error"], early.text
                # The hubs that know other replicas are back, healthy, within 15 s.
                for space in (s0, s1):
                    await until_listed(space, set(mover_ids), seconds=15 - (trio.current_time() - killed_at))
                for space in (s0, s1):
                    for hub_id in mover_ids:
                        answer = await space.get(f"/sth/{hub_id}/api/v1/version")
                        assert answer.status_code == 200, answer.text
                held = owners(url)
                assert {held[h][0] for h in mover_ids} <= {manager_id(m) for m in survivors}
                # The hub that knew only the dead replica is not left owned by it: its row is
                # released once the replica's liveness row is old, and it shows disconnected.
                with trio.fail_after(40):
                    while stranded_id in owners(url):
                        await trio.sleep(0.5)
                listed = {r["id"]: r for r in (await s1.get("/list")).json()}
                assert not listed[stranded_id]["isConnectionActive"]
                gone = await s1.get(f"/sth/{stranded_id}/api/v1/version")
                assert gone.status_code == 503 and "not connected" in gone.json()["error"]


async def test_one_hub_identity_on_two_replicas_is_served_by_one(
    tmp_path: Path, postgres: TemporaryPostgres
) -> None:
    """Fencing: a hub's data dir (its key) copied to a second machine, each copy linking to
    another replica. Every take-over bumps the hub's ownership epoch and closes the other
    replica's link (links_fenced_total on /metrics), again and again, and the registry
    names one owner of the hub at any time."""
    url = postgres.new_database()
    data = tmp_path / "r0"
    with replicas(tmp_path, url, 2) as managers:
        token, [join] = demo_space(data, url, 1)
        with hub_on(tmp_path, "original", [managers[0]], join) as original:
            hub_id = await hub_id_of(original)
            assert owners(url)[hub_id][1] == 1
        # Its identity, twice: the same key and link.json on two "machines".
        clone = tmp_path / "clone"
        clone.mkdir()
        for name in ("hub.key", "link.json"):
            source = tmp_path / "original" / name
            if source.exists():
                (clone / name).write_bytes(source.read_bytes())
                (clone / name).chmod(0o600)
        with hub_on(tmp_path, "original", [managers[0]]), hub_on(tmp_path, "clone", [managers[1]]):
            async with space_client(managers[0], token) as s0, space_client(managers[1], token) as s1:
                fenced_before = sum(_fenced(m) for m in managers)
                # Sampled before, during and after (the copies may have flapped twice before the
                # first look; 0 while neither copy is linked yet).
                epochs = [owners(url).get(hub_id, ("", 0))[1]]
                with trio.fail_after(60):
                    while sum(_fenced(m) for m in managers) - fenced_before < 2:
                        await trio.sleep(0.5)
                        for space in (s0, s1):
                            assert (await space.get("/list")).status_code == 200
                        epochs.append(owners(url).get(hub_id, ("", 0))[1])
                epochs.append(owners(url).get(hub_id, ("", 0))[1])
                # Both replicas fenced a link of it at least once, and the epoch only grew.
                assert all(_fenced(m) >= 1 for m in managers)
                # (epoch 1 was the original's first link; each take-over since added one)
                assert epochs == sorted(epochs) and epochs[-1] >= 3
        for m in managers:
            assert m.alive()


def _fenced(manager: ManagerProcess) -> int:
    """links_fenced_total from the replica's /metrics."""
    metrics_token = cpm(manager.data_dir, "metrics-token")
    answer = httpx.get(
        f"{manager.base}/metrics",
        headers={"Authorization": f"Bearer {metrics_token}"},
        verify=ssl_context(manager),
        timeout=10,
    )
    for line in answer.text.splitlines():
        if line.startswith("spacehub_cpm_links_fenced_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no spacehub_cpm_links_fenced_total in /metrics")


async def test_a_space_topic_spans_hubs_on_different_replicas(
    tmp_path: Path, postgres: TemporaryPostgres
) -> None:
    """Producers on hubs linked to two replicas, consumers on hubs linked to the other two, a
    Space API reader and a poster through yet others: every record once, in order, wherever
    the topics home is; GET /topics is the same from every replica."""
    from .test_space_topics import CONSUMER, PRODUCER, Records, follow, start, until, wait_wanted

    url = postgres.new_database()
    data = tmp_path / "r0"
    with replicas(tmp_path, url) as managers:
        token, joins = demo_space(data, url, 3)
        with (
            hub_on(tmp_path, "a", [managers[0]], joins[0]) as a,
            hub_on(tmp_path, "b", [managers[1]], joins[1]) as b,
            hub_on(tmp_path, "c", [managers[2]], joins[2]) as c,
        ):
            async with (
                space_client(managers[0], token) as s0,
                space_client(managers[1], token) as s1,
                space_client(managers[2], token) as s2,
                httpx.AsyncClient(base_url=a.url, timeout=TIMEOUT) as hub_a,
                httpx.AsyncClient(base_url=b.url, timeout=TIMEOUT) as hub_b,
                httpx.AsyncClient(base_url=c.url, timeout=TIMEOUT) as hub_c,
                trio.open_nursery() as nursery,
            ):
                ids = [await hub_id_of(h) for h in (a, b, c)]
                await until_listed(s0, set(ids))
                on_b, on_c, on_space = Records(), Records(), Records()
                consumer_b = await start(hub_b, CONSUMER)
                consumer_c = await start(hub_c, CONSUMER)
                nursery.start_soon(follow, hub_b, f"/instance/{consumer_b}/output", on_b)
                nursery.start_soon(follow, hub_c, f"/instance/{consumer_c}/output", on_c)
                nursery.start_soon(follow, s1, "/topic/t", on_space)  # a reader through replica 1
                await wait_wanted(hub_a, "t")
                total = 300
                await start(hub_a, PRODUCER, "a", str(total), "0.002")
                await start(hub_c, PRODUCER, "c", str(total), "0.002")
                posted = b"".join(json.dumps({"from": "api", "n": n}).encode() + b"\n" for n in range(50))
                response = await s2.post(
                    "/topic/t", content=posted, headers={"content-type": "application/x-ndjson"}
                )
                assert response.status_code == 202, response.text
                await until(
                    lambda: (
                        min(r.count(o) for r in (on_b, on_c, on_space) for o in ("a", "c", "api")) >= 50
                        and min(r.count(o) for r in (on_b, on_c, on_space) for o in "ac") >= total
                    ),
                    60,
                    "every record",
                )
                await trio.sleep(1)  # anything repeated or echoed back would arrive now
                for records in (on_b, on_c, on_space):
                    records.check("a", total)
                    records.check("c", total)
                    records.check("api", 50)
                listings = []
                for space in (s0, s1, s2):
                    [topic] = [t for t in (await space.get("/topics")).json() if t["name"] == "t"]
                    assert topic["producers"] == sorted([ids[0], ids[2]])
                    assert set(topic["consumers"]) == {ids[1], ids[2]}
                    listings.append((topic["producers"], sorted(topic["consumers"]), topic["records"]))
                assert listings[0] == listings[1] == listings[2]
                # One replica keeps the topics; the hubs on the two others had theirs relayed.
                with psycopg.connect(url) as connection:
                    (home,) = connection.execute(
                        "SELECT value FROM cluster WHERE name = 'home:topics'"
                    ).fetchone()
                assert home in {manager_id(m) for m in managers}
                nursery.cancel_scope.cancel()


async def test_the_database_stopped_and_started_under_load(tmp_path: Path) -> None:
    """PostgreSQL goes down while calls flow through two replicas (to the hub each holds and,
    forwarded, to the other's): the links stay up and those calls go on; what needs the
    database answers 503 with a reason; everything resumes when it is back."""
    own = TemporaryPostgres()  # stopped mid-test: not the session's cluster
    try:
        url = own.new_database()
        data = tmp_path / "r0"
        with replicas(tmp_path, url, 2) as managers:
            token, joins = demo_space(data, url, 3)
            with (
                hub_on(tmp_path, "h0", [managers[0]], joins[0]) as h0,
                hub_on(tmp_path, "h1", [managers[1]], joins[1]) as h1,
            ):
                ids = [await hub_id_of(h0), await hub_id_of(h1)]
                async with space_client(managers[0], token) as s0, space_client(managers[1], token) as s1:
                    await until_listed(s0, set(ids))
                    await until_listed(s1, set(ids))
                    await trio.sleep(2.5)  # a watchdog round has read who holds which hub
                    statuses: list[int] = []
                    refused: list[str] = []
                    stop_load = trio.Event()

                    async def load() -> None:
                        while not stop_load.is_set():
                            for space in (s0, s1):
                                for hub_id in ids:
                                    with trio.fail_after(10):  # nothing hangs
                                        answer = await space.get(f"/sth/{hub_id}/api/v1/version")
                                    statuses.append(answer.status_code)
                                    if answer.status_code != 200:
                                        refused.append(f"{space.base_url} {hub_id}: {answer.text}")
                            await trio.sleep(0.02)

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(load)
                        await trio.sleep(1)
                        await trio.to_thread.run_sync(own.stop)
                        down_from = len(statuses)
                        await trio.sleep(2)
                        for space in (s0, s1):
                            listed = await space.get("/list")
                            assert listed.status_code == 503, listed.text
                            assert "database" in listed.json()["error"], listed.text
                        # A hub joining now is turned away (the hub retries): nothing is half made.
                        with hub_on(tmp_path, "late", [managers[0]], joins[2]) as late:
                            async with httpx.AsyncClient(base_url=late.url, timeout=TIMEOUT) as late_http:
                                await trio.sleep(2)
                                assert not (await late_http.get("/status")).json()["cpm"]["connected"]
                            await trio.sleep(4)
                            during = statuses[down_from:]
                            await trio.to_thread.run_sync(own.start)
                            # Back: the late hub gets in, the listings answer again.
                            late_id = await hub_id_of(late)
                            for space in (s0, s1):
                                await until_listed(space, {*ids, late_id}, seconds=30)
                        stop_load.set()
                    # Through the outage every call for a linked hub, direct or forwarded, went on.
                    assert during and set(during) == {200}, refused[:5]
                    assert set(statuses) == {200}
                    fresh = admin(data, url, "token", "create", "--space", "demo")
                    for manager in managers:
                        async with space_client(manager, fresh) as space:
                            assert (await space.get("/list")).status_code == 200
    finally:
        own.close()
