"""Link failure through NAT: how fast the manager sees a cut, and how fast the hub is back.

Same setup as tests/netns (root only): `cpm` in a ``cloud`` namespace, `sth` in an ``edge``
namespace behind a masquerading router. Each round waits until the link has been up 11 s
(the hub's backoff resets after 10 s), cuts it, measures the time until the manager's
Space API shows the hub unhealthy and disconnected, holds the cut HOLD seconds, restores it
and measures the time until the hub is connected again.

.venv/bin/python -m bench.link_failure                          # as root; 3 cuts by `ip link set down`
BENCH_CUT=drop BENCH_RUNS=5 .venv/bin/python -m bench.link_failure   # nft blackhole instead
BENCH_HOLD=40 .venv/bin/python -m bench.link_failure           # long cuts: the hub notices too

Manager timings: --ping-interval 2 --pong-timeout 2 --heartbeat-interval 1 (bound 4 s);
hub: built-in (reconnect required within 5 s of the restore).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import report, summary
from harness.manager import cpm
from harness.netns import CLOUD_IP, NsClient, Topology, netns_unavailable

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
CUT = os.environ.get("BENCH_CUT", "down")
HOLD = float(os.environ.get("BENCH_HOLD", "0"))
ARGS = ["--heartbeat-interval", "1", "--ping-interval", "2", "--pong-timeout", "2"]


def main() -> None:
    reason = netns_unavailable()
    if reason is not None:
        sys.exit(f"link_failure: {reason}")
    with tempfile.TemporaryDirectory(prefix="spacehub-bench-") as tmp_name:
        tmp = Path(tmp_name)
        topo = Topology(log_dir=tmp)
        try:
            topo.build()
            run(topo, tmp)
        finally:
            topo.destroy()


def run(topo: Topology, tmp: Path) -> None:
    data = tmp / "cpm"
    cpm(data, "space", "create", "demo")
    token = cpm(data, "token", "create", "--space", "demo")
    join = cpm(data, "join-token", "create", "--space", "demo")
    manager = topo.start_daemon(
        topo.cloud,
        [sys.executable, "-m", "cpm.main", "serve", "-H", CLOUD_IP, "-P", "0", "--data-dir", str(data),
         "--public-name", CLOUD_IP, "-L", "warn", *ARGS],
        "cpm",
    )  # fmt: skip
    hub_data = tmp / "hub"
    topo.start_daemon(
        topo.edge,
        [sys.executable, "-m", "agent.main", "-H", "127.0.0.1", "-P", "0", "-D", str(hub_data / "sequences"),
         "--data-dir", str(hub_data), "--cpm-url", f"wss://{manager}", "--space", "demo",
         "--join-token", join, "--cpm-ca", str(data / "ca.pem"), "-L", "warn", "--end-instances-on-exit"],
        "sth",
    )  # fmt: skip
    cloud = NsClient(topo, topo.cloud)
    url = f"https://{manager}/api/v1/space/demo/api/v1/list"
    auth = {"Authorization": f"Bearer {token}"}

    def record() -> dict[str, object]:
        hubs = cloud.get(url, headers=auth, ca=str(data / "ca.pem"), timeout=5).json()
        return dict(hubs[0]) if hubs else {}

    def wait(condition: Callable[[dict[str, object]], object], bound: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < bound:
            hub = record()
            if condition(hub):
                return time.monotonic() - started
            time.sleep(0.05)
        raise TimeoutError(f"not within {bound} s")

    cut, restore = (topo.link_down, topo.link_up) if CUT == "down" else (topo.drop_all, topo.undrop)
    wait(lambda hub: hub.get("isConnectionActive") and hub.get("healthy"), 30)
    unhealthy, disconnected, back = [], [], []
    for _ in range(RUNS):
        time.sleep(11)  # the hub's backoff resets after a link stayed up 10 s
        started = time.monotonic()
        cut()
        try:
            unhealthy.append(wait(lambda hub: hub.get("healthy") is False, 30))
            disconnected.append(
                max(unhealthy[-1], wait(lambda hub: hub.get("isConnectionActive") is False, 30))
            )
            time.sleep(max(0.0, HOLD - (time.monotonic() - started)))
        finally:
            restore()
        back.append(wait(lambda hub: hub.get("isConnectionActive"), 120))
        wait(lambda hub: hub.get("healthy"), 10)
    report(
        f"link failure through NAT (cut: {CUT}, held {HOLD:g} s)",
        [
            ("cut -> manager shows unhealthy (s)", summary(unhealthy), "3 missed 1 s heartbeats", "<= 4 s"),
            ("cut -> manager shows disconnected (s)", summary(disconnected), "silence 1 s + 2 s", "<= 4 s"),
            ("restore -> hub connected again (s)", summary(back), "backoff from 1 s, cap 3 s", "<= 5 s"),
        ],
    )


if __name__ == "__main__":
    main()
