"""spacehub.protocol.control: the link's control messages, sans-I/O.

Every message survives encode -> JSON -> parse; malformed ones are refused with
ControlError; the handshake table is checked for every (stage, direction, role, type);
and neither end builds a control message as a dict literal any more.
"""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from spacehub.protocol import control
from spacehub.protocol.control import (
    TRANSITIONS,
    Auth,
    Challenge,
    ControlError,
    Conversation,
    Direction,
    Heartbeat,
    Join,
    Leaving,
    Ping,
    Pong,
    Refused,
    Revoked,
    Role,
    Stage,
    Unknown,
    Welcome,
    encode,
    next_stage,
    parse,
)
from spacehub.protocol.link import ControlReceived, LinkConnection

ROOT = Path(__file__).resolve().parents[2]

SAMPLES: list[control.ControlMessage] = [
    Challenge(b"\x01" * 32, "cpm-1", "0.1.0"),
    Join("lab", "shj_token", b"\x02" * 32, b"\x03" * 64, "edge 1", ("a", "b"), "0.1.0", ("batch",)),
    Auth("lab", "sth-1", b"\x03" * 64, "0.1.0", ("batch",)),
    Welcome("sth-1", "lab", 10.0, 15.0, 5.0, False, ("batch",)),
    Refused("token-used", "The join token was already used", retry=False),
    Refused("busy", "try later", retry=True),
    Revoked("stolen laptop"),
    Ping(7),
    Pong("n-1"),
    Heartbeat({"avgLoad": 0.5}, {"sequences": []}, 1_700_000_000_000),
    Leaving("the hub is stopping"),
    Unknown("from-the-future", {"x": 1}),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.type)
def test_every_message_survives_the_wire(message: control.ControlMessage) -> None:
    wire = json.loads(json.dumps(encode(message)))
    assert wire["type"] == message.type
    assert parse(wire) == message


def test_control_frames_carry_dataclasses() -> None:
    hub, manager = LinkConnection("hub"), LinkConnection("manager")
    (event,) = manager.receive_message(hub.send_control(Leaving("bye")))
    assert isinstance(event, ControlReceived)
    assert parse(event.message) == Leaving("bye")


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"type": "challenge", "nonce": "%%%"}, "nonce is not base64"),
        ({"type": "challenge"}, "nonce must be a base64 string"),
        ({"type": "challenge", "nonce": "A" * 2000}, "nonce must be a base64 string"),
        ({"type": "join", "space": "", "publicKey": "AA==", "signature": "AA=="}, "space"),
        ({"type": "join", "space": "lab", "publicKey": 5, "signature": "AA=="}, "publicKey"),
        ({"type": "join", "space": "lab", "publicKey": "AA==", "signature": "AA==", "tags": [1]}, "tags"),
        ({"type": "auth", "space": "lab", "signature": "AA=="}, "hubId"),
        ({"type": "auth", "space": "lab", "hubId": "a\0b", "signature": "AA=="}, "hubId"),
        ({"type": "welcome"}, "hubId"),
        ({"type": "welcome", "hubId": "h", "heartbeatInterval": "10"}, "heartbeatInterval"),
        ({"type": "welcome", "hubId": "h", "pingInterval": float("inf")}, "pingInterval"),
        ({"type": "ping", "nonce": [1]}, "nonce"),
        ({"type": "refused", "reason": "x" * 5000}, "longer than"),
        ({"nonce": 1}, "needs a type"),
        ({"type": 5}, "needs a type"),
    ],
)
def test_malformed_messages_are_refused(raw: dict[str, Any], error: str) -> None:
    with pytest.raises(ControlError, match=error):
        parse(raw)


def test_a_message_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ControlError):
        parse(["challenge"])  # type: ignore[arg-type]


def test_refused_without_a_reason_says_so() -> None:
    assert parse({"type": "refused", "code": "x"}) == Refused("x", "no reason given")


def test_a_heartbeat_with_junk_keeps_what_it_can() -> None:
    assert parse({"type": "heartbeat", "load": "junk", "summary": {}, "sentAt": True}) == Heartbeat(None, {})


MESSAGE_TYPES = [Challenge, Join, Auth, Welcome, Refused, Revoked, Ping, Pong, Heartbeat, Leaving, Unknown]


def _instance(kind: type[Any]) -> control.ControlMessage:
    message: control.ControlMessage = next(m for m in SAMPLES if type(m) is kind)
    return message


@pytest.mark.parametrize(
    ("stage", "direction", "role", "kind"),
    list(itertools.product(Stage, Direction, Role, MESSAGE_TYPES)),
    ids=lambda v: getattr(v, "value", getattr(v, "__name__", str(v))),
)
def test_the_table_decides_every_pair(
    stage: Stage, direction: Direction, role: Role, kind: type[Any]
) -> None:
    message = _instance(kind)
    key = (stage, direction, role, kind)
    if key in TRANSITIONS:
        assert next_stage(stage, direction, role, message) is TRANSITIONS[key]
    else:
        with pytest.raises(ControlError, match="may not"):
            next_stage(stage, direction, role, message)


def test_each_end_sends_what_the_other_receives() -> None:
    """The table is symmetric: what one role may send at a stage, the other may receive there."""
    for (stage, direction, role, kind), after in TRANSITIONS.items():
        other = Role.HUB if role is Role.MANAGER else Role.MANAGER
        flipped = Direction.RECEIVED if direction is Direction.SENT else Direction.SENT
        if kind is Unknown:
            continue  # received only: this version never sends a type it does not know
        assert TRANSITIONS.get((stage, flipped, other, kind)) is after, (stage, direction, role, kind)


def test_a_whole_conversation_from_both_ends() -> None:
    hub, manager = Conversation(Role.HUB), Conversation(Role.MANAGER)
    for sender, receiver, message in [
        (manager, hub, SAMPLES[0]),  # challenge
        (hub, manager, SAMPLES[2]),  # auth
        (manager, hub, SAMPLES[3]),  # welcome
        (manager, hub, Ping(1)),
        (hub, manager, Pong(1)),
        (hub, manager, Heartbeat({}, {}, 1)),
        (hub, manager, Leaving("bye")),
    ]:
        assert receiver.received(json.loads(json.dumps(sender.send(message)))) == message
    assert hub.stage is manager.stage is Stage.LINKED


def test_a_refused_conversation_ends() -> None:
    hub = Conversation(Role.HUB)
    hub.received(encode(SAMPLES[0]))
    hub.send(SAMPLES[1])
    hub.received(encode(Refused("token-used", "used")))
    assert hub.stage is Stage.ENDED
    with pytest.raises(ControlError):
        hub.received(encode(Ping(1)))


def test_nothing_but_a_challenge_comes_first() -> None:
    with pytest.raises(ControlError, match="may not receive 'welcome' at stage challenge"):
        Conversation(Role.HUB).received(encode(SAMPLES[3]))
    with pytest.raises(ControlError, match="may not receive 'unknown-thing'"):
        Conversation(Role.HUB).received({"type": "unknown-thing"})


CONTROL_TYPE_NAMES = {kind.type for kind in MESSAGE_TYPES if kind is not Unknown}


def control_dict_literals(source: str) -> list[int]:
    """Lines of dict literals whose "type" is a control message's."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == "type"
                    and isinstance(value, ast.Constant)
                    and value.value in CONTROL_TYPE_NAMES
                ):
                    found.append(node.lineno)
    return found


def test_no_end_builds_control_messages_as_dicts() -> None:
    offenders = {
        str(path.relative_to(ROOT)): lines
        for folder in ("agent/link", "cpm/link", "spacehub/server/link")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (lines := control_dict_literals(path.read_text()))
    }
    assert offenders == {}


def test_the_dict_literal_check_can_fail() -> None:
    assert control_dict_literals('x = {"type": "ping", "nonce": 1}\n') == [1]
    assert control_dict_literals('x = {"type": "http.response.body"}\n') == []
