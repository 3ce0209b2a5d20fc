"""
Making certificates for TLS between gotunnel clients and a server: a small
certificate authority, the server's and clients' certificates it signs,
and their PEM encodings.  C{python -m gotunnel certs} (L{gotunnel.tls.certs})
writes them to files.

Keys are ECDSA on P-256: generated in milliseconds, small on the wire, about
128-bit strength (more than RSA 2048's 112), and accepted by every TLS 1.2
and 1.3 stack we talk to, Go's crypto/tls and OpenSSL included.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Sequence, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 825
"""The longest validity Apple's TLS clients accept for a certificate of a private CA."""
BACKDATE = timedelta(hours=1)
"""Certificates start an hour early, so that a peer whose clock is behind accepts them."""

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: PrivateKey


def newKey() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def makeCA(commonName: str, now: datetime, days: int = CA_DAYS) -> Issued:
    """
    A self-signed CA that signs leaf certificates only (path length 0).
    """
    key = newKey()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])
    keyId = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_keyUsage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(keyId, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(keyId),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def makeServer(ca: Issued, dnsNames: Sequence[str], ips: Sequence[IPAddress],
               now: datetime, days: int = LEAF_DAYS) -> Issued:
    """
    A server certificate for C{dnsNames} and C{ips} (its subjectAltName,
    which is what TLS clients check), signed by C{ca}.
    """
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dnsNames]
    names += [x509.IPAddress(ip) for ip in ips]
    commonName = dnsNames[0] if dnsNames else str(ips[0])
    return _leaf(ca, commonName, ExtendedKeyUsageOID.SERVER_AUTH, names, now, days)


def makeClient(ca: Issued, name: str, now: datetime, days: int = LEAF_DAYS) -> Issued:
    """
    A client certificate for the client's C{name}, signed by C{ca}: its
    common name, and its subjectAltName, which strict verifiers require.
    """
    return _leaf(ca, name, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(name)], now, days)


def _keyUsage(**usages: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False)
    flags.update(usages)
    return x509.KeyUsage(**flags)


def _authorityKeyId(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """Points at the CA's own key identifier, however the CA computed it."""
    try:
        keyId = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(keyId)


def _leaf(ca: Issued, commonName: str, usage: x509.ObjectIdentifier,
          altNames: list[x509.GeneralName], now: datetime, days: int) -> Issued:
    key = newKey()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + timedelta(days=days), ca.certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_keyUsage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(_authorityKeyId(ca.certificate), critical=False)
        .add_extension(x509.SubjectAlternativeName(altNames), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(certificate, key)


def certificatePEM(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def keyPEM(key: PrivateKey) -> bytes:
    """The key unencrypted (PKCS#8): servers start unattended, so its file mode protects it."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
