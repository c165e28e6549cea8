"""A whole local Space in one command: a `cpm` with a Space and a token, and one
`sth` joined to it over the link (wss with the manager's own CA, on loopback).

    python -m spacehub.localspace [--dir .local-space] [--cpm-port 9000] [--hub-port 8000]

State lives in ``--dir`` (kept between runs: the Space, its token and the hub's
identity are made once). Prints where to look, then waits; Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

SPACE = "local"
START_TIMEOUT = 30.0
JOIN_TIMEOUT = 30.0


class LaunchError(Exception):
    pass


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    if done.returncode != 0:
        raise LaunchError(f"{' '.join(command[2:])} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def _wait_for_line(
    process: subprocess.Popen[bytes], stream: IO[bytes], marker: bytes, name: str
) -> list[str]:
    """Lines printed by ``process`` until one contains ``marker`` (relayed to our stdout)."""
    lines: list[str] = []
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT
    buffer = b""
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=0.2):
                continue
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                raise LaunchError(f"{name} exited during start-up: {' | '.join(lines[-5:])}")
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                lines.append(raw.decode(errors="replace"))
                if marker in raw:
                    return lines
    finally:
        selector.close()
    raise LaunchError(f"{name} did not start within {START_TIMEOUT:g} s")


def _hub_status(hub_port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{hub_port}/api/v1/status", timeout=2) as response:
        value = json.load(response)
    return value if isinstance(value, dict) else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spacehub-local", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=Path(".local-space"), help="state directory (default .local-space)"
    )
    parser.add_argument("--cpm-port", type=int, default=9000)
    parser.add_argument("--hub-port", type=int, default=8000)
    args = parser.parse_args(argv)
    state: Path = args.dir.resolve()
    cpm_dir, hub_dir = state / "cpm", state / "hub"
    cpm_dir.mkdir(parents=True, exist_ok=True)
    hub_dir.mkdir(parents=True, exist_ok=True)
    cpm = [sys.executable, "-m", "cpm.main"]
    sth = [sys.executable, "-m", "agent.main"]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        if SPACE not in _run([*cpm, "space", "list", "--data-dir", str(cpm_dir)]).split():
            _run([*cpm, "space", "create", SPACE, "--data-dir", str(cpm_dir)])
        token_file = state / "token"
        if not token_file.exists():
            token = _run(
                [
                    *cpm,
                    "token",
                    "create",
                    "--space",
                    SPACE,
                    "--description",
                    "local",
                    "--data-dir",
                    str(cpm_dir),
                ]
            )
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
        token = token_file.read_text().strip()

        manager = subprocess.Popen(
            [*cpm, "serve", "-P", str(args.cpm_port), "--data-dir", str(cpm_dir)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        processes.append(manager)
        assert manager.stdout is not None
        manager_lines = _wait_for_line(manager, manager.stdout, b"Running", "cpm")
        fingerprint = next(
            (line.split(":", 1)[1].strip() for line in manager_lines if "CA fingerprint" in line), ""
        )

        hub_args = [
            *sth,
            "-P",
            str(args.hub_port),
            "--data-dir",
            str(hub_dir),
            "--cpm-url",
            f"wss://127.0.0.1:{args.cpm_port}",
            "--space",
            SPACE,
            "--cpm-ca",
            str(cpm_dir / "ca.pem"),
        ]
        if not (hub_dir / "link.json").exists():
            join_token = _run([*cpm, "join-token", "create", "--space", SPACE, "--data-dir", str(cpm_dir)])
            hub_args += ["--join-token", join_token]
        hub = subprocess.Popen(hub_args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        processes.append(hub)
        assert hub.stdout is not None
        _wait_for_line(hub, hub.stdout, b"Running", "sth")

        deadline = time.monotonic() + JOIN_TIMEOUT
        link: dict[str, object] = {}
        while time.monotonic() < deadline:
            cpm_status = _hub_status(args.hub_port).get("cpm")
            link = cpm_status if isinstance(cpm_status, dict) else {}
            if link.get("connected"):
                break
            time.sleep(0.2)
        else:
            raise LaunchError(f"the hub did not join the Space: {link.get('lastError') or link}")

        space_url = f"https://127.0.0.1:{args.cpm_port}/api/v1/space/{SPACE}/api/v1"
        hub_url = f"{space_url}/sth/{link.get('hubId')}/api/v1"
        ca = cpm_dir / "ca.pem"
        print(
            f"""
Local Space is up.
  Space API    {space_url}
  Token        {token}
  CA           {ca}   (fingerprint {fingerprint})
  Hub          {link.get("hubId")}, its own API on http://127.0.0.1:{args.hub_port}/api/v1
  Try          curl --cacert {ca} -H 'Authorization: Bearer {token}' {space_url}/list
  Through it   curl --cacert {ca} -H 'Authorization: Bearer {token}' {hub_url}/version
  si           si config set apiUrl http://127.0.0.1:{args.hub_port}/api/v1
Ctrl-C stops both.""",
            flush=True,
        )
        # Relay nothing more; wait until either exits or we are interrupted.
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        raise LaunchError("a daemon exited; see its messages above")
    except KeyboardInterrupt:
        print("\nStopping...", flush=True)
        return 0
    except (LaunchError, OSError) as exc:
        print(f"local space: {exc}", file=sys.stderr)
        return 1
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    sys.exit(main())
