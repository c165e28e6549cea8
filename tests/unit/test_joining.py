"""Join tokens made for the API (registry), and what a new machine is handed: the package
shelf, the one line and the cloud-init (cpm/joining.py). The line and the API run for real
in tests/e2e/test_joining.py and packaging/test-deb.sh."""

from __future__ import annotations

import hashlib
import json
import shlex
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpm.errors import BadRequest, JoinTokenNotFound, TokenExpired, TokenRevoked, TokenUsed
from cpm.joining import PackageShelf, cloud_init, configured_base_url, install_script, join_line, link_url
from cpm.registry import JOIN_TOKEN_PREFIX, TOKEN_ID_LENGTH, Registry, migrate

T0 = 1_700_000_000.0
FINGERPRINT = ":".join(["AB"] * 32)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Registry]:
    location = str(tmp_path / "registry.sqlite3")
    if request.param == "postgresql":
        location = request.getfixturevalue("postgres").new_database()
    with Registry(location, clock=clock) as registry:
        registry.create_space("lab")
        registry.create_space("other")
        yield registry


def test_issued_token_lists_without_its_secret(registry: Registry) -> None:
    issued = registry.issue_join_token("lab", 600, "line 3", ["press", "line3"])
    assert issued.token.startswith(JOIN_TOKEN_PREFIX)
    listed = registry.list_join_tokens("lab")
    assert [t.id for t in listed] == [issued.listing.id]
    assert len(issued.listing.id) == TOKEN_ID_LENGTH and issued.listing.id not in issued.token
    record = listed[0].record()
    assert record == {
        "id": issued.listing.id,
        "created": "2023-11-14T22:13:20.000Z",
        "expires": "2023-11-14T22:23:20.000Z",
        "description": "line 3",
        "tags": ["press", "line3"],
    }
    assert issued.token not in json.dumps(record)
    assert registry.list_join_tokens("other") == []


def test_redeemed_hub_gets_the_tokens_description_and_tags(registry: Registry) -> None:
    issued = registry.issue_join_token("lab", 600, "line 3", ["press"])
    hub = registry.redeem_join_token("lab", issued.token, b"\x01" * 32, "", ["press", "arm64"])
    assert hub.description == "line 3" and hub.tags == ("press", "arm64")
    own = registry.issue_join_token("lab", 600, "default", [])
    assert registry.redeem_join_token("lab", own.token, b"\x02" * 32, "mine").description == "mine"


def test_used_expired_and_revoked_tokens_leave_the_listing(registry: Registry, clock: FakeClock) -> None:
    used = registry.issue_join_token("lab", 600)
    expiring = registry.issue_join_token("lab", 60)
    revoked = registry.issue_join_token("lab", 600)
    kept = registry.issue_join_token("lab", 600)
    registry.redeem_join_token("lab", used.token, b"\x01" * 32)
    assert registry.revoke_join_token("lab", revoked.listing.id).revoked_at == T0
    clock.now += 61
    assert [t.id for t in registry.list_join_tokens("lab")] == [kept.listing.id]
    everything = {t.id: t.record() for t in registry.list_join_tokens("lab", include_spent=True)}
    assert set(everything) == {t.listing.id for t in (used, expiring, revoked, kept)}
    assert everything[used.listing.id]["usedBy"].startswith("sth-")
    assert "revoked" in everything[revoked.listing.id]
    with pytest.raises(TokenUsed):
        registry.redeem_join_token("lab", used.token, b"\x05" * 32)
    with pytest.raises(TokenExpired):
        registry.redeem_join_token("lab", expiring.token, b"\x05" * 32)
    with pytest.raises(TokenRevoked):
        registry.redeem_join_token("lab", revoked.token, b"\x05" * 32)
    # A refused join spent nothing: the kept token still works.
    registry.redeem_join_token("lab", kept.token, b"\x05" * 32)


def test_revoke_by_token_or_id_only_in_its_space(registry: Registry, clock: FakeClock) -> None:
    issued = registry.issue_join_token("lab", 600)
    with pytest.raises(JoinTokenNotFound):
        registry.revoke_join_token("other", issued.listing.id)
    with pytest.raises(JoinTokenNotFound):
        registry.revoke_join_token("lab", "nope")
    first = registry.revoke_join_token("lab", issued.token)
    clock.now += 5
    assert registry.revoke_join_token("lab", issued.listing.id.upper()).revoked_at == first.revoked_at


@pytest.mark.parametrize(
    ("ttl", "description", "tags"),
    [(0, "", []), (True, "", []), (float("nan"), "", []), (600, 5, []), (600, "", "a,b"), (600, "", [""])],
)
def test_issue_refuses_bad_input(registry: Registry, ttl: object, description: object, tags: object) -> None:
    with pytest.raises(BadRequest):
        registry.issue_join_token("lab", ttl, description, tags)  # type: ignore[arg-type]
    assert registry.list_join_tokens("lab", include_spent=True) == []


def test_version_1_registry_is_migrated_with_its_tokens(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with Registry(path) as registry:
        registry.create_space("lab")
        token = registry.create_join_token("lab")
    raw = sqlite3.connect(path, isolation_level=None)
    # Back to what a version-1 manager wrote.
    for column in ("description", "tags", "revoked_at"):
        raw.execute(f"ALTER TABLE join_tokens DROP COLUMN {column}")
    for table in ("replicas", "hub_owners", "cluster", "registry_changes"):
        raw.execute(f"DROP TABLE {table}")
    raw.execute("PRAGMA user_version = 1")
    assert migrate(raw) == 1
    raw.close()
    with Registry(path) as registry:
        (listed,) = registry.list_join_tokens("lab")
        assert listed.tags == () and listed.description == ""
        registry.redeem_join_token("lab", token, b"\x01" * 32)


# -- the package shelf --------------------------------------------------------------------------


def test_shelf_finds_the_package_in_the_data_dir_and_rehashes_a_changed_file(tmp_path: Path) -> None:
    shelf = PackageShelf(None, tmp_path, version="9.9.9")
    assert shelf.find() is None
    assert "make deb" in shelf.missing() and str(tmp_path / "packages") in shelf.missing()
    deb = tmp_path / "packages" / "spacehub_9.9.9_all.deb"
    deb.parent.mkdir()
    deb.write_bytes(b"first")
    package = shelf.find()
    assert package is not None and package.name == deb.name
    assert package.sha256 == hashlib.sha256(b"first").hexdigest() and package.size == 5
    deb.write_bytes(b"second!")
    changed = shelf.find()
    assert changed is not None and changed.sha256 == hashlib.sha256(b"second!").hexdigest()
    # Another version's package is not handed out unless named.
    (tmp_path / "packages" / "spacehub_1.0.0_all.deb").write_bytes(b"x")
    deb.unlink()
    assert PackageShelf(None, tmp_path, version="9.9.9").find() is None


def test_shelf_takes_a_configured_package_and_says_what_is_wrong_with_one(tmp_path: Path) -> None:
    given = tmp_path / "spacehub_1.2.3_all.deb"
    assert "is not a file" in PackageShelf(given, tmp_path).missing()
    given.write_bytes(b"deb")
    found = PackageShelf(given, tmp_path).find()
    assert found is not None and found.path == given
    other = tmp_path / "something.deb"
    other.write_bytes(b"deb")
    shelf = PackageShelf(other, tmp_path)
    assert shelf.find() is None and "spacehub_<version>_all.deb" in shelf.missing()


# -- the line, the script, cloud-init ----------------------------------------------------------

AWKWARD = 'it\'s "line 3"; $(reboot) `id` & more'


def test_install_arguments_reach_the_script_unchanged() -> None:
    """Whatever the description holds, the shell hands install.sh exactly the words given."""
    line = join_line("https://m.example:9000", None, "lab", "shj_x", AWKWARD, ["a b", "c"])
    assert line.startswith("curl -fsS https://m.example:9000/install.sh | $(command -v sudo) sh -s -- ")
    words = line.split(" sh -s -- ", 1)[1]
    echoed = subprocess.run(
        ["sh", "-c", f'printf "%s\\n" {words}'], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert echoed == ["--space", "lab", "--join-token", "shj_x", "--description", AWKWARD, "--tags", "a b,c"]


def test_pinned_line_checks_the_fingerprint_before_using_the_ca() -> None:
    line = join_line("https://10.0.0.5:9000", FINGERPRINT, "lab", "shj_x")
    check = line.index('grep -q "^' + "ab" * 32 + ' "')
    assert line.index("curl -fsSk") < check < line.index("--cacert")
    assert '--ca-file "$d/ca.pem" --space lab --join-token shj_x' in line
    with pytest.raises(ValueError):
        join_line("https://m:9000", "12:34", "lab", "shj_x")


def test_install_script_has_the_managers_settings_and_parses(tmp_path: Path) -> None:
    deb = tmp_path / "spacehub_1.2.3_all.deb"
    deb.write_bytes(b"deb")
    package = PackageShelf(deb, tmp_path).find()
    script = install_script("https://m.example:9000", package, "")
    assert "SPACEHUB_URL=https://m.example:9000\n" in script
    assert "SPACEHUB_LINK_URL=wss://m.example:9000\n" in script
    assert f"SPACEHUB_PACKAGE_SHA256={hashlib.sha256(b'deb').hexdigest()}\n" in script
    path = tmp_path / "install.sh"
    path.write_text(script)
    subprocess.run(["sh", "-n", str(path)], check=True)
    # Without a package it says why, before it touches anything.
    path.write_text(install_script("https://m.example:9000", None, "no package here; run make deb"))
    done = subprocess.run(
        ["sh", str(path), "--space", "lab", "--join-token", "shj_x"], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "no package here; run make deb" in done.stderr or "run as root" in done.stderr


def test_cloud_init_carries_the_ca_and_the_command() -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    text = cloud_init("https://m.example:9000", pem, "lab", "shj_x", AWKWARD, ["a"])
    assert text.startswith("#cloud-config\n")
    assert "      MIIB\n" in text
    command = json.loads(text.rsplit("  - [sh, -c, ", 1)[1].rstrip("]\n"))
    assert command.startswith(
        "curl -fsS --cacert /run/spacehub-join/ca.pem https://m.example:9000/install.sh | sh"
    )
    assert shlex.split(command.split(" sh -s -- ", 1)[1])[-3] == AWKWARD


def test_base_urls() -> None:
    assert configured_base_url("https://cpm.lan", True, "0.0.0.0", 9000) == "https://cpm.lan"
    assert configured_base_url(None, True, "127.0.0.1", 9000) == "https://127.0.0.1:9000"
    assert configured_base_url(None, False, "::1", 9000) == "http://[::1]:9000"
    assert link_url("https://cpm.lan:9000") == "wss://cpm.lan:9000"
    assert link_url("http://127.0.0.1:9000") == "ws://127.0.0.1:9000"
