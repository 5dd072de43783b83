"""
Fakes of the client's transport, to test an app against
``txthreatbus.client`` without sockets or real time.

A ``Client`` makes its sockets through an ``ITransport``. Give it a
``FakeTransport`` (and a ``twisted.internet.task.Clock`` as its clock), and
the test plays the bus:

- ``transport.manage_socket.answer(subscribe_reply())`` answers the oldest
  open management request (the subscribe), and returns what it asked;
- ``transport.subscribers[-1].deliver(message)`` sends a message from the
  bus to the newest subscription, framed as the bus frames it;
- ``transport.publishers[-1].accept()`` is the bus's SUB socket connecting:
  from then on what the subscription publishes goes out, and
  ``published()`` has it, decoded.

The fakes do what the ZeroMQ sockets of ``ZmqTransport`` do, as far as a
client can tell (tests/test_testing.py checks this against real sockets),
and record what they are asked.
"""

from __future__ import annotations

import json
from typing import List

import zmq
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from txthreatbus import codec
from txthreatbus.client import IManageSocket, IPublisherSocket, ISubscriberSocket, ITransport

__all__ = [
    "FakeManage",
    "FakePublisher",
    "FakeSubscriber",
    "FakeTransport",
    "frame_for",
    "subscribe_reply",
]


def subscribe_reply(
    p2p: str = "a" * 32, pub: str = "127.0.0.1:13371", sub: str = "127.0.0.1:13372"
) -> dict:
    """The bus's reply to a successful subscribe: the P2P topic, its PUB and SUB endpoints."""
    return {"topic": p2p, "pub_endpoint": pub, "sub_endpoint": sub, "status": "success"}


def frame_for(p2p: bytes, message) -> bytes:
    """
    ``message`` as the bus sends it to the subscription ``p2p``: one frame,
    ``<P2P><type> <json>``, the type being the last part of the message's
    topic (``intel``, ``sighting``, ``indicator``, ``snapshotrequest``).
    """
    return p2p + message.topic.rsplit("/", 1)[1].encode() + b" " + codec.encode(message)


@implementer(IManageSocket)
class FakeManage:
    """
    A management socket that keeps each request open until the test
    answers it.

    @ivar endpoint: the ``host:port`` it was made for.
    @ivar requests: ``(payload, Deferred)`` of every request not yet
        answered by ``answer``, oldest first (the payload decoded from JSON).
    @ivar closed: whether the client closed it.
    """

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.requests = []
        self.closed = False

    def request(self, payload: bytes) -> Deferred:
        d = Deferred()
        self.requests.append((json.loads(payload), d))
        return d

    def close(self) -> None:
        self.closed = True

    def answer(self, reply: dict) -> dict:
        """Answer the oldest open request with ``reply``; return that request."""
        for i, (payload, d) in enumerate(self.requests):
            if not d.called:
                del self.requests[i]
                d.callback([json.dumps(reply).encode()])
                return payload
        raise AssertionError("no open request")

    def open(self) -> List[dict]:
        """The requests waiting for an answer (a timed-out one is not), oldest first."""
        return [payload for payload, d in self.requests if not d.called]


@implementer(ISubscriberSocket)
class FakeSubscriber:
    """
    A SUB socket on the bus's PUB endpoint.

    @ivar endpoint: the ``host:port`` it was made for.
    @ivar receive: the client's callable for each frame; calling it directly
        hands the client any frame, as a misbehaving bus might send.
    @ivar prefixes: the prefixes (bytes) it is subscribed to.
    @ivar closed: whether the client closed it.
    """

    def __init__(self, endpoint: str, receive):
        self.endpoint = endpoint
        self.receive = receive
        self.prefixes = set()
        self.closed = False

    def subscribe(self, prefix: bytes) -> None:
        self.prefixes.add(prefix)

    def unsubscribe(self, prefix: bytes) -> None:
        self.prefixes.discard(prefix)

    def close(self) -> None:
        self.closed = True

    def deliver_frame(self, frame: bytes) -> bool:
        """
        Hand the client ``frame`` if ZeroMQ would: the socket is open and
        subscribed to a prefix of it. Whether it did.
        """
        if self.closed or not any(frame.startswith(p) for p in self.prefixes):
            return False
        self.receive(frame)
        return True

    def deliver(self, message) -> bool:
        """
        Send ``message`` (an ``Intel``, ``Sighting``, STIX object or
        ``SnapshotRequest``) from the bus on the P2P topic this socket is
        subscribed to; False if it is closed (or subscribed to nothing).
        """
        if self.closed or not self.prefixes:
            return False
        (p2p,) = self.prefixes
        return self.deliver_frame(frame_for(p2p, message))


@implementer(IPublisherSocket)
class FakePublisher:
    """
    A PUB socket on the bus's SUB endpoint that keeps what is sent.

    @ivar endpoint: the ``host:port`` it was made for.
    @ivar notify: the client's ``notify(subscribed, prefix)``, which the
        real socket calls when the bus's SUB socket (un)subscribes.
    @ivar sent: every frame sent, in order.
    @ivar full: set it to make ``send`` raise ``zmq.Again``, as a full
        ZeroMQ queue does (the client tries again shortly).
    @ivar closed: whether the client closed it.
    """

    def __init__(self, endpoint: str, notify):
        self.endpoint = endpoint
        self.notify = notify
        self.sent = []
        self.full = False
        self.closed = False

    def send(self, frame: bytes) -> None:
        if self.full:
            raise zmq.Again()
        self.sent.append(frame)

    def close(self) -> None:
        self.closed = True

    def accept(self, prefix: bytes = b"") -> None:
        """
        The bus's SUB socket subscribes to ``prefix`` (every topic, by
        default): what was published on those topics goes out now, and so
        does what is published from now on.
        """
        self.notify(True, prefix)

    def published(self) -> list:
        """The messages sent so far, decoded, in order."""
        messages = []
        for frame in self.sent:
            topic, _, body = frame.partition(b" ")
            messages.append(codec.decode(topic.decode(), body))
        return messages


@implementer(ITransport)
class FakeTransport:
    """
    Makes fake sockets, and keeps each in a list, oldest first.

    @ivar manages: the ``FakeManage`` sockets (a new one after a request
        times out).
    @ivar subscribers: the ``FakeSubscriber`` sockets, one per subscription
        (and a new one when the bus moves).
    @ivar publishers: the ``FakePublisher`` sockets, likewise.
    @ivar closed: whether the client closed it (it stopped).
    """

    #: Seconds a stopping subscription waits for the bus to take what it published.
    linger = 2.0

    def __init__(self):
        self.manages = []
        self.subscribers = []
        self.publishers = []
        self.closed = False

    def manage(self, endpoint: str) -> FakeManage:
        self.manages.append(FakeManage(endpoint))
        return self.manages[-1]

    def subscriber(self, endpoint: str, receive) -> FakeSubscriber:
        self.subscribers.append(FakeSubscriber(endpoint, receive))
        return self.subscribers[-1]

    def publisher(self, endpoint: str, notify) -> FakePublisher:
        self.publishers.append(FakePublisher(endpoint, notify))
        return self.publishers[-1]

    def close(self) -> Deferred:
        self.closed = True
        return succeed(None)

    @property
    def manage_socket(self) -> FakeManage:
        """The management socket in use: the newest."""
        return self.manages[-1]
