"""The hub's key: an Ed25519 private key kept in a 0600 PEM file, and the signatures it makes.

The link's challenge and its check are the protocol's (:mod:`spacehub.protocol.auth`);
this module holds the secret half, which only a hub needs.

Why the hub's half does not import ``cryptography``
----------------------------------------------------
The hub must fit a 256 MB edge machine, and loading ``cryptography``'s Rust extension
costs about 6 MB of RSS, for one signature per connection. A hub key is held as its
32-byte seed (:class:`HubKey`) and signs through the OpenSSL ``libcrypto`` that Python's
own ``ssl`` and ``hashlib`` modules have already loaded into the process (four EVP calls
through ``ctypes``; Ed25519 is deterministic, so a known-answer test from RFC 8032 proves
the binding before first use). Where that library cannot be found or fails the test,
``cryptography`` (>= 38, the version in Debian 12) is imported and used instead. The key
file is plain PKCS#8 PEM, the same bytes ``cryptography`` and ``openssl`` write and read.
The manager verifies with ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from spacehub.protocol.auth import PUBLIC_KEY_SIZE, SIGNATURE_SIZE

from .errors import ServerError
from .files import PRIVATE, UnsafeFile, read_private, write_atomic

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "HubKey",
    "KeyFileError",
    "generate_hub_key",
    "load_private_key",
    "public_key_bytes",
    "save_private_key",
    "sign_challenge",
]

#: Longest key file we read; a PKCS#8 PEM Ed25519 key is about 120 bytes.
_MAX_KEY_FILE: Final = 16 * 1024


class KeyFileError(ServerError):
    """The hub's key file cannot be used: unsafe permissions, not a PEM key, not Ed25519."""


#: Bytes in an Ed25519 private key (its seed, RFC 8032).
SEED_SIZE: Final = 32
#: DER of a PKCS#8 (RFC 5208/8410) Ed25519 private key, before the 32 seed bytes:
#: SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }.
_PKCS8_ED25519_PREFIX: Final = bytes.fromhex("302e020100300506032b657004220420")
_PEM_HEADER: Final = b"-----BEGIN PRIVATE KEY-----"
_PEM_FOOTER: Final = b"-----END PRIVATE KEY-----"


class HubKey:
    """A hub's Ed25519 private key, kept as its 32-byte seed.

    Signing and deriving the public key go through the process-wide backend (see the
    module docstring); the seed never leaves this object except through :meth:`pem`.
    """

    __slots__ = ("_public", "_seed")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_SIZE:
            raise ValueError(f"an Ed25519 private key is {SEED_SIZE} bytes, not {len(seed)}")
        self._seed = bytes(seed)
        self._public: bytes | None = None

    @classmethod
    def generate(cls) -> HubKey:
        """A new random key (the seed is 32 bytes from the OS's CSPRNG, as RFC 8032 asks)."""
        return cls(secrets.token_bytes(SEED_SIZE))

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        if self._public is None:
            self._public = _backend().public_key(self._seed)
        return self._public

    def sign(self, payload: bytes) -> bytes:
        """The 64-byte Ed25519 signature over ``payload``."""
        return _backend().sign(self._seed, bytes(payload))

    def pem(self) -> bytes:
        """The key as unencrypted PKCS#8 PEM (what ``openssl genpkey -algorithm ed25519`` writes)."""
        body = base64.b64encode(_PKCS8_ED25519_PREFIX + self._seed)
        return _PEM_HEADER + b"\n" + body + b"\n" + _PEM_FOOTER + b"\n"

    def __repr__(self) -> str:
        return "HubKey(<secret>)"


def generate_hub_key() -> HubKey:
    """A new Ed25519 key pair for a hub."""
    return HubKey.generate()


def save_private_key(key: HubKey, path: Path | str) -> None:
    """Write ``key`` as an unencrypted PKCS#8 PEM file with mode 0600, atomically
    (:func:`~spacehub.server.files.write_atomic`: never briefly readable by others,
    never half written)."""
    write_atomic(Path(path), key.pem(), PRIVATE)


def load_private_key(path: Path | str) -> HubKey:
    """Read the hub's key, refusing a file that group or others may access.

    Raises :class:`KeyFileError` for unsafe permissions or a file that is not an
    unencrypted PEM Ed25519 private key, and ``OSError`` (e.g. ``FileNotFoundError``)
    when it cannot be opened.
    """
    path = Path(path)
    try:
        data = read_private(path, _MAX_KEY_FILE, "the key file")
    except UnsafeFile as exc:
        raise KeyFileError(str(exc)) from None
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path} is too large to be a key file")
    seed = _seed_from_pem(data)
    if seed is None:
        # Not the plain form we write (a key made by another tool may carry the public key
        # or attributes too): let cryptography parse whatever PEM it is.
        seed = _seed_with_cryptography(data, path)
    return HubKey(seed)


def _seed_from_pem(data: bytes) -> bytes | None:
    """The seed of a plain PKCS#8 Ed25519 PEM (exactly what :meth:`HubKey.pem` writes), else None."""
    text = data.strip()
    if not (text.startswith(_PEM_HEADER) and text.endswith(_PEM_FOOTER)):
        return None
    body = b"".join(text[len(_PEM_HEADER) : -len(_PEM_FOOTER)].split())
    try:
        der = base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        return None
    if len(der) != len(_PKCS8_ED25519_PREFIX) + SEED_SIZE or not der.startswith(_PKCS8_ED25519_PREFIX):
        return None
    return der[len(_PKCS8_ED25519_PREFIX) :]


def _seed_with_cryptography(data: bytes, path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_key_bytes(key: HubKey | Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key, as sent at the join and stored by the manager."""
    if isinstance(key, HubKey):
        return key.public_bytes()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_challenge(key: HubKey | Ed25519PrivateKey, payload: bytes) -> bytes:
    """The hub's 64-byte signature over a :func:`challenge_payload`."""
    return key.sign(payload)


# -- signing backends ------------------------------------------------------------------------

#: RFC 8032 section 7.1, test 1: seed, public key and the signature of the empty message.
_KAT_SEED: Final = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
_KAT_PUBLIC: Final = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
_KAT_SIGNATURE: Final = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
#: OpenSSL's NID_ED25519 (the EVP_PKEY type), stable since 1.1.1.
_NID_ED25519: Final = 1087


class Ed25519Backend(Protocol):
    """What a hub key needs from a crypto library."""

    def public_key(self, seed: bytes) -> bytes: ...

    def sign(self, seed: bytes, payload: bytes) -> bytes: ...


class LibcryptoEd25519:
    """Ed25519 through the OpenSSL ``libcrypto`` at ``path`` (already mapped by ``ssl``)."""

    def __init__(self, path: str) -> None:
        import ctypes

        lib = ctypes.CDLL(path)
        void_p, char_p, size_t = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        size_p = ctypes.POINTER(size_t)
        self._ctypes = ctypes
        self._new_key = lib.EVP_PKEY_new_raw_private_key
        self._new_key.restype, self._new_key.argtypes = void_p, [ctypes.c_int, void_p, char_p, size_t]
        self._get_public = lib.EVP_PKEY_get_raw_public_key
        self._get_public.restype, self._get_public.argtypes = ctypes.c_int, [void_p, char_p, size_p]
        self._free_key = lib.EVP_PKEY_free
        self._free_key.restype, self._free_key.argtypes = None, [void_p]
        self._new_ctx = lib.EVP_MD_CTX_new
        self._new_ctx.restype, self._new_ctx.argtypes = void_p, []
        self._free_ctx = lib.EVP_MD_CTX_free
        self._free_ctx.restype, self._free_ctx.argtypes = None, [void_p]
        self._sign_init = lib.EVP_DigestSignInit
        self._sign_init.restype, self._sign_init.argtypes = (
            ctypes.c_int,
            [void_p, void_p, void_p, void_p, void_p],
        )
        self._sign = lib.EVP_DigestSign
        self._sign.restype, self._sign.argtypes = ctypes.c_int, [void_p, char_p, size_p, char_p, size_t]

    def _key(self, seed: bytes) -> int:
        key = self._new_key(_NID_ED25519, None, seed, len(seed))
        if not key:
            raise RuntimeError("libcrypto refused the Ed25519 key")
        return int(key)

    def public_key(self, seed: bytes) -> bytes:
        key = self._key(seed)
        try:
            out = self._ctypes.create_string_buffer(PUBLIC_KEY_SIZE)
            size = self._ctypes.c_size_t(PUBLIC_KEY_SIZE)
            if self._get_public(key, out, self._ctypes.byref(size)) != 1 or size.value != PUBLIC_KEY_SIZE:
                raise RuntimeError("libcrypto could not derive the Ed25519 public key")
            return out.raw
        finally:
            self._free_key(key)

    def sign(self, seed: bytes, payload: bytes) -> bytes:
        key = self._key(seed)
        ctx = self._new_ctx()
        try:
            if not ctx or self._sign_init(ctx, None, None, None, key) != 1:
                raise RuntimeError("libcrypto could not start an Ed25519 signature")
            out = self._ctypes.create_string_buffer(SIGNATURE_SIZE)
            size = self._ctypes.c_size_t(SIGNATURE_SIZE)
            if self._sign(ctx, out, self._ctypes.byref(size), payload, len(payload)) != 1:
                raise RuntimeError("libcrypto could not make the Ed25519 signature")
            if size.value != SIGNATURE_SIZE:
                raise RuntimeError(f"libcrypto made a {size.value}-byte Ed25519 signature")
            return out.raw
        finally:
            if ctx:
                self._free_ctx(ctx)
            self._free_key(key)


class CryptographyEd25519:
    """Ed25519 through the ``cryptography`` package."""

    def public_key(self, seed: bytes) -> bytes:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        public = Ed25519PrivateKey.from_private_bytes(seed).public_key()
        return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, seed: bytes, payload: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(seed).sign(payload)


def loaded_libcrypto() -> str | None:
    """The path of the ``libcrypto`` mapped into this process by ``ssl``/``hashlib``, if any."""
    import ssl  # noqa: F401  (maps libcrypto, if Python was built against a shared one)

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libcrypto.so"):
                    return fields[5].strip()
    except OSError:
        pass
    return None


def passes_known_answer(backend: Ed25519Backend) -> bool:
    """Whether ``backend`` reproduces RFC 8032's first test vector (Ed25519 is deterministic)."""
    try:
        return backend.public_key(_KAT_SEED) == _KAT_PUBLIC and backend.sign(_KAT_SEED, b"") == _KAT_SIGNATURE
    except (OSError, AttributeError, RuntimeError, ValueError, TypeError):
        return False


_backend_in_use: Ed25519Backend | None = None


def _backend() -> Ed25519Backend:
    """libcrypto through ctypes when it is there and proves itself; cryptography otherwise."""
    global _backend_in_use
    if _backend_in_use is None:
        path = loaded_libcrypto()
        chosen: Ed25519Backend | None = None
        if path is not None:
            try:
                candidate = LibcryptoEd25519(path)
            except (OSError, AttributeError):  # not loadable, or an OpenSSL without these calls
                candidate = None
            if candidate is not None and passes_known_answer(candidate):
                chosen = candidate
        _backend_in_use = chosen if chosen is not None else CryptographyEd25519()
    return _backend_in_use
