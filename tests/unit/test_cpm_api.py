"""The manager's HTTP API, in-process: ``run_manager`` in a nursery, httpx against it.

Rules: port 0 on 127.0.0.1, plain HTTP (allowed on loopback only), a fresh data dir
per test, every wait bounded by ``fail_after``; the link itself is tested with a
hub speaking the protocol over a real websocket (``websockets``).
"""

from __future__ import annotations

import base64
import gc
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.trio.client import connect

from cpm import __version__
from cpm.config import ConfigError, ManagerConfig, load_config
from cpm.link.sessions import (
    MAX_STALE_DUE,
    PING_BATCH_FRACTION,
    QUICK_ANSWER_BYTES,
    HubReport,
    HubSession,
    HubSessions,
)
from cpm.link.transport import AsgiWebSocketTransport
from cpm.registry import Registry
from cpm.service import run_manager
from spacehub.protocol.auth import challenge_payload
from spacehub.protocol.control import Heartbeat
from spacehub.protocol.link import INITIAL_WINDOW, ControlReceived, FrameType, LinkConnection
from spacehub.server.keys import public_key_bytes, sign_challenge
from spacehub.server.link import LinkClosed, LinkSession, WebsocketsTransport, serve_asgi

TIMEOUT = 10.0


@dataclass
class Running:
    url: str
    config: ManagerConfig
    token: str
    registry: Registry


@asynccontextmanager
async def manager(tmp_path: Path, **options: object) -> AsyncIterator[Running]:
    config = load_config(None, {"port": 0, "tls": False, "data_dir": tmp_path / "cpm", **options})
    async with trio.open_nursery() as nursery:
        with trio.fail_after(TIMEOUT):
            addresses = await nursery.start(run_manager, config)
        # A second connection to the same file, as the CLI would open it.
        admin = Registry(config.registry_path)
        try:
            admin.create_space("demo")
            token = admin.create_api_token("demo", "tests")
            yield Running(f"http://{addresses[0]}", config, token, admin)
        finally:
            admin.close()
            nursery.cancel_scope.cancel()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_version_is_public(tmp_path: Path) -> None:
    async with manager(tmp_path) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        response = await client.get("/api/v1/version")
        assert response.status_code == 200
        body = response.json()
        assert body["service"] == "@scramjet/manager"
        assert body["apiVersion"] == "v1"
        assert body["version"] == __version__
        assert set(body) == {"service", "apiVersion", "version", "build"}  # exactly the original's
        status = (await client.get("/api/v1/status")).json()
        assert status["product"] == "spacehub" and status["id"].startswith("cpm-")


async def test_spaces_lists_what_the_token_opens(tmp_path: Path) -> None:
    async with manager(tmp_path) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        m.registry.create_space("other")
        response = await client.get("/api/v1/spaces", headers=auth(m.token))
        assert response.status_code == 200
        assert [space["id"] for space in response.json()] == ["demo"]
        denied = await client.get("/api/v1/spaces")
        assert denied.status_code == 403
        assert denied.json() == {"message": "Forbidden"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer shk_wrong"}, {"Authorization": "Basic x"}])
async def test_space_api_forbidden_without_a_valid_token(tmp_path: Path, headers: dict[str, str]) -> None:
    async with manager(tmp_path) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        for path in ("version", "list", "sth/sth-x/info", "sth/sth-x/api/v1/version", "no-such-route"):
            response = await client.get(f"/api/v1/space/demo/api/v1/{path}", headers=headers)
            assert response.status_code == 403, path
            assert response.json() == {"message": "Forbidden"}


async def test_token_of_another_space_is_forbidden(tmp_path: Path) -> None:
    async with manager(tmp_path) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        m.registry.create_space("other")
        response = await client.get("/api/v1/space/other/api/v1/list", headers=auth(m.token))
        assert response.status_code == 403
        response = await client.get("/api/v1/space/missing/api/v1/list", headers=auth(m.token))
        assert response.status_code == 403


async def test_revoked_token_is_forbidden_at_once(tmp_path: Path) -> None:
    async with manager(tmp_path) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        base = "/api/v1/space/demo/api/v1"
        assert (await client.get(f"{base}/version", headers=auth(m.token))).status_code == 200
        m.registry.revoke_api_token("demo", m.token)
        assert (await client.get(f"{base}/version", headers=auth(m.token))).status_code == 403


async def test_space_routes_with_no_hubs(tmp_path: Path) -> None:
    async with manager(tmp_path) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        base = "/api/v1/space/demo/api/v1"
        headers = auth(m.token)
        assert (await client.get(f"{base}/list", headers=headers)).json() == []
        for kind in ("sequences", "instances", "topics"):
            assert (await client.get(f"{base}/{kind}", headers=headers)).json() == []
        version = (await client.get(f"{base}/version", headers=headers)).json()
        assert version["service"] == "@scramjet/manager"
        load = (await client.get(f"{base}/load", headers=headers)).json()
        assert {"avgLoad", "currentLoad", "memFree", "memUsed", "fsSize"} <= set(load)


async def test_unknown_hub_and_route(tmp_path: Path) -> None:
    async with manager(tmp_path) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        base = "/api/v1/space/demo/api/v1"
        headers = auth(m.token)
        info = await client.get(f"{base}/sth/sth-nope/info", headers=headers)
        assert info.status_code == 404
        assert "error" in info.json()
        proxied = await client.get(f"{base}/sth/sth-nope/api/v1/version", headers=headers)
        assert proxied.status_code == 404
        missing = await client.get(f"{base}/no-such-route", headers=headers)
        assert missing.status_code == 404
        assert (await client.get("/api/v1/nothing")).status_code == 404


async def test_ca_pem_absent_without_tls(tmp_path: Path) -> None:
    async with manager(tmp_path) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        assert (await client.get("/api/v1/ca.pem")).status_code == 404


def test_plain_http_only_on_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(None, {"tls": False, "hostname": "0.0.0.0", "data_dir": tmp_path})
    assert not load_config(None, {"tls": False, "hostname": "::1", "data_dir": tmp_path}).tls


def test_replica_options(tmp_path: Path) -> None:
    url = "postgresql://spacehub@db.example/spacehub"
    config = load_config(
        None, {"registry": url, "advertise_url": "https://cpm1.example:9000/", "data_dir": tmp_path}
    )
    assert config.registry_location == url and config.advertise_url == "https://cpm1.example:9000"
    assert load_config(None, {"data_dir": tmp_path}).registry_location == str(tmp_path / "registry.sqlite3")
    with pytest.raises(ConfigError, match="postgresql://"):
        load_config(None, {"registry": "mysql://x/y", "data_dir": tmp_path})
    with pytest.raises(ConfigError, match="advertise_url"):
        load_config(None, {"registry": url, "advertise_url": "cpm1:9000", "data_dir": tmp_path})
    # Listening on every address, a replica cannot guess how its peers reach it.
    with pytest.raises(ConfigError, match="advertise"):
        load_config(None, {"registry": url, "hostname": "0.0.0.0", "data_dir": tmp_path})
    assert (
        load_config(
            None,
            {
                "registry": url,
                "hostname": "0.0.0.0",
                "public_url": "https://space.example:9000",
                "data_dir": tmp_path,
            },
        ).advertise_url
        is None
    )


# -- the link, spoken by a minimal hub over a real websocket ---------------------------------------
#
# The hub here is the shared link shell (LinkSession + serve_asgi) with a tiny ASGI app, so these
# tests pin the manager's side of docs/link.md without needing agent/link.

FAST = {"heartbeat_interval": 0.2, "missed_heartbeats": 3, "ping_interval": 0.2, "pong_timeout": 0.5}


#: /api/v1/hold calls that saw their client leave (the manager reset their stream)
HELD_CALLS_LEFT: list[str] = []
#: bytes /api/v1/big answers with (over the manager's quick-answer size)
BIG_ANSWER = bytes(range(256)) * 800


async def tiny_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """/api/v1/version, /api/v1/echo (POST body back), /api/v1/output (endless bytes),
    /api/v1/hold?tag (never answers; records the client leaving), /api/v1/late (answers
    after 0.6 s), /api/v1/big (BIG_ANSWER)."""
    path = scope["path"]
    if path == "/api/v1/hold":
        while (await receive())["type"] != "http.disconnect":
            pass
        HELD_CALLS_LEFT.append(scope["query_string"].decode())
        return
    if path == "/api/v1/late":
        await trio.sleep(0.6)
    if path == "/api/v1/big":
        headers = [(b"content-length", str(len(BIG_ANSWER)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BIG_ANSWER, "more_body": False})
        return
    if path == "/api/v1/output":
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        chunk = b"x" * 16384
        while True:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    if path == "/api/v1/echo":
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(parts)
    else:
        head = {"service": "@scramjet/host", "path": path, "query": scope["query_string"].decode()}
        body = json.dumps(head).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


SUMMARY: dict[str, list[dict[str, Any]]] = {
    "sequences": [{"id": "seq-1", "config": {}, "instances": ["inst-1"]}],
    "instances": [{"id": "inst-1", "sequence": "seq-1", "status": "running"}],
    "topics": [{"name": "names", "contentType": "text/plain"}],
}


@dataclass
class Hello:
    answer: dict[str, Any]
    transport: WebsocketsTransport
    connection: LinkConnection


@asynccontextmanager
async def dial(url: str, make: Any) -> AsyncIterator[Hello]:
    """Open /api/v1/link, read the challenge, send ``make(nonce)``, read the answer."""
    async with connect(url.replace("http://", "ws://") + "/api/v1/link") as websocket:
        transport = WebsocketsTransport(websocket)
        connection = LinkConnection("hub")
        with trio.fail_after(TIMEOUT):
            (challenge,) = connection.receive_message(await transport.receive())
            assert isinstance(challenge, ControlReceived)
            assert challenge.message["type"] == "challenge"
            await transport.send(connection.send_control(make(challenge.message["nonce"])))
            (answer,) = connection.receive_message(await transport.receive())
            assert isinstance(answer, ControlReceived)
        yield Hello(answer.message, transport, connection)


def _sign(key: Ed25519PrivateKey, nonce_b64: str, hub_id: str, space: str) -> str:
    payload = challenge_payload(base64.b64decode(nonce_b64), hub_id, space)
    return base64.b64encode(sign_challenge(key, payload)).decode()


def _public(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(public_key_bytes(key)).decode()


def join(key: Ed25519PrivateKey, token: str, space: str = "demo") -> Any:
    def make(nonce: str) -> dict[str, Any]:
        return {
            "type": "join",
            "space": space,
            "joinToken": token,
            "publicKey": _public(key),
            "signature": _sign(key, nonce, "", space),
            "description": "test hub",
            "tags": ["a"],
            "version": "test",
        }

    return make


def authenticate(key: Ed25519PrivateKey, hub_id: str, space: str = "demo") -> Any:
    def make(nonce: str) -> dict[str, Any]:
        return {
            "type": "auth",
            "space": space,
            "hubId": hub_id,
            "signature": _sign(key, nonce, hub_id, space),
        }

    return make


@asynccontextmanager
async def hub_session(
    hello: Hello,
    *,
    heartbeats: bool = True,
    pongs: bool = True,
    on_control: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> AsyncIterator[LinkSession]:
    """Run the hub's side after ``welcome``: serve streams with tiny_app, heartbeat, answer pings
    (``pongs``), and hand every control message to ``on_control`` too."""
    session: LinkSession | None = None

    async def handle(message: dict[str, Any]) -> None:
        if on_control is not None:
            await on_control(message)
        if message["type"] == "ping" and pongs and session is not None:
            await session.send_control({"type": "pong", "nonce": message["nonce"]})

    session = LinkSession(
        hello.connection,
        hello.transport,
        on_stream=partial(serve_asgi, app=tiny_app),
        on_control=handle,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)

        async def beat() -> None:
            while heartbeats:
                load = {"avgLoad": 0.1, "currentLoad": 1, "memFree": 1, "memUsed": 1, "fsSize": []}
                heartbeat = {"type": "heartbeat", "load": load, "summary": SUMMARY, "sentAt": 0}
                await session.send_control(heartbeat)
                await trio.sleep(FAST["heartbeat_interval"])

        nursery.start_soon(beat)
        yield session
        nursery.cancel_scope.cancel()


async def wait_for(check: Any, timeout: float = TIMEOUT) -> None:
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.05)


async def hub_record(client: httpx.AsyncClient, token: str, hub_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/space/demo/api/v1/sth/{hub_id}/info", headers=auth(token))
    assert response.status_code == 200
    record: dict[str, Any] = response.json()
    return record


async def test_join_heartbeat_proxy_and_aggregates(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    async with manager(tmp_path, **FAST) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        base = "/api/v1/space/demo/api/v1"
        headers = auth(m.token)
        token = m.registry.create_join_token("demo", 60)
        async with dial(m.url, join(key, token)) as hello:
            assert hello.answer["type"] == "welcome"
            hub_id = hello.answer["hubId"]
            assert hello.answer["space"] == "demo"
            assert hello.answer["heartbeatInterval"] == FAST["heartbeat_interval"]
            async with hub_session(hello):

                async def listed_healthy() -> bool:
                    hubs = (await client.get(f"{base}/list", headers=headers)).json()
                    return bool(hubs) and hubs[0]["healthy"] and hubs[0]["load"] is not None

                await wait_for(listed_healthy)
                record = await hub_record(client, m.token, hub_id)
                assert record["isConnectionActive"] is True
                assert record["description"] == "test hub"
                assert record["tags"] == ["a"]
                assert "lastConnected" in record["info"]
                assert record["load"] == {
                    "avgLoad": 0.1,
                    "currentLoad": 1,
                    "memFree": 1,
                    "memUsed": 1,
                    "fsSize": [],
                }

                response = await client.get(f"{base}/sth/{hub_id}/api/v1/version?x=1", headers=headers)
                assert response.status_code == 200
                assert response.json() == {
                    "service": "@scramjet/host",
                    "path": "/api/v1/version",
                    "query": "x=1",
                }
                payload = b"0123456789" * 100_000  # 1 MB: several windows' worth each way
                echoed = await client.post(
                    f"{base}/sth/{hub_id}/api/v1/echo", content=payload, headers=headers
                )
                assert echoed.content == payload

                # The seeds' shapes by default (the original's clients read these) ...
                sequences = (await client.get(f"{base}/sequences", headers=headers)).json()
                assert sequences == ["seq-1"]
                instances = (await client.get(f"{base}/instances", headers=headers)).json()
                assert instances == [[["inst-1"]]]
                # ... and whole items naming their hub with ?detail=true.
                sequences = (await client.get(f"{base}/sequences?detail=true", headers=headers)).json()
                assert sequences == [{**SUMMARY["sequences"][0], "hub": hub_id}]
                topics = (await client.get(f"{base}/topics", headers=headers)).json()
                # One entry per topic of the Space, naming what each hub reported of it.
                assert [(t["name"], t["contentType"]) for t in topics] == [("names", "text/plain")]
                assert topics[0]["hubs"] == {hub_id: {"providers": [], "consumers": [], "spoolBacklog": 0}}
                instances = (await client.get(f"{base}/instances?detail=1", headers=headers)).json()
                assert instances == [{**SUMMARY["instances"][0], "hub": hub_id}]

        # The link is gone: the hub shows disconnected, its instances as unknown.
        async def disconnected() -> bool:
            return not (await hub_record(client, m.token, hub_id))["isConnectionActive"]

        await wait_for(disconnected)
        record = await hub_record(client, m.token, hub_id)
        assert record["healthy"] is False
        assert "lastDisconnected" in record["info"]
        instances = (await client.get(f"{base}/instances?detail=true", headers=headers)).json()
        assert instances == [{**SUMMARY["instances"][0], "hub": hub_id, "status": "unknown"}]
        assert (await client.get(f"{base}/sequences", headers=headers)).json() == []
        proxied = await client.get(f"{base}/sth/{hub_id}/api/v1/version", headers=headers)
        assert proxied.status_code == 503
        assert proxied.json() == {"error": f"Hub {hub_id} is not connected"}

        # Later connections authenticate with the key; the join token is spent.
        async with dial(m.url, authenticate(key, hub_id)) as hello:
            assert hello.answer == {**hello.answer, "type": "welcome", "hubId": hub_id}
        async with dial(m.url, join(Ed25519PrivateKey.generate(), token)) as hello:
            assert hello.answer["type"] == "refused"
            assert hello.answer["code"] == "token-used"
            assert hello.answer["retry"] is False


async def test_refusals(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    async with manager(tmp_path) as m:
        expired = m.registry.create_join_token("demo", 0.01)
        await trio.sleep(0.05)
        cases = [
            (join(key, expired), "token-expired"),
            (join(key, "shj_nope"), "token-unknown"),
            (join(key, m.registry.create_join_token("demo", 60), space="nowhere"), "space-unknown"),
            (authenticate(key, "sth-unknown"), "hub-unknown"),
        ]
        for make, code in cases:
            async with dial(m.url, make) as hello:
                assert hello.answer["type"] == "refused"
                assert hello.answer["code"] == code
        # A signature by another key than the one offered.
        token = m.registry.create_join_token("demo", 60)

        def forged(nonce: str) -> dict[str, Any]:
            return {**join(key, token)(nonce), "publicKey": _public(Ed25519PrivateKey.generate())}

        async with dial(m.url, forged) as hello:
            assert hello.answer["code"] == "bad-signature"
        # ... and the token was not spent by the forgery.
        async with dial(m.url, join(key, token)) as hello:
            assert hello.answer["type"] == "welcome"
            hub_id = hello.answer["hubId"]
        async with dial(m.url, authenticate(Ed25519PrivateKey.generate(), hub_id)) as hello:
            assert hello.answer["code"] == "bad-signature"


async def test_revoked_hub_is_cut_off_and_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    async with manager(tmp_path) as m:
        token = m.registry.create_join_token("demo", 60)
        async with dial(m.url, join(key, token)) as hello:
            hub_id = hello.answer["hubId"]
            m.registry.revoke_hub(hub_id, "stolen laptop")
            with trio.fail_after(TIMEOUT):
                while True:  # pings may come first
                    (notice,) = hello.connection.receive_message(await hello.transport.receive())
                    assert isinstance(notice, ControlReceived)
                    if notice.message["type"] != "ping":
                        break
            assert notice.message == {"type": "revoked", "reason": "stolen laptop"}
            with trio.fail_after(TIMEOUT), pytest.raises(LinkClosed):
                await hello.transport.receive()
        async with dial(m.url, authenticate(key, hub_id)) as hello:
            assert hello.answer["code"] == "hub-revoked"


async def test_missed_heartbeats_make_a_hub_unhealthy_and_silence_closes_it(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    async with manager(tmp_path, **FAST) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        async with dial(m.url, join(key, m.registry.create_join_token("demo", 60))) as hello:
            hub_id = hello.answer["hubId"]
            async with hub_session(hello, heartbeats=False):
                # An older hub: no heartbeats, but it answers pings, so the link stays up.

                async def unhealthy_but_connected() -> bool:
                    record = await hub_record(client, m.token, hub_id)
                    return record["isConnectionActive"] and not record["healthy"]

                await wait_for(unhealthy_but_connected)
        async with (
            dial(m.url, authenticate(key, hub_id)) as hello,
            hub_session(hello, heartbeats=False, pongs=False) as session,
        ):
            with trio.fail_after(TIMEOUT):
                while not session.closed:
                    await trio.sleep(0.05)


async def test_batches_are_agreed_in_the_handshake(tmp_path: Path) -> None:
    """The welcome says the manager reads BATCH; a hub that says so too gets its calls batched."""

    class Recording:
        """The hub's transport, noting the type byte of every message that comes in."""

        def __init__(self, inner: WebsocketsTransport) -> None:
            self.inner = inner
            self.types: list[int] = []

        async def send(self, message: bytes) -> None:
            await self.inner.send(message)

        async def receive(self) -> bytes:
            message = await self.inner.receive()
            self.types.append(message[0])
            return message

        async def aclose(self) -> None:
            await self.inner.aclose()

    async with manager(tmp_path, **FAST) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        for says in (True, False):
            key = Ed25519PrivateKey.generate()
            make = join(key, m.registry.create_join_token("demo", 60))
            hello_of = (lambda nonce, make=make: {**make(nonce), "linkFeatures": ["batch"]}) if says else make
            async with dial(m.url, hello_of) as hello:
                assert hello.answer["linkFeatures"] == ["batch"]
                recording = Recording(hello.transport)
                recorded = Hello(hello.answer, cast(WebsocketsTransport, recording), hello.connection)
                async with hub_session(recorded) as session:
                    session.batching = says
                    hub_id = hello.answer["hubId"]
                    response = await client.get(
                        f"/api/v1/space/demo/api/v1/sth/{hub_id}/api/v1/version", headers=auth(m.token)
                    )
                    assert response.status_code == 200
                    assert response.json()["path"] == "/api/v1/version"
                    streams = [t for t in recording.types if t != FrameType.CONTROL]
                    assert streams == ([FrameType.BATCH] if says else [FrameType.OPEN, FrameType.END])


async def test_heartbeats_alone_keep_a_link_up(tmp_path: Path) -> None:
    """The welcome asks for no pongs: a hub that heartbeats and never answers a ping stays linked."""
    key = Ed25519PrivateKey.generate()
    pings = 0

    async def count(message: dict[str, Any]) -> None:
        nonlocal pings
        pings += message["type"] == "ping"

    async with (
        manager(tmp_path, **FAST) as m,
        httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client,
        dial(m.url, join(key, m.registry.create_join_token("demo", 60))) as hello,
    ):
        assert hello.answer["answerPings"] is False
        async with hub_session(hello, pongs=False, on_control=count) as session:
            limit = FAST["heartbeat_interval"] + FAST["pong_timeout"]
            await trio.sleep(5 * limit)
            assert not session.closed
            assert pings >= 5 * limit / FAST["ping_interval"] - 2  # the manager kept pinging
            record = await hub_record(client, m.token, hello.answer["hubId"])
            assert record["isConnectionActive"] and record["healthy"]


async def test_a_stalled_reader_holds_back_only_its_stream(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    async with manager(tmp_path, **FAST) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        base = "/api/v1/space/demo/api/v1"
        headers = auth(m.token)
        async with dial(m.url, join(key, m.registry.create_join_token("demo", 60))) as hello:
            hub_id = hello.answer["hubId"]
            async with (
                hub_session(hello),
                client.stream("GET", f"{base}/sth/{hub_id}/api/v1/output", headers=headers) as output,
            ):
                assert output.status_code == 200
                chunks = output.aiter_raw()
                assert await chunks.__anext__()
                # Stop reading /output; everything else keeps flowing.
                await trio.sleep(1.0)
                for _ in range(5):
                    response = await client.get(f"{base}/sth/{hub_id}/api/v1/version", headers=headers)
                    assert response.status_code == 200
                record = await hub_record(client, m.token, hub_id)
                assert record["healthy"] is True
                assert record["isConnectionActive"] is True


async def test_answers_short_late_and_large_come_through_whole(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    async with manager(tmp_path, **FAST) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        base = "/api/v1/space/demo/api/v1"
        async with dial(m.url, join(key, m.registry.create_join_token("demo", 60))) as hello:
            hub = f"{base}/sth/{hello.answer['hubId']}/api/v1"
            async with hub_session(hello):
                short = await client.get(f"{hub}/version?a=1", headers=auth(m.token))
                assert short.status_code == 200 and short.json()["query"] == "a=1"
                assert short.headers["content-length"] == str(len(short.content))
                # Past the quick path's wait (QUICK_ANSWER_SECONDS): the watched path answers it.
                late = await client.get(f"{hub}/late", headers=auth(m.token))
                assert late.status_code == 200 and late.json()["path"] == "/api/v1/late"
                # Over QUICK_ANSWER_BYTES: streamed, not taken whole.
                big = await client.get(f"{hub}/big", headers=auth(m.token))
                assert big.status_code == 200 and big.content == BIG_ANSWER


def test_a_quick_answer_never_waits_for_credit() -> None:
    # whole_body takes no credit back: over a window, the hub would wait for it until the deadline.
    assert QUICK_ANSWER_BYTES < INITIAL_WINDOW


@pytest.mark.parametrize("leave_after", [0.05, 0.6])
async def test_a_client_leaving_a_call_the_hub_holds_resets_its_stream(
    tmp_path: Path, leave_after: float
) -> None:
    # 0.05 s: inside the proxy's quick path, which watches no client; 0.6 s: after it.
    key = Ed25519PrivateKey.generate()
    tag = f"left-{leave_after}"
    async with manager(tmp_path, **FAST) as m, httpx.AsyncClient(base_url=m.url, timeout=TIMEOUT) as client:
        base = "/api/v1/space/demo/api/v1"
        async with dial(m.url, join(key, m.registry.create_join_token("demo", 60))) as hello:
            hub = f"{base}/sth/{hello.answer['hubId']}/api/v1"
            async with hub_session(hello):
                with trio.move_on_after(leave_after) as waited:
                    await client.get(f"{hub}/hold?{tag}", headers=auth(m.token))
                assert waited.cancelled_caught  # the hub never answers

                async def seen() -> bool:
                    return tag in HELD_CALLS_LEFT

                await wait_for(seen, timeout=5)


async def test_a_hub_report_keeps_heartbeats_compact() -> None:
    # Thousands of idle hubs: the load is kept as JSON, an empty summary as one shared mapping.
    a, b = HubReport("sth-1", "demo"), HubReport("sth-2", "demo")
    load = {"avgLoad": 0.5, "fsSize": [{"fs": "/dev/sda1", "use": 40.0}]}
    for report in (a, b):
        report.heartbeat(Heartbeat(load, {"sequences": [], "topics": []}))
    assert a.load == load
    assert a.summary_items is b.summary_items
    assert a.items("instances") == []
    a.heartbeat(Heartbeat(summary={"instances": [{"id": "i"}, "junk"], "topics": "junk"}))
    assert a.items("instances") == [{"id": "i"}]
    assert a.items("topics") == []
    assert a.load == load  # a heartbeat without a load keeps the last one


async def test_ended_links_are_not_pinned_by_the_ping_schedule(tmp_path: Path) -> None:
    """A reconnect storm: each ended link's ping entry would pin its connection for a ping interval."""
    key = Ed25519PrivateKey.generate()
    async with manager(tmp_path) as m:
        async with dial(m.url, join(key, m.registry.create_join_token("demo"))) as hello:
            hub_id = hello.answer["hubId"]
        for _ in range(MAX_STALE_DUE + 16):
            async with dial(m.url, authenticate(key, hub_id)) as hello, hub_session(hello):
                assert hello.answer["type"] == "welcome"
        # Well inside the 10 s ping interval, after which the entries would run out anyway.
        with trio.fail_after(3):
            while True:  # the last link's end is seen a moment after the client leaves
                gc.collect()
                # type(), not isinstance(): isinstance on a dead weakref proxy raises ReferenceError.
                alive = sum(1 for o in gc.get_objects() if type(o) is HubSession)
                if alive <= MAX_STALE_DUE:
                    break
                await trio.sleep(0.05)
        assert alive <= MAX_STALE_DUE  # not all MAX_STALE_DUE + 17 until their pings come due


async def test_pings_coming_due_together_go_out_in_one_wakeup(autojump_clock: trio.testing.MockClock) -> None:
    """Links whose pings fall due within PING_BATCH_FRACTION of an interval share one pass of
    the scheduler (a few wakeups a second at 5,000 links); none goes out later than that."""
    config = ManagerConfig(ping_interval=10.0, heartbeat_interval=10.0, pong_timeout=10.0)
    sessions = HubSessions(cast(Registry, None), config, "manager-1")  # the pinger never reads the registry
    slack = config.ping_interval * PING_BATCH_FRACTION
    sent: list[tuple[float, str]] = []

    def fake_hub(hub_id: str) -> HubSession:
        async def receive() -> dict[str, Any]:
            await trio.sleep_forever()
            raise AssertionError

        async def send(message: dict[str, Any], hub_id: str = hub_id) -> None:
            sent.append((trio.current_time(), hub_id))

        transport = AsgiWebSocketTransport(receive, send)
        session = HubSession(hub_id, "demo", transport, trio.current_time(), HubReport(hub_id, "demo"))
        session.link = LinkSession(LinkConnection("manager"), transport)
        sessions._live[hub_id] = session
        return session

    async with trio.open_nursery() as nursery:
        await nursery.start(sessions._run_pings)
        start = trio.current_time()
        offsets = {"a": 0.0, "b": slack / 3, "c": slack * 2 / 3, "d": slack * 3}
        for hub_id, offset in offsets.items():
            fake_hub(hub_id).transport.last_received = math.inf  # heard from "just now", always
            sessions._schedule(sessions._live[hub_id], start + 1 + offset)
        await trio.sleep(config.ping_interval / 2)
        nursery.cancel_scope.cancel()
    times = {hub_id: when - start for when, hub_id in sent}
    assert sorted(times) == ["a", "b", "c", "d"]  # one ping each so far
    assert times["a"] == times["b"] == times["c"]  # one wakeup for the three
    for hub_id, offset in offsets.items():
        assert 1 + offset <= times[hub_id] <= 1 + offset + slack
    assert times["d"] > times["a"]  # beyond the window: a wakeup of its own
