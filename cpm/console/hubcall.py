"""The console's own calls to a hub, over that hub's link (the proxy's path, without an HTTP client)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Final

import trio

from spacehub.protocol.link import LinkError
from spacehub.server.link.session import LinkClosed, OutboundStream, StreamAborted

from ..errors import HubLinkFailed, HubUnavailable, hub_refusal
from ..link.sessions import HubSession

__all__ = ["MAX_HUB_ANSWER_BYTES", "hub_json", "hub_stream"]

#: Largest JSON answer the console reads from a hub (a listing of sequences or instances).
MAX_HUB_ANSWER_BYTES: Final = 4 * 1024 * 1024


async def _open(
    session: HubSession, method: str, path: str, body: AsyncIterable[bytes] | None, content_type: str | None
) -> OutboundStream:
    headers = [("content-type", content_type)] if content_type else []
    try:
        stream = await session.link.open_stream(method, "/api/v1" + path, headers, end=body is None)
        if body is not None:
            await stream.send_body(body)
        return stream
    except LinkClosed:
        raise HubUnavailable(f"Hub {session.hub_id} is not connected") from None
    except (LinkError, StreamAborted) as exc:
        raise HubLinkFailed(f"Hub {session.hub_id} did not take the call: {exc}") from None


async def hub_json(
    session: HubSession,
    method: str,
    path: str,
    body: AsyncIterable[bytes] | None = None,
    content_type: str | None = None,
) -> Any:
    """``method /api/v1<path>`` on the hub; its JSON answer (None for an empty one).
    An error status raises :class:`HubAnswerError` with the hub's own message."""
    stream = await _open(session, method, path, body, content_type)
    parts: list[bytes] = []
    size = 0
    try:
        status, _ = await stream.response()
        async for chunk in stream.body():
            size += len(chunk)
            if size > MAX_HUB_ANSWER_BYTES:
                with contextlib.suppress(LinkClosed, LinkError):
                    await stream.reset("answer too large for the console")
                raise HubLinkFailed(f"Hub {session.hub_id} answered more than {MAX_HUB_ANSWER_BYTES} bytes")
            parts.append(chunk)
    except (LinkClosed, StreamAborted) as exc:
        raise HubLinkFailed(f"Hub {session.hub_id} did not answer: {exc}") from None
    raw = b"".join(parts)
    try:
        value = json.loads(raw) if raw.strip() else None
    except ValueError:
        value = raw.decode("utf-8", "replace")
    if status >= 400:
        message = value.get("error") or value.get("message") if isinstance(value, dict) else value
        raise hub_refusal(status, str(message or f"the hub answered {status}"))
    return value


async def hub_stream(session: HubSession, path: str) -> AsyncIterator[bytes]:
    """The body of ``GET /api/v1<path>`` on the hub, chunk by chunk, at the reader's pace
    (the link's flow control holds the hub back while the console's client is slow)."""
    stream = await _open(session, "GET", path, None, None)
    try:
        status, _ = await stream.response()
        if status >= 400:
            raise hub_refusal(status, f"the hub answered {status} for {path}")
        async for chunk in stream.body():
            yield chunk
    except (LinkClosed, StreamAborted):
        return
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(LinkClosed, LinkError):
            await stream.reset("the console's reader went away")
