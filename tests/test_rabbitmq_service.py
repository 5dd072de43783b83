"""
The RabbitMQ backbone as a service (``service.RabbitMQBackbone`` on
Twisted's ``ClientService``), with a fake ``Connector``: an endpoint whose
attempts the test answers and fake pika connections (tests/rabbitmq_fakes.py),
all on a Clock. Also ``connection.GatedEndpoint`` under a ClientService, and
the bus's service tree (``BusService.whenReady`` and ``fatal``).
"""

from __future__ import annotations

from datetime import datetime

from pika import exceptions as amqp
from twisted.application.internet import ClientService
from twisted.application.service import IService
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.rabbitmq_fakes import (
    FakeConnection,
    FakeEndpoint,
    Harness,
    backbone_sample,
    capture_logs,
    held,
    intel,
    logged,
)
from txthreatbus import codec
from txthreatbus.backbones.rabbitmq import batches, outgoing
from txthreatbus.backbones.rabbitmq.connection import CONNECT_TIMEOUT, GatedEndpoint
from txthreatbus.backbones.rabbitmq.outgoing import NACK_RETRY_DELAY
from txthreatbus.backbones.rabbitmq.service import CLOSE_TIMEOUT, DRAIN_TIMEOUT, FIRST_RETRY_DELAY
from txthreatbus.config import QueueConfig, RabbitMQConfig
from txthreatbus.interfaces import IBackbone
from txthreatbus.model import Sighting
from txthreatbus.services import BusService


class InterfaceTests(SynchronousTestCase):
    def test_provides_ibackbone(self):
        """The backbone provides IBackbone and IService and is named "backbone"."""
        h = Harness(self)
        self.assertTrue(verifyObject(IBackbone, h.backbone))
        self.assertTrue(verifyObject(IService, h.backbone))
        self.assertEqual(h.backbone.name, "backbone")

    def test_set_up_on_connect(self):
        """A connection: a publisher channel in confirm mode, a consumer channel with prefetch and the topology."""
        h = Harness(self, prefetch=50)
        connection = h.start_up()
        self.assertTrue(h.backbone.connected)
        self.assertTrue(connection.publisher.confirming)
        self.assertEqual(connection.consumer.prefetch, 50)
        declared = [kw["queue"] for method, kw in connection.consumer.calls if method == "queue_declare"]
        self.assertEqual(declared, list(h.backbone.topology.queues.values()))
        consumed = [kw["queue"] for method, kw in connection.consumer.calls if method == "basic_consume"]
        self.assertEqual(consumed, list(h.backbone.topology.queues.values()))


class PublishTests(SynchronousTestCase):
    """What the backbone sends, and what it keeps until the broker confirms."""

    def test_persistent_with_message_id(self):
        """A message goes to its type's exchange as protocol JSON, persistent, with a uuid4 id."""
        h = Harness(self)
        connection = h.start_up()
        message = intel("i-1")
        h.backbone.publish(message)
        h.clock.advance(0)
        [published] = connection.publisher.published
        self.assertEqual(published.exchange, "threatbus.intel")
        self.assertEqual(published.body, codec.encode(message))
        self.assertEqual(published.properties.content_type, "application/json")
        self.assertEqual(published.properties.delivery_mode, 2)
        self.assertEqual(len(published.properties.message_id), 36)
        self.assertEqual(backbone_sample(h.metrics, "published"), 1)

    def test_one_turn_one_batch(self):
        """What is published in one turn to one type goes as one AMQP message; each type apart."""
        h = Harness(self)
        connection = h.start_up()
        for i in range(3):
            h.backbone.publish(intel(f"i-{i}"))
        h.backbone.publish(Sighting(ts=datetime(2020, 1, 1), intel="i-1"))
        self.assertEqual(connection.publisher.published, [])
        h.clock.advance(0)
        intel_batch, sighting = connection.publisher.published
        self.assertEqual(intel_batch.properties.content_type, batches.BATCH)
        self.assertEqual(intel_batch.ids, ["i-0", "i-1", "i-2"])
        self.assertEqual(sighting.exchange, "threatbus.sighting")
        self.assertEqual(backbone_sample(h.metrics, "published"), 4)
        self.assertEqual(h.backbone.pending, 4)

    def test_batch_bytes_zero(self):
        """batch_bytes 0: each message at once, alone, as Threat Bus reads them."""
        h = Harness(self, batch_bytes=0)
        connection = h.start_up()
        h.backbone.publish(intel("i-0"))
        h.backbone.publish(intel("i-1"))
        self.assertEqual([p.ids for p in connection.publisher.published], [["i-0"], ["i-1"]])

    def test_not_a_message(self):
        h = Harness(self)
        self.assertRaises(TypeError, h.backbone.publish, object())

    def test_local_traffic_goes_through_the_broker(self):
        """Publishing does not deliver to the local bus: only what comes from the broker does."""
        h = Harness(self)
        h.start_up()
        h.backbone.publish(intel("i-1"))
        h.clock.advance(0)
        self.assertEqual(h.delivered, [])

    def test_buffers_while_disconnected_and_drops_oldest(self):
        """While disconnected, messages wait in a bounded buffer; overflow drops the oldest, one warning."""
        events = capture_logs(self)
        h = Harness(self, buffer_bytes=3 * held(intel("i-0")), batch_bytes=0, wait_for_broker=True)
        h.backbone.startService()
        for i in range(5):
            h.backbone.publish(intel(f"i-{i}"))
        self.assertEqual(h.metrics.dropped("backbone_buffer_overflow"), 2)
        warnings = [w for w in logged(events, LogLevel.warn) if "buffer is full" in w]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(h.backbone.pending, 3)
        self.assertEqual(h.backbone.pending_bytes, 3 * held(intel("i-0")))
        connection = h.up()
        self.assertEqual(connection.publisher.ids(), ["i-2", "i-3", "i-4"])

    def test_window_of_unconfirmed(self):
        """At most MAX_IN_FLIGHT messages are unconfirmed; the rest go as confirms come."""
        self.patch(outgoing, "MAX_IN_FLIGHT", 5)
        h = Harness(self, batch_bytes=0)
        connection = h.start_up()
        for i in range(8):
            h.backbone.publish(intel(f"i-{i}"))
        self.assertEqual(len(connection.publisher.published), 5)
        self.assertEqual(h.backbone.pending, 8)
        connection.publisher.confirm(2)
        self.assertEqual(len(connection.publisher.published), 7)
        connection.publisher.confirm()
        connection.publisher.confirm()
        self.assertEqual(connection.publisher.ids(), [f"i-{i}" for i in range(8)])
        self.assertEqual(h.backbone.pending, 0)

    def test_unconfirmed_resent_after_reconnect(self):
        """What was sent but not confirmed when the connection dropped is sent again, same ids."""
        h = Harness(self, batch_bytes=0)
        first = h.start_up()
        for i in range(3):
            h.backbone.publish(intel(f"i-{i}"))
        first.publisher.confirm(1)
        ids = first.publisher.message_ids()
        first.transport.drop(error.ConnectionLost())
        self.assertFalse(h.backbone.connected)
        h.backbone.publish(intel("i-3"))
        self.assertEqual(h.backbone.pending, 3)
        h.after_retry()
        second = h.up()
        self.assertEqual(second.publisher.ids(), ["i-1", "i-2", "i-3"])
        self.assertEqual(second.publisher.message_ids()[:2], ids[1:])
        self.assertEqual(backbone_sample(h.metrics, "reconnects"), 1)
        self.assertEqual(h.fatal, [])

    def test_nacked_message_resent(self):
        """A message the broker refuses (nack) is sent again, with the same id, after a pause."""
        h = Harness(self, batch_bytes=0)
        connection = h.start_up()
        h.backbone.publish(intel("i-0"))
        connection.publisher.nack()
        self.assertEqual(len(connection.publisher.published), 1)
        h.clock.advance(NACK_RETRY_DELAY)
        self.assertEqual(len(connection.publisher.published), 2)
        self.assertEqual(connection.publisher.message_ids()[0], connection.publisher.message_ids()[1])
        self.assertTrue(h.backbone.connected)

    def test_nacked_while_stopping(self):
        """A message refused while stopping is sent again; stopping leaves no timer behind."""
        h = Harness(self, batch_bytes=0)
        connection = h.start_up()
        h.backbone.publish(intel("i-0"))
        d = h.backbone.stopService()
        connection.publisher.nack()
        h.clock.advance(NACK_RETRY_DELAY)
        self.assertEqual(len(connection.publisher.published), 2)
        connection.publisher.nack()
        h.clock.advance(DRAIN_TIMEOUT)
        h.clock.advance(0)  # the connection closes
        self.successResultOf(d)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.metrics.dropped("backbone_unsent"), 1)

    def test_channel_closed_reconnects(self):
        """A channel closed by the broker drops the connection; the backbone reconnects."""
        h = Harness(self)
        connection = h.start_up()
        connection.publisher.close(amqp.ChannelClosedByBroker(404, "NOT_FOUND"))
        self.assertFalse(h.backbone.connected)
        self.assertTrue(connection.transport.aborted)
        h.clock.advance(0)  # the abort ends the connection
        self.assertTrue(connection.is_lost)
        h.after_retry()
        self.assertEqual(len(h.attempts), 2)
        h.up()
        self.assertTrue(h.backbone.connected)

    def test_publish_fails_reconnects(self):
        """A channel that fails under a publish drops the connection; the message goes on the next."""
        h = Harness(self, batch_bytes=0)
        connection = h.start_up()
        connection.publisher.publish_raises = amqp.ChannelWrongStateError("Channel is closed.")
        h.backbone.publish(intel("i-0"))
        self.assertFalse(h.backbone.connected)
        h.clock.advance(0)
        self.assertTrue(connection.is_lost)
        h.after_retry()
        second = h.up()
        self.assertEqual(second.publisher.ids(), ["i-0"])

    def test_publish_after_stop_dropped(self):
        """What is published after the backbone stopped is dropped and counted."""
        h = Harness(self)
        h.backbone.stopService()
        h.backbone.publish(intel("i-0"))
        self.assertEqual(h.metrics.dropped("backbone_stopped"), 1)
        self.assertEqual(h.backbone.pending, 0)


class ConsumeTests(SynchronousTestCase):
    """What the backbone takes from the broker."""

    def test_ack_after_deliver(self):
        """A message is acked only after deliver(message) returned."""
        h = Harness(self)
        h.start_up()
        h.deliver("intel", 1, codec.encode(intel("i-1")), "m-1")
        self.assertEqual(h.events, [("deliver", "i-1"), ("ack", 1)])
        self.assertEqual(backbone_sample(h.metrics, "consumed"), 1)

    def test_resubscribe_grace(self):
        """Consuming begins resubscribe_grace after start (what waits stays the broker's), then takes it all."""
        h = Harness(self, resubscribe_grace=10)
        connection = h.start_up()
        self.assertEqual([m for m, kw in connection.consumer.calls if m == "basic_consume"], [])
        h.clock.advance(9.9)
        self.assertEqual(connection.consumer.consumers, {})
        h.clock.advance(0.1)
        h.deliver("intel", 1, codec.encode(intel("i-1")))
        self.assertEqual(([m.id for m in h.delivered], connection.consumer.acked), (["i-1"], [1]))

    def test_grace_counts_from_start(self):
        """A reconnection after the grace period consumes at once; one within it waits for its end."""
        h = Harness(self, resubscribe_grace=10)
        first = h.start_up()
        first.transport.drop()
        h.after_retry()
        second = h.up()
        self.assertEqual(second.consumer.consumers, {})
        h.clock.advance(10)
        self.assertEqual(len(second.consumer.consumers), len(h.backbone.topology.queues))
        second.transport.drop()
        h.after_retry()
        third = h.up()
        self.assertEqual(len(third.consumer.consumers), len(h.backbone.topology.queues))

    def test_lost_during_grace(self):
        """A connection lost while waiting for the grace period never consumes."""
        h = Harness(self, resubscribe_grace=10)
        first = h.start_up()
        first.transport.drop()
        h.clock.advance(10)
        self.assertEqual(first.consumer.calls[-1][0], "queue_bind")

    def test_consumes_on_the_new_connection(self):
        """After a reconnection, deliveries come from the new connection's consumers."""
        h = Harness(self)
        first = h.start_up()
        first.transport.drop()
        h.after_retry()
        h.up()
        h.deliver("intel", 1, codec.encode(intel("i-1")), "m-1")
        self.assertEqual([m.id for m in h.delivered], ["i-1"])
        self.assertEqual(h.connection.consumer.acked, [1])

    def test_consumer_cancelled_reconnects(self):
        """A consumer cancelled by the broker (queue deleted) makes the backbone reconnect."""
        h = Harness(self)
        connection = h.start_up()
        connection.consumer.consumers[h.queue("intel")].close(amqp.ConsumerCancelled())
        self.assertFalse(h.backbone.connected)
        h.clock.advance(0)
        self.assertTrue(connection.is_lost)
        h.after_retry()
        self.assertEqual(len(h.attempts), 2)

    def test_repeat_across_reconnection_dropped(self):
        """A message given again on the next connection (its ack was lost) is acked and dropped."""
        h = Harness(self)
        first = h.start_up()
        body = codec.encode(intel("i-1"))
        h.deliver("intel", 1, body, "m-1")
        first.transport.drop()
        h.after_retry()
        h.up()
        h.deliver("intel", 1, body, "m-1")
        self.assertEqual(len(h.delivered), 1)
        self.assertEqual(h.connection.consumer.acked, [1])
        self.assertEqual(h.metrics.dropped("backbone_duplicate"), 1)

    def test_not_taken_while_stopping(self):
        """While stopping, messages are neither delivered nor acked: the broker keeps them."""
        h = Harness(self)
        connection = h.start_up()
        h.backbone.publish(intel("i-0"))
        h.backbone.stopService()  # waits for the confirm
        h.deliver("intel", 1, codec.encode(intel("i-1")), "m-1")
        self.assertEqual(h.delivered, [])
        self.assertEqual(connection.consumer.acked, [])


class ConnectionTests(SynchronousTestCase):
    """Connecting, failing to connect, and reconnecting with backoff."""

    def assert_fatal(self, h: Harness, events, why: str):
        """The first attempt failed: one critical line, on_fatal, whenReady failed, ClientService stopped."""
        ready = h.backbone.whenReady()
        h.clock.advance(0)
        [critical] = logged(events, LogLevel.critical)
        self.assertIn(why, critical)
        self.assertIn("wait_for_broker: true waits for it", critical)
        self.assertEqual(len(h.fatal), 1)
        self.failureResultOf(ready, type(h.fatal[0].value))
        self.assertFalse(h.backbone._client.running)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(1000)
        self.assertEqual(len(h.attempts), 1)
        self.assertFalse(h.backbone.connected)
        return critical

    def test_first_failure_is_fatal(self):
        """If the first connection fails: one critical line, on_fatal, whenReady fails, and no retry."""
        events = capture_logs(self)
        h = Harness(self, host="127.0.0.1", port=5999)
        h.backbone.startService()
        ready = h.backbone.whenReady()
        h.attempts[0].fail(error.ConnectionRefusedError())
        self.failureResultOf(ready, error.ConnectionRefusedError)
        self.assert_fatal(h, events, "cannot reach RabbitMQ at 127.0.0.1:5999")
        self.assertIsInstance(h.fatal[0].value, error.ConnectionRefusedError)

    def test_credentials_refused_is_fatal(self):
        """Refused credentials at the first connection: fatal, saying so."""
        events = capture_logs(self)
        h = Harness(self, username="bus")
        h.backbone.startService()
        h.connect().refuse(amqp.ConnectionClosedByBroker(403, "ACCESS_REFUSED"))
        self.assert_fatal(h, events, "refused the credentials for user 'bus'")

    def test_declaration_refused_is_fatal(self):
        """Queues that exist with other options at the first connection: fatal, saying so; the connection dropped."""
        events = capture_logs(self)
        h = Harness(self)
        h.backbone.startService()
        connection = h.connect()
        # the consumer channel (the second) is refused its queue declarations
        connection.channel_refusals[2] = {
            "queue_declare": amqp.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg 'x-queue-mode'")
        }
        connection.handshake()
        self.assertTrue(connection.transport.aborted)
        self.assert_fatal(h, events, "refused to set up the exchanges and queues: 406 PRECONDITION_FAILED")
        self.assertTrue(connection.is_lost)

    def test_first_attempt_timeout_is_fatal(self):
        """A first attempt that does not complete within CONNECT_TIMEOUT is fatal too: never a silent hang."""
        events = capture_logs(self)
        h = Harness(self)
        h.backbone.startService()
        connection = h.connect()  # TCP up, but the broker never answers
        h.clock.advance(CONNECT_TIMEOUT - 0.1)
        self.assertEqual(h.fatal, [])
        h.clock.advance(0.1)
        self.assertTrue(connection.transport.aborted)
        self.assert_fatal(h, events, f"did not answer within {CONNECT_TIMEOUT:g} s")

    def test_default_on_fatal_does_not_stop_the_reactor(self):
        """Without on_fatal, a failed start fails whenReady and stops the backbone's tries, nothing more."""
        from twisted.internet import reactor

        stops = []
        self.patch(reactor, "stop", lambda: stops.append(1))
        events = capture_logs(self)
        h = Harness(self, on_fatal=None)
        h.backbone.startService()
        ready = h.backbone.whenReady()
        h.attempts[0].fail(error.ConnectionRefusedError())
        h.clock.advance(0)
        self.failureResultOf(ready, error.ConnectionRefusedError)
        self.assertEqual(len(logged(events, LogLevel.critical)), 1)
        self.assertEqual(stops, [])
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.failureResultOf(h.backbone.whenReady(), error.ConnectionRefusedError)
        self.successResultOf(h.backbone.stopService())

    def test_when_ready(self):
        """whenReady fires once the first connection is set up, and at once from then on."""
        h = Harness(self)
        h.backbone.startService()
        ready = h.backbone.whenReady()
        connection = h.connect()
        self.assertNoResult(ready)
        connection.handshake()
        self.assertIsNone(self.successResultOf(ready))
        self.assertIsNone(self.successResultOf(h.backbone.whenReady()))

    def test_wait_for_broker(self):
        """With wait_for_broker, a broker missing at start is tried again, each try logged at warn, never fatal."""
        events = capture_logs(self)
        h = Harness(self, host="127.0.0.1", port=5999, wait_for_broker=True, reconnect_max_delay=1.0)
        h.backbone.startService()
        ready = h.backbone.whenReady()
        for attempt in range(3):
            h.attempts[-1].fail(error.ConnectionRefusedError())
            h.after_retry()
        self.assertEqual(len(h.attempts), 4)
        warnings = logged(events, LogLevel.warn)
        self.assertEqual(len(warnings), 3)
        for warning in warnings:
            self.assertIn("cannot reach RabbitMQ at 127.0.0.1:5999", warning)
            self.assertIn("waiting for the broker (wait_for_broker), next try in", warning)
        self.assertEqual((h.fatal, logged(events, LogLevel.critical)), ([], []))
        self.assertNoResult(ready)
        h.up()
        self.assertTrue(h.backbone.connected)
        self.successResultOf(ready)

    def test_wait_for_broker_delay_told(self):
        """Each warning tells the delay that the next try really waits, jitter included."""
        events = capture_logs(self)
        h = Harness(self, wait_for_broker=True, jitter=None)
        h.backbone.startService()
        for _ in range(5):
            h.attempts[-1].fail(error.ConnectionRefusedError())
            self.assertIn(f"next try in {h.retry_delay():.1f} s", logged(events, LogLevel.warn)[-1])
            h.after_retry()

    def test_reconnect_backoff(self):
        """Once up, failures mean tries forever: the first after FIRST_RETRY_DELAY, each next twice as long, up to the maximum."""
        h = Harness(self, reconnect_max_delay=1.0)
        connection = h.start_up()
        connection.transport.drop(error.ConnectionLost())
        delays = []
        for _ in range(5):
            delays.append(h.retry_delay())
            h.after_retry()
            h.attempts[-1].fail(error.ConnectionRefusedError())
        # service.py: "FIRST_RETRY_DELAY: Seconds before the first reconnection
        # attempt; each next one waits twice as long ... up to reconnect_max_delay"
        self.assertEqual(FIRST_RETRY_DELAY, 0.25)
        self.assertEqual(delays, [0.25, 0.5, 1.0, 1.0, 1.0])

    def test_reconnects_forever(self):
        """Once up, no failure is fatal: the backbone keeps trying, within reconnect_max_delay (plus jitter)."""
        h = Harness(self, reconnect_max_delay=2.0, jitter=None)
        connection = h.start_up()
        connection.transport.drop(error.ConnectionLost())
        for _ in range(20):
            self.assertLessEqual(h.retry_delay(), 3.0)
            h.after_retry()
            h.attempts[-1].fail(error.ConnectionRefusedError())
        self.assertEqual(h.fatal, [])
        h.after_retry()
        h.up()
        self.assertTrue(h.backbone.connected)
        self.assertEqual(backbone_sample(h.metrics, "reconnects"), 1)

    def test_backoff_reset_after_success(self):
        """After a successful reconnection the next try waits as long as the first did."""
        h = Harness(self, reconnect_max_delay=4.0)
        connection = h.start_up()
        connection.transport.drop()
        first = h.retry_delay()
        h.after_retry()
        h.attempts[-1].fail(error.ConnectionRefusedError())
        self.assertGreater(h.retry_delay(), first)
        h.after_retry()
        connection = h.up()
        connection.transport.drop()
        self.assertEqual(h.retry_delay(), first)

    def test_flapping_connection_logs_throttled(self):
        """A broker that drops every connection at once: one warning and one info per 10 s."""
        events = capture_logs(self)
        h = Harness(self)
        connection = h.start_up()
        for _ in range(20):
            connection.transport.drop(error.ConnectionLost())
            h.after_retry()
            connection = h.up()
        self.assertEqual(backbone_sample(h.metrics, "reconnects"), 20)
        lost = [w for w in logged(events, LogLevel.warn) if "Lost the connection to RabbitMQ" in w]
        self.assertEqual(len(lost), 1)
        self.assertIn("next try in", lost[0])
        self.assertEqual(len([i for i in logged(events, LogLevel.info) if "Reconnected" in i]), 1)

    def test_lost_while_preparing(self):
        """A connection lost during its handshake is a failed attempt: tried again, nothing logged as an error."""
        h = Harness(self)
        connection = h.start_up()
        connection.transport.drop()
        h.after_retry()
        second = h.connect()
        second.transport.drop(error.ConnectionLost())  # before the handshake
        h.after_retry()
        self.assertEqual(len(h.attempts), 3)
        h.up()
        self.assertTrue(h.backbone.connected)


class StopTests(SynchronousTestCase):
    """Stopping: drain, close, cancel timers; twice is harmless."""

    def test_stop_twice(self):
        """stopService returns a Deferred each time, closes the connection once, leaves no timer."""
        h = Harness(self)
        connection = h.start_up()
        first, second = h.backbone.stopService(), h.backbone.stopService()
        h.clock.advance(0)  # the broker answers the close
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertIsNone(self.successResultOf(h.backbone.stopService()))
        self.assertEqual(connection.closes, 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertFalse(h.backbone.running)

    def test_stop_never_started(self):
        """A backbone that never started stops at once."""
        h = Harness(self)
        self.assertIsNone(self.successResultOf(h.backbone.stopService()))

    def test_stop_waits_for_confirms(self):
        """Stopping waits until the broker confirmed what was sent, then closes."""
        h = Harness(self)
        connection = h.start_up()
        h.backbone.publish(intel("i-0"))
        d = h.backbone.stopService()
        self.assertNoResult(d)
        self.assertEqual(len(connection.publisher.published), 1)  # sent at once, not at the end of the turn
        self.assertEqual(connection.closes, 0)
        connection.publisher.confirm()
        self.assertEqual(connection.closes, 1)
        h.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(h.metrics.dropped("backbone_unsent"), 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_stop_gives_up_on_drain(self):
        """Stopping waits DRAIN_TIMEOUT for confirms; what is still unconfirmed is counted unsent, logged."""
        events = capture_logs(self)
        h = Harness(self)
        connection = h.start_up()
        h.backbone.publish(intel("i-0"))
        d = h.backbone.stopService()
        h.clock.advance(DRAIN_TIMEOUT - 0.1)
        self.assertEqual(connection.closes, 0)
        h.clock.advance(0.1)
        self.assertEqual(connection.closes, 1)
        h.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(h.metrics.dropped("backbone_unsent"), 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertTrue(connection.is_lost)
        self.assertIn("stopped with 1 messages", logged(events, LogLevel.warn)[0])

    def test_close_not_answered(self):
        """A broker that does not answer the close within CLOSE_TIMEOUT: the connection is dropped."""
        events = capture_logs(self)
        h = Harness(self)
        connection = h.start_up()
        connection.answers_close = False
        d = h.backbone.stopService()
        self.assertEqual(connection.closes, 1)
        h.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(connection.transport.aborted)
        h.clock.advance(0)
        self.successResultOf(d)
        self.assertTrue(connection.is_lost)
        self.assertIn("did not close the connection in time", logged(events, LogLevel.warn)[0])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_stop_while_connecting(self):
        """Stopping cancels a connection attempt in progress without calling it fatal."""
        events = capture_logs(self)
        h = Harness(self)
        h.backbone.startService()
        self.successResultOf(h.backbone.stopService())
        self.assertTrue(h.attempts[0].cancelled)
        self.assertEqual(h.fatal, [])
        self.assertEqual(logged(events, LogLevel.critical), [])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_stop_while_preparing(self):
        """Stopping during the handshake drops that connection, without calling it fatal."""
        events = capture_logs(self)
        h = Harness(self)
        h.backbone.startService()
        connection = h.connect()
        d = h.backbone.stopService()
        h.clock.advance(0)
        self.successResultOf(d)
        self.assertTrue(connection.is_lost)
        self.assertEqual(h.fatal, [])
        self.assertEqual(logged(events, LogLevel.critical), [])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_stop_while_waiting_to_reconnect(self):
        """Stopping cancels the reconnection timer and counts the buffered messages as unsent."""
        h = Harness(self)
        connection = h.start_up()
        connection.transport.drop()
        h.backbone.publish(intel("i-0"))
        self.successResultOf(h.backbone.stopService())
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.metrics.dropped("backbone_unsent"), 1)
        self.assertEqual((h.backbone.pending, h.backbone.pending_bytes), (0, 0))
        self.assertEqual(len(h.attempts), 1)

    def test_start_guarded(self):
        """Starting twice connects once."""
        h = Harness(self)
        h.backbone.startService()
        h.backbone.startService()
        self.assertEqual(len(h.attempts), 1)

    def test_start_needs_attach(self):
        """Starting without a bus attached is an error, not a backbone that drops everything."""
        from txthreatbus.backbones.rabbitmq import RabbitMQBackbone
        from txthreatbus.backbones.rabbitmq.connection import Connector
        from txthreatbus.metrics import Metrics

        clock = Clock()
        backbone = RabbitMQBackbone(
            RabbitMQConfig(queue=QueueConfig(name_suffix="t")), Metrics(), clock,
            connector=Connector(FakeEndpoint(clock), FakeConnection),
        )
        self.assertRaises(RuntimeError, backbone.startService)
        self.assertFalse(backbone.running)


class GatedEndpointTests(SynchronousTestCase):
    """connection.GatedEndpoint under a ClientService."""

    def setUp(self):
        self.clock = Clock()
        self.endpoint = FakeEndpoint(self.clock)
        self.failures = []
        self.gated = GatedEndpoint(self.endpoint, self.failures.append)
        self.protocols = []
        self.preparing = []

        def prepare(proxy):
            d = Deferred()
            self.preparing.append((proxy, d))
            return d

        from twisted.internet.protocol import Factory

        self.service = ClientService(
            self.gated, Factory.forProtocol(self._protocol), retryPolicy=lambda n: 1.0,
            clock=self.clock, prepareConnection=prepare,
        )
        self.addCleanup(self.service.stopService)

    def _protocol(self):
        protocol = FakeConnection(len(self.protocols))
        protocol.ready.addErrback(lambda f: None)  # no handshake here
        self.protocols.append(protocol)
        return protocol

    def test_why_the_gate(self):
        """Without the gate, ClientService has no transition for a loss while preparing: an error in the reactor."""
        from twisted.internet.protocol import Factory

        endpoint = FakeEndpoint(self.clock)
        service = ClientService(
            endpoint, Factory.forProtocol(self._protocol), retryPolicy=lambda n: 1.0,
            clock=self.clock, prepareConnection=lambda proxy: Deferred(),
        )
        service.startService()
        endpoint.attempts[0].connect()
        endpoint.attempts[0].transport.drop(error.ConnectionLost())
        [logged_error] = self.flushLoggedErrors()
        self.assertIn("NoTransition", type(logged_error.value).__name__)

    def test_lost_before_prepared(self):
        """A connection lost before prepared(proxy) reaches only its protocol, never ClientService."""
        self.service.startService()
        self.endpoint.attempts[0].connect()
        [(proxy, prepared)] = self.preparing
        self.endpoint.attempts[0].transport.drop(error.ConnectionLost())  # would be NoTransition
        self.assertTrue(self.protocols[0].is_lost)
        self.assertEqual(self.flushLoggedErrors(), [])
        prepared.errback(error.ConnectionLost())  # the attempt fails through prepareConnection
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.endpoint.attempts), 2)

    def test_lost_after_prepared(self):
        """A connection lost after prepared(proxy) makes ClientService reconnect."""
        self.service.startService()
        self.endpoint.attempts[0].connect()
        [(proxy, prepared)] = self.preparing
        self.gated.prepared(proxy)
        prepared.callback(None)
        self.assertIs(self.successResultOf(self.service.whenConnected()), self.protocols[0])
        self.endpoint.attempts[0].transport.drop(error.ConnectionLost())
        self.assertTrue(self.protocols[0].is_lost)
        self.clock.advance(1.0)
        self.assertEqual(len(self.endpoint.attempts), 2)

    def test_failure_heard(self):
        """on_failure hears why an attempt could not connect; ClientService too."""
        self.service.startService()
        d = self.service.whenConnected(failAfterFailures=1)
        self.endpoint.attempts[0].fail(error.ConnectionRefusedError())
        [failure] = self.failures
        self.assertTrue(failure.check(error.ConnectionRefusedError))
        self.failureResultOf(d, error.ConnectionRefusedError)

    def test_prepared_unknown(self):
        """prepared() of a proxy it does not know (lost already) does nothing."""
        self.gated.prepared(object())


class BusServiceTests(SynchronousTestCase):
    """The bus's service tree and its backbone: whenReady, fatal."""

    def test_when_ready(self):
        """whenReady fires when the backbone connects."""
        top = BusService()
        h = Harness(self, on_fatal=top.fatal)
        h.backbone.setServiceParent(top)
        top.startService()
        ready = top.whenReady()
        self.assertNoResult(ready)
        h.up()
        self.successResultOf(ready)
        self.successResultOf(top.whenReady())
        self.assertTrue(top.running)

    def test_fatal(self):
        """If the first connection fails, whenReady fails with the failure and the tree stops."""
        top = BusService()
        h = Harness(self, on_fatal=top.fatal)
        h.backbone.setServiceParent(top)
        top.startService()
        ready = top.whenReady()
        h.attempts[0].fail(error.ConnectionRefusedError())
        self.failureResultOf(ready, error.ConnectionRefusedError)
        h.clock.advance(0)
        self.assertFalse(top.running)
        self.assertFalse(h.backbone.running)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_without_backbone(self):
        """A tree without a backbone is ready at once."""
        self.successResultOf(BusService().whenReady())
