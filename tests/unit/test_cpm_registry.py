"""cpm.registry: spaces, hubs, API tokens and join tokens, in SQLite and in PostgreSQL.

Rules: every test of the registry's behaviour runs on both backends (the ``location``
fixture: a file under ``tmp_path``, or a fresh database of the session's throw-away
PostgreSQL cluster, harness/postgres.py); the file tests are SQLite's own; time comes from a fake clock
(never ``sleep``); public keys are made-up 32-byte strings (the registry does not
care whether they are valid Ed25519 points).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from cpm.errors import (
    ApiTokenNotFound,
    BadRequest,
    Conflict,
    Forbidden,
    HubNotFound,
    HubRevoked,
    JoinRefused,
    ManagerError,
    RegistryUnavailable,
    SpaceNotFound,
    TokenExpired,
    TokenUnknown,
    TokenUsed,
)
from cpm.registry import SCHEMA_VERSION, Hub, HubOwner, Registry, iso_utc, migrate
from harness.postgres import TemporaryPostgres

ISO_MS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(n: int) -> bytes:
    return bytes([n]) * 32


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "registry.sqlite3"


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, db_path: Path) -> str:
    """Where the registry lives: an SQLite file, or a PostgreSQL database of its own."""
    if request.param == "sqlite":
        return str(db_path)
    postgres: TemporaryPostgres = request.getfixturevalue("postgres")
    return postgres.new_database()


@pytest.fixture
def registry(location: str, clock: FakeClock) -> Iterator[Registry]:
    with Registry(location, clock=clock) as registry:
        yield registry


@pytest.fixture
def sqlite_registry(db_path: Path, clock: FakeClock) -> Iterator[Registry]:
    with Registry(db_path, clock=clock) as registry:
        yield registry


def dump(registry: Registry, *tables: str) -> str:
    """Every row of ``tables``, as text, read through the registry's own database."""
    lines: list[str] = []
    with registry.database.transaction(write=False) as tx:
        for table in tables:
            lines.extend(repr(tuple(row)) for row in tx.execute(f"SELECT * FROM {table}").fetchall())
    return "\n".join(lines)


@pytest.fixture
def space(registry: Registry) -> str:
    registry.create_space("lab")
    return "lab"


def join(
    registry: Registry, space: str, public_key: bytes, description: str = "", tags: Iterable[str] = ()
) -> Hub:
    token = registry.create_join_token(space)
    return registry.redeem_join_token(space, token, public_key, description, tags)


# -- the file ---------------------------------------------------------------------------------


def test_schema_version(registry: Registry) -> None:
    assert registry.schema_version == SCHEMA_VERSION


def test_schema_version_and_wal(sqlite_registry: Registry, db_path: Path) -> None:
    assert sqlite_registry.schema_version == SCHEMA_VERSION
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        raw.close()


def test_file_is_private(sqlite_registry: Registry, db_path: Path) -> None:
    assert db_path.stat().st_mode & 0o077 == 0


def test_migrate_is_idempotent(sqlite_registry: Registry, db_path: Path) -> None:
    raw = sqlite3.connect(db_path, isolation_level=None)
    try:
        assert migrate(raw) == SCHEMA_VERSION
    finally:
        raw.close()


def test_refuses_a_newer_schema(db_path: Path) -> None:
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(ManagerError, match="newer"):
        Registry(db_path)


def test_postgres_migrates_once_and_refuses_a_newer_schema(postgres: TemporaryPostgres) -> None:
    url = postgres.new_database()
    with Registry(url) as first, Registry(url) as second:  # the second finds it migrated
        assert first.schema_version == second.schema_version == SCHEMA_VERSION
        with first.database.transaction() as tx:
            tx.execute("UPDATE spacehub_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ManagerError, match="newer"):
        Registry(url)


def test_postgres_down_is_a_503_and_it_recovers(postgres: TemporaryPostgres) -> None:
    # Its own cluster: stopping the session's would break the other tests.
    own = TemporaryPostgres()
    try:
        with Registry(own.new_database()) as registry:
            registry.create_space("lab")
            own.stop()
            with pytest.raises(RegistryUnavailable) as caught:
                registry.list_spaces()
            assert caught.value.status == 503
            own.start()
            for _ in range(50):  # the pool reconnects by itself
                try:
                    assert [s.name for s in registry.list_spaces()] == ["lab"]
                    break
                except RegistryUnavailable:
                    time.sleep(0.2)
            else:
                raise AssertionError("the registry did not come back with its database")
    finally:
        own.close()


def test_persists_across_reopen(location: str, clock: FakeClock) -> None:
    with Registry(location, clock=clock) as registry:
        registry.create_space("lab")
        api_token = registry.create_api_token("lab", "ci")
        join_token = registry.create_join_token("lab")
        hub = join(registry, "lab", key(1), description="pi", tags=["edge"])
        registry.mark_connected(hub.id, T0 + 5)
    with Registry(location, clock=clock) as registry:
        assert [space.name for space in registry.list_spaces()] == ["lab"]
        assert registry.check_api_token("lab", api_token)
        again = registry.get_hub(hub.id)
        assert again.description == "pi"
        assert again.tags == ("edge",)
        assert again.last_connected == T0 + 5
        assert registry.hub_by_key(key(1)).id == hub.id
        # The unused join token survived too, and is still one-time.
        registry.redeem_join_token("lab", join_token, key(2))
        with pytest.raises(TokenUsed):
            registry.redeem_join_token("lab", join_token, key(3))


def test_usable_from_other_threads(registry: Registry, space: str) -> None:
    # The Trio shell may call through trio.to_thread.run_sync.
    errors: list[Exception] = []

    def work(n: int) -> None:
        try:
            join(registry, space, key(n))
        except ManagerError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert not errors
    assert len(registry.list_hubs(space)) == 10


# -- spaces -----------------------------------------------------------------------------------


def test_space_crud(registry: Registry, clock: FakeClock) -> None:
    created = registry.create_space("b-space")
    registry.create_space("a0")
    assert created.name == "b-space"
    assert created.created == T0
    assert registry.get_space("b-space") == created
    assert [space.name for space in registry.list_spaces()] == ["a0", "b-space"]
    assert created.record() == {"id": "b-space", "created": iso_utc(T0)}
    registry.delete_space("a0")
    assert [space.name for space in registry.list_spaces()] == ["b-space"]
    with pytest.raises(SpaceNotFound):
        registry.get_space("a0")
    with pytest.raises(SpaceNotFound):
        registry.delete_space("a0")


def test_space_exists(registry: Registry, space: str) -> None:
    with pytest.raises(Conflict) as info:
        registry.create_space(space)
    assert info.value.status == 409


@pytest.mark.parametrize("name", ["a", "0", "a-b", "lab-1", "x" * 63, "0-"])
def test_space_name_ok(registry: Registry, name: str) -> None:
    assert registry.create_space(name).name == name


@pytest.mark.parametrize("name", ["", "-a", "A", "a_b", "a.b", "a b", "x" * 64, "é", "lab\n", "../x"])
def test_space_name_refused(registry: Registry, name: str) -> None:
    with pytest.raises(BadRequest) as info:
        registry.create_space(name)
    assert info.value.status == 400


def test_delete_space_with_hubs(registry: Registry, space: str) -> None:
    hub = join(registry, space, key(1))
    with pytest.raises(Conflict):
        registry.delete_space(space)
    registry.revoke_hub(hub.id, "retired")
    registry.delete_space(space)
    with pytest.raises(HubNotFound):
        registry.get_hub(hub.id)


def test_delete_space_forced_takes_everything(registry: Registry, space: str) -> None:
    hub = join(registry, space, key(1))
    token = registry.create_api_token(space)
    registry.delete_space(space, force=True)
    with pytest.raises(HubNotFound):
        registry.hub_by_key(key(1))
    registry.create_space(space)
    assert not registry.check_api_token(space, token)
    assert registry.list_hubs(space) == []
    # The key is free again.
    assert join(registry, space, key(1)).public_key == hub.public_key


# -- API tokens -------------------------------------------------------------------------------


def test_api_token_stored_hashed(registry: Registry, space: str) -> None:
    token = registry.create_api_token(space, "ci")
    assert token.startswith("shk_")
    assert len(token) > 40
    with registry.database.transaction(write=False) as tx:
        rows = [tuple(r) for r in tx.execute("SELECT hash, space, description FROM api_tokens").fetchall()]
    everything = dump(registry, "api_tokens", "spaces")
    assert rows == [(hashlib.sha256(token.encode()).hexdigest(), space, "ci")]
    assert token not in everything
    assert token.removeprefix("shk_") not in everything


def test_api_token_check(registry: Registry, space: str) -> None:
    registry.create_space("other")
    token = registry.create_api_token(space)
    assert registry.check_api_token(space, token)
    assert not registry.check_api_token("other", token)
    assert not registry.check_api_token("nowhere", token)
    assert not registry.check_api_token(space, token + "x")
    assert not registry.check_api_token(space, "")
    assert not registry.check_api_token(space, "shk_" + "a" * 10_000)
    assert registry.create_api_token(space) != token


def test_api_token_revoke_by_token(registry: Registry, space: str, clock: FakeClock) -> None:
    token = registry.create_api_token(space, "ci")
    keep = registry.create_api_token(space, "keep")
    clock.now += 10
    revoked = registry.revoke_api_token(space, token)
    assert revoked.revoked_at == T0 + 10
    assert not registry.check_api_token(space, token)
    assert registry.check_api_token(space, keep)
    # Again: nothing changes.
    clock.now += 10
    assert registry.revoke_api_token(space, token).revoked_at == T0 + 10


def test_api_token_list_and_revoke_by_id(registry: Registry, space: str, clock: FakeClock) -> None:
    token = registry.create_api_token(space, "ci")
    clock.now += 1
    registry.create_api_token(space, "laptop")
    listed = registry.list_api_tokens(space)
    assert [item.description for item in listed] == ["ci", "laptop"]
    assert all(token not in repr(item) for item in listed)
    assert listed[0].record() == {"id": listed[0].id, "created": iso_utc(T0), "description": "ci"}
    registry.revoke_api_token(space, listed[0].id)
    assert not registry.check_api_token(space, token)
    assert [item.description for item in registry.list_api_tokens(space)] == ["laptop"]
    everything = registry.list_api_tokens(space, include_revoked=True)
    assert [item.revoked for item in everything] == [True, False]
    assert "revoked" in everything[0].record()


def test_api_token_revoke_unknown(registry: Registry, space: str) -> None:
    registry.create_space("other")
    other = registry.create_api_token("other")
    for name in ("shk_nope", "0123456789abcdef", "x", other):
        with pytest.raises(ApiTokenNotFound):
            registry.revoke_api_token(space, name)
    assert registry.check_api_token("other", other)


def test_api_token_revoke_all(registry: Registry, space: str) -> None:
    tokens = [registry.create_api_token(space) for _ in range(3)]
    registry.revoke_api_token(space, tokens[0])
    assert registry.revoke_all_api_tokens(space) == 2
    assert not any(registry.check_api_token(space, token) for token in tokens)


def test_api_token_needs_space(registry: Registry) -> None:
    with pytest.raises(SpaceNotFound):
        registry.create_api_token("nowhere")


# -- join tokens ------------------------------------------------------------------------------


def test_join_happy_path(registry: Registry, space: str, clock: FakeClock) -> None:
    token = registry.create_join_token(space)
    assert token.startswith("shj_")
    clock.now += 60
    hub = registry.redeem_join_token(space, token, key(1), description="rack 3", tags=["pi", "eu"])
    assert re.fullmatch(r"sth-[0-9a-f]{8}", hub.id)
    assert hub.space == space
    assert hub.public_key == key(1)
    assert hub.description == "rack 3"
    assert hub.tags == ("pi", "eu")
    assert hub.created == T0 + 60
    assert not hub.revoked
    assert registry.get_hub(hub.id) == hub
    assert registry.hub_by_key(key(1)) == hub
    assert registry.list_hubs(space) == [hub]


def test_join_token_stored_hashed(registry: Registry, space: str) -> None:
    token = registry.create_join_token(space)
    everything = dump(registry, "join_tokens")
    assert hashlib.sha256(token.encode()).hexdigest() in everything
    assert token.removeprefix("shj_") not in everything


def test_join_token_expired(registry: Registry, space: str, clock: FakeClock) -> None:
    token = registry.create_join_token(space, ttl_seconds=60)
    clock.now += 60
    with pytest.raises(TokenExpired) as info:
        registry.redeem_join_token(space, token, key(1))
    assert isinstance(info.value, JoinRefused)
    assert info.value.status == 403
    assert info.value.code == "token-expired"
    assert "expired" in info.value.message
    assert registry.list_hubs(space) == []


def test_join_token_just_before_expiry(registry: Registry, space: str, clock: FakeClock) -> None:
    token = registry.create_join_token(space, ttl_seconds=60)
    clock.now += 59.9
    registry.redeem_join_token(space, token, key(1))


def test_join_token_used_twice(registry: Registry, space: str) -> None:
    token = registry.create_join_token(space)
    first = registry.redeem_join_token(space, token, key(1))
    with pytest.raises(TokenUsed) as info:
        registry.redeem_join_token(space, token, key(2))
    assert info.value.code == "token-used"
    assert first.id in info.value.message
    with pytest.raises(HubNotFound):
        registry.hub_by_key(key(2))


def test_join_token_unknown(registry: Registry, space: str) -> None:
    for token in ("shj_nope", "", "x" * 10_000):
        with pytest.raises(TokenUnknown) as info:
            registry.redeem_join_token(space, token, key(1))
        assert info.value.code == "token-unknown"
        assert info.value.message


def test_join_token_wrong_space(registry: Registry, space: str) -> None:
    registry.create_space("other")
    token = registry.create_join_token("other")
    with pytest.raises(TokenUnknown):
        registry.redeem_join_token(space, token, key(1))
    # Still good where it belongs.
    assert registry.redeem_join_token("other", token, key(1)).space == "other"


def test_join_key_reuse(registry: Registry, space: str) -> None:
    join(registry, space, key(1))
    token = registry.create_join_token(space)
    with pytest.raises(Conflict):
        registry.redeem_join_token(space, token, key(1))
    # The refused join left the token unspent.
    registry.redeem_join_token(space, token, key(2))


def test_join_with_a_revoked_key(registry: Registry, space: str) -> None:
    hub = join(registry, space, key(1))
    registry.revoke_hub(hub.id, "stolen")
    token = registry.create_join_token(space)
    with pytest.raises(HubRevoked) as info:
        registry.redeem_join_token(space, token, key(1))
    assert info.value.code == "hub-revoked"


@pytest.mark.parametrize(
    ("public_key", "description", "tags"),
    [
        (b"short", "", ()),
        (key(1) + b"x", "", ()),
        (key(1), "x" * 5000, ()),
        (key(1), "", "pi"),
        (key(1), "", [""]),
        (key(1), "", [1]),
        (key(1), "", ["t"] * 1000),
    ],
)
def test_join_bad_input(
    registry: Registry, space: str, public_key: bytes, description: str, tags: list[str]
) -> None:
    token = registry.create_join_token(space)
    with pytest.raises(BadRequest):
        registry.redeem_join_token(space, token, public_key, description, tags)
    registry.redeem_join_token(space, token, key(9))  # not spent


@pytest.mark.parametrize("ttl", [0, -1, 10**9])
def test_join_token_bad_ttl(registry: Registry, space: str, ttl: float) -> None:
    with pytest.raises(BadRequest):
        registry.create_join_token(space, ttl_seconds=ttl)


def test_join_token_needs_space(registry: Registry) -> None:
    with pytest.raises(SpaceNotFound):
        registry.create_join_token("nowhere")


# -- hubs -------------------------------------------------------------------------------------


def test_hub_not_found(registry: Registry, space: str) -> None:
    with pytest.raises(HubNotFound) as info:
        registry.get_hub("sth-00000000")
    assert info.value.status == 404
    with pytest.raises(HubNotFound):
        registry.hub_by_key(key(1))
    with pytest.raises(HubNotFound):
        registry.mark_connected("sth-00000000")
    with pytest.raises(SpaceNotFound):
        registry.list_hubs("nowhere")


def test_hub_revoke(registry: Registry, space: str, clock: FakeClock) -> None:
    hub = join(registry, space, key(1))
    other = join(registry, space, key(2))
    clock.now += 5
    revoked = registry.revoke_hub(hub.id, "lost in transit")
    assert revoked.revoked
    assert revoked.revoked_at == T0 + 5
    assert revoked.revoked_reason == "lost in transit"
    clock.now += 5
    again = registry.revoke_hub(hub.id, "another reason")
    assert (again.revoked_at, again.revoked_reason) == (T0 + 5, "lost in transit")
    assert registry.list_hubs(space, include_revoked=False) == [other]
    assert len(registry.list_hubs(space)) == 2
    with pytest.raises(HubRevoked) as info:
        registry.mark_connected(hub.id)
    assert "lost in transit" in info.value.message
    # A revoked hub's link still goes down cleanly.
    assert registry.mark_disconnected(hub.id).last_disconnected == T0 + 10


def test_connected_timestamps_and_record(registry: Registry, space: str, clock: FakeClock) -> None:
    hub = join(registry, space, key(1), description="pi", tags=["edge"])
    assert hub.record() == {
        "id": hub.id,
        "info": {"created": "2023-11-14T22:13:20.000Z"},
        "description": "pi",
        "tags": ["edge"],
    }
    clock.now += 1.5
    connected = registry.mark_connected(hub.id)
    assert connected.last_connected == T0 + 1.5
    assert connected.record()["info"] == {
        "created": "2023-11-14T22:13:20.000Z",
        "lastConnected": "2023-11-14T22:13:21.500Z",
    }
    disconnected = registry.mark_disconnected(hub.id, T0 + 3.25)
    info = disconnected.record()["info"]
    assert info["lastDisconnected"] == "2023-11-14T22:13:23.250Z"
    assert info["lastConnected"] == "2023-11-14T22:13:21.500Z"
    assert all(ISO_MS_Z.fullmatch(value) for value in info.values())


def test_iso_utc() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(T0 + 0.0015) == "2023-11-14T22:13:20.001Z"


def test_errors_carry_status() -> None:
    assert Forbidden().message == "Forbidden"
    assert Forbidden().status == 403
    assert ManagerError().status == 500
    assert TokenExpired("custom").message == "custom"


def test_data_version_moves_for_other_connections(
    registry: Registry, space: str, location: str, clock: FakeClock
) -> None:
    # The running manager polls this instead of scanning the hubs: another process's
    # writes (cpm hub revoke, another replica) must move it. On SQLite its own writes
    # (connects, disconnects) do not; on PostgreSQL every commit that changed a row does.
    hub = join(registry, space, key(1))
    before = registry.data_version()
    registry.mark_connected(hub.id)
    registry.mark_disconnected(hub.id)
    if not registry.shared:
        assert registry.data_version() == before
    else:
        assert registry.data_version() == before + 2
        before = registry.data_version()
        registry.list_hubs(space)
        assert registry.data_version() == before  # reads never move it
    with Registry(location, clock=clock) as admin:
        admin.revoke_hub(hub.id, "stolen")
    assert registry.data_version() != before


def test_hub_standing(registry: Registry, space: str) -> None:
    kept = join(registry, space, key(1))
    stolen = join(registry, space, key(2))
    silent = join(registry, space, key(3))
    registry.revoke_hub(stolen.id, "stolen")
    registry.revoke_hub(silent.id, "")
    assert registry.hub_standing() == {
        kept.id: (space, None),
        stolen.id: (space, "stolen"),
        silent.id: (space, ""),
    }


# -- replicas: ownership, liveness, shared settings --------------------------------------------


def test_claims_grow_the_epoch_and_only_the_holder_releases(
    registry: Registry, space: str, clock: FakeClock
) -> None:
    hub = join(registry, space, key(1))
    _, first = registry.claim_hub(hub.id, "r1")
    assert registry.owned_by("r1") == {hub.id: first}
    clock.now += 1
    again, second = registry.claim_hub(hub.id, "r2")  # the hub linked to another replica
    assert second == first + 1 and again.last_connected == clock.now
    assert registry.owners() == {hub.id: ("r2", second)}
    # r1's old link ends: it releases nothing, and records no disconnection.
    assert not registry.release_hub(hub.id, "r1", first)
    assert registry.get_hub(hub.id).last_disconnected is None
    assert registry.hub_owner(hub.id) == HubOwner("r2", second, None, None)
    clock.now += 1
    assert registry.release_hub(hub.id, "r2", second)
    assert registry.hub_owner(hub.id) is None
    assert registry.get_hub(hub.id).last_disconnected == clock.now
    # The next claim goes on from 1 again: the row is gone, not the hub.
    assert registry.take_over(hub.id, "r1")[1:] == (1, None)
    # A take-over names the replica that held it (to be told to let go).
    assert registry.take_over(hub.id, "r2")[1:] == (2, "r1")
    registry.revoke_hub(hub.id, "stolen")
    with pytest.raises(HubRevoked):
        registry.claim_hub(hub.id, "r2")


def test_liveness_dead_replicas_and_forgetting_one(registry: Registry, space: str, clock: FakeClock) -> None:
    hubs = [join(registry, space, key(n)) for n in (1, 2, 3)]
    registry.replica_alive("r1", "https://r1:9000", T0)
    registry.replica_alive("r2", "https://r2:9000", T0)
    registry.claim_hub(hubs[0].id, "r1")
    registry.claim_hub(hubs[1].id, "r2")
    registry.claim_hub(hubs[2].id, "r3")  # a replica with no liveness row at all
    assert [r.id for r in registry.replicas()] == ["r1", "r2"]
    assert registry.hub_owner(hubs[0].id) == HubOwner("r1", 1, "https://r1:9000", clock.now)
    clock.now += 20
    registry.replica_alive("r1", "https://r1:9000", T0)
    assert registry.dead_replicas(15) == ["r2", "r3"]
    registry.cluster_value("home:topics", lambda: "r2")
    assert registry.forget_replica("r2") == 1
    assert registry.forget_replica("r3") == 1
    assert registry.dead_replicas(15) == []
    assert registry.owners() == {hubs[0].id: ("r1", 1)}
    assert registry.get_hub(hubs[1].id).last_disconnected == clock.now
    # What the dead replica was home to goes to the next that asks.
    assert registry.cluster_value("home:topics", lambda: "r1") == "r1"


def test_reasserting_keeps_a_newer_owner(registry: Registry, space: str) -> None:
    mine, taken = join(registry, space, key(1)), join(registry, space, key(2))
    _, epoch = registry.claim_hub(mine.id, "r1")
    registry.claim_hub(taken.id, "r1")
    registry.forget_replica("r1")  # released by another replica during an outage
    _, newer = registry.claim_hub(taken.id, "r2")  # and one hub linked elsewhere meanwhile
    registry.reassert_hubs("r1", {mine.id: epoch, taken.id: 1, "sth-gone": 4})
    assert registry.owners() == {mine.id: ("r1", epoch), taken.id: ("r2", newer)}


def test_a_cluster_value_is_made_once(registry: Registry) -> None:
    made: list[str] = []

    def make() -> str:
        made.append("x")
        return f"secret-{len(made)}"

    assert registry.cluster_value("peer-secret", make) == "secret-1"
    assert registry.cluster_value("peer-secret", make) == "secret-1"
    assert made == ["x"]


def test_liveness_does_not_count_as_a_change(registry: Registry) -> None:
    before = registry.data_version()
    registry.replica_alive("r1", "https://r1:9000", T0)
    assert registry.data_version() == before
