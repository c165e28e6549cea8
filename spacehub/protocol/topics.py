"""Space-wide topics on the link: what the bytes of each topic stream look like.

Theory of operation
-------------------
A topic of a Space spans its hubs through the manager (docs/data-spaces.md). Each
hub that produces a topic the Space wants *pushes* it, and each hub with local
consumers *pulls* it, both as link streams the hub opens (so each topic, each way,
has the link's per-stream flow control):

``GET /space-topics``
    The manager answers with NDJSON lines ``{"wanted": ["t", ...]}``, the names the
    Space has consumers of other than this hub, at once and then on each change.
``POST /space-topics/<name>/push`` (``x-offset: N``, ``content-type``)
    The request body is the hub's spool of ``<name>`` from offset N on: *entries*,
    each :data:`ENTRY` (the length) and that many bytes of whole records. The
    response body is :data:`ACK` values: the offset up to which the manager has
    stored the hub's entries. The hub sends again from its last ack after any cut;
    the manager skips what it already has, by offset: nothing stored twice.
``POST /space-topics/<name>/pull`` (``x-offset: N`` optional)
    The response body is *deliveries*: :data:`DELIVERY` (the offset in the
    manager's log just past the delivered records, and their length), then the
    records. A delivery of length 0 only moves the offset (records this hub made
    itself are never sent back to it). The request body is :data:`ACK` values: the
    offset up to which the hub's local consumers have taken the records. The next
    pull names it as ``x-offset``: nothing skipped, nothing repeated.
``DELETE /space-topics/<name>/pull``
    The hub has no consumers of ``<name>`` any more: the manager keeps nothing for it.

Nothing here does I/O: :class:`FrameReader` cuts a byte stream into frames, with a
bound on the size of one frame.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import Final

__all__ = [
    "ACK",
    "CONTENT_TYPES",
    "DEFAULT_CONTENT_TYPE",
    "DELIVERY",
    "ENTRY",
    "MAX_ENTRY_BYTES",
    "NAME_PATTERN",
    "NAME_RULE",
    "NDJSON_TYPES",
    "FrameError",
    "FrameReader",
    "ack",
    "delivery",
    "entry",
    "media_type",
    "split_records",
]

#: Content types a topic may carry (on a hub and in a Space alike).
CONTENT_TYPES: Final = ("application/x-ndjson", "text/x-ndjson", "text/plain", "application/octet-stream")
DEFAULT_CONTENT_TYPE: Final = "application/x-ndjson"
NDJSON_TYPES: Final = frozenset({"application/x-ndjson", "text/x-ndjson"})
#: A topic's name, and the rule told to whoever breaks it.
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9_+-]{1,128}$")
NAME_RULE: Final = "1-128 characters: letters, digits, '_', '+', '-'"

#: A spool entry's header: the length of the records that follow.
ENTRY: Final = struct.Struct("<I")
#: A delivery's header: the log offset just past it, and the length of the records that follow.
DELIVERY: Final = struct.Struct("<QI")
#: An acknowledgement: an offset.
ACK: Final = struct.Struct("<Q")
#: The most record bytes one entry or delivery carries: a longer record is cut into
#: entries of this size (readers of a topic see the same bytes, but another producer's
#: records may come between its pieces).
MAX_ENTRY_BYTES: Final = 256 * 1024


class FrameError(ValueError):
    """The peer sent a frame this end cannot take (too large)."""


def media_type(content_type: str) -> str | None:
    """The topic type a ``Content-Type`` names (parameters and case dropped); None if a
    topic cannot carry it."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind if kind in CONTENT_TYPES else None


def entry(records: bytes | bytearray | memoryview) -> bytes:
    return ENTRY.pack(len(records)) + bytes(records)


def delivery(end: int, records: bytes | bytearray | memoryview) -> bytes:
    return DELIVERY.pack(end, len(records)) + bytes(records)


def ack(offset: int) -> bytes:
    return ACK.pack(offset)


def split_records(pending: bytes, chunk: bytes, whole_lines: bool) -> tuple[bytes, bytes]:
    """``(ready, pending)``: of ``pending + chunk``, what is whole records now, and the
    partial record to keep. Without ``whole_lines`` (octet streams) everything is ready;
    a partial line longer than :data:`MAX_ENTRY_BYTES` is let go as it is."""
    data = pending + chunk if pending else chunk
    if not whole_lines:
        return data, b""
    cut = data.rfind(b"\n") + 1
    if cut == 0 and len(data) <= MAX_ENTRY_BYTES:
        return b"", data
    if cut == 0:
        return data, b""
    return data[:cut], data[cut:]


class FrameReader:
    """Cuts a byte stream into frames: ``header`` (whose last field is the length of
    what follows, or none for fixed frames such as :data:`ACK`) and the payload.

    Feed it bytes with :meth:`feed`, then iterate :meth:`frames` for ``(fields, payload)``.
    Holds at most one partial frame; frames wholly inside a chunk fed are cut from it
    without copying the chunk first (records go through here at link speed)."""

    def __init__(
        self, header: struct.Struct, *, sized: bool = True, max_payload: int = MAX_ENTRY_BYTES
    ) -> None:
        self._header = header
        self._sized = sized
        self._max_payload = max_payload
        #: the bytes not yet returned: a chunk as fed, or the partial frame joined with it
        self._data: bytes | bytearray = b""
        self._position = 0

    @property
    def pending(self) -> int:
        """Bytes fed and not yet returned in a frame."""
        return len(self._data) - self._position

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._position >= len(self._data):
            self._data = bytes(data)
        else:
            rest = bytearray(memoryview(self._data)[self._position :])
            rest += data
            self._data = rest
        self._position = 0

    def frames(self) -> Iterator[tuple[tuple[int, ...], bytes]]:
        header = self._header
        data = self._data
        view = memoryview(data)
        while True:
            start = self._position
            if len(data) - start < header.size:
                return
            fields = header.unpack_from(data, start)
            size = fields[-1] if self._sized else 0
            if size > self._max_payload:
                raise FrameError(f"a frame of {size} bytes is over the bound of {self._max_payload}")
            end = start + header.size + size
            if len(data) < end:
                return
            payload = bytes(view[start + header.size : end])
            self._position = end
            yield fields, payload
