"""The serving manager's local admin socket: what only the running process knows, for `cpm`'s
admin commands on the same machine.

Hub health lives in the serving manager's memory (heartbeats are never written to the
registry), so ``cpm hub list`` asks the manager that serves the same data dir, over a unix
socket in it: ``<data dir>/cpm.sock``, mode 0600 (whoever may read the registry may ask).
One request a connection: a JSON line ``{"op": "hubs", "space": "<name>"}``, answered by
one JSON line, ``{"hubs": [<the Space API's hub record>, ...]}`` or ``{"error": "..."}``.
When no manager serves the data dir, the command falls back to the registry (every hub is
then disconnected) and says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from .errors import ManagerError, ManagerNotRunning

if TYPE_CHECKING:
    from .service import Manager

__all__ = ["SOCKET_NAME", "ManagerNotRunning", "ask", "serve_admin"]

logger = logging.getLogger("cpm.admin")

SOCKET_NAME: Final = "cpm.sock"
#: Longest request line read from the socket.
MAX_REQUEST_BYTES: Final = 4096
#: Seconds a client gets to send its request, and the admin command to get its answer.
REQUEST_TIMEOUT: Final = 5.0
#: Connections served at once (each is one short request).
MAX_CONNECTIONS: Final = 8


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


async def serve_admin(
    manager: Manager, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on ``path`` until cancelled (a stale socket left by a crash is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener_socket = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is made 0600: never a moment readable by others
    try:
        await listener_socket.bind(str(path))
    except OSError as exc:  # e.g. a path over the 107 bytes a unix socket may have
        listener_socket.close()
        logger.warning("no admin socket at %s (%s): `cpm hub list` shows the registry only", path, exc)
        task_status.started()
        return
    finally:
        os.umask(old_umask)
    listener_socket.listen(MAX_CONNECTIONS)
    listener = trio.SocketListener(listener_socket)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    try:
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_one, manager, stream, limiter)
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def _serve_one(manager: Manager, stream: trio.SocketStream, limiter: trio.CapacityLimiter) -> None:
    async with stream, limiter:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                raw = b""
                while b"\n" not in raw and len(raw) <= MAX_REQUEST_BYTES:
                    chunk = await stream.receive_some(MAX_REQUEST_BYTES)
                    if not chunk:
                        break
                    raw += chunk
                answer = await _answer(manager, raw.split(b"\n", 1)[0])
                await stream.send_all(json.dumps(answer).encode() + b"\n")
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _answer(manager: Manager, line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except ValueError:
        return {"error": "the request is not a JSON line"}
    space = request.get("space") if isinstance(request, dict) else None
    if not isinstance(request, dict) or request.get("op") != "hubs" or not isinstance(space, str):
        return {"error": 'expected {"op": "hubs", "space": "<name>"}'}
    try:
        hubs = await manager.sessions.db(manager.registry.list_hubs, space)
    except ManagerError as exc:
        return {"error": exc.message}
    return {"hubs": [manager.sessions.record(hub) for hub in hubs]}


def ask(data_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
    """One request to the manager serving ``data_dir`` (blocking); raises
    :class:`ManagerNotRunning` when none answers."""
    path = socket_path(data_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REQUEST_TIMEOUT)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ManagerNotRunning(f"no manager serves {data_dir} ({path}: {exc.strerror})") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        raw = b""
        while not raw.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    answer = json.loads(raw)
    if not isinstance(answer, dict):
        raise ValueError("the manager answered nonsense on its admin socket")
    return answer
