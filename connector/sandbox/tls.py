"""A self-signed certificate for `localhost`, for the gRPC emulator (the google-ads client always
opens a TLS channel). gRPC reads its default root certificates once per process, from
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``: so one certificate serves every emulator of the process, and
the variable is set before the first channel."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_lock = threading.Lock()
_pair: tuple[bytes, bytes] | None = None
ROOTS_ENV = "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"


def localhost_certificate() -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM), made once per process; its file is gRPC's trusted root."""
    global _pair
    with _lock:
        if _pair is not None:
            return _pair
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())  # fmt: skip
        path = Path(tempfile.gettempdir()) / f"connector-sandbox-roots-{os.getpid()}.pem"
        path.write_bytes(cert_pem)
        os.environ[ROOTS_ENV] = str(path)
        _pair = (cert_pem, key_pem)
        return _pair
