"""What the sync and async clients share: every API call as data, and how answers are read.

The clients in :mod:`.hub`, :mod:`.aio` and :mod:`.space` are thin I/O shells. Each method builds a
:class:`Call` here (method, path, JSON body, headers, whether it may wait long), hands it to its
transport, and turns the answer into a value with :func:`result`. Nothing in this module does I/O,
so a route or a quirk of the API is written down once for both flavours.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Final, Literal
from urllib.parse import quote

import httpx

from .errors import ApiError, api_error

__all__ = [
    "CHUNK_SIZE",
    "ERROR_BODY_LIMIT",
    "Body",
    "Call",
    "JSONValue",
    "Progress",
]

#: Size of the pieces uploads are read and sent in.
CHUNK_SIZE: Final = 64 * 1024
#: At most this much of an error answer is read to find its message.
ERROR_BODY_LIMIT: Final = 64 * 1024
#: Default timeout of calls that answer at once; streams and long polls wait without a read timeout.
DEFAULT_TIMEOUT: Final = 30.0

JSONValue = Any
#: Called as an upload or download goes: ``progress(bytes_done, bytes_total_or_None)``.
Progress = Callable[[int, "int | None"], None]
#: What can be uploaded: bytes, text, a path, an open binary file, or an iterable of chunks.
Body = bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes] | Iterable[bytes | str]

_NO_JSON: Final = object()


@dataclass(frozen=True, slots=True)
class Call:
    """One request of the API, relative to the client's base URL."""

    method: Literal["GET", "POST", "PUT", "DELETE"]
    path: str
    json: Any = _NO_JSON
    headers: Mapping[str, str] = field(default_factory=dict)
    #: waits for something to happen (start, stop, events, health, streams): no read timeout
    long: bool = False

    @property
    def has_json(self) -> bool:
        return self.json is not _NO_JSON


def segment(value: str) -> str:
    """``value`` made safe as one path segment."""
    if not value:
        raise ValueError("an id or name must not be empty")
    return quote(value, safe="")


def join(base: str, path: str) -> str:
    return f"{base.rstrip('/')}/{path.lstrip('/')}"


def long_timeout(timeout: httpx.Timeout, read: float | None = None) -> httpx.Timeout:
    """``timeout`` for calls that wait: ``read`` (default: none) between two pieces of the answer."""
    return httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool)


def as_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(DEFAULT_TIMEOUT if timeout is None else timeout)


def auth_headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


# ------------------------------------------------------------------------------------ answers
def error_of(response: httpx.Response, content: bytes) -> ApiError:
    return api_error(response.status_code, content, response.reason_phrase)


def result(response: httpx.Response) -> JSONValue:
    """The JSON value of a read answer (``None`` for an empty body); raises :class:`ApiError`."""
    if response.status_code >= 400:
        raise error_of(response, response.content[:ERROR_BODY_LIMIT])
    if not response.content.strip():
        return None
    try:
        return json.loads(response.content)
    except ValueError:
        return response.text


def ndjson_line(line: str) -> tuple[bool, JSONValue]:
    """``(True, value)`` for a line of an NDJSON stream, ``(False, None)`` for a blank one."""
    line = line.strip()
    if not line:
        return False, None
    try:
        return True, json.loads(line)
    except ValueError:
        return True, line


# ------------------------------------------------------------------------------------ bodies
def upload_headers(content_type: str | None, end: bool | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if content_type:
        headers["content-type"] = content_type
    if end is not None:
        headers["x-end-stream"] = "true" if end else "false"
    return headers


def body_size(body: object) -> int | None:
    """The length of ``body`` if it can be known without reading it."""
    if isinstance(body, bytes | bytearray | memoryview):
        return len(body)
    if isinstance(body, str):
        return len(body.encode())
    if isinstance(body, os.PathLike):
        return os.stat(body).st_size
    fileno = getattr(body, "fileno", None)
    if fileno is not None:
        try:
            info = os.fstat(fileno())
            tell = getattr(body, "tell", None)
            offset = tell() if tell is not None else 0
        except (OSError, ValueError):
            return None
        if stat.S_ISREG(info.st_mode):
            return max(0, info.st_size - offset)
    return None


def chunks_of(data: bytes | bytearray | memoryview) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), CHUNK_SIZE):
        yield bytes(view[start : start + CHUNK_SIZE])


def read_file(file: IO[bytes]) -> Iterator[bytes]:
    while chunk := file.read(CHUNK_SIZE):
        yield chunk


def as_bytes(chunk: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(chunk, str):
        return chunk.encode()
    return bytes(chunk)


def counted(chunks: Iterable[bytes | str], total: int | None, progress: Progress | None) -> Iterator[bytes]:
    done = 0
    for chunk in chunks:
        data = as_bytes(chunk)
        done += len(data)
        if progress is not None:
            progress(done, total)
        yield data


# ------------------------------------------------------------------------------------ hub routes
def version() -> Call:
    return Call("GET", "version")


def config() -> Call:
    return Call("GET", "config")


def status() -> Call:
    return Call("GET", "status")


def load_check() -> Call:
    return Call("GET", "load-check")


def hub_log() -> Call:
    return Call("GET", "log", long=True)


def entities() -> Call:
    return Call("GET", "entities")


def list_sequences() -> Call:
    return Call("GET", "sequences")


def list_instances() -> Call:
    return Call("GET", "instances")


def space_sequences() -> Call:
    """The Space's sequences, whole and naming their hubs (our ``?detail=true``)."""
    return Call("GET", "sequences?detail=true")


def space_instances() -> Call:
    return Call("GET", "instances?detail=true")


def send_sequence() -> Call:
    return Call("POST", "sequence", headers={"content-type": "application/octet-stream"}, long=True)


def update_sequence(sequence_id: str) -> Call:
    return Call(
        "PUT",
        f"sequence/{segment(sequence_id)}",
        headers={"content-type": "application/octet-stream"},
        long=True,
    )


def sequence_info(sequence_id: str) -> Call:
    return Call("GET", f"sequence/{segment(sequence_id)}")


def sequence_instances(sequence_id: str) -> Call:
    return Call("GET", f"sequence/{segment(sequence_id)}/instances")


def delete_sequence(sequence_id: str, force: bool) -> Call:
    headers = {"content-type": "application/json"}
    if force:
        headers["x-seq-kill-inst"] = "true"
    return Call("DELETE", f"sequence/{segment(sequence_id)}", headers=headers, long=force)


def start(
    sequence_id: str,
    *,
    app_config: Mapping[str, Any] | None = None,
    args: Iterable[Any] | None = None,
    instance_id: str | None = None,
    input_topic: str | None = None,
    output_topic: str | None = None,
    limits: Mapping[str, Any] | None = None,
    restart: str | None = None,
) -> Call:
    payload: dict[str, Any] = {}
    if app_config is not None:
        payload["appConfig"] = dict(app_config)
    if args is not None:
        payload["args"] = list(args)
    if instance_id is not None:
        payload["instanceId"] = instance_id
    if input_topic is not None:
        payload["inputTopic"] = input_topic
    if output_topic is not None:
        payload["outputTopic"] = output_topic
    if limits is not None:
        payload["limits"] = dict(limits)
    if restart is not None:
        payload["restart"] = restart
    return Call("POST", f"sequence/{segment(sequence_id)}/start", json=payload, long=True)


def started_id(value: JSONValue) -> str:
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    raise ApiError(200, f"unexpected answer: {value!r}", value)


# ------------------------------------------------------------------------------------ instances
def _instance(instance_id: str, rest: str = "") -> str:
    return f"instance/{segment(instance_id)}{rest}"


def instance_info(instance_id: str) -> Call:
    return Call("GET", _instance(instance_id))


def health(instance_id: str) -> Call:
    return Call("GET", _instance(instance_id, "/health"), long=True)


def instance_stream(
    instance_id: str, name: Literal["output", "stdout", "stderr", "log"], offset: int | None = None
) -> Call:
    """``offset``: from that byte of the stream (a reader resuming after a cut)."""
    query = "" if offset is None else f"?offset={int(offset)}"
    return Call("GET", _instance(instance_id, f"/{name}") + query, long=True)


def instance_write(
    instance_id: str, name: Literal["input", "stdin"], content_type: str | None, end: bool
) -> Call:
    return Call(
        "POST", _instance(instance_id, f"/{name}"), headers=upload_headers(content_type, end), long=True
    )


def send_event(instance_id: str, name: str, message: JSONValue) -> Call:
    return Call("POST", _instance(instance_id, "/_event"), json={"eventName": name, "message": message})


def last_event(instance_id: str, name: str) -> Call:
    return Call("GET", _instance(instance_id, f"/event/{segment(name)}"), long=True)


def next_event(instance_id: str, name: str) -> Call:
    return Call("GET", _instance(instance_id, f"/once/{segment(name)}"), long=True)


def event_stream(instance_id: str, name: str) -> Call:
    return Call("GET", _instance(instance_id, f"/events/{segment(name)}"), long=True)


def stop(instance_id: str, timeout_ms: int, can_call_keepalive: bool) -> Call:
    body = {"timeout": timeout_ms, "canCallKeepalive": can_call_keepalive}
    return Call("POST", _instance(instance_id, "/_stop"), json=body, long=True)


def kill(instance_id: str, remove_immediately: bool) -> Call:
    body = {"removeImmediately": True} if remove_immediately else {}
    return Call("POST", _instance(instance_id, "/_kill"), json=body)


# ------------------------------------------------------------------------------------ topics
#: What a topic without a declared type carries (as in the original clients).
DEFAULT_TOPIC_TYPE: Final = "application/x-ndjson"


def list_topics() -> Call:
    return Call("GET", "topics")


def create_topic(name: str, content_type: str) -> Call:
    return Call("POST", "topics", json={"id": name, "content-type": content_type})


def delete_topic(name: str) -> Call:
    return Call("DELETE", f"topics/{segment(name)}", headers={"content-type": "application/json"})


def send_topic(name: str, content_type: str, end: bool | None) -> Call:
    return Call("POST", f"topic/{segment(name)}", headers=upload_headers(content_type, end), long=True)


def get_topic(name: str, content_type: str) -> Call:
    return Call("GET", f"topic/{segment(name)}", headers={"content-type": content_type}, long=True)


# ------------------------------------------------------------------------------------ space / manager
def hub_base(space_url: str, hub_id: str) -> str:
    """The base URL of hub ``hub_id``'s API through its Space's tunnel."""
    return join(space_url, f"sth/{segment(hub_id)}/api/v1")


def space_base(manager_url: str, space: str) -> str:
    return join(manager_url, f"space/{segment(space)}/api/v1")


def space_load() -> Call:
    return Call("GET", "load")


def space_hubs() -> Call:
    return Call("GET", "list")


def space_hub_info(hub_id: str) -> Call:
    return Call("GET", f"sth/{segment(hub_id)}/info")


def create_join_token(
    expires: float | str | None, description: str | None, tags: Iterable[str] | None
) -> Call:
    body: dict[str, Any] = {}
    if expires is not None:
        body["expires"] = expires
    if description:
        body["description"] = description
    if tags:
        body["tags"] = list(tags)
    return Call("POST", "join-tokens", json=body)


def join_tokens() -> Call:
    return Call("GET", "join-tokens")


def revoke_join_token(token_id: str) -> Call:
    return Call("DELETE", f"join-tokens/{segment(token_id)}")


def spaces() -> Call:
    return Call("GET", "spaces")
