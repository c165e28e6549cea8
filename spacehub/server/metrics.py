"""Metrics for Prometheus: counted here in plain numbers, written out by ``prometheus-client``.

Counting is a dict update on the request path. The text format is the library's: its
package imports ``http.server``, ``wsgiref``, ``urllib.request`` and ``email`` (about 5 MB
in a hub), so it is imported on the first scrape, and a hub nobody scrapes pays nothing.

Every family has a bounded set of label values: route patterns (not paths), status codes,
states. Nothing is labelled by hub, instance or topic id.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_SERIES",
    "Counter",
    "Histogram",
    "HttpMetrics",
    "Metrics",
]

#: Seconds; from a loopback call to a slow call through a Space.
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Label combinations one family keeps; past it, new ones are counted under "other".
MAX_SERIES: Final = 512

Labels = tuple[str, ...]


class _Family:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)

    def _bounded(self, labels: Labels, known: Mapping[Labels, Any]) -> Labels:
        if labels in known or len(known) < MAX_SERIES:
            return labels
        return tuple("other" for _ in labels)


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._bounded(labels, self.values)
        self.values[key] = self.values.get(key, 0.0) + amount


class Histogram(_Family):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.buckets = tuple(buckets)
        #: labels -> (count per bucket, +Inf last; sum)
        self.values: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        key = self._bounded(labels, self.values)
        entry = self.values.get(key)
        if entry is None:
            entry = self.values[key] = ([0] * (len(self.buckets) + 1), [0.0])
        entry[0][bisect.bisect_left(self.buckets, value)] += 1
        entry[1][0] += value

    def observe_all(self, values: Iterable[float], *labels: str) -> None:
        for value in values:
            self.observe(value, *labels)


class _Read(_Family):
    """A gauge or counter read at scrape time from the daemon's own state."""

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        read: Callable[[], Mapping[Labels, float]],
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.kind = kind
        self.read = read


class _ReadHistogram(_Family):
    """A histogram made at scrape time from values read then (e.g. every hub's heartbeat age)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        read: Callable[[], Iterable[float]],
    ) -> None:
        super().__init__(name, documentation, ())
        self.buckets = tuple(buckets)
        self.read = read


class Metrics:
    """One daemon's metric families, and their exposition."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._families: list[_Family] = []

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        counter = Counter(f"{self.prefix}_{name}", documentation, labelnames)
        self._add(counter)
        return counter

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        histogram = Histogram(f"{self.prefix}_{name}", documentation, labelnames, buckets)
        self._add(histogram)
        return histogram

    def gauge_read(
        self,
        name: str,
        documentation: str,
        read: Callable[[], Mapping[Labels, float]],
        labelnames: Sequence[str] = (),
    ) -> None:
        self._add(_Read("gauge", f"{self.prefix}_{name}", documentation, labelnames, read))

    def counter_read(
        self,
        name: str,
        documentation: str,
        read: Callable[[], Mapping[Labels, float]],
        labelnames: Sequence[str] = (),
    ) -> None:
        self._add(_Read("counter", f"{self.prefix}_{name}", documentation, labelnames, read))

    def histogram_read(
        self, name: str, documentation: str, buckets: Sequence[float], read: Callable[[], Iterable[float]]
    ) -> None:
        self._add(_ReadHistogram(f"{self.prefix}_{name}", documentation, buckets, read))

    def _add(self, family: _Family) -> None:
        if any(f.name == family.name for f in self._families):
            raise ValueError(f"metric {family.name} is defined twice")
        self._families.append(family)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its content type, in the format the scraper's ``Accept`` asks
        for (the classic text format, or OpenMetrics), chosen by the library; imports it
        the first time."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder
        from prometheus_client.platform_collector import PlatformCollector
        from prometheus_client.process_collector import ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type


class _Collector:
    """The library's custom-collector protocol over our families."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        for family in self._metrics._families:
            labelnames = list(family.labelnames)
            if isinstance(family, Counter):
                # The library adds "_total" to a counter's samples; our names have it already.
                out: Any = CounterMetricFamily(family.name, family.documentation, labels=labelnames)
                for labels, value in family.values.items():
                    out.add_metric(list(labels), value)
            elif isinstance(family, Histogram):
                out = HistogramMetricFamily(family.name, family.documentation, labels=labelnames)
                for labels, (bucket_counts, running_sum) in family.values.items():
                    out.add_metric(list(labels), _cumulative(family.buckets, bucket_counts), running_sum[0])
            elif isinstance(family, _ReadHistogram):
                read_counts = [0] * (len(family.buckets) + 1)
                read_sum = 0.0
                for read_value in family.read():
                    read_counts[bisect.bisect_left(family.buckets, read_value)] += 1
                    read_sum += read_value
                out = HistogramMetricFamily(family.name, family.documentation)
                out.add_metric([], _cumulative(family.buckets, read_counts), read_sum)
            elif isinstance(family, _Read):
                make = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                out = make(family.name, family.documentation, labels=labelnames)
                for labels, value in family.read().items():
                    out.add_metric(list(labels), value)
            else:  # pragma: no cover - every family kind is handled above
                continue
            yield out


def _cumulative(buckets: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    running = 0
    out: list[tuple[str, float]] = []
    for bound, count in zip((*buckets, float("inf")), counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return out


class HttpMetrics:
    """What :class:`~spacehub.server.http.HttpDispatch` counts of every request it serves:
    requests and latency (to the response's start) by route pattern, method and status,
    and the bytes of bodies each way by route pattern."""

    def __init__(self, metrics: Metrics) -> None:
        self.requests = metrics.counter(
            "http_requests_total",
            "HTTP requests answered, by route pattern, method and status",
            ("route", "method", "status"),
        )
        self.latency = metrics.histogram(
            "http_request_duration_seconds",
            "Time from a request's arrival to its response's start, by route pattern",
            ("route", "method"),
        )
        self.received = metrics.counter(
            "http_request_body_bytes_total", "Request body bytes read, by route pattern", ("route",)
        )
        self.sent = metrics.counter(
            "http_response_body_bytes_total", "Response body bytes sent, by route pattern", ("route",)
        )
        self.open_streams = 0
        metrics.gauge_read(
            "http_open_responses",
            "Responses being sent now (streams and long polls included)",
            lambda: {(): float(self.open_streams)},
        )

    def answered(self, route: str, method: str, status: int, began: float) -> None:
        self.requests.inc(route, method, str(status))
        self.latency.observe(time.monotonic() - began, route, method)
