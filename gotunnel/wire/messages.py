"""
The messages of the gotunnel wire protocol (see docs/protocol.md).

Each message is a frozen dataclass whose fields are named exactly as on the
wire.  L{parse} turns one frame body into a message, or raises
L{ProtocolError} with a sentence saying what was wrong; L{encode} turns a
message into a frame body with the fields in the order the Go implementation
writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field as _field, fields
from typing import ClassVar, Optional, Union

MAX_STRING = 1024
"""The longest string field we accept: names and tokens are short."""


class ProtocolError(Exception):
    """
    A frame broke the protocol.  The message says how, for a log line.
    """


@dataclass(frozen=True)
class Register:
    """client -> server, first frame of a control channel."""

    type: ClassVar[str] = "register"
    local_port: int = 0
    remote_port: int = 0
    protocol: str = "tcp"
    token: str = _field(default="", repr=False)
    name: str = ""
    allow_sources: Optional[tuple[str, ...]] = None
    """ext: the only networks the client wants users to come from (CIDRs);
    the server's own lists still apply: a client can only narrow them."""
    deny_sources: Optional[tuple[str, ...]] = None
    """ext: networks the client wants users refused from."""
    max_users: Optional[int] = None
    """ext: users at once the client wants on its port (the stricter of
    this and the server's limit applies)."""
    max_connection_rate: Optional[float] = None
    """ext: new connections a second per source address the client wants."""
    bandwidth_limit: Optional[int] = None
    """ext: bytes a second each way the client wants its mapping capped at."""
    group: Optional[str] = None
    """ext: serve C{remote_port} together with the other clients that name
    this group (and its key), see L{gotunnel.server.groups}."""
    group_key: Optional[str] = _field(default=None, repr=False)
    """ext: the group's secret, the same for all its members."""
    vhost: Optional[str] = None
    """ext: "http" or "https": publish on the server's virtual-host port,
    routed by C{domains} and C{subdomain}, not on C{remote_port} (sent as 0)."""
    domains: Optional[tuple[str, ...]] = None
    """ext, with C{vhost}: the host names (C{*.example.com} too) routed here."""
    subdomain: Optional[str] = None
    """ext, with C{vhost}: the name routed here under the server's subdomain_host."""
    http_auth: Optional[str] = _field(default=None, repr=False)
    """ext, with C{vhost} "http": USER:PASSWORD the server asks users for."""
    host_header_rewrite: Optional[str] = None
    """ext, with C{vhost} "http": the Host the service is sent instead of the user's."""
    mux: Optional[int] = None
    """ext: 1 offers to carry users as streams of one data connection (L{gotunnel.mux.session})."""


@dataclass(frozen=True)
class RegisterResp:
    """server -> client: the answer to C{register} and to C{data_channel}."""

    type: ClassVar[str] = "register_resp"
    status: str = "ok"
    reason: str = ""
    pool: Optional[int] = None
    """ext, in the answer to C{register}: how many pooled data channels the
    server keeps for the mapping (see L{DataChannel.pooled})."""
    user_host: Optional[str] = None
    """ext, in the answer to a data channel that asked for them
    (L{DataChannel.addresses}): the user's address, for the PROXY protocol
    header (see L{gotunnel.wire.proxyprotocol})."""
    user_port: Optional[int] = None
    public_host: Optional[str] = None
    """ext, with C{user_host}: the server's address the user connected to."""
    public_port: Optional[int] = None
    remote_port: Optional[int] = None
    """ext, in the answer to a C{register} for C{remote_port} 0: the port
    the server chose."""
    vhost: Optional[str] = None
    """ext, in the answer to a C{register} with C{vhost}: the same value, to say
    that this server routes it (a Go server answers a plain ok)."""
    protocol: Optional[str] = None
    """ext, in the answer to a C{register} of protocol "udp": "udp" when the
    server publishes it as UDP (see L{gotunnel.udp.tunnels}); a Go server sends none."""
    conn_id: Optional[str] = None
    """ext, with C{protocol} "udp": the secret the mapping's carrying channel
    must show in its C{data_channel}."""
    mux: Optional[int] = None
    """ext, in the answer to a C{register} offering C{mux}: 1 if the server agrees."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Ping:
    """client -> server heartbeat."""

    type: ClassVar[str] = "ping"
    time: int = 0


@dataclass(frozen=True)
class Pong:
    """server -> client: the answer to C{ping}."""

    type: ClassVar[str] = "pong"
    time: int = 0


@dataclass(frozen=True)
class OpenDataChannel:
    """
    server -> client: a user is waiting.  Go sends the whole C{register}
    struct; C{conn_id} is our extension.
    """

    type: ClassVar[str] = "open_data_channel"
    local_port: int = 0
    remote_port: int = 0
    protocol: str = ""
    token: str = _field(default="", repr=False)
    name: str = ""
    conn_id: Optional[str] = None


@dataclass(frozen=True)
class DataChannel:
    """client -> server, first frame of a data channel."""

    type: ClassVar[str] = "data_channel"
    local_port: int = 0
    remote_port: int = 0
    protocol: str = ""
    token: str = _field(default="", repr=False)
    name: str = ""
    conn_id: Optional[str] = None
    pooled: Optional[bool] = None
    """ext: opened ahead of any user, to wait at the server for the next one;
    the server's C{register_resp} comes when it hands the channel a user."""
    addresses: Optional[bool] = None
    """ext: tell me the user's and the public address in your answer (see
    L{RegisterResp.user_host}), for a PROXY protocol header."""
    vhost: Optional[str] = None
    """ext, with C{pooled}: the mapping is this virtual host (as in C{register})."""
    domains: Optional[tuple[str, ...]] = None
    subdomain: Optional[str] = None
    mux: Optional[int] = None
    """ext: 1 makes this the mapping's multiplexed data connection (L{gotunnel.mux.session})."""


@dataclass(frozen=True)
class OfflinePort:
    """client -> server: the local service is down."""

    type: ClassVar[str] = "offline_port"
    port: int = 0


@dataclass(frozen=True)
class OnlinePort:
    """client -> server: the local service is back."""

    type: ClassVar[str] = "online_port"
    port: int = 0


Message = Union[
    Register, RegisterResp, Ping, Pong, OpenDataChannel, DataChannel,
    OfflinePort, OnlinePort,
]

MESSAGE_TYPES: dict[str, type] = {
    cls.type: cls
    for cls in (
        Register, RegisterResp, Ping, Pong, OpenDataChannel, DataChannel,
        OfflinePort, OnlinePort,
    )
}

_PORT_FIELDS = frozenset({"local_port", "remote_port", "port", "user_port", "public_port"})

_EXTENSION_TYPES: dict[str, type] = {
    "conn_id": str, "pool": int, "pooled": bool, "user_host": str, "user_port": int,
    "public_host": str, "public_port": int, "addresses": bool,
    "allow_sources": tuple, "deny_sources": tuple, "max_users": int,
    "max_connection_rate": float, "register_resp.remote_port": int, "bandwidth_limit": int,
    "group": str, "group_key": str,
    "vhost": str, "domains": tuple, "subdomain": str, "http_auth": str,
    "host_header_rewrite": str, "register_resp.protocol": str, "mux": int,
}
"""Our optional fields, absent (or null) from a Go peer's frames (by name, or
by type.name where the name is a Go field in other messages).  Only a field
that defaults to None is looked up here: a Go field never is an extension."""

MAX_DOMAINS = 64
"""The most C{register.domains} we accept."""

MAX_POOL = 1024
"""The largest C{register_resp.pool} we accept."""

MAX_LIST = 1024
"""The most items of a list field we accept (C{register.allow_sources})."""


def _jsonType(value: object) -> str:
    # Errors name the type, never the value: the value may be a token.
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _checkField(typeName: str, name: str, expected: type, value: object) -> None:
    # bool is a subclass of int in Python but not a number in JSON.
    if expected is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{typeName}.{name} must be an integer, got a {_jsonType(value)}")
        if name in _PORT_FIELDS and not 0 <= value <= 65535:
            raise ProtocolError(f"{typeName}.{name} must be a port from 0 to 65535, got {value}")
        if name == "time" and not -(2**63) <= value < 2**63:
            raise ProtocolError(f"{typeName}.time is out of range")
        if name == "mux" and value not in (0, 1):
            raise ProtocolError(f"{typeName}.mux must be 0 or 1, got {value}")
        if name == "bandwidth_limit" and not 0 <= value <= 2**53:
            raise ProtocolError(f"{typeName}.bandwidth_limit must be from 0 to {2**53}")
        if name == "max_users" and not 0 <= value <= 2**31:
            raise ProtocolError(f"{typeName}.max_users must be from 0 to {2**31}")
        if name == "pool" and not 0 <= value <= MAX_POOL:
            raise ProtocolError(f"{typeName}.pool must be from 0 to {MAX_POOL}, got {value}")
    elif expected is tuple:
        if not isinstance(value, list):
            raise ProtocolError(f"{typeName}.{name} must be an array, got a {_jsonType(value)}")
        most = MAX_DOMAINS if name == "domains" else MAX_LIST
        if len(value) > most:
            raise ProtocolError(f"{typeName}.{name} has more than {most} items")
        for item in value:
            _checkField(typeName, name, str, item)
    elif expected is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{typeName}.{name} must be true or false, got a {_jsonType(value)}")
    elif expected is float:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not 0 <= value <= 1e6):
            raise ProtocolError(f"{typeName}.{name} must be a number from 0 to 1000000")
    elif expected is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{typeName}.{name} must be a string, got a {_jsonType(value)}")
        if len(value) > MAX_STRING:
            raise ProtocolError(f"{typeName}.{name} is longer than {MAX_STRING} characters")


def parse(body: bytes) -> Optional[Message]:
    """
    Decode one frame body.

    @return: the message, or L{None} for a well-formed object of a type we do
        not know (a newer peer's message, ignored for forward compatibility).
    @raise ProtocolError: the body is not a JSON object, has no string
        C{type}, or a known field has the wrong type or range.
    """
    if not body:
        raise ProtocolError("frame is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("frame is not UTF-8") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("frame is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame is a JSON {type(obj).__name__}, not an object")
    typeName = obj.get("type")
    if typeName is None:
        raise ProtocolError("frame has no type")
    if not isinstance(typeName, str):
        raise ProtocolError("frame type is not a string")
    cls = MESSAGE_TYPES.get(typeName)
    if cls is None:
        return None
    values = {}
    for field in fields(cls):
        if field.name not in obj:
            continue
        value = obj[field.name]
        # Our extensions, and only they, default to None (absent).
        expected = (_EXTENSION_TYPES.get(f"{typeName}.{field.name}",
                                         _EXTENSION_TYPES.get(field.name))
                    if field.default is None else None)
        if expected is not None and value is None:
            continue
        if expected is None:
            expected = {"int": int, "str": str}[field.type]
        _checkField(typeName, field.name, expected, value)
        values[field.name] = tuple(value) if expected is tuple else value
    return cls(**values)


def encode(message: Message) -> bytes:
    """
    Encode a message as Go does: C{type} first, then every field in
    declaration order, no spaces.  Optional extensions are left out when
    unset, and C{register_resp.reason} when empty, as Go's omitempty does.
    """
    obj: dict[str, object] = {"type": message.type}
    for field in fields(message):
        value = getattr(message, field.name)
        if value is None or (field.name == "reason" and not value):
            continue
        obj[field.name] = value
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
