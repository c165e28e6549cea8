"""A whole local Space in one command: a `cpm` with a Space and a token, and one
`sth` joined to it over the link (wss with the manager's own CA, on loopback).

    python -m spacehub.localspace [--dir .local-space] [--cpm-port 9000] [--hub-port 8000]

State lives in ``--dir`` (kept between runs: the Space, its token and the hub's
identity are made once). Prints where to look, then waits. SIGINT (Ctrl-C), SIGTERM
and SIGHUP stop everything it started: first the hub's instances (through the hub's
API), then the hub, then the manager.

Why the care with signals: started in the background from a script, a process gets
SIGINT ignored, and a launcher killed with SIGKILL runs no clean-up at all. So the
launcher installs its own handlers for all three signals, starts each daemon in a
process group of its own (a Ctrl-C at the terminal reaches the launcher, which stops
them in order, not all at once), and asks the kernel to send each daemon SIGTERM when
the launcher dies, however it dies (``PR_SET_PDEATHSIG``). ``--exit-with-parent``
does the same for the launcher itself: ``make run`` passes it, because make forwards
only SIGTERM to its recipe, not SIGHUP or SIGINT, and nothing when it is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import selectors
import shlex
import signal
import ssl
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final

from spacehub.errors import SpacehubError

SPACE: Final = "local"
START_TIMEOUT: Final = 30.0
JOIN_TIMEOUT: Final = 30.0
#: How long the hub's instances get to end after the launcher kills them (seconds).
INSTANCE_STOP_TIMEOUT: Final = 10.0
#: How long each daemon gets to exit after SIGTERM before SIGKILL (seconds).
DAEMON_STOP_TIMEOUT: Final = 15.0
#: The signals that stop the local Space.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: linux/prctl.h
_PR_SET_PDEATHSIG: Final = 1

_ENDED: Final = frozenset({"completed", "errored"})


class LaunchError(SpacehubError):
    """The local Space could not be brought up; the message says what to do."""


class Stopped(SpacehubError):
    """One of :data:`STOP_SIGNALS` arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, loaded before any fork (a child between fork and exec must not load
    libraries); None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL: Final = _load_prctl()


def _die_with_parent() -> None:
    """In a child between fork and exec: SIGTERM when the process that started it dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def exit_with_parent() -> None:
    """This process gets SIGTERM when its parent dies (and now, if it has died already)."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _on_stop_signal(signum: int, frame: types.FrameType | None) -> None:
    raise Stopped(signum)


def _note_stop_signal(signum: int, frame: types.FrameType | None) -> None:
    """While stopping: a second signal must not cut the clean-up short (it is bounded)."""
    print(f"local space: {signal.Signals(signum).name} again, still stopping", file=sys.stderr, flush=True)


def _set_handlers(handler: Callable[[int, types.FrameType | None], None]) -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def _tool(name: str, module: str) -> list[str]:
    """How to run one of our commands: the console script beside this interpreter (a venv's
    bin/), else the module through this interpreter."""
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", module]


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    if done.returncode != 0:
        shown = " ".join(command[-6:])
        raise LaunchError(f"{shown} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def _spawn(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        # Its own process group: a Ctrl-C at the terminal goes to the launcher only.
        process_group=0,
        preexec_fn=_die_with_parent,
    )


def _wait_for_line(
    process: subprocess.Popen[bytes], stream: IO[bytes], marker: bytes, name: str
) -> list[str]:
    """Lines printed by ``process`` until one contains ``marker``."""
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


def _hub_call(hub_port: int, method: str, path: str, body: Any = None, timeout: float = 5) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{hub_port}/api/v1{path}",
        data=data,
        method=method,
        headers={"content-type": "application/json"} if data is not None else {},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _console_link(cpm_port: int, ca: Path, token: str, timeout: float = 5) -> str | None:
    """A one-time link that signs a browser in to the console (the token stays out of URLs)."""
    request = urllib.request.Request(
        f"https://127.0.0.1:{cpm_port}/api/v1/space/{SPACE}/api/v1/console-login",
        data=b"",
        method="POST",
        headers={"authorization": f"Bearer {token}"},
    )
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            answer = json.load(response)
    except (OSError, ValueError):
        return None  # an older manager: the banner says how to sign in with the token
    return f"https://127.0.0.1:{cpm_port}{answer['path']}"


def _stop_instances(hub_port: int) -> None:
    """Kill every instance the hub runs and wait (bounded) until each has ended: stopping the
    local Space leaves no runner behind, whatever the hub does with instances on its own exit."""
    try:
        listed = _hub_call(hub_port, "GET", "/instances")
    except (OSError, ValueError):
        return  # the hub is gone already
    live = [i["id"] for i in listed if isinstance(i, dict) and i.get("status") not in _ENDED]
    for instance_id in live:
        with contextlib.suppress(OSError, ValueError):
            _hub_call(hub_port, "POST", f"/instance/{instance_id}/_kill", {})
    if live:
        print(f"Stopping {len(live)} instance(s)...", flush=True)
    deadline = time.monotonic() + INSTANCE_STOP_TIMEOUT
    while live and time.monotonic() < deadline:
        still = []
        for instance_id in live:
            try:
                status = _hub_call(hub_port, "GET", f"/instance/{instance_id}").get("status")
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    continue  # ended and forgotten
                still.append(instance_id)
                continue
            except (OSError, ValueError):
                return
            if status not in _ENDED:
                still.append(instance_id)
        live = still
        if live:
            time.sleep(0.1)


def _stop_daemons(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=DAEMON_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def _banner(
    *,
    state: Path,
    cpm_dir: Path,
    hub_dir: Path,
    token: str,
    fingerprint: str,
    hub_id: str,
    cpm_port: int,
    hub_port: int,
    console_link: str | None,
) -> str:
    q = shlex.quote
    space_url = f"https://127.0.0.1:{cpm_port}/api/v1/space/{SPACE}/api/v1"
    hub_api = f"http://127.0.0.1:{hub_port}/api/v1"
    ca = cpm_dir / "ca.pem"
    si = " ".join(map(q, _tool("si", "spacehub.cli.main")))
    sth = " ".join(map(q, _tool("sth", "agent.main")))
    cpm = " ".join(map(q, _tool("cpm", "cpm.main")))
    bin_dir = Path(sys.executable).parent
    activate = bin_dir / "activate"
    on_path = (
        f"(or `source {q(str(activate))}` once, then just `si`)"
        if activate.is_file()
        else "(si is this Python's module spacehub.cli.main)"
    )
    curl = f"curl --cacert {q(str(ca))} -H {q('Authorization: Bearer ' + token)}"
    next_port = hub_port + 1
    join = (
        f"{sth} -P {next_port} --data-dir {q(str(state / 'hub-2'))} --cpm-url wss://127.0.0.1:{cpm_port} "
        f"--space {SPACE} --cpm-ca {q(str(ca))} "
        f'--join-token "$({cpm} join-token create --space {SPACE} --data-dir {q(str(cpm_dir))})"'
    )
    console = f"https://127.0.0.1:{cpm_port}/console/"
    indent = "\n" + " " * 16
    sign_in = (
        f"one-time sign-in link: {console_link}"
        + f"{indent}(it works once, for 10 minutes; later sign in with the token)"
        if console_link
        else "sign in with the token below"
    )
    return f"""
Local Space is up (its state is in {state}).
  Console       {console}
                {sign_in}{indent}(the browser warns about the manager's own CA; trust {ca} or accept once)
  Space API     {space_url}
  Token         {token}
  CA            {ca}   (fingerprint {fingerprint})
  Hub           {hub_id}, its own API on {hub_api}   (data in {hub_dir})
  Manager data  {cpm_dir}   (cpm's admin commands need --data-dir {q(str(cpm_dir))})

Try it:
  {curl} {space_url}/list
  {curl} {space_url}/sth/{hub_id}/api/v1/version
  {si} config set apiUrl {hub_api}
  {si} seq deploy examples/hello-py --args '["Hi"]'
  si is {si} {on_path}

Another hub on this machine, joined to this Space (a one-time join token each time):
  {join}
  {cpm} hub list --space {SPACE} --data-dir {q(str(cpm_dir))}

Ctrl-C (or kill {os.getpid()}) stops the instances, the hub and the manager."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spacehub-local", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=Path(".local-space"), help="state directory (default .local-space)"
    )
    parser.add_argument("--cpm-port", type=int, default=9000, help="the manager's port (default 9000)")
    parser.add_argument("--hub-port", type=int, default=8000, help="the hub's API port (default 8000)")
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the process that started this one dies (make run passes it)",
    )
    args = parser.parse_args(argv)
    state: Path = args.dir.resolve()
    cpm_dir, hub_dir = state / "cpm", state / "hub"
    cpm, sth = _tool("cpm", "cpm.main"), _tool("sth", "agent.main")
    processes: list[subprocess.Popen[bytes]] = []
    hub_started = False
    join_file = hub_dir / "join.toml"
    try:
        _set_handlers(_on_stop_signal)
        if args.exit_with_parent:
            exit_with_parent()
        cpm_dir.mkdir(parents=True, exist_ok=True)
        hub_dir.mkdir(parents=True, exist_ok=True)
        if SPACE not in _run([*cpm, "space", "list", "--data-dir", str(cpm_dir)]).split():
            print(f"Making the Space {SPACE!r} in {cpm_dir} ...", flush=True)
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
            _write_private(token_file, token + "\n")
        token = token_file.read_text().strip()

        print(f"Starting the manager on 127.0.0.1:{args.cpm_port} ...", flush=True)
        manager = _spawn([*cpm, "serve", "-P", str(args.cpm_port), "--data-dir", str(cpm_dir)])
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
            # A Space run by hand ends with its terminal: instances too (a hub run as a
            # service leaves them running for the next hub; see docs/architecture.md).
            "--end-instances-on-exit",
        ]
        if not (hub_dir / "link.json").exists():
            # The one-time token goes in a private file, not on the command line (where `ps`
            # shows it to every user); the file is removed once the hub has joined.
            join_token = _run([*cpm, "join-token", "create", "--space", SPACE, "--data-dir", str(cpm_dir)])
            _write_private(join_file, f"[hub]\njoin_token = {json.dumps(join_token)}\n")
            hub_args += ["-c", str(join_file)]
        print(f"Starting the hub on 127.0.0.1:{args.hub_port} ...", flush=True)
        hub = _spawn(hub_args)
        processes.append(hub)
        hub_started = True
        assert hub.stdout is not None
        _wait_for_line(hub, hub.stdout, b"Running", "sth")

        deadline = time.monotonic() + JOIN_TIMEOUT
        link: dict[str, object] = {}
        while time.monotonic() < deadline:
            cpm_status = _hub_call(args.hub_port, "GET", "/status").get("cpm")
            link = cpm_status if isinstance(cpm_status, dict) else {}
            if link.get("connected"):
                break
            time.sleep(0.2)
        else:
            raise LaunchError(f"the hub did not join the Space: {link.get('lastError') or link}")
        join_file.unlink(missing_ok=True)

        print(
            _banner(
                state=state,
                cpm_dir=cpm_dir,
                hub_dir=hub_dir,
                token=token,
                fingerprint=fingerprint,
                hub_id=str(link.get("hubId")),
                cpm_port=args.cpm_port,
                hub_port=args.hub_port,
                console_link=_console_link(args.cpm_port, cpm_dir / "ca.pem", token),
            ),
            flush=True,
        )
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        raise LaunchError("a daemon exited; see its messages above")
    except Stopped as stop:
        _set_handlers(_note_stop_signal)
        print(f"\n{stop}: stopping the local Space...", flush=True)
        return 0
    except (LaunchError, OSError, ValueError) as exc:
        _set_handlers(_note_stop_signal)
        print(f"local space: {exc}", file=sys.stderr)
        return 1
    finally:
        _set_handlers(_note_stop_signal)
        if hub_started and processes[-1].poll() is None:
            _stop_instances(args.hub_port)
        _stop_daemons(processes)
        join_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
