"""
The incoming side of the RabbitMQ backbone (``incoming.Inbox``): what the
broker delivers goes to the bus, then is acked; repeats and malformed
messages are acked and dropped, counted, their log lines throttled; a batch
delivers all it carries, then is acked once.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from pika.adapters.twisted_connection import ClosableDeferredQueue
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from tests.rabbitmq_fakes import FakeChannel, FakeConnection, capture_logs, intel, logged, sample
from txthreatbus import codec, logs, stix
from txthreatbus.backbones.rabbitmq import batches
from txthreatbus.backbones.rabbitmq.incoming import DedupWindow, Inbox
from txthreatbus.metrics import Metrics
from txthreatbus.model import MessageType, Sighting, SnapshotEnvelope, SnapshotRequest

QUEUES = {
    "intel": "threatbus.intel.test",
    "sighting": "threatbus.sighting.test",
    "indicator": "threatbus.indicator.test",
    "stix_sighting": "threatbus.stix_sighting.test",
    "snapshotrequest": "threatbus.snapshotrequest.test",
    "snapshotenvelope": "threatbus.snapshotenvelope.test",
}


class Rig:
    """An Inbox on a Clock, consuming from fake pika queues, one per type."""

    def __init__(self, dedup_window: int = 100):
        self.clock = Clock()
        self.metrics = Metrics()
        self.events: list = []
        self.delivered: list = []
        self.alive = True
        self.channel = FakeChannel(FakeConnection(), 2)
        self.channel.events = self.events
        self.inbox = Inbox(
            self._deliver,
            QUEUES,
            dedup_window,
            self.metrics,
            self.metrics.backbone_consumed.labels("rabbitmq"),
            logs.Throttle(self.clock),
            self.clock,
        )
        self.consuming = {}
        for kind, queue in QUEUES.items():
            messages = self.channel.consumers[queue] = ClosableDeferredQueue()
            self.consuming[kind] = ensureDeferred(self.inbox.consume(kind, messages, lambda: self.alive))

    def _deliver(self, message):
        self.delivered.append(message)
        self.events.append(("deliver", getattr(message, "id", None)))

    def deliver(self, kind, tag, body, message_id=None, content_type=None):
        self.channel.deliver(QUEUES[kind], tag, body, message_id, content_type)

    def ids(self):
        return [m.id for m in self.delivered]

    def consumed(self) -> float:
        return sample(self.metrics, "txthreatbus_backbone_consumed_total", backbone="rabbitmq")


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


class ConsumeTests(SynchronousTestCase):
    """What the inbox takes from the broker."""

    def test_ack_after_deliver(self):
        """A message is acked only after deliver(message) returned; it counts as consumed."""
        rig = Rig()
        rig.deliver("intel", 1, codec.encode(intel("i-1")), "m-1")
        self.assertEqual(rig.events, [("deliver", "i-1"), ("ack", 1)])
        self.assertEqual(rig.consumed(), 1)

    def test_every_type_delivered(self):
        """Messages from each type's queue are decoded as that type and delivered."""
        rig = Rig()
        indicator = stix.Indicator(
            id="indicator--6911104f-c504-4086-a15b-05e28cf73435",
            pattern="[domain-name:value = 'evil.example.com']",
            pattern_type="stix",
            valid_from="2022-05-16T10:00:00Z",
            properties={},
        )
        messages = {
            "intel": intel("i-1"),
            "sighting": Sighting(ts=datetime(2020, 11, 26, 14, 46, 52), intel="i-1"),
            "indicator": indicator,
            "stix_sighting": stix.Sighting(
                id="sighting--4a9e2a33-7bd4-4a16-8f5e-5b2c3d1a0f77", sighting_of_ref=indicator.id
            ),
            "snapshotrequest": SnapshotRequest(MessageType.INTEL, "s", timedelta(seconds=60)),
            "snapshotenvelope": SnapshotEnvelope(MessageType.INTEL, "s", intel("i-e")),
        }
        for tag, (kind, message) in enumerate(messages.items()):
            rig.deliver(kind, tag, codec.encode(message))
        self.assertEqual(rig.delivered, list(messages.values()))
        self.assertEqual(
            [type(m) for m in rig.delivered],
            [type(m) for m in messages.values()],
        )
        self.assertEqual(rig.channel.acked, list(range(len(messages))))

    def test_repeat_dropped(self):
        """A message whose id was seen recently is acked and dropped, not delivered twice."""
        rig = Rig()
        body = codec.encode(intel("i-1"))
        rig.deliver("intel", 1, body, "m-1")
        rig.deliver("intel", 2, body, "m-1")
        rig.deliver("intel", 3, body, "m-2")
        self.assertEqual(len(rig.delivered), 2)
        self.assertEqual(rig.channel.acked, [1, 2, 3])
        self.assertEqual(rig.metrics.dropped("backbone_duplicate"), 1)

    def test_repeat_across_queues(self):
        """The window is one for all queues."""
        rig = Rig()
        rig.deliver("intel", 1, codec.encode(intel("i-1")), "m-1")
        rig.deliver("sighting", 2, b"{}", "m-1")
        self.assertEqual(rig.ids(), ["i-1"])
        self.assertEqual(rig.metrics.dropped("backbone_duplicate"), 1)

    def test_repeat_past_the_window(self):
        """A repeat older than the last dedup_window ids goes through again."""
        rig = Rig(dedup_window=2)
        body = codec.encode(intel("i-1"))
        for tag, message_id in enumerate(["m-1", "m-2", "m-3", "m-1"]):
            rig.deliver("intel", tag, body, message_id)
        self.assertEqual(len(rig.delivered), 4)

    def test_without_message_id_delivered(self):
        """Messages without message_id (from Threat Bus itself) are all delivered."""
        rig = Rig()
        body = codec.encode(intel("i-1"))
        rig.deliver("intel", 1, body)
        rig.deliver("intel", 2, body)
        self.assertEqual(len(rig.delivered), 2)

    def test_repeats_logged_throttled(self):
        """Repeats of one message id, at will, give one debug line per 10 s."""
        events = capture_logs(self)
        rig = Rig()
        body = codec.encode(intel("i-1"))
        for tag in range(100):
            rig.deliver("intel", tag, body, "m-1")
        self.assertEqual(rig.metrics.dropped("backbone_duplicate"), 99)
        self.assertEqual(len([d for d in logged(events, LogLevel.debug) if "repeat" in d]), 1)

    def test_malformed_acked_dropped_counted(self):
        """A malformed body is acked, dropped, counted and logged; the next message still goes."""
        events = capture_logs(self)
        rig = Rig()
        rig.deliver("intel", 1, b"{not json", "m-1")
        rig.deliver("sighting", 2, codec.encode(intel("i-1")), "m-2")  # wrong shape
        rig.deliver("intel", 3, codec.encode(intel("i-2")), "m-3")
        self.assertEqual(rig.ids(), ["i-2"])
        self.assertEqual(rig.channel.acked, [1, 2, 3])
        self.assertEqual(rig.metrics.dropped("backbone_malformed"), 2)
        self.assertEqual(rig.consumed(), 1)
        [warning] = [w for w in logged(events, LogLevel.warn) if "malformed" in w]
        self.assertIn("Dropped a malformed intel from RabbitMQ queue threatbus.intel.test", warning)

    def test_malformed_flood_throttled(self):
        """A flood of undecodable messages: every one counted, one log line per 10 s with a count."""
        events = capture_logs(self)
        rig = Rig()
        rig.inbox.now = lambda: 0.0  # all in one reactor turn
        for tag in range(10_000):
            rig.deliver("intel", tag, b"{not json", f"m-{tag}")
        rig.clock.advance(10)
        rig.deliver("intel", 10_000, b"{not json", "m-last")
        self.assertEqual(rig.metrics.dropped("backbone_malformed"), 10_001)
        self.assertEqual(len(rig.channel.acked), 10_001)
        first, second = logged(events, LogLevel.warn)
        self.assertIn("Dropped a malformed intel from RabbitMQ", first)
        self.assertIn("9999 more like it in the last 10.0 s were counted, not logged", second)

    def test_malformed_counted_by_reason(self):
        """An undecodable message is counted by its DecodeError's reason, each reason throttled apart."""
        events = capture_logs(self)
        rig = Rig()
        deep = b"[" * 100 + b"]" * 100
        twice = b'{"ts": 1, "ts": 2}'
        for tag in range(3):
            rig.deliver("intel", tag, deep)
            rig.deliver("intel", 10 + tag, b"{not json")
            rig.deliver("intel", 20 + tag, twice)
        self.assertEqual(rig.metrics.dropped("backbone_too_deep"), 3)
        self.assertEqual(rig.metrics.dropped("backbone_malformed"), 3)
        self.assertEqual(rig.metrics.dropped("backbone_duplicate_key"), 3)
        self.assertEqual(len(rig.channel.acked), 9)
        warnings = logged(events, LogLevel.warn)
        self.assertEqual(len(warnings), 3)
        self.assertIn("duplicate key", warnings[2])

    def test_error_text_cut(self):
        """What a malformed message makes the log line quote is cut short."""
        events = capture_logs(self)
        rig = Rig()
        rig.deliver("intel", 1, json.dumps({"x" * 1000: 1}).encode())
        [warning] = logged(events, LogLevel.warn)
        self.assertLess(len(warning), 500)

    def test_bus_failure_still_acks(self):
        """If the bus raises while taking a message, that is logged and the message acked."""
        rig = Rig()

        def broken(message):
            raise RuntimeError("boom")

        rig.inbox._deliver = broken
        rig.deliver("intel", 1, codec.encode(intel("i-1")), "m-1")
        rig.deliver("intel", 2, codec.encode(intel("i-2")), "m-2")
        self.assertEqual(rig.channel.acked, [1, 2])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # the second one throttled

    def test_ack_on_a_closed_channel(self):
        """An ack the closed channel refuses is logged (debug), not raised: consuming goes on."""
        events = capture_logs(self)
        rig = Rig()
        rig.channel.closed = Exception("closed")
        rig.deliver("intel", 1, codec.encode(intel("i-1")), "m-1")
        self.assertEqual(rig.ids(), ["i-1"])
        self.assertIn("Could not ack a message", logged(events, LogLevel.debug)[0])
        self.assertNoResult(rig.consuming["intel"])

    def test_costly_messages_let_the_reactor_run(self):
        """After batch_seconds of handling, consuming waits for the next reactor turn, then goes on."""
        ticks = iter(range(1000))
        rig = Rig()
        rig.inbox.now = lambda: next(ticks) * 0.015  # each message "takes" 15 ms
        for tag in range(1, 4):
            rig.deliver("intel", tag, codec.encode(intel(f"i-{tag}")))
        self.assertEqual(rig.ids(), ["i-1", "i-2"])
        self.assertEqual(rig.channel.acked, [1])  # 2 once its turn is over
        rig.clock.advance(0)
        self.assertEqual(rig.ids(), ["i-1", "i-2", "i-3"])
        self.assertEqual(rig.channel.acked, [1, 2, 3])

    def test_costly_batch_lets_the_reactor_run(self):
        """A batch yields within itself too, and is handed on whole, even if consuming ends meanwhile."""
        ticks = iter(range(1000))
        rig = Rig()
        rig.inbox.now = lambda: next(ticks) * 0.015
        content_type, body = batches.pack([codec.encode(intel(f"i-{i}")) for i in range(4)])
        rig.deliver("intel", 9, body, "m-9", content_type)
        self.assertEqual(rig.ids(), ["i-0", "i-1"])
        self.assertEqual(rig.channel.acked, [])
        rig.alive = False  # the connection dropped: the broker will give it again
        rig.clock.advance(0)
        self.assertEqual(rig.ids(), ["i-0", "i-1", "i-2", "i-3"])
        rig.clock.advance(0)
        self.assertEqual(rig.channel.acked, [9])
        rig.alive = True
        rig.deliver("intel", 10, body, "m-9", content_type)  # the repeat: dropped
        self.assertEqual(len(rig.delivered), 4)

    def test_not_taken_while_stopping(self):
        """Once not alive, a message is neither delivered nor acked (the broker keeps it), and consuming ends."""
        rig = Rig()
        rig.alive = False
        rig.deliver("intel", 1, codec.encode(intel("i-1")), "m-1")
        self.assertEqual((rig.delivered, rig.channel.acked), ([], []))
        self.assertIsNone(self.successResultOf(rig.consuming["intel"]))

    def test_ends_when_the_queue_closes(self):
        """When pika closes the consumer's queue, consuming ends with its reason."""
        rig = Rig()
        rig.channel.consumers[QUEUES["intel"]].close(RuntimeError("consumer cancelled"))
        self.failureResultOf(rig.consuming["intel"], RuntimeError)


class BatchTests(SynchronousTestCase):
    """An AMQP message that carries several bus messages."""

    def test_batch_delivers_all_then_one_ack(self):
        """A batch delivers every message it carries, in order, then is acked once."""
        rig = Rig()
        content_type, body = batches.pack([codec.encode(intel(f"i-{i}")) for i in range(3)])
        rig.deliver("intel", 7, body, "m-1", content_type)
        self.assertEqual(
            rig.events, [("deliver", "i-0"), ("deliver", "i-1"), ("deliver", "i-2"), ("ack", 7)]
        )
        self.assertEqual(rig.consumed(), 3)

    def test_batch_repeat_dropped(self):
        """A batch that comes again (same message id) is acked and dropped whole."""
        rig = Rig()
        content_type, body = batches.pack([codec.encode(intel(f"i-{i}")) for i in range(3)])
        rig.deliver("intel", 1, body, "m-1", content_type)
        rig.deliver("intel", 2, body, "m-1", content_type)
        self.assertEqual(rig.ids(), ["i-0", "i-1", "i-2"])
        self.assertEqual(rig.channel.acked, [1, 2])

    def test_malformed_batch(self):
        """A batch whose lengths do not add up is acked, dropped, counted backbone_malformed and logged."""
        events = capture_logs(self)
        rig = Rig()
        content_type, body = batches.pack([codec.encode(intel(f"i-{i}")) for i in range(3)])
        rig.deliver("intel", 1, body[:-1], "m-1", content_type)
        rig.deliver("intel", 2, codec.encode(intel("i-9")), "m-2")
        self.assertEqual(rig.ids(), ["i-9"])
        self.assertEqual(rig.channel.acked, [1, 2])
        self.assertEqual(rig.metrics.dropped("backbone_malformed"), 1)
        [warning] = logged(events, LogLevel.warn)
        self.assertIn("Dropped a malformed intel from RabbitMQ queue threatbus.intel.test", warning)

    def test_one_malformed_item(self):
        """One malformed message in a batch drops only that one; the others are delivered."""
        rig = Rig()
        content_type, body = batches.pack(
            [codec.encode(intel("i-0")), b"{not json", codec.encode(intel("i-2"))]
        )
        rig.deliver("intel", 1, body, "m-1", content_type)
        self.assertEqual(rig.ids(), ["i-0", "i-2"])
        self.assertEqual(rig.channel.acked, [1])
        self.assertEqual(rig.metrics.dropped("backbone_malformed"), 1)
        self.assertEqual(rig.consumed(), 2)
