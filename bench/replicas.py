"""Replicas benchmark: simulated hubs over three `cpm` replicas sharing a real PostgreSQL.

.venv/bin/python -m bench.replicas                     # 10,000 hubs over 3 replicas
BENCH_HUBS=600 BENCH_WINDOW=10 BENCH_CALLS=300 .venv/bin/python -m bench.replicas   # a quick run
BENCH_PROFILE=/tmp/r0.txt ...    # also py-spy (on PATH) on a survivor through the failover

A throw-away PostgreSQL cluster (harness/postgres.py), three real `cpm serve --registry
postgresql://...` (TLS, one shared CA) on 127.0.0.1, and ``BENCH_WORKERS`` processes of
simulated hubs (bench/link.py's fleet: the real link protocol, heartbeats every
``BENCH_HEARTBEAT`` s), each hub starting on replica i mod 3 and moving on to the next when
its link fails. Measured, at steady state:

* CPU per replica (% of one core) over ``BENCH_WINDOW`` s, and RSS per hub;
* a forwarded call's added latency: GET /sth/:id/api/v1/version of one hub, sequentially,
  through the replica holding its link and through another (p50, p99);
* database statements per second (the replicas' own counters, and PostgreSQL's commits);
* the time from a replica's ``kill -9`` until every hub shows healthy again, asked of a
  surviving replica's /list (target <= 15 s).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

# Real hubs do not wait for each other to dial: a replica's hubs all come back at once.
os.environ.setdefault("BENCH_DIAL_CONCURRENCY", "256")

from bench.common import report, summary
from bench.link import (
    HEARTBEAT,
    MB,
    TLS,
    Manager,
    Worker,
    cpu_seconds,
    manager,
    p99,
    raise_fd_limit,
    start_workers,
)
from harness.postgres import TemporaryPostgres

HUBS = int(os.environ.get("BENCH_HUBS", "10000"))
WINDOW = float(os.environ.get("BENCH_WINDOW", "30"))
CALLS = int(os.environ.get("BENCH_CALLS", "1000"))
REPLICAS = 3
SPACE = "fleet"


def _metric(mgr: Manager, token: str, name: str) -> float:
    with httpx.Client(verify=mgr.verify(), timeout=30) as client:
        text = client.get(f"{mgr.base}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise SystemExit(f"no {name} in /metrics of {mgr.address}")


def _metrics_token(mgr: Manager) -> str:
    return (mgr.data / "metrics.token").read_text().strip()


def _healthy(mgr: Manager, api_token: str) -> int:
    """Hubs /list shows connected and healthy (asked once at the end: at 10,000 hubs a /list
    costs the replica ~1 s of CPU, which polling it would take from the hubs coming back)."""
    with httpx.Client(verify=mgr.verify(), headers={"Authorization": f"Bearer {api_token}"}) as client:
        answer = client.get(f"{mgr.space_url(SPACE)}/list", timeout=60)
    if answer.status_code != 200:
        return 0
    return sum(1 for r in answer.json() if r["isConnectionActive"] and r["healthy"])


def _connected_here(mgr: Manager, token: str) -> int:
    """Hubs this replica holds a healthy link of (its hubs gauge, state "connected")."""
    return int(_metric(mgr, token, f'spacehub_cpm_hubs{{space="{SPACE}",state="connected"}}'))


def _latencies(base: str, mgr: Manager, api_token: str, hub: str) -> list[float]:
    url = f"{base}/api/v1/space/{SPACE}/api/v1/sth/{hub}/api/v1/version"
    times: list[float] = []
    with httpx.Client(verify=mgr.verify(), headers={"Authorization": f"Bearer {api_token}"}) as client:
        for _ in range(20):  # warm: the peer link is dialled, connections kept
            client.get(url, timeout=30).raise_for_status()
        for _ in range(CALLS):
            began = time.perf_counter()
            client.get(url, timeout=30).raise_for_status()
            times.append((time.perf_counter() - began) * 1000)
    return times


def _commits(url: str) -> int:
    with psycopg.connect(url) as connection:
        row = connection.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def main() -> None:
    from cpm.registry import Registry

    raise_fd_limit()
    rows: list[tuple[str, Any, str, str]] = []
    pg = TemporaryPostgres()
    workers: list[Worker] = []
    try:
        url = pg.new_database()
        with Registry(url) as registry:
            registry.create_space(SPACE)
            api_token = registry.create_api_token(SPACE)
            tokens = [registry.create_join_token(SPACE, 86400) for _ in range(HUBS)]
        with tempfile.TemporaryDirectory(prefix="spacehub-bench-replicas-") as tmp:
            root = Path(tmp)
            args = (
                "--registry",
                url,
                "--heartbeat-interval",
                f"{HEARTBEAT:g}",
                "--ping-interval",
                f"{HEARTBEAT:g}",
            )
            managers: list[Manager] = []
            contexts = [manager(root / f"r{i}", *args) for i in range(REPLICAS)]
            try:
                for context in contexts:
                    managers.append(context.__enter__())
                time.sleep(3)
                procs = [psutil.Process(m.daemon.pid) for m in managers]
                idle = [p.memory_info().rss for p in procs]
                ids = [(m.data / "manager-id").read_text().strip() for m in managers]
                began = time.monotonic()
                workers = start_workers(root, managers[0], SPACE, tokens, [m.link_url() for m in managers])

                def connected() -> int:
                    return sum(int(w.last.get("connected", 0)) for w in workers)

                while connected() < HUBS and time.monotonic() < began + 300 + HUBS / 10:
                    if any(w.process.poll() is not None for w in workers):
                        raise SystemExit("a fleet worker died")
                    time.sleep(0.5)
                ramp = time.monotonic() - began
                time.sleep(HEARTBEAT + 2)
                with psycopg.connect(url) as connection:
                    per_replica = dict(
                        connection.execute(
                            "SELECT replica, count(*) FROM hub_owners GROUP BY replica"
                        ).fetchall()
                    )
                metric_tokens = [_metrics_token(m) for m in managers]
                statements0 = [
                    _metric(m, t, "spacehub_cpm_registry_statements_total")
                    for m, t in zip(managers, metric_tokens, strict=True)
                ]
                commits0, t0 = _commits(url), time.monotonic()
                cpu0 = [cpu_seconds(m.daemon.pid) for m in managers]
                time.sleep(WINDOW)
                elapsed = time.monotonic() - t0
                cpu = [
                    100 * (cpu_seconds(m.daemon.pid) - c) / elapsed
                    for m, c in zip(managers, cpu0, strict=True)
                ]
                commits = (_commits(url) - commits0) / elapsed
                statements = (
                    sum(
                        _metric(m, t, "spacehub_cpm_registry_statements_total") - s
                        for m, t, s in zip(managers, metric_tokens, statements0, strict=True)
                    )
                    / elapsed
                )
                rss = [p.memory_info().rss for p in procs]
                per_hub_kb = [
                    (rss[i] - idle[i]) / 1024 / max(1, per_replica.get(ids[i], 0)) for i in range(REPLICAS)
                ]
                rows.append((f"connected, {HUBS} hubs", connected(), f"ramp {ramp:.0f} s", f"{HUBS}"))
                rows.append(
                    ("hubs per replica", ", ".join(str(per_replica.get(i, 0)) for i in ids), "", "even")
                )
                rows.append(("CPU per replica (% of one core)", summary(cpu), f"{WINDOW:g} s", ""))
                rows.append(
                    ("RSS per hub (KB)", summary(per_hub_kb), "each replica's growth / its hubs", "< 50")
                )
                rows.append(("RSS per replica (MB)", ", ".join(f"{r / MB:.0f}" for r in rss), "", ""))
                rows.append(
                    ("registry statements / s (all replicas)", round(statements, 1), "steady state", "small")
                )
                rows.append(("PostgreSQL commits / s", round(commits, 1), "pg_stat_database", ""))
                # A forwarded call against one on the owning replica.
                with psycopg.connect(url) as connection:
                    hub = connection.execute(
                        "SELECT hub_id FROM hub_owners WHERE replica = %s LIMIT 1", (ids[0],)
                    ).fetchone()[0]
                direct = _latencies(managers[0].base, managers[0], api_token, hub)
                forwarded = _latencies(managers[1].base, managers[1], api_token, hub)
                d50, f50 = statistics.median(direct), statistics.median(forwarded)
                rows.append(
                    (
                        "call on the owning replica p50 / p99 (ms)",
                        f"{d50:.2f} / {p99(direct):.2f}",
                        f"{CALLS} calls",
                        "",
                    )
                )
                rows.append(
                    (
                        "forwarded call p50 / p99 (ms)",
                        f"{f50:.2f} / {p99(forwarded):.2f}",
                        "via another replica",
                        "",
                    )
                )
                rows.append(
                    (
                        "forwarding adds p50 / p99 (ms)",
                        f"{f50 - d50:.2f} / {p99(forwarded) - p99(direct):.2f}",
                        "",
                        "",
                    )
                )
                # kill -9 one replica: until every hub is healthy again, asked of a survivor.
                doomed = managers[2]
                profiler = None
                if os.environ.get("BENCH_PROFILE"):  # py-spy on a survivor through the failover
                    out = os.environ["BENCH_PROFILE"]
                    pid = str(managers[0].daemon.pid)
                    profiler = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "-d",
                            "10",
                            "-r",
                            "200",
                            "--format",
                            "raw",
                            "-o",
                            out,
                            "-p",
                            pid,
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1)
                machine0 = psutil.cpu_times()
                survivors_cpu0 = [cpu_seconds(m.daemon.pid) for m in managers[:2]]
                workers_cpu0 = sum(cpu_seconds(w.process.pid) for w in workers)
                doomed.daemon.process.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                doomed.daemon.process.wait()
                survivors = list(zip(managers[:2], metric_tokens[:2], strict=True))
                while time.monotonic() - killed < 180:
                    here = sum(_connected_here(m, t) for m, t in survivors)
                    errors: dict[str, int] = {}
                    for w in workers:
                        for name, count in w.last.get("errors", {}).items():
                            errors[name] = errors.get(name, 0) + int(count)
                    print(
                        f"failover {time.monotonic() - killed:5.1f} s: {here} healthy on the survivors,"
                        f" {connected()} linked (sim), errors {errors}",
                        file=sys.stderr,
                        flush=True,
                    )
                    if here >= HUBS:
                        break
                    time.sleep(1.0)  # each look costs the replicas a scan of every hub
                recovered = time.monotonic() - killed
                machine1 = psutil.cpu_times()
                busy = (machine1.user + machine1.system - machine0.user - machine0.system) / recovered
                survivors_cpu = [
                    100 * (cpu_seconds(m.daemon.pid) - c) / recovered
                    for m, c in zip(managers[:2], survivors_cpu0, strict=True)
                ]
                workers_cpu = (
                    100 * (sum(cpu_seconds(w.process.pid) for w in workers) - workers_cpu0) / recovered
                )
                if profiler is not None:
                    profiler.wait()
                healthy = _healthy(managers[0], api_token)
                rows.append(
                    (
                        "kill -9 of a replica until every hub is healthy (s)",
                        round(recovered, 1),
                        f"{per_replica.get(ids[2], 0)} hubs moved; {healthy} healthy",
                        "<= 15",
                    )
                )
                rows.append(
                    (
                        "CPU during the failover (% of one core)",
                        f"survivors {survivors_cpu[0]:.0f} + {survivors_cpu[1]:.0f},"
                        f" sim hubs {workers_cpu:.0f}",
                        f"machine {100 * busy:.0f} of {100 * (psutil.cpu_count() or 1)}",
                        "",
                    )
                )
            finally:
                for w in workers:
                    w.process.kill()
                    w.process.wait()
                for context in reversed(contexts[: len(managers)]):
                    context.__exit__(None, None, None)
    finally:
        pg.close()
    mode = "TLS" if TLS else "plain"
    report(f"replicas ({HUBS} simulated hubs, {REPLICAS} replicas, heartbeat {HEARTBEAT:g} s, {mode})", rows)
    print(json.dumps({"replicas": {"hubs": HUBS}}), flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
