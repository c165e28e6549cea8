"""The asynchronous twins of :mod:`.hub`: :class:`AsyncHubClient`, :class:`AsyncSequenceClient`,
:class:`AsyncInstanceClient`.

They run over ``httpx.AsyncClient`` and use only anyio (which httpx itself depends on) for the few
blocking steps (reading a file, packing a directory), so the same code works under Trio and asyncio::

    async with AsyncHubClient("http://127.0.0.1:8000/api/v1") as hub:
        sequence = await hub.send_sequence(Path("./hello"))
        instance = await sequence.start(args=["x"])
        async with instance.output() as output:
            async for chunk in output:
                ...

Routes and answers are described once in :mod:`._calls`, shared with the sync client.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, cast

import anyio.to_thread
import httpx

from spacehub.models import InstanceInfo, LoadCheck, SequenceInfo, TopicInfo, VersionInfo

from . import _calls as calls
from ._calls import Body, Call, JSONValue, Progress
from .errors import ConnectionFailed
from .pack import pack_to_tempfile

__all__ = ["AsyncBody", "AsyncHubClient", "AsyncInstanceClient", "AsyncResponseStream", "AsyncSequenceClient"]

#: What the async client uploads: anything :data:`Body` is, or an async iterable of chunks.
AsyncBody = Body | AsyncIterable[bytes]


class _AsyncTransport:
    """Requests relative to one base URL over a shared ``httpx.AsyncClient``."""

    def __init__(
        self, http: httpx.AsyncClient, base: str, timeout: httpx.Timeout, long: httpx.Timeout
    ) -> None:
        self.http = http
        self.base = base.rstrip("/")
        self.timeout = timeout
        #: for streams and calls that wait for something to happen
        self.long = long

    def at(self, base: str) -> _AsyncTransport:
        return _AsyncTransport(self.http, base, self.timeout, self.long)

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

    async def call(
        self, call: Call, content: Any = None, headers: Mapping[str, str] | None = None
    ) -> JSONValue:
        try:
            response = await self.http.send(self._request(call, content, headers))
        except httpx.TransportError as error:
            raise ConnectionFailed(f"{call.method} {self.base}/{call.path}: {error}") from error
        return calls.result(response)

    async def upload(self, call: Call, body: AsyncBody, progress: Progress | None = None) -> JSONValue:
        content, headers, close = _content(body, progress)
        try:
            return await self.call(call, content, headers)
        finally:
            if close is not None:
                close.close()

    async def open(self, call: Call) -> httpx.Response:
        try:
            response = await self.http.send(self._request(call), stream=True)
        except httpx.TransportError as error:
            raise ConnectionFailed(f"{call.method} {self.base}/{call.path}: {error}") from error
        if response.status_code >= 400:
            try:
                content = await _read_some(response)
            finally:
                await response.aclose()
            raise calls.error_of(response, content)
        return response


async def _read_some(response: httpx.Response) -> bytes:
    content = b""
    try:
        async for chunk in response.aiter_bytes():
            content += chunk
            if len(content) >= calls.ERROR_BODY_LIMIT:
                break
    except httpx.HTTPError:
        pass
    return content[: calls.ERROR_BODY_LIMIT]


async def _read_file(file: IO[bytes], total: int | None, progress: Progress | None) -> AsyncIterator[bytes]:
    done = 0
    while chunk := await anyio.to_thread.run_sync(file.read, calls.CHUNK_SIZE):
        done += len(chunk)
        if progress is not None:
            progress(done, total)
        yield chunk


async def _from_sync(
    chunks: Iterable[bytes | str], total: int | None, progress: Progress | None
) -> AsyncIterator[bytes]:
    for chunk in calls.counted(chunks, total, progress):
        yield chunk


async def _from_async(chunks: AsyncIterable[bytes], progress: Progress | None) -> AsyncIterator[bytes]:
    done = 0
    async for chunk in chunks:
        data = calls.as_bytes(chunk)
        done += len(data)
        if progress is not None:
            progress(done, None)
        yield data


def _content(body: AsyncBody, progress: Progress | None) -> tuple[Any, dict[str, str], IO[bytes] | None]:
    """``(content for httpx, extra headers, file to close)`` for an upload of ``body``."""
    if isinstance(body, AsyncIterable):
        return _from_async(body, progress), {}, None
    total = calls.body_size(body)
    headers = {"content-length": str(total)} if total is not None else {}
    if isinstance(body, str):
        body = body.encode()
    if isinstance(body, bytes | bytearray | memoryview):
        if progress is None:
            return bytes(body), {}, None
        return _from_sync(calls.chunks_of(body), total, progress), headers, None
    if isinstance(body, os.PathLike):
        file: IO[bytes] = open(body, "rb")  # noqa: SIM115 - closed by the caller after the upload
        return _read_file(file, total, progress), headers, file
    if hasattr(body, "read"):
        return _read_file(body, total, progress), headers, None  # type: ignore[arg-type]
    return _from_sync(body, None, progress), {}, None


class AsyncResponseStream:
    """A streamed answer: ``async for`` it for bytes, or use :meth:`aiter_lines` / :meth:`aiter_json`.

    The request is sent when the stream is entered or first iterated; the connection is closed when
    the iteration ends, on :meth:`aclose`, or on leaving the ``async with`` block.
    """

    def __init__(self, transport: _AsyncTransport, call: Call) -> None:
        self._transport = transport
        self._call = call
        self._response: httpx.Response | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> httpx.Response:
        if self._closed:
            raise ValueError("the stream is closed")
        if self._response is None:
            self._response = await self._transport.open(self._call)
        return self._response

    @property
    def content_type(self) -> str:
        """The answer's Content-Type, once the stream is open (``async with`` or :meth:`open`):
        a property cannot wait for the request the sync client sends here."""
        if self._response is None:
            raise ValueError("open the stream first (async with, or await open())")
        return str(self._response.headers.get("content-type", ""))

    async def aclose(self) -> None:
        self._closed = True
        if self._response is not None:
            await self._response.aclose()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.aiter_bytes()

    async def aiter_bytes(self, progress: Progress | None = None) -> AsyncIterator[bytes]:
        response = await self.open()
        done = 0
        try:
            async for chunk in response.aiter_raw():
                done += len(chunk)
                if progress is not None:
                    progress(done, None)
                yield chunk
        except httpx.TransportError as error:
            raise ConnectionFailed(f"stream {self._call.path} broke: {error}") from error
        finally:
            await self.aclose()

    async def aiter_lines(self) -> AsyncIterator[str]:
        response = await self.open()
        try:
            async for line in response.aiter_lines():
                yield line
        except httpx.TransportError as error:
            raise ConnectionFailed(f"stream {self._call.path} broke: {error}") from error
        finally:
            await self.aclose()

    async def aiter_json(self) -> AsyncIterator[JSONValue]:
        """The values of an NDJSON stream (a line that is not JSON comes as its text)."""
        async for line in self.aiter_lines():
            present, value = calls.ndjson_line(line)
            if present:
                yield value


def _open_http(
    url: str,
    token: str | None,
    timeout: float | httpx.Timeout | None,
    verify: ssl.SSLContext | str | bool,
    http: httpx.AsyncClient | None,
    stream_timeout: float | None = None,
) -> tuple[_AsyncTransport, httpx.AsyncClient | None]:
    t = calls.as_timeout(timeout)
    long = calls.long_timeout(t, stream_timeout)
    owned = None
    if http is None:
        http = owned = httpx.AsyncClient(timeout=t, verify=verify, headers=calls.auth_headers(token))
    elif token:
        http.headers.update(calls.auth_headers(token))
    return _AsyncTransport(http, url, t, long), owned


class _AsyncClosing:
    _owned: httpx.AsyncClient | None

    async def aclose(self) -> None:
        """Close the connections, if this client opened them."""
        if self._owned is not None:
            await self._owned.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class AsyncHubClient(_AsyncClosing):
    """A hub's API, async; see :class:`~.hub.HubClient` for the arguments."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        verify: ssl.SSLContext | str | bool = True,
        http: httpx.AsyncClient | None = None,
        stream_timeout: float | None = None,
    ) -> None:
        self._transport, self._owned = _open_http(url, token, timeout, verify, http, stream_timeout)

    @classmethod
    def _over(cls, transport: _AsyncTransport) -> AsyncHubClient:
        client = cls.__new__(cls)
        client._transport, client._owned = transport, None
        return client

    @property
    def url(self) -> str:
        return self._transport.base

    async def version(self) -> VersionInfo:
        return cast(VersionInfo, dict(await self._transport.call(calls.version())))

    async def config(self) -> dict[str, Any]:
        return dict(await self._transport.call(calls.config()))

    async def status(self) -> dict[str, Any]:
        return dict(await self._transport.call(calls.status()))

    async def load_check(self) -> LoadCheck:
        return cast(LoadCheck, dict(await self._transport.call(calls.load_check())))

    async def entities(self) -> dict[str, Any]:
        return dict(await self._transport.call(calls.entities()))

    def log(self) -> AsyncResponseStream:
        return AsyncResponseStream(self._transport, calls.hub_log())

    async def list_sequences(self) -> list[SequenceInfo]:
        return cast(list[SequenceInfo], list(await self._transport.call(calls.list_sequences())))

    def sequence(self, sequence_id: str) -> AsyncSequenceClient:
        return AsyncSequenceClient(self._transport, sequence_id)

    async def send_sequence(
        self, source: AsyncBody, *, progress: Progress | None = None
    ) -> AsyncSequenceClient:
        result = await _upload_package(self._transport, calls.send_sequence(), source, progress)
        return AsyncSequenceClient(self._transport, calls.started_id(result))

    async def list_instances(self) -> list[InstanceInfo]:
        return cast(list[InstanceInfo], list(await self._transport.call(calls.list_instances())))

    def instance(self, instance_id: str) -> AsyncInstanceClient:
        return AsyncInstanceClient(self._transport, instance_id)

    async def list_topics(self) -> list[TopicInfo]:
        return cast(list[TopicInfo], list(await self._transport.call(calls.list_topics())))

    async def create_topic(self, name: str, content_type: str = calls.DEFAULT_TOPIC_TYPE) -> dict[str, Any]:
        return dict(await self._transport.call(calls.create_topic(name, content_type)))

    async def delete_topic(self, name: str) -> dict[str, Any]:
        return dict(await self._transport.call(calls.delete_topic(name)))

    async def send_topic(
        self,
        name: str,
        data: AsyncBody,
        *,
        content_type: str = calls.DEFAULT_TOPIC_TYPE,
        end: bool | None = None,
        progress: Progress | None = None,
    ) -> None:
        await self._transport.upload(calls.send_topic(name, content_type, end), data, progress)

    def get_topic(self, name: str, *, content_type: str = calls.DEFAULT_TOPIC_TYPE) -> AsyncResponseStream:
        return AsyncResponseStream(self._transport, calls.get_topic(name, content_type))


async def _upload_package(
    transport: _AsyncTransport, call: Call, source: AsyncBody, progress: Progress | None
) -> JSONValue:
    if isinstance(source, str | os.PathLike) and await anyio.to_thread.run_sync(Path(source).is_dir):
        file = await anyio.to_thread.run_sync(pack_to_tempfile, source)
        try:
            return await transport.upload(call, file, progress)
        finally:
            file.close()
    if isinstance(source, str):
        source = Path(source)
    return await transport.upload(call, source, progress)


class AsyncSequenceClient:
    """One sequence of a hub, async."""

    def __init__(self, transport: _AsyncTransport, sequence_id: str) -> None:
        self._transport = transport
        self.id = sequence_id

    def __repr__(self) -> str:
        return f"AsyncSequenceClient({self.id!r})"

    async def info(self) -> SequenceInfo:
        return cast(SequenceInfo, dict(await self._transport.call(calls.sequence_info(self.id))))

    async def instances(self) -> list[str]:
        return list(await self._transport.call(calls.sequence_instances(self.id)))

    async def start(
        self,
        *,
        app_config: Mapping[str, Any] | None = None,
        args: Iterable[Any] | None = None,
        instance_id: str | None = None,
        input_topic: str | None = None,
        output_topic: str | None = None,
        limits: Mapping[str, Any] | None = None,
        restart: str | None = None,
    ) -> AsyncInstanceClient:
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
        return AsyncInstanceClient(self._transport, calls.started_id(await self._transport.call(call)))

    async def update(self, source: AsyncBody, *, progress: Progress | None = None) -> dict[str, Any]:
        return dict(await _upload_package(self._transport, calls.update_sequence(self.id), source, progress))

    async def delete(self, *, force: bool = False) -> dict[str, Any]:
        return dict(await self._transport.call(calls.delete_sequence(self.id, force)))


class AsyncInstanceClient:
    """One instance of a hub, async."""

    def __init__(self, transport: _AsyncTransport, instance_id: str) -> None:
        self._transport = transport
        self.id = instance_id

    def __repr__(self) -> str:
        return f"AsyncInstanceClient({self.id!r})"

    async def info(self) -> InstanceInfo:
        return cast(InstanceInfo, dict(await self._transport.call(calls.instance_info(self.id))))

    async def health(self) -> dict[str, Any]:
        return dict(await self._transport.call(calls.health(self.id)))

    async def input(
        self,
        data: AsyncBody,
        *,
        content_type: str | None = None,
        end: bool = True,
        progress: Progress | None = None,
    ) -> None:
        await self._transport.upload(
            calls.instance_write(self.id, "input", content_type, end), data, progress
        )

    async def stdin(self, data: AsyncBody, *, end: bool = True, progress: Progress | None = None) -> None:
        await self._transport.upload(calls.instance_write(self.id, "stdin", None, end), data, progress)

    def _stream(
        self, name: Literal["output", "stdout", "stderr", "log"], offset: int | None = None
    ) -> AsyncResponseStream:
        return AsyncResponseStream(self._transport, calls.instance_stream(self.id, name, offset))

    def output(self, offset: int | None = None) -> AsyncResponseStream:
        return self._stream("output", offset)

    def stdout(self, offset: int | None = None) -> AsyncResponseStream:
        return self._stream("stdout", offset)

    def stderr(self, offset: int | None = None) -> AsyncResponseStream:
        return self._stream("stderr", offset)

    def log(self) -> AsyncResponseStream:
        return self._stream("log")

    async def send_event(self, name: str, message: JSONValue = None) -> None:
        await self._transport.call(calls.send_event(self.id, name, message))

    async def next_event(self, name: str) -> JSONValue:
        return await self._transport.call(calls.next_event(self.id, name))

    async def last_event(self, name: str) -> JSONValue:
        return await self._transport.call(calls.last_event(self.id, name))

    def events(self, name: str) -> AsyncResponseStream:
        return AsyncResponseStream(self._transport, calls.event_stream(self.id, name))

    async def stop(self, timeout_ms: int = 7000, *, can_call_keepalive: bool = False) -> dict[str, Any]:
        return dict(await self._transport.call(calls.stop(self.id, timeout_ms, can_call_keepalive)))

    async def kill(self, *, remove_immediately: bool = False) -> dict[str, Any]:
        return dict(await self._transport.call(calls.kill(self.id, remove_immediately)))
