"""
Why gotunnel does not forward with an eBPF sockmap: this measures what the
kernel holds when a sockmap hop feeds a slow reader.

One hop on 127.0.0.1: a sender's bytes reach a relay socket whose sk_skb
verdict program (on a SOCKHASH keyed by socket cookie) redirects them to
the send queue of a second socket, connected to a reader that takes
--rate MB/s.  No user-space process moves a byte.  The script prints how
much the sender got to send, how much the reader read, and how much memory
the kernel took meanwhile (MemAvailable, and TCP's own pages from
/proc/net/sockstat).  With flow control the sender would stop at what the
sockets' buffers hold (a few MiB); the redirect frees the relay socket's
receive buffer at once, so TCP's window never closes.

    sudo python3 bench/sockmapcheck.py --mib 256 --rate 20 --seconds 6

Needs Linux with CONFIG_BPF_STREAM_PARSER and CAP_BPF + CAP_NET_ADMIN (root).
A reference experiment, not part of gotunnel; it stops by itself after
--seconds, and every socket it made is closed when it exits.
"""

import argparse
import ctypes
import os
import platform
import socket
import struct
import threading
import time

HOST = "127.0.0.1"
BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD, BPF_PROG_ATTACH = 0, 2, 5, 8
BPF_MAP_TYPE_SOCKHASH = 18
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_VERDICT = 38
BPF_FUNC_GET_SOCKET_COOKIE = 46
BPF_FUNC_SK_REDIRECT_HASH = 72
SO_COOKIE = 57

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def bpf(command: int, attributes: bytes) -> int:
    buffer = ctypes.create_string_buffer(attributes, 128)
    result = libc.syscall(BPF_SYSCALL[platform.machine()], command, buffer, 128)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def instruction(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("=BBhi", code, (src << 4) | dst, off, imm)


def redirectProgram(mapFd: int) -> bytes:
    """return bpf_sk_redirect_hash(skb, map, &cookie(skb), 0) ?: SK_PASS"""
    return b"".join([
        instruction(0xbf, 6, 1),                                # r6 = ctx
        instruction(0x85, imm=BPF_FUNC_GET_SOCKET_COOKIE),      # r0 = cookie
        instruction(0x7b, 10, 0, -8),                           # *(u64 *)(fp - 8) = r0
        instruction(0xbf, 1, 6),                                # r1 = ctx
        instruction(0x18, 2, 1, 0, mapFd), instruction(0),      # r2 = map
        instruction(0xbf, 3, 10), instruction(0x07, 3, 0, 0, -8),  # r3 = fp - 8
        instruction(0xb7, 4, 0, 0, 0),                          # r4 = 0
        instruction(0x85, imm=BPF_FUNC_SK_REDIRECT_HASH),
        instruction(0x55, 0, 0, 1, 0),                          # if r0 != SK_DROP: exit
        instruction(0xb7, 0, 0, 0, 1),                          # r0 = SK_PASS
        instruction(0x95),
    ])


class SockHash:
    """A SOCKHASH whose sockets' bytes go to the socket stored under their own cookie."""

    def __init__(self, entries: int = 16) -> None:
        self.fd = bpf(BPF_MAP_CREATE, struct.pack("=IIIII", BPF_MAP_TYPE_SOCKHASH, 8, 4,
                                                  entries, 0))
        code = redirectProgram(self.fd)
        codeBuffer = ctypes.create_string_buffer(code, len(code))
        license = ctypes.create_string_buffer(b"GPL")
        program = bpf(BPF_PROG_LOAD, struct.pack(
            "=IIQQIIQII16sII", BPF_PROG_TYPE_SK_SKB, len(code) // 8,
            ctypes.addressof(codeBuffer), ctypes.addressof(license), 0, 0, 0, 0, 0,
            b"sockmapcheck", 0, BPF_SK_SKB_VERDICT))
        bpf(BPF_PROG_ATTACH, struct.pack("=IIII", self.fd, program, BPF_SK_SKB_VERDICT, 0))

    def pair(self, a: socket.socket, b: socket.socket) -> None:
        for source, sink in ((a, b), (b, a)):
            key = ctypes.create_string_buffer(source.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))
            value = ctypes.create_string_buffer(struct.pack("=I", sink.fileno()))
            bpf(BPF_MAP_UPDATE_ELEM, struct.pack("=IIQQQ", self.fd, 0, ctypes.addressof(key),
                                                 ctypes.addressof(value), 0))


def memAvailableKiB() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))


def tcpPages() -> int:
    with open("/proc/net/sockstat") as f:
        fields = next(line for line in f if line.startswith("TCP:")).split()
    return int(fields[fields.index("mem") + 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB the sender offers")
    parser.add_argument("--rate", type=float, default=20.0, help="MB/s the reader takes")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long the reader reads")
    args = parser.parse_args()

    sockhash = SockHash()
    readerListener = socket.create_server((HOST, 0))
    relayListener = socket.create_server((HOST, 0))
    sender = socket.create_connection(relayListener.getsockname())
    relayIn, _ = relayListener.accept()
    relayOut = socket.create_connection(readerListener.getsockname())
    reader, _ = readerListener.accept()
    sockhash.pair(relayIn, relayOut)

    memBefore, pagesBefore = memAvailableKiB(), tcpPages()
    total, sent = args.mib << 20, [0]
    chunk = os.urandom(1 << 16)

    def send() -> None:
        try:
            while sent[0] < total:
                sent[0] += sender.send(chunk[:total - sent[0]])
        except OSError:
            pass

    threading.Thread(target=send, daemon=True).start()
    read, start = 0, time.monotonic()
    while time.monotonic() - start < args.seconds:
        read += len(reader.recv(65536))
        # Pace the reader: never ahead of --rate.
        ahead = read / (args.rate * 1e6) - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    held = memBefore - memAvailableKiB()
    pages = tcpPages() - pagesBefore
    print(f"in {args.seconds:g} s the sender sent {sent[0] / 2**20:.0f} MiB and the reader "
          f"read {read / 2**20:.0f} MiB at {read / 1e6 / args.seconds:.1f} MB/s; the kernel "
          f"took {held:,} KiB (MemAvailable), {pages:,} pages of TCP memory (sockstat)")
    for each in (sender, relayIn, relayOut, reader, relayListener, readerListener):
        each.close()


if __name__ == "__main__":
    main()
