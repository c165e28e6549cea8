"""cpm.api.tokens: remembered acceptances never outlive a commit to the registry."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import trio

from cpm.api.tokens import DatabaseVersion, TokenCache


class Checks:
    def __init__(self) -> None:
        self.valid: set[tuple[str, str]] = {("demo", "t1")}
        self.calls = 0

    async def __call__(self, space: str, token: str) -> bool:
        self.calls += 1
        return (space, token) in self.valid


async def test_an_acceptance_is_reused_while_the_version_holds(autojump_clock: trio.abc.Clock) -> None:
    checks, version = Checks(), [1]
    cache = TokenCache(checks, lambda: version[0], trio.current_time, ttl=10)
    assert await cache.allows("demo", "t1")
    assert await cache.allows("demo", "t1")
    assert checks.calls == 1
    version[0] = 2  # a commit somewhere: ask again
    checks.valid.clear()
    assert not await cache.allows("demo", "t1")
    assert checks.calls == 2


async def test_acceptances_expire(autojump_clock: trio.abc.Clock) -> None:
    checks = Checks()
    cache = TokenCache(checks, lambda: 1, trio.current_time, ttl=10)
    assert await cache.allows("demo", "t1")
    await trio.sleep(9)
    assert await cache.allows("demo", "t1")
    assert checks.calls == 1
    await trio.sleep(2)
    assert await cache.allows("demo", "t1")
    assert checks.calls == 2


async def test_refusals_and_other_spaces_are_not_remembered(autojump_clock: trio.abc.Clock) -> None:
    checks = Checks()
    cache = TokenCache(checks, lambda: 1, trio.current_time)
    assert not await cache.allows("demo", "t2")
    checks.valid.add(("demo", "t2"))  # made a moment later
    assert await cache.allows("demo", "t2")
    assert await cache.allows("demo", "t1")
    assert not await cache.allows("other", "t1")  # the same token, another space
    assert checks.calls == 4


async def test_an_unreadable_version_disables_the_memory(autojump_clock: trio.abc.Clock) -> None:
    checks = Checks()
    cache = TokenCache(checks, lambda: None, trio.current_time)
    for _ in range(3):
        assert await cache.allows("demo", "t1")
    assert checks.calls == 3


async def test_the_memory_is_bounded(autojump_clock: trio.abc.Clock) -> None:
    checks = Checks()
    checks.valid = {("demo", f"t{n}") for n in range(10)}
    cache = TokenCache(checks, lambda: 1, trio.current_time, size=4)
    for n in range(10):
        assert await cache.allows("demo", f"t{n}")
    assert len(cache._accepted) == 4
    assert await cache.allows("demo", "t9")  # recent: remembered
    assert checks.calls == 10
    assert await cache.allows("demo", "t0")  # evicted: asked again
    assert checks.calls == 11


def test_database_version_changes_on_another_connections_commit(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("CREATE TABLE t (x)")
    version = DatabaseVersion(path)
    try:
        first = version()
        assert first is not None
        assert version() == first  # nothing committed: unchanged
        writer.execute("INSERT INTO t VALUES (1)")
        assert version() != first
    finally:
        version.close()
        writer.close()
