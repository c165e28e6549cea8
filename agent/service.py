"""The service tree: the nursery that owns the API server and the supervisor.

``run_hub`` is what ``sth`` runs and what tests embed: it reports the API's
address through ``task_status`` once the server listens, and shutting the hub
down is cancelling its scope (the supervisor then ends every instance).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import trio
from hypercorn.trio import serve

from spacehub import build
from spacehub.models import LoadCheck, VersionInfo
from spacehub.server import notify, speedups
from spacehub.server.load import load_check
from spacehub.server.serving import hypercorn_config

from . import __version__, limits
from .api.app import HubApp
from .config import HubConfig
from .hublog import LogRecordDict, setup_logging
from .identity import hub_id
from .instances.supervisor import Supervisor
from .runtimes.base import Runtime
from .runtimes.podman import make_runtime
from .sequences.store import SequenceStore
from .streams import RecordRing
from .topics import Topic, TopicRouter

if TYPE_CHECKING:
    from .link.client import LinkClient
    from .spacetopics import SpaceTopicBridge


class Hub:
    """Everything the API routes reach: config, sequences, instances, the log."""

    def __init__(
        self, config: HubConfig, log_ring: RecordRing[LogRecordDict], logger: logging.Logger
    ) -> None:
        self.config = config
        self.log_ring = log_ring
        self.logger = logger
        self.started_at = time.monotonic()
        config.sequences_root.mkdir(parents=True, exist_ok=True)
        self.id = hub_id(Path(config.data_dir), config.sequences_root, config.space if config.cpm_url else "")
        self.store = SequenceStore(config.sequences_root, location=self.id)
        for warning in self.store.load(identify_existing=config.identify_existing):
            logger.warning("%s", warning)
        logger.info("%d sequence(s) in %s", len(self.store.list()), config.sequences_root)
        self.runtime: Runtime = make_runtime(config, self.id, logger)
        self.topics = TopicRouter()
        #: topics shared with the other hubs of the Space, when linked; attached before any
        #: instance is taken back, so that what those produce meanwhile is spooled too
        self.space_topics: SpaceTopicBridge | None = None
        if config.cpm_url:
            from .spacetopics import SpaceTopicBridge

            self.space_topics = self.topics.space = SpaceTopicBridge(
                Path(config.data_dir) / "topics",
                self.topics,
                spool_bytes=config.topic_spool_bytes,
                spool_total_bytes=config.topic_spool_total_bytes,
            )
        self.supervisor = Supervisor(config, self.runtime, self.topics, self.store)
        #: the link to the manager, when one is configured
        self.link: LinkClient | None = None

    def adopt_id(self, hub_id: str) -> None:
        """Be known by the id the Space gave this hub (one id everywhere: /status, /config and
        every sequence's ``location``), once it has joined."""
        if hub_id != self.id:
            self.logger.info("hub id %s: the id its Space knows it by", hub_id)
            self.id = hub_id
            self.store.set_location(hub_id)

    def link_summary(self) -> dict[str, Any]:
        """What the link's heartbeat tells the manager about this hub's entities."""
        return {
            "sequences": [s.info() for s in self.store.list()],
            "instances": [i.info() for i in self.supervisor.list()],
            "topics": [self._topic_summary(t) for t in self.topics.list()],
            # ended instances, newest last: those that ran while the link was down too
            "history": list(self.supervisor.history),
        }

    def _topic_summary(self, topic: Topic) -> dict[str, Any]:
        info: dict[str, Any] = dict(topic.info())
        if self.space_topics is not None:
            info["spoolBacklog"] = self.space_topics.backlog(topic.name)
        return info

    def link_load(self) -> LoadCheck:
        """The load-check the heartbeat carries (blocking: call it in a thread)."""
        return load_check([self.config.sequences_root])

    def version_info(self) -> VersionInfo:
        return {
            "service": "@scramjet/host",
            "apiVersion": "v1",
            "version": __version__,
            "build": build(),
        }

    def uptime(self) -> float:
        return round(time.monotonic() - self.started_at, 3)


async def run_hub(
    config: HubConfig, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the hub until cancelled; ``started`` with the API's bound addresses."""
    ring = RecordRing[LogRecordDict](limits.HUB_LOG_RING_RECORDS)
    made: list[Hub] = []  # the hub's id goes in JSON log lines once the hub is made
    logger = setup_logging(
        config.log_level, ring, config.log_format, hub_id=lambda: made[0].id if made else None
    )
    hub = await trio.to_thread.run_sync(partial(Hub, config, ring, logger))
    made.append(hub)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.supervisor.run)
        # hypercorn types the app as a union of ASGI/WSGI callables; ours is ASGI 3.
        app = cast(Any, HubApp(hub))
        binds: list[str] = await nursery.start(
            partial(serve, app, hypercorn_config(config.hostname, config.port, logger))
        )
        addresses = [b.split("://", 1)[-1] for b in binds]
        logger.info("API on %s (%s)", ", ".join(addresses), speedups.describe())
        # What a sequence's host client (context.hub, this.hub) calls: this hub, over loopback.
        hub.supervisor.hub_url = own_api_url(addresses[0])
        if config.cpm_url:
            # Imported only when linking: websockets, cryptography and httpx cost a
            # hub that runs alone about 10 MB.
            from .link.client import LinkClient

            bridge = hub.space_topics
            assert bridge is not None
            await nursery.start(bridge.run)
            hub.link = LinkClient(
                config,
                app,
                load=hub.link_load,
                summary=hub.link_summary,
                on_hub_id=hub.adopt_id,
                on_session=bridge.set_session,
                backoff_cap=config.link_backoff_cap,
            )
            await nursery.start(hub.link.run)
        # systemd (Type=notify): READY=1 now, the watchdog, STOPPING=1 when cancelled.
        await nursery.start(partial(notify.lifecycle, f"API on {', '.join(addresses)}"))
        task_status.started(addresses)


def own_api_url(address: str) -> str:
    """The URL of this hub's API for its own instances: ``host:port`` as bound, with an
    all-interfaces bind reached over loopback."""
    host, _, port = address.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"http://{host}:{port}/api/v1"
