"""The link through NAT, with real faults: a hub behind a masquerading router, its manager in the cloud.

`cpm` runs in the ``cloud`` namespace (TLS, its certificate covering the cloud address);
`sth` runs in the ``edge`` namespace, behind the router's masquerade, and dials the
manager. The manager cannot open a connection to the hub, yet drives it over the link.
Then the link is cut, once by taking the router's cloud-side veth down (a long cut: the
hub notices too and keeps failing to reconnect) and once by a blackhole nft rule (a
short, silent cut), and restored.

Timings used (and asserted against):

* manager: ``--heartbeat-interval 1 --pong-timeout 2`` (a link silent for 1 + 2 s is
  closed, so 3 s after the cut at most; default 3 missed ⇒ unhealthy after 3 s) and
  ``--ping-interval 2``;
  the watchdog and the registry write add well under a second.
* hub: its real, built-in timings (it drops a link silent for the manager's ping interval
  + pong deadline, given in the welcome: 4 s here; backoff from 1 s; ``UNREACHABLE_CAP``
  3 s while the manager cannot be reached; attempts reset after a link stayed up 10 s).
* requirement: the hub is connected again within 5 s of the restore.

The modules' tests run in order and share one manager and one hub; every wait is bounded.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from harness.netns import CLOUD_IP, EDGE_IP, NsClient, NsError, Response, Topology
from tests.cpm_helpers import cpm
from tests.helpers import python_package

T = TypeVar("T")

PING_INTERVAL = 2.0
PONG_TIMEOUT = 2.0
HEARTBEAT = 1.0
#: manager side: a dead link is closed at most heartbeat interval + pong deadline after the cut
#: (bounded here by the larger ping interval + pong deadline);
#: slack for the close, the registry write and our 0.2 s polling
DISCONNECT_BOUND = PING_INTERVAL + PONG_TIMEOUT + 2.0
#: the hub notices a dead link by its websocket pings (10 s + 10 s), or once a heartbeat has been
#: stuck 10 s in a full socket buffer (about 16 s of 1 s heartbeats fill it): within about 30 s
HUB_NOTICE_BOUND = 40.0
#: the issue's requirement
RECONNECT_BOUND = 5.0
#: links up this long reset the hub's backoff (agent.link.client.STABLE_AFTER)
STABLE_AFTER = 10.0

ECHO = """
async def run(context, input, *args):
    async for chunk in input:
        yield chunk
"""

IDLE = """
import asyncio
async def run(context, input, *args):
    await asyncio.sleep(3600)
"""


@dataclass
class Linked:
    topo: Topology
    manager: str  # host:port in the cloud
    hub_port: int
    ca: str
    token: str
    cloud: NsClient
    edge: NsClient
    hub_id: str = ""
    state: dict[str, Any] = field(default_factory=dict)

    def space(self, method: str, path: str, **kwargs: Any) -> Response:
        """A Space API call, made from inside the cloud namespace."""
        url = f"https://{self.manager}/api/v1/space/demo/api/v1{path}"
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        return self.cloud.request(method, url, headers=headers, ca=self.ca, **kwargs)

    def record(self) -> dict[str, Any]:
        response = self.space("GET", f"/sth/{self.hub_id}/info", timeout=5)
        assert response.status_code == 200, response.text
        record: dict[str, Any] = response.json()
        return record

    def hub(self, method: str, path: str, **kwargs: Any) -> Response:
        """A call to the hub's own API, made inside the edge namespace."""
        return self.edge.request(method, f"http://127.0.0.1:{self.hub_port}/api/v1{path}", **kwargs)


def poll(what: str, check: Callable[[], T | None], bound: float, every: float = 0.2) -> tuple[T, float]:
    """Call ``check`` until it returns something other than None; that and the seconds it took."""
    started = time.monotonic()
    last_error: Exception | None = None
    while True:
        try:
            value = check()
        except (NsError, AssertionError) as exc:
            value, last_error = None, exc
        elapsed = time.monotonic() - started
        if value is not None:
            return value, elapsed
        if elapsed > bound:
            pytest.fail(f"{what}: not within {bound:g} s (last error: {last_error})")
        time.sleep(every)


@pytest.fixture(scope="module")
def linked(topology: Topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Linked]:
    """`cpm` in the cloud, `sth` in the edge, joined; both checked alive at the end."""
    tmp: Path = tmp_path_factory.mktemp("nat")
    data = tmp / "cpm"
    cpm(data, "space", "create", "demo")
    token = cpm(data, "token", "create", "--space", "demo")
    join = cpm(data, "join-token", "create", "--space", "demo")
    manager = topology.start_daemon(
        topology.cloud,
        [sys.executable, "-m", "cpm.main", "serve", "-H", CLOUD_IP, "-P", "0", "--data-dir", str(data),
         "--public-name", CLOUD_IP, "--heartbeat-interval", str(HEARTBEAT),
         "--ping-interval", str(PING_INTERVAL), "--pong-timeout", str(PONG_TIMEOUT)],
        "cpm",
    )  # fmt: skip
    assert manager.startswith(f"{CLOUD_IP}:"), manager
    ca = str(data / "ca.pem")
    hub_data = tmp / "hub"
    hub = topology.start_daemon(
        topology.edge,
        [sys.executable, "-m", "agent.main", "-H", "0.0.0.0", "-P", "0", "-D", str(hub_data / "sequences"),
         "--data-dir", str(hub_data), "--cpm-url", f"wss://{manager}", "--space", "demo",
         "--join-token", join, "--cpm-ca", ca, "--instance-lifetime", "30", "--kill-grace", "1",
         "--end-instances-on-exit"],
        "sth",
    )  # fmt: skip
    processes = list(topology.processes)
    cloud, edge = NsClient(topology, topology.cloud), NsClient(topology, topology.edge)
    yield Linked(topology, manager, int(hub.rsplit(":", 1)[1]), ca, token, cloud, edge)
    assert all(process.poll() is None for process in processes), "cpm or sth died during the tests"


def connected_record(linked: Linked) -> dict[str, Any] | None:
    hubs = linked.space("GET", "/list", timeout=5).json()
    for record in hubs:
        if record["isConnectionActive"] and record["healthy"]:
            return dict(record)
    return None


def test_manager_drives_hub_behind_nat_without_reaching_it(linked: Linked) -> None:
    record, _ = poll("the hub joins and is healthy", lambda: connected_record(linked), 30)
    linked.hub_id = record["id"]
    assert "lastConnected" in record["info"]

    # The hub serves in the edge, yet nothing in the cloud can open a connection to it.
    assert linked.hub("GET", "/version").status_code == 200
    probe = linked.cloud.tcp_probe(EDGE_IP, linked.hub_port, timeout=3)
    assert probe["result"] == "timeout", probe
    # ... while the hub reaches the manager only through the masquerade.
    assert linked.edge.tcp_probe(CLOUD_IP, int(linked.manager.rsplit(":", 1)[1]))["result"] == "connected"

    base = f"/sth/{linked.hub_id}/api/v1"
    version = linked.space("GET", f"{base}/version")
    assert version.status_code == 200
    assert version.json()["service"] == "@scramjet/host"

    package = {"content-type": "application/octet-stream"}
    upload = linked.space("POST", f"{base}/sequence", body=python_package(ECHO), headers=package)
    assert upload.status_code == 202, upload.text
    started = linked.space("POST", f"{base}/sequence/{upload.json()['id']}/start", json_body={})
    assert started.status_code == 200, started.text
    instance = started.json()["id"]
    sent = linked.space(
        "POST",
        f"{base}/instance/{instance}/input",
        body=b"hello\nnat\n",
        headers={"content-type": "text/plain"},
    )
    assert sent.status_code == 200, sent.text
    output = linked.space("GET", f"{base}/instance/{instance}/output", timeout=20)
    assert output.status_code == 200
    assert output.content == b"hello\nnat\n"

    # A long-running instance: it must survive the cuts below.
    upload = linked.space("POST", f"{base}/sequence", body=python_package(IDLE, name="idle"), headers=package)
    assert upload.status_code == 202, upload.text
    started = linked.space("POST", f"{base}/sequence/{upload.json()['id']}/start", json_body={})
    assert started.status_code == 200, started.text
    linked.state["idle"] = started.json()["id"]


def instance_running(linked: Linked) -> bool:
    response = linked.hub("GET", f"/instance/{linked.state['idle']}", timeout=5)
    return response.status_code == 200 and response.json().get("status") not in ("ended", "errored", "killed")


def disconnected_record(linked: Linked) -> dict[str, Any] | None:
    record = linked.record()
    return None if record["isConnectionActive"] else record


def reconnected_record(linked: Linked) -> dict[str, Any] | None:
    record = linked.record()
    return record if record["isConnectionActive"] else None


def cut_and_restore(
    linked: Linked, cut: Callable[[], None], restore: Callable[[], None], *, long: bool
) -> dict[str, float]:
    """Cut the link, check what each side sees, restore it; the timings seen."""
    if "idle" not in linked.state:
        pytest.skip("the NAT round trip test failed")
    before = linked.record()
    assert before["isConnectionActive"] and before["healthy"], before
    timings: dict[str, float] = {}
    cut_at = time.monotonic()
    cut()
    try:
        record, timings["disconnected"] = poll(
            "the manager shows the hub disconnected", lambda: disconnected_record(linked), DISCONNECT_BOUND
        )
        assert record["healthy"] is False
        assert record["info"].get("lastDisconnected"), record
        assert record["info"]["lastDisconnected"] != before["info"].get("lastDisconnected")
        # Calls into the hub are refused while its link is down.
        assert linked.space("GET", f"/sth/{linked.hub_id}/api/v1/version").status_code == 503
        # The hub itself goes on serving, and its instance keeps running.
        assert linked.hub("GET", "/version").status_code == 200
        assert instance_running(linked)
        if long:
            # Keep the link down until the hub noticed too, then long enough for several
            # failed attempts: its backoff would have grown well beyond 5 s.
            _, noticed = poll(
                "the hub notices the dead link",
                lambda: True if not linked.hub("GET", "/status").json()["cpm"]["connected"] else None,
                HUB_NOTICE_BOUND,
                every=0.5,
            )
            timings["hub noticed"] = noticed + timings["disconnected"]
            time.sleep(12)
            status = linked.hub("GET", "/status").json()["cpm"]
            assert status["state"] in ("backoff", "connecting"), status
            assert status["lastError"], status
            assert instance_running(linked)
    finally:
        restore_at = time.monotonic()
        restore()
    timings["cut"] = restore_at - cut_at
    record, timings["reconnected"] = poll(
        "the hub is connected again", lambda: reconnected_record(linked), RECONNECT_BOUND + 30, every=0.1
    )
    assert timings["reconnected"] <= RECONNECT_BOUND, timings
    assert record["id"] == linked.hub_id
    # Driven through the link again, its instance untouched.
    version = linked.space("GET", f"/sth/{linked.hub_id}/api/v1/version")
    assert version.status_code == 200
    instance = linked.space("GET", f"/sth/{linked.hub_id}/api/v1/instance/{linked.state['idle']}")
    assert instance.status_code == 200, instance.text
    poll("the hub is healthy again", lambda: connected_record(linked), 5)
    print(f"timings (s): {timings}")
    return timings


def test_long_cut_by_link_down(linked: Linked) -> None:
    topo = linked.topo
    cut_and_restore(linked, topo.link_down, topo.link_up, long=True)


def test_short_silent_cut_by_nft_drop(linked: Linked) -> None:
    # A link that stayed up STABLE_AFTER seconds resets the hub's backoff; a cut sooner than
    # that after the last reconnect would still meet the grown backoff (see the report).
    since = linked.record()["info"]["lastConnected"]
    assert since
    time.sleep(STABLE_AFTER + 0.5)
    topo = linked.topo
    cut_and_restore(linked, topo.drop_all, topo.undrop, long=False)
