"""The Python runner's body: the context one Sequence runs in, inside an Instance process.

``runner.py`` next to this file is the entry point (``python3 runner.py``); it only loads
this module, so that it comes from its .pyc (see there). Standard library only, plus
``scramjet.streams`` when importable; no trio.

Theory of operation
-------------------
The hub starts ``python3 runner.py`` with the channels of :mod:`spacehub.protocol.runner`
already open as fds 0-7 (0 stdin, 1 stdout, 2 stderr, 3 control, 4 monitoring, 5 input,
6 output, 7 log) and the sequence described by the environment: ``SPACEHUB_SEQUENCE_DIR``
(absolute), ``SPACEHUB_SEQUENCE_MAIN`` (package.json ``main``, relative to it),
``SPACEHUB_INSTANCE_ID`` and ``SPACEHUB_RUNNER_INFO`` (JSON: appConfig, args, inputTopic?,
outputTopic?). The runner loads the sequence module, sends PING, waits for PONG, then
calls ``run(context, input, *args)``, sends PANG and writes what ``run`` returns to fd 6.

Threads, and why there are several::

    main       the asyncio loop: run(), its input (fd 5), its output (fd 6), sys.stdin (fd 0)
    control    blocking reads of fd 3; delivers events and handles STOP/KILL even while the
               loop is blocked (a sequence flooding a stdout nobody reads blocks its own loop)
    heartbeat  MONITORING every second, also while the loop is blocked
    stop       one per STOP, so a slow stop handler never holds back a KILL

Writes to fd 4 (monitoring) and fd 7 (log) are blocking writes of whole records under
one lock per fd: the hub drains both constantly, and a record must never interleave.
Everything the sequence reads or writes on fds 0, 5 and 6 goes through the loop with
back-pressure, never read whole into memory.

Exit codes: 0 completed, stopped, killed or hub gone; 20 bad environment; 21 bad entry
point; 22 failed on start; 23 failed during execution.
"""

from __future__ import annotations

import importlib
import sys
from types import CoroutineType, GeneratorType, ModuleType
from typing import Any, Final, NoReturn


class _StandIn(ModuleType):
    """Takes the place of a module while the runner loads (see _STAND_INS).

    The first attribute asked of it that it does not have imports the real module, which
    then replaces it in every module that imported it meanwhile.
    """

    def __init__(self, name: str, **constants: int) -> None:
        super().__init__(name)
        vars(self).update(constants)
        #: the namespaces that hold this stand-in under its module's name
        self._spacehub_holders: list[dict[str, Any]] = []

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:  # asked for while the runner loads
            del sys.modules[name]
        module = importlib.import_module(name)
        for namespace in self._spacehub_holders:
            if namespace.get(name) is self:
                namespace[name] = module
        return getattr(module, attr)


# Every instance loads asyncio, and what asyncio imports costs RSS in each of them, although
# an idle instance (like most) uses only part of it. So while the runner's modules load:
# - ssl is hidden: asyncio imports it only to offer TLS, and loading OpenSSL costs ~4.5 MB.
#   asyncio then sets its ``ssl`` globals to None, as on a Python built without ssl, and
#   _AsyncioSslFinder hands ssl to it as soon as anything imports ssl.
# - modules that asyncio, dataclasses, traceback and socket import but use only on rare
#   paths are _StandIn objects, loaded on first use (~1.5 MB in all): inspect, with ast
#   and dis (asyncio's debug mode, ensure_future of an awaitable that is no coroutine, a
#   dataclass without docstring; the runner avoids it on its common paths), subprocess
#   (asyncio's subprocesses; asyncio reads only these constants, subprocess's own values,
#   when it loads), tokenize (linecache reading a source line for a traceback), textwrap
#   (the traceback of an exception group) and array (socket.send_fds/recv_fds).
_DEFER_SSL: Final = "ssl" not in sys.modules
_STAND_INS: Final = {
    name: _StandIn(name, **constants)
    for name, constants in (
        ("inspect", {}),
        ("subprocess", {"PIPE": -1, "STDOUT": -2, "DEVNULL": -3}),
        ("tokenize", {}),
        ("textwrap", {}),
        ("array", {}),
    )
    if name not in sys.modules
}


def _end_loading() -> None:
    """The runner's modules are loaded: ssl and the stand-ins leave sys.modules, so that
    importing one of them from now on loads the real module."""
    if _DEFER_SSL:
        del sys.modules["ssl"]
    for name, stand_in in _STAND_INS.items():
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        stand_in._spacehub_holders = [
            vars(module)
            for module in list(sys.modules.values())
            if type(module) is ModuleType and vars(module).get(name) is stand_in
        ]


if _DEFER_SSL:
    sys.modules["ssl"] = None  # type: ignore[assignment]
sys.modules.update(_STAND_INS)
try:
    import asyncio
    import codecs
    import contextlib
    import importlib.util
    import json
    import logging
    import os
    import signal
    import stat
    import threading
    import time
    import traceback
    from collections import deque
    from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
    from importlib.machinery import ModuleSpec

    try:
        from spacehub.protocol.runner import (
            FD_CONTROL,
            FD_INPUT,
            FD_LOG,
            FD_MONITORING,
            FD_OUTPUT,
            FD_STDERR,
            FD_STDIN,
            FD_STDOUT,
            MAX_PREAMBLE_BYTES,
            Code,
            Message,
            MessageReader,
            PreambleReader,
            ProtocolError,
            encode,
        )
    except ImportError as _exc:  # pragma: no cover - only when the hub forgot PYTHONPATH
        sys.stderr.write(
            f"spacehub runner: cannot import spacehub.protocol.runner ({_exc}); check PYTHONPATH\n"
        )
        raise SystemExit(20) from None
finally:
    _end_loading()


def _hand_ssl_to_asyncio(ssl: ModuleType) -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("asyncio.") and module is not None and vars(module).get("ssl", ssl) is None:
            setattr(module, "ssl", ssl)  # noqa: B010 - a module global, not a typed attribute
    sslproto = sys.modules.get("asyncio.sslproto")
    if sslproto is not None and not hasattr(sslproto, "SSLAgainErrors"):
        # computed at import by asyncio.sslproto only when ssl was there
        setattr(sslproto, "SSLAgainErrors", (ssl.SSLWantReadError, ssl.SSLSyscallError))  # noqa: B010


class _AsyncioSslFinder:
    """Finds ssl the normal way and, once it is loaded, gives it to asyncio (see _DEFER_SSL)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "ssl":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once is enough, and find_spec below must not find us
        spec = importlib.util.find_spec("ssl")
        loader = spec.loader if spec is not None else None
        if loader is None:
            return spec
        exec_module = loader.exec_module

        def exec_and_hand_over(module: ModuleType) -> None:
            exec_module(module)
            _hand_ssl_to_asyncio(module)

        loader.exec_module = exec_and_hand_over  # type: ignore[method-assign]
        return spec


if _DEFER_SSL:
    sys.meta_path.insert(0, _AsyncioSslFinder())

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


class _OutputGone(Exception):
    """The hub closed its end of the output pipe."""


class _ControlBroken(Exception):
    """The control channel cannot be read any more."""


# --------------------------------------------------------------------------- fds 4 and 7


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


# --------------------------------------------------------------------------- stdio, exits


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


# --------------------------------------------------------------------------- environment


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


# --------------------------------------------------------------------------- small helpers


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


def _encode_raw(item: Any) -> bytes:
    """text/plain, octet-stream and unknown types: bytes as-is, everything else as UTF-8 text."""
    if type(item) is bytes:
        return item
    if type(item) is str:
        try:
            return item.encode()
        except UnicodeEncodeError:  # lone surrogates: keep the data visible rather than fail
            return item.encode("utf-8", "backslashreplace")
    if item is None:
        return b""
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    return str(item).encode("utf-8", "backslashreplace")


def _encode_ndjson(item: Any) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)  # already encoded by the sequence
    return (json.dumps(item) + "\n").encode()


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


# --------------------------------------------------------------------------- input side


class _FdReader:
    """Reads an inherited fd through the loop: a pipe transport when the fd is a pipe or
    socket (never blocks the loop, pauses reading when the buffer is full), else blocking
    reads in the default executor (regular files, /dev/null: epoll refuses those)."""

    def __init__(self, fd: int, *, close: bool) -> None:
        self._fd = fd
        self._close = close
        self._reader: asyncio.StreamReader | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._opened = False

    async def _open(self) -> None:
        self._opened = True
        loop = asyncio.get_running_loop()
        mode = os.fstat(self._fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            reader = asyncio.StreamReader(limit=CHUNK_SIZE)
            pipe = open(self._fd, "rb", buffering=0, closefd=self._close)  # noqa: SIM115 - the transport owns it
            self._transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe
            )
            self._reader = reader

    async def read(self) -> bytes:
        """Up to CHUNK_SIZE bytes; b"" at end of stream."""
        if not self._opened:
            await self._open()
        if self._reader is not None:
            return await self._reader.read(CHUNK_SIZE)
        return await asyncio.get_running_loop().run_in_executor(None, os.read, self._fd, CHUNK_SIZE)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class _Source:
    """Where the input's items come from: ``next()`` gives one item or ``_END``."""

    async def next(self) -> Any:
        raise NotImplementedError

    async def iterate(self) -> AsyncIterator[Any]:
        while (item := await self.next()) is not _END:
            yield item


class _InputSource(_Source):
    """The sequence's input (fd 5) as typed items, read on demand.

    One chunk is read only when the decoded items of the previous one are used up, so
    a slow sequence back-pressures the hub through the pipe. Items: text/plain → str
    lines with their "\\n" (a partial last line at EOF too); NDJSON → one JSON value per
    non-empty line (``null`` is skipped: scramjet ends a stream on None); anything else →
    bytes chunks.
    """

    def __init__(self, runner: _Runner) -> None:
        self._runner = runner
        self._items: deque[Any] = deque()
        self._eof = False
        self._lock = asyncio.Lock()
        self._reader: _FdReader | None = None
        self._kind = ""
        self._rest = b""
        self._decoder: codecs.IncrementalDecoder | None = None
        self._text_tail = ""
        self._bytes_tail = b""
        self._skipping = False

    async def next(self) -> Any:
        """The next item, or ``_END``."""
        items = self._items
        while not items:
            if self._eof:
                return _END
            async with self._lock:  # one refill at a time; readers queue behind it
                if not items and not self._eof:
                    await self._fill()
        return items.popleft()

    async def iterate(self) -> AsyncIterator[Any]:
        items = self._items
        while True:
            if items:
                yield items.popleft()
                continue
            item = await self.next()
            if item is _END:
                return
            yield item

    async def _fill(self) -> None:
        try:
            if self._reader is None:
                await self._start()
                if self._eof:  # ended before any data: nothing to decode
                    self._finish()
                    return
            if self._rest:
                chunk, self._rest = self._rest, b""
            else:
                assert self._reader is not None
                chunk = await self._reader.read()
        except (OSError, ValueError, RuntimeError) as exc:
            self._runner.log.record("ERROR", f"Reading the input failed: {exc!r}")
            chunk = b""
        if chunk:
            self._decode(chunk)
        else:
            self._finish()

    async def _start(self) -> None:
        self._reader = _FdReader(FD_INPUT, close=True)
        content_type = self._runner.declared_input_type()
        if content_type:
            await self._skip_preamble(content_type)
        else:
            content_type = await self._read_preamble()
        kind = _media_type(content_type or "")
        self._kind = "ndjson" if kind in _NDJSON_TYPES else "text" if kind == "text/plain" else "bytes"
        if self._kind == "text":
            self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._runner.log.record("DEBUG", f"Input content type: {content_type or 'none (empty input)'}")

    async def _read_preamble(self) -> str:
        assert self._reader is not None
        preamble = PreambleReader()
        seen = False
        while True:
            data = await self._reader.read()
            if not data:
                if seen:
                    self._runner.log.record("ERROR", "Input ended inside its Content-Type preamble")
                self._eof = True  # no preamble at all: an empty input, not an error
                return ""
            seen = True
            try:
                complete = preamble.receive_data(data)
            except ProtocolError as exc:
                self._runner.log.record("ERROR", f"Bad input preamble ({exc}); input ignored")
                self._eof = True
                return ""
            if complete:
                self._rest = preamble.rest
                assert preamble.headers is not None
                return preamble.headers.get("content-type", "")

    async def _skip_preamble(self, declared: str) -> None:
        """With a declared type no preamble is due, but a hub may still send one (topic
        input): input that opens with a complete ``Content-Type: ...\\r\\n\\r\\n`` loses it."""
        assert self._reader is not None
        data = b""
        while True:
            chunk = await self._reader.read()
            data += chunk
            head = data[: len(_PREAMBLE_START)].lower()
            if not chunk or not _PREAMBLE_START.startswith(head) or len(data) > MAX_PREAMBLE_BYTES:
                break  # the end, or not a preamble: it is all input
            if len(head) == len(_PREAMBLE_START) and b"\r\n\r\n" in data:
                preamble = PreambleReader()
                try:
                    preamble.receive_data(data)
                except ProtocolError:
                    break  # looked like one, is not: input
                sent = (preamble.headers or {}).get("content-type", "")
                if _media_type(sent) != _media_type(declared):
                    self._runner.log.record("WARN", f"Input sent as {sent}, read as the declared {declared}")
                data = preamble.rest
                break
        self._rest = data

    def _decode(self, chunk: bytes) -> None:
        if self._kind == "text":
            assert self._decoder is not None
            lines = (self._text_tail + self._decoder.decode(chunk)).split("\n")
            tail = lines.pop()
            if lines:
                self._items.extend([line + "\n" for line in lines])
            if len(tail) > MAX_INPUT_LINE:  # no line break in sight: hand it over as it is
                self._items.append(tail)
                tail = ""
            self._text_tail = tail
        elif self._kind == "ndjson":
            records = (self._bytes_tail + chunk).split(b"\n")
            rest = records.pop()
            for record in records:
                if self._skipping:  # the rest of an over-long record
                    self._skipping = False
                    continue
                self._parse_json(record)
            if len(rest) > MAX_INPUT_LINE:
                self._runner.log.record("ERROR", f"NDJSON input record over {MAX_INPUT_LINE} B dropped")
                self._skipping = True
                rest = b""
            self._bytes_tail = rest
        else:
            self._items.append(chunk)

    def _parse_json(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            value = json.loads(line)
        except ValueError as exc:  # one bad record must not end (or hang) the whole input
            self._runner.log.record("ERROR", f"Invalid NDJSON input record skipped: {exc}")
            return
        if value is not None:
            self._items.append(value)

    def _finish(self) -> None:
        if self._kind == "text" and self._decoder is not None:
            tail = self._text_tail + self._decoder.decode(b"", final=True)
            if tail:
                self._items.append(tail)
        elif self._kind == "ndjson" and self._bytes_tail and not self._skipping:
            self._parse_json(self._bytes_tail)
        self._text_tail, self._bytes_tail = "", b""
        self._eof = True
        if self._reader is not None:
            self._reader.close()


_MAP: Final = "map"
_FILTER: Final = "filter"
_EACH: Final = "each"
_SKIP: Final = _End()  # internal to _TransformSource: this item is dropped


class _TransformSource(_Source):
    """``map``/``filter``/``each`` of another source, one item at a time, in order.

    Semantics follow scramjet: a map result of None ends the stream (None is scramjet's
    end marker), ``drop`` (scramjet's DropChunk) drops the item; an awaitable result is
    awaited.
    """

    def __init__(
        self, upstream: _Source, kind: str, func: Callable[..., Any], args: tuple[Any, ...], drop: Any
    ) -> None:
        self._upstream = upstream
        self._kind = kind
        self._func = func
        self._args = args
        self._drop = drop
        self._ended = False

    async def _apply(self, item: Any) -> Any:
        result = self._func(item, *self._args)
        if _isawaitable(result):
            result = await result
        if self._kind is _MAP:
            if result is None:
                self._ended = True
                return _END
            return _SKIP if result is self._drop else result
        if self._kind is _FILTER:
            return item if result else _SKIP
        return item

    async def next(self) -> Any:
        while not self._ended:
            item = await self._upstream.next()
            if item is _END:
                return _END
            result = await self._apply(item)
            if result is not _SKIP:
                return result
        return _END

    async def iterate(self) -> AsyncIterator[Any]:
        if self._ended:
            return
        async for item in self._upstream.iterate():
            result = await self._apply(item)
            if result is _END:
                return
            if result is not _SKIP:
                yield result


class _SimpleStream:
    """The input when scramjet is not importable: just enough of its Stream API."""

    def __init__(self, source: _Source) -> None:
        self._source = source

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._source.iterate()

    async def read(self) -> Any:
        item = await self._source.next()
        return None if item is _END else item

    def map(self, func: Callable[..., Any], *args: Any) -> _SimpleStream:
        return _SimpleStream(_TransformSource(self._source, _MAP, func, args, _SKIP))

    def filter(self, func: Callable[..., Any], *args: Any) -> _SimpleStream:
        return _SimpleStream(_TransformSource(self._source, _FILTER, func, args, _SKIP))

    def each(self, func: Callable[..., Any], *args: Any) -> _SimpleStream:
        return _SimpleStream(_TransformSource(self._source, _EACH, func, args, _SKIP))

    async def to_list(self) -> list[Any]:
        return [item async for item in self]


_SCRAMJET_METHODS: Final = ("_uncork", "_mark_consumed", "write", "end", "read", "__aiter__", "map", "each")


def _scramjet_input(stream_cls: Any, drop: Any, source: _InputSource) -> Any:
    """The input as a ``scramjet.streams.Stream`` (a subclass, so isinstance holds).

    Scramjet hands every item through a task of its own (~10 µs), which caps a text
    input near 5 MB/s. So while nothing but iteration, ``read`` and sync
    ``map``/``filter``/``each`` is asked of the input, items come straight from the source
    through those transforms (in order, one at a time: async transforms, which scramjet
    runs concurrently, are left to scramjet). Anything else (``pipe``, ``to_list``,
    ``batch``, ...) uncorks the stream: a feeder task then writes the remaining items into
    scramjet as ``Stream.read_from`` would. This leans on scramjet internals (``_uncork``,
    ``_consumed``), so a vendored copy without them gets the plain ``read_from`` stream.
    """
    if drop is None or not all(hasattr(stream_cls, name) for name in _SCRAMJET_METHODS):
        return stream_cls.read_from(source.iterate())

    class InputStream(stream_cls):  # type: ignore[misc]
        _spacehub_source: _Source | None = None
        _spacehub_feeder: asyncio.Task[None] | None = None

        def _direct(self) -> bool:
            return (
                self._spacehub_source is not None
                and self._spacehub_feeder is None
                and not getattr(self, "_consumed", False)
            )

        def _uncork(self) -> None:
            source = self._spacehub_source
            if source is not None and self._spacehub_feeder is None:
                self._spacehub_feeder = asyncio.get_running_loop().create_task(self._spacehub_feed(source))
            super()._uncork()

        async def _spacehub_feed(self, source: _Source) -> None:
            try:
                while (item := await source.next()) is not _END:
                    await self.write(item)
            finally:
                self.end()

        def __aiter__(self) -> AsyncIterator[Any]:
            if self._direct():
                assert self._spacehub_source is not None
                return self._spacehub_source.iterate()
            return super().__aiter__()  # type: ignore[no-any-return]

        async def read(self) -> Any:
            if self._direct():
                assert self._spacehub_source is not None
                item = await self._spacehub_source.next()
                return None if item is _END else item
            return await super().read()

        def _spacehub_transform(self, kind: str, func: Callable[..., Any], args: tuple[Any, ...]) -> Any:
            import inspect  # here: see _STAND_INS

            if not self._direct() or inspect.iscoroutinefunction(func):
                return None
            assert self._spacehub_source is not None
            self._mark_consumed()  # as scramjet does: a stream is transformed once
            child = InputStream(name=f"{self.name}+{kind[0]}")
            child._spacehub_source = _TransformSource(self._spacehub_source, kind, func, args, drop)
            return child

        def map(self, func: Callable[..., Any], *args: Any) -> Any:
            return self._spacehub_transform(_MAP, func, args) or super().map(func, *args)

        def filter(self, func: Callable[..., Any], *args: Any) -> Any:
            return self._spacehub_transform(_FILTER, func, args) or super().filter(func, *args)

        def each(self, func: Callable[..., Any], *args: Any) -> Any:
            return self._spacehub_transform(_EACH, func, args) or super().each(func, *args)

    stream = InputStream(name="input")
    stream._spacehub_source = source
    return stream


def _import_scramjet() -> tuple[Any, Any]:
    """scramjet's (Stream, DropChunk); (None, None) without scramjet, DropChunk None if absent."""
    try:
        from scramjet.streams import Stream
    except Exception:  # noqa: BLE001 - a vendored copy may fail in any way; we then use _SimpleStream
        return None, None
    try:
        from scramjet.pyfca import DropChunk
    except Exception:  # noqa: BLE001 - as above
        return Stream, None
    return Stream, DropChunk


# --------------------------------------------------------------------------- sys.stdin


class _AsyncStdin:
    """``sys.stdin`` for sequences: fd 0 decoded as UTF-8, read through the loop.

    ``await sys.stdin.read()``, ``await sys.stdin.readline()``, ``async for line in sys.stdin``.
    """

    encoding = "utf-8"

    def __init__(self) -> None:
        self._reader: _FdReader | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buffer = ""
        self._scan = 0
        self._eof = False
        self._lock: asyncio.Lock | None = None

    async def _fill(self) -> bool:
        """Append one chunk to the buffer; False at end of stream."""
        if self._eof:
            return False
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._reader is None:
                self._reader = _FdReader(FD_STDIN, close=False)
            try:
                chunk = await self._reader.read()
            except (OSError, ValueError):
                chunk = b""
            self._buffer += self._decoder.decode(chunk, final=not chunk)
            if not chunk:
                self._eof = True
                self._reader.close()
            return bool(chunk)

    async def readline(self) -> str:
        """One line with its "\\n"; "" at end of stream."""
        while True:
            end = self._buffer.find("\n", self._scan)
            if end >= 0:
                line, self._buffer, self._scan = self._buffer[: end + 1], self._buffer[end + 1 :], 0
                return line
            self._scan = len(self._buffer)
            if not await self._fill():
                line, self._buffer, self._scan = self._buffer, "", 0
                return line

    async def read(self, size: int = -1) -> str:
        """All of stdin (or up to ``size`` characters)."""
        while (size < 0 or len(self._buffer) < size) and await self._fill():
            pass
        if size < 0:
            size = len(self._buffer)
        data, self._buffer, self._scan = self._buffer[:size], self._buffer[size:], 0
        return data

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        while line := await self.readline():
            yield line

    def fileno(self) -> int:
        return FD_STDIN

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return True


# --------------------------------------------------------------------------- output side


class _WriteProtocol(asyncio.BaseProtocol):
    """Flow control for the output pipe transport."""

    def __init__(self) -> None:
        self.paused = False
        self.lost = False
        self._waiter: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_writable(self) -> None:
        while self.paused and not self.lost:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self.lost:
            raise _OutputGone


class _Output:
    """The sequence's output (fd 6).

    Items are coalesced into writes of up to OUTPUT_FLUSH_BYTES: a write per 76-byte line
    would spend more on syscalls than on the data. What is pending is flushed as soon as
    the producing task yields to the loop (``call_soon``), so a slow producer's items are
    not delayed. ``must_drain`` turns true when the transport buffers more than
    OUTPUT_HIGH_WATER; the writer then awaits ``drain`` — back-pressure without blocking.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.WriteTransport | None = None
        self._protocol: _WriteProtocol | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._flush_scheduled = False
        self._opened = False
        self._closed = False

    async def open(self) -> None:
        self._opened = True
        self._loop = loop = asyncio.get_running_loop()
        mode = os.fstat(FD_OUTPUT).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            pipe = open(FD_OUTPUT, "wb", buffering=0)  # noqa: SIM115 - the transport owns (and closes) it
            transport, protocol = await loop.connect_write_pipe(_WriteProtocol, pipe)
            transport.set_write_buffer_limits(high=OUTPUT_HIGH_WATER)
            self._transport, self._protocol = transport, protocol

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending_size and len(data) >= OUTPUT_FLUSH_BYTES:
            self._send(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._transport is None:
            return  # blocking mode: written by drain()
        if self._pending_size >= OUTPUT_FLUSH_BYTES:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            self._send(data)

    def _send(self, data: bytes) -> None:
        if self._transport is None:
            self._pending.append(data)
            self._pending_size += len(data)
        elif not self._protocol or not self._protocol.lost:
            self._transport.write(data)

    @property
    def must_drain(self) -> bool:
        if self._protocol is not None:
            return self._protocol.paused or self._protocol.lost
        return self._pending_size >= OUTPUT_FLUSH_BYTES

    async def drain(self) -> None:
        if self._protocol is not None:
            await self._protocol.wait_writable()
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        try:
            await asyncio.get_running_loop().run_in_executor(None, _write_all, FD_OUTPUT, data)
        except BrokenPipeError:
            raise _OutputGone from None

    async def close(self) -> None:
        """Write what is pending and close fd 6, so the hub sees the output's end."""
        if self._closed:
            return
        self._closed = True
        if not self._opened:
            os.close(FD_OUTPUT)
            return
        if self._transport is None:
            await self.drain()
            os.close(FD_OUTPUT)
            return
        self._flush()
        assert self._protocol is not None
        self._transport.close()  # writes the buffer out first
        await self._protocol.closed


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --------------------------------------------------------------------------- context


class AppContext:
    """The ``context`` a sequence's ``run`` gets; names follow the original Python runner."""

    def __init__(self, runner: _Runner, config: dict[str, Any]) -> None:
        self._runner = runner
        self.config = config
        self.instance_id = runner.instance_id
        self.logger: logging.Logger = _SequenceLogger("Sequence", logging.DEBUG)
        self.logger.addHandler(_NdjsonHandler(runner.log))
        self.logger.propagate = False
        self._handlers: dict[str, list[Callable[..., Any]]] = {}
        self._stop_handlers: list[Any] = []
        self._health_check: Callable[[], Any] | None = None

    @property
    def instanceId(self) -> str:  # the original runner's spelling
        return self.instance_id

    def on(self, event_name: str, callback: Callable[..., Any] | None = None) -> Any:
        """Call ``callback(message)`` on each event ``event_name`` from the hub.

        A plain function runs in the control thread (it answers while the loop is busy);
        an ``async def`` one runs on the loop. Without ``callback``, a decorator.
        """
        if callback is None:

            def register(fn: Callable[..., Any]) -> Callable[..., Any]:
                self.on(event_name, fn)
                return fn

            return register
        self._handlers.setdefault(event_name, []).append(callback)
        return callback

    def handlers(self, event_name: str) -> list[Callable[..., Any]]:
        return list(self._handlers.get(event_name, ()))

    @property
    def has_handlers(self) -> bool:
        return any(self._handlers.values())

    def emit(self, event_name: str, message: Any = "") -> None:
        """Send an event to the hub (any thread); ``message`` must be JSON-serialisable."""
        self._runner.send(Code.EVENT, {"eventName": event_name, "message": message})

    def set_stop_handler(self, handler: Any) -> None:
        """``handler(timeout_seconds, can_keep_alive)``, sync or async; several may be set."""
        self._stop_handlers.append(handler)

    def stop_handlers(self) -> list[Any]:
        return list(self._stop_handlers)

    def set_health_check(self, health_check: Callable[[], Any]) -> None:
        """``health_check()`` returns ``{"healthy": bool}`` or a bool; sync or async."""
        self._health_check = health_check

    @property
    def health_check(self) -> Callable[[], Any] | None:
        return self._health_check

    def keep_alive(self, timeout: float | str = 0) -> _KeepAlive:
        """Ask the hub not to kill the instance after the current stop.

        ``timeout`` is in seconds, as in the original runner (where awaiting this slept
        that long); ALIVE carries it in milliseconds: ``{"keepAlive": int(timeout * 1000)}``.
        The message is sent when this is called; awaiting the result sleeps ``timeout``.
        """
        seconds = _as_seconds(timeout)
        self._runner.keep_alive(seconds)
        return _KeepAlive(seconds)


# --------------------------------------------------------------------------- the runner


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
