"""``--log-format json``: one JSON object a line, for log shippers (Loki, Elasticsearch, journald's
JSON export). The default stays readable text.

Each line has ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``;
``hub``, ``instance``, ``space`` and ``request`` when the record knows them (passed with
``extra=``, or added by :class:`ContextFilter`), and ``exception`` with the traceback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["CONTEXT_FIELDS", "LOG_FORMATS", "ContextFilter", "JsonFormatter"]

LOG_FORMATS: Final = ("text", "json")
#: Record attributes copied into a JSON line when set.
CONTEXT_FIELDS: Final = ("hub", "instance", "space", "request")

_LEVELS: Final = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": _LEVELS.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None and value != "":
                entry[name] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # default=str: a message argument that is not JSON still gives a line, never an error.
        return json.dumps(entry, ensure_ascii=False, default=str)


class ContextFilter(logging.Filter):
    """Adds what a whole daemon knows to every record that lacks it (a hub's id, which
    may change once the hub has joined, so it is read each time)."""

    def __init__(self, **fields: Callable[[], str | None]) -> None:
        super().__init__()
        self._fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for name, read in self._fields.items():
            if getattr(record, name, None) is None:
                setattr(record, name, read())
        return True
