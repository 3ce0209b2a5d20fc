"""
A TLS data channel's bytes moved by the splice thread (gotunnel/relay/tlspump.py),
over real loopback TLS: the hand-off once the connections are steady, and
the hand-back to the reactor at an end-of-stream, a reset, a TLS alert and
a close_notify, with the bytes checked end to end.  Then the tunnel's
integrity tests of test_e2e_tls.py again, with the splice thread on.
"""

from __future__ import annotations

import os

from twisted.internet import defer

from gotunnel.relay.tlspump import TLSPump
from tests import test_e2e_tls, test_e2e_tunnel
from tests.support import (
    Echo, connectUser, randomBytes, startTarget, waitUntil, within,
)
from tests.test_e2e_tunnel import WAIT, assertSameBytes

FORGED_RECORD = b"\x17\x03\x03\x00\x20" + bytes(32)
"""An application-data record no key made: its tag fails, a TLS alert."""


class InTheThread:
    """Runs a test case of test_e2e_tls.py with the splice thread on."""

    zeroCopy = True
    spliceThread = True


class HandOffTests(InTheThread, test_e2e_tls.OverTLS, test_e2e_tunnel.ServiceTestCase):
    """One user echoing through a TLS tunnel, its pumps in the splice thread."""

    def tlsPumps(self, splicer) -> list[TLSPump]:
        return [pump for pump in splicer.firstPumps if isinstance(pump, TLSPump)]

    @defer.inlineCallbacks
    def echoingUser(self, size: int = 256 * 1024):
        """
        A user of an echo service through the tunnel, once C{size} random
        bytes came back intact and both ends' TLS pumps are in their splice
        thread; returns the user, the service's connections, and the
        server's and the client's pumps.
        """
        target = startTarget(self, Echo)
        public = yield self.publishPort(target.port)
        user = yield connectUser(self, public)
        payload = randomBytes(size)
        user.transport.write(payload)
        got = yield within(user.whenReceived(size), WAIT, "the echo")
        assertSameBytes(self, got, payload, "the echo")
        server, client = self.tunnel.splicers
        serverPumps, clientPumps = self.tlsPumps(server), self.tlsPumps(client)
        self.assertEqual((len(serverPumps), len(clientPumps)), (1, 1),
                         "each end splices its TLS data channel with a TLS pump")
        serverPump, clientPump = serverPumps[0], clientPumps[0]
        yield waitUntil(lambda: serverPump.inThread and clientPump.inThread, WAIT,
                        "both TLS pumps to go to their splice thread")
        self.assertEqual((serverPump.tls.onSocket, clientPump.tls.onSocket),
                         (TLSPump.useSocket, TLSPump.useSocket),
                         "OpenSSL holds the TLS sockets while the threads do")
        return user, target.factory.tracker, serverPump, clientPump

    @defer.inlineCallbacks
    def test_streamMovedByTheThread(self):
        """
        Four MiB echoed after the hand-off come back intact, and the
        threads, not the reactors, moved them.
        """
        user, _, serverPump, clientPump = yield self.echoingUser()
        payload = randomBytes(4 * 1024 * 1024)
        before = len(user.data)
        user.transport.write(payload)
        got = yield within(user.whenReceived(before + len(payload)), WAIT, "the echo")
        assertSameBytes(self, got[before:], payload, "the echo through the threads")
        for pump in (serverPump, clientPump):
            # Each way through each end: what the user sent and its echo.
            self.assertGreaterEqual(pump.moved, 2 * len(payload))

    @defer.inlineCallbacks
    def test_endOfStreamHandsBack(self):
        """
        The user, not reading, sends 16 MiB and half-closes while the
        server's pump is in the thread: the thread gives the pump back at
        the end-of-stream, holding echoed bytes the user's socket had no
        room for, and the reactor writes them: the user reads the echo
        whole.
        """
        user, _, serverPump, _ = yield self.echoingUser()
        before = len(user.data)
        payload = randomBytes(16 * 1024 * 1024)
        user.transport.pauseProducing()
        user.transport.write(payload)
        user.transport.loseWriteConnection()
        yield waitUntil(lambda: not serverPump.inThread, WAIT,
                        "the server's pump to come back to the reactor")
        user.transport.resumeProducing()
        got = yield within(user.whenReceived(before + len(payload)), WAIT, "the echo")
        assertSameBytes(self, got[before:], payload, "the echo after the end-of-stream")

    @defer.inlineCallbacks
    def test_resetHandsBack(self):
        """
        The user resets its connection while the pumps are in the thread:
        the reset is met in the reactor, and the service's connection ends.
        """
        user, tracker, serverPump, _ = yield self.echoingUser()
        user.transport.abortConnection()
        yield within(user.closed, WAIT, "the user's connection to close")
        yield within(defer.DeferredList(tracker.lost), WAIT,
                     "the service's connection to close after the user's reset")
        self.assertFalse(serverPump.inThread)

    @defer.inlineCallbacks
    def test_tlsAlertHandsBack(self):
        """
        A record that fails its check reaches the server's pump in the
        thread: Twisted's TLS meets the failure in the reactor and closes
        the data channel, and the user's connection closes after every
        byte echoed before it.
        """
        user, tracker, serverPump, clientPump = yield self.echoingUser()
        echoed = len(user.data)
        # Written under the client's TLS, as a broken or hostile peer would.
        os.write(clientPump.tls.fd, FORGED_RECORD)
        got = yield within(user.closed, WAIT, "the user's connection to close")
        self.assertEqual(len(got), echoed)
        self.assertFalse(serverPump.inThread)
        yield within(defer.DeferredList(tracker.lost), WAIT,
                     "the service's connection to close")

    @defer.inlineCallbacks
    def test_closeNotifyHandsBack(self):
        """
        The client's end of the data channel closes in TLS (a close_notify),
        as the relay closes it, while the server's pump is in the thread:
        Twisted's TLS answers it in the reactor, and the user's connection
        closes.
        """
        user, _, serverPump, clientPump = yield self.echoingUser()
        echoed = len(user.data)
        clientPump.tlsTransport.unregisterProducer()
        clientPump.tlsTransport.loseConnection()
        got = yield within(user.closed, WAIT, "the user's connection to close")
        self.assertEqual(len(got), echoed)
        self.assertFalse(serverPump.inThread)


class HandOffOnMemoryBIOsTests(HandOffTests):
    """The same, OpenSSL kept on pyOpenSSL's memory BIOs (what a build without
    the calls Records.attach needs does)."""

    def setUp(self):
        self.patch(TLSPump, "useSocket", False)
        return super().setUp()


class TunnelDataTestsOverTLSInThread(InTheThread, test_e2e_tls.TunnelDataTestsOverTLS):
    pass


class TransferTestsOverTLSInThread(InTheThread, test_e2e_tls.TransferTestsOverTLS):
    pass


class EarlyBytesTestsOverTLSInThread(InTheThread, test_e2e_tls.EarlyBytesTestsOverTLS):
    pass


class ClosingTestsOverTLSInThread(InTheThread, test_e2e_tls.ClosingTestsOverTLS):
    pass
