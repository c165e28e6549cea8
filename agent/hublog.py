"""The hub's log: text lines on stderr for journald, NDJSON records on ``GET /log``.

Components log through the standard :mod:`logging` module under the ``agent``
logger. :class:`RingHandler` keeps the last records in a :class:`RecordRing` that
``GET /log`` replays and then follows; it never blocks the caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import trio

from spacehub.server.http import REQUEST_ID
from spacehub.server.logformat import ContextFilter, JsonFormatter

from .streams import RecordRing

TRACE: Final = 5
logging.addLevelName(TRACE, "TRACE")

_LEVELS: Final = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}
_NAMES: Final = {
    TRACE: "TRACE",
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "FATAL",
}

LogRecordDict = dict[str, Any]


def record_to_dict(record: logging.LogRecord) -> LogRecordDict:
    entry: LogRecordDict = {
        "ts": int(record.created * 1000),
        "level": _NAMES.get(record.levelno, record.levelname),
        "from": record.name.rsplit(".", 1)[-1],
        "msg": record.getMessage(),
    }
    if record.exc_info and record.exc_info[1] is not None:
        entry["error"] = repr(record.exc_info[1])
    return entry


def encode_record(entry: LogRecordDict) -> bytes:
    return json.dumps(entry, ensure_ascii=False, default=str).encode() + b"\n"


class RingHandler(logging.Handler):
    """Puts records into a ring from the Trio thread or, via the token, any other."""

    def __init__(self, ring: RecordRing[LogRecordDict], token: trio.lowlevel.TrioToken) -> None:
        super().__init__()
        self._ring = ring
        self._token = token

    def emit(self, record: logging.LogRecord) -> None:
        entry = record_to_dict(record)
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            # Not in the Trio thread (a worker thread, or Trio has ended).
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._ring.append, entry)
            return
        self._ring.append(entry)


#: syslog priorities for journald's "<N>" line prefix (sd-daemon(3)).
_PRIORITIES: Final = {
    TRACE: 7,
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _JournalFormatter(logging.Formatter):
    """Under systemd (stderr is the journal): a priority prefix, no timestamp
    (journald keeps its own), no colours."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6)
        level = _NAMES.get(record.levelno, record.levelname)
        text = f"<{priority}>{level} {record.name.rsplit('.', 1)[-1]}: {record.getMessage()}"
        if record.exc_info:
            text += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return text


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        level = _NAMES.get(record.levelno, record.levelname)
        source = record.name.rsplit(".", 1)[-1]
        text = f"{stamp}.{int(record.msecs):03d}Z {level:<5} {source}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def level_number(name: str) -> int:
    return _LEVELS[name]


def setup_logging(
    level: str,
    ring: RecordRing[LogRecordDict] | None = None,
    log_format: str = "text",
    hub_id: Callable[[], str | None] | None = None,
) -> logging.Logger:
    """Configure the ``agent`` logger; call once per process (inside Trio when a
    ring is given, so the handler can capture the Trio token). ``log_format`` "json"
    writes one object a line, with ``hub_id()`` in each."""
    logger = logging.getLogger("agent")
    logger.setLevel(_LEVELS[level])
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    # JOURNAL_STREAM names the journal's stream when systemd connected stderr to it.
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter()
        console.addFilter(ContextFilter(hub=hub_id or (lambda: None), request=REQUEST_ID.get))
    elif os.environ.get("JOURNAL_STREAM"):
        formatter = _JournalFormatter()
    else:
        formatter = _TextFormatter()
    console.setFormatter(formatter)
    logger.addHandler(console)
    if ring is not None:
        logger.addHandler(RingHandler(ring, trio.lowlevel.current_trio_token()))
    # hypercorn's error log goes the same way; its access log stays off (every
    # streaming chunk would not be logged anyway, and requests are logged by us).
    return logger
