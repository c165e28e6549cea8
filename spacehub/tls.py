"""The client side of the manager's TLS: trust only its CA, pinned by a fingerprint if given.

The manager's side (making the CA and its server certificate) is :mod:`cpm.tls`; see its
docstring for how a hub comes to trust the CA. This half lives here, on the standard
library alone, because the hub imports it: on a 256 MB edge machine the hub does not load
``cryptography``'s X.509 machinery (about 2.5 MB of RSS) just to hash one certificate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import ssl
from pathlib import Path
from typing import Final

__all__ = ["MAX_PEM", "certificate_fingerprint", "check_ca_fingerprint", "client_ssl_context", "read_pem"]

#: Longest PEM file read (a certificate or key is a few KB).
MAX_PEM: Final = 64 * 1024

_PEM_CERTIFICATE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END CERTIFICATE-----"
)


def certificate_fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER, as ``AB:CD:...`` (the form ``cpm`` prints)."""
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def check_ca_fingerprint(pem_bytes: bytes, fingerprint: str) -> bool:
    """Whether ``pem_bytes`` is exactly one certificate whose SHA-256 is ``fingerprint``.

    The fingerprint may use any case, with or without colons or spaces. Never raises.
    Only the hash is checked here; the TLS library parses the certificate when it is
    loaded into a context, and the hash pins exactly those bytes.
    """
    try:
        if pem_bytes.count(b"-----BEGIN") != 1:
            return False
        match = _PEM_CERTIFICATE.search(pem_bytes)
        if match is None:
            return False
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        wanted = "".join(fingerprint.split()).replace(":", "").upper()
        return hmac.compare_digest(certificate_fingerprint(der).replace(":", ""), wanted)
    except (ValueError, TypeError, AttributeError, binascii.Error):
        return False


def client_ssl_context(
    ca_file: Path | str | None = None,
    fingerprint: str | None = None,
    *,
    ca_data: bytes | None = None,
) -> ssl.SSLContext:
    """A verifying client context that trusts only the manager's CA.

    Give the CA as ``ca_file`` or ``ca_data`` (PEM). With ``fingerprint`` as well, the
    CA is checked against it first (``ValueError`` on a mismatch). A fingerprint alone is
    not enough to verify a connection: fetch the CA first (see :mod:`cpm.tls`).
    Host names are checked; use ``server_hostname`` when connecting by IP or name.
    """
    if (ca_file is None) == (ca_data is None):
        if ca_file is None and fingerprint is not None:
            raise ValueError(
                "a fingerprint alone cannot verify the manager: fetch its CA (GET /api/v1/ca.pem), "
                "check it with check_ca_fingerprint(), then pass it as ca_data"
            )
        raise ValueError("give the manager's CA as exactly one of ca_file or ca_data")
    if fingerprint is not None:
        pem = read_pem(Path(ca_file)) if ca_file is not None else ca_data
        if pem is None or not check_ca_fingerprint(pem, fingerprint):
            raise ValueError("the manager's CA does not match the configured fingerprint")
    if ca_file is not None:
        context = ssl.create_default_context(cafile=os.fspath(ca_file))
    else:
        assert ca_data is not None
        # cadata as str is PEM (bytes would mean DER); PEM is ASCII.
        context = ssl.create_default_context(cadata=ca_data.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Python 3.13 sets this by default; set it everywhere so 3.11 refuses what 3.13 would.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def read_pem(path: Path) -> bytes:
    """A PEM file's first :data:`MAX_PEM` bytes (more would not be a certificate or key)."""
    with path.open("rb") as file:
        return file.read(MAX_PEM)
