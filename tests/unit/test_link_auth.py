"""spacehub.protocol.auth: hub keys and signed link challenges.

Rules: no network; key files live under ``tmp_path``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from spacehub.protocol.auth import (
    CHALLENGE_SIZE,
    PAYLOAD_PREFIX,
    KeyFileError,
    challenge_payload,
    generate_hub_key,
    load_private_key,
    make_challenge,
    public_key_bytes,
    save_private_key,
    sign_challenge,
    verify_challenge,
)

HUB = "sth-0a1b2c3d"
SPACE = "lab"


def test_round_trip() -> None:
    key = generate_hub_key()
    challenge = make_challenge()
    payload = challenge_payload(challenge, HUB, SPACE)
    signature = sign_challenge(key, payload)
    assert len(signature) == 64
    assert verify_challenge(public_key_bytes(key), payload, signature)


def test_public_key_is_raw_32_bytes() -> None:
    key = generate_hub_key()
    raw = public_key_bytes(key)
    assert len(raw) == 32
    assert public_key_bytes(key.public_key()) == raw
    assert public_key_bytes(generate_hub_key()) != raw


def test_challenges_are_fresh() -> None:
    challenges = {make_challenge() for _ in range(100)}
    assert len(challenges) == 100
    assert all(len(challenge) == CHALLENGE_SIZE for challenge in challenges)


def test_payload_is_domain_separated() -> None:
    challenge = b"\x01" * 32
    assert challenge_payload(challenge, HUB, SPACE) == PAYLOAD_PREFIX + b"lab\0sth-0a1b2c3d\0" + challenge
    assert PAYLOAD_PREFIX.startswith(b"spacehub-link-v1")


def test_wrong_key() -> None:
    payload = challenge_payload(make_challenge(), HUB, SPACE)
    signature = sign_challenge(generate_hub_key(), payload)
    assert not verify_challenge(public_key_bytes(generate_hub_key()), payload, signature)


def test_tampered_payload_or_signature() -> None:
    key = generate_hub_key()
    payload = challenge_payload(make_challenge(), HUB, SPACE)
    signature = sign_challenge(key, payload)
    flipped = bytes([payload[-1] ^ 1])
    assert not verify_challenge(public_key_bytes(key), payload[:-1] + flipped, signature)
    assert not verify_challenge(public_key_bytes(key), payload, signature[:-1] + bytes([signature[-1] ^ 1]))


def test_other_challenge_hub_or_space() -> None:
    key = generate_hub_key()
    challenge = make_challenge()
    signature = sign_challenge(key, challenge_payload(challenge, HUB, SPACE))
    raw = public_key_bytes(key)
    assert not verify_challenge(raw, challenge_payload(make_challenge(), HUB, SPACE), signature)
    assert not verify_challenge(raw, challenge_payload(challenge, "sth-ffffffff", SPACE), signature)
    assert not verify_challenge(raw, challenge_payload(challenge, HUB, "other"), signature)
    # The separator keeps ("ab", "c") apart from ("a", "bc").
    assert challenge_payload(challenge, "c", "ab") != challenge_payload(challenge, "bc", "a")


@pytest.mark.parametrize(
    ("public_key", "signature"),
    [
        (b"", b"\0" * 64),
        (b"\0" * 31, b"\0" * 64),
        (b"\0" * 33, b"\0" * 64),
        (b"\xff" * 32, b"\0" * 64),
        (None, b"\0" * 64),
        (b"\0" * 32, b""),
        (b"\0" * 32, b"\0" * 63),
        (b"\0" * 32, None),
    ],
)
def test_malformed_never_raises(public_key: bytes, signature: bytes) -> None:
    assert verify_challenge(public_key, b"payload", signature) is False


def test_payload_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        challenge_payload(b"short", HUB, SPACE)
    with pytest.raises(ValueError):
        challenge_payload(make_challenge(), "sth\0x", SPACE)
    with pytest.raises(ValueError):
        challenge_payload(make_challenge(), HUB, "lab\0")


def test_key_file_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "hub.key"
    key = generate_hub_key()
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        save_private_key(key, path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_private_key(path)
    assert public_key_bytes(loaded) == public_key_bytes(key)
    assert [entry.name for entry in tmp_path.iterdir()] == ["hub.key"]  # no temporary left


def test_save_replaces(tmp_path: Path) -> None:
    path = tmp_path / "hub.key"
    save_private_key(generate_hub_key(), path)
    key = generate_hub_key()
    save_private_key(key, path)
    assert public_key_bytes(load_private_key(path)) == public_key_bytes(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_refuses_a_key_others_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "hub.key"
    save_private_key(generate_hub_key(), path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(path)


def test_refuses_what_is_not_an_ed25519_key(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError):
        load_private_key(garbage)
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ec_key.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        load_private_key(ec_key)
    with pytest.raises(FileNotFoundError):
        load_private_key(tmp_path / "missing.key")
