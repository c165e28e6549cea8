"""The manager's TLS: a private CA, the server certificate it signs, and SSL contexts.

Theory of operation
-------------------
Hubs dial the manager over wss. The manager makes its own CA on first start (EC
P-256, ten years) and a server certificate signed by it; both stay in the data dir
and are reused on later starts, so hubs configured with the CA keep trusting it::

    ca.pem  ca.key (0600)          made once; never replaced automatically
    server.pem  server.key (0600)  remade when it expires within 30 days, lacks a
                                   requested host name or IP, or no longer matches the CA

The certificates carry what Python 3.13's strict X.509 checks (``VERIFY_X509_STRICT``,
on by default there) demand: a critical BasicConstraints, KeyUsage, SKI on both, AKI
on the leaf, a SAN with every DNS name and IP (``localhost`` and ``127.0.0.1`` always),
and EKU serverAuth on the leaf. :func:`client_ssl_context` turns the strict checks on under
3.11 and 3.12 too, so every version judges the chain alike. It and :func:`check_ca_fingerprint`
live in :mod:`spacehub.tls` (standard library only, as the hub imports them) and are
re-exported here.

How a hub comes to trust the CA
-------------------------------
Either the operator copies ``ca.pem`` to the hub (``client_ssl_context(ca_file=...)``),
or gives the hub only the CA's fingerprint (``cpm`` prints :func:`ca_fingerprint`,
``AB:CD:...``), which is short enough to paste. With a fingerprint the hub's shell:

1. fetches the CA from the manager, ``GET /api/v1/ca.pem``. This fetch may be unverified
   (plain HTTP or TLS without verification): the next step is what makes it trustworthy;
2. checks it with :func:`check_ca_fingerprint` and refuses to go on when it is False;
3. stores those exact bytes (or passes them as ``ca_data``) and from then on connects
   with ``client_ssl_context(ca_data=..., fingerprint=...)``, a fully verifying context.

:func:`check_ca_fingerprint` accepts only a PEM holding exactly one certificate, so a
forged answer cannot smuggle a second CA in behind the genuine one.

Only APIs that ``cryptography`` 38 (Debian 12) already has are used here.
"""

from __future__ import annotations

import ipaddress
import secrets
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cpm.errors import ManagerError
from spacehub.server.files import UnsafeFile, read_private, write_atomic
from spacehub.tls import MAX_PEM, certificate_fingerprint, check_ca_fingerprint, client_ssl_context, read_pem

__all__ = [
    "TlsFiles",
    "ca_fingerprint",
    "check_ca_fingerprint",
    "client_ssl_context",
    "ensure_ca_and_server_cert",
    "server_ssl_context",
]

CA_VALIDITY: Final = timedelta(days=3650)
SERVER_VALIDITY: Final = timedelta(days=365)
#: A server certificate expiring sooner than this is remade at start.
RENEW_BEFORE: Final = timedelta(days=30)
#: Certificates start this far in the past, for hubs whose clocks run a little behind.
BACKDATE: Final = timedelta(hours=1)
#: Names and addresses every server certificate carries.
DEFAULT_HOSTNAMES: Final = ("localhost",)
DEFAULT_IPS: Final = ("127.0.0.1",)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, data_dir: Path) -> TlsFiles:
        return cls(
            ca_cert=data_dir / "ca.pem",
            ca_key=data_dir / "ca.key",
            server_cert=data_dir / "server.pem",
            server_key=data_dir / "server.key",
        )


def ensure_ca_and_server_cert(
    data_dir: Path,
    hostnames: list[str],
    ips: list[str],
    *,
    now: datetime | None = None,
) -> TlsFiles:
    """Make the CA and the server certificate in ``data_dir`` if needed; reuse them otherwise.

    ``hostnames`` that are IP addresses are treated as ``ips``. Raises ``ValueError`` for
    an invalid IP and :class:`ManagerError` for a CA whose files are unsafe or do not match.
    ``now`` (aware, UTC) is for tests.
    """
    now = datetime.now(UTC) if now is None else now
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    files = TlsFiles.in_dir(data_dir)
    dns_names, addresses = _wanted_names(hostnames, ips)

    if files.ca_cert.exists() and files.ca_key.exists():
        ca_cert = _load_cert(files.ca_cert)
        ca_key = _load_ec_key(files.ca_key)
        if ca_cert.public_key().public_bytes(*_SPKI) != ca_key.public_key().public_bytes(*_SPKI):
            raise ManagerError(f"{files.ca_key} does not belong to {files.ca_cert}; restore the pair")
    else:
        # A half-made CA (key without cert) can only come from a crash during the first start.
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _make_ca(ca_key, now)
        write_atomic(files.ca_key, _key_pem(ca_key), 0o600)
        write_atomic(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)

    if _leaf_needs_renewal(files, ca_cert, dns_names, addresses, now):
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = _make_leaf(leaf_key, ca_key, ca_cert, dns_names, addresses, now)
        # Key first: a crash in between leaves a mismatched pair, which the next start remakes.
        write_atomic(files.server_key, _key_pem(leaf_key), 0o600)
        write_atomic(files.server_cert, leaf.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def ca_fingerprint(path: Path | str) -> str:
    """SHA-256 of the CA certificate's DER, as ``AB:CD:...`` (the form the hub is given)."""
    return _fingerprint(_load_cert(Path(path)))


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """The manager's server-side context (TLS 1.2 or newer)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.server_cert, files.server_key)
    return context


# -- making certificates ----------------------------------------------------------------------

_SPKI: Final = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _make_ca(key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    # A random suffix keeps two managers' CAs apart in any trust store they both land in.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Spacehub"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Spacehub manager CA {secrets.token_hex(4)}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def _make_leaf(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    dns_names: list[str],
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    now: datetime,
) -> x509.Certificate:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    san: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    san += [x509.IPAddress(address) for address in addresses]
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Spacehub"),
                    x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_VALIDITY, _not_after(ca_cert)))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _leaf_needs_renewal(
    files: TlsFiles,
    ca_cert: x509.Certificate,
    dns_names: list[str],
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    now: datetime,
) -> bool:
    if not (files.server_cert.exists() and files.server_key.exists()):
        return True
    try:
        leaf = _load_cert(files.server_cert)
        key = _load_ec_key(files.server_key)
    except (ValueError, TypeError, UnsupportedAlgorithm, ManagerError):
        return True  # damaged or unsafe (e.g. world-readable): a new key is the safe answer
    if leaf.public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
        return True
    if not _signed_by(leaf, ca_cert):
        return True
    if _not_after(leaf) - now < RENEW_BEFORE or _not_before(leaf) > now:
        return True
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    has_names = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    has_addresses = set(san.get_values_for_type(x509.IPAddress))
    return not (set(dns_names) <= has_names and set(addresses) <= has_addresses)


def _signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    ca_public = ca_cert.public_key()
    if cert.issuer != ca_cert.subject or not isinstance(ca_public, ec.EllipticCurvePublicKey):
        return False
    algorithm = cert.signature_hash_algorithm
    if algorithm is None:
        return False
    try:
        ca_public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except InvalidSignature:
        return False
    return True


def _wanted_names(
    hostnames: list[str], ips: list[str]
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """The SAN entries in a stable order, defaults first, without duplicates."""
    dns_names: list[str] = []
    addresses = [ipaddress.ip_address(raw) for raw in DEFAULT_IPS]
    for raw in [*DEFAULT_HOSTNAMES, *hostnames]:
        name = raw.strip().lower().rstrip(".")
        if not name:
            continue
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            if name not in dns_names:
                dns_names.append(name)
        else:
            if address not in addresses:
                addresses.append(address)
    for raw in ips:
        address = ipaddress.ip_address(raw.strip())  # ValueError names the bad one
        if address not in addresses:
            addresses.append(address)
    return dns_names, addresses


# -- files ------------------------------------------------------------------------------------


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(read_pem(path))


def _load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = read_private(path, MAX_PEM, "the key")
    except UnsafeFile as exc:
        raise ManagerError(str(exc)) from None
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ManagerError(f"{path} holds a {type(key).__name__}, not an EC key")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _fingerprint(cert: x509.Certificate) -> str:
    return certificate_fingerprint(cert.public_bytes(serialization.Encoding.DER))


# cryptography 42 added the *_utc properties and deprecated the naive ones; 38 has only those.
def _not_after(cert: x509.Certificate) -> datetime:
    aware: datetime | None = getattr(cert, "not_valid_after_utc", None)
    return aware if aware is not None else cert.not_valid_after.replace(tzinfo=UTC)


def _not_before(cert: x509.Certificate) -> datetime:
    aware: datetime | None = getattr(cert, "not_valid_before_utc", None)
    return aware if aware is not None else cert.not_valid_before.replace(tzinfo=UTC)
