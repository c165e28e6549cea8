"""cpm.tls: the manager's CA, its server certificate, and the SSL contexts.

Rules: real TLS handshakes over 127.0.0.1 on port 0, one plain-socket server thread per
handshake; every socket has a timeout and every thread is joined with one, so a broken
handshake fails the test instead of hanging it.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cpm.tls import (
    TlsFiles,
    ca_fingerprint,
    check_ca_fingerprint,
    client_ssl_context,
    ensure_ca_and_server_cert,
    server_ssl_context,
)

TIMEOUT = 5.0
FINGERPRINT = re.compile(r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}")


def handshake(files: TlsFiles, client: ssl.SSLContext, server_hostname: str) -> bytes:
    """Connect to a one-shot TLS server on 127.0.0.1 and read what it says."""
    server_context = server_ssl_context(files)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(TIMEOUT)
                with server_context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
            except (OSError, ssl.SSLError):
                pass  # the client refused us; the client side reports that

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
                client.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                return tls.recv(5)
        finally:
            thread.join(TIMEOUT)
            assert not thread.is_alive()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_ca_and_server_cert(tmp_path_factory.mktemp("tls"), ["cpm.example"], ["10.0.0.7"])


def leaf(files: TlsFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificate(files.server_cert.read_bytes())


def san(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    value = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(ip) for ip in value.get_values_for_type(x509.IPAddress)]
    return value.get_values_for_type(x509.DNSName), ips


# -- handshakes -------------------------------------------------------------------------------


def test_handshake_by_name(files: TlsFiles) -> None:
    assert handshake(files, client_ssl_context(ca_file=files.ca_cert), "localhost") == b"hello"
    assert handshake(files, client_ssl_context(ca_file=files.ca_cert), "cpm.example") == b"hello"


def test_handshake_by_ip(files: TlsFiles) -> None:
    assert handshake(files, client_ssl_context(ca_file=files.ca_cert), "127.0.0.1") == b"hello"


def test_client_context_is_strict(files: TlsFiles) -> None:
    context = client_ssl_context(ca_file=files.ca_cert)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.verify_flags & ssl.VERIFY_X509_STRICT
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_another_ca_fails_fast(files: TlsFiles, tmp_path: Path) -> None:
    stranger = ensure_ca_and_server_cert(tmp_path, [], [])
    started = time.monotonic()
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(files, client_ssl_context(ca_file=stranger.ca_cert), "localhost")
    assert time.monotonic() - started < 2


def test_wrong_hostname_fails(files: TlsFiles) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(files, client_ssl_context(ca_file=files.ca_cert), "elsewhere.example")


def test_ca_data_with_fingerprint(files: TlsFiles) -> None:
    pem = files.ca_cert.read_bytes()
    context = client_ssl_context(ca_data=pem, fingerprint=ca_fingerprint(files.ca_cert))
    assert handshake(files, context, "localhost") == b"hello"


def test_client_context_argument_rules(files: TlsFiles, tmp_path: Path) -> None:
    fingerprint = ca_fingerprint(files.ca_cert)
    with pytest.raises(ValueError, match="fetch"):
        client_ssl_context(fingerprint=fingerprint)
    with pytest.raises(ValueError):
        client_ssl_context()
    with pytest.raises(ValueError):
        client_ssl_context(ca_file=files.ca_cert, ca_data=files.ca_cert.read_bytes())
    other = ensure_ca_and_server_cert(tmp_path, [], [])
    with pytest.raises(ValueError, match="fingerprint"):
        client_ssl_context(ca_file=other.ca_cert, fingerprint=fingerprint)
    client_ssl_context(ca_file=files.ca_cert, fingerprint=fingerprint.lower())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_openssl_verifies_strictly(files: TlsFiles) -> None:
    ca, server = str(files.ca_cert), str(files.server_cert)
    result = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", ca, server],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- what the certificates hold ---------------------------------------------------------------


def test_files_and_modes(files: TlsFiles) -> None:
    for path in (files.ca_key, files.server_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for path in (files.ca_cert, files.server_cert):
        assert path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_certificate_contents(files: TlsFiles) -> None:
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = leaf(files)
    ca_basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_basic.critical and ca_basic.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    leaf_basic = server.extensions.get_extension_for_class(x509.BasicConstraints)
    assert leaf_basic.critical and not leaf_basic.value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server.issuer == ca.subject
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    names, ips = san(server)
    assert names == ["localhost", "cpm.example"]
    assert ips == ["127.0.0.1", "10.0.0.7"]


def test_hostnames_that_are_ips(tmp_path: Path) -> None:
    files = ensure_ca_and_server_cert(tmp_path, ["Host.Example.", "::1", "localhost"], ["127.0.0.1"])
    names, ips = san(leaf(files))
    assert names == ["localhost", "host.example"]
    assert ips == ["127.0.0.1", "::1"]
    with pytest.raises(ValueError):
        ensure_ca_and_server_cert(tmp_path, [], ["not-an-ip"])
    assert ipaddress.ip_address(ips[1]).version == 6


# -- reuse and renewal ------------------------------------------------------------------------


def test_reused_on_a_later_start(tmp_path: Path) -> None:
    first = ensure_ca_and_server_cert(tmp_path, ["cpm.example"], [])
    fingerprint = ca_fingerprint(first.ca_cert)
    server_pem = first.server_cert.read_bytes()
    again = ensure_ca_and_server_cert(tmp_path, ["cpm.example"], [])
    assert again == first
    assert ca_fingerprint(again.ca_cert) == fingerprint
    assert again.server_cert.read_bytes() == server_pem
    # Asking for less than the certificate has is no reason to remake it either.
    ensure_ca_and_server_cert(tmp_path, [], [])
    assert first.server_cert.read_bytes() == server_pem


def test_new_hostname_remakes_only_the_leaf(tmp_path: Path) -> None:
    files = ensure_ca_and_server_cert(tmp_path, ["cpm.example"], [])
    fingerprint = ca_fingerprint(files.ca_cert)
    old_leaf = files.server_cert.read_bytes()
    ensure_ca_and_server_cert(tmp_path, ["cpm.example", "new.example"], ["192.0.2.1"])
    assert ca_fingerprint(files.ca_cert) == fingerprint
    assert files.server_cert.read_bytes() != old_leaf
    names, ips = san(leaf(files))
    assert "new.example" in names
    assert "192.0.2.1" in ips
    assert handshake(files, client_ssl_context(ca_file=files.ca_cert), "new.example") == b"hello"


def test_leaf_renewed_before_expiry(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    files = ensure_ca_and_server_cert(tmp_path, [], [], now=now)
    fingerprint = ca_fingerprint(files.ca_cert)
    old_leaf = files.server_cert.read_bytes()
    ensure_ca_and_server_cert(tmp_path, [], [], now=now + timedelta(days=300))
    assert files.server_cert.read_bytes() == old_leaf
    later = now + timedelta(days=340)
    ensure_ca_and_server_cert(tmp_path, [], [], now=later)
    assert files.server_cert.read_bytes() != old_leaf
    assert ca_fingerprint(files.ca_cert) == fingerprint


def test_damaged_or_exposed_leaf_is_remade(tmp_path: Path) -> None:
    files = ensure_ca_and_server_cert(tmp_path, [], [])
    files.server_cert.write_bytes(b"garbage")
    ensure_ca_and_server_cert(tmp_path, [], [])
    assert handshake(files, client_ssl_context(ca_file=files.ca_cert), "localhost") == b"hello"
    old_key = files.server_key.read_bytes()
    files.server_key.chmod(0o644)
    ensure_ca_and_server_cert(tmp_path, [], [])
    assert files.server_key.read_bytes() != old_key
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600


def test_leaf_of_another_ca_is_remade(tmp_path: Path) -> None:
    files = ensure_ca_and_server_cert(tmp_path / "a", [], [])
    other = ensure_ca_and_server_cert(tmp_path / "b", [], [])
    shutil.copy(other.server_cert, files.server_cert)
    shutil.copy(other.server_key, files.server_key)
    ensure_ca_and_server_cert(tmp_path / "a", [], [])
    assert handshake(files, client_ssl_context(ca_file=files.ca_cert), "localhost") == b"hello"


# -- fingerprints -----------------------------------------------------------------------------


def test_fingerprint(files: TlsFiles, tmp_path: Path) -> None:
    fingerprint = ca_fingerprint(files.ca_cert)
    assert FINGERPRINT.fullmatch(fingerprint)
    pem = files.ca_cert.read_bytes()
    assert check_ca_fingerprint(pem, fingerprint)
    assert check_ca_fingerprint(pem, fingerprint.lower())
    assert check_ca_fingerprint(pem, fingerprint.replace(":", ""))
    other = ensure_ca_and_server_cert(tmp_path, [], [])
    assert not check_ca_fingerprint(other.ca_cert.read_bytes(), fingerprint)
    assert not check_ca_fingerprint(pem, ca_fingerprint(other.ca_cert))
    assert not check_ca_fingerprint(pem, "")
    assert not check_ca_fingerprint(b"garbage", fingerprint)
    # A second certificate smuggled in behind the genuine one is refused.
    assert not check_ca_fingerprint(pem + other.ca_cert.read_bytes(), fingerprint)
