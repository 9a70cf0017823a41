"""OPC UA application certificates: create them, read them, describe them.

An OPC UA application instance certificate is an X.509 v3 certificate whose
subjectAltName carries the application URI (and the host names), with the key
usages OPC UA asks for (digital signature, non-repudiation, key and data
encipherment) and the extended key usage of its role (clientAuth or
serverAuth).  ``make_certificate`` writes one as DER next to its private key
(PEM, PKCS#8, unencrypted, always mode 0600: a key is written to a new file that
replaces any old one, so an old file's wider mode is never kept).

``make_lab_pki(folder)`` creates everything a secure lab needs in one go: a
client and a server certificate, each trusting the other, plus a user
certificate; the ``parallelcity certs`` command and the embedded default use it.
``lab_pki_files(folder)`` lists the files it writes (the command refuses to
replace existing ones without ``--force``).

File I/O on top of ``cryptography`` (an I/O shell, not pure); nothing here opens a socket.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Role = Literal["client", "server", "user"]

KEY_BITS = 2048  # Basic256Sha256 and Aes256_Sha256_RsaPss both need 2048..4096
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key on disk."""

    certificate: Path  # DER
    private_key: Path  # PEM
    application_uri: str


def _sans(application_uri: str, hostnames: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificate(
    folder: Path,
    name: str,
    application_uri: str,
    *,
    role: Role,
    hostnames: list[str] | None = None,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    organization: str = "parallelcity",
) -> Identity:
    """Write ``folder/name.der`` and ``folder/name.key.pem``: a self-signed OPC UA certificate.

    ``not_before`` (default: an hour ago) and ``days`` set the validity window;
    tests use a window in the past to make an expired certificate.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if not application_uri:
        raise ValueError("an application URI is required (it goes into subjectAltName)")
    folder.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    start = not_before or (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        ]
    )
    hosts = hostnames if hostnames is not None else ["localhost", "127.0.0.1", socket.gethostname()]
    eku = {
        "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
        "server": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        "user": [ExtendedKeyUsageOID.CLIENT_AUTH],
    }[role]
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_sans(application_uri, hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = folder / f"{name}.der"
    key_path = folder / f"{name}.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_key(key_path, pem)
    return Identity(cert_path, key_path, application_uri)


def write_private_key(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, replacing any file there.

    The key goes into a new file, owner-only from its creation, that is then renamed
    over ``path``: opening an existing file would keep its mode (say 0644), and
    writing through it would follow a symlink.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # the umask can only narrow it; be explicit anyway
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def trust(certificate: Path, trust_dir: Path) -> Path:
    """Copy ``certificate`` into the trust list folder ``trust_dir``; returns the copy."""
    trust_dir.mkdir(parents=True, exist_ok=True)
    target = trust_dir / certificate.name
    target.write_bytes(certificate.read_bytes())
    return target


def load_certificate(path: Path) -> x509.Certificate:
    """A DER or PEM certificate from a file."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def application_uri_of(cert: x509.Certificate) -> str | None:
    """The first URI in the certificate's subjectAltName (the OPC UA application URI)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def describe(cert: x509.Certificate) -> str:
    """``CN=..., URI ..., thumbprint ...`` (SHA-1, as OPC UA tools name certificates)."""
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cn[0].value) if cn else cert.subject.rfc4514_string()
    thumb = cert.fingerprint(hashes.SHA1()).hex()
    return f"CN={name}, URI {application_uri_of(cert)}, thumbprint {thumb}"


@dataclass(frozen=True)
class LabPki:
    """A client and a server identity that trust each other, and a user certificate.

    Layout under ``root``::

        client/own/client.der, client.key.pem    client/trusted/server.der
        server/own/server.der, server.key.pem    server/trusted/client.der
        user/own/user.der, user.key.pem          server/trusted-users/user.der
    """

    root: Path
    client: Identity
    server: Identity
    user: Identity

    @property
    def client_trusted(self) -> Path:
        return self.root / "client" / "trusted"

    @property
    def server_trusted(self) -> Path:
        return self.root / "server" / "trusted"

    @property
    def server_trusted_users(self) -> Path:
        return self.root / "server" / "trusted-users"


def lab_pki_files(root: Path) -> list[Path]:
    """Every file ``make_lab_pki(root)`` writes, private keys first."""
    own = [(root / role / "own", role) for role in ("client", "server", "user")]
    keys = [folder / f"{name}.key.pem" for folder, name in own]
    certs = [folder / f"{name}.der" for folder, name in own]
    copies = [
        root / "client" / "trusted" / "server.der",
        root / "server" / "trusted" / "client.der",
        root / "server" / "trusted-users" / "user.der",
    ]
    return keys + certs + copies


CLIENT_URI = "urn:parallelcity:client"
SERVER_URI = "urn:parallelcity:field"
USER_URI = "urn:parallelcity:user"


def make_lab_pki(
    root: Path,
    *,
    client_uri: str = CLIENT_URI,
    server_uri: str = SERVER_URI,
    user_uri: str = USER_URI,
    hostnames: list[str] | None = None,
    days: int = DEFAULT_DAYS,
) -> LabPki:
    """Create a client, a server and a user certificate, each trust list holding its peer."""
    client = make_certificate(
        root / "client" / "own", "client", client_uri, role="client", hostnames=hostnames, days=days
    )
    server = make_certificate(
        root / "server" / "own", "server", server_uri, role="server", hostnames=hostnames, days=days
    )
    user = make_certificate(
        root / "user" / "own", "user", user_uri, role="user", hostnames=[], days=days
    )
    pki = LabPki(root, client, server, user)
    trust(server.certificate, pki.client_trusted)
    trust(client.certificate, pki.server_trusted)
    trust(user.certificate, pki.server_trusted_users)
    return pki
