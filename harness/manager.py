"""Run the real `cpm` (serve and its admin commands), for tests and benchmarks alike."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .daemons import ROOT, read_until, stop

CPM = [sys.executable, "-m", "cpm.main"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def cpm(data_dir: Path, *args: str, timeout: float = 20.0, check: bool = True) -> str:
    """Run one admin command (`cpm space create demo`, ...) on ``data_dir``; its stdout, stripped."""
    done = subprocess.run(
        [*CPM, *args, "--data-dir", str(data_dir)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env=_env(),
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"cpm {' '.join(args)} exited {done.returncode}: {done.stderr.decode()}")
    return done.stdout.decode().strip()


@dataclass
class ManagerProcess:
    process: subprocess.Popen[bytes]
    address: str
    data_dir: Path
    #: the "CA fingerprint: ..." value `cpm serve` printed
    fingerprint: str
    tls: bool

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    @property
    def link_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.address}"

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "ca.pem"

    def space_url(self, space: str) -> str:
        return f"{self.base}/api/v1/space/{space}/api/v1"

    def alive(self) -> bool:
        return self.process.poll() is None


@contextmanager
def run_cpm(data_dir: Path, *args: str, port: int = 0, timeout: float = 20.0) -> Iterator[ManagerProcess]:
    """Start the real `cpm serve` on 127.0.0.1 (a free port unless ``port``); SIGTERM it afterwards.

    Pass ``--no-tls`` in ``args`` for plain HTTP; by default it serves TLS with its own CA.
    """
    command = [*CPM, "serve", "-P", str(port), "--data-dir", str(data_dir), *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=_env(), cwd=ROOT
    )
    try:
        lines = read_until(process, b"Running", time.monotonic() + timeout)
        address = next(line for line in lines if line.startswith(b"API on ")).split()[-1].decode()
        fingerprint = next(line for line in lines if line.startswith(b"CA fingerprint: "))
        yield ManagerProcess(
            process,
            address,
            data_dir,
            fingerprint.split(b": ", 1)[1].decode(),
            tls="--no-tls" not in args,
        )
    finally:
        stop(process)
