"""Network namespaces for the NAT tests: an ``edge`` behind a masquerading ``router``, and a ``cloud``.

Layout (platform.md §2), with names unique per test run (``sh<pid>-edge`` ...)::

    edge 10.201.1.2 ── 10.201.1.1 router 10.201.2.1 ── 10.201.2.2 cloud
         <p>e0            <p>re          <p>rc              <p>c0

The router masquerades edge → cloud and its forward policy drops everything else, so
the edge can dial the cloud while nothing in the cloud can open a connection to the
edge (the cloud even has a route to the edge subnet: the firewall, not routing, blocks
it). Every address exists only inside these namespaces; nothing here talks to the root
namespace or beyond. Teardown stops every process started inside (by pid) and deletes
the namespaces, which removes their veths and rules, whatever happened in the test.

Processes run inside with ``ip netns exec``; the test process itself stays in the root
namespace, which can reach none of them, so it asks :class:`NsClient` (a small Python
process living in a namespace, answering JSON lines on stdin/stdout) to make HTTP calls
and TCP probes for it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .daemons import ROOT, read_until

PREFIX = f"sh{os.getpid()}"
EDGE_IP, ROUTER_EDGE_IP = "10.201.1.2", "10.201.1.1"
CLOUD_IP, ROUTER_CLOUD_IP = "10.201.2.2", "10.201.2.1"


def netns_unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespace tests need root (CI runs them as root)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install -y iproute2 nftables)"
    probe = f"{PREFIX}-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if done.returncode != 0:
        return f"`ip netns add` fails here: {done.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def sh(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=20, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


#: The helper process run inside a namespace: one JSON request per line in, one answer per line out.
NS_CLIENT = r"""
import base64, json, socket, ssl, sys, time
import httpx

clients = {}

def client(ca):
    if ca not in clients:
        verify = ssl.create_default_context(cafile=ca) if ca else False
        clients[ca] = httpx.Client(verify=verify, trust_env=False)
    return clients[ca]

def handle(req):
    if req["op"] == "tcp":
        started = time.monotonic()
        try:
            socket.create_connection((req["host"], req["port"]), timeout=req["timeout"]).close()
            return {"result": "connected"}
        except socket.timeout:
            return {"result": "timeout", "seconds": time.monotonic() - started}
        except OSError as exc:
            return {"result": "error", "error": f"{type(exc).__name__}: {exc}"}
    body = base64.b64decode(req["body"]) if req.get("body") is not None else None
    try:
        response = client(req.get("ca")).request(
            req["method"], req["url"], content=body, headers=req.get("headers") or {},
            timeout=req["timeout"],
        )
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"status": response.status_code, "body": base64.b64encode(response.content).decode()}

for line in sys.stdin:
    try:
        answer = handle(json.loads(line))
    except Exception as exc:
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"""


@dataclass
class Response:
    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class NsError(Exception):
    """The helper could not make the call (connection failed, timed out, ...)."""


class NsClient:
    """HTTP calls and TCP probes made from inside a namespace (see the module docstring)."""

    def __init__(self, topo: Topology, ns: str) -> None:
        self.ns = ns
        self.process = topo.spawn(ns, [sys.executable, "-c", NS_CLIENT], stdin=subprocess.PIPE)
        self._lock = threading.Lock()

    def _call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        with self._lock:
            process.stdin.write((json.dumps(request) + "\n").encode())
            process.stdin.flush()
            lines = read_until(process, b"}", time.monotonic() + timeout + 10)
        answer: dict[str, Any] = json.loads(lines[-1])
        return answer

    def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        ca: str | None = None,
        timeout: float = 20.0,
    ) -> Response:
        headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["content-type"] = "application/json"
        request = {
            "op": "http",
            "method": method,
            "url": url,
            "headers": headers,
            "body": None if body is None else base64.b64encode(body).decode(),
            "ca": ca,
            "timeout": timeout,
        }
        answer = self._call(request, timeout)
        if "error" in answer:
            raise NsError(answer["error"])
        return Response(answer["status"], base64.b64decode(answer["body"]))

    def get(self, url: str, **kwargs: Any) -> Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Response:
        return self.request("POST", url, **kwargs)

    def tcp_probe(self, host: str, port: int, timeout: float = 3.0) -> dict[str, Any]:
        return self._call({"op": "tcp", "host": host, "port": port, "timeout": timeout}, timeout)


@dataclass
class Topology:
    """The three namespaces, their veths and the router's NAT; processes started inside."""

    edge: str = f"{PREFIX}-edge"
    router: str = f"{PREFIX}-router"
    cloud: str = f"{PREFIX}-cloud"
    edge_if: str = f"{PREFIX}e0"
    router_edge_if: str = f"{PREFIX}re"
    router_cloud_if: str = f"{PREFIX}rc"
    cloud_if: str = f"{PREFIX}c0"
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)
    log_dir: Path | None = None

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.edge, self.router, self.cloud)

    def build(self) -> None:
        for ns in self.namespaces:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.edge_if, "netns", self.edge, "type", "veth", "peer", "name",
           self.router_edge_if, "netns", self.router)  # fmt: skip
        sh("ip", "link", "add", self.cloud_if, "netns", self.cloud, "type", "veth", "peer", "name",
           self.router_cloud_if, "netns", self.router)  # fmt: skip
        for ns, dev, addr in (
            (self.edge, self.edge_if, f"{EDGE_IP}/24"),
            (self.router, self.router_edge_if, f"{ROUTER_EDGE_IP}/24"),
            (self.router, self.router_cloud_if, f"{ROUTER_CLOUD_IP}/24"),
            (self.cloud, self.cloud_if, f"{CLOUD_IP}/24"),
        ):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.edge, "route", "add", "default", "via", ROUTER_EDGE_IP)
        # On purpose: the cloud knows the way to the edge; only the router's firewall blocks it.
        sh("ip", "-n", self.cloud, "route", "add", "10.201.1.0/24", "via", ROUTER_CLOUD_IP)
        sh("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ruleset = f"""
table ip nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat;
    oifname "{self.router_cloud_if}" ip saddr 10.201.1.0/24 masquerade
  }}
}}
table inet filter {{
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "{self.router_edge_if}" oifname "{self.router_cloud_if}" accept
  }}
}}
"""
        sh("ip", "netns", "exec", self.router, "nft", "-f", "-", input=ruleset)

    # -- faults ---------------------------------------------------------------------------

    def link_down(self) -> None:
        sh("ip", "-n", self.router, "link", "set", self.router_cloud_if, "down")

    def link_up(self) -> None:
        sh("ip", "-n", self.router, "link", "set", self.router_cloud_if, "up")

    def drop_all(self) -> None:
        """A silent blackhole in the router: every forwarded packet dropped (a table of its own)."""
        rules = """
table inet cut {
  chain forward {
    type filter hook forward priority -10; policy drop;
  }
}
"""
        sh("ip", "netns", "exec", self.router, "nft", "-f", "-", input=rules)

    def undrop(self) -> None:
        sh("ip", "netns", "exec", self.router, "nft", "delete", "table", "inet", "cut")

    # -- processes ------------------------------------------------------------------------

    def spawn(
        self, ns: str, command: list[str], *, stdin: int = subprocess.DEVNULL, name: str = ""
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` inside ``ns``; stdout piped, stderr to a log file."""
        stderr: IO[bytes] | int = subprocess.DEVNULL
        if self.log_dir is not None and name:
            log = (self.log_dir / f"{name}.log").open("ab")
            self.logs.append(log)
            stderr = log
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, *command],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "PYTHONPATH": str(ROOT), "NO_PROXY": "*"},
            cwd=ROOT,
        )
        self.processes.append(process)
        return process

    def start_daemon(self, ns: str, command: list[str], name: str, timeout: float = 30.0) -> str:
        """Start `sth` or `cpm serve` inside ``ns``; the address it printed after ``API on``."""
        process = self.spawn(ns, command, name=name)
        lines = read_until(process, b"Running", time.monotonic() + timeout)
        address = next(line for line in lines if line.startswith(b"API on ")).split()[-1].decode()
        # Keep reading its stdout so that it can never block on a full pipe.
        threading.Thread(target=_drain, args=(process,), daemon=True).start()
        return address

    def stop_processes(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        # Anything still inside our namespaces was started by this test (instances of the hub).
        for ns in self.namespaces:
            listed = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in listed:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for log in self.logs:
            log.close()

    def destroy(self) -> None:
        try:
            self.stop_processes()
        finally:
            for ns in self.namespaces:
                sh("ip", "netns", "del", ns, check=False)


def _drain(process: subprocess.Popen[bytes]) -> None:
    assert process.stdout is not None
    with contextlib.suppress(OSError, ValueError):
        while process.stdout.read(65536):
            pass
