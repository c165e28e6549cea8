"""The runner itself: loads the sequence, handshakes with the hub, runs ``run`` on the
asyncio loop, and serves the control channel (fd 3: events, STOP, KILL) and the
heartbeat (fd 4) from their own threads. See ``__init__``'s docstring for the whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any, NoReturn

from spacehub.protocol.runner import (
    FD_CONTROL,
    FD_LOG,
    FD_MONITORING,
    FD_OUTPUT,
    Code,
    Message,
    MessageReader,
    ProtocolError,
    encode,
)

from .base import (
    _NDJSON_TYPES,
    CHUNK_SIZE,
    CLEANUP_SECONDS,
    DEFAULT_STOP_TIMEOUT_MS,
    EXIT_BAD_ENV,
    EXIT_BAD_MAIN,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_START_FAILED,
    HEALTH_CHECK_TIMEOUT,
    HEARTBEAT_SECONDS,
    MAX_BAD_CONTROL_LINES,
    MIN_STOP_WAIT,
    PANG_GRACE_SECONDS,
    START_WAIT_SECONDS,
    SYNC_YIELD_EVERY,
    _attr,
    _await,
    _call_flexible,
    _ControlBroken,
    _declaration,
    _encode_ndjson,
    _encode_raw,
    _Env,
    _Exit,
    _flush_stdio,
    _hard_exit,
    _is_async_iterable,
    _is_falsy,
    _isawaitable,
    _KeepAlive,
    _Log,
    _media_type,
    _OutputGone,
    _RecordWriter,
    _resolve_main,
    _setup_stdio,
)
from .context import AppContext
from .input import _AsyncStdin, _InputSource, _SimpleStream
from .output import _Output
from .scramjet_input import _import_scramjet, _scramjet_input


class _Runner:
    def __init__(self, env: _Env, created: int) -> None:
        self.env = env
        self.instance_id = env.instance_id
        self.created = created
        self.monitoring = _RecordWriter(FD_MONITORING)
        self.log = _Log(_RecordWriter(FD_LOG))
        self.app_config = env.app_config
        self.args = env.args
        self.module: ModuleType | None = None
        self.context: AppContext | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._control = MessageReader()
        self._early: deque[Message] = deque()
        self._ignored: set[str] = set()
        self._heartbeat_stop = threading.Event()
        self._stop_lock = threading.Lock()
        self._keep_alive_requested = False
        self._pang_lock = threading.Lock()
        self._pangs_sent: list[dict[str, str]] | None = None
        self._started = threading.Event()  # the first PANG is out: run() registered its handlers
        self._result: Any = None
        self._scramjet: tuple[Any, Any] = (None, None)
        self._fatal: asyncio.Future[None] | None = None
        self._closing = False
        self._output: _Output | None = None

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

    # ---- start

    def run(self) -> int:
        loop = self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # for sequences still calling get_event_loop() in the main thread
        loop.set_exception_handler(self._on_loop_error)
        try:
            code = loop.run_until_complete(self._main())
        except _Exit as exc:
            return exc.code  # failures exit at once: no cleanup that could hang
        except SystemExit as exc:  # from a task or callback of the sequence
            return self._user_exit(exc)
        self._cleanup(loop)
        return code

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._fatal = loop.create_future()
        run = self._load()
        self._handshake()
        threading.Thread(target=self._control_loop, name="control", daemon=True).start()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        sys.stdin = _AsyncStdin()  # typeshed types it TextIO | Any: our async stand-in is accepted
        self.context = AppContext(self, self.app_config)
        task = loop.create_task(self._run_sequence(run, self.context))
        await asyncio.wait({task, self._fatal}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # a task of the sequence failed unobserved (see _on_loop_error)
            task.cancel()
            exc: BaseException | None = self._fatal.exception()
        else:
            exc = task.exception()
        if isinstance(exc, _UserExit):
            if exc.code in (None, 0):  # sys.exit(0) in the sequence: it is done
                if self._output is not None:
                    with contextlib.suppress(_OutputGone):
                        await self._output.close()
                return self._complete()
            print(f"SystemExit: {exc.code}", file=sys.stderr, flush=True)
            self._fail(EXIT_RUN_FAILED, f"Sequence failed during execution: SystemExit: {exc.code}")
        if exc is not None:
            traceback.print_exception(exc, file=sys.stderr)
            _flush_stdio()
            self._fail(EXIT_RUN_FAILED, f"Sequence failed during execution: {type(exc).__name__}: {exc}")
        return self._complete()

    def _load(self) -> Callable[..., Any]:
        env = self.env
        path = _resolve_main(env.sequence_dir, env.main)
        if path is None:
            message = (
                f"Sequence entrypoint path {env.main} is invalid. Check `main` field in Sequence package.json"
            )
            print(message, file=sys.stderr, flush=True)
            self._fail(EXIT_BAD_MAIN, message)
        main_dir = os.path.dirname(path)
        prefix = []
        packages = os.path.join(env.sequence_dir, "__pypackages__")
        if os.path.isdir(packages):
            prefix.append(packages)
            pep582 = os.path.join(packages, f"{sys.version_info[0]}.{sys.version_info[1]}", "lib")
            if os.path.isdir(pep582):
                prefix.append(pep582)
        prefix.append(main_dir)
        sys.path[:0] = prefix
        # Each instance works in its own scratch directory when the hub gives one (the
        # package itself may be read-only and is shared by every instance of it);
        # otherwise, as the original runner, next to the main file.
        os.chdir(os.environ.get("SPACEHUB_WORK_DIR") or main_dir)
        # After the path change, so a copy vendored in __pypackages__ is the one used.
        self._scramjet = _import_scramjet()
        try:
            spec = importlib.util.spec_from_file_location("sequence", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules["sequence"] = module
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - whatever the module raises fails the start
            sys.modules.pop("sequence", None)
            traceback.print_exception(exc, file=sys.stderr)
            _flush_stdio()
            self._fail(EXIT_START_FAILED, f"Sequence failed on start: {type(exc).__name__}: {exc}")
        run = getattr(module, "run", None)
        if not callable(run):
            message = f"Sequence failed on start: {env.main} defines no callable run(context, input, *args)"
            print(message, file=sys.stderr, flush=True)
            self._fail(EXIT_START_FAILED, message)
        self.module = module
        self.log.record("DEBUG", f"Sequence loaded from {path}")
        return run  # type: ignore[no-any-return]

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

    # ---- the sequence

    def declared_input_type(self) -> str:
        """The input's content type as declared by the module or the returned object, or ""."""
        return self._declarations(self._result)[3]

    def _declarations(self, result: Any) -> tuple[str, str, str, str]:
        """(provides, its content type, requires, its content type); runtime values win for
        the output, the module's ``requires`` for the input, RUNNER_INFO topics over both."""
        module = self.module
        mod_provides, mod_out_type = _declaration(_attr(module, "provides"), "provides")
        mod_requires, mod_in_type = _declaration(_attr(module, "requires"), "requires")
        run_provides, run_out_type = _declaration(_attr(result, "provides"), "provides")
        run_requires, run_in_type = _declaration(_attr(result, "requires"), "requires")
        run_type = _attr(result, "content_type") or _attr(result, "contentType")
        run_type = run_type if isinstance(run_type, str) else ""
        provides = self.env.output_topic or run_provides or mod_provides
        requires = self.env.input_topic or run_requires or mod_requires
        out_type = run_out_type or run_type or mod_out_type
        in_type = mod_in_type or run_in_type or (run_type if run_requires else "")
        return provides, out_type, requires, in_type

    def _send_pangs(self, result: Any, only_first: bool = False) -> None:
        """PANG(s) for the declarations; repeated only when they changed (any thread).

        ``only_first``: the grace timer's call, which must not follow the real one.
        """
        provides, out_type, requires, in_type = self._declarations(result)
        # One PANG per direction, so each content type belongs to the topic it names;
        # an empty one when nothing is declared (the hub still counts the PANG).
        payloads: list[dict[str, str]] = []
        if provides:
            payloads.append({"provides": provides, "contentType": out_type})
        if requires:
            payloads.append({"requires": requires, "contentType": in_type})
        if not payloads:
            payloads.append({"provides": "", "requires": "", "contentType": ""})
        with self._pang_lock:
            if payloads == self._pangs_sent or (only_first and self._pangs_sent is not None):
                return
            self._pangs_sent = payloads
            for payload in payloads:
                self.send(Code.PANG, payload)
        self._started.set()

    def _pang_at_first_yield(self, timer: threading.Timer) -> None:
        timer.cancel()
        self._send_pangs(self._result)

    def _make_input(self) -> Any:
        source = _InputSource(self)
        stream_cls, drop = self._scramjet
        if stream_cls is None:
            return _SimpleStream(source)
        return _scramjet_input(stream_cls, drop, source)

    async def _run_sequence(self, run: Callable[..., Any], context: AppContext) -> None:
        try:
            await self._run_sequence_inner(run, context)
        except SystemExit as exc:
            # Not let out of the task: asyncio would re-raise it past everything.
            raise _UserExit(exc.code) from None

    async def _run_sequence_inner(self, run: Callable[..., Any], context: AppContext) -> None:
        input_stream = self._make_input()
        # The first PANG tells the hub the instance runs, and the hub may send STOP or an
        # event right after it. So it goes out when this task first yields to the loop:
        # by then an ``async def run`` has registered the handlers at its top. A run that
        # never yields (a busy loop, a flood of prints) gets it from the timer thread.
        timer = threading.Timer(PANG_GRACE_SECONDS, self._send_pangs, args=(None, True))
        timer.daemon = True
        timer.start()
        try:
            result = run(context, input_stream, *self.args)
        except BaseException:
            timer.cancel()
            raise
        self._result = result
        asyncio.get_running_loop().call_soon(self._pang_at_first_yield, timer)
        if not _is_async_iterable(result) and _isawaitable(result):
            while not _is_async_iterable(result) and _isawaitable(result):
                result = await result
            # The awaited value may declare topics too; PANG again only if that changes them.
            self._result = result
            self._send_pangs(result)
        if _is_falsy(result):
            if context.has_handlers:
                self.log.record("DEBUG", "No output; waiting for events")
                await asyncio.get_running_loop().create_future()  # until STOP, KILL or the hub goes
            return
        out_type = self._declarations(result)[1] or "text/plain"
        try:
            await self._write_output(result, _media_type(out_type))
        except _OutputGone:
            self.log.record("WARN", "The hub closed the output; the rest of it was dropped")

    async def _write_output(self, result: Any, content_type: str) -> None:
        out = self._output = _Output()
        await out.open()
        encode_item = _encode_ndjson if content_type in _NDJSON_TYPES else _encode_raw
        if isinstance(result, (str, bytes, bytearray, memoryview)):
            out.write(_encode_raw(result))  # a string result is written once, as it is
        elif _is_async_iterable(result):
            async for item in result:
                out.write(encode_item(item))
                if out.must_drain:
                    await out.drain()
        elif hasattr(type(result), "__iter__") and not isinstance(result, dict):
            for count, item in enumerate(result, 1):
                out.write(encode_item(item))
                if out.must_drain:
                    await out.drain()
                elif count % SYNC_YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let event handlers and the input run
        else:
            out.write(encode_item(result))
        await out.close()

    # ---- endings

    def _complete(self) -> int:
        self._heartbeat_stop.set()
        if self._output is None:
            with contextlib.suppress(OSError):
                os.close(FD_OUTPUT)  # no output: the hub still needs the output's end
        self.send(Code.SEQUENCE_COMPLETED, {})
        self.log.record("INFO", "Sequence completed")
        return EXIT_OK

    def _user_exit(self, exc: SystemExit) -> int:
        """SystemExit raised in a task or callback of the sequence (not in run's own task)."""
        if exc.code in (None, 0):
            return self._complete()
        try:
            self._fail(EXIT_RUN_FAILED, f"Sequence failed during execution: SystemExit: {exc.code}")
        except _Exit as exit_:
            return exit_.code

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception nobody retrieved fails the sequence: it is how a failing scramjet
        transform (run in a task of its own) shows, and its stream would hang forever."""
        exc = context.get("exception")
        message = str(context.get("message", ""))
        fatal = self._fatal
        if (
            isinstance(exc, Exception)
            and "exception was never retrieved" in message
            and not self._closing
            and fatal is not None
            and not fatal.done()
        ):
            fatal.set_exception(exc)
            return
        data = traceback.format_exception(exc) if isinstance(exc, BaseException) else None
        self.log.record("ERROR" if not self._closing else "DEBUG", message or "asyncio error", data=data)

    def _cleanup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let the sequence's tasks and async generators end (bounded), then close the loop."""
        self._closing = True
        try:
            tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=CLEANUP_SECONDS))
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), CLEANUP_SECONDS))
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user cleanup code; we are done anyway
            self.log.record("DEBUG", f"Cleanup: {exc!r}")
        finally:
            loop.close()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        _hard_exit(EXIT_OK)


class _UserExit(Exception):
    """SystemExit raised by the sequence, carried out of its task as an ordinary exception."""

    def __init__(self, code: Any) -> None:
        super().__init__(code)
        self.code = code


def main(created: int | None = None) -> NoReturn:
    """Run the sequence the environment describes and exit; ``created``: process start, ms."""
    created = created if created is not None else int(time.time() * 1000)
    try:
        env = _Env(os.environ)
    except ValueError as exc:
        sys.stderr.write(f"spacehub python runner: invalid environment: {exc}\n")
        sys.stderr.flush()
        os._exit(EXIT_BAD_ENV)
    _setup_stdio()
    runner = _Runner(env, created)
    signal.signal(signal.SIGTERM, runner._on_sigterm)
    code = runner.run()
    _flush_stdio()
    if code != EXIT_OK:
        os._exit(code)  # failures end at once: no finalisation of a half-run sequence
    main_thread = threading.main_thread()
    if any(t.is_alive() and not t.daemon and t is not main_thread for t in threading.enumerate()):
        os._exit(code)  # the sequence left threads running: do not linger for them
    sys.exit(code)
