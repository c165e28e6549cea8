"""A link :class:`~spacehub.server.link.session.MessageTransport` over an ASGI websocket.

Hubs reach the manager as websockets on the API's own port, so the link rides on
hypercorn's ASGI websocket scope instead of a socket of its own. Back-pressure comes
for free: hypercorn waits in ``send`` while the hub reads slowly, and stops reading
the hub's socket while we do not call ``receive`` (its queue to the app is bounded by
``max_app_queue_size``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from spacehub.server.link.session import LinkClosed

if TYPE_CHECKING:
    from ..faults import Faults

__all__ = ["CLOSE_INTERNAL", "CLOSE_NORMAL", "CLOSE_POLICY", "CLOSE_PROTOCOL", "AsgiWebSocketTransport"]

Message = dict[str, Any]

#: Websocket close codes the manager uses.
CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL: Final = 1002
CLOSE_UNSUPPORTED: Final = 1003
CLOSE_INTERNAL: Final = 1011
#: The join or authentication was refused (docs/link.md): the hub should not retry.
CLOSE_POLICY: Final = 4403
#: Seconds one websocket message may take to leave; longer means the hub stopped reading.
SEND_TIMEOUT: Final = 30.0


class AsgiWebSocketTransport:
    """One hub's websocket: binary messages in, binary messages out."""

    def __init__(
        self,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        self._receive = receive
        self._send = send
        self._accepted = False
        self._closed = False
        # One websocket message at a time: a cancelled sender must never tear a frame.
        self._send_lock = trio.Lock()
        #: trio time a message last came from the hub (the manager's liveness check reads it)
        self.last_received = trio.current_time()
        #: the faults in force, with ``cpm serve --fault-injection`` (cpm/faults.py); the hub's
        #: id is set once it is admitted
        self.faults: Faults | None = None
        self.hub_id = ""

    @property
    def closed(self) -> bool:
        return self._closed

    async def accept(self) -> None:
        """Wait for the client's connect and accept it; LinkClosed if it left first."""
        message = await self._receive()
        if message["type"] != "websocket.connect":
            self._closed = True
            raise LinkClosed("the hub went away before the websocket was accepted")
        await self._send({"type": "websocket.accept"})
        self._accepted = True

    async def send(self, message: bytes) -> None:
        if self._closed:
            raise LinkClosed("the link is closed")
        if self.faults is not None:
            await self._suffer_faults()
        async with self._send_lock:
            # Shielded so that a cancelled caller cannot tear a message in half, but bounded:
            # a hub that stops reading for SEND_TIMEOUT is dead, and its link is given up.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_TIMEOUT) as scope:
                await self._send({"type": "websocket.send", "bytes": message})
            if scope.cancelled_caught:
                self._closed = True
                raise LinkClosed(f"the hub read nothing for {SEND_TIMEOUT:g} s")

    async def receive(self) -> bytes:
        if self._closed:
            raise LinkClosed("the link is closed")
        if self.faults is not None:
            await self._suffer_faults()  # held before it is read: TCP back-pressure, as a partition
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            data = message.get("bytes")
            if data is not None:
                self.last_received = trio.current_time()
                return bytes(data)
            # The link is binary only; a text message means the peer is not a hub.
            await self.aclose(CLOSE_UNSUPPORTED, "the link carries binary messages only")
            raise LinkClosed("the hub sent a text message")
        self._closed = True
        code = message.get("code", CLOSE_NORMAL) if kind == "websocket.disconnect" else None
        raise LinkClosed(f"the hub closed the link (code {code})")

    async def _suffer_faults(self) -> None:
        """Wait out the partition and the delay injected for this hub, if any."""
        assert self.faults is not None
        while (fault := self.faults.for_hub(self.hub_id)) is not None:
            held = fault.held(trio.current_time())
            if not held:
                if delay := fault.delaying(trio.current_time()):
                    await trio.sleep(delay)
                return
            await trio.sleep(held)

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close the websocket (once); safe to call from any task, also when cancelled."""
        if self._closed:
            return
        self._closed = True
        if not self._accepted:
            return
        with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_TIMEOUT):
            async with self._send_lock:
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
