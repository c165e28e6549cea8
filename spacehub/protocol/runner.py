"""The runner control channel: a sans-I/O codec shared by the hub and the runners.

Theory of operation
-------------------
An Instance is a runner process started by the hub. The two talk over separate
byte channels, each with its own back-pressure, so that a flooded stdout can never
hold back control or events (see ``docs/architecture.md``)::

    fd  name        direction      content
    0   stdin       hub -> runner  raw bytes (POST /stdin)
    1   stdout      runner -> hub  raw bytes
    2   stderr      runner -> hub  raw bytes
    3   control     hub -> runner  messages (this module)
    4   monitoring  runner -> hub  messages (this module)
    5   input       hub -> runner  optional preamble, then the sequence's input bytes
    6   output      runner -> hub  the sequence's output bytes
    7   log         runner -> hub  NDJSON log records

A message is one line: a JSON array ``[code, {payload}]`` and ``\\n``. The codes
follow the original platform's numbering so logs read the same.

Handshake: the runner loads the sequence module first (so a broken module fails
the start request with a reason), then sends PING; the hub answers PONG with the
appConfig and args; the runner calls ``run`` and sends PANG with what the sequence
provides and requires.

The input channel may begin with a preamble ``Content-Type: <type>\\r\\n\\r\\n``
written by the hub before the first input bytes, when the input's type comes from
the first ``POST /input`` rather than from a declared topic.

Nothing here does I/O: :class:`MessageReader` turns bytes into :class:`Message`
objects, :func:`encode` turns a message into bytes. No trio, no asyncio: the
runners import this from inside every instance.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

from .errors import ProtocolError as ProtocolError

#: Longest message line accepted (an event with its payload).
MAX_MESSAGE_BYTES: Final = 1024 * 1024
#: Longest input preamble accepted.
MAX_PREAMBLE_BYTES: Final = 8 * 1024

#: Channel file descriptor numbers inside the runner process.
FD_STDIN: Final = 0
FD_STDOUT: Final = 1
FD_STDERR: Final = 2
FD_CONTROL: Final = 3
FD_MONITORING: Final = 4
FD_INPUT: Final = 5
FD_OUTPUT: Final = 6
FD_LOG: Final = 7


class Code(IntEnum):
    """Message codes. 3xxx: runner to hub; 4xxx: hub to runner; 5001 both ways."""

    #: runner -> hub: handshake, ``{id, pid, created}``
    PING = 3000
    #: runner -> hub: health, ``{healthy: bool}``, every second
    MONITORING = 3001
    #: runner -> hub: the sequence failed, ``{message, exitcode}``, sent just before exiting
    ERROR = 3003
    #: runner -> hub: the stop handler ran and the runner is about to exit
    SEQUENCE_STOPPED = 3006
    #: runner -> hub: keep-alive during a stop, ``{keepAlive: ms}``
    ALIVE = 3010
    #: runner -> hub: the sequence's output ended, the runner exits
    SEQUENCE_COMPLETED = 3011
    #: runner -> hub: topic declarations, ``{provides?, requires?, contentType?}``
    PANG = 3012
    #: hub -> runner: handshake answer, ``{appConfig, args}``
    PONG = 4000
    #: hub -> runner: ``{timeout: ms, canCallKeepalive: bool}``
    STOP = 4001
    #: hub -> runner: end now (the hub signals the process group as well)
    KILL = 4002
    #: both ways: ``{eventName, message, source?}``
    EVENT = 5001


RUNNER_TO_HUB: Final = frozenset(
    {
        Code.PING,
        Code.MONITORING,
        Code.ERROR,
        Code.SEQUENCE_STOPPED,
        Code.ALIVE,
        Code.SEQUENCE_COMPLETED,
        Code.PANG,
        Code.EVENT,
    }
)
HUB_TO_RUNNER: Final = frozenset({Code.PONG, Code.STOP, Code.KILL, Code.EVENT})


@dataclass(frozen=True, slots=True)
class Message:
    """One control message. Refuses to be built with a payload that is not an object."""

    code: Code
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.code, Code):
            raise ProtocolError(f"unknown message code {self.code!r}")
        if not isinstance(self.data, dict):
            raise ProtocolError(f"message {self.code.name} payload must be an object")


def encode(message: Message) -> bytes:
    """The bytes of one message line."""
    try:
        line = json.dumps([int(message.code), message.data], separators=(",", ":"), ensure_ascii=False)
        raw = line.encode("utf-8") + b"\n"
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ProtocolError(f"message {message.code.name} cannot be encoded: {exc}") from None
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message {message.code.name} is {len(raw)} bytes, over {MAX_MESSAGE_BYTES}")
    return raw


def decode_line(line: bytes) -> Message:
    """Parse one line (without its terminator) into a message."""
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(value, list) or not value or not isinstance(value[0], int):
        raise ProtocolError("message must be a JSON array [code, payload]")
    try:
        code = Code(value[0])
    except ValueError:
        raise ProtocolError(f"unknown message code {value[0]}") from None
    data = value[1] if len(value) > 1 and value[1] is not None else {}
    return Message(code, data)


class MessageReader:
    """Turns a byte stream into messages; holds at most one partial line.

    Feed bytes with :meth:`receive_data` (``b""`` for end of stream), then take
    messages from :meth:`next_message` until it returns ``None``. A malformed line,
    or one longer than ``max_line``, raises :class:`ProtocolError` once and is
    dropped (an over-long one up to its newline); reading may go on after it, as
    lines are self-delimiting. The hub treats any error as fatal for the instance;
    the runners skip the line.
    """

    def __init__(self, max_line: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._scan_from = 0
        self._skipping = False  # inside an over-long line: drop bytes to its newline
        self.eof = False

    @property
    def pending(self) -> bytes:
        """The bytes of the partial line held (to be fed again after a restart)."""
        return b"" if self._skipping else bytes(self._buffer)

    def receive_data(self, data: bytes) -> None:
        if self.eof and data:
            raise ProtocolError("data after end of stream")
        if not data:
            self.eof = True
            return
        self._buffer += data

    def next_message(self) -> Message | None:
        while True:
            newline = self._buffer.find(b"\n", self._scan_from)
            if self._skipping:
                if newline < 0:
                    self._buffer.clear()
                    self._scan_from = 0
                    return None
                del self._buffer[: newline + 1]
                self._skipping = False
                continue
            if newline < 0:
                if len(self._buffer) > self._max_line:
                    self._buffer.clear()
                    self._scan_from = 0
                    self._skipping = True
                    raise ProtocolError(f"message line over {self._max_line} bytes")
                self._scan_from = len(self._buffer)
                if self.eof and self._buffer:
                    raise ProtocolError("stream ended inside a message")
                return None
            line = bytes(self._buffer[:newline]).rstrip(b"\r")
            del self._buffer[: newline + 1]
            self._scan_from = 0
            if newline > self._max_line:
                raise ProtocolError(f"message line over {self._max_line} bytes")
            if line.strip():
                return decode_line(line)

    def __iter__(self) -> Iterator[Message]:
        while (message := self.next_message()) is not None:
            yield message


def encode_preamble(content_type: str) -> bytes:
    """The input preamble that tells the runner how to read its input."""
    if "\r" in content_type or "\n" in content_type:
        raise ProtocolError("content type may not contain a line break")
    return f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")


class PreambleReader:
    """Reads the input preamble from the start of the input channel.

    Feed bytes until :attr:`headers` is set; :attr:`rest` then holds the input bytes
    that followed the preamble in the same read.
    """

    def __init__(self, max_bytes: int = MAX_PREAMBLE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_bytes
        self.headers: dict[str, str] | None = None
        self.rest = b""

    def receive_data(self, data: bytes) -> bool:
        """Returns True once the preamble is complete."""
        if self.headers is not None:
            raise ProtocolError("preamble already complete")
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self._max or not data:
                raise ProtocolError("input preamble missing or too long")
            return False
        headers: dict[str, str] = {}
        for raw_line in bytes(self._buffer[:end]).decode("latin-1").split("\r\n"):
            key, sep, value = raw_line.partition(":")
            if not sep:
                raise ProtocolError(f"bad preamble line {raw_line!r}")
            headers[key.strip().lower()] = value.strip()
        self.headers = headers
        self.rest = bytes(self._buffer[end + 4 :])
        self._buffer.clear()
        return True
