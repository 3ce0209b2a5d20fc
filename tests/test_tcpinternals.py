"""
The start-up self-check of what zero copy reads of Twisted's TCP transports
(gotunnel.relay.tcpinternals), and what the splicer does when it fails.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from gotunnel.relay import tcpinternals
from gotunnel.config.settings import ServerSettings
from gotunnel.relay.splicer import Splicer

from tests.support import LogWatcher


class SelfCheckTests(unittest.TestCase):
    def test_installedTwistedHasEverything(self):
        """The Twisted the tests run on has all zero copy needs (see setup.cfg)."""
        self.assertEqual(tcpinternals.missingForZeroCopy(), [])

    def test_missingAttributesAreNamed(self):
        """A connection without some of the attributes: those are named, in order."""
        class Older:
            dataBuffer = b""
            offset = 0
            reactor = None
            fileno = doRead = doWrite = _writeDisconnected = None

        self.assertEqual(tcpinternals.missingForZeroCopy(Older()),
                         ["_tempDataLen", "_writeDisconnecting"])

    def test_readsOfARealConnection(self):
        """The accessors read what tcp.Connection keeps."""
        self.assertEqual(tcpinternals.writeDisconnecting(tcp.Connection), False)
        self.assertEqual(tcpinternals.writeDisconnected(tcp.Connection), False)


class SplicerCheckTests(unittest.TestCase):
    settings = ServerSettings(listen="tcp:0", token="t", zero_copy=True, splice_thread=True)

    def test_failedCheckTurnsZeroCopyOff(self):
        """
        zero_copy on, and a Twisted that lacks something: the splicer has
        zero copy (and so the splice thread) off, said in one warning.
        """
        logs = LogWatcher(self)
        splicer = Splicer.fromSettings(self.settings, MemoryReactorClock(),
                                       check=lambda: ["_tempDataLen"])
        self.assertFalse(splicer.zeroCopy)
        self.assertIsNone(splicer.spliceThread)
        [event] = logs.matching(LogWatcher.formatted("zero copy is off: this Twisted"))
        self.assertEqual(event["missing"], "_tempDataLen")

    def test_passedCheckKeepsZeroCopy(self):
        logs = LogWatcher(self)
        splicer = Splicer.fromSettings(self.settings, MemoryReactorClock(), threads=False,
                                       check=lambda: [])
        self.assertTrue(splicer.zeroCopy)
        self.assertEqual(logs.matching(LogWatcher.formatted("zero copy is off")), [])

    def test_notCheckedWithZeroCopyOff(self):
        """With zero_copy off nothing is checked, and nothing said."""
        logs = LogWatcher(self)
        settings = ServerSettings(listen="tcp:0", token="t", zero_copy=False)
        Splicer.fromSettings(settings, MemoryReactorClock(), check=lambda: ["doRead"])
        self.assertEqual(logs.matching(LogWatcher.formatted("zero copy is off")), [])
