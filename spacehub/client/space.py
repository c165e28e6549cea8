"""Spaces and managers: :class:`SpaceClient` / :class:`ManagerClient` and their async twins.

URL nesting (sth-spec §7)::

    <manager>/api/v1                                   ManagerClient   (version, spaces)
    <manager>/api/v1/space/<space>/api/v1              SpaceClient     (version, load, hubs, aggregates)
    <manager>/api/v1/space/<space>/api/v1/sth/<hub>/api/v1   HubClient through the tunnel

Every request carries ``Authorization: Bearer <token>``; the hub clients a Space hands out share its
connections and its token.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any, cast

import httpx

from spacehub.models import HubRecord, VersionInfo

from . import _calls as calls
from ._calls import Body, Progress
from .aio import AsyncBody, AsyncHubClient, AsyncResponseStream, _AsyncClosing, _AsyncTransport
from .aio import _open_http as _open_async
from .hub import HubClient, ResponseStream, _Closing, _Transport
from .hub import _open_http as _open_sync

__all__ = ["AsyncManagerClient", "AsyncSpaceClient", "ManagerClient", "SpaceClient"]


class SpaceClient(_Closing):
    """One Space of a manager: ``SpaceClient("https://m:8443/api/v1/space/demo/api/v1", token=...)``."""

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
        self._transport, self._owned = _open_sync(url, token, timeout, verify, http, stream_timeout)

    @classmethod
    def _over(cls, transport: _Transport) -> SpaceClient:
        client = cls.__new__(cls)
        client._transport, client._owned = transport, None
        return client

    @property
    def url(self) -> str:
        return self._transport.base

    def version(self) -> VersionInfo:
        return cast(VersionInfo, dict(self._transport.call(calls.version())))

    def load(self) -> dict[str, Any]:
        return dict(self._transport.call(calls.space_load()))

    def hubs(self) -> list[HubRecord]:
        """The hub records of the Space."""
        return cast(list[HubRecord], list(self._transport.call(calls.space_hubs())))

    def hub_info(self, hub_id: str) -> HubRecord:
        return cast(HubRecord, dict(self._transport.call(calls.space_hub_info(hub_id))))

    def hub(self, hub_id: str) -> HubClient:
        """Hub ``hub_id``'s full API, through the manager's tunnel (same connections and token)."""
        return HubClient._over(self._transport.at(calls.hub_base(self.url, hub_id)))

    def sequences(self) -> list[Any]:
        """Sequences across the Space's hubs, each whole and naming its ``hub`` (the Space API's
        ``?detail=true``; without it the API answers the original's list of ids)."""
        return list(self._transport.call(calls.space_sequences()))

    def instances(self) -> list[Any]:
        """Instances across the Space's hubs, each whole and naming its ``hub``."""
        return list(self._transport.call(calls.space_instances()))

    def topics(self) -> list[Any]:
        """Each topic of the Space once: content type, producers and consumers per hub,
        counters and backlogs (docs/data-spaces.md)."""
        return list(self._transport.call(calls.list_topics()))

    def send_topic(
        self,
        name: str,
        data: Body,
        *,
        content_type: str = calls.DEFAULT_TOPIC_TYPE,
        end: bool | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Write ``data`` into the Space's topic ``name``: it reaches its consumers on every hub."""
        self._transport.upload(calls.send_topic(name, content_type, end), data, progress)

    def get_topic(self, name: str, *, content_type: str = calls.DEFAULT_TOPIC_TYPE) -> ResponseStream:
        """The records of the Space's topic ``name`` from any hub, from now on (never ends by itself)."""
        return ResponseStream(self._transport, calls.get_topic(name, content_type))

    def create_join_token(
        self,
        *,
        expires: float | str | None = None,
        description: str | None = None,
        tags: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """A one-time token a new hub joins this Space with: ``{"id", "token", "expires",
        "command", "cloudInit", ...}``; ``expires`` in seconds from now or ISO-8601 (default 1 h).
        ``command`` is the line to paste as root on the new machine (docs/joining.md)."""
        return dict(self._transport.call(calls.create_join_token(expires, description, tags)))

    def join_tokens(self) -> list[dict[str, Any]]:
        """The join tokens a hub can still use, without their secrets."""
        return list(self._transport.call(calls.join_tokens()))

    def revoke_join_token(self, token_id: str) -> dict[str, Any]:
        return dict(self._transport.call(calls.revoke_join_token(token_id)))


class ManagerClient(_Closing):
    """A manager: ``ManagerClient("https://m:8443/api/v1", token=...)``; ``.space(name)`` opens a Space."""

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
        self._transport, self._owned = _open_sync(url, token, timeout, verify, http, stream_timeout)

    @property
    def url(self) -> str:
        return self._transport.base

    def version(self) -> VersionInfo:
        return cast(VersionInfo, dict(self._transport.call(calls.version())))

    def spaces(self) -> list[dict[str, Any]]:
        """The Spaces the token opens."""
        return list(self._transport.call(calls.spaces()))

    def space(self, name: str) -> SpaceClient:
        return SpaceClient._over(self._transport.at(calls.space_base(self.url, name)))


class AsyncSpaceClient(_AsyncClosing):
    """One Space of a manager, async; see :class:`SpaceClient`."""

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
        self._transport, self._owned = _open_async(url, token, timeout, verify, http, stream_timeout)

    @classmethod
    def _over(cls, transport: _AsyncTransport) -> AsyncSpaceClient:
        client = cls.__new__(cls)
        client._transport, client._owned = transport, None
        return client

    @property
    def url(self) -> str:
        return self._transport.base

    async def version(self) -> VersionInfo:
        return cast(VersionInfo, dict(await self._transport.call(calls.version())))

    async def load(self) -> dict[str, Any]:
        return dict(await self._transport.call(calls.space_load()))

    async def hubs(self) -> list[dict[str, Any]]:
        return list(await self._transport.call(calls.space_hubs()))

    async def hub_info(self, hub_id: str) -> HubRecord:
        return cast(HubRecord, dict(await self._transport.call(calls.space_hub_info(hub_id))))

    def hub(self, hub_id: str) -> AsyncHubClient:
        return AsyncHubClient._over(self._transport.at(calls.hub_base(self.url, hub_id)))

    async def sequences(self) -> list[Any]:
        return list(await self._transport.call(calls.space_sequences()))

    async def instances(self) -> list[Any]:
        return list(await self._transport.call(calls.space_instances()))

    async def topics(self) -> list[Any]:
        return list(await self._transport.call(calls.list_topics()))

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

    async def create_join_token(
        self,
        *,
        expires: float | str | None = None,
        description: str | None = None,
        tags: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """A one-time token a new hub joins this Space with: ``{"id", "token", "expires",
        "command", "cloudInit", ...}``; ``expires`` in seconds from now or ISO-8601 (default 1 h).
        ``command`` is the line to paste as root on the new machine (docs/joining.md)."""
        return dict(await self._transport.call(calls.create_join_token(expires, description, tags)))

    async def join_tokens(self) -> list[dict[str, Any]]:
        """The join tokens a hub can still use, without their secrets."""
        return list(await self._transport.call(calls.join_tokens()))

    async def revoke_join_token(self, token_id: str) -> dict[str, Any]:
        return dict(await self._transport.call(calls.revoke_join_token(token_id)))


class AsyncManagerClient(_AsyncClosing):
    """A manager, async; see :class:`ManagerClient`."""

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
        self._transport, self._owned = _open_async(url, token, timeout, verify, http, stream_timeout)

    @property
    def url(self) -> str:
        return self._transport.base

    async def version(self) -> VersionInfo:
        return cast(VersionInfo, dict(await self._transport.call(calls.version())))

    async def spaces(self) -> list[dict[str, Any]]:
        return list(await self._transport.call(calls.spaces()))

    def space(self, name: str) -> AsyncSpaceClient:
        return AsyncSpaceClient._over(self._transport.at(calls.space_base(self.url, name)))
