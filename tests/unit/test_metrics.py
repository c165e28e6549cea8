"""spacehub.server.metrics, the JSON log format, and what HttpDispatch counts."""

from __future__ import annotations

import json
import logging
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cpm.metrics import metrics_token
from spacehub.server.http import HttpDispatch, Request, Response, Router, StreamResponse, json_response
from spacehub.server.logformat import ContextFilter, JsonFormatter
from spacehub.server.metrics import MAX_SERIES, HttpMetrics, Metrics


def parsed(metrics: Metrics, accept: str = "") -> dict[str, list[tuple[dict[str, str], float]]]:
    body, _ = metrics.render(accept)
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def test_counter_and_histogram_render_as_the_library_writes_them() -> None:
    metrics = Metrics("t")
    calls = metrics.counter("calls_total", "calls", ("route",))
    calls.inc("/a")
    calls.inc("/a", amount=2)
    calls.inc("/b")
    took = metrics.histogram("took_seconds", "time", ("route",), buckets=(0.1, 1.0))
    for seconds in (0.05, 0.5, 0.5, 3.0):
        took.observe(seconds, "/a")
    found = parsed(metrics)
    assert ({"route": "/a"}, 3.0) in found["t_calls_total"]
    assert ({"route": "/b"}, 1.0) in found["t_calls_total"]
    buckets = {labels["le"]: v for labels, v in found["t_took_seconds_bucket"]}
    assert buckets == {"0.1": 1.0, "1.0": 3.0, "+Inf": 4.0}
    assert found["t_took_seconds_count"] == [({"route": "/a"}, 4.0)]
    assert found["t_took_seconds_sum"] == [({"route": "/a"}, 4.05)]


def test_read_families_are_read_at_scrape_time() -> None:
    metrics = Metrics("t")
    state = {"n": 1.0}
    metrics.gauge_read("things", "things", lambda: {("x",): state["n"]}, ("kind",))
    metrics.counter_read("done_total", "done", lambda: {(): 7.0})
    metrics.histogram_read("age_seconds", "ages", (1.0, 10.0), lambda: [0.5, 5.0, 50.0])
    assert parsed(metrics)["t_things"] == [({"kind": "x"}, 1.0)]
    state["n"] = 4.0
    found = parsed(metrics)
    assert found["t_things"] == [({"kind": "x"}, 4.0)]
    assert found["t_done_total"] == [({}, 7.0)]
    assert {labels["le"]: v for labels, v in found["t_age_seconds_bucket"]} == {
        "1.0": 1,
        "10.0": 2,
        "+Inf": 3,
    }
    assert "process_resident_memory_bytes" in found


def test_openmetrics_when_asked() -> None:
    metrics = Metrics("t")
    metrics.counter("calls_total", "calls").inc()
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    _, plain = metrics.render("")
    assert plain.startswith("text/plain")


def test_label_sets_are_bounded() -> None:
    metrics = Metrics("t")
    calls = metrics.counter("calls_total", "calls", ("route",))
    for n in range(MAX_SERIES + 10):
        calls.inc(f"/r{n}")
    assert len(calls.values) == MAX_SERIES + 1
    assert calls.values[("other",)] == 10
    calls.inc("/r0")  # a known one still counts as itself
    assert calls.values[("/r0",)] == 2


def test_a_name_is_defined_once() -> None:
    metrics = Metrics("t")
    metrics.counter("calls_total", "calls")
    with pytest.raises(ValueError):
        metrics.counter("calls_total", "again")


def test_the_library_is_imported_only_by_a_scrape() -> None:
    import subprocess

    code = (
        "import sys; from spacehub.server.metrics import Metrics, HttpMetrics;"
        "m = Metrics('t'); HttpMetrics(m).requests.inc('/a', 'GET', '200');"
        "print('prometheus_client' in sys.modules); m.render(); print('prometheus_client' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_metrics_token_is_made_once_and_private(tmp_path: Path) -> None:
    token = metrics_token(tmp_path)
    assert token.startswith("shm_") and len(token) > 40
    assert metrics_token(tmp_path) == token
    assert stat.S_IMODE((tmp_path / "metrics.token").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.token"]  # no partial file left


# -- what the dispatch counts -------------------------------------------------------------------


async def call(app: HttpDispatch, method: str, path: str, body: bytes = b"") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        import trio

        await trio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    await app(scope, receive, send)
    return sent


async def test_dispatch_counts_requests_latency_bytes_and_open_responses() -> None:
    metrics = Metrics("t")
    http = HttpMetrics(metrics)
    router = Router("/api")

    async def echo(request: Request) -> Response:
        return Response(200, await request.body(1000), "text/plain")

    async def stream(request: Request) -> StreamResponse:
        async def chunks() -> Any:
            yield b"abc"
            yield b"de"

        return StreamResponse(chunks())

    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    router.add("POST", "/echo/:name", echo)
    router.add("GET", "/stream", stream)
    router.add("GET", "/broken", broken)
    router.add("GET", "/json", lambda request: _json())
    app = HttpDispatch(router, metrics=http, log=logging.getLogger("test.metrics"))

    await call(app, "POST", "/api/echo/x", b"hello")
    await call(app, "GET", "/api/stream")
    await call(app, "GET", "/api/broken")
    await call(app, "GET", "/api/missing")
    await call(app, "DELETE", "/api/stream")
    assert http.requests.values == {
        ("/api/echo/:name", "POST", "200"): 1,
        ("/api/stream", "GET", "200"): 1,
        ("/api/broken", "GET", "500"): 1,
        ("unmatched", "GET", "404"): 1,
        ("unmatched", "DELETE", "405"): 1,
    }
    assert http.received.values == {("/api/echo/:name",): 5}
    assert http.sent.values[("/api/echo/:name",)] == 5
    assert http.sent.values[("/api/stream",)] == 5
    assert sum(counts[0][-1] + sum(counts[0][:-1]) for counts in http.latency.values.values()) == 5
    assert http.open_streams == 0


async def _json() -> Response:
    return json_response({"ok": True})


# -- JSON logs ----------------------------------------------------------------------------------


def record(message: str, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("agent.x", logging.WARNING, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_json_formatter_one_object_a_line() -> None:
    line = JsonFormatter().format(record("hello\nworld ✓", instance="i-1", request=None))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "hello\nworld ✓" and entry["level"] == "warn" and entry["logger"] == "agent.x"
    assert entry["instance"] == "i-1" and "request" not in entry and "hub" not in entry
    assert entry["time"].endswith("Z")


def test_json_formatter_with_an_exception_and_odd_arguments() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord(
            "cpm", logging.ERROR, __file__, 1, "failed %s", (object(),), sys.exc_info()
        )
    entry = json.loads(JsonFormatter().format(failed))
    assert "ValueError: boom" in entry["exception"] and entry["message"].startswith("failed <object")


def test_context_filter_fills_what_a_record_lacks() -> None:
    hub = {"id": "sth-1"}
    context = ContextFilter(hub=lambda: hub["id"])
    plain, named = record("a"), record("b", hub="sth-2")
    assert context.filter(plain) and context.filter(named)
    assert plain.hub == "sth-1" and named.hub == "sth-2"  # type: ignore[attr-defined]
    hub["id"] = "sth-3"  # read each time: the id changes when the hub joins
    later = record("c")
    context.filter(later)
    assert later.hub == "sth-3"  # type: ignore[attr-defined]
