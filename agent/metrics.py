"""The hub's metrics, served at ``GET /metrics`` on its API port (Prometheus text format).

The hub's API port is its trust boundary (loopback by default; docs/api.md), so /metrics
has no token of its own. Gauges are read from the hub's state at scrape time; the HTTP
families are counted by the dispatch (spacehub/server/metrics.py).
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import TYPE_CHECKING

from spacehub.server.metrics import HttpMetrics, Metrics

from .instances.lifecycle import Status

if TYPE_CHECKING:
    from .service import Hub

__all__ = ["PREFIX", "hub_metrics"]

PREFIX = "spacehub_hub"


def hub_metrics(hub: Hub) -> tuple[Metrics, HttpMetrics]:
    metrics = Metrics(PREFIX)
    http = HttpMetrics(metrics)

    def instances() -> dict[tuple[str, ...], float]:
        tally = Tally(instance.status.value for instance in hub.supervisor.list())
        return {(status.value,): float(tally.get(status.value, 0)) for status in Status}

    metrics.gauge_read("instances", "Instances listed, by status", instances, ("status",))
    metrics.gauge_read("sequences", "Sequences kept", lambda: {(): float(len(hub.store.list()))})
    metrics.gauge_read("topics", "Topics on this hub", lambda: {(): float(len(hub.topics.list()))})
    metrics.gauge_read(
        "topic_buffered_bytes",
        "Bytes waiting in this hub's topics for a consumer",
        lambda: {(): float(sum(topic.stream.buffered for topic in hub.topics.list()))},
    )

    metrics.counter_read(
        "instance_restarts_total",
        "Instances started again by their restart policy (since this hub started)",
        lambda: {(): float(hub.supervisor.restarts_total)},
    )

    def taken_back() -> dict[tuple[str, ...], float]:
        return {(): float(hub.supervisor.taken_back)}

    metrics.gauge_read(
        "instances_taken_back", "Instances this hub took back from the hub before it", taken_back
    )

    totals = hub.topics.totals
    metrics.counter_read(
        "topic_bytes_in_total", "Bytes written into this hub's topics", lambda: {(): float(totals.bytes_in)}
    )
    metrics.counter_read(
        "topic_records_in_total",
        "Newline-ended records (lines, NDJSON records) written into this hub's topics",
        lambda: {(): float(totals.records_in)},
    )
    metrics.counter_read(
        "topic_bytes_out_total",
        "Bytes read from this hub's topics, each reader counted",
        lambda: {(): float(totals.bytes_out)},
    )

    def spool_backlog() -> dict[tuple[str, ...], float]:
        bridge = hub.space_topics
        return {(): float(bridge.backlog() if bridge is not None else 0)}

    metrics.gauge_read(
        "spool_backlog_bytes",
        "Bytes of Space-wide topic records made here that the manager has not acknowledged",
        spool_backlog,
    )

    def space_bytes(direction: str) -> dict[tuple[str, ...], float]:
        bridge = hub.space_topics
        if bridge is None:
            return {(): 0.0}
        return {(): float(bridge.bytes_pushed if direction == "out" else bridge.bytes_pulled)}

    metrics.counter_read(
        "space_topic_bytes_sent_total",
        "Spool bytes sent to the manager for Space-wide topics (a resend after a cut counted again)",
        lambda: space_bytes("out"),
    )
    metrics.counter_read(
        "space_topic_bytes_received_total",
        "Record bytes received from the Space's other hubs for local consumers",
        lambda: space_bytes("in"),
    )

    def link_connected() -> dict[tuple[str, ...], float]:
        link = hub.link
        return {(): 1.0 if link is not None and link.status()["connected"] else 0.0}

    metrics.gauge_read("link_connected", "1 while the link to the manager is up", link_connected)

    def link_streams() -> dict[tuple[str, ...], float]:
        session = hub.link.session if hub.link is not None else None
        return {(): float(session.open_streams if session is not None else 0)}

    metrics.gauge_read(
        "link_streams_open",
        "Streams open on the link now: the manager's calls, and Space-wide topics' streams",
        link_streams,
    )
    metrics.counter_read(
        "link_connections_total",
        "Links to the manager made since start (reconnections included)",
        lambda: {(): float(hub.link.connections if hub.link is not None else 0)},
    )
    metrics.gauge_read("uptime_seconds", "Seconds since the hub started", lambda: {(): hub.uptime()})
    return metrics, http
