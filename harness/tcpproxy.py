"""A TCP forwarder a test controls: put it between a hub and its manager to cut the link.

``cut(seconds)`` closes every connection through it and stops listening for that long
(new dials are refused, as when a network is cut or a manager restarts), then listens
again on the same port. It forwards bytes unchanged (TLS goes through), and only to
the target it was given (127.0.0.1 in tests).
"""

from __future__ import annotations

import contextlib
from typing import Final

import trio

__all__ = ["TcpForwarder"]

#: Bytes read at a time in each direction.
CHUNK: Final = 65536


class TcpForwarder:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._connections: set[trio.SocketStream] = set()
        self._listening = trio.Event()
        self._open = trio.Event()
        self._open.set()
        self._scope = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward until cancelled; ``started`` with the listening port."""
        first = True
        while True:
            await self._open.wait()
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            # Cancelling this scope (cut) stops listening and ends every handler with it.
            with trio.CancelScope() as self._scope:
                if first:
                    task_status.started(self.port)
                    first = False
                await trio.serve_listeners(self._handle, listeners)
            for listener in listeners:
                await listener.aclose()

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        self._connections.update((client, upstream))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, upstream, nursery.cancel_scope)
                nursery.start_soon(_pump, upstream, client, nursery.cancel_scope)
        finally:
            self._connections.difference_update((client, upstream))
            for stream in (client, upstream):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await trio.aclose_forcefully(stream)

    async def cut(self, seconds: float) -> None:
        """Close every connection now and refuse new ones for ``seconds``."""
        self.hold()
        await trio.sleep(seconds)
        self.release()

    def hold(self) -> None:
        """Close every connection now and refuse new ones until :meth:`release`."""
        self._open = trio.Event()
        self._scope.cancel()
        for stream in list(self._connections):
            stream.socket.close()

    def release(self) -> None:
        """Listen again (on the same port)."""
        self._open.set()


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()
