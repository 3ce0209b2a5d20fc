"""
One thread per process that runs the splices of steady pumps, off the reactor.

A round trip through the tunnel takes four turns of a reactor: two in the
server, two in the client.  Each turn of Twisted's reactor costs about 11 us
of Python around the epoll_wait (a bare epoll loop: 4.6 us), and that, not
the splices, is what keeps the tunnel's round trip at twice socat's.  So a
L{SplicePump} whose connections are both in their steady state (open both
ways, nothing in Twisted's own buffers) is handed to a L{SpliceThread},
which waits on an epoll of its own and runs nothing but the splices.

The thread moves bytes and nothing else.  Whatever else it meets (end of
stream, an error, a hang-up, a broken socket) hands the pump back to the
reactor, where the pump's ordinary C{doRead} and C{doWrite} meet it again
and close or half-close as they always do.  Whatever the relay does to
either connection (write, close, abort, half-close) it does through its
relay end, which takes the pump back first (see L{SplicePump.handBack}),
under the pump's lock: the thread never touches a descriptor that the
reactor is about to close.

Between events the thread may poll for a moment before it sleeps
(L{BusyPoll}), where a socket is expected to answer that soon
(L{pollBudget}): on a virtual machine, waking a sleeping thread costs about
as much as a hop's splices, and a round trip through the tunnel pays for
six such wake-ups (socat's pays for four).
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from typing import Callable, Optional

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="gotunnel.splicethread")

READABLE = select.EPOLLIN
WRITABLE = select.EPOLLOUT
HUNG_UP = select.EPOLLERR | select.EPOLLHUP


class BusyPoll:
    """
    How the splice thread waits for its next events: polling for up to a
    budget before it sleeps.  Events that come while it polls cost no
    wake-up; a budget that runs out costs that much CPU, so the thread asks
    for one only where an answer is expected that soon (L{pollBudget}).
    Between two polls it yields its CPU, so that polling takes no time from
    other work: only time that would be idle.

    @ivar wokeAt: when the last events were found.
    @ivar caught: how many times events came while the thread polled.
    """

    wokeAt = 0.0
    caught = 0

    def __init__(self, poll: Callable[..., list],
                 clock: Callable[[], float] = time.monotonic,
                 yieldCPU: Callable[[], None] = os.sched_yield) -> None:
        self.poll = poll
        self.clock = clock
        self.yieldCPU = yieldCPU

    def wait(self, budget: float) -> list:
        """The next events: polled for up to C{budget} seconds, then slept for."""
        clock, poll = self.clock, self.poll
        ready = None
        if budget:
            until = clock() + budget
            ready = poll(0)
            while not ready and clock() < until:
                self.yieldCPU()
                ready = poll(0)
            if ready:
                self.caught += 1
        if not ready:
            ready = poll()
        self.wokeAt = clock()
        return ready


def pollBudget(side, now: float) -> float:
    """
    C{side}'s socket was found readable at C{now}, and its bytes go on to
    the other socket of its pump: the seconds to poll for that socket's
    answer.  That is the pump's C{busyPoll} if the other socket answered
    its last bytes within it, else 0.

    The answer to one socket's bytes comes from the other: a request, then
    its reply; an echo; a protocol's acknowledgement.  Each socket's last
    answer time is kept apart, because the two differ: a local service
    answers the client in microseconds, while the user's next request may
    come a network round trip or a person's keystroke later.  Idle
    connections, one-way streams and the server's side of a tunnel across
    the internet answer slower than any budget, and cost no polling.
    """
    if side.writtenAt:
        side.answerGap = now - side.writtenAt
        side.writtenAt = 0.0
    other = side.outgoing.sink
    other.writtenAt = now
    budget = side.pump.busyPoll
    return budget if other.answerGap <= budget else 0.0


def available() -> bool:
    """Whether this platform can run a L{SpliceThread}."""
    return hasattr(os, "splice") and hasattr(select, "epoll")


class SpliceThread:
    """
    A daemon thread and its epoll, moving the bytes of the pumps it holds.

    An exception anywhere in the thread ends it, but never with a pump in
    its hands: every pump goes back to the reactor (whose own C{doRead} and
    C{doWrite} carry on), the failure is logged there, and
    L{SpliceThreadService} starts a new thread for the pumps to come.

    @ivar sides: the L{Side} each descriptor the thread watches belongs to.
    @ivar waiting: how the thread waits for its events.
    """

    def __init__(self, reactor,
                 makeWaiting: Callable[[Callable[..., list]], BusyPoll] = BusyPoll) -> None:
        """
        @param makeWaiting: makes L{waiting} from the epoll's C{poll} (a
            test gives one that fails when told to).
        """
        self.reactor = reactor
        self.epoll = select.epoll()
        self.waiting = makeWaiting(self.epoll.poll)
        self.sides: dict[int, object] = {}
        # Held to register descriptors and to close: nothing is adopted by a
        # thread that has closed its epoll, or is handing its pumps back.
        self._lock = threading.Lock()
        self._closed = False
        self._stopRead, self._stopWrite = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.epoll.register(self._stopRead, READABLE)
        self._trigger = reactor.addSystemEventTrigger("after", "shutdown", self.stop)
        self.thread = threading.Thread(target=self._run, name="gotunnel-splice", daemon=True)
        self.thread.start()

    def adopt(self, pump) -> None:
        """
        Watch C{pump}'s descriptors (its lock held by the caller).

        @raise OSError: the kernel refuses a watch, or the thread has ended.
        """
        for side in pump.sides.values():
            self.watch(side)

    def watch(self, side) -> None:
        """
        Watch one more descriptor of a pump the thread holds (its lock held
        by the caller): a pump whose sockets come and go (a UDP mapping's
        sessions, L{gotunnel.udp.threadpump}).

        @raise OSError: the kernel refuses the watch, or the thread has ended.
        """
        with self._lock:
            if self._closed:
                raise OSError(errno.ESRCH, "the splice thread has ended")
            side.mask = side.wantedEvents()
            self.sides[side.fd] = side
            self.epoll.register(side.fd, side.mask)

    def rewatch(self, side) -> None:
        """
        Watch a descriptor the thread holds for the events it wants now
        (its pump's lock held by the caller): for a pump whose wants change
        outside the thread's own steps.
        """
        wanted = side.wantedEvents()
        if wanted != side.mask:
            side.mask = wanted
            try:
                self.epoll.modify(side.fd, wanted)
            except (OSError, ValueError):
                # The thread has ended, or is about to hand the pump back.
                pass

    def release(self, pump) -> None:
        """
        Watch C{pump}'s descriptors no more (its lock held by the caller);
        once the thread has closed its epoll, there is nothing to undo.
        """
        for side in pump.sides.values():
            self.unwatch(side)

    def unwatch(self, side) -> None:
        """Watch one descriptor no more (its pump's lock held by the caller)."""
        if self.sides.get(side.fd) is side:
            del self.sides[side.fd]
        try:
            self.epoll.unregister(side.fd)
        except (OSError, ValueError):
            # ValueError: the epoll is closed (the thread has ended).
            pass

    def stop(self) -> None:
        """Let the thread end (the reactor has stopped: nobody hands it pumps)."""
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._stopWrite, b"x")
            except OSError:
                pass

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            self._abandon(Failure())
        else:
            self._close()

    def _loop(self) -> None:
        waiting = self.waiting
        sides = self.sides
        stopRead = self._stopRead
        budget = 0.0
        while True:
            ready = waiting.wait(budget)
            now = waiting.wokeAt
            budget = 0.0
            for fd, events in ready:
                side = sides.get(fd)
                if side is not None:
                    expected = self._step(side, events, now)
                    if expected > budget:
                        budget = expected
                elif fd == stopRead:
                    return

    def _step(self, side, events: int, now: float) -> float:
        """
        Move C{side}'s bytes for C{events}; the seconds to poll for the
        answer.  Anything else, a failure included, hands its pump back.
        """
        pump = side.pump
        budget = 0.0
        with pump.lock:
            # An event polled before the reactor took the pump back, or
            # for a descriptor number the reactor has since reused.
            if not pump.inThread:
                return budget
            try:
                # Answer times are kept only for pumps that poll.
                if events & READABLE and pump.busyPoll:
                    budget = pollBudget(side, now)
                if side.moveInThread(events):
                    if pump.eventsChanged:
                        pump.eventsChanged = False
                        for each in pump.sides.values():
                            wanted = each.wantedEvents()
                            if wanted != each.mask:
                                each.mask = wanted
                                self.epoll.modify(each.fd, wanted)
                    return budget
                failure: Optional[Failure] = None
            except Exception:
                failure = Failure()
            pump.leaveThread()
        if failure is not None:
            self.reactor.callFromThread(
                log.failure, "the splice thread failed on a connection; "
                "the reactor relays it from here", failure)
        self.reactor.callFromThread(pump.reclaim)
        return 0.0

    def _abandon(self, failure: Failure) -> None:
        """
        The thread failed outside any one pump's step: hand every pump back
        to the reactor, say so there, and end.
        """
        with self._lock:
            self._closed = True
            pumps = {side.pump for side in list(self.sides.values())}
        for pump in pumps:
            with pump.lock:
                pump.leaveThread()
            self.reactor.callFromThread(pump.reclaim)
        self.reactor.callFromThread(
            log.failure, "the splice thread failed; the reactor relays its {count} "
            "connections from here", failure, count=len(pumps))
        self._close()
        # Not after a stop: that comes from the trigger, at shutdown.
        self.reactor.callFromThread(self._forgetTrigger)

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            self.epoll.close()
            os.close(self._stopRead)
            os.close(self._stopWrite)

    def _forgetTrigger(self) -> None:
        trigger, self._trigger = self._trigger, None
        if trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(trigger)
            except (KeyError, ValueError):
                # It has fired: the reactor is shutting down.
                pass


JOIN_TIMEOUT = 5.0
"""Seconds L{SpliceThreadService.stopService} waits for the thread to end:
once told to stop, it ends within one wait of its epoll."""


class SpliceThreadService(Service):
    """
    The splice thread of a server or a client, as a child of its
    MultiService: started at the first hand-off, started again after a
    failure ended it (for the pumps to come), and ended, its thread joined,
    on L{stopService}.
    """

    _thread: Optional[SpliceThread] = None

    def __init__(self, reactor,
                 makeThread: Callable[[object], SpliceThread] = SpliceThread) -> None:
        self.reactor = reactor
        self.makeThread = makeThread
        self._lock = threading.Lock()

    def thread(self) -> SpliceThread:
        """The running splice thread, started if there is none."""
        with self._lock:
            if self._thread is None or not self._thread.thread.is_alive():
                self._thread = self.makeThread(self.reactor)
            return self._thread

    def stopService(self) -> None:
        super().stopService()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop()
            thread.thread.join(JOIN_TIMEOUT)
            thread._forgetTrigger()
