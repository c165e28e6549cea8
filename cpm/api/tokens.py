"""A memory of API tokens the registry accepted, so that a busy Space does not pay a
worker-thread hop and an SQLite transaction on every request.

An acceptance is reused only while the registry's database has seen no commit since it
was made (SQLite's ``PRAGMA data_version``, read on a connection of our own, changes
when any connection commits: this manager's, or ``cpm token revoke`` in another
process), and for at most :data:`TOKEN_CACHE_SECONDS`. So a revocation still takes
effect at once, and a token made a moment ago is never refused from memory (refusals
are not remembered).

On a registry shared by replicas (PostgreSQL) the version is the change counter the
watchdog reads every couple of seconds (cpm/link/sessions.py), so a token revoked on
another replica stops working here within that. While the database cannot be reached,
a token accepted before goes on being accepted (the replica keeps serving what it
knows); one never seen is refused with 503, not 403: nobody can tell yet.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from ..errors import RegistryUnavailable

__all__ = ["MAX_CACHED_TOKENS", "TOKEN_CACHE_SECONDS", "DatabaseVersion", "TokenCache"]

#: Longest an accepted token is taken on trust before the registry is asked again.
TOKEN_CACHE_SECONDS: Final = 10.0
#: Most (space, token) pairs remembered; the least recently accepted go first.
MAX_CACHED_TOKENS: Final = 1024
#: How long reading the version may wait on a lock (WAL readers rarely wait at all).
_VERSION_BUSY_SECONDS: Final = 0.05


class DatabaseVersion:
    """``PRAGMA data_version`` of an SQLite database: a number that changes on every commit
    made through any other connection. None when it cannot be read right now."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=_VERSION_BUSY_SECONDS
        )

    def __call__(self) -> int | None:
        try:
            row = self._db.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            return None
        return int(row[0]) if row is not None else None

    def close(self) -> None:
        self._db.close()


class TokenCache:
    """Remembers ``check(space, token) is True`` while ``version()`` stays the same.

    ``now`` is a monotonic clock in seconds; a ``version()`` of None never matches.
    """

    def __init__(
        self,
        check: Callable[[str, str], Awaitable[bool]],
        version: Callable[[], int | None],
        now: Callable[[], float],
        *,
        ttl: float = TOKEN_CACHE_SECONDS,
        size: int = MAX_CACHED_TOKENS,
    ) -> None:
        self._check = check
        self._version = version
        self._now = now
        self._ttl = ttl
        self._size = size
        #: (space, SHA-256 of the token) -> (database version when accepted, expiry)
        self._accepted: OrderedDict[tuple[str, bytes], tuple[int, float]] = OrderedDict()

    async def allows(self, space: str, token: str) -> bool:
        # Keyed by a digest: raw tokens do not stay in this process's memory.
        key = (space, hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest())
        # Read the version before asking the registry: a commit during the check shows next time.
        version = self._version()
        remembered = self._accepted.get(key)
        if remembered is not None and version is not None:
            accepted_at_version, expires = remembered
            if accepted_at_version == version and self._now() < expires:
                return True
        try:
            allowed = await self._check(space, token)
        except RegistryUnavailable:
            if remembered is not None:
                return True
            raise
        if not allowed:
            self._accepted.pop(key, None)
            return False
        if version is not None:
            self._accepted[key] = (version, self._now() + self._ttl)
            self._accepted.move_to_end(key)
            while len(self._accepted) > self._size:
                self._accepted.popitem(last=False)
        return True
