"""The manager's two hot-path swaps in its HTTP stack: C unmasking of websocket frames
(cpm.link.unmask) and TLS reads that hand hypercorn every record received
(cpm.tls_reads). Each must give exactly what the code it replaces gives."""

from __future__ import annotations

import os
import random
import ssl
from typing import Any

import hypercorn.trio.run
import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto import frame_protocol as wsproto_frames
from wsproto.events import AcceptConnection, BytesMessage, Request

from cpm import tls_reads
from cpm.link import unmask
from cpm.tls import TlsFiles, ensure_ca_and_server_cert, server_ssl_context
from spacehub.tls import client_ssl_context

needs_speedups = pytest.mark.skipif(unmask.APPLY_MASK is None, reason="websockets without its C speedups")

RECORD = 16 * 1024  # TLS's largest plaintext record


# -- unmasking --------------------------------------------------------------------------------


@needs_speedups
@pytest.mark.parametrize("seed", range(20))
def test_c_masker_matches_wsprotos_piece_by_piece(seed: int) -> None:
    """The same key rotation across a frame's pieces, any sizes (1-byte pieces included)."""
    rng = random.Random(seed)
    key = rng.randbytes(4)
    data = rng.randbytes(rng.randrange(1, 70_000))
    ours, theirs = unmask.CMasker(key), unmask.PYTHON_MASKER(key)
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


@needs_speedups
def test_install_unmasks_whole_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wsproto_frames, "XorMaskerSimple", unmask.PYTHON_MASKER)
    payloads = [os.urandom(n) for n in (0, 1, 3, 125, 126, 65_535, 65_536, 300_001)]
    assert unmask.install()
    assert wsproto_frames.XorMaskerSimple is unmask.CMasker
    assert _masked_round_trip(payloads) == payloads


def test_without_speedups_wsprotos_masker_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wsproto_frames, "XorMaskerSimple", unmask.PYTHON_MASKER)
    monkeypatch.setattr(unmask, "APPLY_MASK", None)
    assert not unmask.install()
    assert wsproto_frames.XorMaskerSimple is unmask.PYTHON_MASKER


def test_refuses_a_wsproto_without_the_masker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(wsproto_frames, "XorMaskerSimple")
    with pytest.raises(RuntimeError, match="pinned wsproto"):
        unmask.install()


# -- TLS reads --------------------------------------------------------------------------------


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
) -> tuple[trio.SSLStream[Any], tls_reads.DrainingTLSStream, trio.abc.Stream]:
    """A handshaken TLS client, the server's side wrapped, and the client's raw stream.
    With ``tell_handshake``, the wrapper has seen the handshake end (as under hypercorn)."""
    client, server, client_raw = _tls_pair(files)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    reader = tls_reads.DrainingTLSStream(server)
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


def test_install_wraps_tls_streams_only(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []

    def fake_server(app: Any, config: Any, context: Any, state: Any, stream: Any) -> Any:
        made.append(stream)
        return stream

    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", fake_server)
    assert tls_reads.install()
    assert tls_reads.install()  # twice is once
    client_raw, _ = trio.testing.memory_stream_pair()
    tls = trio.SSLStream(client_raw, ssl.create_default_context(), server_hostname="localhost")
    hypercorn.trio.run.TCPServer(None, None, None, None, tls)  # type: ignore[arg-type]
    hypercorn.trio.run.TCPServer(None, None, None, None, client_raw)  # type: ignore[arg-type]
    assert isinstance(made[0], tls_reads.DrainingTLSStream)
    assert made[1] is client_raw


def test_refuses_a_hypercorn_without_its_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(hypercorn.trio.run, "TCPServer")
    with pytest.raises(RuntimeError, match="pinned hypercorn"):
        tls_reads.install()


def test_knows_this_trios_ssl_stream() -> None:
    assert tls_reads.supported()


def test_has_no_send_eof() -> None:
    """DrainingTLSStream has no send_eof: hypercorn reads that AttributeError as 'TLS'."""
    assert not hasattr(tls_reads.DrainingTLSStream, "send_eof")
