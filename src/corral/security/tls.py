"""TLS for corral's TCP servers (job-stream lines, JSON-RPC over HTTP): stdlib ``ssl``.

``corral keys init`` makes a self-signed pair with ``cryptography``; a
deployment may give its own certificate and key instead (``--tls-cert``,
``--tls-key``). Clients trust the broker's certificate file itself (it is
its own authority), or the system's store for a certificate from a CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl


def make_self_signed(folder: str, host: str | None = None, *, days: int = 3650) -> tuple[str, str]:
    """Write ``cert.pem`` and ``key.pem`` (0600) to ``folder``; return their paths.

    The certificate names ``localhost``, 127.0.0.1, ::1, this machine's host
    name and ``host`` (a name or an address), so clients can check it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for extra in {socket.gethostname(), host} - {None, "", "localhost"}:
        assert extra is not None
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(extra)))
        except ValueError:
            names.append(x509.DNSName(extra))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host or socket.gethostname())])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(folder, mode=0o700, exist_ok=True)
    cert_file, key_file = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context for the certificate and key files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """A verifying client context: trust ``cafile`` (the broker's cert) or the system's CAs."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
