"""
The ZeroMQ sockets seam: the narrow interfaces a client makes its sockets
through (``ITransport`` and the three sockets; ``txthreatbus.testing`` has
fakes of them), and ZeroMQ's implementation on txZMQ (``ZmqTransport``).

- Management requests (subscribe, heartbeat, unsubscribe) go over one DEALER
  socket that frames like REQ (``[id, "", request]``, txZMQ's
  ``ZmqREQConnection``), so that a lost reply never wedges it.
- Each subscription's SUB socket receives on its point-to-point (P2P) topic.
- Each subscription publishes through an XPUB socket. To the bus it is a
  plain PUB; unlike a PUB, it tells us when the bus's SUB socket has
  subscribed to a topic. ``XPUB_NODROP`` makes a full ZeroMQ queue push
  back instead of dropping. On close, the sockets linger so that what
  ZeroMQ still holds goes out, and the ZeroMQ context is terminated in a
  thread: the reactor never blocks.
"""

from __future__ import annotations

from typing import Callable, Optional

import zmq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from txzmq import ZmqConnection, ZmqEndpoint, ZmqEndpointType, ZmqFactory, ZmqREQConnection
from zope.interface import Attribute, Interface, implementer

from txthreatbus import logs
from txthreatbus.client.curve import CurveKeys
from txthreatbus.client.deferreds import follow
from txthreatbus.client.endpoints import host_of
from txthreatbus.client.errors import ClientStopped
from txthreatbus.connections import BatchedReadConnection, XPubConnection

log = Logger(observer=logs.publisher)


class IManageSocket(Interface):
    """A request-reply connection to the bus's management endpoint."""

    def request(payload):
        """Send the request frame ``payload``; a Deferred of the reply frames (cancellable)."""

    def close():
        """Close the socket, dropping unsent requests; harmless if closed."""


class ISubscriberSocket(Interface):
    """A connection receiving from the bus's PUB socket."""

    def subscribe(prefix):
        """Receive the frames that start with ``prefix`` (bytes)."""

    def unsubscribe(prefix):
        """Stop receiving the frames that start with ``prefix``."""

    def close():
        """Close the socket; harmless if closed."""


class IPublisherSocket(Interface):
    """A connection sending to the bus's SUB socket."""

    def send(frame):
        """Send one frame; raises ``zmq.Again`` when ZeroMQ's queue is full."""

    def close():
        """Close the socket; what ZeroMQ holds still goes out while it lingers."""


class ITransport(Interface):
    """Makes the sockets of a client, and ends them."""

    linger = Attribute("Seconds a closed publisher socket may spend sending what it holds.")

    def manage(endpoint):
        """An ``IManageSocket`` connected to ``endpoint`` (``host:port``)."""

    def subscriber(endpoint, receive):
        """An ``ISubscriberSocket`` giving each one-frame message to ``receive(frame)``."""

    def publisher(endpoint, notify):
        """
        An ``IPublisherSocket`` that reports the bus's subscriptions to
        ``notify(subscribed, prefix)``.
        """

    def close():
        """Close every socket; a Deferred that fires once what they hold is sent (or lingered)."""


def _connect(connection: ZmqConnection, endpoint: str, curve: Optional[CurveKeys] = None) -> None:
    if host_of(endpoint).startswith("["):
        connection.socket.setsockopt(zmq.IPV6, 1)
    if curve is not None:
        curve.secure(connection.socket)
    connection.addEndpoints([ZmqEndpoint(ZmqEndpointType.connect, "tcp://" + endpoint)])


@implementer(IManageSocket)
class ManageConnection(ZmqREQConnection):
    """A DEALER that frames like REQ, with a Deferred per request (txZMQ)."""

    def __init__(self, factory, endpoint: str, curve: Optional[CurveKeys] = None):
        ZmqREQConnection.__init__(self, factory)
        self.socket.setsockopt(zmq.LINGER, 0)
        _connect(self, endpoint, curve)

    def messageReceived(self, message):
        # [id, b"", reply...]; anything else would raise in the reactor's read loop
        if len(message) < 3 or message[1] != b"":
            log.warn("Ignored a management reply of {n} frames without delimiter", n=len(message))
            return
        ZmqREQConnection.messageReceived(self, message)

    def request(self, payload: bytes) -> Deferred:
        return self.sendMsg(payload)

    def close(self) -> None:
        if self.socket is not None:
            self.shutdown()


@implementer(ISubscriberSocket)
class SubscriberConnection(BatchedReadConnection):
    """A SUB socket handing each one-frame message to ``receive``."""

    socketType = zmq.SUB

    def __init__(
        self, factory, endpoint: str, receive: Callable[[bytes], None], curve: Optional[CurveKeys] = None
    ):
        self._receive = receive
        BatchedReadConnection.__init__(self, factory)
        self.socket.setsockopt(zmq.LINGER, 0)
        _connect(self, endpoint, curve)

    #: Messages read per turn of the reactor: under a flood, heartbeats,
    #: their replies and signals must not wait behind it.
    batch = 1000

    def messageReceived(self, message):
        if len(message) != 1:
            log.warn("Ignored a message of {n} frames from Threat Bus", n=len(message))
            return
        self._receive(message[0])

    def subscribe(self, prefix: bytes) -> None:
        self.socket.setsockopt(zmq.SUBSCRIBE, prefix)

    def unsubscribe(self, prefix: bytes) -> None:
        self.socket.setsockopt(zmq.UNSUBSCRIBE, prefix)

    def close(self) -> None:
        if self.socket is not None:
            self.shutdown()


@implementer(IPublisherSocket)
class PublisherConnection(XPubConnection):
    """
    An XPUB socket (a PUB, to the bus) that reports the bus's subscriptions,
    and refuses (``zmq.Again``) rather than drops when its queue is full.
    """

    def __init__(
        self, factory, endpoint: str, notify, linger: float, send_hwm: int, curve: Optional[CurveKeys] = None
    ):
        XPubConnection.__init__(self, factory, notify, send_hwm)
        self.socket.setsockopt(zmq.LINGER, int(linger * 1000))
        _connect(self, endpoint, curve)

    def close(self) -> None:
        if self.socket is not None:
            self.shutdown()


@implementer(ITransport)
class ZmqTransport:
    """
    The client's ZeroMQ context (one I/O thread) and its txZMQ sockets.

    @param linger: seconds a closed publisher socket may spend sending what
        ZeroMQ still holds; ``close()`` waits for that in a thread.
    @param send_hwm: messages ZeroMQ queues per publisher before it pushes back.
    @param curve: ``CurveKeys`` for a bus with CurveZMQ on, else None.
    """

    def __init__(
        self, linger: float = 2.0, send_hwm: int = 10_000, reactor=None, curve: Optional[CurveKeys] = None
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.linger = linger
        self._send_hwm = send_hwm
        self._curve = curve
        self._reactor = reactor
        self._factory: Optional[ZmqFactory] = None
        self._closing: Optional[Deferred] = None

    def _zmq(self) -> ZmqFactory:
        if self._closing is not None:
            raise ClientStopped("the client is closed")
        if self._factory is None:
            factory = ZmqFactory()
            factory.reactor = self._reactor
            factory.lingerPeriod = 0
            self._factory = factory
        return self._factory

    def manage(self, endpoint: str) -> ManageConnection:
        return ManageConnection(self._zmq(), endpoint, self._curve)

    def subscriber(self, endpoint: str, receive) -> SubscriberConnection:
        return SubscriberConnection(self._zmq(), endpoint, receive, self._curve)

    def publisher(self, endpoint: str, notify) -> PublisherConnection:
        return PublisherConnection(self._zmq(), endpoint, notify, self.linger, self._send_hwm, self._curve)

    def close(self) -> Deferred:
        if self._closing is None:
            factory, self._factory = self._factory, None
            if factory is None:
                self._closing = succeed(None)
            else:
                for connection in list(factory.connections):
                    connection.shutdown()
                # term() returns once lingering sockets have sent what they
                # hold (or their linger is up): it blocks, so not here.
                self._closing = deferToThreadPool(
                    self._reactor, self._reactor.getThreadPool(), factory.context.term
                )
                self._closing.addErrback(lambda f: log.failure("Closing ZeroMQ failed", f))
        return follow(self._closing)
