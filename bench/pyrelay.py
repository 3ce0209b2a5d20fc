"""
The floor for a relay written in Python: a bare epoll loop that moves each
connection's bytes with os.splice, nothing else (no framing, no Twisted).
Two of them in a row are what a tunnel's two hops cost at the least, with
the same syscalls per event as gotunnel's zero-copy path.

    python bench/pyrelay.py LISTEN_PORT TARGET_PORT

listens on 127.0.0.1:LISTEN_PORT and relays every connection to
127.0.0.1:TARGET_PORT.  As tunnelbench's "project", two hops:

    python3 ../shared/bench/tunnelbench.py --profiles direct,socat,project \\
        --workloads latency \\
        --project-server-cmd "python3 bench/pyrelay.py {ctrl} {target}" \\
        --project-client-cmd "python3 bench/pyrelay.py {public} {ctrl}"

A benchmark reference only: it blocks on connect and on a full socket,
ignores half-close, and exits after an hour.
"""

import os
import select
import signal
import socket
import sys

HOST = "127.0.0.1"
LIFETIME = 3600
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def connected(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def main(listenPort: int, targetPort: int) -> None:
    signal.alarm(LIFETIME)
    listener = socket.create_server((HOST, listenPort), backlog=4096, reuse_port=False)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    # fd -> (its socket, the other side's fd, the pipe from it to the other side)
    relays = {}

    def close(fd: int) -> None:
        for end in (fd, relays[fd][1]):
            sock, _, pipe = relays.pop(end)
            poller.unregister(end)
            sock.close()
            os.close(pipe[0])
            os.close(pipe[1])

    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                try:
                    user, _ = listener.accept()
                except BlockingIOError:
                    continue
                target = socket.create_connection((HOST, targetPort))
                user, target = connected(user), connected(target)
                for a, b in ((user, target), (target, user)):
                    relays[a.fileno()] = (a, b.fileno(), os.pipe2(os.O_NONBLOCK))
                    poller.register(a.fileno(), select.EPOLLIN)
                continue
            if fd not in relays:
                continue
            _, sink, (readEnd, writeEnd) = relays[fd]
            try:
                n = os.splice(fd, writeEnd, 1 << 20, flags=FLAGS)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if not n:
                close(fd)
                continue
            while n:
                try:
                    n -= os.splice(readEnd, sink, n, flags=FLAGS)
                except BlockingIOError:
                    select.select([], [sink], [], 10)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
