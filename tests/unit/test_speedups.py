"""spacehub.server.speedups: every patch gives exactly what the code it replaces gives, each is
skipped on a library version it was not written for, and all of them come off again.

The suite runs with the patches installed (tests/conftest.py) unless SPACEHUB_SPEEDUPS=0;
`make test` runs the link and HTTP tests both ways."""

from __future__ import annotations

import logging
import os
import random
import ssl
from collections.abc import Iterator
from typing import Any

import hypercorn.trio.run
import hypercorn.trio.tcp_server
import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto import frame_protocol as wsproto_frames
from wsproto.events import AcceptConnection, BytesMessage, Request

from cpm.tls import TlsFiles, ensure_ca_and_server_cert, server_ssl_context
from spacehub.server import limits, speedups
from spacehub.tls import client_ssl_context

try:
    from websockets.speedups import apply_mask  # noqa: F401
except ImportError:  # pragma: no cover - a websockets build without its C extension
    HAS_C_MASK = False
else:
    HAS_C_MASK = True

needs_c_mask = pytest.mark.skipif(not HAS_C_MASK, reason="websockets without its C speedups")

RECORD = 16 * 1024  # TLS's largest plaintext record


@pytest.fixture
def bare(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No patch installed for the test (the switch on); the suite's state is put back after."""
    was = speedups.installed()
    speedups.uninstall()
    monkeypatch.delenv(speedups.ENV_SWITCH, raising=False)
    yield
    speedups.uninstall()
    if was:
        speedups.install()


# -- install, uninstall, versions, the switch --------------------------------------------------


def test_install_applies_each_patch_and_uninstall_restores_the_originals(bare: None) -> None:
    masker, server = wsproto_frames.XorMaskerSimple, hypercorn.trio.run.TCPServer
    reads = hypercorn.trio.tcp_server.MAX_RECV
    names = speedups.install()
    assert names == {p.name for p in speedups.PATCHES} - ({"c-unmask"} if not HAS_C_MASK else set())
    assert speedups.install() == names  # twice is once
    assert hypercorn.trio.tcp_server.MAX_RECV == limits.SOCKET_READ_BYTES
    assert hypercorn.trio.run.TCPServer is not server
    if HAS_C_MASK:
        assert wsproto_frames.XorMaskerSimple is speedups.CMasker
    assert "speed-ups: socket-reads" in speedups.describe()
    speedups.uninstall()
    assert speedups.installed() == frozenset()
    assert wsproto_frames.XorMaskerSimple is masker
    assert hypercorn.trio.run.TCPServer is server
    assert reads == hypercorn.trio.tcp_server.MAX_RECV


def test_the_switch_turns_every_patch_off(bare: None, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = hypercorn.trio.tcp_server.MAX_RECV
    monkeypatch.setenv(speedups.ENV_SWITCH, "0")
    assert speedups.install() == frozenset()
    assert reads == hypercorn.trio.tcp_server.MAX_RECV
    assert speedups.describe() == "speed-ups off (SPACEHUB_SPEEDUPS=0)"


def test_a_patch_for_another_version_is_skipped_with_one_log_line(
    bare: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    versions = {"hypercorn": "0.99.0"}
    real = speedups.installed_version
    monkeypatch.setattr(speedups, "installed_version", lambda name: versions.get(name) or real(name))
    reads = hypercorn.trio.tcp_server.MAX_RECV
    with caplog.at_level(logging.INFO, logger="spacehub.speedups"):
        names = speedups.install()
        speedups.install()
    assert "socket-reads" not in names and "draining-tls-reads" not in names
    assert reads == hypercorn.trio.tcp_server.MAX_RECV
    skipped = [r.getMessage() for r in caplog.records if "socket-reads" in r.getMessage()]
    assert skipped == ["speed-up socket-reads skipped: written for hypercorn 0.18.0, found 0.99.0"]
    assert "socket-reads skipped (written for hypercorn 0.18.0, found 0.99.0)" in speedups.describe()


def test_a_patch_whose_target_is_gone_is_skipped(bare: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(hypercorn.trio.tcp_server, "MAX_RECV")
    assert "socket-reads" not in speedups.install()


@pytest.mark.parametrize("distribution", ["hypercorn", "wsproto", "websockets", "trio", "no-such-thing"])
def test_installed_version_reads_what_pip_installed(distribution: str) -> None:
    import importlib.metadata

    try:
        expected: str | None = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        expected = None
    assert speedups.installed_version(distribution) == expected


def test_each_patch_names_the_versions_installed_here() -> None:
    """The pins in pyproject.toml are the versions the patches were written for."""
    for patch in speedups.PATCHES:
        assert patch.mismatch() is None, patch.name


# -- c-unmask ----------------------------------------------------------------------------------


@needs_c_mask
@pytest.mark.parametrize("seed", range(20))
def test_c_masker_matches_wsprotos_piece_by_piece(bare: None, seed: int) -> None:
    """The same key rotation across a frame's pieces, any sizes (1-byte pieces included)."""
    speedups.install()
    speedups.uninstall()  # CMasker.apply_mask set, wsproto's own masker back in place
    rng = random.Random(seed)
    key = rng.randbytes(4)
    data = rng.randbytes(rng.randrange(1, 70_000))
    ours, theirs = speedups.CMasker(key), wsproto_frames.XorMaskerSimple(key)
    at = 0
    while at < len(data):
        size = rng.choice([1, 2, 3, 5, rng.randrange(1, 20_000)])
        piece = bytearray(data[at : at + size])
        mine = ours.process(piece)
        assert isinstance(mine, bytearray)
        assert mine == theirs.process(piece)
        at += size
    assert ours.process(bytearray()) == theirs.process(bytearray()) == bytearray()


def _masked_round_trip(payloads: list[bytes]) -> list[bytes]:
    """A wsproto client sends ``payloads`` (masked); a wsproto server parses them."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="127.0.0.1", target="/link")))
    request = next(server.events())
    assert isinstance(request, Request)
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    wire = b"".join(client.send(BytesMessage(data=p)) for p in payloads)
    received: list[bytes] = []
    partial = b""
    rng = random.Random(1)
    at = 0
    while at < len(wire):  # the wire in uneven reads, so frames arrive in pieces
        size = rng.randrange(1, 9_000)
        server.receive_data(wire[at : at + size])
        at += size
        for event in server.events():
            assert isinstance(event, BytesMessage)
            partial += bytes(event.data)
            if event.message_finished:
                received.append(partial)
                partial = b""
    return received


@pytest.mark.parametrize("patched", [True, False])
def test_masked_messages_arrive_whole(bare: None, patched: bool) -> None:
    if patched:
        speedups.install()
    payloads = [os.urandom(n) for n in (0, 1, 3, 125, 126, 65_535, 65_536, 300_001)]
    assert _masked_round_trip(payloads) == payloads


# -- draining-tls-reads -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_ca_and_server_cert(tmp_path_factory.mktemp("tls"), ["localhost"], [])


def _tls_pair(files: TlsFiles) -> tuple[trio.SSLStream[Any], trio.SSLStream[Any], trio.abc.Stream]:
    """A TLS client and server over an in-memory pair, and the client's raw stream."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_ssl_context(files.ca_cert), server_hostname="localhost")
    server = trio.SSLStream(server_raw, server_ssl_context(files), server_side=True)
    return client, server, client_raw


async def _connected(
    files: TlsFiles, *, tell_handshake: bool = True
) -> tuple[trio.SSLStream[Any], speedups.DrainingTLSStream, trio.abc.Stream]:
    """A handshaken TLS client, the server's side wrapped, and the client's raw stream.
    With ``tell_handshake``, the wrapper has seen the handshake end (as under hypercorn)."""
    client, server, client_raw = _tls_pair(files)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    reader = speedups.DrainingTLSStream(server)
    if tell_handshake:
        await reader.do_handshake()  # done already: this only tells the wrapper
    return client, reader, client_raw


async def test_one_read_returns_every_record_received(tls_files: TlsFiles) -> None:
    with trio.fail_after(10):
        client, reader, _ = await _connected(tls_files)
        sent = os.urandom(4 * RECORD + 100)
        await client.send_all(sent)  # five records, all in the server's socket buffer now
        first = await reader.receive_some(1 << 20)  # trio's read: the socket, then one record
        assert len(first) == RECORD
        second = await reader.receive_some(1 << 20)  # the other four at once, no socket read
        assert bytes(first + second) == sent


async def test_no_draining_before_the_handshake(tls_files: TlsFiles) -> None:
    """The handshake stays trio's: the wrapper reads nothing itself until it has seen it end."""
    with trio.fail_after(10):
        client, reader, _ = await _connected(tls_files, tell_handshake=False)
        await client.send_all(os.urandom(2 * RECORD))
        assert len(await reader.receive_some(1 << 20)) == RECORD
        assert len(await reader.receive_some(1 << 20)) == RECORD  # trio's, one record per read


async def test_max_bytes_is_honoured_and_nothing_is_lost(tls_files: TlsFiles) -> None:
    with trio.fail_after(10):
        client, reader, _ = await _connected(tls_files)
        sent = os.urandom(300_000)
        rng = random.Random(2)

        async def send() -> None:
            at = 0
            while at < len(sent):
                size = rng.randrange(1, 50_000)
                await client.send_all(sent[at : at + size])
                at += size
            await client.aclose()  # close_notify: the reader then sees b""

        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while True:
                limit = rng.choice([1, 7, RECORD, RECORD + 1, 100_000])
                chunk = await reader.receive_some(limit)
                if not chunk:
                    break
                assert len(chunk) <= limit
                got += chunk
        assert bytes(got) == sent
        await reader.aclose()


async def test_a_bad_record_after_good_ones_surfaces_through_trio(tls_files: TlsFiles) -> None:
    """The good records come out; the corrupt one is trio's BrokenResourceError next read."""
    with trio.fail_after(10):
        client, reader, client_raw = await _connected(tls_files)
        good = os.urandom(2 * RECORD)
        await client.send_all(good)
        # A record of garbage behind them, as if the wire were corrupted.
        await client_raw.send_all(b"\x17\x03\x03\x00\x40" + os.urandom(64))
        got = b""
        with pytest.raises(trio.BrokenResourceError):
            while True:
                got += await reader.receive_some(1 << 20)
        assert got == good


def test_install_wraps_tls_streams_only(bare: None, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []

    def fake_server(app: Any, config: Any, context: Any, state: Any, stream: Any) -> Any:
        made.append(stream)
        return stream

    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", fake_server)
    assert "draining-tls-reads" in speedups.install()
    client_raw, _ = trio.testing.memory_stream_pair()
    tls = trio.SSLStream(client_raw, ssl.create_default_context(), server_hostname="localhost")
    hypercorn.trio.run.TCPServer(None, None, None, None, tls)  # type: ignore[arg-type]
    hypercorn.trio.run.TCPServer(None, None, None, None, client_raw)  # type: ignore[arg-type]
    assert isinstance(made[0], speedups.DrainingTLSStream)
    assert made[1] is client_raw


def test_has_no_send_eof() -> None:
    """DrainingTLSStream has no send_eof: hypercorn reads that AttributeError as 'TLS'."""
    assert not hasattr(speedups.DrainingTLSStream, "send_eof")
