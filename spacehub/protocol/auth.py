"""How a hub proves who it is to the manager: signed challenges (the wire's half).

Theory of operation
-------------------
A hub owns one Ed25519 key pair, made on first start and kept in a 0600 PEM file
(:mod:`spacehub.server.keys`). It joins a space once, presenting a one-time join
token and its raw 32-byte public key; the manager stores the key and gives the hub
its id. From then on no secret crosses the wire: every connection starts with the
manager sending a fresh random challenge, and the hub answers with a signature over::

    b"spacehub-link-v1\\0" + space + b"\\0" + hub_id + b"\\0" + challenge

The prefix separates this use of the key from any other (a signature made here can
never pass for something else), and binding the space and hub id means a signature
captured on one link cannot be replayed for another hub or space; the fresh challenge
stops replays on the same one. The manager checks it with :func:`verify_challenge`
against the key it stored at the join.

This module is the protocol only: the payload both sides compute and the check. No
I/O; holding and using the hub's private key is the server layer's job.
"""

from __future__ import annotations

import secrets
from typing import Final

__all__ = [
    "CHALLENGE_SIZE",
    "PAYLOAD_PREFIX",
    "PUBLIC_KEY_SIZE",
    "SIGNATURE_SIZE",
    "challenge_payload",
    "make_challenge",
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


def verify_challenge(public_key_raw: bytes, payload: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``payload`` was made by the key ``public_key_raw``.

    Never raises: a malformed key or signature is simply ``False``.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        if len(public_key_raw) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
            return False
        public = Ed25519PublicKey.from_public_bytes(bytes(public_key_raw))
        public.verify(bytes(signature), bytes(payload))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
