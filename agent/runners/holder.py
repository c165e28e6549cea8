"""The holder: the small process that keeps one instance's runner alive without the hub.

Theory of operation
-------------------
The hub does not start a runner itself: it starts ``holder.py STATE_DIR READY_FD``
in a session of its own, and the holder starts the runner (its only child) with the
eight channel pipes on descriptors 0-7. The holder keeps the hub's ends of all
eight pipes open for the runner's whole life and hands copies of them to whichever
hub connects to its socket (``SCM_RIGHTS``). So when the hub ends (SIGTERM,
``kill -9``, a crash, an upgrade), the runner notices nothing: no pipe reaches its
end, what it writes waits in the pipes' kernel buffers (after which its writes
block, exactly as with a slow reader), and the next hub connects and reads on from
the very byte where the last one stopped.

The holder copies no data: the bytes go straight from the runner's pipes to the
hub. It only starts the runner, reaps it (its exit code is the holder's to learn,
and it writes it to ``exit.json`` for a hub that comes later), signals the
runner's process group when the hub asks, closes its copy of a writing end when
the hub ends that stream, and exits once a hub has taken the runner's end
(``release``). It uses the standard library only, so it keeps running whatever
happens to the hub's code on disk (an upgrade replaces it under a running holder).

Its socket is in the abstract namespace (no path-length limit, nothing left on
disk after a power loss); only a peer of the holder's own user (or root) is
served, checked with ``SO_PEERCRED``.

The control connection carries JSON lines. Holder → hub: the hello (with the
descriptors), then ``{"exit": {...}}`` when the runner ends. Hub → holder:
``{"signal": N}``, ``{"close": "stdin"}``, ``{"release": true}``.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any

#: Bytes of one control line the holder accepts from the hub.
MAX_LINE_BYTES = 4096
#: Pending hub connections the listening socket queues.
LISTEN_BACKLOG = 4


def _write_atomic(path: str, value: Any) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump(value, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _iso_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _child(launch: dict[str, Any], child_ends: dict[int, int]) -> None:
    """Between fork and exec, in the runner-to-be; never returns."""
    try:
        os.setsid()
        # The hub runs with a protective OOM score (systemd's OOMScoreAdjust); an
        # instance must be the one the kernel picks first. Raising needs no privilege.
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as score:
            score.write(str(launch.get("oomScoreAdj", 200)))
        pid = str(os.getpid())
        for procs in launch.get("cgroupProcs", []):
            with open(procs, "w") as file:
                file.write(pid)
        import resource

        for which, value in launch.get("rlimits", []):
            resource.setrlimit(which, (value, value))
        # Sources first above every target, so that no dup2 overwrites one still needed.
        targets = sorted(child_ends)
        high = [os.dup(child_ends[t]) for t in targets]
        for target, source in zip(targets, high, strict=True):
            os.dup2(source, target)
        os.closerange(len(targets), 1 << 16)
        os.chdir(launch["cwd"])
        os.execve(launch["argv"][0], launch["argv"], launch["env"])
    except BaseException as exc:  # noqa: BLE001 - report anything, then end the child
        with contextlib.suppress(OSError):
            os.write(2, f"holder: cannot start the runner: {exc}\n".encode())
    os._exit(127)


class Holder:
    def __init__(self, state_dir: str, launch: dict[str, Any]) -> None:
        self.state_dir = state_dir
        self.launch = launch
        self.hub_ends: dict[str, int] = {}
        self.order = [name for name, _fd, _direction in launch["channels"]]
        self.pid = 0
        self.exit: dict[str, Any] | None = None
        self.connection: socket.socket | None = None
        self.received = bytearray()
        self.released = False
        self.selector = selectors.DefaultSelector()

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        child_ends: dict[int, int] = {}
        for name, child_fd, direction in self.launch["channels"]:
            read_end, write_end = os.pipe()
            hub_end, child_end = (write_end, read_end) if direction == "w" else (read_end, write_end)
            if name in self.launch.get("bulk", []):
                with contextlib.suppress(OSError):
                    import fcntl

                    fcntl.fcntl(hub_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), self.launch["pipeBytes"])
            self.hub_ends[name] = hub_end
            child_ends[child_fd] = child_end
        pid = os.fork()
        if pid == 0:
            for fd in self.hub_ends.values():
                os.close(fd)
            _child(self.launch, child_ends)
        self.pid = pid
        for fd in child_ends.values():
            os.close(fd)
        _write_atomic(os.path.join(self.state_dir, "holder.json"), {"pid": pid, "holderPid": os.getpid()})

    # ------------------------------------------------------------------ loop
    def serve(self, listener: socket.socket) -> None:
        pidfd = os.pidfd_open(self.pid)
        self.selector.register(listener, selectors.EVENT_READ, "listener")
        self.selector.register(pidfd, selectors.EVENT_READ, "child")
        while not (self.released and self.exit is not None):
            for key, _events in self.selector.select():
                if key.data == "listener":
                    self._accept(listener)
                elif key.data == "child":
                    self.selector.unregister(pidfd)
                    os.close(pidfd)
                    self._reap()
                elif key.data == "hub":
                    self._read_hub()

    def _accept(self, listener: socket.socket) -> None:
        connection, _ = listener.accept()
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", credentials)
        if uid not in (0, os.getuid()):
            connection.close()
            return
        # A new hub replaces the one before (which is gone, or about to be), once
        # what it said last is heard (a release must not be lost to the swap).
        while self.connection is not None and self._read_hub():
            pass
        self._drop_hub()
        if self.released and self.exit is not None:
            connection.close()
            return
        names = [name for name in self.order if name in self.hub_ends]
        hello = {"pid": self.pid, "channels": names, "exit": self.exit}
        fds = array.array("i", [self.hub_ends[name] for name in names])
        try:
            connection.sendmsg(
                [json.dumps(hello).encode() + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
            )
        except OSError:
            connection.close()
            return
        connection.setblocking(False)
        self.connection = connection
        self.received.clear()
        self.selector.register(connection, selectors.EVENT_READ, "hub")

    def _drop_hub(self) -> None:
        if self.connection is not None:
            self.selector.unregister(self.connection)
            self.connection.close()
            self.connection = None

    def _read_hub(self) -> bool:
        """Read what the hub sent; whether there may be more to read now."""
        assert self.connection is not None
        try:
            data = self.connection.recv(MAX_LINE_BYTES)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._drop_hub()  # the hub ended; the runner goes on
            return False
        self.received += data
        while (newline := self.received.find(b"\n")) >= 0:
            line = bytes(self.received[:newline])
            del self.received[: newline + 1]
            with contextlib.suppress(ValueError, TypeError):
                self._command(json.loads(line))
        if len(self.received) > MAX_LINE_BYTES:
            self.received.clear()
        return True

    def _command(self, command: dict[str, Any]) -> None:
        if "signal" in command:
            if self.exit is None:  # a reaped pid may belong to someone else by now
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, int(command["signal"]))
        elif "close" in command:
            fd = self.hub_ends.pop(str(command["close"]), None)
            if fd is not None:
                os.close(fd)
        elif command.get("release"):
            self.released = True

    def _reap(self) -> None:
        _pid, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        # Stragglers the sequence left behind must not outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.exit = {"code": code, "ended": _iso_now()}
        _write_atomic(os.path.join(self.state_dir, "exit.json"), self.exit)
        if self.connection is not None:
            with contextlib.suppress(OSError):
                self.connection.setblocking(True)
                self.connection.sendall(json.dumps({"exit": self.exit}).encode() + b"\n")
                self.connection.setblocking(False)


def main(argv: list[str]) -> int:
    state_dir, ready_fd = argv[1], int(argv[2])
    # The hub's terminal, its signals and its session are not the runner's business.
    for name in ("SIGINT", "SIGHUP", "SIGQUIT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    with open(os.path.join(state_dir, "launch.json")) as file:
        launch = json.load(file)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + launch["socket"])
    listener.listen(LISTEN_BACKLOG)
    holder = Holder(state_dir, launch)
    holder.start()
    os.close(ready_fd)  # the hub may connect now
    holder.serve(listener)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
