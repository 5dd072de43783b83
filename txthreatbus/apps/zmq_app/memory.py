"""
The zmq-app's sockets in memory, for tests of the whole plugin on a
``Clock``: ``MemorySockets`` provides ``IServerSockets`` as ZeroMQ would
behave, without threads or the network.

- ``MemoryXPub`` is the PUB endpoint as an XPUB with ``XPUB_MANUAL`` and
  ``XPUB_NODROP``: its peers (``connect()``) are app SUB sockets with a
  high-water mark; a subscription takes effect only where the bus says so,
  a frame goes to every peer with a matching subscription, and a full
  matching peer makes the socket refuse the frame.
- ``MemoryReceiver`` is the SUB endpoint: ``deliver(frame)`` is an app
  publishing.
- ``MemoryRouter`` is the management endpoint: ``request(value, peer)``
  is an app's request, answered with the decoded reply.
"""

from __future__ import annotations

import json
from collections import deque

from twisted.internet.defer import succeed
from zope.interface import implementer

from txthreatbus.interfaces import IConnection, IPublisherSocket, IServerSockets


class _Closable:
    closed = False

    def shutdown(self) -> None:
        self.closed = True


class MemorySub:
    """An app's SUB socket connected to a ``MemoryXPub``."""

    def __init__(self, xpub: "MemoryXPub", hwm: int):
        self._xpub = xpub
        self.hwm = hwm
        self.requested = set()  # what this socket asked for (a SUB asks once each)
        self.applied = set()  # what the XPUB applied of it
        self.queue = deque()

    def subscribe(self, topic: bytes) -> None:
        if topic not in self.requested:
            self.requested.add(topic)
            if self._xpub.notify(True, topic):
                self.applied.add(topic)

    def unsubscribe(self, topic: bytes) -> None:
        if topic in self.requested:
            self.requested.discard(topic)
            self._xpub.notify(False, topic)
            self.applied.discard(topic)

    def disconnect(self) -> None:
        """The connection closes: ZeroMQ unsubscribes all it had asked for."""
        for topic in list(self.requested):
            self.unsubscribe(topic)
        self._xpub.peers.remove(self)

    def matches(self, frame: bytes) -> bool:
        return any(frame.startswith(topic) for topic in self.applied)

    @property
    def full(self) -> bool:
        return len(self.queue) >= self.hwm

    def receive(self) -> list:
        """Every frame that arrived and was not read yet (the XPUB is told it drained)."""
        frames = list(self.queue)
        self.queue.clear()
        if frames and self._xpub.drained is not None:
            self._xpub.drained()
        return frames


@implementer(IPublisherSocket)
class MemoryXPub(_Closable):
    drained = None

    def __init__(self, notify):
        self.notify = notify
        self.peers = []
        #: Every frame the socket took, in order (those that match no peer's
        #: subscription ZeroMQ drops).
        self.sent = []
        #: Calls of send_from: each one is one batch for ZeroMQ.
        self.calls = 0

    def connect(self, hwm: int = 1000) -> MemorySub:
        """A new app SUB socket connected to this one."""
        peer = MemorySub(self, hwm)
        self.peers.append(peer)
        return peer

    def send_from(self, frames) -> bool:
        self.calls += 1
        while frames:
            frame = frames[0]
            matching = [p for p in self.peers if p.matches(frame)]
            if any(p.full for p in matching):
                return False
            for peer in matching:
                peer.queue.append(frame)
            self.sent.append(frames.popleft())
        return True


@implementer(IConnection)
class MemoryReceiver(_Closable):
    def __init__(self, receive):
        self._receive = receive

    def deliver(self, *frames: bytes) -> None:
        """An app publishes ``frames``, one message each."""
        for frame in frames:
            self._receive([frame])


@implementer(IConnection)
class MemoryRouter(_Closable):
    def __init__(self, answer):
        self._answer = answer

    def request(self, value, peer: str = "127.0.0.1"):
        """Send ``value`` (a JSON value, or raw bytes) from ``peer``; the decoded reply."""
        frame = value if isinstance(value, bytes) else json.dumps(value).encode()
        return json.loads(self._answer([frame], lambda: peer))


@implementer(IServerSockets)
class MemorySockets:
    """The three endpoints in memory; ports are made up, from 1."""

    curve = False

    def __init__(self):
        self.xpub = self.receiver_socket = self.router = None
        self.closed = False

    def publisher(self, notify, port):
        self.xpub = MemoryXPub(notify)
        return self.xpub, port or 1

    def receiver(self, receive, port):
        self.receiver_socket = MemoryReceiver(receive)
        return self.receiver_socket, port or 2

    def manage(self, answer, port):
        self.router = MemoryRouter(answer)
        return self.router, port or 3

    def close(self):
        self.closed = True
        return succeed(None)
