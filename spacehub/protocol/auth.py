"""How a hub proves who it is to the manager: Ed25519 keys and signed challenges.

Theory of operation
-------------------
A hub owns one Ed25519 key pair, made on first start and kept in a 0600 PEM file.
It joins a space once, presenting a one-time join token and its raw 32-byte public
key; the manager stores the key and gives the hub its id. From then on no secret
crosses the wire: every connection starts with the manager sending a fresh random
challenge, and the hub answers with a signature over::

    b"spacehub-link-v1\\0" + space + b"\\0" + hub_id + b"\\0" + challenge

The prefix separates this use of the key from any other (a signature made here can
never pass for something else), and binding the space and hub id means a signature
captured on one link cannot be replayed for another hub or space; the fresh challenge
stops replays on the same one. The manager checks it with :func:`verify_challenge`
against the key it stored at the join.

Both sides import this module; it does no network I/O (the key file helpers are the
only file I/O) and uses nothing but ``cryptography`` (>= 38, the version in Debian 12).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "CHALLENGE_SIZE",
    "PAYLOAD_PREFIX",
    "PUBLIC_KEY_SIZE",
    "KeyFileError",
    "challenge_payload",
    "generate_hub_key",
    "load_private_key",
    "make_challenge",
    "public_key_bytes",
    "save_private_key",
    "sign_challenge",
    "verify_challenge",
]

#: Bytes of randomness in a challenge.
CHALLENGE_SIZE: Final = 32
#: Bytes in a raw Ed25519 public key.
PUBLIC_KEY_SIZE: Final = 32
#: Bytes in an Ed25519 signature.
SIGNATURE_SIZE: Final = 64
#: Domain separation: names the protocol and its version; bump it if the payload changes.
PAYLOAD_PREFIX: Final = b"spacehub-link-v1\0"
#: Longest key file we read; a PKCS#8 PEM Ed25519 key is about 120 bytes.
_MAX_KEY_FILE: Final = 16 * 1024


class KeyFileError(Exception):
    """The hub's key file cannot be used: unsafe permissions, not a PEM key, not Ed25519."""


def generate_hub_key() -> Ed25519PrivateKey:
    """A new Ed25519 key pair for a hub."""
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path | str) -> None:
    """Write ``key`` as an unencrypted PKCS#8 PEM file with mode 0600, atomically.

    The file is created 0600 from the start (never briefly readable by others),
    written and fsynced under a temporary name, then renamed over ``path``; a crash
    leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask did, this is the mode we mean
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """Read the hub's key, refusing a file that group or others may access.

    Raises :class:`KeyFileError` for unsafe permissions or a file that is not an
    unencrypted PEM Ed25519 private key, and ``OSError`` (e.g. ``FileNotFoundError``)
    when it cannot be opened.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as file:
        # fstat the file we opened, not the name, so a swap between check and read cannot fool us.
        mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"refusing to use the key file {path}: its mode is {mode:04o}, so group or others "
                f"can access it; run `chmod 600 {path}` (and consider the key leaked if others read it)"
            )
        data = file.read(_MAX_KEY_FILE + 1)
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path} is too large to be a key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key, as sent at the join and stored by the manager."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def make_challenge() -> bytes:
    """A fresh random challenge; the manager makes one for every connection."""
    return secrets.token_bytes(CHALLENGE_SIZE)


def challenge_payload(challenge: bytes, hub_id: str, space: str) -> bytes:
    """The exact bytes the hub signs and the manager verifies (see the module docstring).

    Raises ``ValueError`` for a challenge of the wrong size or a NUL in ``hub_id`` or
    ``space`` (which would make two different payloads look alike).
    """
    if len(challenge) != CHALLENGE_SIZE:
        raise ValueError(f"a challenge is {CHALLENGE_SIZE} bytes, not {len(challenge)}")
    fields = (space.encode(), hub_id.encode())
    if any(b"\0" in field for field in fields):
        raise ValueError("space and hub id must not contain NUL")
    return PAYLOAD_PREFIX + fields[0] + b"\0" + fields[1] + b"\0" + bytes(challenge)


def sign_challenge(key: Ed25519PrivateKey, payload: bytes) -> bytes:
    """The hub's 64-byte signature over a :func:`challenge_payload`."""
    return key.sign(payload)


def verify_challenge(public_key_raw: bytes, payload: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``payload`` was made by the key ``public_key_raw``.

    Never raises: a malformed key or signature is simply ``False``.
    """
    try:
        if len(public_key_raw) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
            return False
        public = Ed25519PublicKey.from_public_bytes(bytes(public_key_raw))
        public.verify(bytes(signature), bytes(payload))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
