"""Hand hypercorn every TLS record already received, not one record per read.

trio's ``SSLStream.receive_some`` returns the plaintext of one TLS record (at most
16 KiB) even when its last socket read brought in four. hypercorn's read loop then
runs once per record, and each pass (a read timeout scope, h11 or wsproto, the app's
queue) costs more than the decryption: relaying 1 GB from a hub, about a fifth of
the manager's CPU went to passes that fewer reads would have done.

:class:`DrainingTLSStream` wraps the server side's ``SSLStream``: when records are
already waiting in its incoming buffer, a read decrypts them all at once, up to the
caller's ``max_bytes``, without waiting; otherwise it is trio's own read. It reaches
into trio's ``SSLStream`` for that (its ``SSLObject`` and incoming buffer; trio 0.35
is pinned and :func:`install` checks they are there). Reading from the ``SSLObject``
directly is what ``SSLStream`` does itself; anything OpenSSL wants to send back (a
TLS 1.3 key update) stays in the outgoing buffer, which the stream's next operation
flushes. Errors are left to ``SSLStream``: on any, the wrapper returns what it has,
or hands the read to trio, which meets the error itself.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable
from typing import Any

import hypercorn.trio.run
import trio


class DrainingTLSStream:
    """The parts of ``trio.SSLStream`` hypercorn's ``TCPServer`` uses, draining on read.

    ``send_eof`` is deliberately missing: hypercorn takes the AttributeError to mean
    TLS, as it does for ``SSLStream`` itself.
    """

    __slots__ = ("_handshaken", "_incoming", "_ssl_object", "_tls", "transport_stream")

    def __init__(self, tls: trio.SSLStream[Any]) -> None:
        self._tls = tls
        self._ssl_object: ssl.SSLObject = tls._ssl_object  # see the module docstring
        self._incoming: ssl.MemoryBIO = tls._incoming
        #: drained reads only after the handshake, which stays trio's
        self._handshaken = False
        self.transport_stream = tls.transport_stream

    async def do_handshake(self) -> None:
        await self._tls.do_handshake()
        self._handshaken = True

    def selected_alpn_protocol(self) -> str | None:
        protocol: str | None = self._tls.selected_alpn_protocol()
        return protocol

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._tls.send_all(data)

    async def aclose(self) -> None:
        await self._tls.aclose()

    # Not a coroutine function: while it waits on the socket, an idle link keeps trio's
    # frames only, none of ours (at 5,000 links one frame is 1.3 MB).
    def receive_some(self, max_bytes: int | None = None) -> Awaitable[bytes | bytearray]:
        if self._handshaken and max_bytes is not None and self._incoming.pending:
            drained = self._drain(max_bytes)
            if drained:
                return _ready(drained)
        return self._tls.receive_some(max_bytes)

    def _drain(self, max_bytes: int) -> bytearray:
        """Decrypt the whole records already received, up to ``max_bytes``."""
        gathered = bytearray()
        while len(gathered) < max_bytes and self._incoming.pending:
            try:
                more = self._ssl_object.read(max_bytes - len(gathered))
            except ssl.SSLError:  # a partial record (want-read), close_notify, a bad record: trio's
                break
            if not more:
                break
            gathered += more
        return gathered


async def _ready(data: bytearray) -> bytearray:
    return data


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
