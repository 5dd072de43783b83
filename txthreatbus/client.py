"""
The client library: an app's side of the zmq-app protocol (docs/protocol.md), on
Twisted and txZMQ. It talks to txthreatbus and to Threat Bus 2020.11.26 alike.

A ``Client`` is a ``MultiService``; each ``Subscription`` is one of its
children. Three kinds of ZeroMQ connection do the work:

- Management requests (subscribe, heartbeat, unsubscribe) go over one DEALER
  socket that frames like REQ (``[id, "", request]``, txZMQ's
  ``ZmqREQConnection``), so that a lost reply never wedges it. A request
  without an answer within ``request_timeout`` fails, and the socket is made
  anew, dropping whatever stale request still waits in it.
- Each subscription's SUB socket receives on its point-to-point (P2P) topic.
- Each subscription publishes through an XPUB socket. To the bus it is a
  plain PUB; unlike a PUB, it tells us when the bus's SUB socket has
  subscribed to a topic, and only from then on does ZeroMQ not drop what we
  send (the "slow joiner"). Until then messages wait, in order, in the
  subscription's outbox; ``Subscription.connected()`` says when the bus
  takes them. ``XPUB_NODROP`` makes a full ZeroMQ queue push back instead
  of dropping, and the outbox retries. On stop, the sockets linger so that
  what ZeroMQ still holds goes out, and the ZeroMQ context is terminated in
  a thread: the reactor never blocks.

Every ``heartbeat_interval`` seconds a subscription heartbeats. When the bus
answers ``error`` (it restarted and forgot us) or does not answer at all, the
subscription subscribes again, backing off while the bus stays away, and
moves its SUB socket to the new P2P topic. ``stopService`` unsubscribes.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Callable, Iterable, List, Optional, Tuple

import attrs
import zmq
import zmq.auth
from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError as DeferredTimeoutError,
    fail,
    succeed,
)
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from txzmq import ZmqConnection, ZmqEndpoint, ZmqEndpointType, ZmqFactory, ZmqREQConnection
from zope.interface import Attribute, Interface, implementer

from txthreatbus import codec, logs, stix
from txthreatbus.apps.zmq_app.curve import CurveKeyError
from txthreatbus.config import WILDCARD_HOSTS
from txthreatbus.connections import BatchedReadConnection, XPubConnection
from txthreatbus.model import Intel, Sighting, SnapshotEnvelope, SnapshotRequest, is_stix_topic

log = Logger(observer=logs.publisher)

#: Where Threat Bus's zmq-app listens for management requests by default.
DEFAULT_ENDPOINT = "127.0.0.1:13370"

#: Hosts a server may advertise that no client can connect to.
_WILDCARD_HOSTS = (*WILDCARD_HOSTS, "")

#: What a frame from the bus carries, by the suffix after the P2P topic, for
#: a subscription of each generation (False: 2020, True: STIX-2).
_SUFFIX_TOPICS = {
    False: {b"intel": Intel.topic, b"sighting": Sighting.topic, b"snapshotrequest": SnapshotRequest.topic},
    True: {
        b"indicator": stix.Indicator.topic,
        b"sighting": stix.Sighting.topic,
        b"snapshotrequest": SnapshotRequest.topic,
    },
}
#: What a subscription may publish.
_PUBLISHABLE = (Intel, Sighting, stix.Indicator, stix.Sighting, SnapshotEnvelope)

#: Seconds between tries to send when ZeroMQ's queue is full.
RETRY_INTERVAL = 0.005


# --- errors


class ClientError(Exception):
    """Threat Bus did not do what the client asked; the text says why."""


class RequestTimeout(ClientError):
    """Threat Bus did not answer a management request in time."""


class RequestFailed(ClientError):
    """Threat Bus answered a management request with an unsuccessful status."""

    def __init__(self, action: str, status):
        super().__init__(f"Threat Bus answered {status!r} to {action}")
        self.action = action
        self.status = status


class ProtocolError(ClientError):
    """Threat Bus answered something that is not a reply of the protocol."""


class ClientStopped(ClientError):
    """The client (or subscription) is stopping or stopped."""


# --- endpoints


def parse_endpoint(text: str) -> str:
    """
    ``host:port`` (also ``tcp://host:port``, ``[v6 address]:port``) checked
    and normalised; raises ``ValueError`` with a message for people.
    """
    value = text.strip()
    if value.startswith("tcp://"):
        value = value[len("tcp://") :]
    host, colon, port = value.rpartition(":")
    if not colon or not host or not port.isdigit() or not port.isascii():
        raise ValueError(f"{text!r} is not host:port")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, like [::1]:13370")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be from 1 to 65535")
    return f"{host}:{int(port)}"


def _host(endpoint: str) -> str:
    return endpoint.rpartition(":")[0]


@attrs.frozen
class Endpoints:
    """Where one subscription lives: its P2P topic and the bus's PUB and SUB endpoints."""

    p2p: str = attrs.field(validator=attrs.validators.instance_of(str))
    #: ``host:port`` of the bus's PUB socket (our SUB socket connects to it).
    pub: str = attrs.field(validator=attrs.validators.instance_of(str))
    #: ``host:port`` of the bus's SUB socket (our PUB socket connects to it).
    sub: str = attrs.field(validator=attrs.validators.instance_of(str))


def parse_subscribe_reply(reply: dict, manage_endpoint: str) -> Endpoints:
    """
    The endpoints in the reply to a subscribe request; raises ``ClientError``.

    Reads ``pub_endpoint``/``sub_endpoint``, falls back to ``pub_port``/
    ``sub_port`` on the host of ``manage_endpoint``, and replaces an
    advertised wildcard host (``0.0.0.0``) by that host too. The oldest
    servers send no ``status`` with a successful subscribe reply.
    """
    status = reply.get("status", "success" if "topic" in reply else None)
    if status != "success":
        raise RequestFailed("subscribe", status)
    p2p = reply.get("topic")
    if not isinstance(p2p, str) or not p2p:
        raise ProtocolError(f"a subscribe reply without a topic: {reply!r}")
    host = _host(manage_endpoint)
    return Endpoints(
        p2p=p2p, pub=_advertised(reply, "pub", host), sub=_advertised(reply, "sub", host)
    )


def _advertised(reply: dict, which: str, manage_host: str) -> str:
    advertised = reply.get(f"{which}_endpoint")
    if isinstance(advertised, str):
        try:
            endpoint = parse_endpoint(advertised)
        except ValueError:
            pass
        else:
            host, _, port = endpoint.rpartition(":")
            return f"{manage_host}:{port}" if host in _WILDCARD_HOSTS else endpoint
    port = reply.get(f"{which}_port")
    if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
        return f"{manage_host}:{port}"
    raise ProtocolError(
        f"a subscribe reply without a usable {which}_endpoint or {which}_port: {reply!r}"
    )


# --- the sockets, as narrow interfaces (fakes stand in for them in unit tests)


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


@attrs.frozen
class CurveKeys:
    """
    What a client needs to talk to a bus with CurveZMQ on: the bus's public
    key and the client's own key pair, Z85-encoded as ZeroMQ takes them.
    """

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_key_file: str, secret_key_file: str) -> "CurveKeys":
        """
        The keys in ZeroMQ certificate files, as ``zmq.auth.create_certificates``
        writes them: the bus's public ``.key`` and the client's ``.key_secret``.
        """
        server_public, _ = _certificate(server_key_file, "the bus's public key")
        public, secret = _certificate(secret_key_file, "the client's secret key")
        if secret is None:
            raise CurveKeyError(f"{secret_key_file}: holds no secret key (the .key_secret file has it)")
        return cls(server_public, public, secret)

    def secure(self, socket) -> None:
        """Make ``socket`` a CurveZMQ client of the bus (before it connects)."""
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def _certificate(path: str, what: str):
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"{path} ({what}): {getattr(e, 'strerror', None) or e}") from None


def _connect(connection: ZmqConnection, endpoint: str, curve: Optional[CurveKeys] = None) -> None:
    if _host(endpoint).startswith("["):
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
        return _follow(self._closing)


# --- small Deferred helpers


def _follow(d: Deferred) -> Deferred:
    """A new Deferred with the result of ``d``, leaving ``d``'s own result alone."""
    follower = Deferred()

    def both(result):
        if isinstance(result, Failure):
            follower.errback(result)
        else:
            follower.callback(result)
        return result

    d.addBoth(both)
    return follower


class _Waiters:
    """Deferreds waiting for conditions on one object, fired when they come true."""

    def __init__(self):
        self._waiting: List[Tuple[Callable[[], bool], Deferred]] = []

    def wait(self, condition: Callable[[], bool]) -> Deferred:
        if condition():
            return succeed(None)

        def cancel(d):
            self._waiting[:] = [entry for entry in self._waiting if entry[1] is not d]

        d = Deferred(cancel)
        self._waiting.append((condition, d))
        return d

    def check(self) -> None:
        if not self._waiting:
            return
        ready = [entry for entry in self._waiting if entry[0]()]
        for entry in ready:
            self._waiting.remove(entry)
        for _, d in ready:
            d.callback(None)

    def fail_all(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(error)


# --- publishing


class Outbox:
    """
    Frames on their way to the bus's SUB socket, in order.

    A frame goes out once the bus has subscribed to a prefix of its topic
    (before that, ZeroMQ would drop it), and while ZeroMQ's queue has room;
    otherwise it waits, and so do the frames after it.
    """

    def __init__(self, clock, retry_interval: float = RETRY_INTERVAL):
        self._clock = clock
        self._retry_interval = retry_interval
        self._frames: deque = deque()
        self._accepted: set = set()
        self._socket: Optional[IPublisherSocket] = None
        self._retry = None
        self._waiters = _Waiters()

    def __len__(self):
        return len(self._frames)

    def attach(self, socket: IPublisherSocket) -> None:
        """Send through ``socket`` from now on; the previous one is closed."""
        previous, self._socket = self._socket, socket
        self._accepted = set()
        if previous is not None:
            previous.close()

    def close(self) -> None:
        """Close the socket; frames not handed to ZeroMQ are dropped, waiters fail."""
        self.attach(None)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._frames:
            log.warn(
                "{n} messages for Threat Bus were not sent: the bus did not take them in time",
                n=len(self._frames),
            )
            self._frames.clear()
        self._waiters.fail_all(ClientStopped("the subscription is closed"))

    def notify(self, subscribed: bool, prefix: bytes) -> None:
        """The bus's SUB socket (un)subscribed ``prefix``."""
        if subscribed:
            self._accepted.add(prefix)
        else:
            self._accepted.discard(prefix)
        log.debug(
            "Threat Bus {what} {prefix!r}",
            what="takes" if subscribed else "no longer takes",
            prefix=prefix,
        )
        self.flush()

    def accepts(self, topic: Optional[bytes] = None) -> bool:
        """Whether the bus takes ``topic`` now (any topic, if None)."""
        if topic is None:
            return bool(self._accepted)
        return any(topic.startswith(prefix) for prefix in self._accepted)

    def put(self, topic: bytes, frame: bytes) -> None:
        """Send ``frame`` on ``topic`` as soon as it can go."""
        self._frames.append((topic, frame))
        if len(self._frames) == 1:
            self.flush()

    def flush(self) -> None:
        """Hand ZeroMQ what can go now."""
        frames, socket = self._frames, self._socket
        while frames and socket is not None:
            topic, frame = frames[0]
            if not self.accepts(topic):
                break
            try:
                socket.send(frame)
            except zmq.Again:
                self._schedule_retry()
                break
            frames.popleft()
        self._waiters.check()

    def _schedule_retry(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self._clock.callLater(self._retry_interval, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        try:
            self.flush()
        except Exception:
            log.failure("Sending to Threat Bus failed")

    def ready(self, topic: Optional[bytes] = None) -> Deferred:
        """A Deferred that fires once the bus takes ``topic`` (any topic, if None)."""
        return self._waiters.wait(lambda: self.accepts(topic))

    def drained(self) -> Deferred:
        """A Deferred that fires once every frame put so far is handed to ZeroMQ."""
        return self._waiters.wait(lambda: not self._frames)


# --- subscriptions


class Subscription(Service):
    """
    One subscription to a Threat Bus topic, a child service of its ``Client``.

    It receives on its P2P topic (each message, an ``Intel``, ``Sighting`` or
    ``SnapshotRequest``, goes to ``callback``), publishes, heartbeats, and
    subscribes again when the bus forgets it. ``stopService`` (or
    ``unsubscribe``) unsubscribes.

    @ivar endpoints: the current ``Endpoints`` (P2P topic, bus PUB and SUB).
    @ivar resubscriptions: how many times it has subscribed again.
    """

    def __init__(
        self, client: "Client", topic, snapshot_days: int, callback, endpoints: Endpoints
    ):
        self._client = client
        self.topic = topic
        first = topic if isinstance(topic, str) else topic[0]
        self._receives = _SUFFIX_TOPICS[is_stix_topic(first)]
        self.snapshot_days = snapshot_days
        self.endpoints = endpoints
        self.resubscriptions = 0
        self._prefix = endpoints.p2p.encode()
        self._callback = callback
        self._outbox = Outbox(client.clock)
        self._subscriber: Optional[ISubscriberSocket] = None
        self._loop: Optional[LoopingCall] = None
        self._loop_done: Optional[Deferred] = None
        self._pause_d: Optional[Deferred] = None
        self._stopping: Optional[Deferred] = None

    def __repr__(self):
        return f"<Subscription {self.p2p} to {self.topic}>"

    @property
    def p2p(self) -> str:
        """The current point-to-point topic (it changes when subscribing again)."""
        return self.endpoints.p2p

    @property
    def pending(self) -> int:
        """How many published messages are not yet handed to ZeroMQ."""
        return len(self._outbox)

    # --- lifecycle

    def startService(self):
        if self._stopping is not None:
            raise ClientStopped(f"{self!r} is unsubscribed")
        super().startService()
        transport = self._client.transport
        self._subscriber = transport.subscriber(self.endpoints.pub, self._received)
        self._subscriber.subscribe(self.p2p.encode())
        self._outbox.attach(transport.publisher(self.endpoints.sub, self._outbox.notify))
        self._loop = LoopingCall(self._beat)
        self._loop.clock = self._client.clock
        self._loop_done = self._loop.start(self._client.heartbeat_interval, now=False)
        self._loop_done.addErrback(
            lambda f: log.failure("The heartbeat loop of {p2p} failed", f, p2p=self.p2p)
        )

    def stopService(self):
        """Unsubscribe and close; a Deferred that never fails. Safe to call twice."""
        if self._stopping is None:
            super().stopService()
            self._stopping = Deferred.fromCoroutine(self._stop())
            self._stopping.addErrback(
                lambda f: log.failure("Unsubscribing {p2p} failed", f, p2p=self.p2p)
            )
        return _follow(self._stopping)

    def unsubscribe(self) -> Deferred:
        """Unsubscribe and leave the client; a Deferred that fires when done."""
        if self.parent is not None:
            self.disownServiceParent()
        return self.stopService()

    async def _stop(self):
        started = self._loop is not None
        if started:
            if self._loop.running:
                self._loop.stop()
            if self._pause_d is not None:
                self._pause_d.cancel()
            # a heartbeat or re-subscription in progress finishes first: it
            # may hold a new P2P topic, the one to unsubscribe
            await self._loop_done
        linger = self._client.transport.linger
        if started and self._outbox:
            try:
                await self._outbox.drained().addTimeout(linger, self._client.clock)
            except DeferredTimeoutError:
                pass  # the outbox tells how many it drops
        try:
            reply = await self._client.request({"action": "unsubscribe", "topic": self.p2p})
        except ClientError as e:
            log.warn(
                "Could not unsubscribe {p2p} from {topic}: {error}",
                p2p=self.p2p,
                topic=self.topic,
                error=str(e),
            )
        else:
            if reply.get("status") == "success":
                log.info("Unsubscribed {p2p} from {topic}", p2p=self.p2p, topic=self.topic)
            else:
                log.info(
                    "Threat Bus did not know {p2p} any more: {reply!r}", p2p=self.p2p, reply=reply
                )
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None
        self._outbox.close()

    # --- heartbeats and subscribing again

    def _beat(self) -> Deferred:
        # the loop waits for this; it never fails, so the loop never stops on an error
        d = Deferred.fromCoroutine(self._heartbeat())
        d.addErrback(lambda f: log.failure("The heartbeat of {p2p} failed", f, p2p=self.p2p))
        return d

    async def _heartbeat(self):
        try:
            reply = await self._client.request({"action": "heartbeat", "topic": self.p2p})
        except ClientStopped:
            return
        except ClientError as e:
            problem = str(e)
        else:
            status = reply.get("status")
            if status == "success":
                return
            if status == "unknown request":
                # a bus without heartbeats: nothing tells us it restarted
                log.info(
                    "Threat Bus does not know heartbeats; {p2p} stops sending them", p2p=self.p2p
                )
                if self._loop.running:
                    self._loop.stop()
                return
            problem = f"it answered {status!r}"
        if not self.running:
            return
        log.warn(
            "Threat Bus did not take the heartbeat of {p2p} ({problem}): subscribing to {topic} again",
            p2p=self.p2p,
            problem=problem,
            topic=self.topic,
        )
        await self._resubscribe()

    async def _resubscribe(self):
        attempt = 0
        while self.running:
            try:
                endpoints = await self._client._subscribe_request(self.topic, 0)
            except ClientStopped:
                return
            except ClientError as e:
                delay = self._client.backoff(attempt)
                attempt += 1
                log.warn(
                    "Could not subscribe to {topic} again ({error}); trying again in {delay} s",
                    topic=self.topic,
                    error=str(e),
                    delay=round(delay, 3),
                )
                self._pause_d = deferLater(self._client.clock, delay, lambda: None)
                try:
                    await self._pause_d
                except CancelledError:
                    return
                finally:
                    self._pause_d = None
                continue
            old = self.endpoints
            self._switch(endpoints)
            self.resubscriptions += 1
            log.info(
                "Subscribed to {topic} again as {p2p} (was {old})",
                topic=self.topic,
                p2p=endpoints.p2p,
                old=old.p2p,
            )
            return

    def _switch(self, endpoints: Endpoints) -> None:
        old, self.endpoints = self.endpoints, endpoints
        self._prefix = endpoints.p2p.encode()
        if self._subscriber is None:
            return
        transport = self._client.transport
        if endpoints.pub != old.pub:
            self._subscriber.close()
            self._subscriber = transport.subscriber(endpoints.pub, self._received)
        else:
            self._subscriber.unsubscribe(old.p2p.encode())
        self._subscriber.subscribe(endpoints.p2p.encode())
        if endpoints.sub != old.sub:
            self._outbox.attach(transport.publisher(endpoints.sub, self._outbox.notify))

    # --- receiving

    def _received(self, frame: bytes) -> None:
        prefix = self._prefix
        head, space, body = frame.partition(b" ")
        if not space or not head.startswith(prefix):
            log.debug("Ignored a frame not for {p2p}: {head!r}", p2p=self.p2p, head=head[:64])
            return
        suffix = head[len(prefix) :]
        topic = self._receives.get(suffix)
        if topic is None:
            log.warn(
                "Ignored a message of unknown type {suffix!r} from Threat Bus", suffix=suffix[:64]
            )
            return
        try:
            message = codec.decode(topic, body)
        except codec.DecodeError as e:
            log.warn(
                "Ignored a malformed {kind} from Threat Bus: {error}",
                kind=suffix.decode(),
                error=str(e),
            )
            return
        if self._callback is None:
            return
        try:
            result = self._callback(message)
        except Exception:
            log.failure(
                "The callback of {p2p} failed on a {kind}", p2p=self.p2p, kind=suffix.decode()
            )
            return
        if isinstance(result, Deferred):
            result.addErrback(
                lambda f: log.failure(
                    "The callback of {p2p} failed on a {kind}",
                    f,
                    p2p=self.p2p,
                    kind=suffix.decode(),
                )
            )

    # --- publishing

    def publish(self, message) -> None:
        """
        Publish an ``Intel``, ``Sighting``, STIX ``Indicator`` or
        ``Sighting`` (``txthreatbus.stix``) or ``SnapshotEnvelope`` on its
        topic. It goes out as soon as the bus takes it, in order.
        """
        if not isinstance(message, _PUBLISHABLE):
            raise TypeError(f"cannot publish {type(message).__name__}: not a message for the bus")
        if self._stopping is not None:
            raise ClientStopped(f"{self!r} is unsubscribed")
        topic = message.topic.encode()
        self._outbox.put(topic, topic + b" " + codec.encode(message))

    def publish_intel(self, intel: Intel) -> None:
        """Publish ``intel`` on ``threatbus/intel``."""
        if not isinstance(intel, Intel):
            raise TypeError(f"not Intel: {intel!r}")
        self.publish(intel)

    def publish_sighting(self, sighting: Sighting) -> None:
        """Publish ``sighting`` on ``threatbus/sighting``."""
        if not isinstance(sighting, Sighting):
            raise TypeError(f"not a Sighting: {sighting!r}")
        self.publish(sighting)

    def answer_snapshot(self, request: SnapshotRequest, items: Iterable) -> int:
        """
        Answer ``request`` with ``items`` (Intel or STIX Indicators for an
        INTEL snapshot, Sightings of either generation for a SIGHTING one):
        each goes out in a ``SnapshotEnvelope``
        on ``threatbus/snapshotenvelope``. Raises ``ValueError`` before
        sending anything if an item has the wrong type. Returns the count.
        """
        envelopes = [
            SnapshotEnvelope(
                snapshot_type=request.snapshot_type, snapshot_id=request.snapshot_id, body=item
            )
            for item in items
        ]
        for envelope in envelopes:
            self.publish(envelope)
        return len(envelopes)

    def connected(self, topic: Optional[str] = None) -> Deferred:
        """
        A Deferred that fires once the bus takes what is published on
        ``topic`` (on any topic, if None): its SUB socket has subscribed to
        our PUB socket. Cancel it, or ``addTimeout``, to stop waiting.
        """
        return self._outbox.ready(None if topic is None else topic.encode())

    def sent(self) -> Deferred:
        """A Deferred that fires once everything published so far is handed to ZeroMQ."""
        return self._outbox.drained()


# --- the client


class Client(MultiService):
    """
    A Threat Bus app: subscriptions to topics of one bus, as child services.

    Start it (``startService``, or make it a child of your application)
    before subscribing: a subscription opens its sockets and heartbeats only
    while the client runs. ``stopService`` unsubscribes everything, sends
    what is still queued (for up to ``linger`` seconds), and closes.

    @param endpoint: the bus's management endpoint, ``host:port``.
    @param clock: the ``IReactorTime`` for heartbeats, timeouts and backoff.
    @param transport: makes the sockets (default: ``ZmqTransport(linger, curve=curve)``).
    @param curve: ``CurveKeys`` for a bus with CurveZMQ on.
    @param heartbeat_interval: seconds between heartbeats.
    @param request_timeout: seconds to wait for a management reply.
    @param backoff_initial: seconds before the second try to subscribe
        again; doubled after every failure, up to ``backoff_max``.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        clock=None,
        transport=None,
        heartbeat_interval: float = 5.0,
        request_timeout: float = 3.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        linger: float = 2.0,
        curve: Optional[CurveKeys] = None,
    ):
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        for name, value in (
            ("heartbeat_interval", heartbeat_interval),
            ("request_timeout", request_timeout),
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value!r}")
        self.endpoint = parse_endpoint(endpoint)
        self.clock = clock
        self.transport = transport if transport is not None else ZmqTransport(linger=linger, curve=curve)
        self.heartbeat_interval = heartbeat_interval
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._manage: Optional[IManageSocket] = None
        self._requests: set = set()
        self._subscribing: set = set()
        self._stopping: Optional[Deferred] = None

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (from 0)."""
        return min(self.backoff_max, self.backoff_initial * 2 ** min(attempt, 32))

    # --- management requests

    def request(self, payload: dict) -> Deferred:
        """
        Send the management request ``payload``; a Deferred of the reply
        (a dict). Fails with ``RequestTimeout`` after ``request_timeout``
        seconds without answer, ``ProtocolError`` for a reply that is not a
        JSON object, ``ClientStopped`` once the client stops.
        """
        if self._stopping is not None and payload.get("action") != "unsubscribe":
            return fail(ClientStopped("the client is stopping"))
        try:
            if self._manage is None:
                self._manage = self.transport.manage(self.endpoint)
            manage = self._manage
            d = manage.request(json.dumps(payload).encode())
        except zmq.ZMQError as e:
            return fail(ClientError(f"cannot send to Threat Bus at {self.endpoint}: {e}"))
        except ClientStopped as e:
            return fail(e)
        d.addTimeout(self.request_timeout, self.clock)
        self._requests.add(d)

        def done(result):
            self._requests.discard(d)
            return result

        d.addBoth(done)
        d.addCallbacks(self._reply, self._no_reply, errbackArgs=(manage, payload.get("action")))
        return d

    def _reply(self, frames) -> dict:
        if len(frames) != 1:
            raise ProtocolError(f"a reply of {len(frames)} frames")
        try:
            reply = codec.loads(frames[0])
        except codec.DecodeError as e:
            raise ProtocolError(f"a reply that is not JSON: {e}") from None
        if not isinstance(reply, dict):
            raise ProtocolError(f"a reply that is not a JSON object: {reply!r}")
        return reply

    def _no_reply(self, failure, manage, action):
        if failure.check(DeferredTimeoutError):
            if manage is self._manage:
                # the request may still sit in the socket, to reach a
                # restarted bus out of place: start afresh
                self._manage = None
                manage.close()
            raise RequestTimeout(
                f"no answer from Threat Bus at {self.endpoint} to {action} "
                f"within {self.request_timeout:g} s"
            )
        if failure.check(CancelledError):
            raise ClientStopped("the client stopped")
        return failure

    def _subscribe_request(self, topic: str, snapshot_days: int) -> Deferred:
        d = self.request({"action": "subscribe", "topic": topic, "snapshot": snapshot_days})
        d.addCallback(parse_subscribe_reply, self.endpoint)
        return d

    # --- subscriptions

    def subscribe(self, topic, snapshot_days: int = 0, callback=None) -> Deferred:
        """
        Subscribe to ``topic``, asking for a snapshot of the last
        ``snapshot_days`` days if > 0. A Deferred of the ``Subscription``;
        ``callback(message)`` gets each message that arrives (it may return
        a Deferred).

        The topic tells the generation of what arrives: ``threatbus/intel``,
        ``threatbus/sighting`` or ``threatbus`` give ``txthreatbus.model``'s
        Intel and Sightings; ``stix2/indicator``, ``stix2/sighting``,
        ``stix2`` (or a list of them) give ``txthreatbus.stix``'s Indicators
        and Sightings. Either way snapshot requests come as
        ``SnapshotRequest``.
        """
        if (
            not isinstance(snapshot_days, int)
            or isinstance(snapshot_days, bool)
            or snapshot_days < 0
        ):
            raise ValueError(f"snapshot_days must be a whole number >= 0, not {snapshot_days!r}")
        if self._stopping is not None:
            return fail(ClientStopped("the client is stopping"))
        d = self._subscribe_request(topic, snapshot_days)
        self._subscribing.add(d)

        def subscribed(endpoints):
            self._subscribing.discard(d)
            sub = Subscription(self, topic, snapshot_days, callback, endpoints)
            sub.setServiceParent(self)
            log.debug("Subscribed to {topic} as {p2p}", topic=topic, p2p=endpoints.p2p)
            return sub

        def failed(failure):
            self._subscribing.discard(d)
            return failure

        return d.addCallbacks(subscribed, failed)

    @property
    def subscriptions(self) -> List[Subscription]:
        """The current subscriptions."""
        return [s for s in self if isinstance(s, Subscription)]

    # --- lifecycle

    def startService(self):
        if self._stopping is not None:
            raise ClientStopped("a stopped client does not start again: make a new one")
        super().startService()

    def stopService(self):
        """Unsubscribe everything and close; a Deferred that never fails. Safe to call twice."""
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
            self._stopping.addErrback(
                lambda f: log.failure("Stopping the Threat Bus client failed", f)
            )
        return _follow(self._stopping)

    async def _stop(self):
        # subscribe requests in flight become subscriptions, unsubscribed below
        for d in list(self._subscribing):
            try:
                await _follow(d)
            except Exception:
                pass
        await MultiService.stopService(self)
        for d in list(self._requests):
            d.cancel()
        if self._manage is not None:
            self._manage.close()
            self._manage = None
        await self.transport.close()
