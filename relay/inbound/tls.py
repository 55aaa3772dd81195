"""TLS for the listener: the configured certificate, or a self-signed one made at start.

Rule 1: TLS 1.2 or newer (RFC 8314 4.1 and 8996), following Mozilla's server
side TLS profiles: "intermediate" (the default: TLS 1.2 with ECDHE and AEAD
suites only, and TLS 1.3; groups X25519, P-256, P-384) or "modern" (TLS 1.3
only). https://wiki.mozilla.org/Security/Server_Side_TLS (version 5.7).
Rule 2: a self-signed certificate is for loopback trials: it lives in memory
and a temporary file only as long as loading it takes, and is new each start.

This module builds contexts; it does not speak SMTP or log per connection.
"""

from __future__ import annotations

import ctypes
import datetime
import ipaddress
import logging
import ssl
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config import SmtpConfig, StartTLS, TlsProfile
from relay.core.errors import ConfigError

log = logging.getLogger("relay.tlsconf")

SELF_SIGNED_DAYS = 365
# Mozilla "intermediate" 5.7 for TLS 1.2, without its DHE suites (ECDHE only: no
# finite-field parameters to manage). TLS 1.3's suites are all AEAD already.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
GROUPS = b"X25519:P-256:P-384"  # Mozilla intermediate and modern: no X448, no P-521
SSL_CTRL_SET_GROUPS_LIST = 92  # OpenSSL's ssl.h: SSL_CTX_set1_groups_list is this ctrl


def server_context(config: SmtpConfig) -> ssl.SSLContext | None:
    """The listener's TLS context for STARTTLS, or None when STARTTLS is off."""
    if config.starttls is StartTLS.OFF:
        return None
    context = profile_context(config.tls_profile)
    if config.starttls is StartTLS.CERTIFICATE:
        try:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "smtp.tls_cert_file", f"cannot load certificate and key: {exc}"
            ) from exc
        return context
    cert, key = self_signed(config.hostname)
    with tempfile.TemporaryDirectory(prefix="solo-relay-tls-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        context.load_cert_chain(cert_path, key_path)
    return context


def profile_context(profile: TlsProfile) -> ssl.SSLContext:
    """A server context with the protocol versions, suites and groups of ``profile``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.options |= ssl.OP_NO_RENEGOTIATION  # client-started renegotiation costs the server
    if profile is TlsProfile.MODERN:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(INTERMEDIATE_CIPHERS)
    if not _set_groups(context, GROUPS):
        # Without OpenSSL's groups list, one curve every client has: no X25519 then.
        log.warning("cannot set the TLS groups list; offering P-256 only")
        context.set_ecdh_curve("prime256v1")
    return context


def _set_groups(context: ssl.SSLContext, groups: bytes) -> bool:
    """``SSL_CTX_set1_groups_list`` on ``context``; False where it cannot be reached.

    Python's ``ssl`` (3.11 to 3.13) can set one ECDH curve only, and that one
    curve is then the only TLS 1.3 group too. The OpenSSL call is made on the
    ``SSL_CTX`` that CPython keeps just after the object header of an
    ``SSLContext``, through the OpenSSL that ``_ssl`` itself is linked with; the
    pointer is checked first by reading the context's options both ways.
    """
    if sys.implementation.name != "cpython":
        return False
    try:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # the loaded _ssl
        get_options = lib.SSL_CTX_get_options
        ctrl = lib.SSL_CTX_ctrl
    except (OSError, AttributeError):
        return False
    get_options.restype = ctypes.c_uint64
    get_options.argtypes = [ctypes.c_void_p]
    ctrl.restype = ctypes.c_long
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or get_options(pointer) != int(context.options):
        return False
    return bool(ctrl(pointer, SSL_CTRL_SET_GROUPS_LIST, 0, groups) == 1)


def self_signed(hostname: str) -> tuple[bytes, bytes]:
    """A PEM certificate and key for ``hostname``, localhost and the loopback addresses."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [
        x509.DNSName(hostname),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
