"""The link's control messages: the handshake and what the two ends tell each other after it.

Theory of operation
-------------------
Control messages travel as JSON objects in CONTROL frames (stream 0, see
:mod:`spacehub.protocol.link`), each with a ``"type"``. Here each type is a frozen
dataclass that refuses to be built invalid; :func:`parse` turns a received object into
one (raising :class:`ControlError` for a known type with bad fields) and :func:`encode`
turns one into the object to send. A type this version does not know parses as
:class:`Unknown`, so a newer peer can add messages without breaking an older one.

The handshake, from the manager's side and the hub's::

    manager                                 hub
    ──── challenge(nonce, managerId) ──────▶
    ◀──── join(token, key, signature) ──── (first time)   or   auth(hubId, signature)
    ──── welcome(hubId, intervals) ────────▶  or  refused(code, reason, retry)
    ... linked: ping ▶, ◀ pong, ◀ heartbeat, ◀ leaving, revoked ▶ ...

Who may send what, and when, is one table (:data:`TRANSITIONS`), keyed by the
conversation's stage, the direction and the message type; :class:`Conversation`
walks it for one end and refuses anything the table does not list.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeAlias

from .errors import ProtocolError

__all__ = [
    "TRANSITIONS",
    "Auth",
    "Challenge",
    "ControlError",
    "ControlMessage",
    "Conversation",
    "Direction",
    "Heartbeat",
    "Join",
    "Leaving",
    "Ping",
    "Pong",
    "Refused",
    "Revoked",
    "Role",
    "Stage",
    "Unknown",
    "Welcome",
    "encode",
    "next_stage",
    "parse",
]

#: Longest base64 text accepted for a nonce, key or signature.
MAX_B64_CHARS: Final = 1024
#: Longest reason, code or description kept.
MAX_TEXT: Final = 1000


class ControlError(ProtocolError):
    """A control message with bad fields, or one not allowed at this point of the conversation."""


def _text(value: object, name: str, *, empty: bool = True) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise ControlError(f"{name} must be a {'' if empty else 'non-empty '}string")
    if len(value) > MAX_TEXT:
        raise ControlError(f"{name} is longer than {MAX_TEXT} characters")
    return value


def _b64(value: object, name: str) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_B64_CHARS:
        raise ControlError(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise ControlError(f"{name} is not base64") from None


def _b64_text(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _strings(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ControlError(f"{name} must be a list of strings")
    return tuple(value)


def _seconds(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 86_400:
        raise ControlError(f"{name} must be a number of seconds")
    return float(value)


@dataclass(frozen=True, slots=True)
class Challenge:
    """Manager → hub, first: sign this nonce (spacehub.protocol.auth)."""

    type: ClassVar[str] = "challenge"
    nonce: bytes
    manager_id: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        if not self.nonce:
            raise ControlError("a challenge needs a nonce")


@dataclass(frozen=True, slots=True)
class Join:
    """Hub → manager: join the space with a one-time token, presenting a new key."""

    type: ClassVar[str] = "join"
    space: str
    join_token: str
    public_key: bytes
    signature: bytes
    description: str = ""
    tags: tuple[str, ...] = ()
    version: str = ""
    link_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.space:
            raise ControlError("the message names no space")


@dataclass(frozen=True, slots=True)
class Auth:
    """Hub → manager: a hub that joined before proves it holds its key."""

    type: ClassVar[str] = "auth"
    space: str
    hub_id: str
    signature: bytes
    version: str = ""
    link_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.space:
            raise ControlError("the message names no space")
        if not self.hub_id or "\0" in self.hub_id:
            raise ControlError("hubId must be a non-empty string")


@dataclass(frozen=True, slots=True)
class Welcome:
    """Manager → hub: admitted; how often to heartbeat and how the manager checks liveness."""

    type: ClassVar[str] = "welcome"
    hub_id: str
    space: str = ""
    heartbeat_interval: float | None = None
    ping_interval: float | None = None
    pong_timeout: float | None = None
    answer_pings: bool = True
    link_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.hub_id:
            raise ControlError("the welcome carries no hubId")


@dataclass(frozen=True, slots=True)
class Refused:
    """Manager → hub: not admitted; ``retry`` false means no retry helps."""

    type: ClassVar[str] = "refused"
    code: str
    reason: str
    retry: bool = False


@dataclass(frozen=True, slots=True)
class Revoked:
    """Manager → hub: an operator revoked this hub; the link closes next."""

    type: ClassVar[str] = "revoked"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    """Manager → hub: are you there (answered only when the welcome asks for pongs)."""

    type: ClassVar[str] = "ping"
    nonce: int | str | None = None


@dataclass(frozen=True, slots=True)
class Pong:
    """Hub → manager: the answer to a ping, with its nonce."""

    type: ClassVar[str] = "pong"
    nonce: int | str | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Hub → manager, every 10 s: its load-check and a summary of its entities."""

    type: ClassVar[str] = "heartbeat"
    load: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    #: the hub's wall clock, ms since the epoch
    sent_at: int | None = None


@dataclass(frozen=True, slots=True)
class Leaving:
    """Hub → manager: the hub stops on purpose; its link closes next."""

    type: ClassVar[str] = "leaving"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Unknown:
    """A type this version does not know (a newer peer's): kept, logged, ignored."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.kind


ControlMessage: TypeAlias = (
    Challenge | Join | Auth | Welcome | Refused | Revoked | Ping | Pong | Heartbeat | Leaving | Unknown
)


#: Every control message class, for isinstance checks.
CONTROL_TYPES: Final = (
    Challenge,
    Join,
    Auth,
    Welcome,
    Refused,
    Revoked,
    Ping,
    Pong,
    Heartbeat,
    Leaving,
    Unknown,
)


def _nonce(value: object) -> int | str | None:
    if value is None or (isinstance(value, int | str) and not isinstance(value, bool)):
        return value
    raise ControlError("nonce must be a number or a string")


def parse(message: dict[str, Any]) -> ControlMessage:
    """The control message a received JSON object is; :class:`ControlError` if malformed."""
    if not isinstance(message, dict):
        raise ControlError("a control message must be a JSON object")
    kind = message.get("type")
    get = message.get
    if kind == "challenge":
        return Challenge(_b64(get("nonce"), "nonce"), _text(get("managerId", ""), "managerId"), _version(get))
    if kind == "join":
        return Join(
            space=_text(get("space"), "space", empty=False),
            join_token=_text(get("joinToken", ""), "joinToken"),
            public_key=_b64(get("publicKey"), "publicKey"),
            signature=_b64(get("signature"), "signature"),
            description=_text(get("description", ""), "description"),
            tags=_strings(get("tags", []), "tags"),
            version=_version(get),
            link_features=_features(get),
        )
    if kind == "auth":
        return Auth(
            space=_text(get("space"), "space", empty=False),
            hub_id=_text(get("hubId"), "hubId", empty=False),
            signature=_b64(get("signature"), "signature"),
            version=_version(get),
            link_features=_features(get),
        )
    if kind == "welcome":
        answer = get("answerPings", True)
        return Welcome(
            hub_id=_text(get("hubId"), "hubId", empty=False),
            space=_text(get("space", ""), "space"),
            heartbeat_interval=_seconds(get("heartbeatInterval"), "heartbeatInterval"),
            ping_interval=_seconds(get("pingInterval"), "pingInterval"),
            pong_timeout=_seconds(get("pongTimeout"), "pongTimeout"),
            answer_pings=answer if isinstance(answer, bool) else True,
            link_features=_features(get),
        )
    if kind == "refused":
        return Refused(
            _text(get("code", ""), "code"),
            _text(get("reason", ""), "reason") or "no reason given",
            get("retry") is True,
        )
    if kind == "revoked":
        return Revoked(_text(get("reason", ""), "reason"))
    if kind == "ping":
        return Ping(_nonce(get("nonce")))
    if kind == "pong":
        return Pong(_nonce(get("nonce")))
    if kind == "heartbeat":
        load, summary, sent_at = get("load"), get("summary"), get("sentAt")
        return Heartbeat(
            load if isinstance(load, dict) else None,
            summary if isinstance(summary, dict) else None,
            sent_at if isinstance(sent_at, int) and not isinstance(sent_at, bool) else None,
        )
    if kind == "leaving":
        reason = get("reason", "")
        return Leaving(reason[:200] if isinstance(reason, str) else "")
    if not isinstance(kind, str) or not kind:
        raise ControlError("a control message needs a type")
    return Unknown(kind, {k: v for k, v in message.items() if k != "type"})


def _version(get: Any) -> str:
    version = get("version", "")
    return version[:100] if isinstance(version, str) else ""


def _features(get: Any) -> tuple[str, ...]:
    features = get("linkFeatures", [])
    return tuple(f for f in features if isinstance(f, str)) if isinstance(features, list) else ()


def encode(message: ControlMessage) -> dict[str, Any]:
    """The JSON object that carries ``message``."""
    if isinstance(message, Challenge):
        body: dict[str, Any] = {"nonce": _b64_text(message.nonce), "managerId": message.manager_id}
        if message.version:
            body["version"] = message.version
    elif isinstance(message, Join):
        body = {
            "space": message.space,
            "joinToken": message.join_token,
            "publicKey": _b64_text(message.public_key),
            "signature": _b64_text(message.signature),
            "description": message.description,
            "tags": list(message.tags),
            "version": message.version,
            "linkFeatures": list(message.link_features),
        }
    elif isinstance(message, Auth):
        body = {
            "space": message.space,
            "hubId": message.hub_id,
            "signature": _b64_text(message.signature),
            "version": message.version,
            "linkFeatures": list(message.link_features),
        }
    elif isinstance(message, Welcome):
        body = {"hubId": message.hub_id, "space": message.space}
        for key, value in (
            ("heartbeatInterval", message.heartbeat_interval),
            ("pingInterval", message.ping_interval),
            ("pongTimeout", message.pong_timeout),
        ):
            if value is not None:
                body[key] = value
        body["answerPings"] = message.answer_pings
        body["linkFeatures"] = list(message.link_features)
    elif isinstance(message, Refused):
        body = {"code": message.code, "reason": message.reason, "retry": message.retry}
    elif isinstance(message, Revoked | Leaving):
        body = {"reason": message.reason}
    elif isinstance(message, Ping | Pong):
        body = {"nonce": message.nonce}
    elif isinstance(message, Heartbeat):
        body = {"load": message.load, "summary": message.summary, "sentAt": message.sent_at}
    else:
        body = dict(message.fields)
    return {"type": message.type, **body}


# -- the conversation -----------------------------------------------------------------------------


class Role(enum.Enum):
    HUB = "hub"
    MANAGER = "manager"


class Direction(enum.Enum):
    SENT = "sent"
    RECEIVED = "received"


class Stage(enum.Enum):
    #: the manager sends its challenge first
    CHALLENGE = "challenge"
    #: the hub signs and answers with join or auth
    HELLO = "hello"
    #: the manager answers welcome or refused
    VERDICT = "verdict"
    #: admitted: pings, pongs, heartbeats, leaving, revoked
    LINKED = "linked"
    #: refused: nothing more is said
    ENDED = "ended"


_S, _D = Stage, Direction

#: (stage, direction as seen by ``role``, role, message type) -> the next stage.
#: Anything not listed is a protocol error for that end. Unknown types are allowed
#: once linked (a newer peer's), never during the handshake.
TRANSITIONS: Final[dict[tuple[Stage, Direction, Role, type[Any]], Stage]] = {
    # the manager's end
    (_S.CHALLENGE, _D.SENT, Role.MANAGER, Challenge): _S.HELLO,
    (_S.HELLO, _D.RECEIVED, Role.MANAGER, Join): _S.VERDICT,
    (_S.HELLO, _D.RECEIVED, Role.MANAGER, Auth): _S.VERDICT,
    (_S.VERDICT, _D.SENT, Role.MANAGER, Welcome): _S.LINKED,
    (_S.VERDICT, _D.SENT, Role.MANAGER, Refused): _S.ENDED,
    (_S.LINKED, _D.SENT, Role.MANAGER, Ping): _S.LINKED,
    # Revoked and leaving: the link closes right after, and until it has, what is in
    # flight (heartbeats, pings) still crosses it; closing ends the conversation.
    (_S.LINKED, _D.SENT, Role.MANAGER, Revoked): _S.LINKED,
    (_S.LINKED, _D.RECEIVED, Role.MANAGER, Heartbeat): _S.LINKED,
    (_S.LINKED, _D.RECEIVED, Role.MANAGER, Pong): _S.LINKED,
    (_S.LINKED, _D.RECEIVED, Role.MANAGER, Leaving): _S.LINKED,
    (_S.LINKED, _D.RECEIVED, Role.MANAGER, Unknown): _S.LINKED,
    # the hub's end
    (_S.CHALLENGE, _D.RECEIVED, Role.HUB, Challenge): _S.HELLO,
    (_S.HELLO, _D.SENT, Role.HUB, Join): _S.VERDICT,
    (_S.HELLO, _D.SENT, Role.HUB, Auth): _S.VERDICT,
    (_S.VERDICT, _D.RECEIVED, Role.HUB, Welcome): _S.LINKED,
    (_S.VERDICT, _D.RECEIVED, Role.HUB, Refused): _S.ENDED,
    (_S.LINKED, _D.RECEIVED, Role.HUB, Ping): _S.LINKED,
    (_S.LINKED, _D.RECEIVED, Role.HUB, Revoked): _S.LINKED,
    (_S.LINKED, _D.RECEIVED, Role.HUB, Unknown): _S.LINKED,
    (_S.LINKED, _D.SENT, Role.HUB, Heartbeat): _S.LINKED,
    (_S.LINKED, _D.SENT, Role.HUB, Pong): _S.LINKED,
    (_S.LINKED, _D.SENT, Role.HUB, Leaving): _S.LINKED,
}


def next_stage(stage: Stage, direction: Direction, role: Role, message: ControlMessage) -> Stage:
    """The stage after ``role`` sends or receives ``message`` in ``stage``; :class:`ControlError`
    when the table does not allow it."""
    try:
        return TRANSITIONS[(stage, direction, role, type(message))]
    except KeyError:
        verb = "send" if direction is Direction.SENT else "receive"
        raise ControlError(
            f"the {role.value} may not {verb} {message.type!r} at stage {stage.value}"
        ) from None


class Conversation:
    """One end's side of the control conversation: parses, checks against the table, encodes."""

    __slots__ = ("role", "stage")

    def __init__(self, role: Role, stage: Stage = Stage.CHALLENGE) -> None:
        self.role = role
        #: where the conversation is; a link handed over after its handshake starts at LINKED
        self.stage = stage

    def received(self, raw: dict[str, Any]) -> ControlMessage:
        """Parse a received control object and move on; :class:`ControlError` if it is malformed
        or not allowed now."""
        message = parse(raw)
        self.stage = next_stage(self.stage, Direction.RECEIVED, self.role, message)
        return message

    def send(self, message: ControlMessage) -> dict[str, Any]:
        """The object to send for ``message``, moving on; :class:`ControlError` if not allowed now."""
        self.stage = next_stage(self.stage, Direction.SENT, self.role, message)
        return encode(message)
