"""
Groups: several clients serving one public port.  Clients that register the
same port with the same C{group} name and C{group_key} (extension fields of
C{register}) share its listener; each user goes to the next member, in
turn, whose local service is up.  The port stays open while any member is
connected.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from gotunnel.server.mapping import PublishedMapping


class Group:
    """The members of one public port's group, by client name, in the order they joined."""

    def __init__(self, remote_port: int, name: str, key: str) -> None:
        self.remote_port = remote_port
        self.name = name
        self._key = key
        self.members: dict[str, "PublishedMapping"] = {}
        self._turn = 0

    def __repr__(self) -> str:
        return f"<Group {self.name!r} :{self.remote_port} {list(self.members)}>"

    def admits(self, name: str, key: str) -> bool:
        """Whether a register with group C{name} and C{key} may join."""
        return name == self.name and hmac.compare_digest(key.encode("utf-8"),
                                                         self._key.encode("utf-8"))

    def add(self, tunnel: "PublishedMapping") -> None:
        self.members[tunnel.name] = tunnel
        tunnel.group = self

    def remove(self, tunnel: "PublishedMapping") -> None:
        if self.members.get(tunnel.name) is tunnel:
            del self.members[tunnel.name]

    def pick(self) -> Optional["PublishedMapping"]:
        """The next member whose local service is up (round robin), or None."""
        members = [member for member in self.members.values() if member.serviceUp]
        if not members:
            return None
        self._turn = (self._turn + 1) % len(members)
        return members[self._turn]
