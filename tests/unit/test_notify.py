"""sd_notify and the watchdog against a fake ``$NOTIFY_SOCKET`` the test binds.

Rules: the fake systemd is a plain non-blocking ``AF_UNIX`` datagram socket, read
after the code under test has sent (sends are synchronous, so the datagrams are
queued by then); anything timed runs on ``autojump_clock``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from spacehub.server import notify as sd


class FakeSystemd:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def received(self) -> list[str]:
        """Every datagram queued so far."""
        out: list[str] = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


@pytest.fixture
def fake_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    """A filesystem-path NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        yield FakeSystemd(sock)


def test_ready_and_status_in_one_datagram(fake_systemd: FakeSystemd) -> None:
    assert sd.notify("READY=1\nSTATUS=API on 127.0.0.1:8000")
    assert fake_systemd.received() == ["READY=1\nSTATUS=API on 127.0.0.1:8000"]


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"spacehub-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd.notify("READY=1")
        assert FakeSystemd(sock).received() == ["READY=1"]


def test_no_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd.notify("READY=1")


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234"])
def test_non_unix_address_is_ignored(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert not sd.notify("READY=1")


def test_nobody_listening_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert not sd.notify("READY=1")


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "1", None),  # the watchdog belongs to another process
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert sd.watchdog_interval() == expected


async def test_watchdog_pings_at_half_the_interval(
    fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")  # WatchdogSec=10
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    async with trio.open_nursery() as nursery:
        await nursery.start(sd.watchdog)
        assert fake_systemd.received() == ["WATCHDOG=1"]  # at once
        await trio.sleep(4.9)
        assert fake_systemd.received() == []
        await trio.sleep(0.2)  # t = 5.1
        assert fake_systemd.received() == ["WATCHDOG=1"]
        await trio.sleep(20)  # t = 25.1: pings at 10, 15, 20, 25
        assert fake_systemd.received() == ["WATCHDOG=1"] * 4
        nursery.cancel_scope.cancel()


async def test_watchdog_without_interval_returns(fake_systemd: FakeSystemd) -> None:
    with trio.fail_after(1):
        await sd.watchdog()
    assert fake_systemd.received() == []


async def test_lifecycle(
    fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    async with trio.open_nursery() as nursery:
        await nursery.start(sd.lifecycle, "API on 127.0.0.1:1\nsneaky=1")
        await trio.sleep(1.5)  # pings at 0 and 1
        nursery.cancel_scope.cancel()
    assert fake_systemd.received() == [
        "READY=1\nSTATUS=API on 127.0.0.1:1 sneaky=1",
        "WATCHDOG=1",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


async def test_hub_notifies_systemd(fake_systemd: FakeSystemd, tmp_path: Path) -> None:
    """The real hub: READY=1 once the API listens, STOPPING=1 when it is shut down."""
    from agent.config import load_config
    from agent.service import run_hub

    config = load_config(None, {"port": 0, "data_dir": tmp_path, "log_level": "error"})
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(run_hub, config)
            assert fake_systemd.received() == [f"READY=1\nSTATUS=API on {addresses[0]}"]
            nursery.cancel_scope.cancel()
    assert fake_systemd.received() == ["STOPPING=1"]
