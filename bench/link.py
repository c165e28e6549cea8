"""Link benchmarks: throughput and latency through a Space, a fleet of hubs on one manager, a soak.

.venv/bin/python -m bench.link                  # everything (1 GB, 100/1000/5000 hubs, 1000 drops)
.venv/bin/python -m bench.link throughput       # one or more parts: throughput latency fleet soak
BENCH_MB=64 BENCH_HUBS=50 BENCH_WINDOW=10 BENCH_SOAK_MB=64 BENCH_DROPS=20 BENCH_SOAK_CALLS=500 \
    .venv/bin/python -m bench.link              # a quick run

Every part starts a real `cpm serve` (TLS with its own CA unless BENCH_TLS=0) on 127.0.0.1 and, except
the fleet, a real `sth` joined to it with a one-time join token. See bench/README.md for what each figure
means and the environment variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import resource
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

from bench.common import ROOT, report, summary
from harness.daemons import read_until as _read_until
from harness.packages import python_package

MB = 1024 * 1024
TOTAL_MB = int(os.environ.get("BENCH_MB", "1024"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
TLS = os.environ.get("BENCH_TLS", "1") != "0"
#: latency: requests per run and per path (direct, through the Space), and concurrent clients
CALLS = int(os.environ.get("BENCH_CALLS", "2000"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "16"))
#: latency: the open-loop runs' rate, calls per second from all clients together
PACED_RATE = float(os.environ.get("BENCH_PACED_RATE", "250"))
#: fleet: hub counts, worker processes, CPU window (s), heartbeat interval the manager tells hubs
HUBS = [int(n) for n in os.environ.get("BENCH_HUBS", "100,1000,5000").split(",") if n.strip()]
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
WINDOW = float(os.environ.get("BENCH_WINDOW", "30"))
HEARTBEAT = float(os.environ.get("BENCH_HEARTBEAT", "10"))
#: fleet: dials (TLS handshakes and link handshakes) each worker process runs at once
DIAL_CONCURRENCY = int(os.environ.get("BENCH_DIAL_CONCURRENCY", "32"))
#: soak: MB streamed (half through instances, half through topics), link drops, calls
SOAK_MB = int(os.environ.get("BENCH_SOAK_MB", "2048"))
DROPS = int(os.environ.get("BENCH_DROPS", "1000"))
SOAK_CALLS = int(os.environ.get("BENCH_SOAK_CALLS", "10000"))
#: soak: seconds an ended instance stays listed (sth --instance-lifetime; its pipes stay open as long)
SOAK_LIFETIME = os.environ.get("BENCH_INSTANCE_LIFETIME", "5")

SPACE = "demo"
IDENTITY_BYTES = (
    "provides = {'provides': '', 'contentType': 'application/octet-stream'}\n"
    "async def run(context, input, *args):\n    async for chunk in input:\n        yield chunk\n"
)
OCTET = {"content-type": "application/octet-stream"}

#: `sth` with the link's reconnect backoff cut to 0-50 ms (bench only, for the soak): the real backoff
#: doubles on every drop of a link that was up < 60 s, which would make 1,000 drops take hours.
FAST_RETRY_STH = (
    "import random, sys\n"
    "import agent.link.client as link\n"
    "link.backoff_delay = lambda attempt, base=1.0, cap=60.0: random.uniform(0, 0.05)\n"
    "from agent.main import main\n"
    "sys.exit(main())\n"
)


# -- processes -------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (5,000 hubs are 5,000 sockets on each side)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    address: str
    lines: list[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


def _stop(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def daemon(command: list[str], log: Path, timeout: float = 30) -> Iterator[Daemon]:
    """Start ``command`` (stderr to ``log``), wait for "Running"; SIGTERM it afterwards."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=sink,
            stdin=subprocess.DEVNULL,
            env=_env(),
            cwd=ROOT,
            preexec_fn=raise_fd_limit,
        )
    try:
        lines = _read_until(process, b"Running", time.monotonic() + timeout)
        address = next(line for line in lines if line.startswith(b"API on ")).split()[-1].decode()
        yield Daemon(process, address, lines, log)
    finally:
        _stop(process)


def cpm_cli(data: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cpm.main", *args, "--data-dir", str(data)],
        capture_output=True,
        env=_env(),
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    return done.stdout.decode().strip()


@dataclass
class Manager:
    daemon: Daemon
    data: Path

    @property
    def address(self) -> str:
        return self.daemon.address

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def base(self) -> str:
        return f"{'https' if TLS else 'http'}://{self.address}"

    def link_url(self, port: int | None = None) -> str:
        return f"{'wss' if TLS else 'ws'}://127.0.0.1:{port or self.port}"

    @property
    def ca(self) -> Path:
        return self.data / "ca.pem"

    def verify(self) -> ssl.SSLContext | bool:
        from cpm.tls import client_ssl_context

        return client_ssl_context(ca_file=self.ca) if TLS else False

    def space_url(self, space: str = SPACE) -> str:
        return f"{self.base}/api/v1/space/{space}/api/v1"


@contextlib.contextmanager
def manager(root: Path, *args: str) -> Iterator[Manager]:
    data = root / "cpm"
    data.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cpm.main", "serve", "-P", "0", "--data-dir", str(data), "-L", "warn"]
    if not TLS:
        command.append("--no-tls")
    with daemon([*command, *args], root / "cpm.log") as d:
        yield Manager(d, data)


@contextlib.contextmanager
def linked_hub(
    root: Path,
    mgr: Manager,
    join_token: str,
    *args: str,
    link_port: int | None = None,
    fast_retry: bool = False,
) -> Iterator[Daemon]:
    data = root / "hub"
    data.mkdir(parents=True, exist_ok=True)
    head = ["-c", FAST_RETRY_STH] if fast_retry else ["-m", "agent.main"]
    command = [sys.executable, *head, "-P", "0", "-D", str(data / "sequences"), "-L", "warn"]
    command += ["--end-instances-on-exit"]  # nothing of a run outlives it
    command += ["--data-dir", str(data), "--cpm-url", mgr.link_url(link_port), "--space", SPACE]
    command += ["--join-token", join_token, *args]
    if TLS:
        command += ["--cpm-ca", str(mgr.ca)]
    with daemon(command, root / "hub.log") as d:
        yield d


@dataclass
class Linked:
    """A manager, one hub joined to it, and the URLs to reach the hub directly and through the Space."""

    mgr: Manager
    hub: Daemon
    hub_id: str
    token: str

    @property
    def direct(self) -> str:
        return f"http://{self.hub.address}/api/v1"

    @property
    def space(self) -> str:
        return self.mgr.space_url()

    @property
    def through(self) -> str:
        return f"{self.space}/sth/{self.hub_id}/api/v1"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def space_client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(verify=self.mgr.verify(), headers=self.auth, timeout=60, **kwargs)


def setup_space(data: Path) -> tuple[str, str]:
    """Space ``demo`` (the CLI, as an operator would); its API token and a join token."""
    cpm_cli(data, "space", "create", SPACE)
    return cpm_cli(data, "token", "create", "--space", SPACE), cpm_cli(
        data, "join-token", "create", "--space", SPACE, "--ttl", "86400"
    )


def wait_linked(mgr: Manager, token: str, timeout: float = 60) -> str:
    """The id of the (one) hub once the Space lists it connected and healthy."""
    deadline = time.monotonic() + timeout
    with httpx.Client(verify=mgr.verify(), headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:
        while time.monotonic() < deadline:
            for record in c.get(f"{mgr.space_url()}/list").json():
                if record["isConnectionActive"] and record["healthy"]:
                    return str(record["id"])
            time.sleep(0.2)
    raise TimeoutError("the hub did not link within the timeout")


@contextlib.contextmanager
def linked(*, via_proxy: bool = False) -> Iterator[tuple[Linked, Proxy | None]]:
    with tempfile.TemporaryDirectory(prefix="spacehub-bench-link-") as tmp:
        root = Path(tmp)
        data = root / "cpm"
        data.mkdir()
        token, join = setup_space(data)
        with manager(root, "--heartbeat-interval", "10") as mgr:
            proxy = Proxy(mgr.port) if via_proxy else None
            try:
                port = proxy.start() if proxy is not None else None
                args = ("--instance-lifetime", SOAK_LIFETIME) if via_proxy else ()
                with linked_hub(root, mgr, join, *args, link_port=port, fast_retry=via_proxy) as hub:
                    try:
                        hub_id = wait_linked(mgr, token)
                    except TimeoutError:
                        logs = f"hub log:\n{hub.tail()}\ncpm log:\n{mgr.daemon.tail()}"
                        raise SystemExit(f"the hub did not link; {logs}") from None
                    yield Linked(mgr, hub, hub_id, token), proxy
            finally:
                if proxy is not None:
                    proxy.stop()


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def own_cpu_seconds() -> float:
    """This process's CPU: the benchmark's own clients (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def floor_server(mgr: Manager, tls: bool = TLS) -> Iterator[Daemon]:
    """``bench.floor``: hypercorn serving nothing of ours; with ``tls``, the manager's certificate."""
    command = [sys.executable, "-m", "bench.floor"]
    if tls:
        command.append(str(mgr.data))
    with daemon(command, mgr.data.parent / f"floor-{'tls' if tls else 'plain'}.log") as d:
        yield d


def floor_base(server: Daemon, tls: bool = TLS) -> str:
    return f"{'https' if tls else 'http'}://{server.address}"


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss / MB)


# -- throughput ------------------------------------------------------------------------------------


def _blocks(total: int) -> Iterator[bytes]:
    block = os.urandom(MB)
    for _ in range(total // MB):
        yield block


def pump(writer: httpx.Client, post_url: str, reader: httpx.Client, get_url: str, total: int) -> float:
    """POST ``total`` bytes to post_url while reading get_url; MB/s (the digests must match)."""
    sent = hashlib.sha256()
    got = hashlib.sha256()
    received = 0
    ready = threading.Event()
    failure: list[str] = []

    def read() -> None:
        nonlocal received
        try:
            with reader.stream("GET", get_url, headers=OCTET) as response:
                if response.status_code != 200:
                    failure.append(f"GET {get_url}: {response.status_code}")
                    return
                ready.set()
                for chunk in response.iter_bytes(256 * 1024):
                    got.update(chunk)
                    received += len(chunk)
                    if received >= total:
                        break
        except httpx.HTTPError as exc:
            failure.append(f"GET {get_url}: {exc!r}")
        finally:
            ready.set()

    def body() -> Iterator[bytes]:
        for chunk in _blocks(total):
            sent.update(chunk)
            yield chunk

    thread = threading.Thread(target=read)
    began = time.perf_counter()
    thread.start()
    ready.wait(30)
    if not failure:
        response = writer.post(post_url, content=body(), headers=OCTET, timeout=600)
        if response.status_code >= 300:
            failure.append(f"POST {post_url}: {response.status_code} {response.text[:200]}")
    thread.join(600)
    elapsed = time.perf_counter() - began
    if failure:
        raise SystemExit("; ".join(failure))
    if received != total or sent.hexdigest() != got.hexdigest():
        raise SystemExit(f"checksum mismatch on {get_url}: got {received} of {total} bytes")
    return total / MB / elapsed


def read_all(client: httpx.Client, url: str) -> int:
    received = 0
    with client.stream("GET", url) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes(256 * 1024):
            received += len(chunk)
    return received


def bench_throughput() -> None:
    total = TOTAL_MB * MB
    gb = total / 1024 / MB
    direct: list[float] = []
    link: list[float] = []
    cpm_cpu: list[float] = []
    hub_cpu: list[float] = []
    chain_direct: list[float] = []
    chain_link: list[float] = []
    floors: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    with (
        linked() as (env, _),
        floor_server(env.mgr, tls=True) as tls_floor,
        floor_server(env.mgr, tls=False) as plain_floor,
        httpx.Client(timeout=60) as hub_client,
        env.space_client() as space_client,
    ):
        for run in range(RUNS):
            hub0, own0 = cpu_seconds(env.hub.pid), own_cpu_seconds()
            direct.append(
                pump(
                    hub_client, f"{env.direct}/topic/d{run}", hub_client, f"{env.direct}/topic/d{run}", total
                )
            )
            chain_direct.append((cpu_seconds(env.hub.pid) - hub0 + own_cpu_seconds() - own0) / gb)
            cpm0, hub0, own0 = cpu_seconds(env.mgr.daemon.pid), cpu_seconds(env.hub.pid), own_cpu_seconds()
            link.append(
                pump(
                    hub_client,
                    f"{env.direct}/topic/l{run}",
                    space_client,
                    f"{env.through}/topic/l{run}",
                    total,
                )
            )
            cpm_cpu.append((cpu_seconds(env.mgr.daemon.pid) - cpm0) / gb)
            hub_cpu.append((cpu_seconds(env.hub.pid) - hub0) / gb)
            chain_link.append(cpm_cpu[-1] + hub_cpu[-1] + (own_cpu_seconds() - own0) / gb)
            for tls, floor in ((True, tls_floor), (False, plain_floor)):
                with httpx.Client(verify=env.mgr.verify() if tls else False, timeout=60) as client:
                    floor0, own0 = cpu_seconds(floor.pid), own_cpu_seconds()
                    if read_all(client, f"{floor_base(floor, tls)}/stream?{total}") != total:
                        raise SystemExit("the floor server sent short")
                    floors[tls][0].append((cpu_seconds(floor.pid) - floor0) / gb)
                    floors[tls][1].append((own_cpu_seconds() - own0) / gb)
    ratio = [100 * a / b for a, b in zip(link, direct, strict=True)]
    base = f"direct {summary(direct)['median']} MB/s"
    twice = f"50 % needs <= {2 * summary(chain_direct)['median']:.2f}"
    scheme = "TLS" if TLS else "plain"
    # A relay that cost nothing itself would still add what this chain adds: the hub sends over
    # the manager's scheme instead of plain HTTP, the reader reads the manager's scheme, and the
    # manager reads one stream and sends one (floor servers and clients stand in for each).
    send = {tls: summary(floors[tls][0])["median"] for tls in (True, False)}
    read = {tls: summary(floors[tls][1])["median"] for tls in (True, False)}
    floor_chain = [
        chain + (send[TLS] - send[False]) + (read[TLS] - read[False]) + send[TLS] + read[TLS]
        for chain in chain_direct
    ]
    report(
        f"link throughput ({TOTAL_MB} MB topic read, {scheme} manager)",
        [
            ("topic GET through the Space (MB/s)", summary(link), base, ">= 100"),
            ("through the Space / direct (%)", summary(ratio), base, ">= 50 %"),
            ("topic GET direct from the hub (MB/s)", summary(direct), "", ""),
            ("cpm CPU per GB through the link (s)", summary(cpm_cpu), "", ""),
            ("hub CPU per GB through the link (s)", summary(hub_cpu), "direct run not counted", ""),
            ("all CPU per GB, direct: hub, clients (s)", summary(chain_direct), "", ""),
            ("all CPU per GB, Space: cpm, hub, clients (s)", summary(chain_link), twice, ""),
            (
                "all CPU per GB, a relay costing nothing (s)",
                summary(floor_chain),
                "estimate from the floors",
                "",
            ),
            ("floor: hypercorn TLS sending, per GB (s)", summary(floors[True][0]), "nothing of ours", ""),
            ("floor: httpx TLS reading it, per GB (s)", summary(floors[True][1]), "", ""),
            ("floor: hypercorn plain sending, per GB (s)", summary(floors[False][0]), "nothing of ours", ""),
            ("floor: httpx plain reading it, per GB (s)", summary(floors[False][1]), "", ""),
        ],
    )


# -- latency ---------------------------------------------------------------------------------------


async def hammer(
    url: str,
    n: int,
    concurrency: int,
    verify: ssl.SSLContext | bool,
    headers: dict[str, str],
    rate: float | None = None,
) -> tuple[list[float], int]:
    """``n`` GETs of ``url`` from ``concurrency`` keep-alive clients; latencies (ms) and failures.

    Closed loop by default: each client sends its next call as soon as the last one is answered.
    With ``rate`` (calls per second, all clients together), call ``i`` is due at ``start + i / rate``
    and its latency counts from then, so a call held back because every client was busy still
    shows its wait (open loop, no coordinated omission).
    """
    times: list[float] = []
    errors = 0
    todo = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(verify=verify, headers=headers, timeout=30, limits=limits) as client:
        start = time.perf_counter()

        async def one() -> None:
            nonlocal errors
            for i in todo:
                began = time.perf_counter()
                if rate is not None:
                    began = start + i / rate
                    await trio.sleep(max(0.0, began - time.perf_counter()))
                try:
                    response = await client.get(url)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    times.append((time.perf_counter() - began) * 1000)
                else:
                    errors += 1

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(one)
    return times, errors


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def timed_hammer(
    url: str, verify: ssl.SSLContext | bool, headers: dict[str, str], pids: list[int]
) -> tuple[list[float], int, list[float]]:
    """A closed-loop :func:`hammer` run: latencies, failures, and the CPU ms per call of each of
    ``pids`` and then of this process (the clients)."""
    before = [cpu_seconds(pid) for pid in pids] + [own_cpu_seconds()]
    times, errors = trio.run(hammer, url, CALLS, CONCURRENCY, verify, headers)
    after = [cpu_seconds(pid) for pid in pids] + [own_cpu_seconds()]
    return times, errors, [1000 * (b - a) / CALLS for a, b in zip(before, after, strict=True)]


def bench_latency() -> None:
    keys = ("d50", "d99", "s50", "s99", "a50", "a99", "pa50", "pa99", "pd50")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in ("direct", "space", "cpm", "floor", "floor_client")}
    errors = 0
    with linked() as (env, _), floor_server(env.mgr) as floor:
        verify = env.mgr.verify()
        direct_url, space_url = f"{env.direct}/version", f"{env.through}/version"
        floor_url = f"{floor_base(floor)}/version"
        trio.run(hammer, direct_url, CONCURRENCY * 4, CONCURRENCY, False, {})  # warm-up
        trio.run(hammer, space_url, CONCURRENCY * 4, CONCURRENCY, verify, env.auth)
        # The target's closed-loop runs first and alone, alternating as in every earlier session,
        # so that nothing else run in between can move their (noisy) p99.
        for _ in range(RUNS):
            direct, e1, direct_cpu = timed_hammer(direct_url, False, {}, [env.hub.pid])
            space, e2, space_cpu = timed_hammer(
                space_url, verify, env.auth, [env.mgr.daemon.pid, env.hub.pid]
            )
            cpu["cpm"].append(space_cpu[0])
            cpu["direct"].append(sum(direct_cpu))
            cpu["space"].append(sum(space_cpu))
            errors += e1 + e2
            d50, d99, s50, s99 = statistics.median(direct), p99(direct), statistics.median(space), p99(space)
            for key, value in zip(keys[:6], (d50, d99, s50, s99, s50 - d50, s99 - d99), strict=True):
                rows[key].append(value)
        trio.run(hammer, floor_url, CONCURRENCY * 4, CONCURRENCY, verify, env.auth)
        for _ in range(RUNS):
            _, e3, (floor_cpu, floor_client_cpu) = timed_hammer(floor_url, verify, env.auth, [floor.pid])
            cpu["floor"].append(floor_cpu)
            cpu["floor_client"].append(floor_client_cpu)
            errors += e3
        for _ in range(RUNS):
            paced_direct, e4 = trio.run(hammer, direct_url, CALLS, CONCURRENCY, False, {}, PACED_RATE)
            paced_space, e5 = trio.run(hammer, space_url, CALLS, CONCURRENCY, verify, env.auth, PACED_RATE)
            errors += e4 + e5
            pd50, ps50 = statistics.median(paced_direct), statistics.median(paced_space)
            pa99 = p99(paced_space) - p99(paced_direct)
            for key, value in zip(keys[6:], (ps50 - pd50, pa99, pd50), strict=True):
                rows[key].append(value)
    base = f"direct p50 {summary(rows['d50'])['median']}, p99 {summary(rows['d99'])['median']}"
    # Closed loop on saturated cores, p50 grows in step with the CPU each call costs; the direct
    # run gives the ratio, and so roughly the CPU per call at which the Space would add 5 ms.
    d50, direct_cpu = summary(rows["d50"])["median"], summary(cpu["direct"])["median"]
    budget = direct_cpu * (d50 + 5) / d50
    scheme = "TLS" if TLS else "plain"
    report(
        f"link latency (GET /version, {CONCURRENCY} concurrent clients, {CALLS} calls per run)",
        [
            ("added p50 through the Space (ms)", summary(rows["a50"]), base, "<= 5"),
            ("added p99 through the Space (ms)", summary(rows["a99"]), base, "<= 25"),
            ("p50 through the Space (ms)", summary(rows["s50"]), "", ""),
            ("p99 through the Space (ms)", summary(rows["s99"]), "", ""),
            (
                f"added p50, paced {PACED_RATE:g} calls/s (ms)",
                summary(rows["pa50"]),
                f"direct paced p50 {summary(rows['pd50'])['median']}",
                "",
            ),
            (f"added p99, paced {PACED_RATE:g} calls/s (ms)", summary(rows["pa99"]), "", ""),
            ("CPU per call, direct: hub, client (ms)", summary(cpu["direct"]), "", ""),
            (
                "CPU per call, Space: cpm, hub, client (ms)",
                summary(cpu["space"]),
                f"+5 ms p50 ~ {budget:.2f}",
                "",
            ),
            ("cpm CPU per call (ms)", summary(cpu["cpm"]), "", ""),
            (f"floor: hypercorn {scheme}, CPU per call (ms)", summary(cpu["floor"]), "nothing of ours", ""),
            (f"floor: httpx {scheme} client per call (ms)", summary(cpu["floor_client"]), "", ""),
            ("failed calls (all runs)", errors, "", "0"),
        ],
    )


# -- fleet -----------------------------------------------------------------------------------------

#: What a simulated hub reports in its heartbeats: the shape of a real /load-check, fixed.
SIM_LOAD = {
    "avgLoad": 0.12,
    "currentLoad": 3.5,
    "memFree": 3_000_000_000,
    "memUsed": 1_000_000_000,
    "fsSize": [
        {
            "fs": "/dev/sda1",
            "type": "ext4",
            "size": 100_000_000_000,
            "used": 40_000_000_000,
            "available": 60_000_000_000,
            "use": 40.0,
            "mount": "/",
        }
    ],
}


async def _sim_app(scope: Any, receive: Any, send: Any) -> None:
    """The simulated hub's API: every route answers a small JSON body."""
    body = json.dumps({"service": "@scramjet/host", "simulated": True}).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


@dataclass
class FleetStats:
    connected: int = 0
    joined: int = 0
    refused: int = 0
    drops: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def _serve_sim(connection: Any, transport: Any, interval: float, answer_pings: bool) -> None:
    """A simulated hub's session: heartbeats every ``interval`` +- 10 %, streams answered, and
    pongs unless the welcome said ``"answerPings": false`` (as LinkClient)."""
    from spacehub.protocol.control import Heartbeat, Ping, Pong, parse
    from spacehub.server.link import LinkClosed, LinkSession, serve_asgi

    async def on_control(raw: dict[str, Any]) -> None:
        message = parse(raw)
        if isinstance(message, Ping) and answer_pings:
            await session.send_control(Pong(message.nonce))

    async def on_stream(stream: Any) -> None:
        await serve_asgi(stream, _sim_app)

    session = LinkSession(connection, transport, on_stream=on_stream, on_control=on_control)

    async def heartbeats() -> None:
        with contextlib.suppress(LinkClosed):
            while True:
                summary = {"sequences": [], "instances": [], "topics": []}
                sent = int(time.time() * 1000)
                await session.send_control(Heartbeat(SIM_LOAD, summary, sent))
                await trio.sleep(interval * random.uniform(0.9, 1.1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeats)
        await session.run()
        nursery.cancel_scope.cancel()


async def _sim_hub(
    config: dict[str, Any],
    token: str,
    context: ssl.SSLContext | None,
    limiter: trio.Semaphore,
    stats: FleetStats,
    first: int = 0,
) -> None:
    """One simulated hub: LinkClient's dial, join/auth and session, with its own Ed25519 key.
    With several manager URLs (replicas), it starts at ``first`` and, as LinkClient, dials
    the next one after every failed attempt or lost link."""

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from websockets.trio.client import connect

    from agent.link.client import CLOSE_TIMEOUT, MAX_MESSAGE
    from spacehub.protocol.auth import challenge_payload
    from spacehub.protocol.control import (
        Auth,
        Challenge,
        ControlMessage,
        Conversation,
        Join,
        Refused,
        Role,
        Welcome,
    )
    from spacehub.protocol.link import ControlReceived, LinkConnection
    from spacehub.server.keys import public_key_bytes, sign_challenge
    from spacehub.server.link import WebsocketsTransport

    key = Ed25519PrivateKey.generate()
    space = config["space"]
    hub_id: str | None = None
    attempt = 0
    urls: list[str] = config.get("urls") or [config["url"]]
    turn = first

    async def control(transport: Any, connection: LinkConnection) -> ControlMessage:
        events = connection.receive_message(await transport.receive())
        if len(events) != 1 or not isinstance(events[0], ControlReceived):
            raise RuntimeError("not a control message")
        return conversation.received(events[0].message)

    while True:
        welcomed = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with limiter:
                    websocket = await stack.enter_async_context(
                        connect(
                            urls[turn % len(urls)] + "/api/v1/link",
                            ssl=context,
                            ping_interval=None,  # as LinkClient: the manager's pings prove the link
                            close_timeout=CLOSE_TIMEOUT,
                            open_timeout=30,
                            max_size=MAX_MESSAGE,
                            compression=None,
                            proxy=None,
                        )
                    )
                    transport = WebsocketsTransport(websocket)
                    connection = LinkConnection("hub")
                    conversation = Conversation(Role.HUB)
                    with trio.fail_after(30):
                        challenge = await control(transport, connection)
                        assert isinstance(challenge, Challenge)
                        signature = sign_challenge(
                            key, challenge_payload(challenge.nonce, hub_id or "", space)
                        )
                        answer = (
                            Join(
                                space=space,
                                join_token=token,
                                public_key=public_key_bytes(key),
                                signature=signature,
                                description="simulated",
                                tags=("bench",),
                                version="bench",
                            )
                            if hub_id is None
                            else Auth(space=space, hub_id=hub_id, signature=signature, version="bench")
                        )
                        await transport.send(connection.send_control(conversation.send(answer)))
                        reply = await control(transport, connection)
                    if not isinstance(reply, Welcome):
                        code = reply.code if isinstance(reply, Refused) else reply.type
                        stats.refused += 1
                        stats.errors[code] = stats.errors.get(code, 0) + 1
                        return
                if hub_id is None:
                    stats.joined += 1
                hub_id = reply.hub_id
                interval = reply.heartbeat_interval or 10.0
                welcomed = True
                attempt = 0
                stats.connected += 1
                try:
                    await _serve_sim(connection, transport, interval, reply.answer_pings)
                finally:
                    stats.connected -= 1
                    stats.drops += 1
        except Exception as exc:  # noqa: BLE001 - a simulated hub retries like a real one
            name = type(exc).__name__
            stats.errors[name] = stats.errors.get(name, 0) + 1
        if not welcomed:
            attempt += 1
        turn += random.randrange(1, len(urls)) if len(urls) > 1 else 0  # as LinkClient: another, at random
        await trio.sleep(random.uniform(0, min(10.0, 2.0**attempt)))


async def _fleet_worker(config: dict[str, Any]) -> None:
    from cpm.tls import client_ssl_context

    context = client_ssl_context(ca_file=config["ca"]) if config["ca"] else None
    stats = FleetStats()
    limiter = trio.Semaphore(int(config.get("dial_concurrency", 32)))

    async def progress() -> None:
        while True:
            line = {
                "connected": stats.connected,
                "joined": stats.joined,
                "refused": stats.refused,
                "drops": stats.drops,
                "errors": stats.errors,
            }
            print(json.dumps(line), flush=True)
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(progress)
        for index, token in enumerate(config["tokens"]):
            nursery.start_soon(
                _sim_hub, config, token, context, limiter, stats, config.get("first", 0) + index
            )


def fleet_worker_main(path: str) -> None:
    raise_fd_limit()
    config = json.loads(Path(path).read_text())
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_fleet_worker, config)


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    last: dict[str, Any] = field(default_factory=dict)

    def follow(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                self.last = json.loads(line)


def start_workers(
    root: Path, mgr: Manager, space: str, tokens: list[str], urls: list[str] | None = None
) -> list[Worker]:
    """``WORKERS`` processes running the simulated hubs of ``tokens`` (split evenly); with
    ``urls`` (replicas), the hubs start spread over them and move on when one fails."""
    workers = []
    for index in range(WORKERS):
        config = {
            "url": mgr.link_url(),
            "urls": urls or [],
            "first": index,
            "ca": str(mgr.ca) if TLS else "",
            "space": space,
            "tokens": tokens[index::WORKERS],
            "dial_concurrency": DIAL_CONCURRENCY,
        }
        path = root / f"worker{index}.json"
        path.write_text(json.dumps(config))
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.link", "_worker", str(path)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=_env(),
            cwd=ROOT,
            preexec_fn=raise_fd_limit,
        )
        worker = Worker(process)
        threading.Thread(target=worker.follow, daemon=True).start()
        workers.append(worker)
    return workers


def fleet_one(n: int) -> tuple[list[tuple[str, Any, str, str]], dict[str, Any]]:
    from cpm.registry import Registry

    with tempfile.TemporaryDirectory(prefix="spacehub-bench-fleet-") as tmp:
        root = Path(tmp)
        data = root / "cpm"
        data.mkdir()
        with Registry(data / "registry.sqlite3") as registry:
            registry.create_space("fleet")
            api_token = registry.create_api_token("fleet")
            tokens = [registry.create_join_token("fleet", 86400) for _ in range(n)]
        args = ("--heartbeat-interval", f"{HEARTBEAT:g}", "--ping-interval", f"{HEARTBEAT:g}")
        with manager(root, *args) as mgr:
            time.sleep(3.0)
            proc = psutil.Process(mgr.daemon.pid)
            idle_rss = proc.memory_info().rss
            idle_fds = proc.num_fds()
            workers: list[Worker] = []
            try:
                began = time.monotonic()
                workers += start_workers(root, mgr, "fleet", tokens)

                def connected() -> int:
                    return sum(int(w.last.get("connected", 0)) for w in workers)

                deadline = began + 120 + n / 10
                while connected() < n and time.monotonic() < deadline:
                    if any(w.process.poll() is not None for w in workers):
                        raise SystemExit(f"a fleet worker died; cpm log:\n{mgr.daemon.tail()}")
                    time.sleep(0.5)
                ramp = time.monotonic() - began
                reached = connected()
                if reached < n:
                    print(f"fleet: only {reached} of {n} hubs connected after {ramp:.0f} s", file=sys.stderr)
                # Steady state: every hub has sent its first heartbeat and had a ping since.
                time.sleep(HEARTBEAT + 2)
                samples: list[float] = []
                worker_cpu: list[float] = []
                parts = 3
                for _ in range(parts):
                    w0 = sum(cpu_seconds(w.process.pid) for w in workers)
                    c0, t0 = cpu_seconds(mgr.daemon.pid), time.monotonic()
                    time.sleep(WINDOW / parts)
                    elapsed = time.monotonic() - t0
                    samples.append(100 * (cpu_seconds(mgr.daemon.pid) - c0) / elapsed)
                    worker_cpu.append(100 * (sum(cpu_seconds(w.process.pid) for w in workers) - w0) / elapsed)
                rss = proc.memory_info().rss
                fds = proc.num_fds()
                still = connected()
                drops = sum(int(w.last.get("drops", 0)) for w in workers)
                with httpx.Client(verify=mgr.verify(), headers={"Authorization": f"Bearer {api_token}"}) as c:
                    listed = c.get(f"{mgr.space_url('fleet')}/list", timeout=60).json()
                healthy = sum(1 for r in listed if r["isConnectionActive"] and r["healthy"])
                errors: dict[str, int] = {}
                for w in workers:
                    for k, v in w.last.get("errors", {}).items():
                        errors[k] = errors.get(k, 0) + int(v)
            finally:
                _stop(mgr.daemon.process)
                for w in workers:
                    w.process.kill()
                    w.process.wait()
    per_hub_kb = (rss - idle_rss) / 1024 / max(1, reached)
    idle_text = f"idle {idle_rss / MB:.1f} MB, {idle_fds} fds"
    rows: list[tuple[str, Any, str, str]] = [
        (
            f"cpm CPU, {n} hubs (% of one core)",
            summary(samples),
            f"{WINDOW:g} s in {parts} parts",
            "< 25 @ 5000",
        ),
        (f"cpm RSS per hub, {n} hubs (KB)", round(per_hub_kb, 1), idle_text, "< 50 KB"),
        (
            f"connected / healthy at end, {n} hubs",
            f"{still} / {healthy}",
            f"{drops} drops; ramp {ramp:.0f} s",
            f"{n}",
        ),
        (f"cpm RSS, fds, {n} hubs", f"{rss / MB:.1f} MB, {fds} fds", idle_text, ""),
        (f"sim workers CPU, {n} hubs (% of one core)", summary(worker_cpu), f"{WORKERS} processes", ""),
    ]
    extra = {"hubs": n, "reached": reached, "ramp_s": round(ramp, 1), "errors": errors}
    return rows, extra


def bench_fleet() -> None:
    raise_fd_limit()
    rows: list[tuple[str, Any, str, str]] = []
    for n in HUBS:
        part, extra = fleet_one(n)
        print(json.dumps({"fleet": extra}), flush=True)
        rows += part
    report(f"fleet (simulated hubs, heartbeat {HEARTBEAT:g} s, {'TLS' if TLS else 'plain'})", rows)


# -- soak ------------------------------------------------------------------------------------------


class Proxy:
    """A TCP forwarder on 127.0.0.1 between the hub and the manager; :meth:`cut` drops every link."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._scopes: set[trio.CancelScope] = set()
        self._token: trio.lowlevel.TrioToken | None = None
        self._main_scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def start(self) -> int:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self.port

    def stop(self) -> None:
        if self._token is not None and self._main_scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._main_scope.cancel, trio_token=self._token)
        self._thread.join(10)

    def cut(self) -> None:
        """Close both sides of every connection now."""
        trio.from_thread.run_sync(self._cut, trio_token=self._token)

    def _cut(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._main_scope:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            self._ready.set()
            await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            self.accepted += 1
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                async with client, upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._copy, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._copy, upstream, client, nursery.cancel_scope)
            except OSError:
                pass
            finally:
                self._scopes.discard(scope)

    @staticmethod
    async def _copy(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some(256 * 1024):
                await sink.send_all(data)
        scope.cancel()


@dataclass
class Footprint:
    rss_mb: float
    fds: int
    threads: int
    children: int

    @classmethod
    def of(cls, pid: int) -> Footprint:
        process = psutil.Process(pid)
        return cls(
            process.memory_info().rss / MB, process.num_fds(), process.num_threads(), len(process.children())
        )

    def text(self) -> str:
        return f"{self.rss_mb:.1f} MB, {self.fds} fds, {self.threads} thr"


def settle(pid: int, seconds: float = 5.0) -> Footprint:
    """The footprint once the process has been quiet for a moment (worker threads idle out)."""
    time.sleep(seconds)
    return Footprint.of(pid)


def _hub_tasks(client: httpx.Client, env: Linked, probes: int = 3) -> int:
    """The hub's Trio task count (its /status), each probe on a fresh connection closed at once.

    The least of a few probes half a second apart: a task that lives for a moment (a heartbeat
    going out, the last probe's connection closing) is not one left behind, which every probe sees.
    """
    counts = []
    for probe_number in range(probes):
        if probe_number:
            time.sleep(0.5)
        with httpx.Client(timeout=30) as probe:
            counts.append(int(probe.get(f"{env.direct}/status").json()["tasks"]))
    return min(counts)


def _link_status(client: httpx.Client, env: Linked) -> dict[str, Any]:
    status: dict[str, Any] = client.get(f"{env.direct}/status").json()["cpm"]
    return status


def bench_soak() -> None:
    total = SOAK_MB * MB
    rows: list[tuple[str, Any, str, str]] = []
    with linked(via_proxy=True) as (env, proxy), httpx.Client(timeout=30) as hub_client:
        assert proxy is not None
        hub, cpm = env.hub.pid, env.mgr.daemon.pid
        with env.space_client() as space:
            # Warm-up: one instance, one topic, a few calls, so lazy imports and caches count as idle.
            sequence = space.post(
                f"{env.through}/sequence", content=python_package(IDENTITY_BYTES), headers=OCTET
            )
            sequence.raise_for_status()
            sequence_id = sequence.json()["id"]

            def instance_pump(size: int) -> float:
                started = space.post(f"{env.through}/sequence/{sequence_id}/start", json={})
                if started.status_code != 200:
                    text = f"{started.status_code} {started.text[:300]}"
                    raise SystemExit(f"instance start failed: {text}\nhub log:\n{env.hub.tail()}")
                instance = f"{env.through}/instance/{started.json()['id']}"
                return pump(space, f"{instance}/input", space, f"{instance}/output", size)

            instance_pump(4 * MB)
            pump(space, f"{env.through}/topic/warm", space, f"{env.through}/topic/warm", 4 * MB)
            trio.run(hammer, f"{env.through}/version", 200, CONCURRENCY, env.mgr.verify(), env.auth)
            idle, cpm_idle = settle(hub, 12.0), Footprint.of(cpm)
            tasks = {"idle": _hub_tasks(hub_client, env)}

            # 1. SOAK_MB through the link: half through instances (in and out), half through topics.
            began = time.perf_counter()
            chunk = max(MB, total // 8)
            for _ in range(max(1, (total // 2) // chunk)):
                instance_pump(chunk)
            for n in range(max(1, (total // 2) // chunk)):
                pump(space, f"{env.through}/topic/soak{n}", space, f"{env.through}/topic/soak{n}", chunk)
            stream_s = time.perf_counter() - began
            streamed = settle(hub, 12.0)
            tasks["streamed"] = _hub_tasks(hub_client, env)

        # 2. DROPS link drops: cut every TCP connection between hub and manager, wait for the relink.
        began = time.perf_counter()
        relink: list[float] = []
        for n in range(DROPS):
            before = _link_status(hub_client, env).get("lastConnected")
            cut_at = time.perf_counter()
            proxy.cut()
            deadline = time.monotonic() + 60
            while True:
                status = _link_status(hub_client, env)
                if status.get("state") == "connected" and status.get("lastConnected") != before:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"drop {n}: the hub did not relink: {status}\n{env.hub.tail()}")
                time.sleep(0.005)
            relink.append((time.perf_counter() - cut_at) * 1000)
        drops_s = time.perf_counter() - began
        dropped = settle(hub, 12.0)
        tasks["dropped"] = _hub_tasks(hub_client, env)

        # 3. SOAK_CALLS calls through the link (the Space may need a moment to see the last relink).
        wait_linked(env.mgr, env.token)
        began = time.perf_counter()
        times, errors = trio.run(
            hammer, f"{env.through}/version", SOAK_CALLS, CONCURRENCY, env.mgr.verify(), env.auth
        )
        calls_s = time.perf_counter() - began
        final, cpm_final = settle(hub, 12.0), Footprint.of(cpm)
        tasks["final"] = _hub_tasks(hub_client, env)
        links = proxy.accepted

    def grew(after: Footprint) -> str:
        rss, fds, threads = after.rss_mb - idle.rss_mb, after.fds - idle.fds, after.threads - idle.threads
        return f"{rss:+.1f} MB, fds {fds:+d}, thr {threads:+d}"

    rows = [
        ("hub idle (linked, warmed up)", idle.text(), f"{idle.children} child processes", ""),
        (f"hub after {SOAK_MB} MB through the link", streamed.text(), grew(streamed), "<= idle + 10 MB"),
        (f"hub after {DROPS} link drops", dropped.text(), grew(dropped), "<= idle + 10 MB"),
        (f"hub after {SOAK_CALLS} calls", final.text(), grew(final), "fds back to idle"),
        ("hub RSS growth, end - idle (MB)", round(final.rss_mb - idle.rss_mb, 1), "", "<= 10"),
        ("hub fd growth, end - idle", final.fds - idle.fds, f"child processes {final.children}", "0"),
        (
            "hub Trio tasks: idle, after streaming, drops, calls",
            " / ".join(str(tasks[k]) for k in ("idle", "streamed", "dropped", "final")),
            f"end - idle {tasks['final'] - tasks['idle']:+d}",
            "back to start",
        ),
        ("relink after a drop (ms)", summary(relink) if relink else "-", f"{links} TCP links in all", ""),
        ("cpm idle -> end", f"{cpm_idle.text()} -> {cpm_final.text()}", "", ""),
        ("failed calls", errors, f"{SOAK_CALLS} calls in {calls_s:.1f} s", "0"),
        ("phase times (s)", f"stream {stream_s:.1f}, drops {drops_s:.1f}, calls {calls_s:.1f}", "", ""),
    ]
    if times:
        rows.append(
            ("call latency p50 / p99 (ms)", f"{statistics.median(times):.2f} / {p99(times):.2f}", "", "")
        )
    report(f"soak ({SOAK_MB} MB, {DROPS} drops, {SOAK_CALLS} calls; backoff cut to 0-50 ms)", rows)


PARTS = {
    "throughput": bench_throughput,
    "latency": bench_latency,
    "fleet": bench_fleet,
    "soak": bench_soak,
}

if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        fleet_worker_main(sys.argv[2])
        sys.exit(0)
    for name in sys.argv[1:] or list(PARTS):
        if name not in PARTS:
            raise SystemExit(f"unknown part {name!r}; parts: {', '.join(PARTS)}")
        PARTS[name]()
