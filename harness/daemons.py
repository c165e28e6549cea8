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
def run_sth(
    root: Path, *args: str, timeout: float = 20.0, keep_instances: bool = False
) -> Iterator[HubProcess]:
    """Start the real `sth` on a free port; stop it (SIGTERM) afterwards.

    Its instances end with it unless ``keep_instances`` (then they run on, as under a
    service, for the next hub on ``root``); either way none outlives the test: what
    is left under ``root`` afterwards is ended as ``sth stop-instances`` ends it."""
    extra = [] if keep_instances else ["--end-instances-on-exit"]
    command = [sys.executable, "-m", "agent.main", "-P", "0", "-D", str(root), *extra, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        lines = read_until(process, b"Running", time.monotonic() + timeout)
        address = next(line for line in lines if line.startswith(b"API on ")).split()[-1].decode()
        yield HubProcess(process, address, root)
    finally:
        stop(process)
        if not keep_instances:
            stop_instances(root)


def stop_instances(sequences_root: Path) -> None:
    """End every instance a hub left under ``sequences_root`` (`sth stop-instances`)."""
    state = sequences_root / ".state"
    if not state.is_dir() or not any(p.is_dir() for p in state.iterdir()):
        return
    subprocess.run(
        [sys.executable, "-m", "agent.main", "stop-instances", "-D", str(sequences_root), "--grace", "2"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=60,
        check=False,
    )


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
