"""End-to-end: the README's first command brings up a local Space (cpm + joined sth)."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.helpers import ROOT, _read_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_local_space_comes_up_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    cpm_port, hub_port = _free_port(), _free_port()
    command = [
        sys.executable,
        "-m",
        "spacehub.localspace",
        "--dir",
        str(tmp_path / "space"),
        "--cpm-port",
        str(cpm_port),
        "--hub-port",
        str(hub_port),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        lines = _read_until(process, b"Ctrl-C stops both", time.monotonic() + 60)
        text = b"\n".join(lines).decode()
        token = re.search(r"Token\s+(\S+)", text)
        assert token is not None, text
        ca = tmp_path / "space" / "cpm" / "ca.pem"
        space = f"https://127.0.0.1:{cpm_port}/api/v1/space/local/api/v1"
        with httpx.Client(
            verify=ssl.create_default_context(cafile=str(ca)),
            headers={"authorization": f"Bearer {token.group(1)}"},
            timeout=10,
        ) as client:
            hubs = client.get(f"{space}/list").json()
            assert len(hubs) == 1 and hubs[0]["isConnectionActive"] is True
            version = client.get(f"{space}/sth/{hubs[0]['id']}/api/v1/version").json()
            assert version["apiVersion"] == "v1"
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 2
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        _gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
