"""A manager restart: how soon every hub is linked again once the manager listens again.

Real daemons on 127.0.0.1 (no root): one `cpm`, BENCH_RESTART_HUBS `sth` joined to it. Each round
kills the manager with SIGKILL, keeps it down BENCH_OUTAGE seconds (every hub meanwhile
gets "connection refused"), starts it again on the same port and data dir, and measures
from the moment it listens until the Space API shows each hub healthy again.

.venv/bin/python -m bench.manager_restart                              # 5 hubs, 30 s down, 3 rounds
BENCH_RESTART_HUBS=20 BENCH_OUTAGE=60 BENCH_RUNS=1 .venv/bin/python -m bench.manager_restart

Required (issue #16): every hub linked within 5 s of the manager answering, however long it
was down (the hub's backoff cap while it is refused: 3 s; such attempts do not grow it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import report, summary
from harness.daemons import run_sth
from harness.manager import cpm, run_cpm
from spacehub.tls import client_ssl_context

HUBS = int(os.environ.get("BENCH_RESTART_HUBS", "5"))
OUTAGE = float(os.environ.get("BENCH_OUTAGE", "30"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
ARGS = ("--heartbeat-interval", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def healthy_hubs(url: str, token: str, ca: Path) -> set[str]:
    try:
        answer = httpx.get(
            f"{url}/list",
            headers={"Authorization": f"Bearer {token}"},
            verify=client_ssl_context(ca),
            timeout=5,
        )
    except httpx.HTTPError:
        return set()
    return {r["id"] for r in answer.json() if r.get("healthy")} if answer.status_code == 200 else set()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="spacehub-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "cpm"
        cpm(data, "space", "create", "demo")
        token = cpm(data, "token", "create", "--space", "demo")
        port = free_port()
        all_back: list[float] = []
        each_back: list[float] = []
        managers = contextlib.ExitStack()  # the manager of the moment, killed and replaced
        with managers, contextlib.ExitStack() as hubs:
            manager = managers.enter_context(run_cpm(data, *ARGS, port=port))
            for n in range(HUBS):
                join = cpm(data, "join-token", "create", "--space", "demo")
                hub_dir = tmp / f"hub{n}"
                link = ["--data-dir", str(hub_dir), "--cpm-url", manager.link_url, "--space", "demo"]
                link += ["--cpm-ca", str(manager.ca_file), "--join-token", join, "-L", "warn"]
                hubs.enter_context(run_sth(hub_dir / "sequences", *link))
            url, ca = manager.space_url("demo"), manager.ca_file
            deadline = time.monotonic() + 60
            while len(healthy_hubs(url, token, ca)) < HUBS:
                if time.monotonic() > deadline:
                    raise TimeoutError("the hubs did not link in 60 s")
                time.sleep(0.2)
            for _ in range(RUNS):
                time.sleep(2)  # up a little, as a manager would be, before it is killed
                manager.process.kill()
                manager.process.wait(timeout=15)
                managers.close()
                time.sleep(OUTAGE)
                manager = managers.enter_context(run_cpm(data, *ARGS, port=port))
                listening = time.monotonic()  # run_cpm returns once it serves
                seen: dict[str, float] = {}
                while len(seen) < HUBS:
                    for hub_id in healthy_hubs(url, token, ca) - set(seen):
                        seen[hub_id] = time.monotonic() - listening
                    if time.monotonic() - listening > 120:
                        raise TimeoutError(f"{HUBS - len(seen)} hub(s) not back in 120 s")
                    time.sleep(0.05)
                each_back += seen.values()
                all_back.append(max(seen.values()))
    report(
        f"manager restart ({HUBS} hubs, down {OUTAGE:g} s by SIGKILL, {RUNS} rounds)",
        [
            (
                "listening -> each hub healthy again (s)",
                summary(each_back),
                "backoff cap 3 s when refused",
                "<= 5 s",
            ),
            ("listening -> every hub healthy again (s)", summary(all_back), "heartbeat 1 s", "<= 5 s"),
        ],
    )


if __name__ == "__main__":
    main()
