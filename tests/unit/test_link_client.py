"""The hub's link client against a fake manager.

Rules for these tests: the fake manager is ``websockets.trio.server.serve`` on
127.0.0.1 port 0 speaking just the challenge/join/auth/welcome/refused/ping part of
docs/link.md (no ``cpm`` code but its TLS helpers); the client's tunables are
shrunk so that backoff and heartbeats take milliseconds; every wait is bounded by
``trio.fail_after``; conditions are polled with short sleeps (real sockets rule
out the autojump clock).
"""

from __future__ import annotations

import base64
import errno
import itertools
import json
import stat
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.trio.server import ServerConnection, serve

from agent.config import ConfigError, HubConfig, load_config
from agent.link.client import LinkClient, backoff_delay, describe_error, is_unreachable
from agent.link.state import LinkState
from cpm.tls import ca_fingerprint, ensure_ca_and_server_cert, server_ssl_context
from spacehub.protocol.auth import challenge_payload, make_challenge, verify_challenge
from spacehub.protocol.link import ControlReceived, LinkConnection
from spacehub.server.link import LinkSession, StreamAborted, WebsocketsTransport

SPACE = "main"
TOKEN = "shj_test_token"


@dataclass
class FakeManager:
    """Just enough of a manager: challenge, join/auth, welcome/refused, ping, heartbeats."""

    tokens: set[str] = field(default_factory=lambda: {TOKEN})
    keys: dict[str, bytes] = field(default_factory=dict)
    #: every join/auth message received, with whether its signature verified
    hellos: list[tuple[dict[str, Any], bool]] = field(default_factory=list)
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    pongs: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[LinkSession] = field(default_factory=list)
    refuse: dict[str, Any] | None = None
    #: more keys for the welcome (e.g. pingInterval, pongTimeout)
    welcome_extra: dict[str, Any] = field(default_factory=dict)
    #: send a ping this often (seconds); None: never
    ping_every: float | None = None
    ca_pem: bytes = b""
    port: int = 0

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/api/v1/ca.pem":
            return Response(200, "OK", Headers({"content-type": "application/x-pem-file"}), self.ca_pem)
        assert request.path == "/api/v1/link"
        return None

    async def handler(self, websocket: ServerConnection) -> None:
        transport = WebsocketsTransport(websocket)  # type: ignore[arg-type]
        connection = LinkConnection("manager")
        nonce = make_challenge()
        challenge = {"type": "challenge", "nonce": base64.b64encode(nonce).decode(), "managerId": "m1"}
        await transport.send(connection.send_control(challenge))
        (event,) = connection.receive_message(await transport.receive())
        assert isinstance(event, ControlReceived)
        hello = event.message
        signature = base64.b64decode(hello["signature"])
        if hello["type"] == "join":
            key = base64.b64decode(hello["publicKey"])
            valid = verify_challenge(key, challenge_payload(nonce, "", hello["space"]), signature)
            hub_id = f"sth-fake{len(self.keys)}"
            known = hello["joinToken"] in self.tokens
            self.tokens.discard(hello["joinToken"])
        else:
            hub_id = hello["hubId"]
            key = self.keys.get(hub_id, b"")
            valid = verify_challenge(key, challenge_payload(nonce, hub_id, hello["space"]), signature)
            known = bool(key)
        self.hellos.append((hello, valid))
        if self.refuse is not None or not (valid and known):
            refusal = self.refuse or {"code": "bad-signature", "reason": "no", "retry": False}
            await transport.send(connection.send_control({"type": "refused", **refusal}))
            await websocket.aclose(4403, "refused")
            return
        self.keys[hub_id] = key
        welcome = {"type": "welcome", "hubId": hub_id, "space": hello["space"], **self.welcome_extra}
        await transport.send(connection.send_control(welcome))

        async def on_control(message: dict[str, Any]) -> None:
            if message["type"] == "heartbeat":
                self.heartbeats.append(message)
            elif message["type"] == "pong":
                self.pongs.append(message)

        session = LinkSession(connection, transport, on_control=on_control)
        self.sessions.append(session)
        async with trio.open_nursery() as nursery:
            if self.ping_every is not None:
                nursery.start_soon(self._ping, session, self.ping_every)
            await session.run()
            nursery.cancel_scope.cancel()

    async def _ping(self, session: LinkSession, every: float) -> None:
        for nonce in itertools.count():
            await trio.sleep(every)
            await session.send_control({"type": "ping", "nonce": nonce})


@asynccontextmanager
async def fake_manager(
    manager: FakeManager | None = None, *, port: int = 0, tls_dir: Path | None = None
) -> AsyncIterator[FakeManager]:
    manager = manager or FakeManager()
    context = None
    if tls_dir is not None:
        files = ensure_ca_and_server_cert(tls_dir, ["localhost"], ["127.0.0.1"])
        context = server_ssl_context(files)
        manager.ca_pem = files.ca_cert.read_bytes()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                serve,
                manager.handler,
                port,
                host="127.0.0.1",
                ssl=context,
                process_request=manager.process_request,
                compression=None,
            )
        )
        manager.port = server.listeners[0].socket.getsockname()[1]
        yield manager
        nursery.cancel_scope.cancel()


async def tiny_app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Any],
    send: Callable[[MutableMapping[str, Any]], Any],
) -> None:
    body = json.dumps({"path": scope["path"], "method": scope["method"]}).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


def make_client(tmp_path: Path, url: str, **config: Any) -> LinkClient:
    options: dict[str, Any] = {"join_token": TOKEN, **config}
    hub_config = HubConfig(data_dir=tmp_path / "hub", cpm_url=url, space=SPACE, **options)
    return LinkClient(
        hub_config,
        tiny_app,
        load=lambda: {"avgLoad": 0.5, "memFree": 1},
        summary=lambda: {"sequences": [{"id": "s1"}], "instances": [], "topics": []},
        backoff_base=0.05,
        backoff_cap=0.2,
        heartbeat_interval=0.1,
        open_timeout=2,
        auth_timeout=2,
    )


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.01)


async def test_join_persists_identity_then_auth_signs_the_challenge(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with fake_manager() as manager, trio.open_nursery() as nursery:
            client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
            await nursery.start(client.run)
            await until(lambda: client.status()["connected"])
            ((join, valid),) = manager.hellos
            assert join["type"] == "join" and valid and join["joinToken"] == TOKEN
            assert join["space"] == SPACE and join["version"]
            hub_dir = tmp_path / "hub"
            for name in ("hub.key", "link.json"):
                assert stat.S_IMODE((hub_dir / name).stat().st_mode) == 0o600
            record = json.loads((hub_dir / "link.json").read_text())
            assert record == {"hubId": "sth-fake0", "space": SPACE, "cpmUrl": client.status()["cpmUrl"]}
            status = client.status()
            assert status["hubId"] == "sth-fake0" and status["state"] == "connected"
            assert status["lastConnected"] and status["lastError"] is None
            assert TOKEN not in json.dumps(status)

            # The manager drops the link: the hub comes back with auth, not the token.
            manager.sessions[0].close()
            await until(lambda: len(manager.hellos) == 2 and client.status()["connected"])
            auth, valid = manager.hellos[1]
            assert auth["type"] == "auth" and valid and auth["hubId"] == "sth-fake0"
            assert "joinToken" not in auth
            assert client.status()["lastDisconnected"]
            nursery.cancel_scope.cancel()


async def test_a_restarted_hub_uses_auth(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with fake_manager() as manager:
            for _ in range(2):
                async with trio.open_nursery() as nursery:
                    client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
                    await nursery.start(client.run)
                    await until(partial(lambda c: c.status()["connected"], client))
                    nursery.cancel_scope.cancel()
    assert [(hello["type"], valid) for hello, valid in manager.hellos] == [("join", True), ("auth", True)]


async def test_refused_without_retry_stops(tmp_path: Path) -> None:
    manager = FakeManager(refuse={"code": "token-unknown", "reason": "no such token", "retry": False})
    with trio.fail_after(10):
        async with fake_manager(manager), trio.open_nursery() as nursery:
            client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
            await nursery.start(client.run)
            await until(lambda: client.state is LinkState.REFUSED)
            await trio.sleep(0.5)  # more than the whole backoff range
            assert len(manager.hellos) == 1
            status = client.status()
            assert status["state"] == "refused" and not status["connected"]
            assert "no such token" in status["lastError"]
            nursery.cancel_scope.cancel()


async def test_refused_with_retry_backs_off_and_tries_again(tmp_path: Path) -> None:
    manager = FakeManager(refuse={"code": "busy", "reason": "later", "retry": True})
    with trio.fail_after(10):
        async with fake_manager(manager), trio.open_nursery() as nursery:
            client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
            await nursery.start(client.run)
            await until(lambda: len(manager.hellos) >= 3)
            assert client.state is not LinkState.REFUSED
            nursery.cancel_scope.cancel()


async def test_not_joined_and_no_token_is_refused_at_once(tmp_path: Path) -> None:
    client = make_client(tmp_path, "ws://127.0.0.1:9", join_token="")
    with trio.fail_after(5):
        await client.run()
    assert client.state is LinkState.REFUSED
    assert "no --join-token" in client.status()["lastError"]


async def test_revoked_stops_retrying(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with fake_manager() as manager, trio.open_nursery() as nursery:
            client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
            await nursery.start(client.run)
            await until(lambda: bool(manager.sessions))
            await manager.sessions[0].send_control({"type": "revoked", "reason": "decommissioned"})
            await until(lambda: client.state is LinkState.REFUSED)
            await trio.sleep(0.3)
            assert len(manager.hellos) == 1
            assert "decommissioned" in client.status()["lastError"]
            nursery.cancel_scope.cancel()


async def test_manager_restart_reconnects_within_backoff(tmp_path: Path) -> None:
    manager = FakeManager()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with fake_manager(manager):
                client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
                await nursery.start(client.run)
                await until(lambda: client.status()["connected"])
            port = manager.port
            await until(lambda: not client.status()["connected"])
            assert client.state in (LinkState.BACKOFF, LinkState.CONNECTING)
            await trio.sleep(0.3)  # a few failed attempts: connection refused
            assert client.status()["lastError"]
            async with fake_manager(manager, port=port):
                restarted = trio.current_time()
                await until(lambda: client.status()["connected"])
                # Backoff is capped at 0.2 s here; allow for the dial itself.
                assert trio.current_time() - restarted < 1.0
            nursery.cancel_scope.cancel()
    assert [hello["type"] for hello, _ in manager.hellos] == ["join", "auth"]


async def test_heartbeats_carry_load_and_summary(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with fake_manager() as manager, trio.open_nursery() as nursery:
            client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
            await nursery.start(client.run)
            await until(lambda: len(manager.heartbeats) >= 3)
            beat = manager.heartbeats[0]
            assert beat["load"] == {"avgLoad": 0.5, "memFree": 1}
            assert beat["summary"] == {"sequences": [{"id": "s1"}], "instances": [], "topics": []}
            assert isinstance(beat["sentAt"], int)
            sent = [beat["sentAt"] for beat in manager.heartbeats]
            gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
            assert all(60 <= gap <= 300 for gap in gaps), gaps  # 100 ms ± 10 %, with slack
            nursery.cancel_scope.cancel()


async def test_ping_is_answered(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with fake_manager() as manager, trio.open_nursery() as nursery:
            client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
            await nursery.start(client.run)
            await until(lambda: bool(manager.sessions))
            await manager.sessions[0].send_control({"type": "ping", "nonce": 42})
            await until(lambda: bool(manager.pongs))
            assert manager.pongs == [{"type": "pong", "nonce": 42}]
            nursery.cancel_scope.cancel()


async def test_the_hub_says_it_reads_batches_and_batches_only_when_the_manager_does(tmp_path: Path) -> None:
    cases = (({"linkFeatures": ["batch"]}, True), ({}, False), ({"linkFeatures": "batch"}, False))
    for n, (extra, expected) in enumerate(cases):
        manager = FakeManager(welcome_extra=extra)
        (tmp_path / str(n)).mkdir()
        with trio.fail_after(10):
            async with fake_manager(manager), trio.open_nursery() as nursery:
                client = make_client(tmp_path / str(n), f"ws://127.0.0.1:{manager.port}")
                await nursery.start(client.run)
                await until(lambda c=client: bool(c.status()["connected"]))
                assert all(hello["linkFeatures"] == ["batch"] for hello, _ in manager.hellos)
                assert client._session is not None and client._session.batching is expected
                nursery.cancel_scope.cancel()


async def test_pings_go_unanswered_when_the_welcome_says_so(tmp_path: Path) -> None:
    """A manager that takes heartbeats as the hub's sign of life asks for no pongs."""
    manager = FakeManager(welcome_extra={"answerPings": False, "pingInterval": 0.3}, ping_every=0.1)
    with trio.fail_after(10):
        async with fake_manager(manager), trio.open_nursery() as nursery:
            client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
            await nursery.start(client.run)
            await until(lambda: client.status()["connected"])
            await trio.sleep(1.0)  # about ten pings
            assert manager.pongs == []
            assert client.status()["connected"] and client.connections == 1
            nursery.cancel_scope.cancel()


async def test_a_silent_manager_is_dropped_after_its_ping_interval_and_pong_deadline(tmp_path: Path) -> None:
    """The hub sends no websocket pings: silence from the manager is what tells a dead link."""
    manager = FakeManager(welcome_extra={"pingInterval": 0.3, "pongTimeout": 0.3})
    with trio.fail_after(10):
        async with fake_manager(manager), trio.open_nursery() as nursery:
            client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
            await nursery.start(client.run)
            await until(lambda: client.status()["connected"])
            linked = trio.current_time()
            await until(lambda: not client.status()["connected"])
            assert 0.5 <= trio.current_time() - linked < 3.0  # 0.6 s of silence, and not much later
            await until(lambda: client.connections >= 2)  # and it dials again
            nursery.cancel_scope.cancel()


async def test_a_pinging_manager_keeps_the_link(tmp_path: Path) -> None:
    manager = FakeManager(welcome_extra={"pingInterval": 0.3, "pongTimeout": 0.3}, ping_every=0.1)
    with trio.fail_after(10):
        async with fake_manager(manager), trio.open_nursery() as nursery:
            client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
            await nursery.start(client.run)
            await until(lambda: client.status()["connected"])
            await trio.sleep(1.5)  # five silence limits: only the pings keep it up
            assert client.status()["connected"]
            assert client.connections == 1
            assert len(manager.pongs) >= 10
            nursery.cancel_scope.cancel()


async def test_streams_reach_the_hub_app_and_other_targets_are_refused(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with fake_manager() as manager, trio.open_nursery() as nursery:
            client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
            await nursery.start(client.run)
            await until(lambda: bool(manager.sessions))
            session = manager.sessions[0]
            stream = await session.open_stream("GET", "/api/v1/version?x=1", [("accept", "application/json")])
            await stream.end()
            status, headers = await stream.response()
            assert status == 200 and ("content-type", "application/json") in headers
            body = b"".join([chunk async for chunk in stream.body()])
            assert json.loads(body) == {"path": "/api/v1/version", "method": "GET"}

            refused = await session.open_stream("GET", "/metrics", [])
            await refused.end()
            with pytest.raises(StreamAborted, match="target refused"):
                await refused.response()
            nursery.cancel_scope.cancel()


async def test_wss_with_the_managers_ca(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with fake_manager(tls_dir=tmp_path / "cpm") as manager, trio.open_nursery() as nursery:
            client = make_client(
                tmp_path, f"wss://127.0.0.1:{manager.port}", cpm_ca=str(tmp_path / "cpm" / "ca.pem")
            )
            await nursery.start(client.run)
            await until(lambda: client.status()["connected"])
            nursery.cancel_scope.cancel()


async def test_wss_with_the_ca_fetched_by_fingerprint(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with fake_manager(tls_dir=tmp_path / "cpm") as manager, trio.open_nursery() as nursery:
            fingerprint = ca_fingerprint(tmp_path / "cpm" / "ca.pem")
            client = make_client(tmp_path, f"wss://localhost:{manager.port}", cpm_fingerprint=fingerprint)
            await nursery.start(client.run)
            await until(lambda: client.status()["connected"])
            nursery.cancel_scope.cancel()


async def test_wss_with_a_wrong_fingerprint_does_not_connect(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with fake_manager(tls_dir=tmp_path / "cpm") as manager, trio.open_nursery() as nursery:
            client = make_client(tmp_path, f"wss://127.0.0.1:{manager.port}", cpm_fingerprint="AB" * 32)
            await nursery.start(client.run)
            await until(lambda: client.status()["lastError"] is not None)
            assert "does not match --cpm-fingerprint" in client.status()["lastError"]
            assert not manager.hellos
            nursery.cancel_scope.cancel()


async def test_wss_with_a_wrong_ca_fails_fast(tmp_path: Path) -> None:
    ensure_ca_and_server_cert(tmp_path / "other", ["localhost"], ["127.0.0.1"])
    async with fake_manager(tls_dir=tmp_path / "cpm") as manager, trio.open_nursery() as nursery:
        client = make_client(
            tmp_path, f"wss://127.0.0.1:{manager.port}", cpm_ca=str(tmp_path / "other" / "ca.pem")
        )
        with trio.fail_after(3):
            await nursery.start(client.run)
            await until(lambda: client.status()["lastError"] is not None)
        assert "certificate verify failed" in client.status()["lastError"]
        assert client.state in (LinkState.BACKOFF, LinkState.CONNECTING)
        assert not manager.hellos
        nursery.cancel_scope.cancel()


async def test_no_manager_configured_means_disabled(tmp_path: Path) -> None:
    client = LinkClient(HubConfig(data_dir=tmp_path), tiny_app)
    with trio.fail_after(1):
        await client.run()
    assert client.status()["state"] == "disabled"
    assert not (tmp_path / "hub.key").exists()


async def test_a_manager_down_for_long_does_not_grow_the_backoff(tmp_path: Path) -> None:
    """Connection refused (a restarting manager) is retried at the short cap and does not
    count as an attempt: with a 60 s cap, the hub is back within the short cap of the
    manager listening again, after however many refusals."""
    manager = FakeManager()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with fake_manager(manager):
                client = make_client(tmp_path, f"ws://127.0.0.1:{manager.port}")
                client.backoff_base, client.backoff_cap, client.unreachable_cap = 0.5, 60.0, 0.3
                await nursery.start(client.run)
                await until(lambda: client.status()["connected"])
            port = manager.port
            await trio.sleep(3)  # ten refusals and more: a growing backoff would be at 60 s by now
            assert client.status()["lastError"]
            assert client.status()["backoffAttempts"] <= 1  # the link's own end, at most
            async with fake_manager(manager, port=port):
                restarted = trio.current_time()
                await until(lambda: client.status()["connected"])
                assert trio.current_time() - restarted < 1.5
            nursery.cancel_scope.cancel()


def test_connection_refused_counts_as_unreachable() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    wrapped = OSError("all attempts to connect to 127.0.0.1:9 failed")
    wrapped.__cause__ = ExceptionGroup("dial", [refused])
    assert is_unreachable(refused) and is_unreachable(wrapped)
    assert not is_unreachable(OSError(errno.EACCES, "Permission denied"))


def test_backoff_is_full_jitter_and_capped() -> None:
    for attempt in range(20):
        assert 0 <= backoff_delay(attempt, 1.0, 60.0) <= min(60.0, 2.0**attempt)
    assert max(backoff_delay(30, 1.0, 60.0) for _ in range(200)) > 30


def test_describe_error_names_certificate_failures() -> None:
    import ssl

    inner = ssl.SSLCertVerificationError(1, "boom")
    inner.verify_message = "unable to get local issuer certificate"
    outer = trio.BrokenResourceError("handshake")
    outer.__cause__ = inner
    assert describe_error(ExceptionGroup("x", [outer])).startswith("certificate verify failed: unable")


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"cpm_url": "wss://cpm.example:9000", "space": "main"}, None),
        ({"cpm_url": "ws://127.0.0.1:9000", "space": "main"}, None),
        ({"cpm_url": "ws://localhost:9000", "space": "main"}, None),
        ({"cpm_url": "ws://[::1]:9000", "space": "main"}, None),
        ({"cpm_url": "ws://cpm.example:9000", "space": "main"}, "--cpm-insecure"),
        ({"cpm_url": "ws://cpm.example:9000", "space": "main", "cpm_insecure": True}, None),
        ({"cpm_url": "https://cpm.example", "space": "main"}, "wss://"),
        ({"cpm_url": "wss://cpm.example:9000"}, "--space"),
        ({"cpm_url": ["wss://a.example:9000", "wss://b.example:9000"], "space": "main"}, None),
        ({"cpm_url": ["wss://a.example:9000", "ws://b.example:9000"], "space": "main"}, "--cpm-insecure"),
        ({"cpm_url": [], "space": "main"}, "list of URLs"),
        ({"cpm_url": ["wss://a.example:9000", 5], "space": "main"}, "list of URLs"),
        ({"cpm_fingerprint": "nothex"}, "fingerprint"),
        ({"tags": ["a", 1]}, "tags"),
    ],
)
def test_link_options_are_validated(options: dict[str, Any], error: str | None) -> None:
    if error is None:
        config = load_config(None, options)
        assert "join" not in json.dumps(config.public())
    else:
        with pytest.raises(ConfigError, match=error.replace("-", r"\-")):
            load_config(None, options)


def test_several_replicas_a_lost_link_moves_to_another_at_random(tmp_path: Path) -> None:
    urls = ["wss://a.example:9000", "wss://b.example:9000", "wss://c.example:9000"]
    config = load_config(None, {"cpm_url": [*urls, urls[0]], "space": "main", "data_dir": tmp_path})
    assert config.cpm_url == urls[0] and config.cpm_urls == urls  # repeats dropped, order kept
    assert config.public()["cpm"]["urls"] == urls
    client = LinkClient(config, _ignore_app)
    assert client._url == urls[0]  # the first as given
    seen = []
    for _ in range(60):
        before = client._url
        client._next_url()
        assert client._url != before  # never the one that just failed
        seen.append(client._url)
    assert set(seen) == set(urls)  # and every other one in time
    single = LinkClient(
        load_config(None, {"cpm_url": urls[1], "space": "main", "data_dir": tmp_path}), _ignore_app
    )
    single._next_url()
    assert single._url == urls[1]


async def _ignore_app(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that is never called."""


def test_join_token_never_in_public_config() -> None:
    config = load_config(None, {"cpm_url": "wss://x:1", "space": "s", "join_token": TOKEN})
    assert TOKEN not in json.dumps(config.public())


def test_data_dir_moves_the_sequences_root(tmp_path: Path) -> None:
    config = load_config(None, {"data_dir": tmp_path})
    assert config.sequences_root == tmp_path / "sequences"
