"""
The start-up self-check of what zero copy reads of Twisted's TCP transports
(gotunnel.relay.tcpinternals), and what the splicer does when it fails.
"""

from __future__ import annotations

import ast
import pathlib
import re
import socket

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

    def test_eachFunctionIsChecked(self):
        """
        Every function the check lists is one of the module's, and a
        function that fails on a connection is named, alone.
        """
        for name in tcpinternals.ZERO_COPY_READS:
            self.assertTrue(callable(getattr(tcpinternals, name, None)), name)
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        connection = tcp.Connection(ours, None, reactor=object())
        connection._tempDataLen = 3
        self.assertEqual(tcpinternals.missingForZeroCopy(connection), ["twistedBuffered"])

    def test_handlersThatStayAreNamed(self):
        """A Twisted whose transports keep our doRead after giveBackIO fails the check."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)

        class Sticky(tcp.Connection):
            def __setattr__(self, name, value):
                if name in ("doRead", "doWrite"):
                    # Kept on the class, where giveBackIO does not look.
                    setattr(type(self), name, value)
                else:
                    super().__setattr__(name, value)

        self.assertEqual(tcpinternals.missingForZeroCopy(Sticky(ours, None, reactor=object())),
                         ["takeOverIO"])

    def test_takeOverAndGiveBack(self):
        """takeOverIO puts our handlers in place; giveBackIO leaves another's."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        connection = tcp.Connection(ours, None, reactor=object())
        own = connection.doRead

        def doRead():
            return None

        def doWrite():
            return None

        tcpinternals.takeOverIO(connection, doRead, doWrite)
        self.assertIs(connection.doRead, doRead)
        connection.doWrite = own  # as abortConnection puts its own in place
        tcpinternals.giveBackIO(connection, doRead, doWrite)
        self.assertEqual(connection.doRead, own)
        self.assertIn("doWrite", vars(connection))

    def test_aroundEachRead(self):
        calls = []

        class Port:
            def doRead(self):
                calls.append("read")

        port = Port()
        self.assertTrue(tcpinternals.aroundEachRead(
            port, lambda: calls.append("before"), lambda: calls.append("after")))
        port.doRead()
        self.assertEqual(calls, ["before", "read", "after"])
        self.assertFalse(tcpinternals.aroundEachRead(object(), list, list))

    def test_halfCloseTLSOverridesExist(self):
        """The Twisted the tests run on has what tls/halfclose.py overrides."""
        self.assertEqual(tcpinternals.missingForHalfCloseTLS(), [])

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


PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gotunnel"

TRANSPORT_LIKE = re.compile(r"transport|connection|endpoint|^tls$|^port$|^conn$", re.I)
"""Names of what holds a Twisted transport, endpoint or port."""

REPLACEABLE = {"doRead", "doWrite", "write", "writeSequence", "loseConnection",
               "loseWriteConnection", "abortConnection", "startReading", "startWriting",
               "stopReading", "stopWriting", "pauseProducing", "resumeProducing",
               "stopProducing"}

ALLOWED = {
    "relay/tcpinternals.py": None,
    # Another change is moving these into tcpinternals (issue 17 step 5).
    "relay/tlspump.py": {"_tlsConnection", "_handshakeDone", "_lostTLSConnection",
                         "_aborted", "_appSendBuffer", "_producerPaused", "_aggregator",
                         "_flushReceiveBIO", "_tlsShutdownFinished", "__dict__"},
    # pyOpenSSL's, not Twisted's: the Connection's SSL and BIO pointers that
    # the direct SSL_read/SSL_write use (recordsUsable checks they are there),
    # and the memory BIOs a socket BIO stands in for (Records.attach).
    "relay/tlsrecords.py": {"_ssl", "_from_ssl", "_into_ssl", "_raise_ssl_error"},
}
"""Files that may still read Twisted's private names: all of them (None),
or these."""


def _holder(node: ast.AST) -> str:
    """The last name in an expression: C{transport} for C{self.a.transport}."""
    while not isinstance(node, ast.Name):
        if isinstance(node, ast.Attribute):
            return node.attr
        if isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        else:
            return ""
    return node.id


def privateReads(source: str) -> list[tuple[int, str]]:
    """
    Where C{source} reads a private attribute of (or the C{__dict__} of,
    or puts a method on) something that holds a transport, an endpoint or
    a port, other than C{self}: line numbers and names.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            holder = _holder(node.value)
            if holder in ("self", "cls") or not TRANSPORT_LIKE.search(holder):
                continue
            name = node.attr
            if name == "__dict__" or (name.startswith("_") and not name.startswith("__")):
                found.append((node.lineno, name))
            elif name in REPLACEABLE and isinstance(node.ctx, ast.Store):
                found.append((node.lineno, name + " ="))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr", "vars") and node.args
                and TRANSPORT_LIKE.search(_holder(node.args[0]))):
            if node.func.id == "vars":
                found.append((node.lineno, "__dict__"))
            elif (len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                    and str(node.args[1].value).startswith("_")):
                found.append((node.lineno, node.args[1].value))
    return found


class PrivateReadsTests(unittest.TestCase):
    def test_onlyInTcpinternals(self):
        """
        No module but tcpinternals reads Twisted's private attributes of a
        transport, an endpoint or a port, or replaces their methods (the
        allowed ones aside, see L{ALLOWED}).
        """
        offending = []
        for path in sorted(PACKAGE.rglob("*.py")):
            name = path.relative_to(PACKAGE).as_posix()
            allowed = ALLOWED.get(name, set())
            if allowed is None:
                continue
            for line, attribute in privateReads(path.read_text()):
                if attribute not in allowed:
                    offending.append(f"gotunnel/{name}:{line}: {attribute}")
        self.assertEqual(offending, [])

    def test_theScanFindsThem(self):
        """The scan above finds each kind of read it looks for."""
        source = (
            "a = self.transport._tempDataLen\n"
            "b = getattr(endpoint, '_port', None)\n"
            "c = vars(transport)\n"
            "peer.transport.doRead = f\n"
            "d = self._own\n"
            "e = channel._answer\n"
            "f = transport.__dict__\n"
        )
        self.assertEqual(privateReads(source), [
            (1, "_tempDataLen"), (2, "_port"), (3, "__dict__"), (4, "doRead ="),
            (7, "__dict__")])
