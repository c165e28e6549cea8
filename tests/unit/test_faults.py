"""The fault hook's pieces: what a fault request may say, the link's partition and delay on
a memory transport with the autojump clock, and registry writes refused while reads go on."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from cpm.errors import BadRequest, RegistryUnavailable
from cpm.faults import MAX_FAULT_SECONDS, Faults
from cpm.link.transport import AsgiWebSocketTransport
from cpm.registry import Registry


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([], "expected"),
        ({"hub": ""}, "hub is"),
        ({"hub": 3}, "hub is"),
        ({"cut": "yes"}, "cut is"),
        ({"partition": -1}, "partition is 0 to"),
        ({"partition": MAX_FAULT_SECONDS + 1}, "partition is 0 to"),
        ({"partition": float("nan")}, "partition is a number"),
        ({"delay": True}, "delay is a number"),
        ({"delay": 0.5}, "needs a duration"),
        ({"registryWrites": "3"}, "registryWrites is a number"),
        ({"sever": True}, "unknown fault fields: sever"),
    ],
)
async def test_bad_fault_requests_are_refused(spec: Any, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        Faults().apply(spec)


async def test_faults_end_by_themselves(autojump_clock: Any) -> None:
    faults = Faults()
    assert faults.for_hub("sth-1") is None  # nothing in force: links pay one check
    faults.apply({"hub": "sth-1", "partition": 5})
    fault = faults.for_hub("sth-1")
    assert fault is not None and fault.held(trio.current_time()) == 5
    assert faults.for_hub("sth-2") is not None and not faults.for_hub("sth-2").held(trio.current_time())  # type: ignore[union-attr]
    await trio.sleep(5)
    assert fault.held(trio.current_time()) == 0
    faults.apply({"hub": "*", "delay": 0.5, "for": 10})
    assert faults.for_hub("sth-9").delaying(trio.current_time()) == 0.5  # type: ignore[union-attr]
    faults.clear()
    assert faults.for_hub("sth-1") is None


class MemorySocket:
    """The ASGI side of a websocket, in memory."""

    def __init__(self) -> None:
        self.to_app_send, self.to_app = trio.open_memory_channel[dict[str, Any]](16)
        self.from_app_send, self.from_app = trio.open_memory_channel[dict[str, Any]](16)

    async def receive(self) -> dict[str, Any]:
        return await self.to_app.receive()

    async def send(self, message: dict[str, Any]) -> None:
        await self.from_app_send.send(message)


async def linked(faults: Faults) -> tuple[AsgiWebSocketTransport, MemorySocket]:
    socket = MemorySocket()
    transport = AsgiWebSocketTransport(socket.receive, socket.send)
    transport.faults = faults
    transport.hub_id = "sth-1"
    await socket.to_app_send.send({"type": "websocket.connect"})
    await transport.accept()
    assert (await socket.from_app.receive())["type"] == "websocket.accept"
    return transport, socket


async def test_a_partition_holds_messages_both_ways_then_lets_them_pass(autojump_clock: Any) -> None:
    faults = Faults()
    transport, socket = await linked(faults)
    faults.apply({"hub": "sth-1", "partition": 3})
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.send, b"out")
        await socket.to_app_send.send({"type": "websocket.receive", "bytes": b"in"})
        got = await transport.receive()
    assert got == b"in" and (await socket.from_app.receive())["bytes"] == b"out"
    assert trio.current_time() - began == pytest.approx(3)  # held, not lost
    assert transport.last_received == pytest.approx(began + 3)  # the silence counted meanwhile


async def test_a_delay_slows_each_message(autojump_clock: Any) -> None:
    faults = Faults()
    transport, socket = await linked(faults)
    faults.apply({"hub": "sth-1", "delay": 0.25, "for": 60})
    began = trio.current_time()
    for _ in range(4):
        await transport.send(b"x")
        assert (await socket.from_app.receive())["bytes"] == b"x"
    assert trio.current_time() - began == pytest.approx(1.0)
    faults.apply({"hub": "sth-2", "partition": 60})  # another hub's fault is not this one's
    await transport.send(b"y")
    assert trio.current_time() - began == pytest.approx(1.25)


def test_registry_writes_fail_while_reads_go_on(tmp_path: Path) -> None:
    faults = Faults()
    with Registry(tmp_path / "r.sqlite3") as registry:
        registry.fail_writes = faults.registry_writes_fail
        registry.create_space("before")
        faults.registry_fails_until = time.monotonic() + 60
        with pytest.raises(RegistryUnavailable, match="fault injected"):
            registry.create_space("during")
        assert [space.name for space in registry.list_spaces()] == [
            "before"
        ]  # reads work, nothing half-written
        faults.clear()
        registry.create_space("after")
        assert sorted(space.name for space in registry.list_spaces()) == ["after", "before"]


async def asgi_post(app: Any, path: str, body: bytes, client: tuple[str, int]) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", b"application/json")],
        "client": client,
    }
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize(
    ("enabled", "client", "status"),
    [(True, ("127.0.0.1", 5000), 200), (True, ("10.0.0.5", 5000), 403), (False, ("127.0.0.1", 5000), 404)],
)
async def test_the_hook_answers_loopback_only_and_only_when_enabled(
    tmp_path: Path, enabled: bool, client: tuple[str, int], status: int
) -> None:
    from cpm.api.app import ManagerApp
    from cpm.config import ManagerConfig
    from cpm.service import Manager

    config = ManagerConfig(data_dir=tmp_path, fault_injection=enabled)
    with Registry(tmp_path / "r.sqlite3") as registry:
        manager = Manager(config, registry)
        app = ManagerApp(manager)
        got, body = await asgi_post(app, "/api/v1/faults", b'{"hub": "*", "partition": 1}', client)
        assert got == status, body
        if status == 200:
            assert manager.faults is not None and manager.faults.for_hub("sth-x") is not None
        elif manager.faults is not None:
            assert manager.faults.for_hub("sth-x") is None  # a refused call changed nothing
