"""The registry in PostgreSQL: what several manager replicas share (docs/replicas.md).

psycopg 3's synchronous API over a bounded connection pool: the manager calls the
registry from worker threads (``trio.to_thread``), and psycopg's own async mode is
asyncio-only. Each transaction takes a connection from the pool, runs in PostgreSQL's
default READ COMMITTED, and a writing one first takes a transaction-level advisory lock
(:data:`WRITE_LOCK`), which serialises writers across every replica the way SQLite's
``BEGIN IMMEDIATE`` does within one file: a read-then-write (redeeming a join token,
taking over a hub) cannot be overtaken. Reads take no lock.

Each transaction that changed a row also bumps ``registry_changes.counter``; replicas
poll that one number (:meth:`PostgresDatabase.data_version`) to learn that someone
wrote (a revoked token or hub, a hub taken over) without reading any table.

A lost connection or a database that does not answer within :data:`CONNECT_WAIT_SECONDS`
raises :class:`~cpm.errors.RegistryUnavailable` (503); the pool reconnects by itself
when the database is back. Connections are not checked each time they are taken (a round
trip per transaction): one the database dropped fails its call once (503) and is replaced.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, NoReturn

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import ManagerError, RegistryUnavailable
from .database import SCHEMA_VERSION, schema_steps

__all__ = ["POOL_SIZE", "PostgresDatabase", "is_postgres_url", "safe_location"]

logger = logging.getLogger("cpm.registry")

#: Connections one manager keeps to the database at most (and worker threads using them).
POOL_SIZE: Final = 8
#: Seconds a call waits for a connection (a database that is down answers 503 after this).
CONNECT_WAIT_SECONDS: Final = 3.0
#: Seconds one statement may run before the database cancels it.
STATEMENT_TIMEOUT_MS: Final = 5000
#: Key of the advisory lock every writing transaction holds (any constant; "sthr" in ASCII).
WRITE_LOCK: Final = 0x73746872
#: Key of the advisory lock held while the schema is migrated.
MIGRATION_LOCK: Final = 0x73746873
#: Seconds after a failure during which calls fail at once instead of waiting for a connection
#: (while the database is down, every call would otherwise wait CONNECT_WAIT_SECONDS).
FAIL_FAST_SECONDS: Final = 1.0
#: Seconds between the pool's attempts to reconnect grow up to about this.
RECONNECT_TIMEOUT_SECONDS: Final = 365 * 24 * 3600.0


def is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def safe_location(url: str) -> str:
    """``postgresql://user:secret@db:5432/spacehub`` → ``postgresql://user@db:5432/spacehub``."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unreadable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


class _Row(tuple[Any, ...]):
    """A row read by position (``row[0]``, unpacking) or by column name (``row["id"]``)."""

    _names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)


def _row_factory(cursor: Any) -> Any:
    description = cursor.description
    names = {} if description is None else {column.name: i for i, column in enumerate(description)}

    def make(values: Sequence[Any]) -> _Row:
        row = _Row(values)
        row._names = names
        return row

    return make


@functools.lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    """The registry writes ``?`` (SQLite's style); psycopg takes ``%s``. Our SQL holds no ``%``."""
    return sql.replace("?", "%s")


class _PgTransaction:
    def __init__(self, database: PostgresDatabase, connection: psycopg.Connection[Any]) -> None:
        self._database = database
        self._connection = connection
        self.wrote = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        self._database.statements += 1
        cursor = self._connection.execute(_placeholders(sql), tuple(params))
        if cursor.rowcount > 0 and sql.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            self.wrote = True
        return cursor


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE) -> None:
        self.location = safe_location(url)
        self.statements = 0
        #: monotonic time until which calls fail at once (see FAIL_FAST_SECONDS), and why
        self._down_until = 0.0
        self._down_reason = ""
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            timeout=CONNECT_WAIT_SECONDS,
            reconnect_timeout=RECONNECT_TIMEOUT_SECONDS,
            kwargs={
                "autocommit": True,
                "row_factory": _row_factory,
                "connect_timeout": int(CONNECT_WAIT_SECONDS) or 1,
                "application_name": "cpm",
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            },
            open=False,
            name="cpm-registry",
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_WAIT_SECONDS * 2)
        except PoolTimeout:
            self._pool.close()
            raise RegistryUnavailable(f"cannot connect to the registry's database {self.location}") from None
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def _migrate(self) -> None:
        with self.transaction(write=False) as tx:
            tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            tx.execute("CREATE TABLE IF NOT EXISTS spacehub_schema (version INTEGER NOT NULL)")
            row = tx.execute("SELECT version FROM spacehub_schema").fetchone()
            if row is None:
                tx.execute("INSERT INTO spacehub_schema (version) VALUES (0)")
                found = 0
            else:
                found = int(row[0])
            if found > SCHEMA_VERSION:
                raise ManagerError(
                    f"the registry's schema is version {found}, newer than this manager's "
                    f"{SCHEMA_VERSION}; upgrade the manager"
                )
            # PostgreSQL's DDL is transactional: every step lands, or none does.
            for version in range(found, SCHEMA_VERSION):
                for statement in schema_steps(self.dialect, version):
                    tx.execute(statement)
                tx.execute("UPDATE spacehub_schema SET version = ?", (version + 1,))
            if found < SCHEMA_VERSION:
                logger.info("registry schema migrated from version %d to %d", found, SCHEMA_VERSION)

    @contextmanager
    def transaction(self, *, write: bool = True, counted: bool = True) -> Iterator[_PgTransaction]:
        if time.monotonic() < self._down_until:
            raise RegistryUnavailable(f"the registry's database is unavailable: {self._down_reason}")
        try:
            with self._pool.connection() as connection, connection.transaction():
                tx = _PgTransaction(self, connection)
                if write:
                    tx.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
                yield tx
                if tx.wrote and counted:
                    tx.execute("UPDATE registry_changes SET counter = counter + 1 WHERE id = 1")
        except PoolTimeout:
            self._failed(f"{self.location} does not answer")
        except psycopg.OperationalError as exc:
            self._failed(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)

    def _failed(self, reason: str) -> NoReturn:
        self._down_until = time.monotonic() + FAIL_FAST_SECONDS
        self._down_reason = reason
        raise RegistryUnavailable(f"the registry's database is unavailable: {reason}") from None

    def schema_version(self) -> int:
        with self.transaction(write=False) as tx:
            row = tx.execute("SELECT version FROM spacehub_schema").fetchone()
        return int(row[0]) if row is not None else 0

    def data_version(self) -> int:
        """The change counter: it moves on every commit that changed a row, ours too."""
        with self.transaction(write=False) as tx:
            row = tx.execute("SELECT counter FROM registry_changes WHERE id = 1").fetchone()
        return int(row[0]) if row is not None else 0

    def close(self) -> None:
        self._pool.close()
