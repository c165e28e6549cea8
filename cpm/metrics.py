"""The manager's metrics, at ``GET /metrics`` on its API port, behind a scrape token.

Why a token and not a loopback-only port: a manager is usually reached through one port
(a firewall or load balancer in front), and Prometheus mostly runs on another machine; a
second listener bound to loopback would be out of its reach. The token is made at the first
start in the data dir (``metrics.token``, mode 0600); ``cpm metrics-token`` prints it, and
Prometheus sends it with ``authorization: {credentials_file: ...}`` (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from spacehub.server.metrics import HttpMetrics, Metrics

from .topics import SpaceTopic

if TYPE_CHECKING:
    from .service import Manager

__all__ = ["HEARTBEAT_AGE_BUCKETS", "METRICS_TOKEN_FILE", "PREFIX", "ManagerMetrics", "metrics_token"]

PREFIX: Final = "spacehub_cpm"
METRICS_TOKEN_FILE: Final = "metrics.token"
#: Seconds; heartbeats come every 10 s by default, a hub is unhealthy after 30.
HEARTBEAT_AGE_BUCKETS: Final = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
_STATES: Final = ("connected", "unhealthy", "disconnected")


def metrics_token(data_dir: Path) -> str:
    """The scrape token in ``data_dir``, made (0600, whole or not at all) when missing."""
    path = data_dir / METRICS_TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if token:
            return token
    token = "shm_" + secrets.token_urlsafe(32)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(partial, path)  # two processes making it at once: the first one wins
    except FileExistsError:
        token = path.read_text().strip()
    finally:
        partial.unlink()
    return token


class ManagerMetrics:
    def __init__(self, manager: Manager) -> None:
        self._manager = manager
        sessions = manager.sessions
        self.metrics = Metrics(PREFIX)
        self.http = HttpMetrics(self.metrics)
        self._hubs: dict[tuple[str, ...], float] = {}
        registry_latency = self.metrics.histogram(
            "registry_query_duration_seconds", "Registry calls, by call", ("query",)
        )
        sessions.on_db = lambda name, seconds: registry_latency.observe(seconds, name)
        self.metrics.gauge_read(
            "hubs",
            "Hubs of each space by state (revoked ones left out)",
            lambda: self._hubs,
            ("space", "state"),
        )
        self.metrics.histogram_read(
            "heartbeat_age_seconds",
            "Seconds since each linked hub's last heartbeat",
            HEARTBEAT_AGE_BUCKETS,
            sessions.heartbeat_ages,
        )
        self.metrics.counter_read(
            "links_opened_total", "Hub links accepted since start", lambda: {(): float(sessions.links_opened)}
        )
        self.metrics.counter_read(
            "links_closed_total", "Hub links ended since start", lambda: {(): float(sessions.links_closed)}
        )
        self.metrics.gauge_read(
            "link_streams_open",
            "Streams open on the hub links now: calls being forwarded, live tails, Space-wide topics"
            " (each hub keeps one open for the wanted topics' names)",
            lambda: {(): float(sessions.open_streams())},
        )
        topics = manager.topics

        def per_topic(read: Callable[[SpaceTopic], int]) -> dict[tuple[str, ...], float]:
            return {(t.space, t.name): float(read(t)) for t in topics.all()}

        self.metrics.counter_read(
            "topic_bytes_in_total",
            "Record bytes taken into each Space-wide topic (since the manager started)",
            lambda: per_topic(lambda t: t.bytes_in),
            ("space", "topic"),
        )
        self.metrics.counter_read(
            "topic_bytes_out_total",
            "Record bytes delivered from each Space-wide topic, each consumer hub and reader counted",
            lambda: per_topic(lambda t: t.bytes_out),
            ("space", "topic"),
        )
        self.metrics.gauge_read(
            "topic_backlog_bytes",
            "Bytes of each Space-wide topic its slowest consumer has not taken",
            lambda: per_topic(lambda t: t.unread),
            ("space", "topic"),
        )
        self.metrics.gauge_read(
            "links_open",
            "Hub links up now",
            lambda: {(): float(sessions.links_opened - sessions.links_closed)},
        )
        replicas = manager.replicas
        self.metrics.counter_read(
            "links_fenced_total",
            "Hub links closed because another replica took the hub over (docs/replicas.md)",
            lambda: {(): float(sessions.links_fenced)},
        )
        self.metrics.counter_read(
            "forwarded_calls_total",
            "Space API calls forwarded to the replica holding the hub's link",
            lambda: {(): float(replicas.forwarded_calls)},
        )
        self.metrics.gauge_read(
            "replica_peers",
            "Other replicas seen alive in the shared registry",
            lambda: {(): float(len(replicas.peers))},
        )
        self.metrics.counter_read(
            "registry_statements_total",
            "SQL statements this manager ran on its registry",
            lambda: {(): float(manager.registry.database.statements)},
        )

    async def scrape(self, accept: str = "") -> tuple[bytes, str]:
        sessions = self._manager.sessions
        standing = await sessions.db(self._manager.registry.hub_standing)
        counts: dict[tuple[str, ...], float] = defaultdict(float)
        for hub_id, (space, revoked_reason) in standing.items():
            if revoked_reason is None:
                counts[(space, sessions.state(hub_id))] += 1
        for space in {space for space, _ in standing.values()}:
            for state in _STATES:
                counts.setdefault((space, state), 0.0)
        self._hubs = dict(counts)
        return self.metrics.render(accept)
