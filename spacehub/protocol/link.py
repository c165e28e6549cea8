"""The link between a hub and its manager: a sans-I/O stream multiplexer.

Theory of operation
-------------------
The hub dials out to the manager and keeps one authenticated websocket open. Over
it the manager opens many concurrent *streams*; each carries one HTTP exchange into
the hub's own API: the request head and a streaming body one way, the response
head and a streaming body back. Stream 0 carries control messages (heartbeats and
load reports, the hub summary, topic announcements, join and auth messages).

Both ends run a :class:`LinkConnection`. The Trio shell around it feeds every
binary websocket message it receives to :meth:`LinkConnection.receive_message`,
which returns events, and sends every ``bytes`` the connection's methods return as
one binary websocket message, in the order returned. Nothing here does I/O, keeps
a clock or imports trio: the core is tested by pairing two ends in memory.

Frames
------
One frame is one websocket binary message::

    offset  size  field
    0       1     type (FrameType)
    1       4     stream id, unsigned, big-endian
    5       ...   payload, by type:

    type      value  stream id  payload                                          at most
    OPEN      1      a new one  JSON {"method", "path", "headers": [[k, v], ..]}  MAX_HEAD_BYTES
    RESPONSE  2      > 0        JSON {"status", "headers": [[k, v], ..]}          MAX_HEAD_BYTES
    DATA      3      > 0        body bytes                                       MAX_FRAME_PAYLOAD
    END       4      > 0        none: the sender's direction is finished         0
    RESET     5      > 0        JSON {"reason"}: both directions are aborted     MAX_HEAD_BYTES
    WINDOW    6      > 0        u32 big-endian increment >= 1                    4
    CONTROL   7      0          JSON object                                      MAX_HEAD_BYTES
    BATCH     8      0          frames, each a u32 big-endian length and the     MAX_BATCH_BYTES
                                frame (any type but BATCH), handled in order

A BATCH carries a short exchange in one websocket message: OPEN and END of a
request without a body, or RESPONSE, DATA and END of a small answer. Each message
costs a pass through the websocket and TLS layers of both ends, which for a small
call through the link was most of its cost. An end sends BATCH only to a peer that
said it reads them (``"linkFeatures": ["batch"]`` in the handshake, see
docs/link.md); older peers would fail the link on the unknown type.

JSON objects may carry keys this version does not know; they are ignored. A method
is an HTTP token, a path is the raw request target (starts with ``/``, visible
ASCII, query included), header names are tokens and values hold no CR, LF or NUL,
a status is 100-599.

Stream ids: the manager opens odd ids, the hub even ids, each side in increasing
order (gaps allowed). An OPEN with the other side's parity, or with an id at or
below the last one that side opened, is a protocol error.

States
------
A stream is two *halves*, one per direction: the opener's (request) and the
answerer's (response). OPEN creates the stream with the opener's half OPEN and
the answerer's half IDLE. Each half moves by :data:`HALF_TRANSITIONS`::

    half    frame on that half        next
    IDLE    RESPONSE                  OPEN     (only the answerer's half starts IDLE)
    OPEN    DATA                      OPEN
    OPEN    END                       ENDED
    any     RESET, sent or received   the whole stream is reset and forgotten

Any other (half, frame) pair is refused: with :class:`LocalProtocolError` when the
caller tries to send it (nothing is sent, nothing changes), with
:class:`LinkProtocolError` when the peer sent it. The stream's state, as
:meth:`LinkConnection.stream_state` names it, follows from its two halves::

                        remote IDLE or OPEN    remote ENDED
    local IDLE or OPEN  OPEN                   HALF_CLOSED_REMOTE
    local ENDED         HALF_CLOSED_LOCAL      CLOSED

plus IDLE (the id is not used yet) and RESET. A CLOSED or RESET stream is
forgotten at once; only its id stays, with how it ended, among the last
:data:`RECENTLY_CLOSED` ids, so that memory is bounded however many streams a link
carries.

Flow control
------------
Every stream has, at each end, a *send window* (DATA bytes this end may still
send; it starts at :data:`INITIAL_WINDOW`) and a *receive window* (DATA bytes the
peer may still send). Sending DATA shrinks the sender's send window; receiving it
shrinks the receiver's receive window, and DATA beyond it is a protocol error.
Credit comes back only when the application says it has really handed bytes on
(:meth:`LinkConnection.consumed`, e.g. once written to the HTTP client); the
connection batches that credit and returns a WINDOW frame once at least half the
initial window is owed (none once the peer has ended its direction). A WINDOW
received grows the send window, never above :data:`MAX_WINDOW`; one that arrives
after this end sent END is ignored. So a reader that stops reading one stream holds back that
stream only: control messages, WINDOW frames and other streams are not
flow-controlled and always pass, and a body of any size crosses with at most a
window's worth of bytes in flight per stream. The shell checks
:meth:`LinkConnection.send_window` before :meth:`LinkConnection.send_data` and
waits for a :class:`WindowUpdated` event when it is short.

Late frames
-----------
Frames cross on the wire: the peer may still be sending DATA when our RESET
reaches it, or grant a WINDOW just before it sees our END. For a stream that is
gone, frames received are handled so::

    frame received        after we reset it     closed, reset by the peer, or forgotten
    WINDOW, RESET         ignored               ignored
    DATA, END, RESPONSE   ignored               LinkProtocolError
    OPEN                  LinkProtocolError (the id is reused)

A frame other than OPEN for an id never opened is a protocol error. An OPEN beyond
:data:`MAX_CONCURRENT_STREAMS` live streams opened by the peer is not a
connection error: the stream is refused with a :class:`StreamRefused` event whose
``reply`` (a RESET frame) the shell sends, and the peer's frames still in flight
for it are ignored as above.

Errors
------
::

    LinkError                  .status: the HTTP status an API answers with
    ├── LinkProtocolError  502 the peer broke the protocol; the connection is
    │                          failed (every later receive raises) and the
    │                          shell closes the websocket
    └── LocalProtocolError 500 the caller asked for something the protocol does
                               not allow; nothing was sent, nothing changed
"""

from __future__ import annotations

import json
import re
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, Final, Literal, TypeAlias

from .control import CONTROL_TYPES, ControlMessage
from .control import encode as encode_control
from .errors import ProtocolError

#: Largest DATA payload in one frame; ``send_data`` splits longer bodies.
MAX_FRAME_PAYLOAD: Final = 256 * 1024  # measured: 64 KiB frames cost ~25 % of link throughput
#: Largest JSON payload (OPEN, RESPONSE, RESET, CONTROL).
MAX_HEAD_BYTES: Final = 64 * 1024
#: Largest BATCH payload: batches are for short exchanges; longer ones go frame by frame.
MAX_BATCH_BYTES: Final = 64 * 1024
#: The feature name peers exchange in the handshake to say they read BATCH frames.
BATCH_FEATURE: Final = "batch"
#: Send and receive window of every new stream, in DATA bytes.
INITIAL_WINDOW: Final = 1024 * 1024
#: Largest send window a peer may grant on one stream.
MAX_WINDOW: Final = 16 * 1024 * 1024
#: Most live streams one side may have opened at a time; more are refused with RESET.
MAX_CONCURRENT_STREAMS: Final = 64  # with INITIAL_WINDOW: at most 64 MiB buffered per link and side
#: How many ids of gone streams are remembered, to tell late frames from violations.
RECENTLY_CLOSED: Final = 1024
#: Longest RESET reason sent, in characters; longer reasons are cut.
MAX_RESET_REASON: Final = 4096

#: Type byte and stream id.
FRAME_HEADER_SIZE: Final = 5
#: Highest stream id (the field is a u32).
MAX_STREAM_ID: Final = 2**32 - 1
#: Stream 0 carries CONTROL frames only.
CONTROL_STREAM: Final = 0

_HEADER: Final = struct.Struct(">BI")
_INCREMENT: Final = struct.Struct(">I")
_LENGTH: Final = struct.Struct(">I")
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH: Final = re.compile(r"/[\x21-\x7e]*")
_BAD_VALUE_CHARS: Final = re.compile(r"[\r\n\x00]")

Role: TypeAlias = Literal["manager", "hub"]


class FrameType(IntEnum):
    """The first byte of every frame."""

    #: opener -> peer: a new stream with its request head
    OPEN = 1
    #: answerer -> opener: the response head
    RESPONSE = 2
    #: body bytes, flow-controlled
    DATA = 3
    #: the sender's direction is finished (half-close)
    END = 4
    #: abort both directions, with a reason
    RESET = 5
    #: the sender grants the peer more DATA bytes on this stream
    WINDOW = 6
    #: a control message, stream 0 only
    CONTROL = 7
    #: several frames in one message, stream 0 only
    BATCH = 8


class StreamState(Enum):
    """A stream as one end sees it (see the table in the module docstring)."""

    #: the id has not been used
    IDLE = "idle"
    #: neither direction has ended
    OPEN = "open"
    #: this end sent END; the peer's direction goes on
    HALF_CLOSED_LOCAL = "half-closed-local"
    #: the peer sent END; this end's direction goes on
    HALF_CLOSED_REMOTE = "half-closed-remote"
    #: both directions ended; the stream is forgotten
    CLOSED = "closed"
    #: one side sent RESET; the stream is forgotten
    RESET = "reset"


class Half(Enum):
    """One direction of a stream."""

    #: no head sent yet (the answerer's direction, before RESPONSE)
    IDLE = "idle"
    #: head sent; DATA may flow
    OPEN = "open"
    #: END sent
    ENDED = "ended"


#: How a direction moves; a pair not listed is a protocol error (OPEN creates streams, RESET ends them).
HALF_TRANSITIONS: Final[dict[tuple[Half, FrameType], Half]] = {
    (Half.IDLE, FrameType.RESPONSE): Half.OPEN,
    (Half.OPEN, FrameType.DATA): Half.OPEN,
    (Half.OPEN, FrameType.END): Half.ENDED,
}


class LinkError(ProtocolError):
    """Base of the link's errors; ``status`` is the HTTP status an API answers with."""

    status: int = 500


class LinkProtocolError(LinkError):
    """The peer sent something the protocol does not allow; the connection is failed."""

    status = 502


class LocalProtocolError(LinkError):
    """The caller asked to send something the protocol does not allow; nothing changed."""

    status = 500


def _check_stream_id(stream_id: object, error: type[LinkError]) -> None:
    if type(stream_id) is not int or not 0 < stream_id <= MAX_STREAM_ID:
        raise error(f"stream id must be an integer in 1..{MAX_STREAM_ID}, not {stream_id!r}")


def _check_headers(headers: object, error: type[LinkError]) -> None:
    if not isinstance(headers, tuple):
        raise error("headers must be a tuple of (name, value) pairs")
    for pair in headers:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise error(f"header {pair!r} is not a (name, value) pair")
        name, value = pair
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise error(f"header name {name!r} is not an HTTP token")
        if not isinstance(value, str) or _BAD_VALUE_CHARS.search(value):
            raise error(f"header {name!r} has a value that is not a string without CR, LF and NUL")


def _check_request(method: object, path: object, headers: object, error: type[LinkError]) -> None:
    if not isinstance(method, str) or not _TOKEN.fullmatch(method):
        raise error(f"method {method!r} is not an HTTP token")
    if not isinstance(path, str) or not _PATH.fullmatch(path):
        raise error(f"path {path!r} must start with '/' and hold visible ASCII only")
    _check_headers(headers, error)


def _check_status(status: object, error: type[LinkError]) -> None:
    if type(status) is not int or not 100 <= status <= 599:
        raise error(f"status must be an integer in 100..599, not {status!r}")


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream with this request head; its body follows as DataReceived."""

    stream_id: int
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id, LinkProtocolError)
        _check_request(self.method, self.path, self.headers, LinkProtocolError)


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """The answer to a stream this end opened; its body follows as DataReceived."""

    stream_id: int
    status: int
    headers: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id, LinkProtocolError)
        _check_status(self.status, LinkProtocolError)
        _check_headers(self.headers, LinkProtocolError)


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Body bytes; call ``consumed(stream_id, len(data))`` once they are handed on."""

    stream_id: int
    data: bytes

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id, LinkProtocolError)
        if not isinstance(self.data, bytes) or not 0 < len(self.data) <= MAX_FRAME_PAYLOAD:
            raise LinkProtocolError(f"DATA must be 1..{MAX_FRAME_PAYLOAD} bytes")


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer's direction of the stream is finished."""

    stream_id: int

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id, LinkProtocolError)


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted the stream; it is forgotten, stop sending on it."""

    stream_id: int
    reason: str

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id, LinkProtocolError)
        if not isinstance(self.reason, str):
            raise LinkProtocolError("RESET reason must be a string")


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """The peer opened a stream over MAX_CONCURRENT_STREAMS; send ``reply`` (a RESET frame)."""

    stream_id: int
    reason: str
    reply: bytes

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id, LinkProtocolError)
        if not isinstance(self.reason, str) or not isinstance(self.reply, bytes):
            raise LinkProtocolError("a refusal needs a reason and the RESET frame to send")


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted ``increment`` more DATA bytes on the stream."""

    stream_id: int
    increment: int

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id, LinkProtocolError)
        if type(self.increment) is not int or not 0 < self.increment <= MAX_WINDOW:
            raise LinkProtocolError(f"WINDOW increment must be in 1..{MAX_WINDOW}, not {self.increment!r}")


@dataclass(frozen=True, slots=True)
class ControlReceived:
    """A control message (stream 0)."""

    message: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.message, dict):
            raise LinkProtocolError("a control message must be a JSON object")


Event: TypeAlias = (
    StreamOpened
    | ResponseStarted
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamRefused
    | WindowUpdated
    | ControlReceived
)


class _Gone(Enum):
    """How a forgotten stream ended, for telling late frames from violations."""

    CLOSED = "closed"
    RESET_BY_US = "reset by us"
    RESET_BY_PEER = "reset by the peer"


@dataclass(slots=True)
class _Stream:
    opened_here: bool
    local: Half
    remote: Half
    #: DATA bytes this end may still send
    send_window: int = INITIAL_WINDOW
    #: DATA bytes the peer may still send
    receive_window: int = INITIAL_WINDOW
    #: received, not yet reported consumed by the application
    unconsumed: int = 0
    #: consumed, not yet granted back with WINDOW
    ungranted: int = 0

    @property
    def state(self) -> StreamState:
        if self.local is Half.ENDED:
            return StreamState.CLOSED if self.remote is Half.ENDED else StreamState.HALF_CLOSED_LOCAL
        return StreamState.HALF_CLOSED_REMOTE if self.remote is Half.ENDED else StreamState.OPEN


def _frame(frame_type: FrameType, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    return b"".join((_HEADER.pack(frame_type, stream_id), payload))


def _pack_batch(frames: Sequence[bytes]) -> bytes:
    items = [part for frame in frames for part in (_LENGTH.pack(len(frame)), frame)]
    return b"".join((_HEADER.pack(FrameType.BATCH, CONTROL_STREAM), *items))


def _dump_json(value: object, what: str) -> bytes:
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"{what} is not JSON: {exc}") from None
    raw = text.encode("utf-8")
    if len(raw) > MAX_HEAD_BYTES:
        raise LocalProtocolError(f"{what} is {len(raw)} bytes of JSON, over {MAX_HEAD_BYTES}")
    return raw


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _load_object(payload: bytes, frame_type: FrameType) -> dict[str, Any]:
    try:
        value = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LinkProtocolError(f"{frame_type.name} payload is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise LinkProtocolError(f"{frame_type.name} payload must be a JSON object")
    return value


def _field(head: dict[str, Any], key: str) -> Any:
    """A JSON field of any type, or None; the event built from it checks the type."""
    return head.get(key)


def _load_headers(value: object, frame_type: FrameType) -> tuple[tuple[str, str], ...]:
    """JSON ``[[k, v], ...]`` as tuples; the event checks the strings."""
    if not isinstance(value, list):
        raise LinkProtocolError(f"{frame_type.name} headers must be a list of [name, value] pairs")
    pairs = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise LinkProtocolError(f"{frame_type.name} header {item!r} is not a [name, value] pair")
        pairs.append((item[0], item[1]))
    return tuple(pairs)


def _headers_tuple(headers: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    try:
        pairs = tuple((name, value) for name, value in headers)
    except (TypeError, ValueError):
        raise LocalProtocolError("headers must be (name, value) pairs") from None
    _check_headers(pairs, LocalProtocolError)
    return pairs


class LinkConnection:
    """One end of the link. See the module docstring for the protocol.

    Methods that send return the websocket messages to send, in order; they check
    everything before changing anything, so a :class:`LocalProtocolError` leaves the
    connection as it was. :meth:`receive_message` returns the events one message
    brings (none for an ignored late frame); after a :class:`LinkProtocolError` the
    connection is failed and every later receive raises again.
    """

    def __init__(self, role: Role) -> None:
        if role not in ("manager", "hub"):
            raise LocalProtocolError(f"role must be 'manager' or 'hub', not {role!r}")
        self.role: Final[Role] = role
        # The manager opens odd ids, the hub even ones.
        self._parity: Final = 1 if role == "manager" else 0
        self._next_id = 1 if role == "manager" else 2
        self._last_peer_id = 0
        self._streams: dict[int, _Stream] = {}
        self._opened_here = 0
        self._opened_by_peer = 0
        self._gone: OrderedDict[int, _Gone] = OrderedDict()
        self._failure: LinkProtocolError | None = None

    # --- introspection -----------------------------------------------------

    def open_streams(self) -> int:
        """Live streams, opened by either side."""
        return len(self._streams)

    def stream_state(self, stream_id: int) -> StreamState:
        """The stream's state as this end sees it."""
        _check_stream_id(stream_id, LocalProtocolError)
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream.state
        gone = self._gone_as(stream_id)
        if gone is None:
            return StreamState.IDLE
        return StreamState.CLOSED if gone is _Gone.CLOSED else StreamState.RESET

    def send_window(self, stream_id: int) -> int:
        """DATA bytes :meth:`send_data` accepts now on the stream (0 once this end may not send)."""
        stream = self._live_or_gone(stream_id, "ask the send window of")
        if stream is None or stream.local is Half.ENDED:
            return 0
        return stream.send_window

    # --- sending -------------------------------------------------------------

    def open_stream(self, method: str, path: str, headers: Sequence[tuple[str, str]]) -> tuple[int, bytes]:
        """A new stream with this request head: its id and the OPEN frame."""
        pairs = _headers_tuple(headers)
        _check_request(method, path, pairs, LocalProtocolError)
        if self._opened_here >= MAX_CONCURRENT_STREAMS:
            raise LocalProtocolError(f"{MAX_CONCURRENT_STREAMS} streams opened here are live already")
        if self._next_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids are exhausted; open a new link")
        payload = _dump_json(
            {"method": method, "path": path, "headers": [list(pair) for pair in pairs]}, "OPEN head"
        )
        stream_id = self._next_id
        self._next_id += 2
        self._streams[stream_id] = _Stream(opened_here=True, local=Half.OPEN, remote=Half.IDLE)
        self._opened_here += 1
        return stream_id, _frame(FrameType.OPEN, stream_id, payload)

    def respond(self, stream_id: int, status: int, headers: Sequence[tuple[str, str]]) -> bytes:
        """The RESPONSE frame answering a stream the peer opened."""
        pairs = _headers_tuple(headers)
        _check_status(status, LocalProtocolError)
        stream, next_half = self._local_step(stream_id, FrameType.RESPONSE)
        payload = _dump_json({"status": status, "headers": [list(pair) for pair in pairs]}, "RESPONSE head")
        stream.local = next_half
        return _frame(FrameType.RESPONSE, stream_id, payload)

    def send_data(self, stream_id: int, data: bytes) -> list[bytes]:
        """DATA frames carrying ``data``; it must fit in :meth:`send_window`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise LocalProtocolError("data must be bytes")
        stream, _ = self._local_step(stream_id, FrameType.DATA)
        view = memoryview(data).cast("B")
        if len(view) > stream.send_window:
            raise LocalProtocolError(
                f"{len(view)} bytes exceed the send window of stream {stream_id} ({stream.send_window})"
            )
        stream.send_window -= len(view)
        return [
            _frame(FrameType.DATA, stream_id, view[start : start + MAX_FRAME_PAYLOAD])
            for start in range(0, len(view), MAX_FRAME_PAYLOAD)
        ]

    def end_stream(self, stream_id: int) -> bytes:
        """The END frame finishing this end's direction."""
        stream, next_half = self._local_step(stream_id, FrameType.END)
        stream.local = next_half
        if stream.remote is Half.ENDED:
            self._forget(stream_id, stream, _Gone.CLOSED)
        return _frame(FrameType.END, stream_id)

    def reset_stream(self, stream_id: int, reason: str) -> bytes | None:
        """The RESET frame aborting the stream, or None if it is closed or reset already."""
        if not isinstance(reason, str):
            raise LocalProtocolError("a RESET reason must be a string")
        stream = self._live_or_gone(stream_id, "reset")
        if stream is None:
            return None
        payload = _dump_json({"reason": reason[:MAX_RESET_REASON]}, "RESET reason")
        self._forget(stream_id, stream, _Gone.RESET_BY_US)
        return _frame(FrameType.RESET, stream_id, payload)

    def consumed(self, stream_id: int, n: int) -> bytes | None:
        """Report ``n`` received bytes handed on; a WINDOW frame once half a window is owed, else None."""
        if type(n) is not int or n < 0:
            raise LocalProtocolError(f"consumed bytes must be a non-negative integer, not {n!r}")
        stream = self._live_or_gone(stream_id, "consume on")
        if stream is None:
            return None
        if n > stream.unconsumed:
            raise LocalProtocolError(
                f"{n} bytes consumed on stream {stream_id}, but only {stream.unconsumed} are unconsumed"
            )
        stream.unconsumed -= n
        if stream.remote is Half.ENDED:
            return None  # the peer sends no more: credit would be wasted
        stream.ungranted += n
        if stream.ungranted < INITIAL_WINDOW // 2:
            return None
        increment, stream.ungranted = stream.ungranted, 0
        stream.receive_window += increment
        return _frame(FrameType.WINDOW, stream_id, _INCREMENT.pack(increment))

    @staticmethod
    def batch(frames: Sequence[bytes]) -> list[bytes]:
        """``frames`` (as made by this connection's methods) in as few messages as fit:
        consecutive frames go into one BATCH while it stays within :data:`MAX_BATCH_BYTES`;
        a frame too large for any batch goes alone. Send these instead of the frames, to a
        peer that reads BATCH; the connection's state does not change."""
        messages: list[bytes] = []
        group: list[bytes] = []
        size = 0

        def flush() -> None:
            if group:
                messages.append(_pack_batch(group) if len(group) > 1 else group[0])
                group.clear()

        for frame in frames:
            if not isinstance(frame, bytes) or len(frame) < FRAME_HEADER_SIZE or frame[0] == FrameType.BATCH:
                raise LocalProtocolError("only frames made by a LinkConnection can be batched")
            item = _LENGTH.size + len(frame)
            if size + item > MAX_BATCH_BYTES:
                flush()
                size = 0
            if item > MAX_BATCH_BYTES:
                messages.append(frame)
                continue
            group.append(frame)
            size += item
        flush()
        return messages

    def send_control(self, message: ControlMessage | dict[str, Any]) -> bytes:
        """The CONTROL frame carrying ``message`` (a :mod:`~spacehub.protocol.control`
        message, or the JSON object itself)."""
        if not isinstance(message, dict):
            if not isinstance(message, CONTROL_TYPES):
                raise LocalProtocolError("a control message must be a control dataclass or a dict")
            message = encode_control(message)
        return _frame(FrameType.CONTROL, CONTROL_STREAM, _dump_json(message, "control message"))

    # --- receiving -----------------------------------------------------------

    def receive_message(self, message: bytes) -> list[Event]:
        """The events one websocket binary message brings."""
        if self._failure is not None:
            raise LinkProtocolError(f"the link failed earlier: {self._failure}")
        try:
            return self._receive(message)
        except LinkProtocolError as exc:
            self._failure = exc
            raise

    def _receive(self, message: bytes) -> list[Event]:
        if len(message) >= FRAME_HEADER_SIZE and message[0] == FrameType.BATCH:
            return self._receive_batch(message)
        return self._receive_frame(message)

    def _receive_batch(self, message: bytes) -> list[Event]:
        _, stream_id = _HEADER.unpack_from(message)
        if stream_id != CONTROL_STREAM:
            raise LinkProtocolError(f"BATCH on stream {stream_id}; batches belong on stream 0")
        view = memoryview(message)[FRAME_HEADER_SIZE:]
        self._check_payload_size(FrameType.BATCH, len(view))
        if not view:
            raise LinkProtocolError("an empty BATCH")
        events: list[Event] = []
        while view:
            if len(view) < _LENGTH.size:
                raise LinkProtocolError("a BATCH ends inside a frame's length")
            (length,) = _LENGTH.unpack_from(view)
            frame, view = view[_LENGTH.size : _LENGTH.size + length], view[_LENGTH.size + length :]
            if len(frame) != length:
                raise LinkProtocolError(f"a BATCH ends inside a frame of {length} bytes")
            if length >= 1 and frame[0] == FrameType.BATCH:
                raise LinkProtocolError("a BATCH inside a BATCH")
            events.extend(self._receive_frame(bytes(frame)))
        return events

    def _receive_frame(self, message: bytes) -> list[Event]:
        if len(message) < FRAME_HEADER_SIZE:
            raise LinkProtocolError(f"a frame of {len(message)} bytes is shorter than its header")
        type_byte, stream_id = _HEADER.unpack_from(message)
        try:
            frame_type = FrameType(type_byte)
        except ValueError:
            raise LinkProtocolError(f"unknown frame type {type_byte}") from None
        payload = bytes(message[FRAME_HEADER_SIZE:])
        self._check_payload_size(frame_type, len(payload))
        if frame_type is FrameType.CONTROL:
            if stream_id != CONTROL_STREAM:
                raise LinkProtocolError(f"CONTROL on stream {stream_id}; control belongs on stream 0")
            return [ControlReceived(_load_object(payload, frame_type))]
        if stream_id == CONTROL_STREAM:
            raise LinkProtocolError(f"{frame_type.name} on stream 0, which carries CONTROL only")
        # Decode first, so that a malformed payload is an error whatever the stream's state.
        event = self._decode(frame_type, stream_id, payload)
        if frame_type is FrameType.OPEN:
            assert isinstance(event, StreamOpened)
            return self._receive_open(event)
        stream = self._streams.get(stream_id)
        if stream is None:
            return self._receive_for_gone(frame_type, stream_id)
        if frame_type is FrameType.RESET:
            assert isinstance(event, StreamReset)
            self._forget(stream_id, stream, _Gone.RESET_BY_PEER)
            return [event]
        if frame_type is FrameType.WINDOW:
            assert isinstance(event, WindowUpdated)
            return self._receive_window(stream, event)
        next_half = HALF_TRANSITIONS.get((stream.remote, frame_type))
        if next_half is None:
            raise LinkProtocolError(
                f"{frame_type.name} on stream {stream_id} ({stream.state.value}, "
                f"peer's direction {stream.remote.value})"
            )
        if frame_type is FrameType.DATA:
            if len(payload) > stream.receive_window:
                raise LinkProtocolError(
                    f"{len(payload)} DATA bytes on stream {stream_id} exceed its window "
                    f"({stream.receive_window})"
                )
            stream.receive_window -= len(payload)
            stream.unconsumed += len(payload)
        stream.remote = next_half
        if stream.remote is Half.ENDED and stream.local is Half.ENDED:
            self._forget(stream_id, stream, _Gone.CLOSED)
        return [event] if event is not None else []

    @staticmethod
    def _check_payload_size(frame_type: FrameType, size: int) -> None:
        if frame_type is FrameType.DATA:
            limit = MAX_FRAME_PAYLOAD
        elif frame_type is FrameType.END:
            limit = 0
        elif frame_type is FrameType.BATCH:
            limit = MAX_BATCH_BYTES
        elif frame_type is FrameType.WINDOW:
            if size != _INCREMENT.size:
                raise LinkProtocolError(f"WINDOW payload must be {_INCREMENT.size} bytes, not {size}")
            return
        else:
            limit = MAX_HEAD_BYTES
        if size > limit:
            raise LinkProtocolError(f"{frame_type.name} payload of {size} bytes is over {limit}")

    @staticmethod
    def _decode(frame_type: FrameType, stream_id: int, payload: bytes) -> Event | None:
        if frame_type is FrameType.OPEN:
            head = _load_object(payload, frame_type)
            return StreamOpened(
                stream_id,
                _field(head, "method"),
                _field(head, "path"),
                _load_headers(_field(head, "headers"), frame_type),
            )
        if frame_type is FrameType.RESPONSE:
            head = _load_object(payload, frame_type)
            return ResponseStarted(
                stream_id, _field(head, "status"), _load_headers(_field(head, "headers"), frame_type)
            )
        if frame_type is FrameType.DATA:
            return DataReceived(stream_id, payload) if payload else None
        if frame_type is FrameType.END:
            return StreamEnded(stream_id)
        if frame_type is FrameType.RESET:
            return StreamReset(stream_id, _field(_load_object(payload, frame_type), "reason"))
        assert frame_type is FrameType.WINDOW
        (increment,) = _INCREMENT.unpack(payload)
        return WindowUpdated(stream_id, increment)

    def _receive_open(self, event: StreamOpened) -> list[Event]:
        stream_id = event.stream_id
        if stream_id % 2 == self._parity:
            raise LinkProtocolError(f"OPEN of stream {stream_id}: ids of that parity are the {self.role}'s")
        if stream_id <= self._last_peer_id:
            raise LinkProtocolError(
                f"OPEN of stream {stream_id} reuses an id (last opened {self._last_peer_id})"
            )
        self._last_peer_id = stream_id
        if self._opened_by_peer >= MAX_CONCURRENT_STREAMS:
            reason = f"too many concurrent streams (at most {MAX_CONCURRENT_STREAMS})"
            self._remember(stream_id, _Gone.RESET_BY_US)
            reply = _frame(FrameType.RESET, stream_id, _dump_json({"reason": reason}, "RESET reason"))
            return [StreamRefused(stream_id, reason, reply)]
        self._streams[stream_id] = _Stream(opened_here=False, local=Half.IDLE, remote=Half.OPEN)
        self._opened_by_peer += 1
        return [event]

    def _receive_window(self, stream: _Stream, event: WindowUpdated) -> list[Event]:
        if stream.local is Half.ENDED:
            return []  # granted before the peer saw our END
        if stream.send_window + event.increment > MAX_WINDOW:
            raise LinkProtocolError(
                f"WINDOW of {event.increment} on stream {event.stream_id} takes its window over {MAX_WINDOW}"
            )
        stream.send_window += event.increment
        return [event]

    def _receive_for_gone(self, frame_type: FrameType, stream_id: int) -> list[Event]:
        gone = self._gone_as(stream_id)
        if gone is None:
            raise LinkProtocolError(f"{frame_type.name} on stream {stream_id}, which was never opened")
        if frame_type in (FrameType.WINDOW, FrameType.RESET) or gone is _Gone.RESET_BY_US:
            return []  # crossed on the wire with our END or RESET
        raise LinkProtocolError(f"{frame_type.name} on stream {stream_id}, which is {gone.value}")

    # --- bookkeeping ---------------------------------------------------------

    def _gone_as(self, stream_id: int) -> _Gone | None:
        """How a stream that is not live ended; None if its id was never used."""
        gone = self._gone.get(stream_id)
        if gone is not None:
            return gone
        used = stream_id < self._next_id if stream_id % 2 == self._parity else stream_id <= self._last_peer_id
        return _Gone.CLOSED if used else None

    def _live_or_gone(self, stream_id: int, action: str) -> _Stream | None:
        """The live stream; None if it is gone; LocalProtocolError if it was never opened."""
        _check_stream_id(stream_id, LocalProtocolError)
        stream = self._streams.get(stream_id)
        if stream is None and self._gone_as(stream_id) is None:
            raise LocalProtocolError(f"cannot {action} stream {stream_id}: it was never opened")
        return stream

    def _local_step(self, stream_id: int, frame_type: FrameType) -> tuple[_Stream, Half]:
        stream = self._live_or_gone(stream_id, f"send {frame_type.name} on")
        if stream is None:
            state = self.stream_state(stream_id)
            raise LocalProtocolError(
                f"cannot send {frame_type.name} on stream {stream_id}: it is {state.value}"
            )
        next_half = HALF_TRANSITIONS.get((stream.local, frame_type))
        if next_half is None:
            raise LocalProtocolError(
                f"cannot send {frame_type.name} on stream {stream_id} ({stream.state.value}, "
                f"this end's direction {stream.local.value})"
            )
        return stream, next_half

    def _forget(self, stream_id: int, stream: _Stream, how: _Gone) -> None:
        del self._streams[stream_id]
        if stream.opened_here:
            self._opened_here -= 1
        else:
            self._opened_by_peer -= 1
        self._remember(stream_id, how)

    def _remember(self, stream_id: int, how: _Gone) -> None:
        self._gone[stream_id] = how
        while len(self._gone) > RECENTLY_CLOSED:
            self._gone.popitem(last=False)
