"""
TLS from the friendly settings: the server's certificate, key and client CA
(C{--tls-cert}, C{--tls-key}, C{--tls-client-ca}), the client's C{--tls},
C{--ca}, C{--server-name} and client certificate.  PEM files are read and
checked when the options are parsed, and read again into the context
factories when the service is made (the client's data channels use the
same TLS options as its control channel: L{gotunnel.client.endpoints.ServerEndpoints}).

Endpoint strings (C{ssl:}, C{tls:}) keep working without any of this.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet._sslverify import ClientTLSOptions
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint, ISSLTransport
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from gotunnel.wire import messages
from gotunnel.config.settings import ClientSettings, ServerSettings
from gotunnel.wire.framing import describePeer
from gotunnel.relay.tcpinternals import endpointHost
from gotunnel.tls.halfclose import HalfCloseableTLS

log = Logger(namespace="gotunnel.tls")

TLS_HANDSHAKE = 0x16
"""The content type of a TLS record that starts a handshake: every ClientHello's first byte."""

NOT_TLS_REASON = ("this server's port speaks TLS and the client connected in plain TCP "
                  "(connect with TLS: gotunnel-client --tls)")

SERVER_NAMES = {"tls_cert": "server.tls_cert", "tls_key": "server.tls_key",
                "tls_client_ca": "server.tls_client_ca"}
CLIENT_NAMES = {"tls_ca": "client.tls_ca", "tls_server_name": "client.tls_server_name",
                "tls_client_cert": "client.tls_client_cert",
                "tls_client_key": "client.tls_client_key"}


TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
"""
The TLS 1.3 suites both our ends offer, most preferred first: OpenSSL's
three, with AES-128-GCM ahead of AES-256-GCM (OpenSSL's default order).
On a CPU with AES instructions AES-128 costs about 15 % less per byte, and
it is what C{ssh -R} with aes128-gcm pays; 256-bit keys are kept for the
peers that offer nothing else.
"""

TLS12_CIPHERS = ssl.AcceptableCiphers.fromOpenSSLCipherString(
    "ECDH+AES128+AESGCM:"
    "ECDH+AESGCM:ECDH+CHACHA20:DH+AESGCM:DH+CHACHA20:ECDH+AES256:DH+AES256:"
    "ECDH+AES128:DH+AES:RSA+AESGCM:RSA+AES:!aNULL:!MD5:!DSS")
"""The TLS 1.2 ciphers: Twisted's default set, in its order but with ECDHE AES-128-GCM first."""


class TLSSettingsError(ValueError):
    """A TLS file or setting that cannot be used: one sentence naming it."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSSettingsError(f"{what} {path}: cannot read it: {e.strerror or e}") from None


def readCertificates(path: str, what: str) -> list[x509.Certificate]:
    """Every certificate of the PEM file C{path}, in order (a leaf, then its chain)."""
    data = _read(path, what)
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise TLSSettingsError(f"{what} {path}: no PEM certificate in it")
    return found


def readPrivateKey(path: str, what: str):
    """The unencrypted PEM private key of C{path}."""
    data = _read(path, what)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSSettingsError(f"{what} {path}: the key is encrypted; "
                               f"gotunnel needs it unencrypted") from None
    except (ValueError, crypto.Error):
        raise TLSSettingsError(f"{what} {path}: not a PEM private key") from None


def _identity(certPath: str, keyPath: str, certWhat: str, keyWhat: str) -> dict:
    """
    A certificate, the chain after it and its key, as L{ssl.CertificateOptions}
    arguments; the key must be the certificate's.
    """
    chain = readCertificates(certPath, certWhat)
    key = readPrivateKey(keyPath, keyWhat)
    if key.public_key() != chain[0].public_key():
        raise TLSSettingsError(f"{keyWhat} {keyPath} is not the key of the certificate in "
                               f"{certWhat} {certPath}")
    return {"certificate": chain[0], "privateKey": key, "extraCertChain": chain[1:]}


def commonName(certificate: x509.Certificate) -> Optional[str]:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def certificateFileName(path: str) -> str:
    """
    The common name of the certificate in C{path}, or "" if it has none or
    cannot be read (the check of the TLS settings says why).
    """
    try:
        return commonName(readCertificates(path, "")[0]) or ""
    except TLSSettingsError:
        return ""


def peerCommonName(transport: object) -> Optional[str]:
    """
    The common name of the certificate the peer of C{transport} presented,
    or None: a plain connection, or a TLS one without a client certificate.
    """
    if not ISSLTransport.providedBy(transport):
        return None
    certificate = transport.getPeerCertificate()  # type: ignore[attr-defined]
    if certificate is None:
        return None
    return commonName(certificate.to_cryptography()) or ""


def outOfDate(transport: object, now: float) -> Optional[str]:
    """
    Why the peer's certificate chain on C{transport}, a TLS connection whose
    handshake failed verification, is not valid at C{now} (a POSIX time):
    which certificate expired, or is not valid yet, and when; None if every
    certificate is within its dates (or the chain cannot be read).
    """
    if not ISSLTransport.providedBy(transport):
        return None
    # The peer's chain outlives a failed verification, where the peer's
    # certificate (getPeerCertificate) does not.
    handle = transport.getHandle()  # type: ignore[attr-defined]
    if not isinstance(handle, SSL.Connection):
        return None
    chain = [c.to_cryptography() for c in handle.get_peer_cert_chain() or ()]
    at = datetime.fromtimestamp(now, timezone.utc)
    for position, certificate in enumerate(chain):
        which = "its certificate" if position == 0 else "a CA certificate of its chain"
        name = commonName(certificate)
        if name:
            which = f"{which} {name!r}"
        if certificate.not_valid_after_utc < at:
            when = certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
            return (f"{which} expired on {when} (its notAfter): it needs a new certificate, "
                    f"unless this machine's clock is wrong")
        if certificate.not_valid_before_utc > at:
            when = certificate.not_valid_before_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
            return (f"{which} is not valid before {when} (its notBefore): check this "
                    f"machine's clock")
    return None


class PreferAES128Options(ssl.CertificateOptions):
    """
    L{ssl.CertificateOptions} whose contexts prefer AES-128-GCM, in TLS 1.3
    (L{TLS13_SUITES}) and in TLS 1.2 (L{TLS12_CIPHERS}).  A server prefers
    its own order (Twisted sets OpenSSL's C{OP_CIPHER_SERVER_PREFERENCE}); a
    client offers its suites in this order.
    """

    def __init__(self, **options) -> None:
        options.setdefault("acceptableCiphers", TLS12_CIPHERS)
        super().__init__(**options)

    def _makeContext(self, *args, **kwargs):
        # CertificateOptions has no setting for the TLS 1.3 suites; its
        # context takes them before its first connection, or never.
        context = super()._makeContext(*args, **kwargs)
        context.set_tls13_ciphersuites(TLS13_SUITES)
        return context


# ---------------------------------------------------------------------------
# The server


def serverContextFactory(settings: ServerSettings,
                         names: dict[str, str] = SERVER_NAMES) -> ssl.CertificateOptions:
    """
    The server's TLS options: its certificate (and the chain after it in the
    same file) and key; with C{tls_client_ca}, a client certificate signed
    by that CA is required.  C{names} says how to name each setting in an
    error.
    """
    options = _identity(settings.tls_cert, settings.tls_key,
                        names["tls_cert"], names["tls_key"])
    if settings.tls_client_ca:
        authorities = readCertificates(settings.tls_client_ca, names["tls_client_ca"])
        options.update(verify=True, requireCertificate=True,
                       caCerts=[crypto.X509.from_cryptography(c) for c in authorities])
    return PreferAES128Options(**options)


def checkServerSettings(settings: ServerSettings, names: dict[str, str] = SERVER_NAMES,
                        listenName: str = "server.listen") -> None:
    """
    Raise L{TLSSettingsError} for TLS settings that cannot work together,
    or files that cannot be used.
    """
    given = [key for key in ("tls_cert", "tls_key") if getattr(settings, key)]
    if len(given) == 1:
        missing = "tls_key" if given == ["tls_cert"] else "tls_cert"
        raise TLSSettingsError(f"{names[given[0]]} needs {names[missing]} as well")
    if settings.tls_client_ca and not given:
        raise TLSSettingsError(f"{names['tls_client_ca']} (mutual TLS) needs "
                               f"{names['tls_cert']} and {names['tls_key']}")
    if given and settings.listen.split(":", 1)[0] == "ssl":
        raise TLSSettingsError(f"{names['tls_cert']} and an ssl: endpoint in {listenName} "
                               f"both set up TLS; use one of them")
    if given:
        serverContextFactory(settings, names)


class _TLSServerProtocol(HalfCloseableTLS):
    """
    TLS, half-closeable (a data channel carries each direction's end on its
    own), except that a peer whose first byte cannot start a TLS handshake
    (a plain gotunnel client) is answered in plain C{register_resp} fail,
    naming the cause, and closed.
    """

    plain: Optional[bool] = None
    """None until the first byte comes; then whether the peer speaks plain TCP."""

    def dataReceived(self, data: bytes) -> None:
        if self.plain is None and data:
            self.plain = data[0] != TLS_HANDSHAKE
            if self.plain:
                log.warn("{peer} sent something that is not TLS (a plain-TCP client talking "
                         "to a TLS port?); closing", peer=describePeer(self.transport))
                body = messages.encode(messages.RegisterResp(status="fail",
                                                             reason=NOT_TLS_REASON))
                self.transport.write(len(body).to_bytes(4, "big") + body)
                self.transport.loseConnection()
        if not self.plain:
            super().dataReceived(data)


class _TLSServerFactory(TLSMemoryBIOFactory):
    protocol = _TLSServerProtocol
    noisy = False


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Listens on another stream endpoint and speaks TLS on every connection."""

    def __init__(self, wrapped: IStreamServerEndpoint, contextFactory) -> None:
        self.wrapped = wrapped
        self.contextFactory = contextFactory

    def listen(self, factory):
        return self.wrapped.listen(_TLSServerFactory(self.contextFactory, False, factory))


def serverEndpoint(reactor, settings: ServerSettings) -> IStreamServerEndpoint:
    """The control endpoint: C{settings.listen}, with TLS if a certificate is set."""
    endpoint = serverFromString(reactor, settings.listen)
    if not settings.tls_cert:
        return endpoint
    return TLSServerEndpoint(endpoint, serverContextFactory(settings))


# ---------------------------------------------------------------------------
# The client


def clientOptions(settings: ClientSettings, host: Optional[str],
                  names: dict[str, str] = CLIENT_NAMES):
    """
    The client's TLS options: the server must present a certificate from
    C{tls_ca} (or a CA of the system) for C{tls_server_name}, or C{host}.
    """
    serverName = settings.tls_server_name or host
    if not serverName:
        raise TLSSettingsError("cannot tell the server's name from its endpoint; "
                               "give it with --server-name NAME (client.tls_server_name)")
    if settings.tls_ca:
        authorities = [ssl.Certificate(crypto.X509.from_cryptography(c))
                       for c in readCertificates(settings.tls_ca, names["tls_ca"])]
        trustRoot = ssl.trustRootFromCertificates(authorities)
    else:
        trustRoot = ssl.platformTrust()
    given = [key for key in ("tls_client_cert", "tls_client_key") if getattr(settings, key)]
    if len(given) == 1:
        missing = "tls_client_key" if given == ["tls_client_cert"] else "tls_client_cert"
        raise TLSSettingsError(f"{names[given[0]]} needs {names[missing]} as well")
    # The client certificate goes in as cryptography objects, which
    # pyOpenSSL takes without the warnings its own types now bring.
    clientIdentity = _identity(settings.tls_client_cert, settings.tls_client_key,
                               names["tls_client_cert"], names["tls_client_key"]) \
        if given else None
    # What ssl.optionsForClientTLS does (Twisted's own name and chain
    # checks), with options that prefer AES-128-GCM.
    options = PreferAES128Options(trustRoot=trustRoot, **(clientIdentity or {}))
    return ClientTLSOptions(options._makeTLSConnection, serverName)


def checkClientSettings(settings: ClientSettings, names: dict[str, str] = CLIENT_NAMES,
                        serverName: str = "client.server", tlsName: str = "client.tls") -> None:
    """
    Raise L{TLSSettingsError} for TLS settings that cannot work together,
    or files that cannot be used.
    """
    if not settings.tls:
        for key in ("tls_ca", "tls_server_name", "tls_client_cert", "tls_client_key"):
            if getattr(settings, key):
                raise TLSSettingsError(f"{names[key]} is for TLS; "
                                       f"turn TLS on with {tlsName}")
        return
    scheme = settings.server.split(":", 1)[0]
    if scheme != "tcp":
        raise TLSSettingsError(f"{tlsName} needs a tcp: server endpoint in {serverName} "
                               f"(got {scheme}:); a {scheme}: endpoint string sets up its "
                               f"own connection")
    from twisted.internet import reactor

    clientOptions(settings, endpointHost(clientFromString(reactor, settings.server)), names)
