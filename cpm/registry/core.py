"""The manager's registry: spaces, hubs, API tokens and join tokens, kept in SQLite.

Theory of operation
-------------------
Everything the manager must not forget across a restart lives in one SQLite file
under its data dir, opened once in WAL mode. Every method is synchronous and short
(a handful of indexed statements), so the Trio shell may call them directly or via
``trio.to_thread.run_sync``; one connection serves every thread, behind a lock.

Secrets are never stored: API tokens (``shk_...``) and join tokens (``shj_...``) are
shown once when made, and only their SHA-256 is kept. Looking a token up by its hash
is the comparison; an attacker who can time it learns about the hash of their guess,
not about the token.

A hub joins once: :meth:`Registry.redeem_join_token` checks the one-time token and
records the hub's Ed25519 public key in one transaction, so two hubs racing with the
same token cannot both win. After that the link proves the key by a signed challenge
(``spacehub.protocol.auth``) and looks the hub up here.

Times are floats (seconds since the epoch) from an injectable ``clock`` so tests can
expire tokens without sleeping; records show them as ISO-8601 UTC with milliseconds.

The database is SQLite (one file in the data dir, the embedded default: :mod:`.sqlite`)
or PostgreSQL shared by manager replicas (:mod:`.postgres`); the SQL here is written once
for both (``?`` placeholders, rows read by column name). Each backend migrates its
schema (:mod:`.database`) when opened.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from cpm.errors import (
    ApiTokenNotFound,
    BadRequest,
    Conflict,
    HubNotFound,
    HubRevoked,
    JoinTokenNotFound,
    RegistryUnavailable,
    SpaceNotFound,
    TokenExpired,
    TokenRevoked,
    TokenUnknown,
    TokenUsed,
)
from spacehub.models import HubRecord, SpaceRecord

from .database import SCHEMA_VERSION, Database, Row, Transaction
from .postgres import PostgresDatabase, is_postgres_url
from .sqlite import SqliteDatabase

__all__ = [
    "API_TOKEN_PREFIX",
    "DEFAULT_JOIN_TTL_SECONDS",
    "JOIN_TOKEN_PREFIX",
    "MAX_JOIN_TTL_SECONDS",
    "SCHEMA_VERSION",
    "TOKEN_ID_LENGTH",
    "ApiToken",
    "Hub",
    "HubOwner",
    "IssuedJoinToken",
    "JoinToken",
    "Registry",
    "Replica",
    "Space",
    "iso_utc",
]

#: A space name: lower-case letters, digits and dashes, not starting with a dash, 1-63 chars.
SPACE_NAME: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
API_TOKEN_PREFIX: Final = "shk_"
JOIN_TOKEN_PREFIX: Final = "shj_"
HUB_ID_PREFIX: Final = "sth-"
#: Bytes of randomness in a token (43 characters of base64url).
TOKEN_BYTES: Final = 32
#: Longer strings are not tokens; refusing them early bounds the hashing work per request.
MAX_TOKEN_LENGTH: Final = 256
#: Characters of a token's hash shown as its id in listings (enough to name it, useless to forge it).
TOKEN_ID_LENGTH: Final = 16
MAX_DESCRIPTION_LENGTH: Final = 1024
MAX_TAGS: Final = 64
MAX_TAG_LENGTH: Final = 128
#: How long a join token lives unless told otherwise.
DEFAULT_JOIN_TTL_SECONDS: Final = 3600.0
#: Longest a join token may live.
MAX_JOIN_TTL_SECONDS: Final = 30 * 24 * 3600
PUBLIC_KEY_SIZE: Final = 32


def iso_utc(timestamp: float) -> str:
    """``1700000000.5`` → ``"2023-11-14T22:13:20.500Z"``."""
    text = datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


@dataclass(frozen=True, slots=True)
class Space:
    name: str
    created: float

    def record(self) -> SpaceRecord:
        """The API's shape: ``{"id", "created"}``."""
        return {"id": self.name, "created": iso_utc(self.created)}


@dataclass(frozen=True, slots=True)
class Hub:
    id: str
    space: str
    #: The raw 32-byte Ed25519 public key the hub joined with.
    public_key: bytes
    description: str
    tags: tuple[str, ...]
    created: float
    last_connected: float | None = None
    last_disconnected: float | None = None
    revoked_at: float | None = None
    revoked_reason: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def refused(self) -> HubRevoked:
        """The error a revoked hub's link is refused with (its reason, if one was given)."""
        if self.revoked_reason:
            return HubRevoked(f"{HubRevoked.default_message}: {self.revoked_reason}")
        return HubRevoked()

    def record(self) -> HubRecord:
        """The manager's per-hub record, as in the seed; ``info`` keys are omitted when unknown."""
        times = (
            ("created", self.created),
            ("lastConnected", self.last_connected),
            ("lastDisconnected", self.last_disconnected),
        )
        return {
            "id": self.id,
            "info": {key: iso_utc(value) for key, value in times if value is not None},
            "description": self.description,
            "tags": list(self.tags),
        }


@dataclass(frozen=True, slots=True)
class HubOwner:
    """The replica holding a hub's link, at which epoch, and how to reach it (None if the
    replica left no liveness row)."""

    replica: str
    epoch: int
    url: str | None
    seen: float | None


@dataclass(frozen=True, slots=True)
class Replica:
    id: str
    url: str
    started: float
    seen: float


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An API token as listed: never the secret, only a short id derived from its hash."""

    id: str
    space: str
    description: str
    created: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": self.id,
            "created": iso_utc(self.created),
            "description": self.description,
        }
        if self.revoked_at is not None:
            record["revoked"] = iso_utc(self.revoked_at)
        return record


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A join token as listed: never the secret, only a short id derived from its hash.

    ``description`` and ``tags`` are what the hub that redeems it is shown with, unless the
    hub sends its own (its tags are added to these).
    """

    id: str
    space: str
    description: str
    tags: tuple[str, ...]
    created: float
    expires_at: float
    used_at: float | None = None
    used_by_hub: str | None = None
    revoked_at: float | None = None

    def pending(self, now: float) -> bool:
        """Whether a hub can still join with it."""
        return self.used_at is None and self.revoked_at is None and now < self.expires_at

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": self.id,
            "created": iso_utc(self.created),
            "expires": iso_utc(self.expires_at),
            "description": self.description,
            "tags": list(self.tags),
        }
        if self.used_at is not None:
            record["used"] = iso_utc(self.used_at)
            record["usedBy"] = self.used_by_hub
        if self.revoked_at is not None:
            record["revoked"] = iso_utc(self.revoked_at)
        return record


@dataclass(frozen=True, slots=True)
class IssuedJoinToken:
    """A join token just made: the secret (shown this once) and its listing."""

    token: str
    listing: JoinToken


class Registry:
    """Spaces, hubs and tokens in one SQLite file. Use as a context manager or call :meth:`close`."""

    def __init__(self, location: Path | str | Database, *, clock: Callable[[], float] = time.time) -> None:
        """``location``: an SQLite file's path (or ``":memory:"``), a ``postgresql://`` URL,
        or a :class:`~.database.Database` already open."""
        self._clock = clock
        #: when it answers True, a transaction that wrote fails (fault injection, cpm/faults.py)
        self.fail_writes: Callable[[], bool] | None = None
        if isinstance(location, str) and is_postgres_url(location):
            self.database: Database = PostgresDatabase(location)
        elif isinstance(location, str | Path):
            self.database = SqliteDatabase(location)
        else:
            self.database = location
        #: the SQLite file's path, or the database's URL without its password
        self.path = getattr(self.database, "path", self.database.location)

    @property
    def shared(self) -> bool:
        """Whether other manager replicas may use this database too (PostgreSQL)."""
        return self.database.dialect == "postgresql"

    def close(self) -> None:
        self.database.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return self.database.schema_version()

    # -- spaces ---------------------------------------------------------------------------------

    def create_space(self, name: str) -> Space:
        if not isinstance(name, str) or SPACE_NAME.fullmatch(name) is None:
            raise BadRequest(
                f"invalid space name {name!r}: use 1-63 lower-case letters, digits and dashes, "
                "not starting with a dash"
            )
        space = Space(name, self._clock())
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM spaces WHERE name = ?", (name,)).fetchone() is not None:
                raise Conflict(f"space {name!r} already exists")
            db.execute("INSERT INTO spaces (name, created) VALUES (?, ?)", (space.name, space.created))
        return space

    def get_space(self, name: str) -> Space:
        with self._transaction(write=False) as db:
            return self._space(db, name)

    def list_spaces(self) -> list[Space]:
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT name, created FROM spaces ORDER BY name").fetchall()
        return [Space(row["name"], row["created"]) for row in rows]

    def delete_space(self, name: str, *, force: bool = False) -> None:
        """Delete a space with its tokens and hubs.

        Refuses (:class:`Conflict`) while the space has hubs that are not revoked, unless
        ``force``; the caller should then also close those hubs' links.
        """
        with self._transaction() as db:
            self._space(db, name)
            if not force:
                (active,) = db.execute(
                    "SELECT count(*) FROM hubs WHERE space = ? AND revoked_at IS NULL", (name,)
                ).fetchone()
                if active:
                    raise Conflict(f"space {name!r} still has {active} hub(s); revoke them first")
            db.execute("DELETE FROM spaces WHERE name = ?", (name,))

    # -- API tokens -----------------------------------------------------------------------------

    def create_api_token(self, space: str, description: str = "") -> str:
        """Make a bearer token for ``space``; it is returned here once and only its hash is kept."""
        _check_description(description)
        token = API_TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        with self._transaction() as db:
            self._space(db, space)
            db.execute(
                "INSERT INTO api_tokens (hash, space, description, created) VALUES (?, ?, ?, ?)",
                (_hash_token(token), space, description, self._clock()),
            )
        return token

    def check_api_token(self, space: str, token: str) -> bool:
        """Whether ``token`` is a live (not revoked) API token of ``space``."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            return False
        digest = _hash_token(token)
        with self._transaction(write=False) as db:
            row = db.execute(
                "SELECT hash, space, revoked_at FROM api_tokens WHERE hash = ?", (digest,)
            ).fetchone()
        return (
            row is not None
            and hmac.compare_digest(row["hash"], digest)
            and row["space"] == space
            and row["revoked_at"] is None
        )

    def revoke_api_token(self, space: str, token_or_id: str) -> ApiToken:
        """Revoke one API token of ``space``, named by the token itself or by its listed id.

        Revoking a revoked token changes nothing; :class:`ApiTokenNotFound` if there is no match.
        """
        with self._transaction() as db:
            self._space(db, space)
            if token_or_id.startswith(API_TOKEN_PREFIX):
                rows = db.execute(
                    "SELECT * FROM api_tokens WHERE hash = ? AND space = ?", (_hash_token(token_or_id), space)
                ).fetchall()
            elif len(token_or_id) == TOKEN_ID_LENGTH:
                rows = db.execute(
                    "SELECT * FROM api_tokens WHERE substr(hash, 1, ?) = ? AND space = ?",
                    (TOKEN_ID_LENGTH, token_or_id.lower(), space),
                ).fetchall()
            else:
                rows = []
            if len(rows) != 1:
                raise ApiTokenNotFound()
            (row,) = rows
            if row["revoked_at"] is None:
                db.execute(
                    "UPDATE api_tokens SET revoked_at = ? WHERE hash = ?", (self._clock(), row["hash"])
                )
                row = db.execute("SELECT * FROM api_tokens WHERE hash = ?", (row["hash"],)).fetchone()
        return _api_token(row)

    def revoke_all_api_tokens(self, space: str) -> int:
        """Revoke every live API token of ``space``; returns how many were revoked."""
        with self._transaction() as db:
            self._space(db, space)
            cursor = db.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE space = ? AND revoked_at IS NULL",
                (self._clock(), space),
            )
            return cursor.rowcount

    def list_api_tokens(self, space: str, *, include_revoked: bool = False) -> list[ApiToken]:
        """The space's API tokens, oldest first, without their secrets."""
        with self._transaction(write=False) as db:
            self._space(db, space)
            rows = db.execute(
                "SELECT * FROM api_tokens WHERE space = ? AND (? OR revoked_at IS NULL)"
                " ORDER BY created, hash",
                (space, include_revoked),
            ).fetchall()
        return [_api_token(row) for row in rows]

    # -- join tokens and hubs -------------------------------------------------------------------

    def create_join_token(self, space: str, ttl_seconds: float = DEFAULT_JOIN_TTL_SECONDS) -> str:
        """Make a one-time token a hub joins ``space`` with; returned once, only its hash is kept."""
        return self.issue_join_token(space, ttl_seconds).token

    def issue_join_token(
        self,
        space: str,
        ttl_seconds: float = DEFAULT_JOIN_TTL_SECONDS,
        description: str = "",
        tags: Iterable[str] = (),
    ) -> IssuedJoinToken:
        """:meth:`create_join_token` with what the joining hub is to be shown as, and the listing."""
        if (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, int | float)
            or not 0 < ttl_seconds <= MAX_JOIN_TTL_SECONDS
        ):
            raise BadRequest(f"a join token lives more than 0 and at most {MAX_JOIN_TTL_SECONDS} seconds")
        _check_description(description)
        tags = _check_tags(tags)
        token = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        digest = _hash_token(token)
        now = self._clock()
        with self._transaction() as db:
            self._space(db, space)
            db.execute(
                "INSERT INTO join_tokens (hash, space, created, expires_at, description, tags)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (digest, space, now, now + ttl_seconds, description, json.dumps(list(tags))),
            )
            row = db.execute("SELECT * FROM join_tokens WHERE hash = ?", (digest,)).fetchone()
        return IssuedJoinToken(token, _join_token(row))

    def list_join_tokens(self, space: str, *, include_spent: bool = False) -> list[JoinToken]:
        """The space's join tokens a hub can still use (all of them with ``include_spent``:
        used, expired and revoked ones too), oldest first, without their secrets."""
        now = self._clock()
        with self._transaction(write=False) as db:
            self._space(db, space)
            rows = db.execute(
                "SELECT * FROM join_tokens WHERE space = ? ORDER BY created, hash", (space,)
            ).fetchall()
        tokens = [_join_token(row) for row in rows]
        return tokens if include_spent else [t for t in tokens if t.pending(now)]

    def revoke_join_token(self, space: str, token_or_id: str) -> JoinToken:
        """Revoke a join token of ``space`` (named by itself or its listed id) so no hub joins
        with it; revoking again changes nothing. :class:`JoinTokenNotFound` if there is no match."""
        with self._transaction() as db:
            self._space(db, space)
            if token_or_id.startswith(JOIN_TOKEN_PREFIX):
                rows = db.execute(
                    "SELECT * FROM join_tokens WHERE hash = ? AND space = ?",
                    (_hash_token(token_or_id), space),
                ).fetchall()
            elif len(token_or_id) == TOKEN_ID_LENGTH:
                rows = db.execute(
                    "SELECT * FROM join_tokens WHERE substr(hash, 1, ?) = ? AND space = ?",
                    (TOKEN_ID_LENGTH, token_or_id.lower(), space),
                ).fetchall()
            else:
                rows = []
            if len(rows) != 1:
                raise JoinTokenNotFound()
            digest = rows[0]["hash"]
            db.execute(
                "UPDATE join_tokens SET revoked_at = ? WHERE hash = ? AND revoked_at IS NULL",
                (self._clock(), digest),
            )
            row = db.execute("SELECT * FROM join_tokens WHERE hash = ?", (digest,)).fetchone()
        return _join_token(row)

    def redeem_join_token(
        self,
        space: str,
        token: str,
        public_key: bytes,
        description: str = "",
        tags: Iterable[str] = (),
    ) -> Hub:
        """Admit a hub to ``space``: spend the join token and register the hub's public key.

        All in one transaction: either the token is spent and the hub exists, or neither.
        Raises :class:`TokenUnknown` (also for another space's token), :class:`TokenUsed`,
        :class:`TokenExpired`, :class:`HubRevoked` for the key of a revoked hub,
        :class:`Conflict` for a key that is already registered, :class:`BadRequest` for a
        malformed key, description or tags. A refused join leaves the token unspent.
        """
        if not isinstance(public_key, bytes | bytearray) or len(public_key) != PUBLIC_KEY_SIZE:
            raise BadRequest(f"a hub's public key is {PUBLIC_KEY_SIZE} raw Ed25519 bytes")
        public_key = bytes(public_key)
        _check_description(description)
        tags = _check_tags(tags)
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            raise TokenUnknown()
        digest = _hash_token(token)
        with self._transaction() as db:
            row = db.execute("SELECT * FROM join_tokens WHERE hash = ?", (digest,)).fetchone()
            # Another space's token reads as unknown: a token for space A says nothing about B.
            if row is None or row["space"] != space:
                raise TokenUnknown()
            now = self._clock()
            if row["revoked_at"] is not None:
                raise TokenRevoked()
            if row["used_at"] is not None:
                raise TokenUsed(
                    f"{TokenUsed.default_message} (used {iso_utc(row['used_at'])} by {row['used_by_hub']})"
                )
            if now >= row["expires_at"]:
                raise TokenExpired(
                    f"The join token expired at {iso_utc(row['expires_at'])}; "
                    "ask the space's operator for a new one"
                )
            existing = db.execute("SELECT * FROM hubs WHERE public_key = ?", (public_key,)).fetchone()
            if existing is not None:
                if existing["revoked_at"] is not None:
                    raise HubRevoked(
                        "This hub's key was revoked; make a new key (delete the key file) to join again"
                    )
                raise Conflict("This public key is already registered; connect with it instead of joining")
            # What the token was made with is the default; the hub's own tags add to its.
            token_tags = tuple(json.loads(row["tags"]))
            hub = Hub(
                id=self._new_hub_id(db),
                space=space,
                public_key=public_key,
                description=description or row["description"],
                tags=_check_tags(dict.fromkeys((*token_tags, *tags))),
                created=now,
            )
            db.execute(
                "INSERT INTO hubs (id, space, public_key, description, tags, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (hub.id, hub.space, hub.public_key, hub.description, json.dumps(list(hub.tags)), hub.created),
            )
            db.execute(
                "UPDATE join_tokens SET used_at = ?, used_by_hub = ? WHERE hash = ?", (now, hub.id, digest)
            )
        return hub

    def get_hub(self, hub_id: str) -> Hub:
        with self._transaction(write=False) as db:
            return self._hub(db, hub_id)

    def hub_by_key(self, public_key: bytes) -> Hub:
        """The hub registered with this raw public key; :class:`HubNotFound` if none."""
        with self._transaction(write=False) as db:
            row = db.execute("SELECT * FROM hubs WHERE public_key = ?", (bytes(public_key),)).fetchone()
        if row is None:
            raise HubNotFound()
        return _hub(row)

    def list_hubs(self, space: str, *, include_revoked: bool = True) -> list[Hub]:
        """The space's hubs, oldest first."""
        with self._transaction(write=False) as db:
            self._space(db, space)
            rows = db.execute(
                "SELECT * FROM hubs WHERE space = ? AND (? OR revoked_at IS NULL) ORDER BY created, id",
                (space, include_revoked),
            ).fetchall()
        return [_hub(row) for row in rows]

    def hub_standing(self) -> dict[str, tuple[str, str | None]]:
        """Every hub's space and revocation: ``{id: (space, reason)}``, ``reason`` None unless revoked.

        A revoked hub's reason is ``""`` if none was given. One narrow scan, no parsing: the
        manager calls it only when :meth:`data_version` says another process wrote the file.
        """
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT id, space, revoked_at, revoked_reason FROM hubs").fetchall()
        return {
            row["id"]: (row["space"], None if row["revoked_at"] is None else row["revoked_reason"] or "")
            for row in rows
        }

    def data_version(self) -> int:
        """A number that changes when another process commits to the registry (``cpm hub
        revoke``, another replica), so a running manager can tell, without reading a table,
        whether anyone else changed it. (On PostgreSQL our own commits move it too.)"""
        return self.database.data_version()

    def revoke_hub(self, hub_id: str, reason: str) -> Hub:
        """Revoke a hub's key for good; revoking again keeps the first time and reason.

        The caller should also close the hub's link, if it has one.
        """
        _check_description(reason)
        with self._transaction() as db:
            self._hub(db, hub_id)
            db.execute(
                "UPDATE hubs SET revoked_at = ?, revoked_reason = ? WHERE id = ? AND revoked_at IS NULL",
                (self._clock(), reason, hub_id),
            )
            return self._hub(db, hub_id)

    def mark_connected(self, hub_id: str, when: float | None = None) -> Hub:
        """Record that the hub's link came up; :class:`HubRevoked` for a revoked hub."""
        with self._transaction() as db:
            hub = self._hub(db, hub_id)
            if hub.revoked:
                raise hub.refused()
            db.execute(
                "UPDATE hubs SET last_connected = ? WHERE id = ?",
                (self._clock() if when is None else when, hub_id),
            )
            return self._hub(db, hub_id)

    def mark_disconnected(self, hub_id: str, when: float | None = None) -> Hub:
        """Record that the hub's link went down (also for a revoked hub)."""
        with self._transaction() as db:
            self._hub(db, hub_id)
            db.execute(
                "UPDATE hubs SET last_disconnected = ? WHERE id = ?",
                (self._clock() if when is None else when, hub_id),
            )
            return self._hub(db, hub_id)

    # -- replicas: who holds each hub's link ----------------------------------------------------

    def claim_hub(self, hub_id: str, replica: str, when: float | None = None) -> tuple[Hub, int]:
        hub, epoch, _previous = self.take_over(hub_id, replica, when)
        return hub, epoch

    def take_over(self, hub_id: str, replica: str, when: float | None = None) -> tuple[Hub, int, str | None]:
        """Record that ``replica`` holds the hub's link from now on (it came up there): the hub
        and the new ownership epoch, one more than any before it. :class:`HubRevoked` for a
        revoked hub. Any other replica still holding a link of this hub sees the newer epoch
        and closes its link (fencing: cpm/replicas.py).

        Not serialised with other writers (a reconnect storm claims thousands of hubs at
        once): the upsert takes the hub's ownership row lock, so two claims of one hub still
        get one epoch each, and a revocation racing a claim is seen by the watchdog, which
        closes revoked hubs' links. :meth:`take_over` also names the replica that held it
        before (None if none did)."""
        now = self._clock() if when is None else when
        with self._transaction(write=False) as db:
            row = db.execute(
                "UPDATE hubs SET last_connected = ? WHERE id = ? AND revoked_at IS NULL RETURNING *",
                (now, hub_id),
            ).fetchone()
            if row is None:
                raise self._hub(db, hub_id).refused()  # (or HubNotFound)
            before = db.execute("SELECT replica FROM hub_owners WHERE hub_id = ?", (hub_id,)).fetchone()
            (epoch,) = db.execute(
                "INSERT INTO hub_owners (hub_id, replica, epoch) VALUES (?, ?, 1)"
                " ON CONFLICT (hub_id) DO UPDATE SET replica = excluded.replica,"
                " epoch = hub_owners.epoch + 1 RETURNING epoch",
                (hub_id, replica),
            ).fetchone()
            return _hub(row), int(epoch), None if before is None else str(before["replica"])

    def release_hub(self, hub_id: str, replica: str, epoch: int, when: float | None = None) -> bool:
        """The link ``replica`` held at ``epoch`` ended: forget the ownership and record
        ``lastDisconnected``, unless a newer link (here or on another replica) took over.
        Not serialised with other writers either (see :meth:`claim_hub`)."""
        with self._transaction(write=False) as db:
            gone = db.execute(
                "DELETE FROM hub_owners WHERE hub_id = ? AND replica = ? AND epoch = ?",
                (hub_id, replica, epoch),
            ).rowcount
            if gone:
                db.execute(
                    "UPDATE hubs SET last_disconnected = ? WHERE id = ?",
                    (self._clock() if when is None else when, hub_id),
                )
        return bool(gone)

    def hub_owner(self, hub_id: str) -> HubOwner | None:
        """Which replica holds the hub's link (with how to reach it), if any does."""
        with self._transaction(write=False) as db:
            row = db.execute(
                "SELECT o.replica, o.epoch, r.url, r.seen FROM hub_owners o"
                " LEFT JOIN replicas r ON r.id = o.replica WHERE o.hub_id = ?",
                (hub_id,),
            ).fetchone()
        if row is None:
            return None
        return HubOwner(row["replica"], int(row["epoch"]), row["url"], row["seen"])

    def owners(self) -> dict[str, tuple[str, int]]:
        """Every held hub: ``{hub id: (replica, epoch)}``."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT hub_id, replica, epoch FROM hub_owners").fetchall()
        return {row["hub_id"]: (row["replica"], int(row["epoch"])) for row in rows}

    def owned_by(self, replica: str) -> dict[str, int]:
        """The hubs ``replica`` holds: ``{hub id: epoch}``."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT hub_id, epoch FROM hub_owners WHERE replica = ?", (replica,)).fetchall()
        return {row["hub_id"]: int(row["epoch"]) for row in rows}

    def reassert_hubs(self, replica: str, held: dict[str, int]) -> None:
        """Put back the ownership rows of links ``replica`` still holds ({hub: epoch}) that
        another replica removed while this one could not reach the database; a hub someone
        else has claimed meanwhile keeps its newer owner (and this replica is fenced)."""
        with self._transaction() as db:
            for hub_id, epoch in held.items():
                db.execute(
                    "INSERT INTO hub_owners (hub_id, replica, epoch) SELECT ?, ?, ?"
                    " WHERE EXISTS (SELECT 1 FROM hubs WHERE id = ?) ON CONFLICT (hub_id) DO NOTHING",
                    (hub_id, replica, epoch, hub_id),
                )

    def replica_alive(self, replica: str, url: str, started: float) -> None:
        """This replica's liveness row: how peers reach it, and when it last said it lives.
        Not counted as a change (the change counter is what replicas poll)."""
        with self.database.transaction(write=False, counted=False) as db:
            db.execute(
                "INSERT INTO replicas (id, url, started, seen) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET url = excluded.url, started = excluded.started,"
                " seen = excluded.seen",
                (replica, url, started, self._clock()),
            )

    def replicas(self) -> list[Replica]:
        """Every replica with a liveness row, by id."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT id, url, started, seen FROM replicas ORDER BY id").fetchall()
        return [Replica(row["id"], row["url"], row["started"], row["seen"]) for row in rows]

    def forget_replica(self, replica: str) -> int:
        """A replica stops (or starts afresh): its liveness row and every ownership it held
        go; those hubs are recorded disconnected. How many hubs it held."""
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                "UPDATE hubs SET last_disconnected = ? WHERE id IN"
                " (SELECT hub_id FROM hub_owners WHERE replica = ?)",
                (now, replica),
            )
            gone = db.execute("DELETE FROM hub_owners WHERE replica = ?", (replica,)).rowcount
            db.execute("DELETE FROM replicas WHERE id = ?", (replica,))
            # What it was home to (the Space-wide topics) goes to the next replica to need it.
            db.execute("DELETE FROM cluster WHERE substr(name, 1, 5) = 'home:' AND value = ?", (replica,))
        return gone

    def dead_replicas(self, silent_for: float) -> list[str]:
        """Replicas whose liveness row is older than ``silent_for`` seconds, or that own hubs
        with no liveness row at all."""
        cutoff = self._clock() - silent_for
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT id FROM replicas WHERE seen < ?"
                " UNION SELECT DISTINCT replica FROM hub_owners"
                " WHERE replica NOT IN (SELECT id FROM replicas)",
                (cutoff,),
            ).fetchall()
        return sorted(row[0] for row in rows)

    def cluster_value(self, name: str, make: Callable[[], str]) -> str:
        """A setting every replica shares (the peers' secret, the CA): the stored one, or
        ``make()``'s, stored now if no replica stored one first."""
        with self._transaction() as db:
            row = db.execute("SELECT value FROM cluster WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return str(row["value"])
            value = make()
            db.execute("INSERT INTO cluster (name, value) VALUES (?, ?)", (name, value))
            return value

    # -- helpers --------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[Transaction]:
        """One transaction; a writing one cannot be overtaken by another process's write."""
        with self.database.transaction(write=write) as tx:
            yield tx
            if self.fail_writes is not None and tx.wrote and self.fail_writes():
                raise RegistryUnavailable("fault injected: the registry refuses writes")

    @staticmethod
    def _space(db: Transaction, name: str) -> Space:
        row = db.execute("SELECT name, created FROM spaces WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise SpaceNotFound(f"space {name!r} not found")
        return Space(row["name"], row["created"])

    @staticmethod
    def _hub(db: Transaction, hub_id: str) -> Hub:
        row = db.execute("SELECT * FROM hubs WHERE id = ?", (hub_id,)).fetchone()
        if row is None:
            raise HubNotFound(f"hub {hub_id!r} not found")
        return _hub(row)

    @staticmethod
    def _new_hub_id(db: Transaction) -> str:
        while True:  # 32 random bits: a clash is rare, and then we simply draw again
            hub_id = HUB_ID_PREFIX + secrets.token_hex(4)
            if db.execute("SELECT 1 FROM hubs WHERE id = ?", (hub_id,)).fetchone() is None:
                return hub_id


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_description(description: str) -> None:
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_LENGTH:
        raise BadRequest(f"a description is a string of at most {MAX_DESCRIPTION_LENGTH} characters")


def _check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tags, str):  # a lone string would otherwise become one tag per character
        raise BadRequest("tags are a list of strings")
    checked = tuple(tags)
    if len(checked) > MAX_TAGS or not all(
        isinstance(tag, str) and 0 < len(tag) <= MAX_TAG_LENGTH for tag in checked
    ):
        raise BadRequest(
            f"tags are at most {MAX_TAGS} non-empty strings of at most {MAX_TAG_LENGTH} characters"
        )
    return checked


def _hub(row: Row) -> Hub:
    return Hub(
        id=row["id"],
        space=row["space"],
        public_key=bytes(row["public_key"]),
        description=row["description"],
        tags=tuple(json.loads(row["tags"])),
        created=row["created"],
        last_connected=row["last_connected"],
        last_disconnected=row["last_disconnected"],
        revoked_at=row["revoked_at"],
        revoked_reason=row["revoked_reason"],
    )


def _api_token(row: Row) -> ApiToken:
    return ApiToken(
        id=row["hash"][:TOKEN_ID_LENGTH],
        space=row["space"],
        description=row["description"],
        created=row["created"],
        revoked_at=row["revoked_at"],
    )


def _join_token(row: Row) -> JoinToken:
    return JoinToken(
        id=row["hash"][:TOKEN_ID_LENGTH],
        space=row["space"],
        description=row["description"],
        tags=tuple(json.loads(row["tags"])),
        created=row["created"],
        expires_at=row["expires_at"],
        used_at=row["used_at"],
        used_by_hub=row["used_by_hub"],
        revoked_at=row["revoked_at"],
    )
