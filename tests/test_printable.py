"""
Names and reasons a peer chose reach the log with their control characters
escaped: an ESC sequence cannot colour or clear the terminal that shows the
log, and a newline cannot forge a log line.
"""

from __future__ import annotations

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from gotunnel.wire.printable import printable

from tests.test_client import ClientTestCase, jsonFrame as clientJsonFrame
from tests.test_server import ServerTestCase, jsonFrame, register

EVIL = "edge\x1b[31m-1\nforged\x00line\u2028"


def rawControlCharacters(text: str) -> list[str]:
    return [c for c in text if not c.isprintable()]


class PrintableTests(unittest.TestCase):
    def test_controlCharactersEscaped(self):
        self.assertEqual(printable(EVIL), "edge\\x1b[31m-1\\nforged\\x00line\\u2028")

    def test_printableUnchanged(self):
        """Printable text, not only ASCII, is kept as it is (and is the same object)."""
        name = "办公室-pc 'one'"
        self.assertIs(printable(name), name)


class ServerLogTests(ServerTestCase):
    def test_clientNameEscaped(self):
        """
        A client whose name holds ESC, newline, NUL and a line separator:
        every event its registration, port changes, second registration,
        silence and departure produce formats without a raw control
        character, and names the client with those characters escaped.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.registered(name=EVIL)
        control = self.registered(name=EVIL)
        control.send(jsonFrame(type="offline_port", port=10022))
        control.send(jsonFrame(type="online_port", port=10022))
        control.send(jsonFrame(type="offline_port", port=10023))
        self.connect().send(register(name=EVIL, token="wrong"))
        self.reactor.advance(self.settings.heartbeat_timeout + 1)
        self.registry.checkHeartbeats()
        control.lose()

        texts = [formatEvent(e) for e in events]
        self.assertEqual([t for t in texts if rawControlCharacters(t)], [])
        naming = [t for t in texts if "edge\\x1b[31m-1\\nforged" in t]
        self.assertGreaterEqual(len(naming), 8, texts)


class ClientLogTests(ClientTestCase):
    def test_serverReasonEscaped(self):
        """
        A server's reason for refusing a registration or a data channel is
        logged with its control characters escaped.
        """
        events = self.logged()
        channel, _ = self.control()
        channel.dataReceived(clientJsonFrame(type="register_resp", status="fail", reason=EVIL))
        protocol, _ = self.dataChannel(clientJsonFrame(
            type="open_data_channel", local_port=8022, conn_id="c1"))
        protocol.dataReceived(clientJsonFrame(type="register_resp", status="fail", reason=EVIL))
        texts = [formatEvent(e) for e in events]
        self.assertEqual([t for t in texts if rawControlCharacters(t)], [])
        self.assertEqual(len([t for t in texts if printable(EVIL) in t]), 2, texts)
