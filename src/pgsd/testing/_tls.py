"""Throwaway certificates for TLS tests: a CA, a server, clients, and a CA nobody trusts.

Made with the ``cryptography`` package (a development dependency), imported
only when certificates are made, so that ``import pgsd`` never needs it.
Keys are ECDSA P-256: as good as RSA here, and made in no time.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["ClientCertificate", "TLSFiles"]

#: Long enough for any test run, short enough that a leaked key soon means nothing.
_VALIDITY = datetime.timedelta(days=30)
# Certificates are valid from a little before now, so that a clock running
# slightly behind (the server's, in a container) does not reject them.
_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientCertificate:
    """A client certificate for one role (``CN`` = the role) and its private key.

    Pass them as ``sslcert`` and ``sslkey``; the key file is mode 0600, as
    libpq requires.
    """

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSFiles:
    """PEM files for a TLS server and its clients, all in one directory.

    Make them with :meth:`generate`. ``ca_cert`` signed the server's and the
    clients' certificates: it is the ``sslrootcert`` of clients that verify
    the server, and the server's ``ssl_ca_file``. ``other_ca_cert`` is an
    unrelated CA that signed nothing here, to test a client that trusts the
    wrong CA. Private keys are mode 0600.
    """

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path
    #: The host names and IP addresses the server's certificate is valid for.
    server_names: tuple[str, ...]
    #: One client certificate per role name.
    clients: Mapping[str, ClientCertificate] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def generate(
        cls,
        directory: str | os.PathLike[str],
        *,
        server_names: Iterable[str] = ("localhost", "127.0.0.1"),
        client_users: Iterable[str] = (),
    ) -> TLSFiles:
        """Make a CA, a server certificate, client certificates and a second CA in *directory*.

        Args:
            directory: where to write the files (created if missing).
            server_names: the names the server certificate is valid for:
                host names become DNS names, IP addresses IP addresses (as
                libpq checks them with ``sslmode=verify-full``); the first
                is also the certificate's common name.
            client_users: the roles to make client certificates for.

        Raises:
            ValueError: *server_names* is empty.
            ImportError: the ``cryptography`` package is not installed.
        """
        names = tuple(server_names)
        if not names:
            raise ValueError("a server certificate needs at least one name")
        base = Path(directory)
        base.mkdir(parents=True, exist_ok=True)
        ca_key, ca = _authority("pgsd test CA")
        _write_pem(base / "ca.crt", _cert_pem(ca))
        _, other_ca = _authority("pgsd unrelated test CA")
        _write_pem(base / "other-ca.crt", _cert_pem(other_ca))
        server_key, server = _leaf(ca_key, ca, names[0], server_names=names)
        _write_pem(base / "server.crt", _cert_pem(server))
        _write_pem(base / "server.key", _key_pem(server_key), private=True)
        clients = {}
        for user in client_users:
            key, cert = _leaf(ca_key, ca, user)
            clients[user] = ClientCertificate(
                cert=_write_pem(base / f"client-{user}.crt", _cert_pem(cert)),
                key=_write_pem(base / f"client-{user}.key", _key_pem(key), private=True),
            )
        return cls(
            directory=base,
            ca_cert=base / "ca.crt",
            server_cert=base / "server.crt",
            server_key=base / "server.key",
            other_ca_cert=base / "other-ca.crt",
            server_names=names,
            clients=MappingProxyType(clients),
        )


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    from cryptography import x509

    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _authority(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign end-entity certificates only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_key()
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        _builder(_name(name), _name(name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    common_name: str,
    *,
    server_names: tuple[str, ...] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate signed by *ca*: for a server when it has names, else for a client."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _new_key()
    builder = (
        _builder(_name(common_name), ca.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in server_names]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_pem(path: Path, data: bytes, *, private: bool = False) -> Path:
    """Write *data*; a private key is created 0600 and never exists with looser modes."""
    mode = 0o600 if private else 0o644
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, mode)  # exactly this mode, whatever the umask
    return path
