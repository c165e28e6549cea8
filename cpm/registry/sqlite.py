"""The registry in one SQLite file: the embedded default, for a manager on one machine.

One connection in WAL mode serves every thread, behind a lock. A writing transaction
is ``BEGIN IMMEDIATE``: it takes the file's write lock up front, so a read-then-write
(redeeming a token) cannot be overtaken by another process (``cpm hub revoke``). The
schema's version is ``PRAGMA user_version``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from ..errors import ManagerError, RegistryUnavailable
from .database import SCHEMA_VERSION, schema_steps

__all__ = ["BUSY_TIMEOUT_SECONDS", "SqliteDatabase", "migrate"]

#: How long a statement waits for another process (e.g. an admin tool) holding the write lock.
BUSY_TIMEOUT_SECONDS: Final = 5.0


def _user_version(db: sqlite3.Connection) -> int:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    return int(version)


def migrate(db: sqlite3.Connection) -> int:
    """Bring ``db`` (in autocommit mode) up to :data:`SCHEMA_VERSION`; returns the version found.

    Raises :class:`ManagerError` for a file written by a newer manager.
    """
    found = _user_version(db)
    if found > SCHEMA_VERSION:
        raise ManagerError(
            f"the registry's schema is version {found}, newer than this manager's {SCHEMA_VERSION}; "
            "upgrade the manager"
        )
    for version in range(found, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            if _user_version(db) == version:
                for statement in schema_steps("sqlite", version):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1:d}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return found


class _SqliteTransaction:
    def __init__(self, database: SqliteDatabase, db: sqlite3.Connection) -> None:
        self._database = database
        self._db = db
        self._changes = db.total_changes

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        self._database.statements += 1
        return self._db.execute(sql, params)

    @property
    def wrote(self) -> bool:
        return self._db.total_changes != self._changes


class SqliteDatabase:
    dialect = "sqlite"

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.location = self.path
        self.statements = 0
        self._lock = threading.Lock()
        if self.path != ":memory:" and not os.path.exists(self.path):
            # Create it private; SQLite gives the -wal and -shm files the same mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, identically on 3.11-3.13.
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_SECONDS
        )
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")  # durable across crashes in WAL mode
            self._db.execute("PRAGMA foreign_keys = ON")
            migrate(self._db)
        except BaseException:
            self._db.close()
            raise

    @contextmanager
    def transaction(self, *, write: bool = True, counted: bool = True) -> Iterator[_SqliteTransaction]:
        # Reads take the write lock too: one connection, and the file is small and local.
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:  # locked past the busy timeout
                raise RegistryUnavailable(f"the registry is busy: {exc}") from None
            try:
                yield _SqliteTransaction(self, self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._db.execute("ROLLBACK")
                raise RegistryUnavailable(f"the registry cannot commit: {exc}") from None

    def schema_version(self) -> int:
        with self._lock:
            return _user_version(self._db)

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: it changes when *another* connection (another
        process, e.g. ``cpm hub revoke``) commits to the file, never for our own writes."""
        with self._lock:
            (version,) = self._db.execute("PRAGMA data_version").fetchone()
        return int(version)

    def close(self) -> None:
        with self._lock:
            self._db.close()
