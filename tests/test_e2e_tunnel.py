"""
What a user does with a tunnel, over real loopback sockets, bytes checked
end to end.
"""

from twisted.internet import defer
from twisted.trial import unittest

from tests.support import Tunnel, connectUser, listenTarget, randomBytes


class TunnelDataTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.tunnel = Tunnel(self)
        yield self.tunnel.startServer()
        self.target = listenTarget(self)
        self.client, self.public = yield self.tunnel.publish(self.target)

    @defer.inlineCallbacks
    def test_echoOneMebibyte(self):
        """1 MiB of random bytes goes through and comes back unchanged."""
        payload = randomBytes(1024 * 1024)
        user = yield connectUser(self, self.public)
        user.transport.write(payload)
        received = yield user.whenReceived(len(payload))
        self.assertEqual(received, payload)
