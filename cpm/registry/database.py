"""What the registry needs of a database, whichever engine holds it.

The registry's SQL is written once, with ``?`` placeholders and types both engines take;
a backend (:mod:`.sqlite`, :mod:`.postgres`) runs it in transactions and hands back rows
that read by position or by column name. The schema's steps live here too, written once
with the few type names that differ (``{real}``, ``{blob}``, ``{bigint}``) filled in per
engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Database", "Result", "Row", "Transaction", "schema_steps"]


class Row(Protocol):
    """One row: ``row[0]`` and ``row["name"]`` both work, and it unpacks like a tuple."""

    def __getitem__(self, key: int | str) -> Any: ...

    def __iter__(self) -> Any: ...

    def __len__(self) -> int: ...


class Result(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Transaction(Protocol):
    """Statements inside one transaction."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result: ...

    @property
    def wrote(self) -> bool:
        """Whether a statement of this transaction changed a row."""
        ...


class Database(Protocol):
    #: "sqlite" or "postgresql"
    dialect: str
    #: where it is, for logs (never a password)
    location: str
    #: statements run since start (metrics; the replicas' benchmark)
    statements: int

    def transaction(self, *, write: bool = True, counted: bool = True) -> AbstractContextManager[Transaction]:
        """One transaction. ``write``: serialised with every other writing transaction of
        every process using the database, so a read-then-write cannot be overtaken.
        ``counted=False``: its changes do not move :meth:`data_version` (liveness rows)."""
        ...

    def schema_version(self) -> int: ...

    def data_version(self) -> int:
        """A number that changes when another connection commits a change."""
        ...

    def close(self) -> None: ...


#: The schema version this code writes.
SCHEMA_VERSION: Final = 3

# Each step takes the schema from version i to i + 1. Never edit a released step; add one.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE spaces (
            name TEXT PRIMARY KEY,
            created {real} NOT NULL
        )""",
        """CREATE TABLE hubs (
            id TEXT PRIMARY KEY,
            space TEXT NOT NULL REFERENCES spaces(name) ON DELETE CASCADE,
            public_key {blob} NOT NULL UNIQUE CHECK (length(public_key) = 32),
            description TEXT NOT NULL DEFAULT '',
            tags TEXT NOT NULL DEFAULT '[]',
            created {real} NOT NULL,
            last_connected {real},
            last_disconnected {real},
            revoked_at {real},
            revoked_reason TEXT
        )""",
        "CREATE INDEX hubs_space ON hubs(space)",
        """CREATE TABLE api_tokens (
            hash TEXT PRIMARY KEY,
            space TEXT NOT NULL REFERENCES spaces(name) ON DELETE CASCADE,
            description TEXT NOT NULL DEFAULT '',
            created {real} NOT NULL,
            revoked_at {real}
        )""",
        "CREATE INDEX api_tokens_space ON api_tokens(space)",
        """CREATE TABLE join_tokens (
            hash TEXT PRIMARY KEY,
            space TEXT NOT NULL REFERENCES spaces(name) ON DELETE CASCADE,
            created {real} NOT NULL,
            expires_at {real} NOT NULL,
            used_at {real},
            used_by_hub TEXT
        )""",
        "CREATE INDEX join_tokens_space ON join_tokens(space)",
    ),
    # 2: join tokens made over the API carry what the hub will be shown as, and can be revoked.
    (
        "ALTER TABLE join_tokens ADD COLUMN description TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE join_tokens ADD COLUMN tags TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE join_tokens ADD COLUMN revoked_at {real}",
    ),
    # 3: replicas. Each manager process's liveness row; which one holds each hub's link, with an
    # epoch that grows at every take-over (fencing); cluster-wide settings (the peers' secret,
    # the CA every replica serves under); a change counter the replicas poll instead of a table.
    (
        """CREATE TABLE replicas (
            id TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            started {real} NOT NULL,
            seen {real} NOT NULL
        )""",
        """CREATE TABLE hub_owners (
            hub_id TEXT PRIMARY KEY REFERENCES hubs(id) ON DELETE CASCADE,
            replica TEXT NOT NULL,
            epoch {bigint} NOT NULL
        )""",
        "CREATE INDEX hub_owners_replica ON hub_owners(replica)",
        """CREATE TABLE cluster (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
        """CREATE TABLE registry_changes (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            counter {bigint} NOT NULL
        )""",
        "INSERT INTO registry_changes (id, counter) VALUES (1, 0)",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION

_TYPES: Final = {
    "sqlite": {"real": "REAL", "blob": "BLOB", "bigint": "INTEGER"},
    "postgresql": {"real": "DOUBLE PRECISION", "blob": "BYTEA", "bigint": "BIGINT"},
}


def schema_steps(dialect: str, version: int) -> list[str]:
    """The statements taking the schema from ``version`` to ``version + 1`` on ``dialect``."""
    return [statement.format(**_TYPES[dialect]) for statement in MIGRATIONS[version]]
