"""Metrics and JSON logs of the real daemons: scraped over HTTP and read with
prometheus-client's own parser, as Prometheus would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from harness.daemons import read_until, run_sth, stop
from tests.cpm_helpers import cpm, run_cpm
from tests.e2e.test_link_e2e import FAST, run_linked_sth, setup_space, space_client, ssl_context, wait_hub
from tests.helpers import ROOT


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample by its name: ``[(labels, value)]``."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matching = [v for have, v in found.get(name, []) if all(have.get(k) == w for k, w in labels.items())]
    assert matching, f"no sample {name} {labels}; have {sorted(found)}"
    return sum(matching)


def test_hub_metrics(tmp_path: Path) -> None:
    with (
        run_sth(tmp_path / "sequences") as hub,
        httpx.Client(base_url=f"http://{hub.address}", timeout=20) as api,
    ):
        for _ in range(3):
            assert api.get("/api/v1/version").status_code == 200
        assert api.get("/api/v1/instance/nope").status_code == 404
        assert api.get("/api/v1/no-such-route").status_code == 404
        sent = api.post("/api/v1/topic/metrics", content=b"a\nb\n", headers={"content-type": "text/plain"})
        assert sent.status_code == 202
        scraped = api.get("/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
        found = samples(scraped.text)
        version = value(
            found, "spacehub_hub_http_requests_total", route="/api/v1/version", method="GET", status="200"
        )
        assert version == 3
        assert (
            value(found, "spacehub_hub_http_requests_total", route="/api/v1/instance/:id", status="404") == 1
        )
        assert value(found, "spacehub_hub_http_requests_total", route="unmatched", status="404") == 1
        assert value(found, "spacehub_hub_http_request_duration_seconds_count", route="/api/v1/version") == 3
        assert value(found, "spacehub_hub_http_response_body_bytes_total", route="/api/v1/version") > 0
        assert value(found, "spacehub_hub_instances", status="running") == 0
        assert value(found, "spacehub_hub_link_connected") == 0
        assert value(found, "spacehub_hub_sequences") == 0
        assert value(found, "spacehub_hub_topic_bytes_in_total") == 4
        assert value(found, "spacehub_hub_topic_records_in_total") == 2
        assert value(found, "spacehub_hub_topic_bytes_out_total") == 0
        assert value(found, "spacehub_hub_topic_buffered_bytes") == 4
        assert value(found, "spacehub_hub_topics") == 1
        assert value(found, "process_resident_memory_bytes") > 10_000_000
        assert value(found, "process_open_fds") > 3
        # Scrapes count too, and the hub is still serving.
        again = samples(api.get("/metrics").text)
        assert value(again, "spacehub_hub_http_requests_total", route="/metrics", status="200") >= 1
        assert api.get("/api/v1/version").status_code == 200
        assert hub.alive()


async def test_manager_metrics(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    token, join = setup_space(data)
    with run_cpm(data, *FAST) as manager, run_linked_sth(tmp_path, manager, "--join-token", join) as hub:
        scrape_token = cpm(data, "metrics-token")
        assert scrape_token.startswith("shm_") and cpm(data, "metrics-token") == scrape_token
        assert (data / "metrics.token").stat().st_mode & 0o777 == 0o600
        async with space_client(manager, token) as space:
            hub_id = (await wait_hub(space))["id"]
            answer = await space.get(f"/sth/{hub_id}/api/v1/version", headers={"x-request-id": "call-7"})
            assert answer.status_code == 200
            # The id went on to the hub, which answered with it: once, not twice.
            assert answer.headers.get_list("x-request-id") == ["call-7"]
            assert (await space.get("/list")).status_code == 200
            posted = await space.post(
                f"/sth/{hub_id}/api/v1/topic/metrics-test",
                content=b"one\ntwo\n",
                headers={"content-type": "text/plain"},
            )
            assert posted.status_code in (200, 202), posted.text
            await trio.sleep(1.5)  # a heartbeat after the first
        async with httpx.AsyncClient(
            base_url=manager.base, verify=ssl_context(manager), timeout=20
        ) as client:
            assert (await client.get("/metrics")).status_code == 403
            wrong = await client.get("/metrics", headers={"Authorization": "Bearer shm_wrong"})
            assert wrong.status_code == 403 and "Forbidden" in wrong.text
            # An API token of a space is not a scrape token.
            assert (
                await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            ).status_code == 403
            scraped = await client.get("/metrics", headers={"Authorization": f"Bearer {scrape_token}"})
        assert scraped.status_code == 200, scraped.text
        found = samples(scraped.text)
        assert value(found, "spacehub_cpm_hubs", space="demo", state="connected") == 1
        assert value(found, "spacehub_cpm_hubs", space="demo", state="disconnected") == 0
        assert value(found, "spacehub_cpm_links_opened_total") >= 1
        assert value(found, "spacehub_cpm_links_open") == 1
        # The calls above are over; the hub's list of the Space's wanted topics stays open.
        assert value(found, "spacehub_cpm_link_streams_open") == 1
        assert value(found, "spacehub_cpm_heartbeat_age_seconds_count") == 1
        assert value(found, "spacehub_cpm_heartbeat_age_seconds_bucket", le="+Inf") == 1
        proxy = "/api/v1/space/:space/api/v1/sth/:id/*"
        assert value(found, "spacehub_cpm_http_requests_total", route=proxy, method="GET", status="200") == 1
        assert value(found, "spacehub_cpm_http_response_body_bytes_total", route=proxy) > 0
        assert value(found, "spacehub_cpm_http_request_body_bytes_total", route=proxy) == 8
        assert value(found, "spacehub_cpm_http_requests_total", route="/api/v1/space/:space/api/v1/list") >= 1
        assert value(found, "spacehub_cpm_http_requests_total", route="/metrics", status="403") == 3
        assert value(found, "spacehub_cpm_registry_query_duration_seconds_count") >= 1
        assert value(found, "process_cpu_seconds_total") > 0
        assert manager.process.poll() is None

        # The dashboard in docs/ asks only for what the daemons serve.
        with httpx.Client(base_url=f"http://{hub.address}", timeout=20) as api:
            hub_found = samples(api.get("/metrics").text)
        assert value(hub_found, "spacehub_hub_link_connected") == 1
        assert value(hub_found, "spacehub_hub_link_connections_total") == 1
        assert value(hub_found, "spacehub_hub_link_streams_open") == 1
        found.update(hub_found)
        dashboard = json.loads((ROOT / "docs" / "grafana" / "spacehub.json").read_text())
        asked = {
            name
            for panel in dashboard["panels"]
            for target in panel["targets"]
            for name in re.findall(r"\b(?:spacehub|process)_\w+", target["expr"])
        }
        assert len(asked) > 10 and asked <= set(found), sorted(asked - set(found))


def test_json_logs(tmp_path: Path) -> None:
    """--log-format json: one object a line, with the hub's id and the instance's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "agent.main",
        "-P",
        "0",
        "-D",
        str(tmp_path / "seq"),
        "--log-format",
        "json",
        "--end-instances-on-exit",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=ROOT
    )
    try:
        lines = read_until(process, b"Running", time.monotonic() + 20)
        address = next(line for line in lines if line.startswith(b"API on ")).split()[-1].decode()
        with httpx.Client(base_url=f"http://{address}/api/v1", timeout=20) as api:
            from tests.console_helpers import package_bytes

            uploaded = api.post(
                "/sequence",
                content=package_bytes(),
                headers={"content-type": "application/octet-stream", "x-request-id": "upload-1"},
            )
            assert uploaded.headers["x-request-id"] == "upload-1"
            sequence = uploaded.json()["id"]
            assert len(api.get("/version").headers["x-request-id"]) == 16  # made when not given
            instance = api.post(f"/sequence/{sequence}/start", json={}).json()["id"]
            api.post(f"/instance/{instance}/_kill", json={})
            time.sleep(1.0)
    finally:
        stop(process)
    assert process.stderr is not None
    records = [json.loads(line) for line in process.stderr.read().decode().splitlines() if line.strip()]
    process.stderr.close()
    assert records, "no log lines"
    for record in records:
        assert set(record) >= {"time", "level", "logger", "message"}, record
        assert record["time"].endswith("Z")
    hub_ids = {record.get("hub") for record in records}
    assert len(hub_ids - {None}) == 1  # every record after the hub was made names it
    assert any(record.get("instance") == instance for record in records)
    # A record made while serving a call names the call.
    assert any(r.get("request") == "upload-1" and "uploaded" in r["message"] for r in records), records


def test_manager_json_logs(tmp_path: Path) -> None:
    data = tmp_path / "cpm"
    cpm(data, "space", "create", "demo")
    command = [
        sys.executable,
        "-m",
        "cpm.main",
        "serve",
        "-P",
        "0",
        "--data-dir",
        str(data),
        "--log-format",
        "json",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=ROOT
    )
    try:
        read_until(process, b"Running", time.monotonic() + 20)
    finally:
        stop(process)
    assert process.stderr is not None
    text = process.stderr.read().decode()
    process.stderr.close()
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, text
    for line in lines:
        record = json.loads(line)
        assert set(record) >= {"time", "level", "logger", "message"} and record["logger"].startswith(
            ("cpm", "spacehub")
        )
