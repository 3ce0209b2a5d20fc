"""
Who may use the admin endpoint: a bearer token (server.admin_token), or a
session from POST /api/login with that token or with the configured user
and password.  Every comparison is in constant time; an address that keeps
presenting wrong credentials must wait longer and longer before any of its
credentials is looked at again; every table is bounded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import OrderedDict
from typing import Callable, Optional

from twisted.logger import Logger

log = Logger()

SESSION_LIFETIME = 12 * 3600.0
"""Seconds a session from POST /api/login is good for."""

MAX_SESSIONS = 1000
"""Sessions kept at once; a new one evicts the oldest."""

MAX_FAILING_ADDRESSES = 10000
"""Addresses whose failures are remembered; past it the table starts again."""

FAILURES_FORGOTTEN_AFTER = 600.0
"""Seconds without a failure after which an address starts with a clean slate."""

MAX_BACKOFF = 30.0
"""The longest an address is made to wait after failures in a row."""


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _digest(session: str) -> bytes:
    # Sessions are looked up by their digest: a dict's timing then tells
    # nothing about the session strings themselves.
    return hashlib.sha256(session.encode("utf-8")).digest()


class AdminAuth:
    """
    The admin endpoint's credentials, sessions and per-address back-off.

    @param counted: called once per failed attempt (for the metrics).
    """

    def __init__(self, token: str, user: str, password: str, clock,
                 counted: Callable[[], None] = lambda: None,
                 newSession: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> None:
        self.token = token
        self.user = user
        self.password = password
        self.clock = clock
        self.counted = counted
        self.newSession = newSession
        self.sessions: OrderedDict[bytes, float] = OrderedDict()
        self.failures: dict[str, tuple[int, float, float]] = {}
        """Address -> (failures in a row, time of the last, blocked until)."""

    @property
    def configured(self) -> bool:
        """Whether any credential can succeed."""
        return bool(self.token) or bool(self.user and self.password)

    def waitFor(self, host: str) -> float:
        """Seconds C{host} must still wait before its credentials are looked at."""
        entry = self.failures.get(host)
        if entry is None:
            return 0.0
        return max(entry[2] - self.clock.seconds(), 0.0)

    def failed(self, host: str) -> None:
        """C{host} presented wrong credentials: it waits longer before the next try."""
        self.counted()
        now = self.clock.seconds()
        count, last, _ = self.failures.get(host, (0, now, now))
        if now - last > FAILURES_FORGOTTEN_AFTER:
            count = 0
        count += 1
        if len(self.failures) >= MAX_FAILING_ADDRESSES and host not in self.failures:
            self.failures.clear()
        delay = 0.0 if count == 1 else min(0.25 * 2 ** (count - 2), MAX_BACKOFF)
        self.failures[host] = (count, now, now + delay)

    def succeeded(self, host: str) -> None:
        self.failures.pop(host, None)

    def bearerValid(self, credential: str) -> bool:
        """Whether C{credential} is the admin token or a live session."""
        if self.token and _same(credential, self.token):
            return True
        key = _digest(credential)
        expiry = self.sessions.get(key)
        if expiry is None:
            return False
        if expiry <= self.clock.seconds():
            del self.sessions[key]
            return False
        return True

    def login(self, body: dict) -> Optional[str]:
        """
        A new session for C{body} ({"token"} or {"user", "password"}) if
        its credentials are right; None if not.
        """
        ok = False
        token, user, password = body.get("token"), body.get("user"), body.get("password")
        if isinstance(token, str) and self.token:
            ok = _same(token, self.token)
        elif isinstance(user, str) and isinstance(password, str) and self.user and self.password:
            # Both compared, whatever the first says: the time tells nothing.
            ok = _same(user, self.user) & _same(password, self.password)
        if not ok:
            return None
        session = self.newSession()
        while len(self.sessions) >= MAX_SESSIONS:
            self.sessions.popitem(last=False)
        self.sessions[_digest(session)] = self.clock.seconds() + SESSION_LIFETIME
        return session


def bearerOf(request) -> Optional[str]:
    """The credential in C{request}'s C{Authorization: Bearer ...}, or None."""
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()


def jsonAnswer(request, code: int, body: dict) -> bytes:
    """Answer C{request} with C{code} and C{body} as JSON."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return json.dumps(body).encode("utf-8")


def clientHost(request) -> str:
    return getattr(request.getClientAddress(), "host", "?")


def tooManyFailures(request, wait: float) -> bytes:
    request.setHeader(b"retry-after", str(max(int(wait + 0.999), 1)).encode("ascii"))
    return jsonAnswer(request, 429, {"error": f"too many failed attempts; retry in {wait:.1f} s"})


def unauthorized(request) -> bytes:
    request.setHeader(b"www-authenticate", b"Bearer")
    return jsonAnswer(request, 401, {"error": "unauthorized"})


def refusal(auth: AdminAuth, request) -> Optional[bytes]:
    """
    None if C{request} carries a good bearer credential; else the answer
    that refuses it (401, or 429 while its address must wait).
    """
    credential = bearerOf(request)
    if credential is None or not auth.configured:
        return unauthorized(request)
    host = clientHost(request)
    wait = auth.waitFor(host)
    if wait > 0:
        return tooManyFailures(request, wait)
    if auth.bearerValid(credential):
        return None
    auth.failed(host)
    log.warn("admin endpoint: a wrong bearer credential from {host}", host=host)
    return unauthorized(request)
