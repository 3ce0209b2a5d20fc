"""
The integrity tests of test_e2e_tunnel.py again, with the tunnel in TLS
(the server's --tls-cert and --tls-key, the client's --tls and --ca):
random payloads both ways, fifty connections at once, a banner, bytes
before the data channel, closes and resets from the user's side.

Those that wait for an end-of-stream to cross the tunnel are skipped, with
the reason: a TLS data channel does not carry one (L{RelayEnd.shutdownWrite}),
so a service that closes after answering leaves the user's connection open
until the user closes it.  See issue 21 and bench/README.md, "TLS".
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from gotunnel import certs
from tests import support, test_e2e_tunnel
from tests.support import HOST, temporaryDirectory
from tests.test_tls import SERVER_NAME, makeCertificates

NO_END_OF_STREAM = ("a TLS data channel does not carry an end-of-stream "
                    "(RelayEnd.shutdownWrite): the far end never sees this close")


def skipped(reason: str):
    """A test that says why it does not run here."""
    def test(self):
        raise unittest.SkipTest(reason)
    return test


class TLSTunnel(support.Tunnel):
    """A L{support.Tunnel} whose server and clients speak TLS to each other."""

    certificates = ""

    def startServer(self, **overrides):
        overrides.setdefault("tls_cert", os.path.join(self.certificates, certs.SERVER_CERT))
        overrides.setdefault("tls_key", os.path.join(self.certificates, certs.SERVER_KEY))
        return super().startServer(**overrides)

    def startClient(self, targetPort, remotePort=None, **overrides):
        overrides.setdefault("tls", True)
        overrides.setdefault("tls_ca", os.path.join(self.certificates, certs.CA_CERT))
        return super().startClient(targetPort, remotePort, **overrides)


class OverTLS:
    """
    Runs a test case of test_e2e_tunnel.py through TLS.  TLS connections
    are never spliced in the kernel: the relay's ordinary path it is.
    """

    zeroCopy = False
    spliceThread = False

    def setUp(self):
        directory = temporaryDirectory(self)
        makeCertificates(directory, "--name", SERVER_NAME, "--ip", HOST)
        self.patch(test_e2e_tunnel, "Tunnel",
                   type("TLSTunnelHere", (TLSTunnel,), {"certificates": directory}))
        return super().setUp()


class TunnelDataTestsOverTLS(OverTLS, test_e2e_tunnel.TunnelDataTests):
    pass


class TransferTestsOverTLS(OverTLS, test_e2e_tunnel.TransferTests):
    test_oneMebibyteToTheService = skipped(NO_END_OF_STREAM)
    test_oneMebibyteFromTheService = skipped(NO_END_OF_STREAM)
    test_slowReaderGetsEverything = skipped(NO_END_OF_STREAM)
    test_slowReaderKeepsTheTunnelBounded = skipped(NO_END_OF_STREAM)
    test_halfCloseThenAnswer = skipped(NO_END_OF_STREAM)


class EarlyBytesTestsOverTLS(OverTLS, test_e2e_tunnel.EarlyBytesTests):
    test_halfCloseBeforeTheDataChannel = skipped(NO_END_OF_STREAM)


class ClosingTestsOverTLS(OverTLS, test_e2e_tunnel.ClosingTests):
    test_userClosesRightAfterSending = skipped(NO_END_OF_STREAM)
    test_serviceClosesAfterAnswering = skipped(NO_END_OF_STREAM)
