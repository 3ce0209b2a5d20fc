"""
The test helper that receives L{StreamOrEcho}'s endless stream: it must
catch a corrupted byte anywhere in the stream and keep nothing it received.
"""

from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from tests.support import STREAM_PERIOD, StreamOrEcho, StreamUser, isStreamPrefix


class StreamUserTests(unittest.TestCase):
    def receive(self, pieces):
        user = StreamUser()
        user.makeConnection(StringTransport())
        for piece in pieces:
            user.dataReceived(piece)
        return user

    def test_intactStreamInOddPieces(self):
        """Pieces cut anywhere, across the 256-byte period, make an intact prefix."""
        stream = StreamOrEcho.chunk * 3
        cuts = [0, 1, 255, 256, 257, 70000, 131072, len(stream)]
        user = self.receive([stream[a:b] for a, b in zip(cuts, cuts[1:])])
        self.assertEqual(len(user.data), len(stream))
        self.assertTrue(isStreamPrefix(user.data))
        self.assertEqual(user.received, [])

    def test_corruptedByteIsCaught(self):
        """One wrong byte deep in the stream is seen, and stays seen."""
        stream = bytearray(StreamOrEcho.chunk * 2)
        stream[100000] ^= 1
        user = self.receive([bytes(stream[:65536]), bytes(stream[65536:]), STREAM_PERIOD])
        self.assertFalse(isStreamPrefix(user.data))
        self.assertEqual(len(user.data), len(stream) + 256)

    def test_waitersFireWithTheCount(self):
        """whenReceived fires once enough bytes arrived, with their count."""
        user = StreamUser()
        user.makeConnection(StringTransport())
        waiting = user.whenReceived(300)
        user.dataReceived(STREAM_PERIOD)
        self.assertNoResult(waiting)
        user.dataReceived(STREAM_PERIOD)
        self.assertEqual(len(self.successResultOf(waiting)), 512)
