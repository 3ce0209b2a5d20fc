"""
The message types of the wire protocol: what we parse from the Go
implementation's real frames, what we encode, and every way a frame body can
be wrong.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from twisted.trial import unittest

from gotunnel.wire import messages
from gotunnel.wire.messages import (
    DataChannel, OfflinePort, OnlinePort, OpenDataChannel, Ping, Pong, ProtocolError,
    Register, RegisterResp,
)

# The capture lives in the shared project folder until it is copied into
# tests/vectors/; the copy wins when there is one.
VECTORS = next(p for p in (Path(__file__).parent / "vectors" / "go-gotunnel-wire.json",
                           Path("/work/shared/vectors/go-gotunnel-wire.json"))
               if p.exists())


def splitFrames(segment: bytes) -> list[bytes]:
    """
    The frame bodies in one TCP read: 4-byte big-endian length, then body,
    as many times as the segment holds, with nothing left over.
    """
    bodies = []
    offset = 0
    while offset < len(segment):
        (length,) = struct.unpack(">I", segment[offset:offset + 4])
        body = segment[offset + 4:offset + 4 + length]
        if len(body) != length:
            raise AssertionError(f"segment ends inside a frame at offset {offset}")
        bodies.append(body)
        offset += 4 + length
    return bodies


def goSegments() -> list[dict]:
    """The captured segments, each with its bytes under C{"data"}."""
    segments = json.loads(VECTORS.read_text(encoding="utf-8"))["segments"]
    for segment in segments:
        segment["data"] = bytes.fromhex(segment["segment_hex"])
    return segments


def isRaw(segment: dict) -> bool:
    """A segment of raw stream bytes on a data channel, not a frame."""
    return "raw stream bytes" in segment["note"]


def goFrames() -> list[bytes]:
    """Every frame body the Go implementation sent, in capture order."""
    bodies = []
    for segment in goSegments():
        if not isRaw(segment):
            bodies.extend(splitFrames(segment["data"]))
    return bodies


def body(**fields) -> bytes:
    """A frame body holding exactly C{fields}, in the order given."""
    return json.dumps(fields, separators=(",", ":")).encode("utf-8")


class GoVectorTests(unittest.TestCase):
    """Frames captured between the Go client and server."""

    def test_segmentsSplitIntoFrames(self):
        """
        The vectors hold eleven segments: nine of frames (one with two
        coalesced frames, so ten frames) and two of raw stream bytes.
        """
        segments = goSegments()
        self.assertEqual(len(segments), 11)
        self.assertEqual(sum(isRaw(s) for s in segments), 2)
        self.assertEqual(len(goFrames()), 10)
        coalesced = [s for s in segments if "coalesced" in s["note"]]
        self.assertEqual(len(coalesced), 1)
        self.assertEqual(len(splitFrames(coalesced[0]["data"])), 2)

    def test_everyFrameParses(self):
        """
        Each Go frame parses to the message it carries, field for field.
        """
        parsed = [messages.parse(b) for b in goFrames()]
        self.assertEqual(parsed, [
            Register(local_port=31003, remote_port=31004, protocol="tcp",
                     token="demo-token", name="demo-client"),
            RegisterResp(status="ok", reason=""),
            Ping(time=1795580625),
            Pong(time=1795580625),
            OpenDataChannel(local_port=31003, remote_port=0, protocol="", token="",
                            name="", conn_id=None),
            DataChannel(local_port=31003, remote_port=31004, protocol="",
                        token="demo-token", name="demo-client", conn_id=None),
            RegisterResp(status="ok", reason=""),
            Ping(time=1795580628),
            OfflinePort(port=31004),
            OnlinePort(port=31004),
        ])

    def test_encodeReproducesGoBytes(self):
        """
        Encoding what we parsed from a Go frame gives the Go frame back, byte
        for byte: same fields, same order, no spaces, reason left out when
        empty, no conn_id when there was none.
        """
        for goBody in goFrames():
            self.assertEqual(messages.encode(messages.parse(goBody)), goBody)

    def test_rawSegmentsAreNotFrames(self):
        """
        The raw HTTP bytes on a data channel are not frames: read as a length
        prefix they announce far more than the limit, so a frame reader would
        refuse them rather than wait for them.
        """
        raw = [s["data"] for s in goSegments() if isRaw(s)]
        self.assertEqual(len(raw), 2)
        for data in raw:
            (length,) = struct.unpack(">I", data[:4])
            self.assertGreater(length, 64 * 1024)


class RoundTripTests(unittest.TestCase):
    """Every message type survives encode then parse."""

    examples = [
        Register(local_port=22, remote_port=10022, protocol="tcp", token="t0k", name="edge"),
        RegisterResp(status="fail", reason="authentication failed"),
        RegisterResp(status="ok"),
        Ping(time=1795580625),
        Pong(time=1795580626),
        OpenDataChannel(local_port=22, conn_id="0123456789abcdef"),
        OpenDataChannel(local_port=22),
        DataChannel(local_port=22, remote_port=10022, token="t0k", name="edge",
                    conn_id="0123456789abcdef"),
        DataChannel(local_port=22, remote_port=10022, token="t0k", name="edge"),
        OfflinePort(port=10022),
        OnlinePort(port=10022),
    ]

    def test_roundTrip(self):
        """parse(encode(m)) == m for each message type, extensions set or not."""
        for message in self.examples:
            self.assertEqual(messages.parse(messages.encode(message)), message)

    def test_everyTypeCovered(self):
        """The examples cover every type in MESSAGE_TYPES (a new type needs one)."""
        self.assertEqual({m.type for m in self.examples}, set(messages.MESSAGE_TYPES))

    def test_registerEncodesGoFields(self):
        """A register carries the Go struct's fields in Go's order."""
        self.assertEqual(
            messages.encode(Register(local_port=22, remote_port=10022, protocol="tcp",
                                     token="t0k", name="edge")),
            b'{"type":"register","local_port":22,"remote_port":10022,"protocol":"tcp",'
            b'"token":"t0k","name":"edge"}')

    def test_reasonOmittedWhenEmpty(self):
        """register_resp leaves out an empty reason, as Go's omitempty does."""
        self.assertEqual(messages.encode(RegisterResp(status="ok")),
                         b'{"type":"register_resp","status":"ok"}')
        self.assertEqual(messages.encode(RegisterResp(status="fail", reason="nope")),
                         b'{"type":"register_resp","status":"fail","reason":"nope"}')

    def test_connIdOmittedWhenNone(self):
        """conn_id, our extension, is left out when unset and last when set."""
        self.assertEqual(
            messages.encode(OpenDataChannel(local_port=22)),
            b'{"type":"open_data_channel","local_port":22,"remote_port":0,"protocol":"",'
            b'"token":"","name":""}')
        self.assertEqual(
            messages.encode(DataChannel(local_port=22, remote_port=10022, token="t",
                                        name="n", conn_id="c1")),
            b'{"type":"data_channel","local_port":22,"remote_port":10022,"protocol":"",'
            b'"token":"t","name":"n","conn_id":"c1"}')

    def test_nonAsciiEncodedAsUtf8(self):
        """A name outside ASCII goes out as UTF-8 and comes back the same."""
        encoded = messages.encode(Register(name="边缘-1"))
        self.assertIn("边缘-1".encode("utf-8"), encoded)
        self.assertEqual(messages.parse(encoded).name, "边缘-1")

    def test_tokenNotInRepr(self):
        """The token stays out of repr(), so logging a message cannot leak it."""
        for message in (Register(token="s3cret-token", name="edge"),
                        DataChannel(token="s3cret-token", name="edge"),
                        OpenDataChannel(token="s3cret-token", name="edge")):
            self.assertNotIn("s3cret-token", repr(message))
            self.assertIn("name='edge'", repr(message))


class LenientParsingTests(unittest.TestCase):
    """What a receiver must accept: any order, extra fields, absent fields."""

    def test_fieldsInAnyOrder(self):
        """Fields in reverse order parse to the same message."""
        parsed = messages.parse(body(name="c", token="t", protocol="tcp", remote_port=2,
                                     local_port=1, type="register"))
        self.assertEqual(parsed, Register(local_port=1, remote_port=2, protocol="tcp",
                                          token="t", name="c"))

    def test_unknownFieldsIgnored(self):
        """Fields we do not know, of any JSON type, are ignored."""
        parsed = messages.parse(body(type="ping", time=5, extra=[1, {"a": None}],
                                     version="2.0", flag=True))
        self.assertEqual(parsed, Ping(time=5))

    def test_absentFieldsTakeDefaults(self):
        """Absent fields take their defaults; a Go register_resp has no reason."""
        self.assertEqual(messages.parse(body(type="register_resp", status="ok")),
                         RegisterResp(status="ok", reason=""))
        self.assertEqual(messages.parse(body(type="ping")), Ping(time=0))
        self.assertEqual(messages.parse(body(type="data_channel", remote_port=7)),
                         DataChannel(remote_port=7, conn_id=None))

    def test_nullConnIdIsAbsent(self):
        """A conn_id of null is read as no conn_id."""
        self.assertEqual(messages.parse(body(type="data_channel", conn_id=None)).conn_id,
                         None)

    def test_unknownTypeIsNone(self):
        """A well-formed object of a type we do not know parses to None."""
        self.assertIsNone(messages.parse(body(type="open_udp_channel", port=53)))

    def test_portBounds(self):
        """Ports 0 and 65535 are in range."""
        self.assertEqual(messages.parse(body(type="offline_port", port=0)), OfflinePort(0))
        self.assertEqual(messages.parse(body(type="offline_port", port=65535)),
                         OfflinePort(65535))

    def test_stringOfMaxLength(self):
        """A string of exactly MAX_STRING characters is accepted."""
        name = "n" * messages.MAX_STRING
        self.assertEqual(messages.parse(body(type="register", name=name)).name, name)


class BadBodyTests(unittest.TestCase):
    """Each way a body breaks the protocol raises ProtocolError saying how."""

    def assertRefused(self, frameBody: bytes, *fragments: str) -> None:
        """parse(frameBody) raises ProtocolError whose message holds each fragment."""
        e = self.assertRaises(ProtocolError, messages.parse, frameBody)
        for fragment in fragments:
            self.assertIn(fragment, str(e))

    def test_notUtf8(self):
        self.assertRefused(b'{"type":"ping","x":"\xff\xfe"}', "not UTF-8")

    def test_notJson(self):
        self.assertRefused(b'{"type":"ping",', "not JSON")

    def test_empty(self):
        self.assertRefused(b"", "frame is empty")

    def test_deeplyNestedJson(self):
        """Nesting deep enough to exhaust the parser's recursion is just not JSON."""
        self.assertRefused(b'{"type":"ping","x":' + b"[" * 30000 + b"]" * 30000 + b"}",
                           "not JSON")

    def test_jsonArray(self):
        self.assertRefused(b'[{"type":"ping"}]', "JSON list", "not an object")

    def test_jsonNumber(self):
        self.assertRefused(b"42", "JSON int", "not an object")

    def test_jsonString(self):
        self.assertRefused(b'"ping"', "JSON str", "not an object")

    def test_missingType(self):
        self.assertRefused(body(time=1), "no type")

    def test_nullType(self):
        self.assertRefused(body(type=None, time=1), "no type")

    def test_nonStringType(self):
        self.assertRefused(body(type=3), "type is not a string")

    def test_portAsString(self):
        self.assertRefused(body(type="register", remote_port="10022"),
                           "register.remote_port", "integer")

    def test_portNegative(self):
        self.assertRefused(body(type="register", local_port=-1),
                           "register.local_port", "0 to 65535", "-1")

    def test_portTooLarge(self):
        self.assertRefused(body(type="offline_port", port=65536),
                           "offline_port.port", "0 to 65535", "65536")

    def test_portAsFloat(self):
        self.assertRefused(body(type="online_port", port=22.0), "online_port.port", "integer")

    def test_boolAsInt(self):
        """JSON true is not a number, though Python's bool is an int."""
        self.assertRefused(body(type="offline_port", port=True),
                           "offline_port.port", "integer")
        self.assertRefused(body(type="ping", time=False), "ping.time", "integer")

    def test_timeOutOfRange(self):
        """A time beyond Go's int64 is refused."""
        self.assertRefused(body(type="ping", time=2 ** 63), "ping.time", "out of range")

    def test_tokenAsNumber(self):
        self.assertRefused(body(type="register", token=12345), "register.token", "string")

    def test_connIdAsNumber(self):
        self.assertRefused(body(type="data_channel", conn_id=7), "data_channel.conn_id",
                           "string")

    def test_statusAsNull(self):
        self.assertRefused(body(type="register_resp", status=None),
                           "register_resp.status", "string")

    def test_stringTooLong(self):
        """A string one character over MAX_STRING is refused, whichever field."""
        tooLong = "x" * (messages.MAX_STRING + 1)
        self.assertRefused(body(type="register", name=tooLong), "register.name",
                           str(messages.MAX_STRING))
        self.assertRefused(body(type="data_channel", token=tooLong), "data_channel.token")
        self.assertRefused(body(type="data_channel", conn_id=tooLong),
                           "data_channel.conn_id")
        self.assertRefused(body(type="register_resp", reason=tooLong),
                           "register_resp.reason")

    def test_tokenNotEchoedInError(self):
        """An over-long token is refused without its value in the message."""
        e = self.assertRaises(ProtocolError, messages.parse,
                              body(type="register", token="secret" * 200))
        self.assertNotIn("secret", str(e))
