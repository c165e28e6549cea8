"""What every part of the Python runner shares: its bounds and exit codes, the records it
writes to fds 4 (monitoring) and 7 (log), stdio, the environment, and small helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Generator, Mapping
from types import CoroutineType, GeneratorType
from typing import Any, Final, NoReturn

from spacehub.protocol.runner import (
    FD_CONTROL,
    FD_INPUT,
    FD_LOG,
    FD_MONITORING,
    FD_OUTPUT,
    FD_STDERR,
    FD_STDOUT,
)

EXIT_OK: Final = 0
EXIT_BAD_ENV: Final = 20
EXIT_BAD_MAIN: Final = 21
EXIT_START_FAILED: Final = 22
EXIT_RUN_FAILED: Final = 23

#: Largest read from the input, stdin and control fds; also the largest bytes item.
CHUNK_SIZE: Final = 64 * 1024
#: Output items are coalesced up to this many bytes before they reach the transport.
OUTPUT_FLUSH_BYTES: Final = 64 * 1024
#: The output transport asks us to wait (drain) above this many buffered bytes.
OUTPUT_HIGH_WATER: Final = 256 * 1024
#: A text line or NDJSON record longer than this is not held whole (see _InputSource).
MAX_INPUT_LINE: Final = 16 * 1024 * 1024
HEARTBEAT_SECONDS: Final = 1.0
HEALTH_CHECK_TIMEOUT: Final = 1.0
#: STOP's timeout is the hub's; we wait at least this long for an async stop handler
#: (the hub still sends KILL when its own timeout passes, which ends us at once).
MIN_STOP_WAIT: Final = 1.0
DEFAULT_STOP_TIMEOUT_MS: Final = 7000
#: Longest wait for flushing stdout/stderr before a hard exit (the pipe may be full).
EXIT_FLUSH_SECONDS: Final = 0.5
#: Longest wait for cancelled tasks and async generators after the sequence completed.
CLEANUP_SECONDS: Final = 1.0
#: A ``run`` that keeps the loop busy this long gets its PANG sent by a thread.
PANG_GRACE_SECONDS: Final = 0.2
#: Longest wait of a STOP or an event for ``run`` to have registered its handlers (the
#: first PANG marks that; it is sent within PANG_GRACE_SECONDS unless run raised).
START_WAIT_SECONDS: Final = 1.0
#: A sync iterable yields to the loop after this many items.
SYNC_YIELD_EVERY: Final = 1024
#: Malformed control lines tolerated in one read before the channel counts as broken.
MAX_BAD_CONTROL_LINES: Final = 64

_NDJSON_TYPES: Final = frozenset({"application/x-ndjson", "text/x-ndjson"})
_PREAMBLE_START: Final = b"content-type:"
_LEVEL_NAMES: Final = {"WARNING": "WARN", "CRITICAL": "FATAL"}


class _End:
    """The end-of-input marker (``None`` cannot be one: scramjet ends a stream on ``None``)."""

    __slots__ = ()


_END: Final = _End()


class _Exit(Exception):
    """Ends the runner with ``code``; whatever had to be reported has been reported."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class OutputGone(Exception):
    """The hub closed its end of the output pipe (EPIPE): whatever is left to write is
    dropped, and the sequence's producer must stop rather than write to a dead pipe."""


class _ControlBroken(Exception):
    """The control channel cannot be read any more."""


class _RecordWriter:
    """Blocking writes of whole records to an inherited fd, from any thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._broken = False

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._broken:
                return
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:
                # The hub closed its end: there is nobody left to tell, and the control
                # channel's EOF ends us shortly.
                self._broken = True


class _Log:
    """NDJSON log records on fd 7: ``{"ts", "level", "from", "msg", "data"?}``."""

    def __init__(self, writer: _RecordWriter) -> None:
        self._writer = writer

    def record(self, level: str, msg: str, source: str = "Runner", data: list[Any] | None = None) -> None:
        entry: dict[str, Any] = {"ts": int(time.time() * 1000), "level": level, "from": source, "msg": msg}
        if data:
            entry["data"] = data
        line = json.dumps(entry, default=repr) + "\n"
        self._writer.write(line.encode("utf-8", "backslashreplace"))


class _NdjsonHandler(logging.Handler):
    """Sends the sequence logger's records to fd 7."""

    def __init__(self, log: _Log) -> None:
        super().__init__(logging.DEBUG)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        data: list[Any] = []
        msg = str(record.msg)
        args = record.args
        if args and "%" not in msg:
            # console-style calls (logger.info("x", obj), as in the original samples):
            # the arguments are data, not formatting
            data.extend(args if isinstance(args, tuple) else [args])
        else:
            try:
                msg = record.getMessage()
            except (TypeError, ValueError):
                data.extend(args if isinstance(args, tuple) else [args])
        if record.exc_info and record.exc_info[1] is not None:
            data.append("".join(traceback.format_exception(record.exc_info[1])))
        level = _LEVEL_NAMES.get(record.levelname, record.levelname)
        self._log.record(level, msg, source="Sequence", data=data)


class _SequenceLogger(logging.Logger):
    """``logging.Logger`` with the ``warn`` alias the original runner's sequences use."""

    def warn(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.warning(msg, *args, **kwargs)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to save
                stream.flush()


def _hard_exit(code: int) -> NoReturn:
    """Exit now from any thread, after a bounded best-effort flush of stdout/stderr.

    The flush runs in its own thread because the main thread may hold the stdout
    buffer's lock while blocked on a full pipe; ``os._exit`` because the loop may be busy.
    """
    try:
        flusher = threading.Thread(target=_flush_stdio, name="exit-flush", daemon=True)
        flusher.start()
        flusher.join(EXIT_FLUSH_SECONDS)
    except RuntimeError:
        pass  # no new threads at interpreter shutdown: exit unflushed
    os._exit(code)


def _setup_stdio() -> None:
    """Line-buffered UTF-8 stdout/stderr on fds 1/2 so ``print`` reaches the hub promptly."""
    for fd in (FD_STDOUT, FD_STDERR, FD_CONTROL, FD_MONITORING, FD_LOG):
        with contextlib.suppress(OSError):
            os.set_blocking(fd, True)  # our writes and the control reads are blocking by design
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=True)


class _Env:
    """The validated ``SPACEHUB_*`` environment."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        """Raises ValueError with a one-line reason."""
        self.sequence_dir = environ.get("SPACEHUB_SEQUENCE_DIR", "")
        if not self.sequence_dir or not os.path.isabs(self.sequence_dir):
            raise ValueError("SPACEHUB_SEQUENCE_DIR must be an absolute path")
        self.main = environ.get("SPACEHUB_SEQUENCE_MAIN", "")
        if not self.main:
            raise ValueError("SPACEHUB_SEQUENCE_MAIN is missing")
        self.instance_id = environ.get("SPACEHUB_INSTANCE_ID", "")
        if not self.instance_id:
            raise ValueError("SPACEHUB_INSTANCE_ID is missing")
        try:
            info = json.loads(environ.get("SPACEHUB_RUNNER_INFO", ""))
        except ValueError:
            raise ValueError("SPACEHUB_RUNNER_INFO is missing or not JSON") from None
        if not isinstance(info, dict):
            raise ValueError("SPACEHUB_RUNNER_INFO must be a JSON object")
        app_config = info.get("appConfig") or {}
        args = info.get("args") or []
        if not isinstance(app_config, dict) or not isinstance(args, list):
            raise ValueError("SPACEHUB_RUNNER_INFO: appConfig must be an object and args a list")
        self.app_config: dict[str, Any] = app_config
        self.args: list[Any] = args
        self.input_topic = info.get("inputTopic") if isinstance(info.get("inputTopic"), str) else ""
        self.output_topic = info.get("outputTopic") if isinstance(info.get("outputTopic"), str) else ""
        for fd in (FD_CONTROL, FD_MONITORING, FD_INPUT, FD_OUTPUT, FD_LOG):
            try:
                os.fstat(fd)
            except OSError:
                raise ValueError(f"fd {fd} is not open (the hub sets up fds 3-7)") from None


def _resolve_main(sequence_dir: str, main: str) -> str | None:
    """The entry point's real path, or None unless it is a .py file inside the package."""
    root = os.path.realpath(sequence_dir)
    path = os.path.realpath(os.path.join(root, main))
    if path == root or os.path.commonpath([root, path]) != root:
        return None
    if not path.endswith(".py") or not os.path.isfile(path):
        return None
    return path


#: inspect.CO_ITERABLE_COROUTINE: a generator made awaitable by types.coroutine.
_CO_ITERABLE_COROUTINE: Final = 0x100


def _isawaitable(value: Any) -> bool:
    """``inspect.isawaitable`` (which this is a copy of) without importing inspect."""
    return (
        isinstance(value, CoroutineType)
        or (isinstance(value, GeneratorType) and bool(value.gi_code.co_flags & _CO_ITERABLE_COROUTINE))
        or isinstance(value, Awaitable)
    )


async def _await(awaitable: Awaitable[Any]) -> Any:
    """A coroutine around any awaitable (run_coroutine_threadsafe takes coroutines only)."""
    return await awaitable


def _call_flexible(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Call a user callback with as many of ``args`` as its signature takes.

    The original runner's samples register handlers with fewer parameters than the
    runner passes (``lambda: ...`` as a stop handler), so trailing arguments are dropped
    rather than failing with a TypeError.
    """
    import inspect  # here: see _STAND_INS

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn(*args)
    for count in range(len(args), -1, -1):
        try:
            signature.bind(*args[:count])
        except TypeError:
            continue
        return fn(*args[:count])
    return fn(*args)  # let Python report the mismatch


def _attr(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - a user property may raise anything; it then declares nothing
        return None


def _declaration(value: Any, key: str) -> tuple[str, str]:
    """(topic, content type) from ``{"provides"|"requires": topic, "contentType": ct}`` or a topic string."""
    if isinstance(value, dict):
        topic, content_type = value.get(key), value.get("contentType")
        return (
            topic if isinstance(topic, str) else "",
            content_type if isinstance(content_type, str) else "",
        )
    if isinstance(value, str):
        return value, ""
    return "", ""


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _as_seconds(value: Any) -> float:
    """keep_alive's timeout: a number of seconds (the original samples pass strings too)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return 0.0
    return seconds if seconds > 0 else 0.0


def _is_falsy(value: Any) -> bool:
    try:
        return not value
    except Exception:  # noqa: BLE001 - __bool__ of user objects (numpy arrays) may raise; such values are output
        return False


def _is_async_iterable(value: Any) -> bool:
    return hasattr(type(value), "__aiter__")


class _KeepAlive:
    """What ``context.keep_alive()`` returns: ALIVE is already sent; awaiting sleeps ``seconds``.

    Sending at call time lets a sync stop handler keep the instance alive too; being an
    awaitable object (not a coroutine) avoids "never awaited" warnings when it is not awaited.
    """

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __await__(self) -> Generator[Any, None, None]:
        return asyncio.sleep(self.seconds).__await__()
