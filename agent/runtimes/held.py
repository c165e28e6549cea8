"""The hub's side of the holders (agent/runners/holder.py): start one, take one back.

:func:`start_held` writes the launch (argv, environment, limits) into the
instance's state directory, starts the holder in a session of its own and waits
until it listens; :func:`adopt` connects to a running holder, which hands over
the eight channel descriptors (``SCM_RIGHTS``) and says whether the runner has
ended meanwhile. Either way the hub gets a :class:`HeldRunner`: the same
:class:`~agent.runtimes.base.RunnerProcess` as before, but the process it waits
for and signals is the holder's child, through the holder.

:meth:`HeldRunner.detach` is what a hub does when it stops and the instances
stay: close its copies of the descriptors and go; :meth:`HeldRunner.aclose` ends
the relation for good (the runner has ended: the holder may exit too).
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import marshal
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio

from .pipes import _BULK, BULK_PIPE_BYTES, CHANNELS, INSTANCE_OOM_SCORE_ADJ, ChannelStreams

HOLDER: Final = Path(__file__).resolve().parent.parent / "runners" / "holder.py"
#: Seconds a new holder may take to listen.
HOLDER_START_TIMEOUT: Final = 10.0
#: Seconds a hub waits for a holder's hello.
HOLDER_HELLO_TIMEOUT: Final = 5.0
#: Bytes of a holder's hello (JSON line) and of one of its later lines.
HOLDER_LINE_BYTES: Final = 64 * 1024


class HolderGone(OSError):
    """No holder answers for this instance (it ended, or the machine restarted)."""


def socket_name(state_dir: Path) -> str:
    """The holder's abstract socket name: one per state directory."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:32]
    return f"spacehub/holder/{digest}"


class _HeldSendStream(trio.abc.SendStream):
    """A writing end; ending it also ends the holder's copy, so the runner sees EOF."""

    def __init__(self, stream: trio.lowlevel.FdStream, on_close: Callable[[], None]) -> None:
        self._stream = stream
        self._on_close = on_close

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._on_close()
        await self._stream.aclose()


class _ClosedReceive(trio.abc.ReceiveStream):
    """A reading end the runner has closed for good (a hub before ended it): EOF."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _ClosedSend(trio.abc.SendStream):
    """A writing end a hub before ended: nothing more goes to the runner."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        raise trio.ClosedResourceError("this stream was ended before")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class HeldRunner(ChannelStreams):
    """A runner kept by its holder; see the module docstring."""

    def __init__(
        self,
        connection: socket.socket,
        hello: dict[str, Any],
        fds: list[int],
        holder: trio.Process | None,
        exit_reason: Callable[[], str | None] | None = None,
    ) -> None:
        self._connection = connection
        self._holder = holder
        self._exit_reason = exit_reason
        self.pid: int = int(hello["pid"])
        self._code: int | None = None
        self._ended = trio.Event()
        self._received = bytearray()
        self._detached = False
        self._released = False
        names = list(hello.get("channels", []))
        streams: dict[str, Any] = {}
        for name, fd in zip(names, fds, strict=True):
            stream = trio.lowlevel.FdStream(fd)
            direction = next(d for n, _fd, d in CHANNELS if n == name)
            streams[name] = _HeldSendStream(stream, self._closer(name)) if direction == "w" else stream
        for name, _fd, direction in CHANNELS:
            if name not in streams:
                streams[name] = _ClosedSend() if direction == "w" else _ClosedReceive()
        super().__init__(streams)
        if hello.get("exit") is not None:
            self._code = int(hello["exit"]["code"])
            self.ended_at: str | None = hello["exit"].get("ended")
            self._ended.set()
        else:
            self.ended_at = None

    @property
    def exit_reason(self) -> str | None:
        return self._exit_reason() if self._exit_reason is not None else None

    @property
    def returncode(self) -> int | None:
        return self._code

    def _send(self, line: str) -> None:
        # Lines of a few bytes on a socket nobody else writes: the kernel takes them at once.
        with contextlib.suppress(OSError):
            self._connection.send(line.encode() + b"\n")

    def _closer(self, name: str) -> Callable[[], None]:
        def close() -> None:
            if not self._detached:
                self._send(f"close {name}")

        return close

    async def wait(self) -> int:
        """The runner's exit code (negative for a signal), as its holder saw it."""
        while not self._ended.is_set():
            try:
                await trio.lowlevel.wait_readable(self._connection)
                data = self._connection.recv(HOLDER_LINE_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                # The holder is gone without a word (killed): the runner has nobody
                # to report its end; it must not run on unowned.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                self._code = -int(signal.SIGKILL)
                self._ended.set()
                break
            self._received += data
            while (newline := self._received.find(b"\n")) >= 0:
                line = bytes(self._received[:newline])
                del self._received[: newline + 1]
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    message = json.loads(line)
                    if "exit" in message:
                        self._code = int(message["exit"]["code"])
                        self.ended_at = message["exit"].get("ended")
                        self._ended.set()
        assert self._code is not None
        # The hub holds its own copies of the pipes (what is left in them drains
        # through those): the holder, its socket and its process go now, so that an
        # ended instance, listed for its lifetime, holds no descriptor but its pipes'.
        await self._release()
        return self._code

    async def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._send("release")
        self._connection.close()
        if self._holder is not None:
            with trio.move_on_after(2):
                await self._holder.wait()

    def signal_group(self, sig: signal.Signals) -> None:
        if not self._ended.is_set():
            self._send(f"signal {int(sig)}")

    async def _close_streams(self) -> None:
        for stream in self._streams.values():
            with contextlib.suppress(trio.ClosedResourceError, OSError):
                await trio.aclose_forcefully(stream)

    async def detach(self) -> None:
        """The hub goes, the runner stays: close the hub's copies only."""
        self._detached = True
        await self._close_streams()
        self._connection.close()
        self._released = True  # nothing more to say to it

    async def aclose(self) -> None:
        """The runner has ended (or is given up): let its holder go."""
        self._detached = True  # the holder's copies go with the holder
        await self._close_streams()
        if not self._ended.is_set() and not self._released:  # given up on while running
            self._send(f"signal {int(signal.SIGKILL)}")
        # The holder goes as soon as it has reaped the runner (at once if it has).
        await self._release()


async def _receive_hello(connection: socket.socket) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    data = bytearray()
    with trio.fail_after(HOLDER_HELLO_TIMEOUT):
        while b"\n" not in data:
            await trio.lowlevel.wait_readable(connection)
            try:
                chunk, ancillary, _flags, _address = connection.recvmsg(
                    HOLDER_LINE_BYTES, socket.CMSG_SPACE(len(CHANNELS) * array.array("i").itemsize)
                )
            except BlockingIOError:
                continue
            except ConnectionError:  # a holder letting go (released) closes at once
                chunk, ancillary = b"", []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    fds.extend(received)
            if not chunk:
                for fd in fds:
                    os.close(fd)
                raise HolderGone("the holder closed its socket before its hello")
            data += chunk
    line, _, rest = bytes(data).partition(b"\n")
    hello = json.loads(line)
    if rest:  # an exit line right behind the hello
        hello.setdefault("_rest", rest.decode())
    if len(fds) != len(hello.get("channels", [])):
        for fd in fds:
            os.close(fd)
        raise HolderGone("the holder's hello did not carry its descriptors")
    return hello, fds


async def adopt(
    state_dir: Path,
    holder: trio.Process | None = None,
    exit_reason: Callable[[], str | None] | None = None,
) -> HeldRunner:
    """Connect to the holder of ``state_dir``; :class:`HolderGone` when none answers."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    connection.setblocking(False)
    try:
        try:
            connection.connect("\0" + socket_name(state_dir))
        except (ConnectionRefusedError, FileNotFoundError):
            raise HolderGone(f"no holder for {state_dir.name}") from None
        except BlockingIOError:
            await trio.lowlevel.wait_writable(connection)
        # Abstract names are not files: anyone may bind one first. Only a holder of our
        # own user (or root) is believed.
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", credentials)
        if uid not in (0, os.getuid()):
            raise HolderGone(f"the socket of {state_dir.name} belongs to uid {uid}, not to a holder of ours")
        hello, fds = await _receive_hello(connection)
    except BaseException:
        connection.close()
        raise
    runner = HeldRunner(connection, hello, fds, holder, exit_reason)
    if "_rest" in hello:
        runner._received += hello["_rest"].encode()
    return runner


async def start_held(
    state_dir: Path,
    *,
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    cgroup_procs: list[str],
    rlimits: list[tuple[int, int]],
    python: str | None = None,
    exit_reason: Callable[[], str | None] | None = None,
) -> HeldRunner:
    """Start a holder (and through it the runner) for the instance of ``state_dir``."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    launch = {
        "argv": argv,
        "env": env,
        "cwd": str(cwd),
        "channels": [list(channel) for channel in CHANNELS],
        "bulk": sorted(_BULK),
        "pipeBytes": BULK_PIPE_BYTES,
        "oomScoreAdj": INSTANCE_OOM_SCORE_ADJ,
        "cgroupProcs": cgroup_procs,
        "rlimits": [list(limit) for limit in rlimits],
        "socket": socket_name(state_dir),
    }
    # marshal: the holder reads it without importing json (agent/runners/holder.py).
    temporary = state_dir / "launch.marshal.tmp"
    temporary.write_bytes(marshal.dumps(launch))
    os.replace(temporary, state_dir / "launch.marshal")
    for stale in ("exit.json", "holder.json"):
        (state_dir / stale).unlink(missing_ok=True)
    ready_read, ready_write = os.pipe()
    try:
        with open(state_dir / "holder.log", "ab") as log:
            holder = await trio.lowlevel.open_process(
                # -S -I: no site, no user paths, no PYTHON* variables: the holder uses
                # the standard library only, and starts in ~10 ms.
                [python or sys.executable, "-S", "-I", str(HOLDER), str(state_dir), str(ready_write)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log.fileno(),
                start_new_session=True,
                close_fds=True,
                pass_fds=(ready_write,),
                cwd="/",
            )
    finally:
        os.close(ready_write)
    try:
        with trio.fail_after(HOLDER_START_TIMEOUT):
            ready = trio.lowlevel.FdStream(ready_read)
            ready_read = -1
            async with ready:
                while await ready.receive_some(64):
                    pass
        return await adopt(state_dir, holder, exit_reason)
    except BaseException:
        if ready_read >= 0:
            os.close(ready_read)
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        raise
