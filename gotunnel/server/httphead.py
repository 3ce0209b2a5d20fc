"""
The head of an HTTP/1.x request, read by the server's HTTP virtual-host
port to route a user's connection by its Host: parsed (L{parseHead}),
rewritten for the service (L{Head.rewrite}), or answered with an error page
that names no internal detail (L{errorPage}).
"""

from __future__ import annotations

import base64
import hmac
import re
from dataclasses import dataclass
from typing import Optional

MAX_HEAD = 16 * 1024
"""The longest request head we read, request line and headers (431 beyond)."""

MAX_HEADERS = 100
"""The most header lines we accept in one head (431 beyond)."""

_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) HTTP/(\d)\.(\d)")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST = re.compile(r"[a-z0-9_*]([a-z0-9_\-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_\-]*[a-z0-9_])?)*\.?")

REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           408: "Request Timeout", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}

_PAGES = {
    400: "The request could not be read.",
    401: "This site needs a user name and password.",
    404: "No site is published under this name.",
    408: "The request took too long to arrive.",
    431: "The request's headers are too large.",
    503: "This site is offline for the moment.",
}


class BadHead(Exception):
    """A head we cannot route; C{status} is the HTTP status to answer with."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class Head:
    """A parsed request head: its lines as sent, and where the Host is."""

    method: bytes
    version: tuple[int, int]
    lines: tuple[bytes, ...]
    """The request line, then each header line as sent, without CRLF."""
    host: Optional[str]
    """The Host, lower-case, without port or trailing dot; None if absent."""

    def header(self, name: bytes) -> list[bytes]:
        """The values of every header named C{name} (any case)."""
        name = name.lower()
        values = []
        for line in self.lines[1:]:
            key, _, value = line.partition(b":")
            if key.lower() == name:
                values.append(value.strip(b" \t"))
        return values

    def rewrite(self, remove: tuple[bytes, ...] = (), add: tuple[tuple[bytes, bytes], ...] = (),
                host: Optional[bytes] = None) -> bytes:
        """
        The head as bytes for the service: without the headers named in
        C{remove}, with C{add} appended, and the Host replaced by C{host}.
        """
        removed = {name.lower() for name in remove}
        out = [self.lines[0]]
        for line in self.lines[1:]:
            key = line.partition(b":")[0].lower()
            if key in removed:
                continue
            if host is not None and key == b"host":
                line = b"Host: " + host
            out.append(line)
        out.extend(name + b": " + value for name, value in add)
        return b"\r\n".join(out) + b"\r\n\r\n"


def hostName(value: bytes) -> str:
    """
    The host of a Host header's value, lower-case, without its port or a
    trailing dot; L{BadHead} 400 if it is not a host name or address.
    """
    try:
        text = value.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        raise BadHead(400, "the Host is not ASCII") from None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1:] and not re.fullmatch(r":\d{1,5}", text[end + 1:])):
            raise BadHead(400, "the Host is not a host name or address")
        return text[:end + 1]
    host, colon, port = text.partition(":")
    if colon and not re.fullmatch(r"\d{1,5}", port):
        raise BadHead(400, "the Host's port is not a number")
    if not host or len(host) > 253 or "*" in host or not _HOST.fullmatch(host):
        raise BadHead(400, "the Host is not a host name or address")
    return host.rstrip(".")


def headEnd(data: bytes) -> int:
    """
    Where the head in C{data} ends (just after its blank line), or -1 if
    it has not yet; empty lines before the request line are skipped, as
    RFC 9112 asks.
    """
    return data.find(b"\r\n\r\n", len(data) - len(data.lstrip(b"\r\n")))


def parseHead(data: bytes) -> Head:
    """
    Parse a request head (C{data} up to and including its blank line).

    @raise BadHead: 400 for a head that is not HTTP/1.x, folded header
        lines, or no single valid Host in an HTTP/1.1 request; 431 for too
        many header lines.
    """
    text = data.lstrip(b"\r\n")
    if not text.endswith(b"\r\n\r\n"):
        raise BadHead(400, "the head does not end with a blank line")
    lines = text[:-4].split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise BadHead(400, "the request line is not METHOD TARGET HTTP/x.y")
    version = (int(match.group(3)), int(match.group(4)))
    if version[0] != 1:
        raise BadHead(400, "only HTTP/1.x is routed")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadHead(431, f"more than {MAX_HEADERS} header lines")
    hosts = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise BadHead(400, "a folded header line")
        key, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(key):
            raise BadHead(400, "a header line that is not NAME: VALUE")
        if b"\r" in value or b"\n" in value or b"\0" in value:
            raise BadHead(400, "a control character in a header")
        if key.lower() == b"host":
            hosts.append(value)
    if len(hosts) > 1:
        raise BadHead(400, "more than one Host header")
    if not hosts and version >= (1, 1):
        raise BadHead(400, "an HTTP/1.1 request without a Host header")
    host = hostName(hosts[0]) if hosts else None
    return Head(match.group(1), version, tuple(lines), host)


def checkBasicAuth(head: Head, expected: str) -> bool:
    """Whether C{head} carries HTTP basic credentials equal to C{expected} (USER:PASSWORD)."""
    for value in head.header(b"authorization"):
        scheme, _, credentials = value.partition(b" ")
        if scheme.lower() != b"basic":
            continue
        try:
            given = base64.b64decode(credentials.strip(), validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(given, expected.encode("utf-8"))
    return False


def errorPage(status: int, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A whole HTTP/1.1 answer for C{status}, closing the connection; no internal detail."""
    reason = REASONS[status]
    body = (f"<!DOCTYPE html>\n<html><head><title>{status} {reason}</title></head>"
            f"<body><h1>{status} {reason}</h1><p>{_PAGES[status]}</p></body></html>\n"
            ).encode("ascii")
    headers = [(b"Content-Type", b"text/html; charset=utf-8"),
               (b"Content-Length", str(len(body)).encode("ascii")),
               (b"Connection", b"close"), *extra]
    lines = [f"HTTP/1.1 {status} {reason}".encode("ascii")]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
