"""Start the real `sth` as a user would, for tests and benchmarks alike."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class HubProcess:
    process: subprocess.Popen[bytes]
    address: str
    root: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}/api/v1"

    def alive(self) -> bool:
        return self.process.poll() is None


def read_until(process: subprocess.Popen[bytes], pattern: bytes, deadline: float) -> list[bytes]:
    assert process.stdout is not None
    lines: list[bytes] = []
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"sth exited early: {b''.join(lines)!r}")
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                lines.append(line)
                if pattern in line:
                    return lines
        raise TimeoutError(f"sth did not print {pattern!r}: {lines!r}")
    finally:
        selector.close()


@contextmanager
def run_sth(root: Path, *args: str, timeout: float = 20.0) -> Iterator[HubProcess]:
    """Start the real `sth` on a free port; stop it (SIGTERM) afterwards."""
    command = [sys.executable, "-m", "agent.main", "-P", "0", "-D", str(root), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        lines = read_until(process, b"Running", time.monotonic() + timeout)
        address = next(line for line in lines if line.startswith(b"API on ")).split()[-1].decode()
        yield HubProcess(process, address, root)
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM a daemon, SIGKILL it after ``grace`` seconds, and close its stdout."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
