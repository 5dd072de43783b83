"""
Fakes of the RabbitMQ broker for the unit tests of
``txthreatbus.backbones.rabbitmq``: a channel, a pika connection (the
protocol a ``Connector`` makes), a transport, an endpoint whose connection
attempts the test answers, and a ``Harness``: a backbone on a ``Clock``
wired to them. Nothing here opens a socket or sleeps.

The fakes behave as pika 1.x's Twisted adapter does where the backbone can
tell: ``ready`` fires with the connection once the handshake completes and
is None from then on; a connection lost closes its channels (their pending
publishes and calls fail, their consumer queues close, ``on_closed``
fires); ``abortConnection`` and ``loseConnection`` end the connection in
the next reactor turn, as TCP does.
"""

from __future__ import annotations

import json
from typing import List, Optional

import attrs
from twisted.application.internet import backoffPolicy
import pika
from pika import exceptions as amqp
from pika import spec
from pika.adapters.twisted_connection import ClosableDeferredQueue, ReceivedMessage
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint, ITransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.test_rabbitmq import (
    backbone_sample,
    big_intel,
    capture_logs,
    intel,
    intel_json,
    logged,
    sample,
)
from txthreatbus import codec
from txthreatbus.backbones.rabbitmq.connection import Connector
from txthreatbus.backbones.rabbitmq.outgoing import MESSAGE_OVERHEAD
from txthreatbus.backbones.rabbitmq import service
from txthreatbus.backbones.rabbitmq.service import RabbitMQBackbone
from txthreatbus.config import QueueConfig, RabbitMQConfig
from txthreatbus.metrics import Metrics


# --- messages and logs (shared with the broker tests)

__all__ = [
    "backbone_sample", "big_intel", "capture_logs", "intel", "intel_json", "logged", "sample", "held",
    "Published", "FakeChannel", "FakeConnection", "FakeTransport", "Attempt", "FakeEndpoint", "Harness",
]


def held(message) -> int:
    """What holding ``message`` alone (one AMQP message) counts against buffer_bytes."""
    return len(codec.encode(message)) + MESSAGE_OVERHEAD


# --- the channel


@attrs.define(eq=False)
class Published:
    """One basic_publish: what went, and the Deferred of its confirm."""

    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    confirm: Deferred

    @property
    def ids(self) -> List[str]:
        """The ``id`` of each bus message it carries."""
        from txthreatbus.backbones.rabbitmq import batches

        return [json.loads(b)["id"] for b in batches.unpack(self.properties.content_type, self.body)]


class FakeChannel:
    """The part of pika's TwistedChannel that the backbone uses."""

    def __init__(self, connection: "FakeConnection", number: int):
        self.connection = connection
        self.number = number
        self.on_closed = Deferred()
        self.closed: Optional[Exception] = None
        self.confirming = False
        self.prefetch = None
        self.calls: list = []  # (method, kwargs)
        self.published: List[Published] = []
        self.acked: List[int] = []
        #: queue name -> the consumer's queue
        self.consumers: dict = {}
        #: method name -> an exception that the broker answers it with
        self.refuse: dict = {}
        #: an exception that basic_publish raises (the channel is closed)
        self.publish_raises: Optional[Exception] = None
        #: an event list that acks are appended to, ("ack", tag)
        self.events: Optional[list] = None

    def _answer(self, method: str, kwargs: dict, result=None) -> Deferred:
        self.calls.append((method, kwargs))
        if self.closed is not None:
            return fail(amqp.ChannelWrongStateError("Channel is closed."))
        refusal = self.refuse.get(method)
        if refusal is not None:
            d = fail(refusal)
            self.close(refusal)
            return d
        return succeed(result)

    def confirm_delivery(self) -> Deferred:
        self.confirming = True
        return self._answer("confirm_delivery", {})

    def basic_qos(self, prefetch_count: int = 0, **kwargs) -> Deferred:
        self.prefetch = prefetch_count
        return self._answer("basic_qos", dict(prefetch_count=prefetch_count, **kwargs))

    def exchange_declare(self, **kwargs) -> Deferred:
        return self._answer("exchange_declare", kwargs)

    def queue_declare(self, **kwargs) -> Deferred:
        return self._answer("queue_declare", kwargs)

    def queue_bind(self, **kwargs) -> Deferred:
        return self._answer("queue_bind", kwargs)

    def basic_consume(self, queue: str, **kwargs) -> Deferred:
        messages = ClosableDeferredQueue()
        tag = f"ctag-{queue}"
        d = self._answer("basic_consume", dict(queue=queue, **kwargs), (messages, tag))
        if self.closed is None:
            self.consumers[queue] = messages
        return d

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False) -> Deferred:
        if self.publish_raises is not None:
            raise self.publish_raises
        if self.closed is not None:
            raise amqp.ChannelWrongStateError("Channel is closed.")
        d = Deferred()
        self.published.append(Published(exchange, routing_key, body, properties, d))
        return d

    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None:
        if self.closed is not None:
            raise amqp.ChannelWrongStateError("Channel is closed.")
        self.acked.append(delivery_tag)
        if self.events is not None:
            self.events.append(("ack", delivery_tag))

    # --- the test's side

    def unconfirmed(self) -> List[Published]:
        return [p for p in self.published if not p.confirm.called]

    def confirm(self, n: Optional[int] = None) -> None:
        """Confirm (ack) the first ``n`` (default: all) unconfirmed publishes."""
        for p in self.unconfirmed()[:n]:
            p.confirm.callback(spec.Basic.Ack())

    def nack(self, n: Optional[int] = None) -> None:
        """Refuse (nack) the first ``n`` (default: all) unconfirmed publishes."""
        for p in self.unconfirmed()[:n]:
            p.confirm.errback(amqp.NackError([]))

    def message_ids(self) -> List[str]:
        return [p.properties.message_id for p in self.published]

    def ids(self) -> List[str]:
        """The ids of the bus messages published, in order."""
        return [i for p in self.published for i in p.ids]

    def deliver(self, queue: str, tag: int, body: bytes, message_id=None, content_type=None) -> None:
        """The broker delivers a message from ``queue`` to its consumer."""
        self.consumers[queue].put(
            ReceivedMessage(
                self,
                spec.Basic.Deliver(delivery_tag=tag),
                pika.BasicProperties(message_id=message_id, content_type=content_type),
                body,
            )
        )

    def close(self, reason: Exception) -> None:
        """The channel closes (the broker closed it, or the connection went)."""
        if self.closed is not None:
            return
        self.closed = reason
        for p in self.unconfirmed():
            p.confirm.errback(reason)
        for messages in self.consumers.values():
            if not messages.closed:
                messages.close(reason)
        self.on_closed.callback(reason)


# --- the connection


class FakeConnection(Protocol):
    """The part of the backbone's pika ``Connection`` that it uses."""

    def __init__(self, number: int = 0):
        self.number = number
        self.ready: Optional[Deferred] = Deferred()
        self.ready.addCallback(lambda _: self)
        self.is_lost = False
        self.lost_reason: Optional[Failure] = None
        self.channels: List[FakeChannel] = []
        self.closes = 0
        self.aborts = 0
        #: whether close() is answered (the transport then closes)
        self.answers_close = True
        #: an exception that channel() fails with
        self.refuse_channel: Optional[Exception] = None
        #: channel number -> {method name: the exception the broker answers it with}
        self.channel_refusals: dict = {}
        #: an event list for the consumer channel's acks
        self.events: Optional[list] = None
        self._lost_waiters: Optional[List[Deferred]] = []

    # the backbone's side

    def channel(self) -> Deferred:
        if self.is_lost:
            return fail(amqp.ConnectionWrongStateError("Connection is closed."))
        if self.refuse_channel is not None:
            return fail(self.refuse_channel)
        channel = FakeChannel(self, len(self.channels) + 1)
        channel.events = self.events
        channel.refuse.update(self.channel_refusals.get(channel.number, {}))
        self.channels.append(channel)
        return succeed(channel)

    def close(self, reply_code: int = 200, reply_text: str = "Normal shutdown"):
        self.closes += 1
        if self.answers_close and not self.is_lost:
            self.transport.loseConnection()

    def abort(self) -> None:
        self.aborts += 1
        if not self.is_lost and self.transport is not None:
            self.transport.abortConnection()

    def when_lost(self) -> Deferred:
        if self._lost_waiters is None:
            return succeed(self.lost_reason.value)
        d = Deferred()
        self._lost_waiters.append(d)
        return d

    def connectionLost(self, reason=None):
        if reason is None:
            reason = Failure(error.ConnectionDone())
        self.is_lost = True
        self.lost_reason = reason
        try:
            d, self.ready = self.ready, None
            if d is not None:
                d.errback(reason)
            for channel in self.channels:
                channel.close(amqp.StreamLostError(str(reason.value)))
        finally:
            waiters, self._lost_waiters = self._lost_waiters, None
            for d in waiters:
                d.callback(reason.value)

    # the test's side

    def handshake(self) -> None:
        """The AMQP handshake completes: ``ready`` fires (and is None from then on)."""
        d, self.ready = self.ready, None
        d.callback(None)

    def refuse(self, e: Exception) -> None:
        """The broker refuses the connection (credentials, vhost) and closes it."""
        d, self.ready = self.ready, None
        d.errback(e)
        self.transport.drop(error.ConnectionDone())

    @property
    def publisher(self) -> FakeChannel:
        return self.channels[0]

    @property
    def consumer(self) -> FakeChannel:
        return self.channels[1]


# --- the transport and the endpoint


@implementer(ITransport)
class FakeTransport:
    """A TCP connection: closing it ends it in the next reactor turn."""

    disconnecting = False

    def __init__(self, clock: Clock, protocol):
        self.clock = clock
        self.protocol = protocol
        self.lost = False
        self.aborted = False
        self.written: List[bytes] = []

    def write(self, data):
        self.written.append(data)

    def writeSequence(self, data):
        self.written.extend(data)

    def getPeer(self):
        return IPv4Address("TCP", "192.0.2.1", 5672)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def loseConnection(self):
        self._end(error.ConnectionDone())

    def abortConnection(self):
        self.aborted = True
        self._end(error.ConnectionAborted())

    def _end(self, e):
        if self.disconnecting or self.lost:
            return
        self.disconnecting = True
        self.clock.callLater(0, self.drop, e)

    def drop(self, e: Optional[Exception] = None):
        """The connection ends now (e.g. the broker went); as the reactor does, an error is logged."""
        if self.lost:
            return
        self.lost = True
        try:
            self.protocol.connectionLost(Failure(e if e is not None else error.ConnectionLost()))
        except Exception:
            legacy_log.err(None, "connectionLost raised")


class Attempt:
    """One connection attempt of the endpoint, answered by the test."""

    def __init__(self, endpoint: "FakeEndpoint", factory):
        self.endpoint = endpoint
        self.factory = factory
        self.cancelled = False
        self.deferred = Deferred(self._cancel)
        self.protocol = None
        self.transport: Optional[FakeTransport] = None

    def _cancel(self, d):
        self.cancelled = True

    def connect(self):
        """The TCP connection is made: build the protocol, connect it, fire with it."""
        proto = self.factory.buildProtocol(None)
        self.transport = FakeTransport(self.endpoint.clock, proto)
        proto.makeConnection(self.transport)
        self.protocol = proto
        self.deferred.callback(proto)
        return proto

    def fail(self, e: Exception) -> None:
        self.deferred.errback(e)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """An endpoint whose attempts wait for the test (``attempts[-1].connect()``)."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.attempts: List[Attempt] = []

    def connect(self, factory) -> Deferred:
        attempt = Attempt(self, factory)
        self.attempts.append(attempt)
        return attempt.deferred


# --- a backbone wired to the fakes


class Harness:
    """A backbone on a Clock, with a fake endpoint and fake pika connections."""

    def __init__(self, testcase, on_fatal=True, jitter=0.0, **config):
        if jitter is not None:
            # ClientService's backoff adds up to a second at random: none here
            testcase.patch(
                service, "backoffPolicy", lambda **kw: backoffPolicy(jitter=lambda: jitter, **kw)
            )
        self.clock = Clock()
        self.metrics = Metrics()
        self.events: list = []
        self.delivered: list = []
        self.fatal: list = []
        self.endpoint = FakeEndpoint(self.clock)
        self.connections: List[FakeConnection] = []
        self.config = RabbitMQConfig(
            **{"queue": QueueConfig(name_suffix="test"), "resubscribe_grace": 0, **config}
        )
        self.backbone = RabbitMQBackbone(
            self.config,
            self.metrics,
            self.clock,
            on_fatal=self.fatal.append if on_fatal is True else on_fatal,
            connector=Connector(self.endpoint, self._protocol),
        )
        self.backbone.attach(self._deliver)

    def _protocol(self) -> FakeConnection:
        connection = FakeConnection(len(self.connections))
        connection.events = self.events
        self.connections.append(connection)
        return connection

    def _deliver(self, message):
        self.delivered.append(message)
        self.events.append(("deliver", getattr(message, "id", None)))

    @property
    def attempts(self) -> List[Attempt]:
        return self.endpoint.attempts

    @property
    def connection(self) -> FakeConnection:
        return self.connections[-1]

    def connect(self) -> FakeConnection:
        """The latest attempt's TCP connection is made (no handshake yet)."""
        self.attempts[-1].connect()
        return self.connections[-1]

    def up(self) -> FakeConnection:
        """The latest attempt succeeds: connected, handshake, channels, topology; a turn passes."""
        connection = self.connect()
        connection.handshake()
        self.clock.advance(0)
        return connection

    def start_up(self) -> FakeConnection:
        self.backbone.startService()
        return self.up()

    def queue(self, kind: str) -> str:
        return self.backbone.topology.queues[kind]

    def deliver(self, kind: str, tag: int, body: bytes, message_id=None, content_type=None,
                connection: Optional[FakeConnection] = None) -> None:
        connection = connection or self.connection
        connection.consumer.deliver(self.queue(kind), tag, body, message_id, content_type)

    def retry_delay(self) -> float:
        """The delay of the one timer pending (ClientService's retry)."""
        [call] = self.clock.getDelayedCalls()
        return call.getTime() - self.clock.seconds()

    def after_retry(self) -> None:
        """Let the pending retry timer run: a new attempt begins."""
        self.clock.advance(self.retry_delay())
