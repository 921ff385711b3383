"""
TLS for the tunnel: the server's certificate (given, or self-signed and
kept in the state directory), the agent's verification (a CA and the server
name via service_identity, or a pinned SHA-256 fingerprint) and the channel
binding the handshake MACs (protocol.md §4).
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import TLSVersion
from zope.interface import implementer

from nova.errors import NovaError
from nova.wire.handshake import BINDING_SIZE, EXPORTER_LABEL


class TLSConfigError(NovaError):
    """A certificate, key or CA file cannot be used; the message names the setting and says why."""


# The settings that name each file, for the error lines.
SERVER_CERT = "--tls-cert / NOVAS_TLS_CERT"
SERVER_KEY = "--tls-key / NOVAS_TLS_KEY"
SERVER_CLIENT_CA = "--tls-client-ca / NOVAS_TLS_CLIENT_CA"
STATE_DIR = "--state-dir / NOVAS_STATE_DIR"
AGENT_CA = "--ca / NOVAC_TLS_CA"
AGENT_CERT = "--tls-cert / NOVAC_TLS_CERT"
AGENT_KEY = "--tls-key / NOVAC_TLS_KEY"


_FINGERPRINT = re.compile(r"sha256:([0-9a-fA-F]{2}(?::?[0-9a-fA-F]{2}){31})")


def parse_fingerprint(text: str) -> bytes:
    """C{sha256:} and 64 hex digits (colons allowed) to the 32-byte digest."""
    m = _FINGERPRINT.fullmatch(text.strip())
    if m is None:
        raise ValueError("a fingerprint is 'sha256:' followed by 64 hex digits")
    return bytes.fromhex(m.group(1).replace(":", ""))


def format_fingerprint(digest: bytes) -> str:
    return "sha256:" + digest.hex()


def certificate_fingerprint(cert: x509.Certificate) -> str:
    return format_fingerprint(cert.fingerprint(hashes.SHA256()))


def _load_certs(path: Path, what: str, setting: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{setting}: cannot read {what} {path}: {e.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TLSConfigError(f"{setting}: {what} {path} holds no PEM certificate")
    return certs


def _read_key(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{setting}: cannot read key {path}: {e.strerror}") from None


@dataclass(frozen=True)
class ServerCertificate:
    cert_path: Path
    key_path: Path
    fingerprint: str
    generated: bool


def ensure_server_certificate(state_dir: Path) -> ServerCertificate:
    """
    The self-signed certificate in C{state_dir/tls}, made on first use and
    kept across restarts so that agents pinning it keep working.
    """
    tls_dir = state_dir / "tls"
    cert_path, key_path = tls_dir / "server.crt", tls_dir / "server.key"
    generated = False
    if not (cert_path.exists() and key_path.exists()):
        try:
            tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_self_signed(cert_path, key_path)
        except OSError as e:
            raise TLSConfigError(
                f"{STATE_DIR}: cannot create the self-signed certificate in {tls_dir}: {e.strerror}"
                " (set --state-dir / NOVAS_STATE_DIR to a writable directory, or give --tls-cert and --tls-key)"
            ) from None
        generated = True
    cert = _load_certs(cert_path, "certificate", STATE_DIR)[0]
    return ServerCertificate(cert_path, key_path, certificate_fingerprint(cert), generated)


def _write_self_signed(cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname()
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    if host and host != "localhost":
        names.append(x509.DNSName(host))
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"NOVAS {host}"[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp_key = key_path.with_suffix(".key.tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    os.replace(tmp_key, key_path)
    tmp_cert = cert_path.with_suffix(".crt.tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert_path)


def server_options(
    cert_path: Path,
    key_path: Path,
    client_ca: Path | None = None,
    cert_setting: str = SERVER_CERT,
    key_setting: str = SERVER_KEY,
) -> ssl.CertificateOptions:
    """
    TLS 1.3 server options from PEM files (the cert file may hold a chain).
    With C{client_ca}, clients must present a certificate it issued.  The
    C{*_setting} arguments name where the files came from, for the errors.
    """
    certs = _load_certs(cert_path, "certificate", cert_setting)
    key_pem = _read_key(key_path, key_setting)
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error:
        raise TLSConfigError(f"{key_setting}: key {key_path} is not a PEM private key (or it is encrypted)") from None
    leaf, *chain = (crypto.X509.from_cryptography(c) for c in certs)
    client: dict[str, Any] = {}
    if client_ca is not None:
        cas = [crypto.X509.from_cryptography(c) for c in _load_certs(client_ca, "client CA file", SERVER_CLIENT_CA)]
        client = {"verify": True, "caCerts": cas, "requireCertificate": True}
    options = ssl.CertificateOptions(
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain,
        raiseMinimumTo=TLSVersion.TLSv1_3,
        **client,
    )
    try:
        options.getContext()
    except SSL.Error:
        raise TLSConfigError(f"{key_setting}: key {key_path} does not match certificate {cert_path}") from None
    return options


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class PinnedServerCreator:
    """
    Client TLS that accepts exactly the server certificate whose SHA-256
    fingerprint is pinned; the chain and the name are not consulted.
    """

    def __init__(
        self, fingerprint: bytes, server_name: str | None, client: ssl.PrivateCertificate | None = None
    ) -> None:
        self._fingerprint = fingerprint
        self._server_name = server_name
        self._context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_3_VERSION)
        self._context.set_verify(SSL.VERIFY_PEER, self._verify)
        if client is not None:
            self._context.use_certificate(client.original)
            self._context.use_privatekey(client.privateKey.original)

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if depth != 0:
            return True
        digest = cert.to_cryptography().fingerprint(hashes.SHA256())
        return hmac.compare_digest(digest, self._fingerprint)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._context, None)
        conn.set_app_data(tlsProtocol)
        if self._server_name and not _is_ip(self._server_name):
            conn.set_tlsext_host_name(self._server_name.encode("idna"))
        conn.set_connect_state()
        return conn


def load_client_certificate(cert_path: Path, key_path: Path) -> ssl.PrivateCertificate:
    """An agent's certificate and key, for servers that require one."""
    certs = _load_certs(cert_path, "client certificate", AGENT_CERT)
    key_pem = _read_key(key_path, AGENT_KEY)
    cert_pem = certs[0].public_bytes(serialization.Encoding.PEM)
    try:
        loaded: ssl.PrivateCertificate = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
        return loaded
    except Exception:
        raise TLSConfigError(f"{AGENT_KEY}: key {key_path} is not a PEM private key matching {cert_path}") from None


def client_creator(
    server_name: str,
    ca_path: Path | None = None,
    fingerprint: bytes | None = None,
    client_cert: tuple[Path, Path] | None = None,
) -> IOpenSSLClientConnectionCreator:
    """The agent's TLS: verify against a CA and C{server_name}, or a pin."""
    client = load_client_certificate(*client_cert) if client_cert is not None else None
    if fingerprint is not None:
        return PinnedServerCreator(fingerprint, server_name, client)
    if ca_path is None:
        raise TLSConfigError("TLS needs a CA (NOVAC_TLS_CA) or a pinned fingerprint (NOVAC_TLS_FINGERPRINT)")
    roots = [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in _load_certs(ca_path, "CA file", AGENT_CA)]
    trust = ssl.trustRootFromCertificates(roots)
    creator: IOpenSSLClientConnectionCreator = ssl.optionsForClientTLS(
        server_name,
        trustRoot=trust,
        clientCertificate=client,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
    )
    return creator


def channel_binding(transport: Any) -> bytes | None:
    """
    The TLS keying-material exporter value for this connection, or None if
    the transport is not TLS.
    """
    handle = transport.getHandle() if hasattr(transport, "getHandle") else None
    if not isinstance(handle, SSL.Connection):
        return None
    binding: bytes = handle.export_keying_material(EXPORTER_LABEL, BINDING_SIZE)
    return binding


def tls_version(transport: Any) -> str | None:
    """The negotiated TLS version ("TLSv1.3"), or None if not TLS."""
    handle = transport.getHandle() if hasattr(transport, "getHandle") else None
    if not isinstance(handle, SSL.Connection):
        return None
    version: str = handle.get_protocol_version_name()
    return version


def client_identity(transport: Any) -> tuple[str | None, set[str]]:
    """
    The verified client certificate's subject and the names it carries
    (common name and DNS subject alternative names), or (None, empty).
    """
    handle = transport.getHandle() if hasattr(transport, "getHandle") else None
    if not isinstance(handle, SSL.Connection):
        return None, set()
    peer = handle.get_peer_certificate(as_cryptography=True)
    if peer is None:
        return None, set()
    names = {a.value for a in peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)}
    try:
        san = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names |= set(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return peer.subject.rfc4514_string(), names
