"""The control side of the runner: fd 3 (control, from the hub) and fd 4 (monitoring).

``ControlChannel`` is the base of the runner (``main._Runner``): it sends messages, does
the PING/PONG handshake, and then serves the control channel and the heartbeat from
threads of their own. They are threads, not loop tasks, because a sequence may block the
loop (a busy ``run``, a flood of prints nobody reads); STOP, KILL, events and the
MONITORING heartbeat must still be answered then.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

from spacehub.protocol.runner import (
    FD_CONTROL,
    FD_LOG,
    FD_MONITORING,
    Code,
    Message,
    MessageReader,
    ProtocolError,
    encode,
)

from .base import (
    CHUNK_SIZE,
    DEFAULT_STOP_TIMEOUT_MS,
    EXIT_OK,
    HEALTH_CHECK_TIMEOUT,
    HEARTBEAT_SECONDS,
    MAX_BAD_CONTROL_LINES,
    MIN_STOP_WAIT,
    START_WAIT_SECONDS,
    _await,
    _call_flexible,
    _ControlBroken,
    _Exit,
    _hard_exit,
    _isawaitable,
    _KeepAlive,
    _Log,
    _RecordWriter,
)
from .context import AppContext


class ControlChannel:
    """Messages to the hub, the handshake, and the control and heartbeat threads.

    ``context`` and ``loop`` are set by the runner once ``run`` is about to be called;
    until then events and STOP wait for ``_started`` (see ``_dispatch``).
    """

    def __init__(self, instance_id: str, created: int, app_config: dict[str, Any], args: list[Any]) -> None:
        self.instance_id = instance_id
        self.created = created
        self.monitoring = _RecordWriter(FD_MONITORING)
        self.log = _Log(_RecordWriter(FD_LOG))
        #: from the environment, replaced by PONG's when it carries them
        self.app_config = app_config
        self.args = args
        self.context: AppContext | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._control = MessageReader()
        self._early: deque[Message] = deque()  # read along with PONG: for the control thread
        self._ignored: set[str] = set()
        self._heartbeat_stop = threading.Event()
        self._stop_lock = threading.Lock()
        self._keep_alive_requested = False
        self._started = threading.Event()  # the first PANG is out: run() registered its handlers

    def start_threads(self) -> None:
        """After the handshake: the control and heartbeat threads (daemons: exits are ours)."""
        threading.Thread(target=self._control_loop, name="control", daemon=True).start()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()

    # ---- messages

    def send(self, code: Code, data: dict[str, Any]) -> None:
        """Send one message on fd 4. Raises TypeError/ProtocolError for a bad payload."""
        self.monitoring.write(encode(Message(code, data)))

    def keep_alive(self, seconds: float) -> None:
        self._keep_alive_requested = True
        self.send(Code.ALIVE, {"keepAlive": int(seconds * 1000)})

    def _fail(self, code: int, message: str) -> NoReturn:
        """Report ERROR and end with ``code`` (the reason is on stderr already)."""
        self._heartbeat_stop.set()
        self.log.record("ERROR", message)
        self.send(Code.ERROR, {"message": message, "exitcode": code})
        raise _Exit(code)

    # ---- handshake

    def _handshake(self) -> None:
        """PING, then block (the loop has nothing else to do yet) until PONG."""
        self.send(Code.PING, {"id": self.instance_id, "pid": os.getpid(), "created": self.created})
        while True:
            try:
                messages = self._decode_control()
            except _ControlBroken as exc:
                self.log.record("ERROR", f"Control channel unreadable ({exc}); exiting")
                _hard_exit(EXIT_OK)
            for index, message in enumerate(messages):
                if message.code is Code.PONG:
                    data = message.data
                    if isinstance(data.get("appConfig"), dict):
                        self.app_config = data["appConfig"]
                    if isinstance(data.get("args"), list):
                        self.args = data["args"]
                    self._early.extend(messages[index + 1 :])  # for the control thread
                    return
                if message.code is Code.KILL:
                    _hard_exit(EXIT_OK)
                if message.code is Code.STOP:
                    self.send(Code.SEQUENCE_STOPPED, {})
                    _hard_exit(EXIT_OK)
                self.log.record("DEBUG", f"Ignored {message.code.name} before PONG")
            if not self._read_control():
                _hard_exit(EXIT_OK)  # the hub went away before answering

    # ---- control thread

    def _read_control(self) -> bool:
        try:
            data = os.read(FD_CONTROL, CHUNK_SIZE)
        except OSError:
            data = b""
        self._control.receive_data(data)
        return bool(data)

    def _decode_control(self) -> list[Message]:
        """The complete messages received so far.

        A line that does not decode (e.g. a code this runner does not know) is already
        consumed by the reader and only logged; a reader that keeps failing is broken.
        """
        messages: list[Message] = list(self._early)
        self._early.clear()
        failures = 0
        while True:
            try:
                message = self._control.next_message()
            except ProtocolError as exc:
                failures += 1
                if failures > MAX_BAD_CONTROL_LINES or self._control.eof:
                    raise _ControlBroken(str(exc)) from None
                # once per kind: a hub sending e.g. MONITORING_REPLY every second must not flood the log
                reason = str(exc)
                if reason not in self._ignored and len(self._ignored) < MAX_BAD_CONTROL_LINES:
                    self._ignored.add(reason)
                    self.log.record("WARN", f"Control message ignored: {reason}")
                continue
            if message is None:
                return messages
            messages.append(message)

    def _control_loop(self) -> None:
        try:
            while True:
                for message in self._decode_control():
                    self._dispatch(message)
                if not self._read_control():
                    break
        except _ControlBroken as exc:
            self.log.record("ERROR", f"Control channel unreadable ({exc}); exiting")
        _hard_exit(EXIT_OK)  # the hub went away

    def _dispatch(self, message: Message) -> None:
        code, data = message.code, message.data
        if code in (Code.EVENT, Code.STOP) and not self._started.is_set():
            # The hub may send these right after PONG, before run() got to register its
            # handlers; they wait for that (the PANG timer bounds the wait).
            self._started.wait(START_WAIT_SECONDS)
        if code is Code.EVENT:
            self._deliver_event(data)
        elif code is Code.STOP:
            threading.Thread(target=self._handle_stop, args=(data,), name="stop", daemon=True).start()
        elif code is Code.KILL:
            self.log.record("INFO", "Killed by the hub")
            _hard_exit(EXIT_OK)
        else:
            self.log.record("DEBUG", f"Ignored control message {code.name}")

    def _deliver_event(self, data: dict[str, Any]) -> None:
        name = data.get("eventName")
        if not isinstance(name, str) or self.context is None:
            return
        for handler in self.context.handlers(name):
            self._call_user(handler, (data.get("message"),), f"Event handler for {name!r}")

    def _call_user(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> Any:
        """Call a user callback here; if it returns an awaitable, run that on the loop.

        Returns the concurrent future of the awaitable, or None. Failures are logged.
        """
        try:
            result = _call_flexible(fn, args)
        except Exception as exc:  # noqa: BLE001 - a failing handler is reported, never fatal
            self._log_failure(what, exc)
            return None
        if not _isawaitable(result):
            return None
        assert self.loop is not None
        try:
            future = asyncio.run_coroutine_threadsafe(_await(result), self.loop)
        except RuntimeError:  # the loop is closed: we are exiting anyway
            return None

        def report(done: Any) -> None:
            if not done.cancelled() and done.exception() is not None:
                self._log_failure(what, done.exception())

        future.add_done_callback(report)
        return future

    def _log_failure(self, what: str, exc: BaseException) -> None:
        self.log.record(
            "ERROR", f"{what} failed: {type(exc).__name__}: {exc}", data=traceback.format_exception(exc)
        )

    def _handle_stop(self, data: dict[str, Any]) -> None:
        with self._stop_lock:
            timeout_ms = data.get("timeout", DEFAULT_STOP_TIMEOUT_MS)
            if not isinstance(timeout_ms, (int, float)) or timeout_ms < 0:
                timeout_ms = DEFAULT_STOP_TIMEOUT_MS
            timeout = timeout_ms / 1000
            can_keep_alive = bool(data.get("canCallKeepalive", False))
            self._keep_alive_requested = False
            deadline = time.monotonic() + max(timeout, MIN_STOP_WAIT)
            handlers = self.context.stop_handlers() if self.context is not None else []
            for handler in handlers:
                if isinstance(handler, _KeepAlive):  # set_stop_handler(context.keep_alive(n))
                    self.keep_alive(handler.seconds)
                    continue
                if not callable(handler):
                    self.log.record("ERROR", f"Stop handler {handler!r} is not callable")
                    continue
                future = self._call_user(handler, (timeout, can_keep_alive), "Stop handler")
                if future is None:
                    continue
                try:
                    future.result(timeout=max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    self.log.record("WARN", "Stop handler did not finish in time")
                    break
                except Exception:  # noqa: BLE001 - the handler's failure was logged by _call_user
                    continue
            if can_keep_alive and self._keep_alive_requested:
                self.log.record("INFO", "Kept alive by the sequence")
                return
            self.send(Code.SEQUENCE_STOPPED, {})
            self.log.record("INFO", "Stopped")
            _hard_exit(EXIT_OK)

    # ---- heartbeat thread

    def _heartbeat_loop(self) -> None:
        while not self._heartbeat_stop.is_set():
            healthy = self._healthy()
            if self._heartbeat_stop.is_set():
                return  # completed meanwhile: no MONITORING after SEQUENCE_COMPLETED
            self.send(Code.MONITORING, {"healthy": healthy})
            self._heartbeat_stop.wait(HEARTBEAT_SECONDS)

    def _healthy(self) -> bool:
        check = self.context.health_check if self.context is not None else None
        if check is None:
            return True
        try:
            result = check()
            if _isawaitable(result):
                assert self.loop is not None
                future = asyncio.run_coroutine_threadsafe(_await(result), self.loop)
                try:
                    result = future.result(timeout=HEALTH_CHECK_TIMEOUT)
                except TimeoutError:
                    future.cancel()
                    return False
        except Exception:  # noqa: BLE001 - a failing health check means unhealthy
            return False
        if isinstance(result, dict):
            return bool(result.get("healthy"))
        return bool(result)
