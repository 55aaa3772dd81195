"""TLS for the listener: the configured certificate, or a self-signed one made at start.

Rule 1: TLS 1.2 or newer (RFC 8314 4.1 and 8996).
Rule 2: a self-signed certificate is for loopback trials: it lives in memory
and a temporary file only as long as loading it takes, and is new each start.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config import SmtpConfig, StartTLS
from relay.errors import ConfigError

SELF_SIGNED_DAYS = 365


def server_context(config: SmtpConfig) -> ssl.SSLContext | None:
    """The listener's TLS context for STARTTLS, or None when STARTTLS is off."""
    if config.starttls is StartTLS.OFF:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
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
