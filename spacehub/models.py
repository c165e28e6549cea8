"""The shapes the APIs answer with, typed once for the hub, the manager and the clients.

TypedDicts rather than classes: these are the JSON documents themselves (the
original's shapes, which its clients read key by key), so the hub builds them, the
manager aggregates them and the clients return them without a conversion anywhere.
Keys marked ``NotRequired`` are left out when unknown, as the original does.
Import-light (typing only): the Python runner's package imports ``spacehub``.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

__all__ = [
    "FilesystemLoad",
    "HubRecord",
    "InstanceInfo",
    "InstanceSequence",
    "LoadCheck",
    "SequenceInfo",
    "SpaceRecord",
    "Termination",
    "TopicInfo",
    "VersionInfo",
]


class VersionInfo(TypedDict):
    """``GET /version`` of the hub and of the manager."""

    service: str
    apiVersion: str
    version: str
    build: str


class FilesystemLoad(TypedDict):
    fs: str
    type: str
    size: int
    used: int
    available: int
    use: float
    mount: str


class LoadCheck(TypedDict):
    """``GET /load-check``, and the load each heartbeat carries to the manager."""

    avgLoad: float
    currentLoad: float
    memFree: int
    memUsed: int
    fsSize: list[FilesystemLoad]


class SequenceInfo(TypedDict):
    """``GET /sequence/:id`` and each item of ``GET /sequences``."""

    id: str
    config: dict[str, Any]
    location: str
    instances: list[str]
    name: NotRequired[str]
    created: str


class InstanceSequence(TypedDict):
    """The sequence an instance runs, as its info shows it."""

    id: str
    name: str | None
    config: dict[str, Any]
    location: str | None


class Termination(TypedDict):
    exitcode: int | None
    reason: str | None


class InstanceInfo(TypedDict):
    """``GET /instance/:id`` and each item of ``GET /instances``."""

    id: str
    sequence: InstanceSequence
    appConfig: NotRequired[dict[str, Any]]
    args: NotRequired[list[Any]]
    created: NotRequired[str]
    started: NotRequired[str]
    ended: NotRequired[str]
    status: str
    provides: NotRequired[str]
    requires: NotRequired[str]
    terminated: NotRequired[Termination]
    #: the restart policy ("never", "on-failure", "always") and restarts so far
    restart: NotRequired[str]
    restarts: NotRequired[int]


class TopicInfo(TypedDict):
    """Each item of ``GET /topics``."""

    topic: str
    topicName: str
    contentType: str
    localProvider: str
    providers: list[str]
    consumers: list[str]
    buffered: int


class SpaceRecord(TypedDict):
    """Each item of the manager's ``GET /spaces``."""

    id: str
    created: str


class HubRecord(TypedDict):
    """A hub as the Space API lists it: the registry's record, plus what its link knows."""

    id: str
    info: dict[str, str]
    description: str
    tags: list[str]
    healthy: NotRequired[bool]
    isConnectionActive: NotRequired[bool]
    #: connected, unhealthy (linked, heartbeats late) or disconnected
    state: NotRequired[str]
    lastSeen: NotRequired[str | None]
    selfHosted: NotRequired[bool]
    revoked: NotRequired[str]
    disconnectReason: NotRequired[str]
    #: the hub's version, as its link said
    version: NotRequired[str]
    #: the last heartbeat's load-check (null before the first)
    load: NotRequired[LoadCheck | None]
    lastHeartbeat: NotRequired[str]
    sequences: NotRequired[list[Any]]
    instances: NotRequired[list[Any]]
    topics: NotRequired[list[Any]]
