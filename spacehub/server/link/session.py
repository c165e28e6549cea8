"""The Trio shell around :class:`~spacehub.protocol.link.LinkConnection`.

Theory of operation
-------------------
A :class:`LinkSession` owns one message transport (a websocket, or an in-memory
pair in tests) and one sans-I/O :class:`LinkConnection`. :meth:`LinkSession.run`
is its only reader: it feeds every message to the connection and dispatches the
events *synchronously*, so the read loop never waits for a stream's consumer:

* body bytes go into the stream's buffer (a deque). The buffer needs no bound of
  its own: the peer may only send what the stream's receive window allows, and
  the window reopens only when the application has taken bytes out of the buffer
  (credit is returned with ``consumed()`` as the reader drains). So a buffer
  holds at most :data:`~spacehub.protocol.link.INITIAL_WINDOW` bytes (never more
  than :data:`~spacehub.protocol.link.MAX_WINDOW`); ``peak_buffered`` records the
  high-water mark for tests;
* control messages go into a bounded channel read by one task that awaits
  ``on_control`` for each, in order. If the handler falls
  :data:`CONTROL_QUEUE` messages behind, the link is closed rather than letting
  a slow handler stall stream data (or memory grow). A handler that never
  waits may be given as ``on_control_nowait`` instead: the read loop calls it
  in place, and the session keeps no channel and no task for control messages
  (the manager does so: it holds thousands of idle links);
* each stream the peer opens runs ``on_stream`` in its own task, in a nursery the
  session owns.

Every frame is sent under one lock, and the frame is *made* (the connection's
method called) under that lock too: stream ids must reach the peer in increasing
order, so making an OPEN and sending it must not be split by another task. The
write of one message is shielded, so a cancelled task cannot tear a frame; a
send that cannot finish is ended by closing the transport, which the session
does when it ends.

Errors::

    LinkClosed        the transport or the session ended (readers and writers of
                      every stream still open get it)
    StreamAborted     the stream was reset, by the peer or by this end
    LinkError         (spacehub.protocol.link) LocalProtocolError for a misuse;
                      a LinkProtocolError from the peer ends the session
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from functools import partial
from typing import Any, Final, Protocol, cast

import trio

from spacehub.protocol.control import ControlMessage
from spacehub.protocol.link import (
    ControlReceived,
    DataReceived,
    LinkConnection,
    LinkProtocolError,
    ResponseStarted,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
    StreamState,
    WindowUpdated,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "CONTROL_QUEUE",
    "InboundStream",
    "LinkClosed",
    "LinkSession",
    "MemoryTransport",
    "MessageTransport",
    "OutboundStream",
    "StreamAborted",
    "memory_transport_pair",
]

logger = logging.getLogger("spacehub.server.link")

#: Control messages received and not yet handled before the link is given up.
CONTROL_QUEUE: Final = 256
#: Seconds the session gives the transport to close when it ends.
CLOSE_TIMEOUT: Final = 1.0
#: Messages an in-memory transport holds in each direction.
MEMORY_TRANSPORT_BUFFER: Final = 16

_GONE: Final = (StreamState.CLOSED, StreamState.RESET)


class LinkClosed(Exception):
    """The transport or the session ended; the reason is the message."""


class StreamAborted(Exception):
    """The stream was reset (by the peer or by this end); the reason is the message."""


class MessageTransport(Protocol):
    """Whole binary messages, in order, both ways (one websocket)."""

    async def send(self, message: bytes) -> None:
        """Send one binary message; raises :class:`LinkClosed` once the transport ended."""

    async def receive(self) -> bytes:
        """The next binary message; raises :class:`LinkClosed` when the transport ended."""
        ...

    async def aclose(self) -> None:
        """Close the transport (idempotent)."""


class _Stream:
    """What both ends of a stream share: the receive buffer, the waits, the failure."""

    def __init__(self, session: LinkSession, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        #: the most bytes the receive buffer ever held
        self.peak_buffered = 0
        #: the peer sent END
        self._remote_ended = False
        #: this end sent END (or was reset)
        self._local_ended = False
        self._error: Exception | None = None
        self._changed = trio.Event()

    # --- called by the session's read loop (synchronous) ---------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _push(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        self.peak_buffered = max(self.peak_buffered, self._buffered)
        self._notify()

    def _end_remote(self) -> None:
        self._remote_ended = True
        self._notify()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._notify()

    # --- used by the application's tasks -------------------------------------

    @property
    def buffered(self) -> int:
        """Received bytes not handed to the reader yet."""
        return self._buffered

    async def _wait(self) -> None:
        await self._changed.wait()

    async def _next_chunk(self) -> bytes | None:
        """The next body chunk (not yet credited back), or None at END."""
        while True:
            if self._buffer:
                chunk = self._buffer.popleft()
                self._buffered -= len(chunk)
                return chunk
            if self._remote_ended:
                return None
            if self._error is not None:
                raise self._error
            await self._wait()

    async def _credit(self, n: int) -> None:
        """Tell the peer ``n`` bytes were handed on (a WINDOW goes out once enough is owed)."""
        if n and not self._session.closed:
            # If the link closed, what is buffered is still handed out; then the reader sees why.
            with contextlib.suppress(LinkClosed):
                await self._session._send_made(lambda: self._session._consumed(self.stream_id, n))

    async def _body(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._next_chunk()
            if chunk is None:
                return
            yield chunk
            # The consumer asked for more, so it is done with this chunk.
            await self._credit(len(chunk))

    async def _wait_failed(self) -> None:
        """Return once the stream is aborted or the link is gone."""
        while self._error is None:
            await self._wait()

    @property
    def batching(self) -> bool:
        """Whether frames made together reach the peer together (it reads BATCH)."""
        return self._session.batching

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    async def _send_data(self, data: bytes | bytearray | memoryview) -> None:
        connection = self._session._connection
        view = memoryview(data).cast("B")
        while view:
            self._check()
            window = connection.send_window(self.stream_id)
            if window == 0:
                await self._wait()
                continue
            part, view = view[:window], view[window:]

            def make(part: memoryview = part) -> list[bytes]:
                self._check()  # a RESET may have been read while this task waited for the lock
                return connection.send_data(self.stream_id, cast(bytes, part))  # memoryview works: no copy

            await self._session._send_made(make)

    async def _end(self) -> None:
        def make() -> list[bytes]:
            self._check()
            return [self._end_frame()]

        await self._session._send_made(make)

    def _end_frame(self) -> bytes:
        """Make this end's END (under the send lock, inside a ``make``)."""
        frame = self._session._connection.end_stream(self.stream_id)
        self._local_ended = True
        self._session._forget_if_gone(self)
        return frame

    async def reset(self, reason: str) -> None:
        """Abort both directions (no-op if the stream is over already)."""

        def make() -> list[bytes]:
            if self._session.closed:
                return []
            frame = self._session._connection.reset_stream(self.stream_id, reason)
            self._fail(StreamAborted(f"reset by this end: {reason}"))
            self._session._forget_if_gone(self)
            return [] if frame is None else [frame]

        if self._error is None:
            with contextlib.suppress(LinkClosed):
                await self._session._send_made(make)


class OutboundStream(_Stream):
    """The opener's side of one HTTP exchange (the manager proxying a call)."""

    def __init__(self, session: LinkSession, stream_id: int) -> None:
        super().__init__(session, stream_id)
        self._response: tuple[int, list[tuple[str, str]]] | None = None

    def _respond_remote(self, status: int, headers: list[tuple[str, str]]) -> None:
        self._response = (status, headers)
        self._notify()

    async def send_body(self, chunks: AsyncIterable[bytes]) -> None:
        """Send the request body (waiting for window as needed), then END."""
        async for chunk in chunks:
            if chunk:
                await self._send_data(chunk)
        await self._end()

    async def end(self) -> None:
        """END the request with no (more) body."""
        await self._end()

    async def response(self) -> tuple[int, list[tuple[str, str]]]:
        """Wait for the response head: status and headers."""
        while self._response is None:
            self._check()
            await self._wait()
        return self._response

    def body(self) -> AsyncIterator[bytes]:
        """The response body until END; credit goes back as the caller takes chunks."""
        return self._body()

    async def whole_body(self, limit: int) -> bytes | None:
        """The whole response body, once the peer has ENDed it, if it is at most ``limit`` bytes.

        None as soon as more than ``limit`` bytes are buffered, and then nothing is taken:
        :meth:`body` still yields all of it. Keep ``limit`` under the stream's window, or the
        peer waits for credit that this does not give. Raises :class:`LinkClosed` or
        :class:`StreamAborted` as :meth:`body` does, also with nothing taken.
        """
        while not self._remote_ended:
            if self._buffered > limit:
                return None
            self._check()
            await self._wait()
        if self._buffered > limit:
            return None
        # No credit: the peer sends nothing more on this stream.
        whole = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        return whole


class InboundStream(_Stream):
    """The answerer's side of one HTTP exchange (the hub serving a call)."""

    def __init__(
        self, session: LinkSession, stream_id: int, method: str, path: str, headers: list[tuple[str, str]]
    ) -> None:
        super().__init__(session, stream_id)
        self.method = method
        self.path = path
        self.headers = headers
        self._responded = False

    def body(self) -> AsyncIterator[bytes]:
        """The request body until END; credit goes back as the caller takes chunks."""
        return self._body()

    async def respond(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Send the response head."""

        def make() -> list[bytes]:
            self._check()
            frame = self._session._connection.respond(self.stream_id, status, headers)
            self._responded = True
            return [frame]

        await self._session._send_made(make)

    async def respond_whole(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Send the whole response: head, body and END, in one message to a peer that reads
        BATCH when the body fits in the stream's window (else as :meth:`respond`, :meth:`send`
        and :meth:`end` would)."""
        connection = self._session._connection
        if len(body) > connection.send_window(self.stream_id):
            await self.respond(status, headers)
            await self.send(body)
            await self.end()
            return

        def make() -> list[bytes]:
            self._check()
            frames = [connection.respond(self.stream_id, status, headers)]
            self._responded = True
            if body:
                frames += connection.send_data(self.stream_id, body)
            frames.append(self._end_frame())
            return frames

        await self._session._send_made(make)

    async def send(self, data: bytes) -> None:
        """Send response body bytes, waiting for the peer's window (this is the back-pressure)."""
        await self._send_data(data)

    async def end(self) -> None:
        """END the response."""
        await self._end()


class LinkSession:
    """One link: a transport, the protocol core, the streams and the control channel.

    ``run()`` returns normally when the transport ends, when :meth:`close` is
    called, or when the peer breaks the protocol (the reason is in
    :attr:`close_reason`); an exception raised by ``on_control`` (or
    ``on_control_nowait``) ends the session and is re-raised by ``run()``. An
    exception raised by ``on_stream`` is logged and its stream reset.
    """

    def __init__(
        self,
        connection: LinkConnection,
        transport: MessageTransport,
        *,
        on_stream: Callable[[InboundStream], Awaitable[None]] | None = None,
        on_control: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        on_control_nowait: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if on_control is not None and on_control_nowait is not None:
            raise ValueError("give on_control or on_control_nowait, not both")
        self._connection = connection
        self._transport = transport
        self._on_stream = on_stream
        self._on_control = on_control
        self._on_control_nowait = on_control_nowait
        self._send_lock = trio.Lock()
        self._streams: dict[int, _Stream] = {}
        #: run()'s nursery: cancelling its scope ends run()
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._running = False
        self._control_send: trio.MemorySendChannel[dict[str, Any]] | None = None
        self._control_receive: trio.MemoryReceiveChannel[dict[str, Any]] | None = None
        if on_control_nowait is None:
            channel = trio.open_memory_channel[dict[str, Any]](CONTROL_QUEUE)
            self._control_send, self._control_receive = channel
        self._control_error: BaseException | None = None
        #: why the session ended (None while it runs)
        self.close_reason: str | None = None
        #: whether the peer reads BATCH frames (it said so in the handshake): frames made
        #: together are then sent together, in as few messages as fit
        self.batching = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or :meth:`run` ended."""
        return self._closed

    @property
    def open_streams(self) -> int:
        """Streams open on this link now, either way (metrics)."""
        return len(self._streams)

    def close(self) -> None:
        """End :meth:`run` soon (cancels its nursery)."""
        self._end("closed by this end")
        self._cancel()

    def _cancel(self) -> None:
        # run() checks _closed before it reads, so a session closed before it runs ends at once.
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # --- running ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the transport until it ends; ``started`` at once. See the class docstring."""
        if self._running:
            raise RuntimeError("a LinkSession runs once")
        self._running = True
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._control_receive is not None:
                nursery.start_soon(self._control_loop, self._control_receive)
            task_status.started()
            try:
                # The read loop, inline: an idle link waits here, and each frame of its own
                # would be kept as long as the link lives (thousands of them on a manager).
                while not self._closed:
                    try:
                        message = await self._transport.receive()
                    except LinkClosed as exc:
                        self._end(f"transport closed: {exc}" if str(exc) else "transport closed")
                        break
                    if not await self._handle_message(message, nursery):
                        break
                    # Nothing of it stays referenced while the next message is awaited: an idle
                    # link would otherwise keep its last heartbeat, parsed (~2 KB), for as long.
                    del message
            finally:
                self._end(self.close_reason or "closed by this end")
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await self._close_transport()
        if self._control_error is not None:
            raise self._control_error

    async def _close_transport(self) -> None:
        with contextlib.suppress(LinkClosed, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await self._transport.aclose()

    def _end(self, reason: str) -> None:
        """Mark the session closed and fail every open stream (synchronous)."""
        if self.close_reason is None:
            self.close_reason = reason
        self._closed = True
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(LinkClosed(f"the link closed: {self.close_reason}"))
        if self._control_send is not None:
            self._control_send.close()

    async def _handle_message(self, message: bytes, nursery: trio.Nursery) -> bool:
        """Feed one message to the connection and dispatch its events; False once the link ends."""
        try:
            events = self._connection.receive_message(message)
        except LinkProtocolError as exc:
            logger.warning("link protocol error, closing the link: %s", exc)
            self._end(f"protocol error: {exc}")
            return False
        for event in events:
            replies = self._dispatch(event, nursery)
            if replies:
                try:
                    await self._send_made(partial(list, replies))
                except LinkClosed:
                    return False
            if self._closed:
                return False
        return True

    def _dispatch(self, event: object, nursery: trio.Nursery) -> list[bytes]:
        """Hand one event on without waiting; returns frames to send (a refusal's RESET)."""
        match event:
            case ControlReceived(message=message) if self._on_control_nowait is not None:
                try:
                    self._on_control_nowait(message)
                except Exception as exc:  # noqa: BLE001 - re-raised by run()
                    self._control_error = exc
                    self._end(f"control handler failed: {exc!r}")
            case ControlReceived(message=message) if self._control_send is not None:
                try:
                    self._control_send.send_nowait(message)
                except trio.WouldBlock:
                    logger.warning("control messages arrive faster than they are handled; closing the link")
                    self._end(f"control handler {CONTROL_QUEUE} messages behind")
                except trio.ClosedResourceError:
                    pass
            case StreamOpened(stream_id=sid, method=method, path=path, headers=headers):
                inbound = InboundStream(self, sid, method, path, list(headers))
                self._streams[sid] = inbound
                nursery.start_soon(self._serve_stream, inbound)
            case ResponseStarted(stream_id=sid, status=status, headers=headers):
                stream = self._streams.get(sid)
                if isinstance(stream, OutboundStream):
                    stream._respond_remote(status, list(headers))
            case DataReceived(stream_id=sid, data=data):
                stream = self._streams.get(sid)
                if stream is not None:
                    stream._push(data)
            case StreamEnded(stream_id=sid):
                stream = self._streams.get(sid)
                if stream is not None:
                    stream._end_remote()
                    self._forget_if_gone(stream)
            case StreamReset(stream_id=sid, reason=reason):
                stream = self._streams.pop(sid, None)
                if stream is not None:
                    stream._fail(StreamAborted(reason))
            case StreamRefused(reply=reply):
                return [reply]
            case WindowUpdated(stream_id=sid):
                stream = self._streams.get(sid)
                if stream is not None:
                    stream._notify()
        return []

    async def _control_loop(self, receive: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
        async with receive:
            async for message in receive:
                if self._on_control is None:
                    continue
                try:
                    await self._on_control(message)
                except Exception as exc:  # noqa: BLE001 - re-raised by run()
                    self._control_error = exc
                    self._end(f"control handler failed: {exc!r}")
                    self._cancel()
                    return

    async def _serve_stream(self, stream: InboundStream) -> None:
        try:
            if self._on_stream is None:
                await stream.reset("this end serves no streams")
                return
            await self._on_stream(stream)
        except (LinkClosed, StreamAborted):
            pass
        except Exception:
            logger.exception("stream %d (%s %s) failed", stream.stream_id, stream.method, stream.path)
            await stream.reset("internal error")
            return
        if not self._closed and stream.stream_id in self._streams and not stream._local_ended:
            await stream.reset("the handler ended without finishing the response")

    # --- sending ----------------------------------------------------------------

    def _consumed(self, stream_id: int, n: int) -> list[bytes]:
        if self._closed:
            return []
        frame = self._connection.consumed(stream_id, n)
        return [] if frame is None else [frame]

    def _forget_if_gone(self, stream: _Stream) -> None:
        if self._connection.stream_state(stream.stream_id) in _GONE:
            self._streams.pop(stream.stream_id, None)

    async def _send_made(self, make: Callable[[], Iterable[bytes]]) -> None:
        """Make frames and send them, both under the send lock (see the module docstring)."""
        async with self._send_lock:
            if self._closed:
                raise LinkClosed(f"the link closed: {self.close_reason}")
            frames = list(make())
            if self.batching and len(frames) > 1:
                frames = self._connection.batch(frames)
            for frame in frames:
                with trio.CancelScope(shield=True):
                    try:
                        await self._transport.send(frame)
                    except LinkClosed as exc:
                        self._end(f"transport closed: {exc}")
                        self._cancel()
                        raise

    async def send_control(self, message: ControlMessage | dict[str, Any]) -> None:
        """Send a control message (stream 0; never flow-controlled)."""
        await self._send_made(lambda: [self._connection.send_control(message)])

    async def open_stream(
        self, method: str, path: str, headers: list[tuple[str, str]], *, end: bool = False
    ) -> OutboundStream:
        """Open a stream with this request head; send its body, then read its response.
        With ``end``, the request has no body: OPEN and END go together (one message to a
        peer that reads BATCH)."""
        opened: list[OutboundStream] = []

        def make() -> list[bytes]:
            stream_id, frame = self._connection.open_stream(method, path, headers)
            stream = OutboundStream(self, stream_id)
            self._streams[stream_id] = stream
            opened.append(stream)
            return [frame, stream._end_frame()] if end else [frame]

        await self._send_made(make)
        return opened[0]


class MemoryTransport:
    """One end of an in-memory :class:`MessageTransport` pair (tests, embedding)."""

    def __init__(
        self, send_channel: trio.MemorySendChannel[bytes], receive_channel: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        self._send_channel = send_channel
        self._receive_channel = receive_channel

    async def send(self, message: bytes) -> None:
        try:
            await self._send_channel.send(bytes(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise LinkClosed("the peer closed the transport") from None

    async def receive(self) -> bytes:
        try:
            return await self._receive_channel.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            raise LinkClosed("the peer closed the transport") from None

    async def aclose(self) -> None:
        self._send_channel.close()
        self._receive_channel.close()


def memory_transport_pair(
    buffer: int | float = MEMORY_TRANSPORT_BUFFER,
) -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected in-memory transports, each direction a bounded channel of ``buffer`` messages."""
    if buffer != math.inf and buffer < 0:
        raise ValueError("buffer must be >= 0")
    a_send, b_receive = trio.open_memory_channel[bytes](buffer)
    b_send, a_receive = trio.open_memory_channel[bytes](buffer)
    return MemoryTransport(a_send, a_receive), MemoryTransport(b_send, b_receive)
