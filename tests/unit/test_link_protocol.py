"""The link's sans-I/O core: a manager end and a hub end paired in memory.

Rules for these tests: no sockets and no trio; messages are shuttled by hand, in
order per direction; every frame crafted by hand is packed by ``raw()`` here, apart
from the module, so that the tests pin the wire format as well.
"""

from __future__ import annotations

import functools
import json
import random
import struct
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from spacehub.protocol.link import (
    INITIAL_WINDOW,
    MAX_BATCH_BYTES,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_PAYLOAD,
    MAX_HEAD_BYTES,
    MAX_WINDOW,
    RECENTLY_CLOSED,
    ControlReceived,
    DataReceived,
    Event,
    FrameType,
    LinkConnection,
    LinkError,
    LinkProtocolError,
    LocalProtocolError,
    ResponseStarted,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
    StreamState,
    WindowUpdated,
)

OPEN, RESPONSE, DATA, END, RESET, WINDOW, CONTROL, BATCH = 1, 2, 3, 4, 5, 6, 7, 8
HALF = INITIAL_WINDOW // 2


def raw(frame_type: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BI", frame_type, stream_id) + payload


def raw_json(frame_type: int, stream_id: int, value: Any) -> bytes:
    return raw(frame_type, stream_id, json.dumps(value).encode())


def raw_open(stream_id: int, method: str = "GET", path: str = "/api/v1/version") -> bytes:
    return raw_json(OPEN, stream_id, {"method": method, "path": path, "headers": [["accept", "*/*"]]})


def raw_window(stream_id: int, increment: int) -> bytes:
    return raw(WINDOW, stream_id, struct.pack(">I", increment))


def deliver(to: LinkConnection, *messages: bytes | list[bytes] | None) -> list[Event]:
    events: list[Event] = []
    for item in messages:
        if item is None:
            continue
        for message in [item] if isinstance(item, bytes) else item:
            events.extend(to.receive_message(message))
    return events


def pair() -> tuple[LinkConnection, LinkConnection]:
    return LinkConnection("manager"), LinkConnection("hub")


def open_answered(manager: LinkConnection, hub: LinkConnection, path: str = "/x") -> int:
    stream_id, frame = manager.open_stream("GET", path, [])
    deliver(hub, frame)
    deliver(manager, hub.respond(stream_id, 200, []))
    return stream_id


# --- a whole exchange --------------------------------------------------------


def test_open_respond_data_both_ways_end_both_ways_then_forgotten() -> None:
    manager, hub = pair()
    stream_id, frame = manager.open_stream("POST", "/api/v1/instance/a/input?x=1", [("content-type", "text")])
    assert stream_id == 1
    assert frame[:5] == bytes([OPEN, 0, 0, 0, 1])
    assert json.loads(frame[5:]) == {
        "method": "POST",
        "path": "/api/v1/instance/a/input?x=1",
        "headers": [["content-type", "text"]],
    }
    assert deliver(hub, frame) == [
        StreamOpened(1, "POST", "/api/v1/instance/a/input?x=1", (("content-type", "text"),))
    ]
    assert deliver(hub, manager.send_data(1, b"hello ")) == [DataReceived(1, b"hello ")]
    assert deliver(manager, hub.respond(1, 202, [("x-a", "b")])) == [ResponseStarted(1, 202, (("x-a", "b"),))]
    assert deliver(hub, manager.send_data(1, b"world"), manager.end_stream(1)) == [
        DataReceived(1, b"world"),
        StreamEnded(1),
    ]
    assert manager.stream_state(1) is StreamState.HALF_CLOSED_LOCAL
    assert hub.stream_state(1) is StreamState.HALF_CLOSED_REMOTE
    assert deliver(manager, hub.send_data(1, b"ok"), hub.end_stream(1)) == [
        DataReceived(1, b"ok"),
        StreamEnded(1),
    ]
    assert manager.open_streams() == hub.open_streams() == 0
    assert manager.stream_state(1) is hub.stream_state(1) is StreamState.CLOSED
    assert manager.send_window(1) == hub.send_window(1) == 0


def test_control_messages_on_stream_zero() -> None:
    manager, hub = pair()
    frame = hub.send_control({"type": "load", "cpu": 0.5, "streams": []})
    assert frame[:5] == bytes([CONTROL, 0, 0, 0, 0])
    assert deliver(manager, frame) == [ControlReceived({"type": "load", "cpu": 0.5, "streams": []})]


def test_both_sides_may_open_with_their_own_parity() -> None:
    manager, hub = pair()
    ids = []
    for _ in range(3):
        stream_id, frame = manager.open_stream("GET", "/", [])
        deliver(hub, frame)
        ids.append(stream_id)
        stream_id, frame = hub.open_stream("GET", "/", [])
        deliver(manager, frame)
        ids.append(stream_id)
    assert ids == [1, 2, 3, 4, 5, 6]
    assert manager.open_streams() == hub.open_streams() == 6


def test_many_concurrent_streams_interleaved() -> None:
    rng = random.Random(7)
    manager, hub = pair()
    bodies: dict[int, bytes] = {}
    for n in range(MAX_CONCURRENT_STREAMS):
        stream_id, frame = manager.open_stream("GET", f"/s/{n}", [])
        deliver(hub, frame)
        deliver(manager, hub.respond(stream_id, 200, []))
        bodies[stream_id] = rng.randbytes(rng.randrange(1, 3 * MAX_FRAME_PAYLOAD))
    outgoing = []
    for stream_id, body in bodies.items():
        pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
        outgoing.append([frame for piece in pieces for frame in hub.send_data(stream_id, piece)])
        outgoing[-1].append(hub.end_stream(stream_id))
    received: dict[int, bytearray] = {stream_id: bytearray() for stream_id in bodies}
    ended = set()
    while outgoing:
        queue = rng.choice(outgoing)
        for event in deliver(manager, queue.pop(0)):
            if isinstance(event, DataReceived):
                received[event.stream_id] += event.data
                deliver(hub, manager.consumed(event.stream_id, len(event.data)))
            else:
                assert isinstance(event, StreamEnded)
                ended.add(event.stream_id)
        if not queue:
            outgoing.remove(queue)
    assert ended == set(bodies)
    assert {k: bytes(v) for k, v in received.items()} == bodies
    assert hub.open_streams() == MAX_CONCURRENT_STREAMS  # the manager has not ended its side
    for stream_id in bodies:
        deliver(hub, manager.end_stream(stream_id))
    assert hub.open_streams() == manager.open_streams() == 0


# --- flow control --------------------------------------------------------------


def test_sender_is_blocked_at_exactly_the_initial_window() -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    assert hub.send_window(stream_id) == INITIAL_WINDOW
    frames = hub.send_data(stream_id, bytes(INITIAL_WINDOW))
    assert len(frames) == INITIAL_WINDOW // MAX_FRAME_PAYLOAD
    assert all(len(frame) == 5 + MAX_FRAME_PAYLOAD for frame in frames)
    assert hub.send_window(stream_id) == 0
    with pytest.raises(LocalProtocolError):
        hub.send_data(stream_id, b"x")
    assert hub.send_data(stream_id, b"") == []
    events = deliver(manager, frames)
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == INITIAL_WINDOW


def test_too_big_a_send_changes_nothing() -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    with pytest.raises(LocalProtocolError) as caught:
        hub.send_data(stream_id, bytes(INITIAL_WINDOW + 1))
    assert caught.value.status == 500
    assert hub.send_window(stream_id) == INITIAL_WINDOW


def test_consumed_returns_a_window_only_once_half_the_window_is_owed() -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    deliver(manager, hub.send_data(stream_id, bytes(INITIAL_WINDOW)))
    assert manager.consumed(stream_id, 0) is None
    assert manager.consumed(stream_id, HALF - 1) is None
    frame = manager.consumed(stream_id, 1)
    assert frame == raw_window(stream_id, HALF)
    assert deliver(hub, frame) == [WindowUpdated(stream_id, HALF)]
    assert hub.send_window(stream_id) == HALF
    assert manager.consumed(stream_id, HALF - 10) is None
    with pytest.raises(LocalProtocolError):
        manager.consumed(stream_id, 11)  # more than was received
    with pytest.raises(LocalProtocolError):
        manager.consumed(stream_id, -1)
    deliver(hub, manager.consumed(stream_id, 10))
    assert hub.send_window(stream_id) == INITIAL_WINDOW


def test_a_window_grows_up_to_max_window_and_not_past_it() -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    assert deliver(hub, raw_window(stream_id, MAX_WINDOW - INITIAL_WINDOW)) == [
        WindowUpdated(stream_id, MAX_WINDOW - INITIAL_WINDOW)
    ]
    assert hub.send_window(stream_id) == MAX_WINDOW
    assert len(hub.send_data(stream_id, bytes(MAX_WINDOW))) == MAX_WINDOW // MAX_FRAME_PAYLOAD
    deliver(hub, raw_window(stream_id, MAX_WINDOW))
    with pytest.raises(LinkProtocolError):
        deliver(hub, raw_window(stream_id, 1))


def test_a_zero_window_increment_is_a_violation() -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    with pytest.raises(LinkProtocolError):
        deliver(hub, raw_window(stream_id, 0))


def test_a_stalled_stream_holds_back_neither_other_streams_nor_control() -> None:
    manager, hub = pair()
    stalled = open_answered(manager, hub, "/stalled")
    moving = open_answered(manager, hub, "/moving")
    deliver(manager, hub.send_data(stalled, bytes(INITIAL_WINDOW)))  # never consumed
    assert hub.send_window(stalled) == 0
    assert hub.send_window(moving) == INITIAL_WINDOW
    total = 0
    for _ in range(40):
        assert deliver(manager, hub.send_control({"type": "ping"})) == [ControlReceived({"type": "ping"})]
        assert deliver(hub, manager.send_control({"type": "pong"})) == [ControlReceived({"type": "pong"})]
        events = deliver(manager, hub.send_data(moving, bytes(MAX_FRAME_PAYLOAD)))
        total += sum(len(e.data) for e in events if isinstance(e, DataReceived))
        deliver(hub, manager.consumed(moving, MAX_FRAME_PAYLOAD))
        assert hub.send_window(moving) >= INITIAL_WINDOW - HALF
    assert total == 40 * MAX_FRAME_PAYLOAD > 8 * INITIAL_WINDOW
    assert hub.send_window(stalled) == 0


def test_data_beyond_the_receive_window_is_a_violation() -> None:
    manager, hub = pair()
    stream_id, frame = manager.open_stream("POST", "/", [])
    deliver(hub, frame)
    for _ in range(INITIAL_WINDOW // MAX_FRAME_PAYLOAD):
        deliver(hub, raw(DATA, stream_id, bytes(MAX_FRAME_PAYLOAD)))
    with pytest.raises(LinkProtocolError, match="window") as caught:
        deliver(hub, raw(DATA, stream_id, b"x"))
    assert caught.value.status == 502


def test_consumed_after_the_peer_ended_returns_no_window() -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    deliver(manager, hub.send_data(stream_id, bytes(INITIAL_WINDOW)), hub.end_stream(stream_id))
    assert manager.consumed(stream_id, INITIAL_WINDOW) is None
    deliver(hub, manager.end_stream(stream_id))
    assert manager.consumed(stream_id, 5) is None  # gone: nothing to grant


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_sends_and_consumption_deliver_a_mebibyte_both_ways(seed: int) -> None:
    rng = random.Random(seed)
    size = 1024 * 1024
    manager, hub = pair()
    stream_id, frame = manager.open_stream("POST", "/big", [])
    deliver(hub, frame)
    deliver(manager, hub.respond(stream_id, 200, []))
    ends = {"manager": (manager, hub), "hub": (hub, manager)}
    payload = {name: rng.randbytes(size) for name in ends}
    sent = dict.fromkeys(ends, 0)
    received = {name: bytearray() for name in ends}  # by the receiving end
    held = dict.fromkeys(ends, 0)  # received, not yet consumed
    wire: dict[str, list[bytes]] = {name: [] for name in ends}  # messages from that end

    def receive(name: str) -> None:
        me, _ = ends[name]
        other = "hub" if name == "manager" else "manager"
        for event in me.receive_message(wire[other].pop(0)):
            if isinstance(event, DataReceived):
                received[name] += event.data
                held[name] += len(event.data)
                assert held[name] <= INITIAL_WINDOW
            else:
                assert isinstance(event, WindowUpdated)

    while True:
        actions: list[Callable[[], None]] = []
        for name, (me, _) in ends.items():
            window = me.send_window(stream_id)
            if sent[name] < size and window:
                n = min(rng.randrange(1, 200_000), window, size - sent[name])

                def send(name: str = name, me: LinkConnection = me, n: int = n) -> None:
                    wire[name].extend(me.send_data(stream_id, payload[name][sent[name] : sent[name] + n]))
                    sent[name] += n

                actions.append(send)
            other = "hub" if name == "manager" else "manager"
            if wire[other]:
                actions.append(functools.partial(receive, name))
            if held[name]:

                def consume(name: str = name, me: LinkConnection = me) -> None:
                    n = rng.randint(1, held[name])
                    held[name] -= n
                    if (frame := me.consumed(stream_id, n)) is not None:
                        wire[name].append(frame)

                actions.append(consume)
        if not actions:
            break
        rng.choice(actions)()

    assert bytes(received["hub"]) == payload["manager"]
    assert bytes(received["manager"]) == payload["hub"]
    for me in (manager, hub):
        assert INITIAL_WINDOW - HALF < me.send_window(stream_id) <= INITIAL_WINDOW
    deliver(hub, manager.end_stream(stream_id))
    deliver(manager, hub.end_stream(stream_id))
    assert manager.open_streams() == hub.open_streams() == 0


# --- violations ----------------------------------------------------------------


def test_an_oversize_data_frame_is_a_violation() -> None:
    manager, hub = pair()
    stream_id, frame = manager.open_stream("POST", "/", [])
    deliver(hub, frame, raw(DATA, stream_id, bytes(MAX_FRAME_PAYLOAD)))
    with pytest.raises(LinkProtocolError):
        deliver(hub, raw(DATA, stream_id, bytes(MAX_FRAME_PAYLOAD + 1)))


@pytest.mark.parametrize("frame_type", [OPEN, RESPONSE, RESET, CONTROL])
def test_an_oversize_head_is_a_violation(frame_type: int) -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    filler = "x" * MAX_HEAD_BYTES
    value = {"method": "GET", "path": "/", "headers": [], "status": 200, "reason": filler, "pad": filler}
    with pytest.raises(LinkProtocolError, match="over"):
        deliver(manager, raw_json(frame_type, 0 if frame_type == CONTROL else stream_id + 1, value))


def test_oversize_heads_are_refused_when_sending() -> None:
    manager, _ = pair()
    with pytest.raises(LocalProtocolError):
        manager.send_control({"pad": "x" * MAX_HEAD_BYTES})
    with pytest.raises(LocalProtocolError):
        manager.open_stream("GET", "/" + "x" * MAX_HEAD_BYTES, [])
    assert manager.open_stream("GET", "/", [])[0] == 1  # the refused open used no id


def test_a_long_reset_reason_is_cut_not_refused() -> None:
    manager, hub = pair()
    stream_id, frame = manager.open_stream("GET", "/", [])
    deliver(hub, frame)
    reset = manager.reset_stream(stream_id, "x" * (2 * MAX_HEAD_BYTES))
    assert reset is not None
    [event] = deliver(hub, reset)
    assert isinstance(event, StreamReset)
    assert 0 < len(event.reason) < MAX_HEAD_BYTES


@pytest.mark.parametrize("type_byte", [0, 9, 0x80, 255])
def test_an_unknown_frame_type_is_a_violation(type_byte: int) -> None:
    with pytest.raises(LinkProtocolError, match="unknown frame type"):
        LinkConnection("hub").receive_message(raw(type_byte, 1))


@pytest.mark.parametrize("message", [b"", b"\x07", b"\x07\x00\x00\x00"])
def test_a_truncated_header_is_a_violation(message: bytes) -> None:
    with pytest.raises(LinkProtocolError, match="shorter"):
        LinkConnection("hub").receive_message(message)


def test_control_on_a_stream_other_than_zero_is_a_violation() -> None:
    manager, hub = pair()
    stream_id, frame = manager.open_stream("GET", "/", [])
    deliver(hub, frame)
    with pytest.raises(LinkProtocolError, match="stream 0"):
        deliver(hub, raw_json(CONTROL, stream_id, {"type": "x"}))


@pytest.mark.parametrize(
    "message",
    [raw_open(0), raw(DATA, 0, b"x"), raw(END, 0), raw_window(0, 1), raw_json(RESET, 0, {"reason": ""})],
)
def test_stream_frames_on_stream_zero_are_violations(message: bytes) -> None:
    with pytest.raises(LinkProtocolError, match="stream 0"):
        LinkConnection("hub").receive_message(message)


@pytest.mark.parametrize(
    "message",
    [raw(DATA, 1, b"x"), raw(END, 1), raw_window(1, 1), raw_json(RESET, 1, {"reason": ""})],
)
def test_frames_on_a_stream_never_opened_are_violations(message: bytes) -> None:
    with pytest.raises(LinkProtocolError, match="never opened"):
        LinkConnection("hub").receive_message(message)


def test_open_with_the_wrong_parity_is_a_violation() -> None:
    with pytest.raises(LinkProtocolError, match="parity"):
        LinkConnection("hub").receive_message(raw_open(2))  # even ids are the hub's
    with pytest.raises(LinkProtocolError, match="parity"):
        LinkConnection("manager").receive_message(raw_open(1))  # odd ids are the manager's


def test_reusing_or_going_back_on_an_id_is_a_violation() -> None:
    hub = LinkConnection("hub")
    deliver(hub, raw_open(5))  # gaps are allowed
    with pytest.raises(LinkProtocolError, match="reuses"):
        deliver(hub, raw_open(5))
    hub = LinkConnection("hub")
    deliver(hub, raw_open(5))
    with pytest.raises(LinkProtocolError, match="reuses"):
        deliver(hub, raw_open(3))


def test_reusing_the_id_of_a_closed_stream_is_a_violation() -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    deliver(hub, manager.end_stream(stream_id))
    deliver(manager, hub.end_stream(stream_id))
    with pytest.raises(LinkProtocolError, match="reuses"):
        deliver(hub, raw_open(stream_id))


def test_data_after_end_is_a_violation() -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    deliver(hub, manager.end_stream(stream_id))
    with pytest.raises(LocalProtocolError):
        manager.send_data(stream_id, b"x")
    with pytest.raises(LinkProtocolError, match="DATA"):
        deliver(hub, raw(DATA, stream_id, b"x"))


def test_a_failed_connection_stays_failed() -> None:
    hub = LinkConnection("hub")
    with pytest.raises(LinkProtocolError):
        hub.receive_message(b"")
    with pytest.raises(LinkProtocolError, match="failed earlier"):
        hub.receive_message(raw_open(1))


@pytest.mark.parametrize(
    "message",
    [
        raw(OPEN, 1, b"not json"),
        raw(OPEN, 1, b"\xff\xfe"),
        raw(OPEN, 1, b"[" * 50_000),
        raw_json(OPEN, 1, ["GET", "/", []]),
        raw_json(OPEN, 1, {"method": "GET", "path": "/"}),
        raw_json(OPEN, 1, {"method": "G T", "path": "/", "headers": []}),
        raw_json(OPEN, 1, {"method": "", "path": "/", "headers": []}),
        raw_json(OPEN, 1, {"method": 1, "path": "/", "headers": []}),
        raw_json(OPEN, 1, {"method": "GET", "path": "x", "headers": []}),
        raw_json(OPEN, 1, {"method": "GET", "path": "/a b", "headers": []}),
        raw_json(OPEN, 1, {"method": "GET", "path": "/", "headers": {"a": "b"}}),
        raw_json(OPEN, 1, {"method": "GET", "path": "/", "headers": [["a"]]}),
        raw_json(OPEN, 1, {"method": "GET", "path": "/", "headers": [["a", 1]]}),
        raw_json(OPEN, 1, {"method": "GET", "path": "/", "headers": [["a", "b\r\nc: d"]]}),
        raw_json(OPEN, 1, {"method": "GET", "path": "/", "headers": [["a b", "c"]]}),
        raw(OPEN, 1, b'{"method": "GET", "path": "/", "headers": [], "n": NaN}'),
        raw(END, 1, b"x"),
        raw(WINDOW, 1, b"\x00\x00\x01"),
        raw(WINDOW, 1, b"\x00\x00\x00\x01\x00"),
        raw_json(RESET, 1, {"reason": 5}),
        raw_json(RESET, 1, {}),
        raw_json(CONTROL, 0, ["not", "an", "object"]),
        raw(CONTROL, 0, b""),
    ],
)
def test_malformed_payloads_are_violations(message: bytes) -> None:
    hub = LinkConnection("hub")
    if message[0] != OPEN:
        deliver(hub, raw_open(1))
    with pytest.raises(LinkProtocolError):
        hub.receive_message(message)


@pytest.mark.parametrize(
    "body",
    [
        {"headers": []},
        {"status": 99, "headers": []},
        {"status": 600, "headers": []},
        {"status": "200", "headers": []},
        {"status": True, "headers": []},
        {"status": 200.0, "headers": []},
        {"status": 200, "headers": [["x", "\n"]]},
    ],
)
def test_malformed_responses_are_violations(body: dict[str, Any]) -> None:
    manager = LinkConnection("manager")
    stream_id, _ = manager.open_stream("GET", "/", [])
    with pytest.raises(LinkProtocolError):
        manager.receive_message(raw_json(RESPONSE, stream_id, body))


def test_unknown_json_keys_are_ignored() -> None:
    hub = LinkConnection("hub")
    message = raw_json(OPEN, 1, {"method": "GET", "path": "/", "headers": [], "priority": 3})
    assert deliver(hub, message) == [StreamOpened(1, "GET", "/", ())]


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("G T", "/", []),
        ("GET", "", []),
        ("GET", "relative", []),
        ("GET", "/\n", []),
        ("GET", "/", [("x", "a\rb")]),
        ("GET", "/", [("", "b")]),
        ("GET", "/", [("x:", "b")]),
        ("GET", "/", [("x", 1)]),
        ("GET", "/", [("x",)]),
    ],
)
def test_invalid_heads_are_refused_when_sending(method: str, path: str, headers: list[Any]) -> None:
    manager, hub = pair()
    with pytest.raises(LocalProtocolError):
        manager.open_stream(method, path, headers)
    assert manager.open_streams() == 0
    stream_id, frame = manager.open_stream("GET", "/", [])
    deliver(hub, frame)
    with pytest.raises(LocalProtocolError):
        hub.respond(stream_id, 200, headers if headers else [("x", "\n")])
    with pytest.raises(LocalProtocolError):
        hub.respond(stream_id, 600, [])
    assert hub.stream_state(stream_id) is StreamState.OPEN
    assert deliver(manager, hub.respond(stream_id, 200, [])) == [ResponseStarted(stream_id, 200, ())]


def test_control_messages_must_be_json_objects() -> None:
    manager = LinkConnection("manager")
    with pytest.raises(LocalProtocolError):
        manager.send_control(["x"])  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        manager.send_control({"x": object()})
    with pytest.raises(LocalProtocolError):
        manager.send_control({"x": float("nan")})


@pytest.mark.parametrize(
    "build",
    [
        lambda: StreamOpened(0, "GET", "/", ()),
        lambda: StreamOpened(2**32, "GET", "/", ()),
        lambda: StreamOpened(1, "GET", "/", [("a", "b")]),  # type: ignore[arg-type]
        lambda: StreamOpened(1, "GET", "nope", ()),
        lambda: ResponseStarted(1, 42, ()),
        lambda: DataReceived(1, b""),
        lambda: DataReceived(1, "text"),  # type: ignore[arg-type]
        lambda: DataReceived(1, bytes(MAX_FRAME_PAYLOAD + 1)),
        lambda: StreamEnded(True),
        lambda: StreamReset(1, None),  # type: ignore[arg-type]
        lambda: WindowUpdated(1, 0),
        lambda: WindowUpdated(1, MAX_WINDOW + 1),
        lambda: ControlReceived([]),  # type: ignore[arg-type]
    ],
)
def test_events_refuse_to_be_built_invalid(build: Callable[[], object]) -> None:
    with pytest.raises(LinkProtocolError):
        build()


def test_errors_carry_an_http_status() -> None:
    assert issubclass(LinkProtocolError, LinkError)
    assert issubclass(LocalProtocolError, LinkError)
    assert LinkProtocolError("x").status == 502
    assert LocalProtocolError("x").status == 500
    with pytest.raises(LocalProtocolError):
        LinkConnection("client")  # type: ignore[arg-type]


# --- late frames and limits ------------------------------------------------------


def test_late_window_and_data_after_our_reset_are_ignored() -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    in_flight = [*hub.send_data(stream_id, b"abc"), hub.end_stream(stream_id)]
    reset = manager.reset_stream(stream_id, "client went away")
    assert reset is not None
    assert manager.reset_stream(stream_id, "again") is None
    late = [*in_flight, raw_window(stream_id, 100), raw_json(RESET, stream_id, {"reason": "both"})]
    assert deliver(manager, late) == []
    assert manager.stream_state(stream_id) is StreamState.RESET
    assert deliver(hub, reset) == [StreamReset(stream_id, "client went away")]
    assert hub.open_streams() == manager.open_streams() == 0


def test_a_late_window_after_close_is_ignored_but_late_data_is_not() -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    deliver(hub, manager.send_data(stream_id, bytes(HALF)))
    deliver(manager, hub.end_stream(stream_id))
    window = hub.consumed(stream_id, HALF)  # crosses the manager's END
    deliver(hub, manager.end_stream(stream_id))
    assert window is not None
    assert deliver(manager, window) == []
    with pytest.raises(LinkProtocolError, match="closed"):
        deliver(manager, raw(DATA, stream_id, b"x"))


def test_frames_after_the_peer_reset_are_violations_except_window_and_reset() -> None:
    manager, hub = pair()
    stream_id = open_answered(manager, hub)
    reset = hub.reset_stream(stream_id, "gone")
    assert deliver(manager, reset) == [StreamReset(stream_id, "gone")]
    assert deliver(manager, raw_window(stream_id, 1), raw_json(RESET, stream_id, {"reason": ""})) == []
    with pytest.raises(LinkProtocolError):
        deliver(manager, raw(DATA, stream_id, b"x"))


def test_only_the_most_recent_resets_are_remembered() -> None:
    manager = LinkConnection("manager")
    first, _ = manager.open_stream("GET", "/", [])
    manager.reset_stream(first, "stop")
    for _ in range(RECENTLY_CLOSED):
        stream_id, _ = manager.open_stream("GET", "/", [])
        manager.reset_stream(stream_id, "stop")
    assert manager.stream_state(first) is StreamState.CLOSED  # forgotten how it ended
    assert deliver(manager, raw_window(first, 1)) == []
    with pytest.raises(LinkProtocolError):
        deliver(manager, raw(DATA, first, b"x"))


def test_opens_beyond_the_concurrency_limit_are_refused_with_a_reset() -> None:
    hub = LinkConnection("hub")
    for n in range(MAX_CONCURRENT_STREAMS):
        [event] = deliver(hub, raw_open(2 * n + 1))
        assert isinstance(event, StreamOpened)
    over = 2 * MAX_CONCURRENT_STREAMS + 1
    [event] = deliver(hub, raw_open(over))
    assert isinstance(event, StreamRefused)
    assert event.stream_id == over
    assert event.reply[:5] == raw(RESET, over)
    assert "too many" in json.loads(event.reply[5:])["reason"] == event.reason
    assert hub.open_streams() == MAX_CONCURRENT_STREAMS
    assert hub.stream_state(over) is StreamState.RESET
    assert deliver(hub, raw(DATA, over, b"body"), raw(END, over)) == []  # sent before our RESET arrived
    hub.reset_stream(1, "done")
    [event] = deliver(hub, raw_open(over + 2))
    assert isinstance(event, StreamOpened)


def test_the_refusal_reaches_the_opener_as_a_reset() -> None:
    manager, hub = pair()
    opened = [manager.open_stream("GET", "/", [])[1] for _ in range(MAX_CONCURRENT_STREAMS)]
    with pytest.raises(LocalProtocolError, match="live"):
        manager.open_stream("GET", "/", [])  # an opener keeps to the limit itself
    deliver(hub, opened)
    reset_first = manager.reset_stream(1, "done")
    stream_id, frame = manager.open_stream("GET", "/", [])
    # Deliver the OPEN before the RESET, as if the hub's limit were one lower.
    [refused] = deliver(hub, frame)
    assert isinstance(refused, StreamRefused)
    deliver(hub, reset_first)
    assert deliver(manager, refused.reply) == [StreamReset(stream_id, refused.reason)]
    assert manager.open_streams() == hub.open_streams() == MAX_CONCURRENT_STREAMS - 1


# --- every (state, event) pair ---------------------------------------------------

# A stream is brought into each state through the public API; ``conn`` is the end
# under test. o-*: conn opened the stream; a-*: conn answers it.
Step = tuple[str, str]  # (who, what)
SETUPS: dict[str, tuple[str, list[Step], StreamState]] = {
    "o-open-unanswered": ("m", [("m", "open")], StreamState.OPEN),
    "o-open": ("m", [("m", "open"), ("h", "respond")], StreamState.OPEN),
    "o-hcl-unanswered": ("m", [("m", "open"), ("m", "end")], StreamState.HALF_CLOSED_LOCAL),
    "o-hcl": ("m", [("m", "open"), ("h", "respond"), ("m", "end")], StreamState.HALF_CLOSED_LOCAL),
    "o-hcr": ("m", [("m", "open"), ("h", "respond"), ("h", "end")], StreamState.HALF_CLOSED_REMOTE),
    "a-open-unanswered": ("h", [("m", "open")], StreamState.OPEN),
    "a-open": ("h", [("m", "open"), ("h", "respond")], StreamState.OPEN),
    "a-hcr-unanswered": ("h", [("m", "open"), ("m", "end")], StreamState.HALF_CLOSED_REMOTE),
    "a-hcr": ("h", [("m", "open"), ("m", "end"), ("h", "respond")], StreamState.HALF_CLOSED_REMOTE),
    "a-hcl": ("h", [("m", "open"), ("h", "respond"), ("h", "end")], StreamState.HALF_CLOSED_LOCAL),
    "closed": (
        "m",
        [("m", "open"), ("h", "respond"), ("m", "end"), ("h", "end")],
        StreamState.CLOSED,
    ),
    "reset-by-us": ("m", [("m", "open"), ("m", "reset")], StreamState.RESET),
    "reset-by-peer": ("m", [("m", "open"), ("h", "reset")], StreamState.RESET),
    "idle": ("h", [], StreamState.IDLE),
}

SENDS = ["respond", "data", "end", "reset", "consumed"]
RECEIVES = ["OPEN", "RESPONSE", "DATA", "END", "RESET", "WINDOW", "CONTROL", "BATCH"]
ACTIONS = SENDS + RECEIVES

# ok:S  the send is allowed; the stream is then in state S (O open, HL half-closed-local,
#       HR half-closed-remote, C closed, R reset)
# ev:S  the received frame gives its event; the stream is then in state S
# none  the send returns None (nothing to send)    ign  the received frame is ignored
# L     LocalProtocolError                         P    LinkProtocolError
# fmt: off
EXPECTED: dict[str, str] = {
    # (CTRL: CONTROL; the last column: BATCH, always P on a stream's id)
    #                     respond data   end    reset consumed OPEN RESPONSE DATA   END    RESET  WINDOW CTRL
    "o-open-unanswered": "L       ok:O   ok:HL  ok:R  none     P    ev:O     P      P      ev:R   ev:O   P P",
    "o-open":            "L       ok:O   ok:HL  ok:R  none     P    P        ev:O   ev:HR  ev:R   ev:O   P P",
    "o-hcl-unanswered":  "L       L      L      ok:R  none     P    ev:HL    P      P      ev:R   ign    P P",
    "o-hcl":             "L       L      L      ok:R  none     P    P        ev:HL  ev:C   ev:R   ign    P P",
    "o-hcr":             "L       ok:HR  ok:C   ok:R  none     P    P        P      P      ev:R   ev:HR  P P",
    "a-open-unanswered": "ok:O    L      L      ok:R  none     P    P        ev:O   ev:HR  ev:R   ev:O   P P",
    "a-open":            "L       ok:O   ok:HL  ok:R  none     P    P        ev:O   ev:HR  ev:R   ev:O   P P",
    "a-hcr-unanswered":  "ok:HR   L      L      ok:R  none     P    P        P      P      ev:R   ev:HR  P P",
    "a-hcr":             "L       ok:HR  ok:C   ok:R  none     P    P        P      P      ev:R   ev:HR  P P",
    "a-hcl":             "L       L      L      ok:R  none     P    P        ev:HL  ev:C   ev:R   ign    P P",
    "closed":            "L       L      L      none  none     P    P        P      P      ign    ign    P P",
    "reset-by-us":       "L       L      L      none  none     P    ign      ign    ign    ign    ign    P P",
    "reset-by-peer":     "L       L      L      none  none     P    P        P      P      ign    ign    P P",
    "idle":              "L       L      L      L     L        ev:O P        P      P      P      P      P P",
}
# fmt: on

SHORT = {
    "O": StreamState.OPEN,
    "HL": StreamState.HALF_CLOSED_LOCAL,
    "HR": StreamState.HALF_CLOSED_REMOTE,
    "C": StreamState.CLOSED,
    "R": StreamState.RESET,
}
EVENT_OF = {
    "OPEN": StreamOpened,
    "RESPONSE": ResponseStarted,
    "DATA": DataReceived,
    "END": StreamEnded,
    "RESET": StreamReset,
    "WINDOW": WindowUpdated,
}


def bring(state: str) -> tuple[LinkConnection, int]:
    who, steps, expected = SETUPS[state]
    ends = {"m": LinkConnection("manager"), "h": LinkConnection("hub")}
    stream_id = 1
    for actor, what in steps:
        me, peer = ends[actor], ends["h" if actor == "m" else "m"]
        if what == "open":
            stream_id, frame = me.open_stream("GET", "/", [])
            sent: Iterable[bytes | None] = [frame]
        elif what == "respond":
            sent = [me.respond(stream_id, 200, [])]
        elif what == "end":
            sent = [me.end_stream(stream_id)]
        else:
            sent = [me.reset_stream(stream_id, "stop")]
        deliver(peer, *sent)
    conn = ends[who]
    assert conn.stream_state(stream_id) is expected
    return conn, stream_id


def act(conn: LinkConnection, stream_id: int, action: str) -> object:
    sends: dict[str, Callable[[], object]] = {
        "respond": lambda: conn.respond(stream_id, 200, []),
        "data": lambda: conn.send_data(stream_id, b"x"),
        "end": lambda: conn.end_stream(stream_id),
        "reset": lambda: conn.reset_stream(stream_id, "stop"),
        "consumed": lambda: conn.consumed(stream_id, 0),
    }
    if action in sends:
        return sends[action]()
    frames = {
        "OPEN": raw_open(stream_id),
        "RESPONSE": raw_json(RESPONSE, stream_id, {"status": 200, "headers": []}),
        "DATA": raw(DATA, stream_id, b"x"),
        "END": raw(END, stream_id),
        "RESET": raw_json(RESET, stream_id, {"reason": "stop"}),
        "WINDOW": raw_window(stream_id, 1),
        "CONTROL": raw_json(CONTROL, stream_id, {}),
        "BATCH": raw(BATCH, stream_id, struct.pack(">I", 7) + raw(CONTROL, 0, b"{}")),
    }
    return conn.receive_message(frames[action])


def test_the_expected_table_covers_every_frame_type() -> None:
    assert {name for name in ACTIONS if name.isupper()} == {t.name for t in FrameType}
    assert all(len(row.split()) == len(ACTIONS) for row in EXPECTED.values())
    assert set(EXPECTED) == set(SETUPS)


@pytest.mark.parametrize(("state", "action"), [(state, action) for state in EXPECTED for action in ACTIONS])
def test_every_state_and_event_pair(state: str, action: str) -> None:
    conn, stream_id = bring(state)
    before = conn.stream_state(stream_id)
    expected = EXPECTED[state].split()[ACTIONS.index(action)]
    outcome, _, after = expected.partition(":")
    if outcome in ("L", "P"):
        with pytest.raises(LocalProtocolError if outcome == "L" else LinkProtocolError):
            act(conn, stream_id, action)
        if outcome == "L":
            assert conn.stream_state(stream_id) is before
        return
    result = act(conn, stream_id, action)
    if outcome == "ok":
        assert isinstance(result, bytes) or (isinstance(result, list) and result)
    elif outcome == "ev":
        assert isinstance(result, list) and len(result) == 1
        assert isinstance(result[0], EVENT_OF[action])
    elif outcome == "ign":
        assert result == []
    else:
        assert outcome == "none"
        assert result is None
    assert conn.stream_state(stream_id) is (SHORT[after] if after else before)


# -- BATCH: several frames in one message ------------------------------------------------------


def raw_batch(*frames: bytes, stream_id: int = 0) -> bytes:
    return raw(BATCH, stream_id, b"".join(struct.pack(">I", len(frame)) + frame for frame in frames))


def test_a_short_exchange_crosses_in_two_messages() -> None:
    manager, hub = pair()
    stream_id, opened = manager.open_stream("GET", "/api/v1/version", [("accept", "*/*")])
    request = LinkConnection.batch([opened, manager.end_stream(stream_id)])
    assert len(request) == 1 and request[0][0] == BATCH
    assert deliver(hub, request) == [
        StreamOpened(stream_id, "GET", "/api/v1/version", (("accept", "*/*"),)),
        StreamEnded(stream_id),
    ]
    frames = [hub.respond(stream_id, 200, [("content-type", "application/json")])]
    frames += hub.send_data(stream_id, b'{"ok":true}')
    frames.append(hub.end_stream(stream_id))
    response = LinkConnection.batch(frames)
    assert len(response) == 1
    assert deliver(manager, response) == [
        ResponseStarted(stream_id, 200, (("content-type", "application/json"),)),
        DataReceived(stream_id, b'{"ok":true}'),
        StreamEnded(stream_id),
    ]
    assert manager.stream_state(stream_id) is hub.stream_state(stream_id) is StreamState.CLOSED


def test_batch_is_the_same_as_its_frames_one_by_one() -> None:
    """Frames in a BATCH get exactly the checks and state changes they get alone."""
    manager, hub = pair()
    stream_id, opened = manager.open_stream("POST", "/x", [])
    deliver(hub, LinkConnection.batch([opened, *manager.send_data(stream_id, b"abc")]))
    # The window was charged by the batched DATA: 3 bytes of INITIAL_WINDOW are in flight.
    assert manager.send_window(stream_id) == INITIAL_WINDOW - 3
    with pytest.raises(LinkProtocolError, match="reuses an id"):
        hub.receive_message(raw_batch(raw_open(stream_id)))


def test_batch_leaves_a_single_frame_alone_and_large_frames_apart() -> None:
    manager, hub = pair()
    stream_id, opened = manager.open_stream("POST", "/x", [])
    assert LinkConnection.batch([opened]) == [opened]
    big = manager.send_data(stream_id, b"x" * (MAX_BATCH_BYTES + 1))
    end = manager.end_stream(stream_id)
    messages = LinkConnection.batch([opened, *big, end])
    assert messages == [opened, *big, end]  # nothing fits beside a frame over the limit
    smalls = [manager.send_control({"n": n, "pad": "y" * 1000}) for n in range(100)]
    packed = LinkConnection.batch(smalls)
    assert 1 < len(packed) < 100 and all(len(m) <= 5 + MAX_BATCH_BYTES for m in packed)
    events = deliver(hub, packed)
    assert [event.message["n"] for event in events if isinstance(event, ControlReceived)] == list(range(100))


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (raw(BATCH, 0), "empty BATCH"),
        (raw_batch(raw(CONTROL, 0, b"{}"), stream_id=1), "belong on stream 0"),
        (raw(BATCH, 0, b"\x00\x00"), "inside a frame's length"),
        (raw(BATCH, 0, struct.pack(">I", 10) + b"\x07\x00"), "inside a frame of 10 bytes"),
        (raw_batch(raw_batch(raw(CONTROL, 0, b"{}"))), "BATCH inside a BATCH"),
        (raw_batch(raw(42, 0)), "unknown frame type 42"),
        (raw_batch(b"\x07"), "shorter than its header"),
        (raw(BATCH, 0, b"\x00" * (MAX_BATCH_BYTES + 1)), "over"),
    ],
)
def test_malformed_batches_are_violations(message: bytes, match: str) -> None:
    with pytest.raises(LinkProtocolError, match=match):
        LinkConnection("hub").receive_message(message)


def test_only_made_frames_are_batched() -> None:
    with pytest.raises(LocalProtocolError):
        LinkConnection.batch([b"\x07"])
    with pytest.raises(LocalProtocolError):
        LinkConnection.batch([raw_batch(raw(CONTROL, 0, b"{}"))])
