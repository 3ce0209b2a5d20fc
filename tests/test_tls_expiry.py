"""
What the client and the server say when a TLS handshake fails because of a
certificate's dates, or a certificate from another CA: the client names the
expired certificate and when it ended, and each side's hint names only its
own options.  Over loopback TLS, with certificates made by L{gotunnel.tls.certs}.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import datetime, timedelta, timezone

from twisted.internet import defer

from gotunnel.tls import certmaking, certs

from tests.support import HOST, LogWatcher, temporaryDirectory, within
from tests.test_tls import SERVER_NAME
from tests.test_tls_options import FriendlyTLSTestCase


class CertificateFailureTests(FriendlyTLSTestCase):
    def expiredServerCertificate(self) -> tuple[str, str, datetime]:
        """
        A server certificate from our CA, for our name and address, that
        ended 20 days ago: its certificate and key files, and its notAfter.
        """
        ca = certs.loadCA(self.certificates)
        issued = certmaking.makeServer(ca, [SERVER_NAME], [ipaddress.ip_address(HOST)],
                                  datetime.now(timezone.utc) - timedelta(days=30), days=10)
        directory = temporaryDirectory(self)
        cert, key = (os.path.join(directory, name)
                     for name in (certs.SERVER_CERT, certs.SERVER_KEY))
        with open(cert, "wb") as f:
            f.write(certmaking.certificatePEM(issued.certificate))
        with open(key, "wb") as f:
            f.write(certmaking.keyPEM(issued.key))
        return cert, key, issued.certificate.not_valid_after_utc

    @defer.inlineCallbacks
    def test_expiredServerCertificate(self):
        """
        A server whose certificate has expired: the client's [ERROR][1001]
        line says so, with the certificate's name and its notAfter, and not
        that the CA is untrusted; the server's log says the client found its
        certificate expired.
        """
        cert, key, notAfter = self.expiredServerCertificate()
        yield self.startServer(tls_cert=cert, tls_key=key)
        yield self.assertNeverRegisters(**self.tlsClient())
        [line] = self.unreachableLines()
        when = notAfter.strftime("%Y-%m-%d %H:%M:%S UTC")
        self.assertIn(f"its certificate '{SERVER_NAME}' expired on {when} (its notAfter)", line)
        self.assertNotIn("not signed", line)
        [event] = yield within(self.logs.whenMatched(LogWatcher.formatted(
            "TLS handshake with")), 15, "the server's log line")
        self.assertIn("the client says this server's certificate (--tls-cert) has expired",
                      event["why"])

    @defer.inlineCallbacks
    def test_untrustedServerHintNamesClientOptions(self):
        """
        A server certificate from a CA the client does not trust: the
        client's hint names --ca, not the server's --tls-client-ca; the
        server's hint says the client does not trust its certificate.
        """
        yield self.startServer()
        other = os.path.join(self.otherCA(), certs.CA_CERT)
        yield self.assertNeverRegisters(**self.tlsClient(tls_ca=other))
        [line] = self.unreachableLines()
        self.assertIn("certificate verify failed')]: the server's certificate is not signed "
                      "by a CA this client trusts (check --ca)", line)
        self.assertNotIn("--tls-client-ca", line)
        [event] = yield within(self.logs.whenMatched(LogWatcher.formatted(
            "TLS handshake with")), 15, "the server's log line")
        self.assertIn("the client does not trust this server's certificate", event["why"])
