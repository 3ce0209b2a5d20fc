"""
The integrity tests of test_e2e_tunnel.py again, with the tunnel in TLS
(the server's --tls-cert and --tls-key, the client's --tls and --ca):
random payloads both ways, fifty connections at once, a banner, bytes
before the data channel, closes, half-closes and resets from the user's
side, and a service that closes after answering: each direction's
end-of-stream crosses a TLS data channel as a close_notify
(L{gotunnel.tls.halfclose}).
"""

from __future__ import annotations

import os

from gotunnel.tls import certs
from tests import support, test_e2e_tunnel
from tests.support import HOST, temporaryDirectory
from tests.test_tls import SERVER_NAME, makeCertificates

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
    pass


class EarlyBytesTestsOverTLS(OverTLS, test_e2e_tunnel.EarlyBytesTests):
    pass


class ClosingTestsOverTLS(OverTLS, test_e2e_tunnel.ClosingTests):
    pass
