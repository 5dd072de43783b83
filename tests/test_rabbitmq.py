"""
The RabbitMQ backbone: unit tests with fakes, and tests against a real broker
on 127.0.0.1:5672 (guest/guest). Without a broker those are skipped, except in
CI (CI=true), where they fail.

Every broker test names its exchanges and queues with a unique tag (through
``naming_join_pattern``) and deletes them at the end.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import uuid
from datetime import datetime

import attrs
import pika
from pika import exceptions as amqp
from pika import spec
from pika.adapters.twisted_connection import (
    ClosableDeferredQueue,
    ReceivedMessage,
    TwistedProtocolConnection,
)
from twisted.application.service import IService
from twisted.internet import defer, error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, formatEvent
from twisted.protocols import portforward
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support import (
    App,
    Context,
    drain,
    publish_until_seen,
    require_service,
    settle,
    start_bus,
    wait_for,
)
from txthreatbus import codec, logs
from txthreatbus.backbones import rabbitmq
from txthreatbus.backbones.rabbitmq import (
    CONNECT_TIMEOUT,
    DRAIN_TIMEOUT,
    MESSAGE_OVERHEAD,
    NACK_RETRY_DELAY,
    TYPES,
    DedupWindow,
    RabbitMQBackbone,
    diagnose,
    queue_arguments,
)
from txthreatbus.config import (
    Config,
    ConfigError,
    QueueConfig,
    RabbitMQConfig,
    ZmqAppConfig,
    parse,
)
from txthreatbus.interfaces import IBackbone
from txthreatbus.metrics import Metrics
from txthreatbus.model import Intel, IntelData, IntelType, Operation, Sighting

BROKER = ("127.0.0.1", 5672)
KINDS = tuple(TYPES.values())


# --- helpers


def intel(id: str) -> Intel:
    return Intel(
        ts=datetime(2020, 11, 26, 14, 46, 52, 123456),
        id=id,
        data=IntelData(indicator=("example.com",), intel_type=IntelType.DOMAIN),
        operation=Operation.ADD,
    )


def big_intel(id: str, size: int = 1 << 20) -> Intel:
    """Intel whose encoding is a little over ``size`` bytes."""
    return Intel(
        ts=datetime(2020, 11, 26, 14, 46, 52, 123456),
        id=id,
        data=IntelData(indicator=("x" * size + ".example",), intel_type=IntelType.DOMAIN),
        operation=Operation.ADD,
    )


def held(message) -> int:
    """What holding ``message`` counts against buffer_bytes."""
    return len(codec.encode(message)) + MESSAGE_OVERHEAD


def intel_json(id: str) -> dict:
    return codec.unstructure(intel(id))


def capture_logs(testcase) -> list:
    """The events that txthreatbus logs during the test."""
    events = []
    logs.publisher.addObserver(events.append)
    testcase.addCleanup(logs.publisher.removeObserver, events.append)
    return events


def logged(events, level) -> list:
    return [formatEvent(e) for e in events if e.get("log_level") == level]


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0


def backbone_sample(metrics: Metrics, what: str) -> float:
    return sample(metrics, f"txthreatbus_backbone_{what}_total", backbone="rabbitmq")


# --- fakes


class FakeConnection:
    """The part of a pika connection that the backbone touches."""

    def __init__(self):
        self.is_lost = False
        self.transport = self
        self.closes = 0
        self._waiters = []

    def abortConnection(self):
        self.drop(error.ConnectionAborted())

    def close(self):
        self.closes += 1
        self.drop(error.ConnectionDone())

    def drop(self, reason=None):
        if not self.is_lost:
            self.is_lost = True
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(reason)

    def when_lost(self):
        if self.is_lost:
            return defer.succeed(None)
        d = Deferred()
        self._waiters.append(d)
        return d


class FakeChannel:
    """The part of a pika TwistedChannel that the backbone touches."""

    def __init__(self, events=None):
        self.on_closed = Deferred()
        self.published = []  # (exchange, body, properties, confirm Deferred)
        self.acked = []
        self.events = events

    def basic_publish(self, exchange, routing_key, body, properties):
        d = Deferred()
        self.published.append((exchange, body, properties, d))
        return d

    def basic_ack(self, delivery_tag):
        self.acked.append(delivery_tag)
        if self.events is not None:
            self.events.append(("ack", delivery_tag))

    def confirm(self, n=None):
        """Confirm the first ``n`` (default: all) unconfirmed publishes."""
        pending = [p for p in self.published if not p[3].called]
        for p in pending[:n]:
            p[3].callback(spec.Basic.Ack())

    def ids(self):
        return [p[2].message_id for p in self.published]

    def bodies(self):
        return [json.loads(p[1])["id"] for p in self.published]


class FakeSession:
    def __init__(self, events=None):
        self.connection = FakeConnection()
        self.publisher = FakeChannel()
        self.consumer = FakeChannel(events)
        self.queues = {kind: ClosableDeferredQueue() for kind in KINDS}
        self.session = rabbitmq._Session(
            self.connection,
            self.publisher,
            (self.publisher, self.consumer),
            list(self.queues.items()),
        )

    def deliver(self, kind, tag, body, message_id=None):
        self.queues[kind].put(
            ReceivedMessage(
                self.consumer,
                spec.Basic.Deliver(delivery_tag=tag),
                pika.BasicProperties(message_id=message_id),
                body,
            )
        )


class Harness:
    """A backbone on a Clock whose connection attempts the test answers."""

    def __init__(self, testcase, **config):
        self.clock = Clock()
        self.metrics = Metrics()
        self.events = []
        self.delivered = []
        self.fatal = []
        self.attempts = []
        self.config = RabbitMQConfig(**{"queue": QueueConfig(name_suffix="test"), "resubscribe_grace": 0, **config})
        self.backbone = RabbitMQBackbone(
            self.config, self.metrics, self.clock, on_fatal=self.fatal.append
        )
        self.backbone.attach(self._deliver)
        testcase.patch(self.backbone, "_open", self._open)

    def _deliver(self, message):
        self.delivered.append(message)
        self.events.append(("deliver", getattr(message, "id", None)))

    def _open(self):
        d = Deferred()
        self.attempts.append(d)
        return d

    def up(self) -> FakeSession:
        """Let the latest connection attempt succeed."""
        fake = FakeSession(self.events)
        self.attempts[-1].callback(fake.session)
        return fake

    def start_up(self) -> FakeSession:
        self.backbone.startService()
        return self.up()


# --- unit tests


class NamingTests(SynchronousTestCase):
    """Exchange and queue names and arguments, as Threat Bus 2020.11.26 makes them."""

    def test_provides_ibackbone(self):
        """The backbone provides IBackbone and IService and is named "backbone"."""
        backbone = RabbitMQBackbone(RabbitMQConfig(), Metrics(), Clock())
        self.assertTrue(verifyObject(IBackbone, backbone))
        self.assertTrue(verifyObject(IService, backbone))
        self.assertEqual(backbone.name, "backbone")

    def test_threat_bus_names(self):
        """One fanout exchange per type, one queue per instance and type, as in Threat Bus."""
        backbone = RabbitMQBackbone(
            RabbitMQConfig(queue=QueueConfig(name_suffix="box1")), Metrics(), Clock()
        )
        self.assertEqual(
            backbone.exchanges,
            {k: f"threatbus.{k}" for k in KINDS},
        )
        self.assertEqual(backbone.queues["intel"], "threatbus.intel.box1")
        self.assertEqual(backbone.queues["snapshotenvelope"], "threatbus.snapshotenvelope.box1")

    def test_hostname_suffix_and_join_pattern(self):
        """Without name_suffix the queues end in the hostname; naming_join_pattern joins."""
        backbone = RabbitMQBackbone(RabbitMQConfig(naming_join_pattern="-"), Metrics(), Clock())
        self.assertEqual(backbone.exchanges["sighting"], "threatbus-sighting")
        self.assertEqual(backbone.queues["sighting"], "threatbus-sighting-" + socket.gethostname())

    def test_queue_arguments(self):
        """lazy gives x-queue-mode lazy (else default); max_items > 0 gives x-max-length."""
        self.assertEqual(queue_arguments(QueueConfig()), {"x-queue-mode": "lazy"})
        self.assertEqual(
            queue_arguments(QueueConfig(lazy=False, max_items=7)),
            {"x-queue-mode": "default", "x-max-length": 7},
        )

    def test_diagnose(self):
        """Start-up failures are explained in one line naming the broker and the cause."""
        config = RabbitMQConfig(host="mq", port=5673, username="bus", vhost="/tb")

        def text(e):
            return diagnose(Failure(e), config)

        self.assertEqual(
            text(error.ConnectionRefusedError()),
            "cannot reach RabbitMQ at mq:5673: Connection was refused by other side",
        )
        self.assertEqual(
            text(amqp.ConnectionClosedByBroker(403, "ACCESS_REFUSED - Login was refused")),
            "RabbitMQ at mq:5673 refused the credentials for user 'bus'",
        )
        self.assertIn(
            "refused user 'bus' access to vhost '/tb'",
            text(amqp.ConnectionClosedByBroker(530, "NOT_ALLOWED")),
        )
        self.assertIn(
            "refused to set up the exchanges and queues: 406 PRECONDITION_FAILED",
            text(amqp.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg")),
        )
        self.assertIn("did not answer within", text(defer.TimeoutError()))


class DedupWindowTests(SynchronousTestCase):
    """The window of recent message ids."""

    def test_repeat_within_window(self):
        """An id seen within the window is a repeat; a new one is not."""
        window = DedupWindow(3)
        self.assertFalse(window.seen("a"))
        self.assertTrue(window.seen("a"))
        self.assertFalse(window.seen("b"))

    def test_oldest_forgotten(self):
        """Past ``size`` ids, the least recently seen id is forgotten."""
        window = DedupWindow(2)
        for i in "abc":
            window.seen(i)
        self.assertEqual(len(window), 2)
        self.assertFalse(window.seen("a"))

    def test_seeing_again_refreshes(self):
        """Seeing an id again makes it the most recent."""
        window = DedupWindow(2)
        window.seen("a")
        window.seen("b")
        window.seen("a")
        window.seen("c")  # forgets b, not a
        self.assertTrue(window.seen("a"))
        self.assertFalse(window.seen("b"))


class PublishTests(SynchronousTestCase):
    """What the backbone sends, and what it keeps until the broker confirms."""

    def test_persistent_with_message_id(self):
        """A message goes to its type's exchange as protocol JSON, persistent, with a uuid4 id."""
        h = Harness(self)
        fake = h.start_up()
        message = intel("i-1")
        h.backbone.publish(message)
        [(exchange, body, properties, _)] = fake.publisher.published
        self.assertEqual(exchange, "threatbus.intel")
        self.assertEqual(body, codec.encode(message))
        self.assertEqual(properties.delivery_mode, 2)
        self.assertEqual(uuid.UUID(properties.message_id).version, 4)
        self.assertEqual(backbone_sample(h.metrics, "published"), 1)

    def test_sighting_exchange(self):
        """A Sighting goes to the sighting exchange."""
        h = Harness(self)
        fake = h.start_up()
        h.backbone.publish(Sighting(ts=datetime(2020, 1, 1), intel="i-1"))
        self.assertEqual(fake.publisher.published[0][0], "threatbus.sighting")

    def test_local_traffic_goes_through_the_broker(self):
        """Publishing does not deliver to the local bus: only what comes from the broker does."""
        h = Harness(self)
        h.start_up()
        h.backbone.publish(intel("i-1"))
        self.assertEqual(h.delivered, [])

    def test_buffers_while_disconnected_and_drops_oldest(self):
        """While disconnected, messages wait in a bounded buffer; overflow drops the oldest."""
        events = capture_logs(self)
        h = Harness(self, buffer_bytes=3 * held(intel("i-0")))
        h.backbone.startService()
        for i in range(5):
            h.backbone.publish(intel(f"i-{i}"))
        self.assertEqual(h.metrics.dropped("backbone_buffer_overflow"), 2)
        warnings = [w for w in logged(events, LogLevel.warn) if "buffer is full" in w]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(h.backbone.pending, 3)
        fake = h.up()
        self.assertEqual(fake.publisher.bodies(), ["i-2", "i-3", "i-4"])

    def test_window_of_unconfirmed(self):
        """At most a window of messages is unconfirmed; the rest are sent as confirms come."""
        self.patch(rabbitmq, "MAX_IN_FLIGHT", 5)
        h = Harness(self)
        fake = h.start_up()
        for i in range(8):
            h.backbone.publish(intel(f"i-{i}"))
        self.assertEqual(len(fake.publisher.published), 5)
        self.assertEqual(h.backbone.pending, 8)
        fake.publisher.confirm(2)
        self.assertEqual(len(fake.publisher.published), 7)
        fake.publisher.confirm()
        fake.publisher.confirm()
        self.assertEqual(fake.publisher.bodies(), [f"i-{i}" for i in range(8)])
        self.assertEqual(h.backbone.pending, 0)

    def test_unconfirmed_resent_after_reconnect(self):
        """What was sent but not confirmed when the connection dropped is re-sent, same ids."""
        h = Harness(self)
        first = h.start_up()
        for i in range(3):
            h.backbone.publish(intel(f"i-{i}"))
        first.publisher.confirm(1)
        ids = first.publisher.ids()
        first.connection.drop(error.ConnectionLost())
        self.assertFalse(h.backbone.connected)
        h.backbone.publish(intel("i-3"))
        self.assertEqual(h.backbone.pending, 3)
        h.clock.advance(rabbitmq.FIRST_RETRY_DELAY)
        second = h.up()
        self.assertEqual(second.publisher.bodies(), ["i-1", "i-2", "i-3"])
        self.assertEqual(second.publisher.ids()[:2], ids[1:])
        self.assertEqual(backbone_sample(h.metrics, "reconnects"), 1)
        self.assertEqual(h.fatal, [])

    def test_confirm_of_a_lost_connection_ignored(self):
        """A confirm arriving from a connection already lost changes nothing."""
        h = Harness(self)
        first = h.start_up()
        h.backbone.publish(intel("i-0"))
        late = first.publisher.published[0][3]
        first.connection.drop(error.ConnectionLost())
        late.callback(spec.Basic.Ack())
        self.assertEqual(h.backbone.pending, 1)

    def test_nacked_message_resent(self):
        """A message the broker refuses (nack) is sent again, with the same id, after a pause."""
        h = Harness(self)
        fake = h.start_up()
        h.backbone.publish(intel("i-0"))
        fake.publisher.published[0][3].errback(amqp.NackError([]))
        self.assertEqual(len(fake.publisher.published), 1)
        h.clock.advance(NACK_RETRY_DELAY)
        self.assertEqual(len(fake.publisher.published), 2)
        self.assertEqual(fake.publisher.ids()[0], fake.publisher.ids()[1])

    def test_nacked_while_stopping(self):
        """A message refused while stopping is sent again; stopping leaves no timer behind."""
        h = Harness(self)
        fake = h.start_up()
        h.backbone.publish(intel("i-0"))
        d = h.backbone.stopService()
        fake.publisher.published[0][3].errback(amqp.NackError([]))
        h.clock.advance(NACK_RETRY_DELAY)
        self.assertEqual(len(fake.publisher.published), 2)
        fake.publisher.published[1][3].errback(amqp.NackError([]))
        h.clock.advance(DRAIN_TIMEOUT)
        self.successResultOf(d)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.metrics.dropped("backbone_unsent"), 1)

    def test_channel_closed_reconnects(self):
        """A channel closed by the broker drops the connection and reconnects."""
        h = Harness(self)
        fake = h.start_up()
        fake.publisher.on_closed.callback(amqp.ChannelClosedByBroker(404, "NOT_FOUND"))
        self.assertTrue(fake.connection.is_lost)
        h.clock.advance(rabbitmq.FIRST_RETRY_DELAY)
        self.assertEqual(len(h.attempts), 2)

    def test_publish_after_stop_dropped(self):
        """What is published after the backbone stopped is dropped and counted."""
        h = Harness(self)
        h.backbone.stopService()
        h.backbone.publish(intel("i-0"))
        self.assertEqual(h.metrics.dropped("backbone_stopped"), 1)


class BufferTests(SynchronousTestCase):
    """The outgoing buffer: bounded in bytes, whatever the size of the messages."""

    def test_large_messages_count_by_size(self):
        """A few 1 MB messages fill a 2.5 MB buffer that holds hundreds of small ones."""
        h = Harness(self, buffer_bytes=5 << 19)  # 2.5 MiB
        h.backbone.startService()
        for i in range(300):
            h.backbone.publish(intel(f"i-{i}"))
        self.assertEqual(h.metrics.dropped("backbone_buffer_overflow"), 0)
        self.assertEqual(h.backbone.pending_bytes, sum(held(intel(f"i-{i}")) for i in range(300)))
        for i in range(3):
            h.backbone.publish(big_intel(f"big-{i}"))
        # the 300 small ones and the first big one went, oldest first
        self.assertEqual(h.metrics.dropped("backbone_buffer_overflow"), 301)
        self.assertEqual(h.backbone.pending, 2)
        self.assertEqual(h.backbone.pending_bytes, 2 * held(big_intel("big-1")))
        fake = h.up()
        self.assertEqual(fake.publisher.bodies(), ["big-1", "big-2"])

    def test_in_flight_counts(self):
        """Unconfirmed messages count against the bound; overflow drops the oldest not yet sent."""
        self.patch(rabbitmq, "MAX_IN_FLIGHT", 1)
        h = Harness(self, buffer_bytes=5 << 19)
        fake = h.start_up()
        for i in range(3):
            h.backbone.publish(big_intel(f"big-{i}"))
        self.assertEqual(fake.publisher.bodies(), ["big-0"])  # in flight, kept
        self.assertEqual(h.metrics.dropped("backbone_buffer_overflow"), 1)  # big-1
        fake.publisher.confirm()
        self.assertEqual(fake.publisher.bodies(), ["big-0", "big-2"])
        fake.publisher.confirm()
        self.assertEqual((h.backbone.pending, h.backbone.pending_bytes), (0, 0))

    def test_larger_than_the_buffer(self):
        """A message larger than the whole buffer is dropped at once and counted."""
        h = Harness(self, buffer_bytes=1 << 20)
        fake = h.start_up()
        h.backbone.publish(big_intel("big"))
        h.backbone.publish(intel("i-0"))
        self.assertEqual(h.metrics.dropped("backbone_buffer_overflow"), 1)
        self.assertEqual(fake.publisher.bodies(), ["i-0"])

    def test_resent_and_nacked_keep_their_bytes(self):
        """Messages re-sent after a lost connection or a nack are counted once, never dropped."""
        h = Harness(self, buffer_bytes=3 * held(intel("i-0")))
        first = h.start_up()
        for i in range(3):
            h.backbone.publish(intel(f"i-{i}"))
        first.publisher.published[0][3].errback(amqp.NackError([]))
        first.connection.drop(error.ConnectionLost())
        h.clock.advance(NACK_RETRY_DELAY)
        self.assertEqual(h.backbone.pending_bytes, 3 * held(intel("i-0")))
        second = h.up()
        second.publisher.confirm()
        self.assertEqual(second.publisher.bodies(), ["i-0", "i-1", "i-2"])
        self.assertEqual(h.metrics.dropped("backbone_buffer_overflow"), 0)
        self.assertEqual(h.backbone.pending_bytes, 0)

    def test_overflow_warning_throttled(self):
        """A long overflow logs one warning per 10 s, the next one counting the rest."""
        events = capture_logs(self)
        size = held(intel("i-0000"))
        h = Harness(self, buffer_bytes=size)  # one message
        h.backbone.startService()
        for i in range(1000):
            h.backbone.publish(intel(f"i-{i:04}"))
        h.clock.advance(10)
        h.backbone.publish(intel("i-last"))
        self.assertEqual(h.metrics.dropped("backbone_buffer_overflow"), 1000)
        first, second = [w for w in logged(events, LogLevel.warn) if "buffer is full" in w]
        self.assertIn(f"buffer is full ({size} bytes of messages", first)
        self.assertIn("998 more like it in the last 10.0 s", second)

    def test_stopped_empty(self):
        """Stopping with messages held leaves the buffer empty, its bytes counted unsent."""
        h = Harness(self)
        h.backbone.startService()
        h.backbone.publish(big_intel("big"))
        self.successResultOf(h.backbone.stopService())
        self.assertEqual((h.backbone.pending, h.backbone.pending_bytes), (0, 0))
        self.assertEqual(h.metrics.dropped("backbone_unsent"), 1)


class ConfigTests(SynchronousTestCase):
    """The backbone's buffer_bytes option."""

    def test_default(self):
        """buffer_bytes is 64 MiB unless set."""
        self.assertEqual(RabbitMQConfig().buffer_bytes, 67108864)
        loaded = parse("plugins: {backbones: {rabbitmq: {buffer_bytes: 1048576}}}")
        self.assertEqual(loaded.backbone.buffer_bytes, 1 << 20)

    def test_refused(self):
        """A buffer_bytes that is not a whole number > 0 is refused, naming the key."""
        for bad in ("0", "-1", "1.5", "true", "64MiB", "null"):
            e = self.assertRaises(
                ConfigError, parse, f"plugins: {{backbones: {{rabbitmq: {{buffer_bytes: {bad}}}}}}}"
            )
            self.assertIn("plugins.backbones.rabbitmq.buffer_bytes: must be a whole number > 0", str(e))

    def test_buffer_size_gone(self):
        """The message-count buffer_size option is gone: setting it is an unknown key."""
        e = self.assertRaises(
            ConfigError, parse, "plugins: {backbones: {rabbitmq: {buffer_size: 10}}}"
        )
        self.assertIn("plugins.backbones.rabbitmq.buffer_size: unknown key", str(e))


class ConnectionTests(SynchronousTestCase):
    """Connecting, failing to connect, and reconnecting with backoff."""

    def test_first_failure_is_fatal(self):
        """If the first connection fails: one critical line, on_fatal, and no retry."""
        events = capture_logs(self)
        h = Harness(self, host="127.0.0.1", port=5999)
        h.backbone.startService()
        h.attempts[0].errback(error.ConnectionRefusedError())
        [critical] = logged(events, LogLevel.critical)
        self.assertIn("cannot reach RabbitMQ at 127.0.0.1:5999", critical)
        self.assertEqual(len(h.fatal), 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_wait_for_broker(self):
        """With wait_for_broker, a broker missing at start is tried again with backoff, each try logged, never fatal."""
        events = capture_logs(self)
        h = Harness(self, host="127.0.0.1", port=5999, wait_for_broker=True, reconnect_max_delay=1.0)
        h.backbone.startService()
        for attempt in range(3):
            h.attempts[-1].errback(error.ConnectionRefusedError())
            h.clock.advance(1.0)
        warnings = logged(events, LogLevel.warn)
        self.assertEqual(len(warnings), 3)
        self.assertIn("cannot reach RabbitMQ at 127.0.0.1:5999", warnings[0])
        self.assertIn("waiting for the broker (wait_for_broker), next try in 0.25 s", warnings[0])
        self.assertEqual((h.fatal, logged(events, LogLevel.critical)), ([], []))
        h.up()
        self.assertTrue(h.backbone.connected)

    def test_first_attempt_timeout_is_fatal(self):
        """A first attempt that does not complete in time is fatal too: never a silent hang."""
        events = capture_logs(self)
        h = Harness(self)
        h.backbone.startService()
        h.clock.advance(CONNECT_TIMEOUT)
        self.assertEqual(len(h.fatal), 1)
        self.assertIn("did not answer", logged(events, LogLevel.critical)[0])

    def test_reconnect_backoff(self):
        """Once up, failures mean retries forever, each waiting twice as long, up to the maximum."""
        h = Harness(self, reconnect_max_delay=1.0)
        fake = h.start_up()
        fake.connection.drop(error.ConnectionLost())
        delays = []
        for _ in range(5):
            [call] = h.clock.getDelayedCalls()
            delays.append(call.getTime() - h.clock.seconds())
            h.clock.advance(delays[-1])
            h.attempts[-1].errback(error.ConnectionRefusedError())
        self.assertEqual(delays, [0.25, 0.5, 1.0, 1.0, 1.0])
        self.assertEqual(h.fatal, [])
        h.clock.advance(1.0)
        h.up()
        self.assertEqual(backbone_sample(h.metrics, "reconnects"), 1)

    def test_flapping_connection_logs_throttled(self):
        """A broker that drops every connection at once: one warning and one info per 10 s."""
        events = capture_logs(self)
        h = Harness(self)
        fake = h.start_up()
        for _ in range(20):
            fake.connection.drop(error.ConnectionLost())
            h.clock.advance(rabbitmq.FIRST_RETRY_DELAY)
            fake = h.up()
        self.assertEqual(backbone_sample(h.metrics, "reconnects"), 20)
        self.assertEqual(len([w for w in logged(events, LogLevel.warn) if "Lost" in w]), 1)
        self.assertEqual(len([i for i in logged(events, LogLevel.info) if "Reconnected" in i]), 1)

    def test_backoff_reset_after_success(self):
        """After a successful reconnection the next retry waits the first delay again."""
        h = Harness(self, reconnect_max_delay=4.0)
        fake = h.start_up()
        fake.connection.drop()
        h.clock.advance(0.25)
        h.attempts[-1].errback(error.ConnectionRefusedError())
        h.clock.advance(0.5)
        fake = h.up()
        fake.connection.drop()
        [call] = h.clock.getDelayedCalls()
        self.assertEqual(call.getTime() - h.clock.seconds(), 0.25)


class ConsumeTests(SynchronousTestCase):
    """What the backbone takes from the broker."""

    def test_ack_after_deliver(self):
        """A message is acked only after deliver(message) returned."""
        h = Harness(self)
        fake = h.start_up()
        fake.deliver("intel", 1, codec.encode(intel("i-1")), "m-1")
        self.assertEqual(h.events, [("deliver", "i-1"), ("ack", 1)])
        self.assertEqual(backbone_sample(h.metrics, "consumed"), 1)

    def test_resubscribe_grace(self):
        """Consuming waits resubscribe_grace after start (what arrives stays unacknowledged), then takes it all."""
        h = Harness(self, resubscribe_grace=10)
        fake = h.start_up()
        fake.deliver("intel", 1, codec.encode(intel("i-1")))
        h.clock.advance(9.9)
        self.assertEqual((h.delivered, fake.consumer.acked), ([], []))
        h.clock.advance(0.1)
        self.assertEqual(([m.id for m in h.delivered], fake.consumer.acked), (["i-1"], [1]))
        fake.deliver("intel", 2, codec.encode(intel("i-2")))
        self.assertEqual(len(h.delivered), 2)

    def test_costly_messages_let_the_reactor_run(self):
        """After batch_seconds of handling, consuming waits for the next reactor turn, and then goes on."""
        ticks = iter(range(1000))
        h = Harness(self)
        self.patch(h.backbone, "now", lambda: next(ticks) * 0.015)  # each message "takes" 15 ms
        fake = h.start_up()
        for tag in range(1, 4):
            fake.deliver("intel", tag, codec.encode(intel(f"i-{tag}")))
        self.assertEqual([m.id for m in h.delivered], ["i-1", "i-2"])
        h.clock.advance(0)
        self.assertEqual([m.id for m in h.delivered], ["i-1", "i-2", "i-3"])

    def test_every_type_delivered(self):
        """Messages from each of the four queues are decoded and delivered."""
        h = Harness(self)
        fake = h.start_up()
        request = {"snapshot_type": 1, "snapshot_id": "s", "snapshot": 60}
        envelope = {"snapshot_type": 1, "snapshot_id": "s", "body": intel_json("i-e")}
        sighting = {"ts": "2020-11-26 14:46:52", "intel": "i-1", "context": {}, "ioc": None}
        values = [intel_json("i-1"), sighting, request, envelope]
        kinds = ["intel", "sighting", "snapshotrequest", "snapshotenvelope"]
        for tag, (kind, value) in enumerate(zip(kinds, values)):
            fake.deliver(kind, tag, json.dumps(value).encode())
        self.assertEqual(
            [type(m).__name__ for m in h.delivered],
            ["Intel", "Sighting", "SnapshotRequest", "SnapshotEnvelope"],
        )

    def test_repeat_dropped(self):
        """A message whose id was seen recently is acked and dropped, not delivered twice."""
        h = Harness(self)
        fake = h.start_up()
        body = codec.encode(intel("i-1"))
        fake.deliver("intel", 1, body, "m-1")
        fake.deliver("intel", 2, body, "m-1")
        fake.deliver("intel", 3, body, "m-2")
        self.assertEqual(len(h.delivered), 2)
        self.assertEqual(fake.consumer.acked, [1, 2, 3])
        self.assertEqual(h.metrics.dropped("backbone_duplicate"), 1)

    def test_without_message_id_delivered(self):
        """Messages without message_id (from Threat Bus itself) are all delivered."""
        h = Harness(self)
        fake = h.start_up()
        body = codec.encode(intel("i-1"))
        fake.deliver("intel", 1, body)
        fake.deliver("intel", 2, body)
        self.assertEqual(len(h.delivered), 2)

    def test_malformed_acked_dropped_counted(self):
        """A malformed body is acked, dropped, counted and logged; the next message still goes."""
        events = capture_logs(self)
        h = Harness(self)
        fake = h.start_up()
        fake.deliver("intel", 1, b"{not json", "m-1")
        fake.deliver("sighting", 2, codec.encode(intel("i-1")), "m-2")  # wrong shape
        fake.deliver("intel", 3, codec.encode(intel("i-2")), "m-3")
        self.assertEqual([m.id for m in h.delivered], ["i-2"])
        self.assertEqual(fake.consumer.acked, [1, 2, 3])
        self.assertEqual(h.metrics.dropped("backbone_malformed"), 2)
        [warning] = [w for w in logged(events, LogLevel.warn) if "malformed" in w]
        self.assertIn("Dropped a malformed intel from RabbitMQ queue threatbus.intel.test", warning)

    def test_malformed_flood_throttled(self):
        """A flood of undecodable messages: every one counted, one log line per 10 s with a count."""
        events = capture_logs(self)
        h = Harness(self)
        self.patch(h.backbone, "now", lambda: 0.0)  # all in one reactor turn
        fake = h.start_up()
        for tag in range(10_000):
            fake.deliver("intel", tag, b"{not json", f"m-{tag}")
        h.clock.advance(10)
        fake.deliver("intel", 10_000, b"{not json", "m-last")
        self.assertEqual(h.metrics.dropped("backbone_malformed"), 10_001)
        self.assertEqual(len(fake.consumer.acked), 10_001)
        first, second = logged(events, LogLevel.warn)
        self.assertIn("Dropped a malformed intel from RabbitMQ", first)
        self.assertIn("9999 more like it in the last 10.0 s were counted, not logged", second)

    def test_malformed_counted_by_reason(self):
        """An undecodable message is counted by its DecodeError's reason, each reason throttled."""
        events = capture_logs(self)

        class TooDeep(codec.DecodeError):
            reason = "too_deep"

            def __init__(self, text):
                ValueError.__init__(self, text)

        def decode(topic, body, decode=codec.decode):
            if body == b"deep":
                raise TooDeep("nested deeper than allowed")
            return decode(topic, body)

        self.patch(codec, "decode", decode)
        h = Harness(self)
        fake = h.start_up()
        for tag in range(3):
            fake.deliver("intel", tag, b"deep")
            fake.deliver("intel", 10 + tag, b"{not json")
        self.assertEqual(h.metrics.dropped("backbone_too_deep"), 3)
        self.assertEqual(h.metrics.dropped("backbone_malformed"), 3)
        warnings = logged(events, LogLevel.warn)
        self.assertEqual(len(warnings), 2)
        self.assertIn("nested deeper than allowed", warnings[0])

    def test_repeats_logged_throttled(self):
        """Repeats of one message id, at will, give one debug line per 10 s."""
        events = capture_logs(self)
        h = Harness(self)
        fake = h.start_up()
        body = codec.encode(intel("i-1"))
        for tag in range(100):
            fake.deliver("intel", tag, body, "m-1")
        self.assertEqual(h.metrics.dropped("backbone_duplicate"), 99)
        self.assertEqual(len([d for d in logged(events, LogLevel.debug) if "repeat" in d]), 1)

    def test_bus_failure_still_acks(self):
        """If the bus raises while taking a message, that is logged and the message acked."""
        h = Harness(self)
        fake = h.start_up()

        def broken(message):
            raise RuntimeError("boom")

        h.backbone.attach(broken)
        fake.deliver("intel", 1, codec.encode(intel("i-1")), "m-1")
        self.assertEqual(fake.consumer.acked, [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_consumer_cancelled_reconnects(self):
        """A consumer cancelled by the broker (queue deleted) makes the backbone reconnect."""
        h = Harness(self)
        fake = h.start_up()
        fake.queues["intel"].close(amqp.ConsumerCancelled())
        self.assertTrue(fake.connection.is_lost)
        h.clock.advance(rabbitmq.FIRST_RETRY_DELAY)
        self.assertEqual(len(h.attempts), 2)

    def test_not_taken_while_stopping(self):
        """While stopping, messages are neither delivered nor acked: the broker keeps them."""
        h = Harness(self)
        fake = h.start_up()
        h.backbone.publish(intel("i-0"))
        h.backbone.stopService()  # waits for the confirm
        fake.deliver("intel", 1, codec.encode(intel("i-1")), "m-1")
        self.assertEqual(h.delivered, [])
        self.assertEqual(fake.consumer.acked, [])


class StopTests(SynchronousTestCase):
    """Stopping: drain, close, cancel timers; twice is harmless."""

    def test_stop_twice(self):
        """stopService returns a Deferred each time, closes the connection once, leaves no timer."""
        h = Harness(self)
        fake = h.start_up()
        first, second = h.backbone.stopService(), h.backbone.stopService()
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertIsNone(self.successResultOf(h.backbone.stopService()))
        self.assertEqual(fake.connection.closes, 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_stop_never_started(self):
        """A backbone that never started stops at once."""
        h = Harness(self)
        self.assertIsNone(self.successResultOf(h.backbone.stopService()))

    def test_stop_waits_for_confirms(self):
        """Stopping waits until the broker confirmed what was sent, then closes."""
        h = Harness(self)
        fake = h.start_up()
        h.backbone.publish(intel("i-0"))
        d = h.backbone.stopService()
        self.assertNoResult(d)
        self.assertEqual(fake.connection.closes, 0)
        fake.publisher.confirm()
        self.successResultOf(d)
        self.assertEqual(fake.connection.closes, 1)
        self.assertEqual(h.metrics.dropped("backbone_unsent"), 0)

    def test_stop_gives_up_on_drain(self):
        """Stopping waits for confirms only so long; what is still unconfirmed is counted unsent."""
        h = Harness(self)
        fake = h.start_up()
        h.backbone.publish(intel("i-0"))
        d = h.backbone.stopService()
        h.clock.advance(DRAIN_TIMEOUT)
        self.successResultOf(d)
        self.assertEqual(h.metrics.dropped("backbone_unsent"), 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertTrue(fake.connection.is_lost)

    def test_stop_while_connecting(self):
        """Stopping cancels a connection attempt in progress without calling it fatal."""
        h = Harness(self)
        h.backbone.startService()
        self.successResultOf(h.backbone.stopService())
        self.assertEqual(h.fatal, [])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_stop_while_waiting_to_reconnect(self):
        """Stopping cancels the reconnection timer and counts the buffered messages as unsent."""
        h = Harness(self)
        fake = h.start_up()
        fake.connection.drop()
        h.backbone.publish(intel("i-0"))
        self.successResultOf(h.backbone.stopService())
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.metrics.dropped("backbone_unsent"), 1)

    def test_start_guarded(self):
        """Starting twice connects once."""
        backbone = RabbitMQBackbone(RabbitMQConfig(), Metrics(), Clock())
        backbone.attach(lambda message: None)
        connects = []
        self.patch(backbone, "_connect", lambda: connects.append(1))
        backbone.startService()
        backbone.startService()
        self.assertEqual(connects, [1])

    def test_start_needs_attach(self):
        """Starting without a bus attached is an error, not a backbone that drops everything."""
        backbone = RabbitMQBackbone(RabbitMQConfig(), Metrics(), Clock())
        self.assertRaises(RuntimeError, backbone.startService)


# --- against a real broker


def require_broker(testcase) -> None:
    """Skip (fail in CI) unless the broker is reachable."""
    require_service(testcase, BROKER, "RabbitMQ broker (guest/guest)")


async def broker_connection() -> TwistedProtocolConnection:
    """A plain pika connection to the test broker."""
    connection = TwistedProtocolConnection(
        pika.ConnectionParameters(credentials=pika.PlainCredentials("guest", "guest"))
    )
    await connectProtocol(TCP4ClientEndpoint(reactor, *BROKER), connection)
    await connection.ready
    return connection


async def next_message(channel, queue: str, timeout: float = 10.0):
    """The next message on ``queue``, polled with basic_get."""
    found = []

    async def poll():
        message = await channel.basic_get(queue=queue, auto_ack=True)
        if message is not None:
            found.append(message)
        return found

    end = reactor.seconds() + timeout
    while not await poll():
        if reactor.seconds() > end:
            raise AssertionError(f"no message on {queue} within {timeout} s")
        await settle(0.01)
    return found[0]


def publish_many(backbone, ids) -> None:
    for i in ids:
        backbone.publish(intel(i))


def exactly_once(testcase, delivered, ids) -> None:
    counts = collections.Counter(m.id for m in delivered)
    testcase.assertEqual(set(counts), set(ids), "items lost, or foreign items delivered")
    repeated = {i: n for i, n in counts.items() if n != 1}
    testcase.assertEqual(repeated, {}, "items delivered more than once")


class _ProxyServer(portforward.ProxyServer):
    def connectionMade(self):
        self.factory.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.factory.connections.discard(self)
        super().connectionLost(reason)


class _ProxyClient(portforward.ProxyClient):
    def connectionMade(self):
        self.peer.factory.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.peer.factory.connections.discard(self)
        super().connectionLost(reason)


class _ProxyClientFactory(portforward.ProxyClientFactory):
    protocol = _ProxyClient


_ProxyServer.clientProtocolFactory = _ProxyClientFactory


class Proxy:
    """A TCP proxy on 127.0.0.1 to the broker, that can be cut and restored."""

    def __init__(self, target_port: int):
        self.factory = portforward.ProxyFactory(BROKER[0], target_port)
        self.factory.protocol = _ProxyServer
        self.factory.connections = set()
        self.port = 0
        self._listening = None

    def start(self):
        """Listen (again, on the same port once it has one)."""
        self._listening = reactor.listenTCP(self.port, self.factory, interface=BROKER[0])
        self.port = self._listening.getHost().port

    def cut(self):
        """Stop listening and abort every connection, both sides."""
        listening, self._listening = self._listening, None
        listening.stopListening()
        for connection in list(self.factory.connections):
            connection.transport.abortConnection()

    async def close(self):
        if self._listening is not None:
            await self._listening.stopListening()
            self._listening = None
        for connection in list(self.factory.connections):
            connection.transport.loseConnection()
        await wait_for(lambda: not self.factory.connections, what="the proxy to close")


class BrokerTestCase(TestCase):
    """A test against the broker, with exchanges and queues of its own."""

    timeout = 120

    def setUp(self):
        require_broker(self)
        self.tag = "t" + uuid.uuid4().hex[:10]
        self.queues_to_delete = []
        # registered first, so it runs last: after the backbones stopped
        self.addCleanup(lambda: defer.ensureDeferred(self._delete_broker_objects()))

    async def _delete_broker_objects(self):
        connection = await broker_connection()
        channel = await connection.channel()
        for queue in self.queues_to_delete:
            await channel.queue_delete(queue=queue)
        for kind in KINDS:
            await channel.exchange_delete(exchange=f"threatbus.{self.tag}.{kind}")
        await connection.close()

    async def channel(self):
        """A plain pika channel on the broker, closed at the end of the test."""
        connection = await broker_connection()
        self.addCleanup(connection.close)
        return await connection.channel()

    def config(self, suffix: str, port: int = BROKER[1], keep: bool = False, **options):
        """
        A backbone config of this test for instance ``suffix``: its queues
        vanish when unused or, with ``keep``, survive a lost connection and
        are deleted at the end of the test.
        """
        queue = QueueConfig(name_suffix=f"{self.tag}-{suffix}", durable=False, auto_delete=not keep)
        config = RabbitMQConfig(
            host=BROKER[0],
            port=port,
            naming_join_pattern=f".{self.tag}.",
            queue=queue,
            reconnect_max_delay=0.5,
            **{"resubscribe_grace": 0, **options},
        )
        if keep:
            self.queues_to_delete.extend(
                f"threatbus.{self.tag}.{kind}.{self.tag}.{queue.name_suffix}" for kind in KINDS
            )
        return config

    def backbone(self, config: RabbitMQConfig, on_fatal=None):
        """A started backbone, stopped at the end of the test, and the list it delivers to."""
        delivered = []
        backbone = RabbitMQBackbone(config, Metrics(), reactor, on_fatal=on_fatal or self._fatal)
        backbone.attach(delivered.append)
        backbone.startService()
        self.addCleanup(backbone.stopService)
        return backbone, delivered

    def _fatal(self, failure):
        self.fail(f"the backbone could not connect: {failure.value!r}")

    async def start_failure(self, config: RabbitMQConfig) -> str:
        """The critical line logged when a backbone of ``config`` fails to start."""
        events = capture_logs(self)
        fatal = []
        self.backbone(config, on_fatal=fatal.append)
        await wait_for(lambda: fatal, what="the start-up failure")
        [critical] = logged(events, LogLevel.critical)
        return critical


class BackboneBrokerTests(BrokerTestCase):
    """Backbones talking through a real broker."""

    async def test_ten_thousand_items(self):
        """10,000 items published at one instance reach both instances, none lost, none twice."""
        b1, got1 = self.backbone(self.config("a"))
        b2, got2 = self.backbone(self.config("b"))
        await wait_for(lambda: b1.connected and b2.connected, what="both backbones to connect")
        ids = [f"i-{n}" for n in range(10_000)]
        publish_many(b1, ids)
        await wait_for(lambda: min(len(got1), len(got2)) >= len(ids), 60, "10,000 items at both")
        await wait_for(lambda: b1.pending == 0, what="every confirm")
        await settle(0.2)
        exactly_once(self, got1, ids)
        exactly_once(self, got2, ids)
        self.assertEqual(backbone_sample(b1.metrics, "published"), 10_000)
        self.assertEqual(backbone_sample(b2.metrics, "consumed"), 10_000)
        await defer.gatherResults([b1.stopService(), b1.stopService(), b2.stopService()])
        self.assertFalse(b1.connected)

    async def test_survives_a_cut_connection(self):
        """Connections cut and restored mid-stream: afterwards every item arrived exactly once."""
        proxy = Proxy(BROKER[1])
        proxy.start()
        self.addCleanup(proxy.close)
        b1, got1 = self.backbone(self.config("a", port=proxy.port, keep=True))
        b2, got2 = self.backbone(self.config("b", port=proxy.port, keep=True))
        await wait_for(lambda: b1.connected and b2.connected, what="both backbones to connect")
        batches = [[f"i-{b}-{n}" for n in range(1000)] for b in range(4)]
        publish_many(b1, batches[0])
        await wait_for(lambda: len(got2) >= 300, what="the stream to flow")
        publish_many(b1, batches[1])
        self.assertGreater(b1.pending, 0)
        proxy.cut()  # the second batch is on its way, not yet confirmed
        await wait_for(lambda: not (b1.connected or b2.connected), what="the cut to be noticed")
        publish_many(b1, batches[2])  # waits in the buffer
        await settle(0.3)  # reconnection attempts fail
        proxy.start()
        publish_many(b1, batches[3])
        everything = [i for batch in batches for i in batch]
        await wait_for(
            lambda: min(len(got1), len(got2)) >= len(everything), 30, "every item at both"
        )
        await wait_for(lambda: b1.pending == 0, what="every confirm")
        await settle(0.3)
        exactly_once(self, got1, everything)
        exactly_once(self, got2, everything)
        self.assertGreaterEqual(backbone_sample(b1.metrics, "reconnects"), 1)
        self.assertGreaterEqual(backbone_sample(b2.metrics, "reconnects"), 1)

    async def test_threat_bus_interoperates(self):
        """We publish persistent protocol JSON with ids; Threat Bus's id-less messages arrive."""
        backbone, got = self.backbone(self.config("a"))
        await wait_for(lambda: backbone.connected, what="the backbone to connect")
        channel = await self.channel()
        frame = await channel.queue_declare(queue="", exclusive=True)
        queue = frame.method.queue
        await channel.queue_bind(queue=queue, exchange=backbone.exchanges["intel"])
        message = intel("from-us")
        backbone.publish(message)
        received = await next_message(channel, queue)
        self.assertEqual(json.loads(received.body), codec.unstructure(message))
        self.assertEqual(received.properties.delivery_mode, 2)
        self.assertIsNotNone(received.properties.message_id)
        # as Threat Bus 2020.11.26 publishes: the JSON body, no properties
        exchange = backbone.exchanges["intel"]
        body = json.dumps(intel_json("from-threat-bus")).encode()
        channel.basic_publish(exchange=exchange, routing_key="", body=body)
        channel.basic_publish(exchange=exchange, routing_key="", body=b"{oops")
        await wait_for(lambda: any(m.id == "from-threat-bus" for m in got), what="the intel")
        await wait_for(
            lambda: backbone.metrics.dropped("backbone_malformed") == 1, what="the malformed count"
        )

    async def test_queue_options_on_broker(self):
        """Every queue option shows on the broker: durable, auto_delete, exclusive, mode, length."""
        rabbitmqctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
        if not os.path.exists(rabbitmqctl):
            if os.environ.get("CI") == "true":
                self.fail("rabbitmqctl is not installed, and CI=true")
            raise SkipTest("rabbitmqctl is not installed")
        kept = self.config("kept", keep=True)
        kept = attrs.evolve(
            kept, queue=attrs.evolve(kept.queue, durable=True, lazy=True, max_items=1234)
        )
        other = self.config("other")
        other = attrs.evolve(
            other, queue=attrs.evolve(other.queue, exclusive=True, lazy=False, max_items=0)
        )
        b1, _ = self.backbone(kept)
        b2, _ = self.backbone(other)
        await wait_for(lambda: b1.connected and b2.connected, what="both backbones to connect")

        async def rabbitmqctl_json(*args):
            out, err, code = await getProcessOutputAndValue(
                rabbitmqctl, [*args, "--formatter", "json", "-q"], env=os.environ
            )
            self.assertEqual(code, 0, err)
            return json.loads(out)

        listed = await rabbitmqctl_json(
            "list_queues", "name", "durable", "auto_delete", "exclusive", "arguments"
        )
        queues = {}
        for q in listed:  # arguments: [[key, type, value], ...]
            arguments = {key: value for key, _type, value in q["arguments"]}
            queues[q["name"]] = (q["durable"], q["auto_delete"], q["exclusive"], arguments)
        for kind in KINDS:
            self.assertEqual(
                queues[b1.queues[kind]],
                (True, False, False, {"x-queue-mode": "lazy", "x-max-length": 1234}),
            )
            self.assertEqual(
                queues[b2.queues[kind]], (False, True, True, {"x-queue-mode": "default"})
            )
        listed = await rabbitmqctl_json("list_exchanges", "name", "type", "durable")
        exchanges = {e["name"]: e for e in listed}
        for kind in KINDS:
            exchange = exchanges[b1.exchanges[kind]]
            self.assertEqual((exchange["type"], exchange["durable"]), ("fanout", False))

    async def test_wrong_credentials(self):
        """Refused credentials: one clear critical line, and on_fatal; no silent hang."""
        critical = await self.start_failure(self.config("a", password="wrong-" + self.tag))
        self.assertIn("RabbitMQ at 127.0.0.1:5672 refused the credentials for user 'guest'",
                      critical)

    async def test_unknown_vhost(self):
        """A vhost the user may not use: one clear critical line naming it."""
        critical = await self.start_failure(self.config("a", vhost="/nope-" + self.tag))
        self.assertIn(f"refused user 'guest' access to vhost '/nope-{self.tag}'", critical)

    async def test_changed_queue_options(self):
        """Options that differ from the existing queues': one critical line naming the conflict."""
        config = self.config("a", keep=True)
        backbone, _ = self.backbone(config)
        await wait_for(lambda: backbone.connected, what="the backbone to connect")
        await backbone.stopService()
        changed = attrs.evolve(config, queue=attrs.evolve(config.queue, lazy=False))
        critical = await self.start_failure(changed)
        self.assertIn("refused to set up the exchanges and queues: 406 PRECONDITION_FAILED", critical)
        self.assertIn("x-queue-mode", critical)


class UnreachableBrokerTests(TestCase):
    """Start-up against a port where no broker listens (needs no broker)."""

    async def test_unreachable(self):
        """No broker at host:port: one clear critical line, and on_fatal; it stops cleanly."""
        events = capture_logs(self)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        fatal = []
        config = RabbitMQConfig(host="127.0.0.1", port=port)
        backbone = RabbitMQBackbone(config, Metrics(), reactor, on_fatal=fatal.append)
        backbone.attach(lambda message: None)
        backbone.startService()
        await wait_for(lambda: fatal, what="the start-up failure")
        [critical] = logged(events, LogLevel.critical)
        self.assertIn(f"cannot reach RabbitMQ at 127.0.0.1:{port}", critical)
        await backbone.stopService()


class BusBrokerTests(BrokerTestCase):
    """Whole buses (zmq-app, bus core, RabbitMQ backbone): two instances in one process."""

    async def start_two(self, **options):
        zmq_app = ZmqAppConfig(manage=0, pub=0, sub=0)
        tops = [
            start_bus(self, Config(backbone=self.config(name, **options), apps={"zmq-app": zmq_app}, store=None))
            for name in ("one", "two")
        ]
        backbones = [top.getServiceNamed("backbone") for top in tops]
        await wait_for(lambda: all(b.connected for b in backbones), what="the backbones")
        return tops

    async def test_intel_reaches_both_instances_once(self):
        """Intel published at instance 1 reaches a subscriber at each instance exactly once."""
        one, two = await self.start_two()
        ctx = Context(self)
        publisher = App.on(ctx, one)
        await publisher.subscribe(ctx, "threatbus/sighting")
        receivers = []
        for top in (one, two):
            app = App.on(ctx, top)
            await app.subscribe(ctx, "threatbus/intel")
            await app.wait_connected(top)
            receivers.append(app)
        await publish_until_seen(publisher, "threatbus/intel", intel_json("probe"), receivers)
        publisher.publish("threatbus/intel", intel_json("the-one"))
        seen = [[], []]

        def count(i):
            seen[i].extend(receivers[i].parse(f) for f in drain(receivers[i].sub))
            return sum(1 for suffix, body in seen[i] if body["id"] == "the-one")

        await wait_for(lambda: count(0) and count(1), what="the intel at both instances")
        await settle(0.3)
        self.assertEqual((count(0), count(1)), (1, 1))
        self.assertIn(("intel", intel_json("the-one")), seen[1])

    async def test_snapshot_crosses_instances(self):
        """A snapshot request reaches the other instance; the answer reaches the requester only."""
        one, two = await self.start_two()
        ctx = Context(self)
        server = App.on(ctx, two)
        await server.subscribe(ctx, "threatbus/intel")
        await server.wait_connected(two)
        bystander = App.on(ctx, one)
        await bystander.subscribe(ctx, "threatbus/intel")
        await bystander.wait_connected(one)
        probe = intel_json("probe")
        await publish_until_seen(server, "threatbus/intel", probe, [server, bystander])

        requester = App.on(ctx, one)
        await requester.subscribe(ctx, "threatbus/intel", snapshot=1)
        await requester.wait_connected(one)
        [(suffix, request)] = await server.receive(1)
        while (suffix, request) == ("intel", probe):  # a late copy, still crossing the broker
            [(suffix, request)] = await server.receive(1)
        self.assertEqual(suffix, "snapshotrequest")
        self.assertEqual((request["snapshot_type"], request["snapshot"]), (1, 86400))

        body = intel_json("from-the-past")
        envelope = {"snapshot_type": 1, "snapshot_id": request["snapshot_id"], "body": body}
        server.publish("threatbus/snapshotenvelope", envelope)
        [got] = await requester.receive(1)
        while got == ("intel", probe):  # a late copy reaches the requester too
            [got] = await requester.receive(1)
        self.assertEqual(got, ("intel", body))
        await settle(0.3)
        for app in (bystander, server):
            self.assertEqual([f for f in drain(app.sub) if b"from-the-past" in f], [])
        self.assertEqual([f for f in drain(requester.sub) if b"probe" not in f], [])

    async def test_stix_crosses_instances(self):
        """A STIX Indicator published at instance 1 reaches STIX apps at instance 2 as sent, and 2020 apps there as Intel."""
        one, two = await self.start_two()
        ctx = Context(self)
        publisher = App.on(ctx, one)
        await publisher.subscribe(ctx, "stix2/sighting")
        receivers = []
        for topic in ("stix2/indicator", "threatbus/intel"):
            app = App.on(ctx, two)
            await app.subscribe(ctx, topic)
            await app.wait_connected(two)
            receivers.append(app)
        indicator = {
            "type": "indicator",
            "spec_version": "2.1",
            "id": "indicator--6911104f-c504-4086-a15b-05e28cf73435",
            "pattern": "[domain-name:value = 'evil.example.com']",
            "pattern_type": "stix",
        }
        await publish_until_seen(publisher, "stix2/indicator", indicator, receivers)
        sent = json.dumps({**indicator, "name": "the-one"}).encode()
        publisher.pub.send(b"stix2/indicator " + sent)
        stix_app, old_app = receivers
        frames = await wait_for(
            lambda: [f for f in drain(stix_app.sub) if b"the-one" in f], what="the Indicator at instance 2"
        )
        self.assertEqual(frames, [stix_app.p2p.encode() + b"indicator " + sent])
        ((suffix, intel),) = await old_app.receive(1)  # the probes' Intel is the same
        self.assertEqual((suffix, intel["id"]), ("intel", indicator["id"]))
        self.assertEqual(intel["data"], {"indicator": ["evil.example.com"], "intel_type": 11})

    async def restart_two_while_publishing(self, grace: float) -> tuple:
        """
        Instance two stops while 100 intel are published at one, starts
        again, and an app subscribes there anew (as apps do when their
        heartbeat fails): what that app receives, and the instance's metrics.
        """
        one, two = await self.start_two(keep=True, resubscribe_grace=grace)
        ctx = Context(self)
        publisher, receiver = App.on(ctx, one), App.on(ctx, two)
        await publisher.subscribe(ctx, "threatbus/sighting")
        await receiver.subscribe(ctx, "threatbus/intel")
        await receiver.wait_connected(two)
        await publish_until_seen(publisher, "threatbus/intel", intel_json("probe"), [receiver])
        await two.stopService()
        for i in range(100):
            publisher.publish("threatbus/intel", intel_json(f"away-{i}"))
        await settle(0.3)  # at the broker, in two's queue
        two.startService()
        backbone = two.getServiceNamed("backbone")
        await wait_for(lambda: backbone.connected, what="two's backbone")
        await settle(0.5)  # apps notice a restart only at their next heartbeat
        again = App.on(ctx, two)
        await again.subscribe(ctx, "threatbus/intel")
        await again.wait_connected(two)
        got = set()

        def collect():
            got.update(again.parse(f)[1]["id"] for f in drain(again.sub))
            return len(got) >= 100

        try:
            await wait_for(collect, timeout=grace + 5, what="the intel published while away")
        except AssertionError:
            pass
        await settle(0.3)
        collect()
        return got, two.getServiceNamed("bus").metrics

    async def test_restarted_instance_loses_nothing(self):
        """What reached a restarted instance's queue while it was away reaches its apps once they subscribe again."""
        got, metrics = await self.restart_two_while_publishing(grace=2)
        self.assertEqual(got, {f"away-{i}" for i in range(100)})
        self.assertEqual(metrics.unrouted["intel"].value, 0)

    async def test_without_grace_counted(self):
        """Without the grace, the queue is consumed before apps are back: what no app got is counted, not silent."""
        got, metrics = await self.restart_two_while_publishing(grace=0)
        self.assertEqual((len(got), metrics.unrouted["intel"].value), (0, 100))
