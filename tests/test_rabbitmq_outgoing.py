"""
The outgoing side of the RabbitMQ backbone (``outgoing.Outbox``) on a Clock,
with a fake channel whose publishes the test confirms, refuses or fails:
batches per turn, persistent messages with ids, the bound in bytes, the
window of unconfirmed messages, re-sending after a lost channel or a nack.
"""

from __future__ import annotations

import json
import uuid

from pika import exceptions as amqp
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from tests.rabbitmq_fakes import FakeChannel, FakeConnection, capture_logs, logged
from txthreatbus import logs
from txthreatbus.backbones.rabbitmq import batches, outgoing
from txthreatbus.backbones.rabbitmq.outgoing import MESSAGE_OVERHEAD, NACK_RETRY_DELAY, Outbox
from txthreatbus.metrics import Metrics

INTEL = "threatbus.intel"
SIGHTING = "threatbus.sighting"


def body(id: str, pad: int = 0) -> bytes:
    return json.dumps({"id": id, "pad": "x" * pad}).encode()


class Rig:
    """An Outbox on a Clock, and fake channels for it."""

    def __init__(self, buffer_bytes: int = 64 << 20, batch_bytes: int = 256 << 10):
        self.clock = Clock()
        self.metrics = Metrics()
        self.broken: list = []
        self.outbox = Outbox(
            self.clock, buffer_bytes, batch_bytes, self.metrics, logs.Throttle(self.clock),
            self._broken, "mq:5672",
        )
        self.channel = None

    def _broken(self, e):
        # as the service does: the connection is dropped, the channel gone
        self.broken.append(e)
        self.outbox.disconnected()

    def connect(self) -> FakeChannel:
        self.channel = FakeChannel(FakeConnection(), 1)
        self.outbox.connected(self.channel)
        return self.channel

    def turn(self) -> None:
        self.clock.advance(0)

    def dropped(self) -> float:
        return self.metrics.dropped("backbone_buffer_overflow")


class BatchingTests(SynchronousTestCase):
    """What is published in one reactor turn goes together."""

    def test_one_turn_one_exchange_one_message(self):
        """Messages added in one turn to one exchange go as one AMQP message at the end of the turn."""
        rig = Rig()
        channel = rig.connect()
        for i in range(3):
            rig.outbox.add(INTEL, body(f"i-{i}"))
        self.assertEqual(channel.published, [])
        rig.turn()
        [published] = channel.published
        self.assertEqual(published.exchange, INTEL)
        self.assertEqual(published.routing_key, "")
        self.assertEqual(published.properties.content_type, batches.BATCH)
        self.assertEqual(published.ids, ["i-0", "i-1", "i-2"])

    def test_persistent_with_message_id(self):
        """Every AMQP message is persistent with a uuid4 message id of its own."""
        rig = Rig()
        channel = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        rig.turn()
        rig.outbox.add(INTEL, body("i-1"))
        rig.turn()
        first, second = channel.published
        for p in (first, second):
            self.assertEqual(p.properties.delivery_mode, 2)
            self.assertEqual(uuid.UUID(p.properties.message_id).version, 4)
        self.assertNotEqual(first.properties.message_id, second.properties.message_id)

    def test_a_lone_message_is_plain_json(self):
        """One message in a turn goes as Threat Bus sends it: application/json, its JSON as the body."""
        rig = Rig()
        channel = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        rig.turn()
        [published] = channel.published
        self.assertEqual(published.properties.content_type, batches.JSON)
        self.assertEqual(published.body, body("i-0"))

    def test_exchanges_apart(self):
        """Messages to different exchanges go as separate AMQP messages, each to its exchange."""
        rig = Rig()
        channel = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        rig.outbox.add(SIGHTING, body("s-0"))
        rig.outbox.add(INTEL, body("i-1"))
        rig.turn()
        self.assertEqual(
            sorted((p.exchange, tuple(p.ids)) for p in channel.published),
            [(INTEL, ("i-0", "i-1")), (SIGHTING, ("s-0",))],
        )

    def test_turns_apart(self):
        """Each turn's messages go in an AMQP message of their own."""
        rig = Rig()
        channel = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        rig.outbox.add(INTEL, body("i-1"))
        rig.turn()
        rig.outbox.add(INTEL, body("i-2"))
        rig.turn()
        self.assertEqual([p.ids for p in channel.published], [["i-0", "i-1"], ["i-2"]])

    def test_batch_bytes_bound(self):
        """A batch carries at most batch_bytes of bodies: past it, the next message starts another."""
        size = len(body("i-0"))
        rig = Rig(batch_bytes=2 * size)
        channel = rig.connect()
        for i in range(5):
            rig.outbox.add(INTEL, body(f"i-{i}"))
        rig.turn()
        self.assertEqual([p.ids for p in channel.published], [["i-0", "i-1"], ["i-2", "i-3"], ["i-4"]])
        for p in channel.published:
            self.assertLessEqual(
                sum(len(b) for b in batches.unpack(p.properties.content_type, p.body)), 2 * size
            )

    def test_larger_than_batch_bytes(self):
        """A message larger than batch_bytes goes alone."""
        rig = Rig(batch_bytes=100)
        channel = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        rig.outbox.add(INTEL, body("big", pad=500))
        rig.outbox.add(INTEL, body("i-1"))
        rig.turn()
        self.assertEqual([p.ids for p in channel.published], [["i-0"], ["big"], ["i-1"]])

    def test_batch_bytes_zero(self):
        """batch_bytes 0: one AMQP message per message, each sent at once, as plain JSON."""
        rig = Rig(batch_bytes=0)
        channel = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        self.assertEqual([p.ids for p in channel.published], [["i-0"]])
        rig.outbox.add(INTEL, body("i-1"))
        self.assertEqual([p.ids for p in channel.published], [["i-0"], ["i-1"]])
        self.assertEqual({p.properties.content_type for p in channel.published}, {batches.JSON})
        self.assertEqual(rig.clock.getDelayedCalls(), [])

    def test_pending(self):
        """pending counts bus messages (not AMQP messages) until confirmed; pending_bytes what they hold."""
        rig = Rig()
        channel = rig.connect()
        bodies = [body(f"i-{i}") for i in range(3)]
        for b in bodies:
            rig.outbox.add(INTEL, b)
        self.assertEqual(rig.outbox.pending, 3)
        self.assertEqual(rig.outbox.pending_bytes, sum(map(len, bodies)))
        rig.turn()
        [published] = channel.published
        self.assertEqual(rig.outbox.pending, 3)
        self.assertEqual(rig.outbox.pending_bytes, len(published.body) + MESSAGE_OVERHEAD)
        self.assertFalse(rig.outbox.empty)
        channel.confirm()
        self.assertEqual((rig.outbox.pending, rig.outbox.pending_bytes), (0, 0))
        self.assertTrue(rig.outbox.empty)


class DrainAndStopTests(SynchronousTestCase):
    """drained() and stop()."""

    def test_drained_when_confirmed(self):
        """drained() fires once the broker confirmed all that is held, this turn's messages included."""
        rig = Rig()
        channel = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        d = rig.outbox.drained()
        [published] = channel.published  # sent at once: not left for the end of the turn
        self.assertNoResult(d)
        channel.confirm()
        self.assertIsNone(self.successResultOf(d))

    def test_drained_when_empty(self):
        """With nothing held, drained() has fired already."""
        rig = Rig()
        self.assertIsNone(self.successResultOf(rig.outbox.drained()))

    def test_drained_waits_for_nacked(self):
        """A refused message is still held: drained() waits for it to go again and be confirmed."""
        rig = Rig()
        channel = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        d = rig.outbox.drained()
        channel.nack()
        self.assertNoResult(d)
        rig.clock.advance(NACK_RETRY_DELAY)
        channel.confirm()
        self.successResultOf(d)

    def test_stop_counts_lost(self):
        """stop() forgets what is held and returns how many bus messages that was; it leaves no timer."""
        rig = Rig()
        channel = rig.connect()
        for i in range(3):
            rig.outbox.add(INTEL, body(f"i-{i}"))
        rig.turn()
        rig.outbox.add(INTEL, body("i-3"))  # this turn's
        rig.outbox.add(SIGHTING, body("s-0"))
        channel.nack()
        d = rig.outbox.drained()
        self.assertEqual(rig.outbox.stop(), 5)
        self.successResultOf(d)
        self.assertEqual((rig.outbox.pending, rig.outbox.pending_bytes), (0, 0))
        self.assertEqual(rig.clock.getDelayedCalls(), [])

    def test_stop_empty(self):
        rig = Rig()
        self.assertEqual(rig.outbox.stop(), 0)


class ConfirmTests(SynchronousTestCase):
    """What stays held until the broker confirms it."""

    def test_held_while_disconnected(self):
        """Without a channel messages wait; a channel takes them, oldest first."""
        rig = Rig(batch_bytes=0)
        for i in range(3):
            rig.outbox.add(INTEL, body(f"i-{i}"))
        self.assertEqual(rig.outbox.pending, 3)
        channel = rig.connect()
        self.assertEqual(channel.ids(), ["i-0", "i-1", "i-2"])

    def test_window_of_unconfirmed(self):
        """At most MAX_IN_FLIGHT AMQP messages are unconfirmed; the rest go as confirms come."""
        self.patch(outgoing, "MAX_IN_FLIGHT", 5)
        rig = Rig(batch_bytes=0)
        channel = rig.connect()
        for i in range(8):
            rig.outbox.add(INTEL, body(f"i-{i}"))
        self.assertEqual(len(channel.published), 5)
        self.assertEqual(rig.outbox.pending, 8)
        channel.confirm(2)
        self.assertEqual(len(channel.published), 7)
        channel.confirm()
        channel.confirm()
        self.assertEqual(channel.ids(), [f"i-{i}" for i in range(8)])
        self.assertEqual(rig.outbox.pending, 0)

    def test_default_window(self):
        self.assertEqual(outgoing.MAX_IN_FLIGHT, 1000)

    def test_unconfirmed_sent_again(self):
        """What a lost channel did not confirm goes again on the next, first, with the same ids."""
        rig = Rig(batch_bytes=0)
        first = rig.connect()
        for i in range(3):
            rig.outbox.add(INTEL, body(f"i-{i}"))
        first.confirm(1)
        ids = first.message_ids()
        rig.outbox.disconnected()
        rig.outbox.add(INTEL, body("i-3"))
        self.assertEqual(rig.outbox.pending, 3)
        second = rig.connect()
        self.assertEqual(second.ids(), ["i-1", "i-2", "i-3"])
        self.assertEqual(second.message_ids()[:2], ids[1:])

    def test_confirm_of_a_lost_channel_ignored(self):
        """A confirm from a channel already gone changes nothing: the message is held for the next."""
        rig = Rig(batch_bytes=0)
        first = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        late = first.published[0].confirm
        rig.outbox.disconnected()
        late.callback(None)
        self.assertEqual(rig.outbox.pending, 1)
        second = rig.connect()
        self.assertEqual(second.ids(), ["i-0"])
        second.confirm()
        self.assertEqual(rig.outbox.pending, 0)

    def test_failure_of_a_lost_channel_ignored(self):
        """A lost channel failing its pending publishes breaks nothing more."""
        rig = Rig(batch_bytes=0)
        first = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        rig.outbox.disconnected()
        second = rig.connect()
        first.close(amqp.StreamLostError("gone"))
        self.assertEqual(rig.broken, [])
        self.assertEqual(second.ids(), ["i-0"])

    def test_nacked_sent_again(self):
        """A message the broker refuses (nack) goes again, with the same id, after NACK_RETRY_DELAY."""
        events = capture_logs(self)
        rig = Rig(batch_bytes=0)
        channel = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        channel.nack()
        self.assertEqual(len(channel.published), 1)
        self.assertEqual(rig.outbox.pending, 1)
        rig.clock.advance(NACK_RETRY_DELAY - 0.01)
        self.assertEqual(len(channel.published), 1)
        rig.clock.advance(0.01)
        self.assertEqual(len(channel.published), 2)
        self.assertEqual(channel.message_ids()[0], channel.message_ids()[1])
        [warning] = logged(events, LogLevel.warn)
        self.assertIn("RabbitMQ at mq:5672 refused 1 messages (nack): sending them again", warning)
        self.assertEqual(rig.broken, [])

    def test_nacks_logged_throttled(self):
        """A broker that refuses everything: every message kept and sent again, one warning per 10 s."""
        events = capture_logs(self)
        rig = Rig(batch_bytes=0)
        channel = rig.connect()
        for i in range(3):
            rig.outbox.add(INTEL, body(f"i-{i}"))
        for _ in range(5):
            channel.nack()
            rig.clock.advance(NACK_RETRY_DELAY)
        self.assertEqual(len(channel.published), 18)
        self.assertEqual(rig.outbox.pending, 3)
        self.assertEqual(len([w for w in logged(events, LogLevel.warn) if "nack" in w]), 1)

    def test_publish_raises(self):
        """A channel that fails under a publish breaks the connection; the message goes on the next."""
        rig = Rig(batch_bytes=0)
        channel = rig.connect()
        channel.publish_raises = amqp.ChannelWrongStateError("Channel is closed.")
        rig.outbox.add(INTEL, body("i-0"))
        [e] = rig.broken
        self.assertIsInstance(e, amqp.ChannelWrongStateError)
        self.assertEqual(rig.outbox.pending, 1)
        second = rig.connect()
        self.assertEqual(second.ids(), ["i-0"])

    def test_publish_fails(self):
        """A publish that fails other than by a nack (the channel closed) breaks the connection."""
        rig = Rig(batch_bytes=0)
        channel = rig.connect()
        rig.outbox.add(INTEL, body("i-0"))
        channel.published[0].confirm.errback(amqp.ChannelClosedByBroker(404, "NOT_FOUND"))
        [e] = rig.broken
        self.assertEqual(e.reply_code, 404)
        self.assertEqual(rig.outbox.pending, 1)
        self.assertEqual(rig.clock.getDelayedCalls(), [])


class BufferTests(SynchronousTestCase):
    """What is held is bounded in bytes, whatever the size of the messages."""

    def test_drops_oldest(self):
        """Past buffer_bytes, the oldest not yet sent are dropped, counted, with one warning."""
        events = capture_logs(self)
        one = len(body("i-0")) + MESSAGE_OVERHEAD
        rig = Rig(buffer_bytes=3 * one, batch_bytes=0)
        for i in range(5):
            rig.outbox.add(INTEL, body(f"i-{i}"))
        self.assertEqual(rig.dropped(), 2)
        [warning] = [w for w in logged(events, LogLevel.warn) if "buffer is full" in w]
        self.assertIn(f"buffer is full ({3 * one} bytes of messages that RabbitMQ at mq:5672", warning)
        self.assertEqual((rig.outbox.pending, rig.outbox.pending_bytes), (3, 3 * one))
        channel = rig.connect()
        self.assertEqual(channel.ids(), ["i-2", "i-3", "i-4"])

    def test_batches_dropped_whole(self):
        """A batch is dropped whole, counted per bus message."""
        rig = Rig(buffer_bytes=1000)
        for i in range(3):
            rig.outbox.add(INTEL, body(f"a-{i}"))
        rig.turn()  # one batch of 3, about 620 bytes held
        for i in range(2):
            rig.outbox.add(INTEL, body(f"b-{i}"))
        rig.turn()  # another: the first goes
        self.assertEqual(rig.dropped(), 3)
        self.assertEqual(rig.outbox.pending, 2)
        channel = rig.connect()
        self.assertEqual(channel.ids(), ["b-0", "b-1"])

    def test_large_messages_count_by_size(self):
        """A few 1 MB messages fill a 2.5 MB buffer that holds hundreds of small ones."""
        rig = Rig(buffer_bytes=5 << 19, batch_bytes=0)
        for i in range(300):
            rig.outbox.add(INTEL, body(f"i-{i}"))
        self.assertEqual(rig.dropped(), 0)
        self.assertEqual(rig.outbox.pending_bytes, sum(len(body(f"i-{i}")) + MESSAGE_OVERHEAD for i in range(300)))
        for i in range(3):
            rig.outbox.add(INTEL, body(f"big-{i}", pad=1 << 20))
        # the 300 small ones and the first big one went, oldest first
        self.assertEqual(rig.dropped(), 301)
        self.assertEqual(rig.outbox.pending, 2)
        self.assertEqual(rig.outbox.pending_bytes, 2 * (len(body("big-1", pad=1 << 20)) + MESSAGE_OVERHEAD))
        channel = rig.connect()
        self.assertEqual(channel.ids(), ["big-1", "big-2"])

    def test_in_flight_counts(self):
        """Unconfirmed messages count against the bound, and stay: overflow drops the oldest not yet sent."""
        self.patch(outgoing, "MAX_IN_FLIGHT", 1)
        rig = Rig(buffer_bytes=5 << 19, batch_bytes=0)
        channel = rig.connect()
        for i in range(3):
            rig.outbox.add(INTEL, body(f"big-{i}", pad=1 << 20))
        self.assertEqual(channel.ids(), ["big-0"])  # in flight, kept
        self.assertEqual(rig.dropped(), 1)  # big-1
        channel.confirm()
        self.assertEqual(channel.ids(), ["big-0", "big-2"])
        channel.confirm()
        self.assertEqual((rig.outbox.pending, rig.outbox.pending_bytes), (0, 0))

    def test_larger_than_the_buffer(self):
        """A message larger than the whole buffer is dropped at once and counted."""
        rig = Rig(buffer_bytes=1 << 20, batch_bytes=0)
        channel = rig.connect()
        rig.outbox.add(INTEL, body("big", pad=1 << 20))
        rig.outbox.add(INTEL, body("i-0"))
        self.assertEqual(rig.dropped(), 1)
        self.assertEqual(channel.ids(), ["i-0"])

    def test_resent_and_nacked_keep_their_bytes(self):
        """Messages sent again after a lost channel or a nack are counted once, never dropped for it."""
        one = len(body("i-0")) + MESSAGE_OVERHEAD
        rig = Rig(buffer_bytes=3 * one, batch_bytes=0)
        first = rig.connect()
        for i in range(3):
            rig.outbox.add(INTEL, body(f"i-{i}"))
        first.nack(1)
        rig.outbox.disconnected()
        rig.clock.advance(NACK_RETRY_DELAY)
        self.assertEqual(rig.outbox.pending_bytes, 3 * one)
        second = rig.connect()
        second.confirm()
        self.assertEqual(sorted(second.ids()), ["i-0", "i-1", "i-2"])
        self.assertEqual(rig.dropped(), 0)
        self.assertEqual(rig.outbox.pending_bytes, 0)

    def test_overflow_warning_throttled(self):
        """A long overflow logs one warning per 10 s, the next one counting the rest."""
        events = capture_logs(self)
        size = len(body("i-0000")) + MESSAGE_OVERHEAD
        rig = Rig(buffer_bytes=size, batch_bytes=0)  # one message
        for i in range(1000):
            rig.outbox.add(INTEL, body(f"i-{i:04}"))
        rig.clock.advance(10)
        rig.outbox.add(INTEL, body("i-last"))
        self.assertEqual(rig.dropped(), 1000)
        first, second = [w for w in logged(events, LogLevel.warn) if "buffer is full" in w]
        self.assertIn(f"buffer is full ({size} bytes of messages", first)
        self.assertIn("998 more like it in the last 10.0 s", second)
