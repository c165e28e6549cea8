"""The runner's main loop: loads the sequence, handshakes with the hub, runs ``run`` on
the asyncio loop, writes what it returns and ends with the right exit code.

The control channel (fd 3: events, STOP, KILL) and the heartbeat (fd 4) run in threads
of their own; they are ``_Runner``'s base class, in control.py. See ``__init__``'s
docstring for the whole.
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
from collections.abc import Callable
from types import ModuleType
from typing import Any, NoReturn

from spacehub.protocol.runner import (
    FD_OUTPUT,
    Code,
)

from .base import (
    CLEANUP_SECONDS,
    EXIT_BAD_ENV,
    EXIT_BAD_MAIN,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_START_FAILED,
    PANG_GRACE_SECONDS,
    OutputGone,
    _attr,
    _declaration,
    _Env,
    _Exit,
    _flush_stdio,
    _hard_exit,
    _is_async_iterable,
    _is_falsy,
    _isawaitable,
    _media_type,
    _resolve_main,
    _setup_stdio,
)
from .context import AppContext
from .control import ControlChannel
from .input import _AsyncStdin, _InputSource
from .output import _Output, write_result
from .scramjet_input import _import_scramjet, _scramjet_input, _SimpleStream


class _Runner(ControlChannel):
    """One sequence's run: load it, handshake, run it on the loop, write its output, end.

    The control channel and the heartbeat are the base class's (control.py).
    """

    def __init__(self, env: _Env, created: int) -> None:
        super().__init__(env.instance_id, created, env.app_config, env.args)
        self.env = env
        self.module: ModuleType | None = None
        self._pang_lock = threading.Lock()
        self._pangs_sent: list[dict[str, str]] | None = None
        self._result: Any = None
        self._scramjet: tuple[Any, Any] = (None, None)
        self._fatal: asyncio.Future[None] | None = None
        self._closing = False
        self._output: _Output | None = None

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
        self.start_threads()
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
                    with contextlib.suppress(OutputGone):
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
            self._output = _Output()
            await write_result(self._output, result, _media_type(out_type))
        except OutputGone:
            self.log.record("WARN", "The hub closed the output; the rest of it was dropped")

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
