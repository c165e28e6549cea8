"""The synchronous hub client: :class:`HubClient` → :class:`SequenceClient`, :class:`InstanceClient`.

Example::

    from spacehub import HubClient

    with HubClient("http://127.0.0.1:8000/api/v1") as hub:
        sequence = hub.send_sequence("./hello")            # a directory is packed on the fly
        instance = sequence.start(app_config={"greeting": "Hi"})
        instance.input(b"Alice\\nBob\\n", content_type="text/plain")
        for chunk in instance.output():
            print(chunk.decode(), end="")

Every route is described once in :mod:`._calls`; this module only performs the requests.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, cast

import httpx

from spacehub.models import InstanceInfo, LoadCheck, SequenceInfo, TopicInfo, VersionInfo

from . import _calls as calls
from ._calls import Body, Call, JSONValue, Progress
from .errors import ConnectionFailed
from .pack import pack_to_tempfile

__all__ = ["HubClient", "InstanceClient", "ResponseStream", "SequenceClient"]


class _Transport:
    """Requests relative to one base URL over a shared ``httpx.Client``."""

    def __init__(self, http: httpx.Client, base: str, timeout: httpx.Timeout, long: httpx.Timeout) -> None:
        self.http = http
        self.base = base.rstrip("/")
        self.timeout = timeout
        #: for streams and calls that wait for something to happen
        self.long = long

    def at(self, base: str) -> _Transport:
        return _Transport(self.http, base, self.timeout, self.long)

    def _request(
        self, call: Call, content: Any = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Request:
        return self.http.build_request(
            call.method,
            calls.join(self.base, call.path),
            json=call.json if call.has_json else None,
            content=content,
            headers={**call.headers, **(headers or {})},
            timeout=self.long if call.long else self.timeout,
        )

    def call(self, call: Call, content: Any = None, headers: Mapping[str, str] | None = None) -> JSONValue:
        try:
            response = self.http.send(self._request(call, content, headers))
        except httpx.TransportError as error:
            raise ConnectionFailed(f"{call.method} {self.base}/{call.path}: {error}") from error
        return calls.result(response)

    def upload(self, call: Call, body: Body, progress: Progress | None = None) -> JSONValue:
        content, headers, close = _content(body, progress)
        try:
            return self.call(call, content, headers)
        finally:
            if close is not None:
                close.close()

    def open(self, call: Call) -> httpx.Response:
        try:
            response = self.http.send(self._request(call), stream=True)
        except httpx.TransportError as error:
            raise ConnectionFailed(f"{call.method} {self.base}/{call.path}: {error}") from error
        if response.status_code >= 400:
            try:
                content = _read_some(response)
            finally:
                response.close()
            raise calls.error_of(response, content)
        return response


def _read_some(response: httpx.Response) -> bytes:
    content = b""
    try:
        for chunk in response.iter_bytes():
            content += chunk
            if len(content) >= calls.ERROR_BODY_LIMIT:
                break
    except httpx.HTTPError:
        pass
    return content[: calls.ERROR_BODY_LIMIT]


def _content(body: Body, progress: Progress | None) -> tuple[Any, dict[str, str], IO[bytes] | None]:
    """``(content for httpx, extra headers, file to close)`` for an upload of ``body``."""
    total = calls.body_size(body)
    headers = {"content-length": str(total)} if total is not None else {}
    if isinstance(body, str):
        body = body.encode()
    if isinstance(body, bytes | bytearray | memoryview):
        if progress is None:
            return bytes(body), {}, None
        return calls.counted(calls.chunks_of(body), total, progress), headers, None
    if isinstance(body, os.PathLike):
        file: IO[bytes] = open(body, "rb")  # noqa: SIM115 - closed by the caller after the upload
        return calls.counted(calls.read_file(file), total, progress), headers, file
    if hasattr(body, "read"):
        return calls.counted(calls.read_file(body), total, progress), headers, None  # type: ignore[arg-type]
    return calls.counted(body, None, progress), {}, None


class ResponseStream:
    """A streamed answer: iterate it for bytes, or use :meth:`iter_lines` / :meth:`iter_json`.

    The request is sent when the stream is entered or first iterated; the connection is closed
    when the iteration ends, on :meth:`close`, or on leaving the ``with`` block.
    """

    def __init__(self, transport: _Transport, call: Call) -> None:
        self._transport = transport
        self._call = call
        self._response: httpx.Response | None = None
        self._closed = False

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> httpx.Response:
        """Send the request (once); raises :class:`~.errors.ApiError` for an error answer."""
        if self._closed:
            raise ValueError("the stream is closed")
        if self._response is None:
            self._response = self._transport.open(self._call)
        return self._response

    @property
    def content_type(self) -> str:
        return str(self.open().headers.get("content-type", ""))

    def close(self) -> None:
        self._closed = True
        if self._response is not None:
            self._response.close()

    def __iter__(self) -> Iterator[bytes]:
        return self.iter_bytes()

    def iter_bytes(self, progress: Progress | None = None) -> Iterator[bytes]:
        response = self.open()
        done = 0
        try:
            for chunk in response.iter_raw():
                done += len(chunk)
                if progress is not None:
                    progress(done, None)
                yield chunk
        except httpx.TransportError as error:
            raise ConnectionFailed(f"stream {self._call.path} broke: {error}") from error
        finally:
            self.close()

    def iter_lines(self) -> Iterator[str]:
        response = self.open()
        try:
            yield from response.iter_lines()
        except httpx.TransportError as error:
            raise ConnectionFailed(f"stream {self._call.path} broke: {error}") from error
        finally:
            self.close()

    def iter_json(self) -> Iterator[JSONValue]:
        """The values of an NDJSON stream (a line that is not JSON comes as its text)."""
        for line in self.iter_lines():
            present, value = calls.ndjson_line(line)
            if present:
                yield value


def _open_http(
    url: str,
    token: str | None,
    timeout: float | httpx.Timeout | None,
    verify: ssl.SSLContext | str | bool,
    http: httpx.Client | None,
    stream_timeout: float | None = None,
) -> tuple[_Transport, httpx.Client | None]:
    """The transport, and the ``httpx.Client`` to close if this call made it."""
    t = calls.as_timeout(timeout)
    long = calls.long_timeout(t, stream_timeout)
    owned = None
    if http is None:
        http = owned = httpx.Client(timeout=t, verify=verify, headers=calls.auth_headers(token))
    elif token:
        http.headers.update(calls.auth_headers(token))
    return _Transport(http, url, t, long), owned


class _Closing:
    _owned: httpx.Client | None

    def close(self) -> None:
        """Close the connections, if this client opened them."""
        if self._owned is not None:
            self._owned.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class HubClient(_Closing):
    """A hub's API, e.g. ``HubClient("http://127.0.0.1:8000/api/v1")``.

    ``token`` is sent as ``Authorization: Bearer`` (needed through a Space, not by a hub).
    ``timeout`` bounds ordinary calls (default 30 s); streams and calls that wait for something
    (start, stop, health, events) have no read timeout unless ``stream_timeout`` gives one. Pass
    ``http`` to share a configured ``httpx.Client``; otherwise the client opens its own, closed by
    :meth:`close` or by leaving a ``with`` block.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        verify: ssl.SSLContext | str | bool = True,
        http: httpx.Client | None = None,
        stream_timeout: float | None = None,
    ) -> None:
        self._transport, self._owned = _open_http(url, token, timeout, verify, http, stream_timeout)

    @classmethod
    def _over(cls, transport: _Transport) -> HubClient:
        client = cls.__new__(cls)
        client._transport, client._owned = transport, None
        return client

    @property
    def url(self) -> str:
        return self._transport.base

    # ----------------------------------------------------------------- the hub
    def version(self) -> VersionInfo:
        return cast(VersionInfo, dict(self._transport.call(calls.version())))

    def config(self) -> dict[str, Any]:
        return dict(self._transport.call(calls.config()))

    def status(self) -> dict[str, Any]:
        return dict(self._transport.call(calls.status()))

    def load_check(self) -> LoadCheck:
        return cast(LoadCheck, dict(self._transport.call(calls.load_check())))

    def entities(self) -> dict[str, Any]:
        return dict(self._transport.call(calls.entities()))

    def log(self) -> ResponseStream:
        """The hub's NDJSON log (replayed, then live; never ends): ``for record in hub.log().iter_json()``."""
        return ResponseStream(self._transport, calls.hub_log())

    # ----------------------------------------------------------------- sequences
    def list_sequences(self) -> list[SequenceInfo]:
        return cast(list[SequenceInfo], list(self._transport.call(calls.list_sequences())))

    def sequence(self, sequence_id: str) -> SequenceClient:
        """A handle on sequence ``sequence_id`` (no request is made)."""
        return SequenceClient(self._transport, sequence_id)

    def send_sequence(self, source: Body, *, progress: Progress | None = None) -> SequenceClient:
        """Upload a package: a tar.gz (bytes, path, file, chunks) or a directory, packed on the fly."""
        result = _upload_package(self._transport, calls.send_sequence(), source, progress)
        return SequenceClient(self._transport, calls.started_id(result))

    # ----------------------------------------------------------------- instances
    def list_instances(self) -> list[InstanceInfo]:
        return cast(list[InstanceInfo], list(self._transport.call(calls.list_instances())))

    def instance(self, instance_id: str) -> InstanceClient:
        """A handle on instance ``instance_id`` (no request is made)."""
        return InstanceClient(self._transport, instance_id)

    # ----------------------------------------------------------------- topics
    def list_topics(self) -> list[TopicInfo]:
        return cast(list[TopicInfo], list(self._transport.call(calls.list_topics())))

    def create_topic(self, name: str, content_type: str = calls.DEFAULT_TOPIC_TYPE) -> dict[str, Any]:
        return dict(self._transport.call(calls.create_topic(name, content_type)))

    def delete_topic(self, name: str) -> dict[str, Any]:
        return dict(self._transport.call(calls.delete_topic(name)))

    def send_topic(
        self,
        name: str,
        data: Body,
        *,
        content_type: str = calls.DEFAULT_TOPIC_TYPE,
        end: bool | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Write ``data`` into topic ``name`` (returns once the hub has taken all of it)."""
        self._transport.upload(calls.send_topic(name, content_type, end), data, progress)

    def get_topic(self, name: str, *, content_type: str = calls.DEFAULT_TOPIC_TYPE) -> ResponseStream:
        """The data of topic ``name`` from now on (never ends by itself)."""
        return ResponseStream(self._transport, calls.get_topic(name, content_type))


def _upload_package(transport: _Transport, call: Call, source: Body, progress: Progress | None) -> JSONValue:
    if isinstance(source, str | os.PathLike) and Path(source).is_dir():
        with pack_to_tempfile(source) as file:
            return transport.upload(call, file, progress)
    if isinstance(source, str):
        source = Path(source)
    return transport.upload(call, source, progress)


class SequenceClient:
    """One sequence of a hub."""

    def __init__(self, transport: _Transport, sequence_id: str) -> None:
        self._transport = transport
        self.id = sequence_id

    def __repr__(self) -> str:
        return f"SequenceClient({self.id!r})"

    def info(self) -> SequenceInfo:
        return cast(SequenceInfo, dict(self._transport.call(calls.sequence_info(self.id))))

    def instances(self) -> list[str]:
        """The ids of its instances."""
        return list(self._transport.call(calls.sequence_instances(self.id)))

    def start(
        self,
        *,
        app_config: Mapping[str, Any] | None = None,
        args: Iterable[Any] | None = None,
        instance_id: str | None = None,
        input_topic: str | None = None,
        output_topic: str | None = None,
        limits: Mapping[str, Any] | None = None,
        restart: str | None = None,
    ) -> InstanceClient:
        """Start an instance; returns once it runs (the hub waits for the runner's handshake).
        ``restart``: "never" (default), "on-failure" or "always": the hub starts it again
        when it ends, after a reboot too."""
        call = calls.start(
            self.id,
            app_config=app_config,
            args=args,
            instance_id=instance_id,
            input_topic=input_topic,
            output_topic=output_topic,
            limits=limits,
            restart=restart,
        )
        return InstanceClient(self._transport, calls.started_id(self._transport.call(call)))

    def update(self, source: Body, *, progress: Progress | None = None) -> dict[str, Any]:
        """Replace its package (a tar.gz or a directory); refused while an instance runs."""
        return dict(_upload_package(self._transport, calls.update_sequence(self.id), source, progress))

    def delete(self, *, force: bool = False) -> dict[str, Any]:
        """Remove it; ``force`` kills its running instances first."""
        return dict(self._transport.call(calls.delete_sequence(self.id, force)))


class InstanceClient:
    """One instance of a hub."""

    def __init__(self, transport: _Transport, instance_id: str) -> None:
        self._transport = transport
        self.id = instance_id

    def __repr__(self) -> str:
        return f"InstanceClient({self.id!r})"

    def info(self) -> InstanceInfo:
        return cast(InstanceInfo, dict(self._transport.call(calls.instance_info(self.id))))

    def health(self) -> dict[str, Any]:
        return dict(self._transport.call(calls.health(self.id)))

    # ----------------------------------------------------------------- streams in
    def input(
        self,
        data: Body,
        *,
        content_type: str | None = None,
        end: bool = True,
        progress: Progress | None = None,
    ) -> None:
        """Send ``data`` to its input; the first call's ``content_type`` types it; ``end=False``
        keeps it open."""
        self._transport.upload(calls.instance_write(self.id, "input", content_type, end), data, progress)

    def stdin(self, data: Body, *, end: bool = True, progress: Progress | None = None) -> None:
        """Send ``data`` to its process's stdin."""
        self._transport.upload(calls.instance_write(self.id, "stdin", None, end), data, progress)

    # ----------------------------------------------------------------- streams out
    def _stream(
        self, name: Literal["output", "stdout", "stderr", "log"], offset: int | None = None
    ) -> ResponseStream:
        return ResponseStream(self._transport, calls.instance_stream(self.id, name, offset))

    def output(self, offset: int | None = None) -> ResponseStream:
        """Its output bytes, until it ends; from byte ``offset`` of the stream if given
        (resume after a cut with the count of bytes you had: nothing lost or repeated)."""
        return self._stream("output", offset)

    def stdout(self, offset: int | None = None) -> ResponseStream:
        return self._stream("stdout", offset)

    def stderr(self, offset: int | None = None) -> ResponseStream:
        return self._stream("stderr", offset)

    def log(self) -> ResponseStream:
        """Its NDJSON log: ``for record in instance.log().iter_json()``."""
        return self._stream("log")

    # ----------------------------------------------------------------- events
    def send_event(self, name: str, message: JSONValue = None) -> None:
        self._transport.call(calls.send_event(self.id, name, message))

    def next_event(self, name: str) -> JSONValue:
        """The message of the next ``name`` event it emits (waits for it)."""
        return self._transport.call(calls.next_event(self.id, name))

    def last_event(self, name: str) -> JSONValue:
        """The message of the last ``name`` event it emitted, or the next one if none yet."""
        return self._transport.call(calls.last_event(self.id, name))

    def events(self, name: str) -> ResponseStream:
        """Every ``name`` message from now on: ``for message in instance.events("x").iter_json()``."""
        return ResponseStream(self._transport, calls.event_stream(self.id, name))

    # ----------------------------------------------------------------- ending
    def stop(self, timeout_ms: int = 7000, *, can_call_keepalive: bool = False) -> dict[str, Any]:
        """Ask it to stop; returns (its info) once it ended or the window closed."""
        return dict(self._transport.call(calls.stop(self.id, timeout_ms, can_call_keepalive)))

    def kill(self, *, remove_immediately: bool = False) -> dict[str, Any]:
        """SIGTERM (then SIGKILL) its process group; returns its info (``"status": "killing"``)."""
        return dict(self._transport.call(calls.kill(self.id, remove_immediately)))
