"""A local Space started by the launcher (`make run` or `python -m spacehub.localspace`), as a
user starts it: for the launcher's own tests and for the docs' code blocks."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.helpers import ROOT, _read_until

BANNER_END = b"stops the instances, the hub and the manager"


def free_ports(count: int) -> list[int]:
    """``count`` consecutive free ports (the banner's second hub takes the hub's port + 1)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        if first + count > 65535:
            continue
        if all(port_free(first + i) for i in range(count)):
            return [first + i for i in range(count)]
    raise RuntimeError("no run of free ports")


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _as_background_job() -> None:
    """What a non-interactive shell does to `cmd &`: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class LocalSpace:
    process: subprocess.Popen[bytes]
    banner: str
    state: Path
    cpm_port: int
    hub_port: int

    @property
    def token(self) -> str:
        found = re.search(r"Token\s+(\S+)", self.banner)
        assert found is not None, self.banner
        return found.group(1)

    @property
    def hub_api(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}/api/v1"

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def commands(self, section: str) -> list[str]:
        """The indented command lines under a banner heading (``Try it:``, ``Another hub``)."""
        lines = self.banner.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(section))
        found = []
        for line in lines[start + 1 :]:
            if not line.startswith("  "):
                break
            if not line.startswith("  si is "):
                found.append(line.strip())
        return found


@contextmanager
def local_space(tmp_path: Path, *, via_make: bool) -> Iterator[LocalSpace]:
    cpm_port, hub_port, _spare = free_ports(3)
    state = tmp_path / "space"
    options = ["--dir", str(state), "--cpm-port", str(cpm_port), "--hub-port", str(hub_port)]
    if via_make:
        command = ["make", "--no-print-directory", "run", f"ARGS={shlex.join(options)}"]
    else:
        command = [sys.executable, "-m", "spacehub.localspace", *options]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=_as_background_job,
    )
    try:
        lines = _read_until(process, BANNER_END, time.monotonic() + 90)
        yield LocalSpace(process, b"\n".join(lines).decode(), state, cpm_port, hub_port)
    finally:
        if process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
