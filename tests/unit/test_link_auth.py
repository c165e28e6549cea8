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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spacehub.protocol.auth import (
    CHALLENGE_SIZE,
    PAYLOAD_PREFIX,
    challenge_payload,
    make_challenge,
    verify_challenge,
)
from spacehub.server import keys as auth
from spacehub.server.keys import (
    KeyFileError,
    generate_hub_key,
    load_private_key,
    public_key_bytes,
    save_private_key,
    sign_challenge,
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
    assert key.public_bytes() == raw
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


# -- the hub's signing backends ----------------------------------------------------------


def test_the_hub_signs_through_libcrypto_here() -> None:
    """On Debian (and any CPython linked to a shared OpenSSL) the hub needs no ``cryptography``."""
    assert auth.loaded_libcrypto() is not None
    assert isinstance(auth._backend(), auth.LibcryptoEd25519)


@pytest.mark.parametrize("backend", ["libcrypto", "cryptography"])
def test_backends_pass_rfc8032_and_agree_with_cryptography(backend: str) -> None:
    path = auth.loaded_libcrypto()
    assert path is not None
    chosen: auth.Ed25519Backend = (
        auth.LibcryptoEd25519(path) if backend == "libcrypto" else auth.CryptographyEd25519()
    )
    assert auth.passes_known_answer(chosen)
    for size in (0, 1, 63, 64, 65, 1000, 70_000):
        seed, message = os.urandom(32), os.urandom(size)
        reference = Ed25519PrivateKey.from_private_bytes(seed)
        # Ed25519 is deterministic: the same key and message give the same signature everywhere.
        assert chosen.sign(seed, message) == reference.sign(message)
        assert chosen.public_key(seed) == public_key_bytes(reference)
        assert verify_challenge(chosen.public_key(seed), message, chosen.sign(seed, message))


def test_a_backend_that_answers_wrong_fails_the_known_answer_test() -> None:
    class Wrong:
        def public_key(self, seed: bytes) -> bytes:
            return bytes(32)

        def sign(self, seed: bytes, payload: bytes) -> bytes:
            return bytes(64)

    class Broken:
        def public_key(self, seed: bytes) -> bytes:
            raise RuntimeError("libcrypto refused the Ed25519 key")

        def sign(self, seed: bytes, payload: bytes) -> bytes:
            raise RuntimeError("unreachable")

    assert not auth.passes_known_answer(Wrong())
    assert not auth.passes_known_answer(Broken())


def test_without_libcrypto_the_hub_falls_back_to_cryptography(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_backend_in_use", None)
    monkeypatch.setattr(auth, "loaded_libcrypto", lambda: None)
    key = generate_hub_key()
    assert isinstance(auth._backend(), auth.CryptographyEd25519)
    payload = challenge_payload(make_challenge(), HUB, SPACE)
    assert verify_challenge(public_key_bytes(key), payload, sign_challenge(key, payload))


def test_a_missing_libcrypto_file_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(auth, "_backend_in_use", None)
    monkeypatch.setattr(auth, "loaded_libcrypto", lambda: str(tmp_path / "libcrypto.so.3"))
    assert isinstance(auth._backend(), auth.CryptographyEd25519)


def test_key_file_is_what_cryptography_writes_and_reads(tmp_path: Path) -> None:
    reference = Ed25519PrivateKey.generate()
    pem = reference.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    seed = reference.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    assert auth.HubKey(seed).pem() == pem
    path = tmp_path / "hub.key"
    path.write_bytes(pem)
    path.chmod(0o600)
    assert load_private_key(path).public_bytes() == public_key_bytes(reference)
    ours = generate_hub_key()
    save_private_key(ours, path)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    assert public_key_bytes(loaded) == ours.public_bytes()


def test_a_key_file_in_another_pkcs8_form_is_read_through_cryptography(tmp_path: Path) -> None:
    """A PEM that is not byte-for-byte our form (here: wrapped at 16 columns) still loads."""
    reference = Ed25519PrivateKey.generate()
    pem = reference.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    lines = pem.splitlines()
    body = b"".join(lines[1:-1])
    rewrapped = (
        b"\n".join([lines[0], *(body[i : i + 16] for i in range(0, len(body), 16)), lines[-1]]) + b"\n"
    )
    path = tmp_path / "hub.key"
    path.write_bytes(rewrapped)
    path.chmod(0o600)
    assert load_private_key(path).public_bytes() == public_key_bytes(reference)


def test_hub_key_checks_its_seed_and_hides_it() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        auth.HubKey(b"short")
    assert "secret" in repr(generate_hub_key())
