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
(``release``).

One runs per instance, so it is kept small: it imports only modules the
interpreter has built in or loads as small C extensions (``os``, ``select``,
``fcntl``, ``marshal``, ``_socket``, ``_signal``; no ``json``, ``socket``,
``selectors`` or ``signal``, which pull in ``re`` and ``enum``): 4.1 MB of private
memory instead of 5.6 (bench/readopt.py; the bare interpreter is 2.6). It keeps
running whatever happens to the hub's code on disk (an upgrade replaces this file
under a running holder).

Its socket is in the abstract namespace (no path-length limit, nothing left on
disk after a power loss); only a peer of the holder's own user (or root) is
served, checked with ``SO_PEERCRED``.

The launch (argv, environment, cwd, limits) is ``launch.marshal`` in the state
directory, written by the hub with the same interpreter. The control connection
carries lines. Holder -> hub: the hello (a JSON object, with the descriptors),
then ``{"exit": {...}}`` when the runner ends. Hub -> holder: ``signal N``,
``close NAME``, ``release``.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # preloaded; signal would import enum
import _socket
import contextlib
import fcntl
import marshal
import os
import select
import sys
import time

# typing costs ~1 MB per holder: it is imported by type checkers only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Bytes of one control line the holder accepts from the hub.
MAX_LINE_BYTES = 4096
#: Pending hub connections the listening socket queues.
LISTEN_BACKLOG = 4
#: Linux's F_SETPIPE_SZ (fcntl has it from Python 3.10 on).
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SO_PEERCRED = 17


def _json_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _exit_json(exit_info: tuple[int, str] | None) -> str:
    if exit_info is None:
        return "null"
    return f'{{"code": {exit_info[0]}, "ended": {_json_string(exit_info[1])}}}'


def _write_atomic(path: str, text: str) -> None:
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
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
        try:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            os.write(fd, str(launch.get("oomScoreAdj", 200)).encode())
            os.close(fd)
        except OSError:
            pass
        pid = str(os.getpid()).encode()
        for procs in launch.get("cgroupProcs", []):
            fd = os.open(procs, os.O_WRONLY)
            os.write(fd, pid)
            os.close(fd)
        if launch.get("rlimits"):
            import resource

            for which, value in launch["rlimits"]:
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
            os.write(2, (f"holder: cannot start the runner: {exc}\n").encode())
    os._exit(127)


class Holder:
    def __init__(self, state_dir: str, launch: dict[str, Any]) -> None:
        self.state_dir = state_dir
        self.launch = launch
        self.hub_ends: dict[str, int] = {}
        self.order: list[str] = [channel[0] for channel in launch["channels"]]
        self.pid = 0
        self.exit: tuple[int, str] | None = None  # (code, ended) once reaped
        self.connection: _socket.socket | None = None
        self.received = b""
        self.released = False
        self.poll = select.poll()
        self.by_fd: dict[int, str] = {}

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        child_ends: dict[int, int] = {}
        for name, child_fd, direction in self.launch["channels"]:
            read_end, write_end = os.pipe()
            if direction == "w":
                hub_end, child_end = write_end, read_end
            else:
                hub_end, child_end = read_end, write_end
            if name in self.launch.get("bulk", ()):
                with contextlib.suppress(OSError):
                    fcntl.fcntl(hub_end, F_SETPIPE_SZ, self.launch["pipeBytes"])
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
        _write_atomic(
            os.path.join(self.state_dir, "holder.json"),
            f'{{"pid": {pid}, "holderPid": {os.getpid()}}}',
        )

    # ------------------------------------------------------------------ loop
    def _watch(self, fd: int, what: str) -> None:
        self.by_fd[fd] = what
        self.poll.register(fd, select.POLLIN)

    def _unwatch(self, fd: int) -> None:
        self.by_fd.pop(fd, None)
        self.poll.unregister(fd)

    def serve(self, listener: _socket.socket) -> None:
        pidfd = os.pidfd_open(self.pid)
        self._watch(listener.fileno(), "listener")
        self._watch(pidfd, "child")
        while not (self.released and self.exit is not None):
            for fd, _events in self.poll.poll():
                what = self.by_fd.get(fd)
                if what == "listener":
                    self._accept(listener)
                elif what == "child":
                    self._unwatch(pidfd)
                    os.close(pidfd)
                    self._reap()
                elif what == "hub":
                    self._read_hub()

    def _accept(self, listener: _socket.socket) -> None:
        fd, _address = listener._accept()  # type: ignore[attr-defined]
        connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
        credentials = connection.getsockopt(_socket.SOL_SOCKET, SO_PEERCRED, 12)
        uid = int.from_bytes(credentials[4:8], sys.byteorder)
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
        channels = ", ".join(_json_string(name) for name in names)
        hello = f'{{"pid": {self.pid}, "channels": [{channels}], "exit": {_exit_json(self.exit)}}}\n'
        fds = b"".join(self.hub_ends[name].to_bytes(4, sys.byteorder, signed=True) for name in names)
        try:
            connection.sendmsg([hello.encode()], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        except OSError:
            connection.close()
            return
        connection.setblocking(False)
        self.connection = connection
        self.received = b""
        self._watch(connection.fileno(), "hub")

    def _drop_hub(self) -> None:
        if self.connection is not None:
            self._unwatch(self.connection.fileno())
            self.connection.close()
            self.connection = None

    def _read_hub(self) -> bool:
        """Read what the hub sent; whether there may be more to read now."""
        if self.connection is None:
            return False
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
        while b"\n" in self.received:
            line, self.received = self.received.split(b"\n", 1)
            self._command(line.decode("ascii", "replace").split())
        if len(self.received) > MAX_LINE_BYTES:
            self.received = b""
        return True

    def _command(self, words: list[str]) -> None:
        if len(words) == 2 and words[0] == "signal" and words[1].isdigit():
            if self.exit is None:  # a reaped pid may belong to someone else by now
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, int(words[1]))
        elif len(words) == 2 and words[0] == "close":
            fd = self.hub_ends.pop(words[1], None)
            if fd is not None:
                os.close(fd)
        elif words == ["release"]:
            self.released = True

    def _reap(self) -> None:
        _pid, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        # Stragglers the sequence left behind must not outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, 9)
        self.exit = (code, _iso_now())
        _write_atomic(os.path.join(self.state_dir, "exit.json"), _exit_json(self.exit))
        if self.connection is not None:
            try:
                self.connection.setblocking(True)
                self.connection.sendall((f'{{"exit": {_exit_json(self.exit)}}}\n').encode())
                self.connection.setblocking(False)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    state_dir, ready_fd = argv[1], int(argv[2])
    # The hub's terminal, its signals and its session are not the runner's business.
    for number in (_signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT):
        _signal.signal(number, _signal.SIG_IGN)
    with open(os.path.join(state_dir, "launch.marshal"), "rb") as file:
        launch = marshal.load(file)
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    listener.bind(b"\0" + launch["socket"].encode())
    listener.listen(LISTEN_BACKLOG)
    holder = Holder(state_dir, launch)
    holder.start()
    os.close(ready_fd)  # the hub may connect now
    holder.serve(listener)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
