"""
C{gotunnel status}: what a running server holds, read from its admin
endpoint (GET /api/overview) and printed as tables a person reads at a
glance, or as JSON for scripts (--json).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence, TextIO

from twisted.internet import defer, ssl, task
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.python import usage
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

TOKEN_VARIABLE = "GOTUNNEL_ADMIN_TOKEN"
DEFAULT_ADMIN = "http://127.0.0.1:7400"
TIMEOUT = 10.0


class StatusOptions(usage.Options):
    synopsis = "Usage: gotunnel status [--admin URL] [--admin-token TOKEN] [--json]"
    longdesc = ("Show the clients, published ports and live connections of a running "
                "gotunnel server, read from its admin endpoint (the server's --admin).")
    optParameters = [
        ["admin", "a", DEFAULT_ADMIN, "The admin endpoint's URL (http:// or https://)."],
        ["admin-token", "t", None,
         f"The admin endpoint's bearer token (default: the environment variable "
         f"{TOKEN_VARIABLE})."],
        ["ca", None, None, "With https://: trust the CA certificate in this PEM file "
                           "(default: the system's trusted CAs)."],
    ]
    optFlags = [["json", "j", "Print the server's answer as JSON, for scripts."]]

    def postOptions(self) -> None:
        if not self["admin"].startswith(("http://", "https://")):
            raise usage.UsageError(f"--admin must be an http:// or https:// URL, "
                                   f"got {self['admin']!r}")
        if self["admin-token"] is None:
            self["admin-token"] = os.environ.get(TOKEN_VARIABLE, "")


class StatusError(Exception):
    """Why the status could not be read: one sentence for a person."""


def humanBytes(count: int) -> str:
    """C{count} bytes in the largest binary unit that keeps it at 1 or more: 4.1 KiB."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def humanSeconds(seconds: float) -> str:
    """A duration as a person says it: 12s, 3m 04s, 2h 03m, 4d 01h."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def table(headings: Sequence[str], rows: list[Sequence[str]], right: set[int]) -> str:
    """Columns as wide as their widest cell; the columns in C{right} aligned right."""
    if not rows:
        return "  (none)"
    widths = [max(len(str(cell)) for cell in column) for column in zip(headings, *rows)]

    def line(cells) -> str:
        return "  " + "  ".join(
            (str(cell).rjust(width) if i in right else str(cell).ljust(width))
            for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headings)] + [line(row) for row in rows])


def portOf(entry: dict) -> str:
    """A port, mapping or connection's public side: its port, or a virtual host's domains."""
    if entry.get("vhost"):
        return f"{entry['vhost']}://{','.join(entry['domains'])}"
    return str(entry["remote_port"])


def render(overview: dict) -> str:
    """The tables of C{overview} (GET /api/overview)."""
    now = overview["time"]
    clients = overview["clients"]
    ports = overview["ports"]
    connections = overview["connections"]
    out = [f"CLIENTS ({len(clients)})", table(
        ["ID", "NAME", "ADDRESS", "IDENTITY", "CONNECTED", "HEARTBEAT", "MAPPINGS"],
        [[c["id"], c["name"], c["address"], c["identity"],
          humanSeconds(now - c["connected_since"]),
          humanSeconds(now - c["last_heartbeat"]) + " ago",
          ", ".join(f"{portOf(m)}->{m['local_port']}" for m in c["mappings"])]
         for c in clients], set()), ""]
    out += [f"PORTS ({len(ports)})", table(
        ["PORT", "CLIENT", "LOCAL", "STATE", "USERS", "TOTAL", "IN", "OUT", "POOL"],
        [[portOf(p), p["client"] or "-",
          p["local_port"] if p["local_port"] is not None else "-", p["state"],
          p["users_now"], p["users_total"], humanBytes(p["bytes_in"]),
          humanBytes(p["bytes_out"]), p["pool"]] for p in ports],
        {0, 2, 4, 5, 6, 7, 8}), ""]
    out += [f"CONNECTIONS ({len(connections)})", table(
        ["ID", "PORT", "CLIENT", "USER", "IN", "OUT", "AGE"],
        [[c["id"], portOf(c), c["client"], c["user"], humanBytes(c["bytes_in"]),
          humanBytes(c["bytes_out"]), humanSeconds(c["age"])] for c in connections],
        {1, 4, 5, 6})]
    return "\n".join(out) + "\n"


@implementer(IPolicyForHTTPS)
class TrustOneCA:
    """Verify the admin endpoint's certificate against one CA, and its name."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self.ca = ssl.Certificate.loadPEM(f.read())

    def creatorForNetloc(self, hostname: bytes, port: int):
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self.ca)


@defer.inlineCallbacks
def fetchOverview(reactor, url: str, token: str, ca: Optional[str] = None):
    """GET /api/overview of the admin endpoint at C{url}; L{StatusError} saying why not."""
    policy = TrustOneCA(ca) if ca else BrowserLikePolicyForHTTPS()
    agent = Agent(reactor, contextFactory=policy, connectTimeout=TIMEOUT)
    headers = Headers({b"accept": [b"application/json"]})
    if token:
        headers.addRawHeader(b"authorization", f"Bearer {token}".encode("utf-8"))
    address = url.rstrip("/") + "/api/overview"
    try:
        response = yield agent.request(b"GET", address.encode("utf-8"), headers)
        body = yield readBody(response)
    except (ConnectError, DNSLookupError) as e:
        raise StatusError(f"cannot reach the admin endpoint at {url}: {e}") from None
    except Exception as e:
        raise StatusError(f"cannot read the admin endpoint at {url}: {e}") from None
    if response.code == 401:
        raise StatusError(f"the admin endpoint at {url} refused the token: give --admin-token "
                          f"or set {TOKEN_VARIABLE}")
    if response.code != 200:
        raise StatusError(f"the admin endpoint at {url} answered HTTP {response.code}: "
                          f"{body[:200].decode('utf-8', 'replace')}")
    try:
        return json.loads(body)
    except ValueError:
        raise StatusError(f"{url} did not answer JSON: is it a gotunnel admin endpoint?") \
            from None


def main(argv: Sequence[str], stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
         prog: str = "gotunnel status") -> int:
    """Parse C{argv}, read the status and print it; the exit status."""
    options = StatusOptions()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        stderr.write(f"{prog}: error: {e}\n{prog}: try '{prog} --help'\n")
        return 2
    outcome: dict = {}

    @defer.inlineCallbacks
    def run(reactor):
        try:
            outcome["overview"] = yield fetchOverview(reactor, options["admin"],
                                                      options["admin-token"], options["ca"])
        except StatusError as e:
            outcome["error"] = str(e)

    try:
        task.react(run)
    except SystemExit as e:
        if e.code:
            stderr.write(f"{prog}: error: could not run\n")
            return 1
    if "error" in outcome:
        stderr.write(f"{prog}: error: {outcome['error']}\n")
        return 1
    if options["json"]:
        stdout.write(json.dumps(outcome["overview"], indent=2) + "\n")
    else:
        stdout.write(render(outcome["overview"]))
    return 0
