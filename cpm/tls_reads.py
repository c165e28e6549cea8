"""Hand hypercorn every TLS record already received, not one record per read.

trio's ``SSLStream.receive_some`` returns the plaintext of one TLS record (at most
16 KiB) even when its last socket read brought in four. hypercorn's read loop then
runs once per record, and each pass (a read timeout scope, h11 or wsproto, the app's
queue) costs more than the decryption: relaying 1 GB from a hub, about a fifth of
the manager's CPU went to passes that a single read would have done.

:class:`DrainingTLSStream` wraps the server side's ``SSLStream``: after each read
it decrypts, without waiting, whatever whole records the socket already delivered,
up to the caller's ``max_bytes``. It reaches into trio's ``SSLStream`` for that (its
``SSLObject`` and incoming buffer; trio 0.35 is pinned and :func:`install` checks
they are there). Reading from the ``SSLObject`` directly is what ``SSLStream`` does
itself; anything OpenSSL wants to send back (a TLS 1.3 key update) stays in the
outgoing buffer, which the stream's next operation flushes. Errors are left to
``SSLStream``: on any, the wrapper returns what it has, and the next read meets
the error again through trio.
"""

from __future__ import annotations

import ssl
from typing import Any

import hypercorn.trio.run
import trio


class DrainingTLSStream:
    """The parts of ``trio.SSLStream`` hypercorn's ``TCPServer`` uses, draining on read.

    ``send_eof`` is deliberately missing: hypercorn takes the AttributeError to mean
    TLS, as it does for ``SSLStream`` itself.
    """

    __slots__ = ("_tls", "transport_stream")  # one per connection: 5,000 at a time on a fleet

    def __init__(self, tls: trio.SSLStream[Any]) -> None:
        self._tls = tls
        self.transport_stream = tls.transport_stream

    async def do_handshake(self) -> None:
        await self._tls.do_handshake()

    def selected_alpn_protocol(self) -> str | None:
        protocol: str | None = self._tls.selected_alpn_protocol()
        return protocol

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._tls.send_all(data)

    async def aclose(self) -> None:
        await self._tls.aclose()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._tls.receive_some(max_bytes)
        if not data or max_bytes is None or len(data) >= max_bytes:
            return data
        ssl_object: ssl.SSLObject = self._tls._ssl_object
        incoming: ssl.MemoryBIO = self._tls._incoming
        if not incoming.pending:
            return data
        gathered = bytearray(data)
        while len(gathered) < max_bytes and incoming.pending:
            try:
                more = ssl_object.read(max_bytes - len(gathered))
            except ssl.SSLError:  # a partial record (want-read), close_notify, a bad record: trio's
                break
            if not more:
                break
            gathered += more
        return gathered


def supported() -> bool:
    """Whether this trio's ``SSLStream`` keeps what the wrapper reads."""
    names = trio.SSLStream.__init__.__code__.co_names
    return "_ssl_object" in names and "_incoming" in names


def install() -> bool:
    """Have hypercorn's Trio server wrap each TLS connection in :class:`DrainingTLSStream`;
    False (nothing changed) on a trio whose ``SSLStream`` it does not know."""
    server = getattr(hypercorn.trio.run, "TCPServer", None)
    if server is None:
        raise RuntimeError("hypercorn.trio.run.TCPServer is gone: check the pinned hypercorn version")
    if getattr(server, "_drains_tls", False):
        return True
    if not supported():
        return False

    def draining_server(app: Any, config: Any, context: Any, state: Any, stream: Any) -> Any:
        if isinstance(stream, trio.SSLStream):
            stream = DrainingTLSStream(stream)
        return server(app, config, context, state, stream)

    draining_server._drains_tls = True  # type: ignore[attr-defined]
    hypercorn.trio.run.TCPServer = draining_server  # type: ignore[assignment,attr-defined]
    return True
