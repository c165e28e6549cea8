"""The manager's service tree: the registry, the API server (hubs' links ride on it), the watchdog.

``run_manager`` is what ``cpm serve`` runs and what tests embed: it reports the API's
bound addresses through ``task_status`` once the server listens, and shutting the
manager down is cancelling its scope. Each hub's link lives in the task hypercorn
runs that websocket in (see :mod:`cpm.link.sessions`), so it ends with the server.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Final, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from spacehub import build
from spacehub.models import VersionInfo
from spacehub.server import notify, speedups
from spacehub.server.ids import persistent_id
from spacehub.server.serving import hypercorn_config

from . import __version__
from .admin import serve_admin, socket_path
from .api.app import ManagerApp
from .config import ManagerConfig
from .errors import Conflict
from .faults import Faults
from .joining import PackageShelf
from .link.sessions import HubSessions
from .registry import Registry
from .replicas import Replicas, share_ca
from .tls import ca_fingerprint, ensure_ca_and_server_cert
from .topics import SpaceTopics

__all__ = ["Manager", "open_registry", "run_manager"]

logger = logging.getLogger("cpm")

#: Largest websocket message a hub may send: one frame (5-byte header + 256 KiB of DATA) with room to spare.
MAX_LINK_MESSAGE: Final = 320 * 1024
#: ASGI messages hypercorn queues for the app per connection; the socket is read no faster.
APP_QUEUE: Final = 4


def open_registry(config: ManagerConfig) -> Registry:
    """The registry in the data dir (made, private, on first use)."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Registry(config.registry_location)


def manager_id(data_dir: Path) -> str:
    """The manager's id, made once and kept in the data dir."""
    return persistent_id(data_dir / "manager-id", "cpm")


class Manager:
    """Everything the API routes reach: config, registry, hub sessions."""

    def __init__(self, config: ManagerConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.id = manager_id(config.data_dir)
        self.sessions = HubSessions(registry, config, self.id)
        #: every Space's topics, over all its hubs (cpm/topics.py)
        self.topics = SpaceTopics(config.data_dir / "topics", config.topic_log_bytes)
        self.sessions.on_standing = self.topics.forget_revoked
        #: the .deb new hubs install from this manager (cpm/joining.py)
        self.packages = PackageShelf(config.package, config.data_dir)
        #: this manager among its replicas (cpm/replicas.py; one of one on SQLite)
        self.replicas = Replicas(self)
        # Hubs' topic streams: served here, or relayed to the replica keeping the topics.
        self.sessions.on_hub_stream = self.replicas.serve_hub_stream
        self.sessions.on_taken_over = self.replicas.tell_taken_over
        #: with --fault-injection only (cpm/faults.py)
        self.faults: Faults | None = None
        if config.fault_injection:
            self.faults = Faults()
            registry.fail_writes = self.faults.registry_writes_fail

    def version_info(self) -> VersionInfo:
        return {
            "service": "@scramjet/manager",
            "apiVersion": "v1",
            "version": __version__,
            "build": build(),
        }

    def status(self) -> dict[str, Any]:
        """``GET /api/v1/status``: what this manager is (the original's /version has four keys)."""
        return {"id": self.id, "product": "spacehub", "version": __version__, "build": build()}

    def ca_pem(self) -> bytes | None:
        path = self.config.ca_path if self.config.tls else None
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def ca_fingerprint(self) -> str | None:
        """``AB:CD:...`` of the CA hubs should trust, None when the certificate is one the
        system trusts already (or TLS is off). Reads the file: call it from a thread."""
        path = self.config.ca_path if self.config.tls else None
        if path is None or not path.exists():
            return None
        return ca_fingerprint(path)


def prepare(config: ManagerConfig) -> tuple[Registry, str | None]:
    """Open the registry, make the configured spaces and the TLS files; the CA's fingerprint."""
    registry = open_registry(config)
    try:
        for name in config.spaces:
            try:
                registry.create_space(name)
                logger.info("created space %s", name)
            except Conflict:
                pass
        fingerprint = None
        if config.generated_tls and registry.shared:
            # Replicas serve under one CA, kept in the shared database (cpm/replicas.py).
            share_ca(registry, config.data_dir, config.public_names)
        elif config.generated_tls:
            ensure_ca_and_server_cert(config.data_dir, config.public_names, [])
        if config.tls and config.ca_path is not None:
            fingerprint = ca_fingerprint(config.ca_path)
    except BaseException:
        registry.close()
        raise
    return registry, fingerprint


def _hypercorn_config(config: ManagerConfig) -> HypercornConfig:
    tls: tuple[Path, Path] | None = None
    if config.tls:
        if config.tls_cert is not None and config.tls_key is not None:
            tls = (config.tls_cert, config.tls_key)
        else:
            tls = (config.data_dir / "server.pem", config.data_dir / "server.key")
    return hypercorn_config(
        config.hostname,
        config.port,
        logger,
        app_queue=APP_QUEUE,
        websocket_max_message=MAX_LINK_MESSAGE,
        tls=tls,
    )


async def run_manager(
    config: ManagerConfig, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the manager until cancelled; ``started`` with the API's bound addresses (host:port)."""
    registry, _ = await trio.to_thread.run_sync(prepare, config)
    manager: Manager | None = None
    try:
        manager = await trio.to_thread.run_sync(Manager, config, registry)
        async with trio.open_nursery() as nursery:
            await manager.replicas.prepare()
            await nursery.start(manager.sessions.run_watchdog)
            await nursery.start(serve_admin, manager, socket_path(config.data_dir))
            # hypercorn types the app as a union of ASGI/WSGI callables; ours is ASGI 3.
            app = cast(Any, ManagerApp(manager))
            hypercorn_config = _hypercorn_config(config)
            binds: list[str] = await nursery.start(partial(serve, app, hypercorn_config, mode="asgi"))
            addresses = [b.split("://", 1)[-1] for b in binds]
            await nursery.start(manager.replicas.run, manager.replicas.advertise(addresses))
            logger.info(
                "API on %s (%s; %s)",
                ", ".join(addresses),
                "TLS" if config.tls else "plain HTTP",
                speedups.describe(),
            )
            # systemd (Type=notify): READY=1 now, the watchdog, STOPPING=1 when cancelled.
            await nursery.start(partial(notify.lifecycle, f"API on {', '.join(addresses)}"))
            task_status.started(addresses)
    finally:
        if manager is not None:
            manager.topics.close()
        registry.close()
