"""
The bus core: topic routing, consumers, and snapshots, with the in-memory
backbone and a fake clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import fail, succeed
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from txthreatbus import logs
from txthreatbus.backbones.inmem import InMemoryBackbone
from txthreatbus.bus import Bus, matches, snapshot_types, topic_chain
from txthreatbus.interfaces import IApp, IBackbone
from txthreatbus.metrics import Metrics
from txthreatbus.model import (
    Intel,
    IntelData,
    IntelType,
    MessageType,
    Operation,
    Sighting,
    SnapshotEnvelope,
    SnapshotRequest,
)

TS = datetime(2020, 11, 26, 14, 46, 52)
INTEL = Intel(TS, "intel-1", IntelData(("evil.example.com",), IntelType.DOMAIN), Operation.ADD)
SIGHTING = Sighting(TS, "intel-1", {"source": "VAST"}, ("evil.example.com",))


class Boom(Exception):
    """What the failing fakes raise."""


@implementer(IApp)
class FakeApp(Service):
    """An app plugin that records the snapshot requests handed to it."""

    def __init__(self, result=None):
        self.requests = []
        self._result = result

    def snapshot(self, request, requester):
        self.requests.append((request, requester))
        if self._result is not None:
            return self._result()
        return succeed(None)


@implementer(IBackbone)
class RecordingBackbone(InMemoryBackbone):
    """The in-memory backbone, remembering what it carried."""

    def __init__(self):
        self.published = []

    def publish(self, message):
        self.published.append(message)
        super().publish(message)


class LogCapture:
    """The events logged through ``logs.publisher`` during a test."""

    def __init__(self, testcase):
        self.events = []
        logs.publisher.addObserver(self.events.append)
        testcase.addCleanup(logs.publisher.removeObserver, self.events.append)

    def failures(self):
        return [e for e in self.events if "log_failure" in e]


class Recorder:
    """A consumer that records what it is given."""

    def __init__(self):
        self.got = []

    def __call__(self, message):
        self.got.append(message)


PENDING = "txthreatbus_snapshots_pending"


def sample(bus, name):
    """The current value of metric sample ``name`` of ``bus``."""
    return bus.metrics.registry.get_sample_value(name)


def envelope(snapshot_id, body=INTEL):
    kind = MessageType.INTEL if isinstance(body, Intel) else MessageType.SIGHTING
    return SnapshotEnvelope(kind, snapshot_id, body)


class TopicTests(SynchronousTestCase):
    """Topics are hierarchical by whole path segments."""

    def test_topic_chain(self):
        """A topic's chain is its ancestors, root first, and itself."""
        self.assertEqual(topic_chain("threatbus/intel"), ("threatbus", "threatbus/intel"))
        self.assertEqual(topic_chain("threatbus"), ("threatbus",))
        self.assertEqual(topic_chain("a/b/c"), ("a", "a/b", "a/b/c"))

    def test_parent_matches_children(self):
        """threatbus receives both intel and sightings."""
        self.assertTrue(matches("threatbus", "threatbus/intel"))
        self.assertTrue(matches("threatbus", "threatbus/sighting"))
        self.assertTrue(matches("threatbus/intel", "threatbus/intel"))

    def test_child_does_not_match_parent_or_sibling(self):
        """threatbus/sighting gets no intel, and a child does not get its parent's."""
        self.assertFalse(matches("threatbus/sighting", "threatbus/intel"))
        self.assertFalse(matches("threatbus/intel", "threatbus"))

    def test_no_false_prefix(self):
        """threatbus/intelX does not match threatbus/intel, either way round."""
        self.assertFalse(matches("threatbus/intel", "threatbus/intelX"))
        self.assertFalse(matches("threatbus/intelX", "threatbus/intel"))
        self.assertFalse(matches("threat", "threatbus/intel"))
        self.assertNotIn("threatbus/intel", topic_chain("threatbus/intelX"))

    def test_snapshot_types(self):
        """A topic's snapshot types are the message types under it."""
        self.assertEqual(snapshot_types("threatbus"), (MessageType.INTEL, MessageType.SIGHTING))
        self.assertEqual(snapshot_types("threatbus/intel"), (MessageType.INTEL,))
        self.assertEqual(snapshot_types("threatbus/sighting"), (MessageType.SIGHTING,))
        self.assertEqual(snapshot_types("threatbus/intelX"), ())
        self.assertEqual(snapshot_types("threat"), ())


class BackboneTests(SynchronousTestCase):
    """The in-memory backbone."""

    def test_interface(self):
        """InMemoryBackbone (and the recording fake) provide IBackbone."""
        self.assertTrue(verifyObject(IBackbone, InMemoryBackbone()))
        self.assertTrue(verifyObject(IBackbone, RecordingBackbone()))

    def test_is_service(self):
        """The backbone is a service named backbone."""
        backbone = InMemoryBackbone()
        self.assertIsInstance(backbone, Service)
        self.assertEqual(backbone.name, "backbone")

    def test_delivers_at_once(self):
        """A published message is handed to deliver at once, exactly once."""
        backbone = InMemoryBackbone()
        got = []
        backbone.attach(got.append)
        backbone.publish(INTEL)
        self.assertEqual(got, [INTEL])


class RoutingTests(SynchronousTestCase):
    """Intel and Sightings go to the consumers of matching topics."""

    def setUp(self):
        self.clock = task.Clock()
        self.bus = Bus(InMemoryBackbone(), self.clock)
        self.bus.backbone.attach(self.bus.deliver)
        self.log = LogCapture(self)

    def test_needs_backbone(self):
        """A bus refuses a backbone that does not provide IBackbone."""
        self.assertRaises(TypeError, Bus, object(), self.clock)

    def test_built_without_side_effects(self):
        """Building a bus attaches nothing to its backbone: the service tree does."""
        backbone = InMemoryBackbone()
        Bus(backbone, self.clock)
        self.assertIsNone(backbone._deliver)

    def test_publish_to_subscribers(self):
        """Each message reaches the consumers of its topic and of its parent, and no others."""
        everything, intel, sightings, other = Recorder(), Recorder(), Recorder(), Recorder()
        self.bus.subscribe("threatbus", everything)
        self.bus.subscribe("threatbus/intel", intel)
        self.bus.subscribe("threatbus/sighting", sightings)
        self.bus.subscribe("threatbus/intelX", other)
        self.bus.publish(INTEL)
        self.bus.publish(SIGHTING)
        self.assertEqual(everything.got, [INTEL, SIGHTING])
        self.assertEqual(intel.got, [INTEL])
        self.assertEqual(sightings.got, [SIGHTING])
        self.assertEqual(other.got, [])

    def test_several_consumers(self):
        """Every consumer of a topic gets each message once."""
        a, b = Recorder(), Recorder()
        self.bus.subscribe("threatbus/intel", a)
        self.bus.subscribe("threatbus/intel", b)
        self.bus.subscribe("threatbus/intel", a)
        self.bus.publish(INTEL)
        self.assertEqual((a.got, b.got), ([INTEL], [INTEL]))

    def test_unsubscribe(self):
        """An unsubscribed consumer gets nothing more; the others still do."""
        a, b = Recorder(), Recorder()
        self.bus.subscribe("threatbus", a)
        self.bus.subscribe("threatbus", b)
        self.bus.unsubscribe("threatbus", a)
        self.bus.publish(INTEL)
        self.assertEqual((a.got, b.got), ([], [INTEL]))

    def test_unsubscribe_unknown(self):
        """Unsubscribing what is not subscribed is harmless."""
        a = Recorder()
        self.bus.unsubscribe("threatbus", a)
        self.bus.subscribe("threatbus/intel", a)
        self.bus.unsubscribe("threatbus", a)
        self.bus.unsubscribe("threatbus/intel", a)
        self.bus.unsubscribe("threatbus/intel", a)
        self.bus.publish(INTEL)
        self.assertEqual(a.got, [])

    def test_unsubscribe_while_delivering(self):
        """A consumer may unsubscribe another during a delivery: it takes effect from the next message."""
        b = Recorder()
        a = Recorder()
        self.bus.subscribe("threatbus", lambda m: self.bus.unsubscribe("threatbus", b))
        self.bus.subscribe("threatbus", b)
        self.bus.subscribe("threatbus", a)
        self.bus.publish(INTEL)
        self.bus.publish(INTEL)
        self.assertEqual(a.got, [INTEL, INTEL])
        self.assertEqual(b.got, [INTEL])

    def test_failing_consumer(self):
        """A failing consumer does not stop the others, and its failure is logged."""
        before, after = Recorder(), Recorder()

        def failing(message):
            raise Boom()

        self.bus.subscribe("threatbus", before)
        self.bus.subscribe("threatbus", failing)
        self.bus.subscribe("threatbus", after)
        self.bus.subscribe("threatbus/intel", after)
        self.bus.publish(INTEL)
        self.assertEqual(before.got, [INTEL])
        self.assertEqual(after.got, [INTEL, INTEL])
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        [event] = self.log.failures()
        self.assertIs(event["consumer"], failing)

    def test_unrouted_counted(self):
        """A message that reaches no consumer, directly or translated, is counted by type."""
        unrouted = lambda kind: self.bus.metrics.unrouted[kind].value  # noqa: E731
        self.bus.publish(INTEL)
        self.assertEqual(unrouted("intel"), 1)
        sightings, indicators = Recorder(), Recorder()
        self.bus.subscribe("threatbus/sighting", sightings)
        self.bus.publish(SIGHTING)
        self.bus.subscribe("stix2/indicator", indicators)
        self.bus.publish(INTEL)  # reaches the STIX consumer, translated
        port = Intel(TS, "intel-2", IntelData(("203.0.113.1|80",), IntelType.IPSRC_PORT), Operation.ADD)
        self.bus.publish(port)  # has no STIX counterpart
        self.assertEqual((unrouted("intel"), unrouted("sighting")), (2, 0))
        self.assertEqual(len(indicators.got), 1)

    def test_unroutable(self):
        """Something that is not a message is dropped, logged and counted."""
        self.bus.deliver("not a message")
        self.assertEqual(self.bus.metrics.dropped("unroutable"), 1)
        self.assertEqual([e["log_level"] for e in self.log.events], [LogLevel.error])


class SnapshotTests(SynchronousTestCase):
    """Snapshots: requests to every app, answers to the requester only, expiry."""

    def setUp(self):
        self.clock = task.Clock()
        self.backbone = RecordingBackbone()
        self.bus = Bus(self.backbone, self.clock, Metrics(), snapshot_timeout=100.0)
        self.backbone.attach(self.bus.deliver)
        self.apps = [FakeApp(), FakeApp()]
        for app in self.apps:
            self.assertTrue(verifyObject(IApp, app))
            self.bus.add_app(app)
        self.requester = Recorder()
        self.log = LogCapture(self)

    def requests(self):
        return [m for m in self.backbone.published if isinstance(m, SnapshotRequest)]

    def test_parent_topic_two_requests(self):
        """threatbus gives two requests, INTEL and SIGHTING, with one id and snapshot = days."""
        snapshot_id, _ = self.bus.request_snapshot("threatbus", timedelta(days=30), self.requester)
        self.assertEqual(
            self.requests(),
            [
                SnapshotRequest(MessageType.INTEL, snapshot_id, timedelta(days=30)),
                SnapshotRequest(MessageType.SIGHTING, snapshot_id, timedelta(days=30)),
            ],
        )

    def test_child_topic_one_request(self):
        """threatbus/intel gives one INTEL request."""
        snapshot_id, _ = self.bus.request_snapshot("threatbus/intel", timedelta(days=1), self.requester)
        self.assertEqual(
            self.requests(), [SnapshotRequest(MessageType.INTEL, snapshot_id, timedelta(days=1))]
        )

    def test_ids_differ(self):
        """Every snapshot gets its own id."""
        ids = {self.bus.request_snapshot("threatbus", timedelta(days=1), Recorder())[0] for _ in range(10)}
        self.assertEqual(len(ids), 10)

    def test_fan_out_to_apps(self):
        """Each request reaches every app, with the requester."""
        self.bus.request_snapshot("threatbus", timedelta(days=2), self.requester)
        for app in self.apps:
            self.assertEqual(app.requests, [(r, self.requester) for r in self.requests()])

    def test_request_from_elsewhere(self):
        """A request from another instance reaches the apps with no requester."""
        request = SnapshotRequest(MessageType.INTEL, "remote-id", timedelta(days=1))
        self.bus.deliver(request)
        for app in self.apps:
            self.assertEqual(app.requests, [(request, None)])

    def test_requests_not_for_consumers(self):
        """Snapshot requests do not reach topic consumers."""
        consumer = Recorder()
        self.bus.subscribe("threatbus", consumer)
        self.bus.request_snapshot("threatbus", timedelta(days=1), self.requester)
        self.assertEqual(consumer.got, [])

    def test_envelopes_to_requester_only(self):
        """Envelope bodies go to the requester, and to no consumer or other requester."""
        consumer, other = Recorder(), Recorder()
        self.bus.subscribe("threatbus", consumer)
        snapshot_id, _ = self.bus.request_snapshot("threatbus", timedelta(days=1), self.requester)
        self.bus.request_snapshot("threatbus", timedelta(days=1), other)
        self.bus.publish(envelope(snapshot_id, INTEL))
        self.bus.publish(envelope(snapshot_id, SIGHTING))
        self.assertEqual(self.requester.got, [INTEL, SIGHTING])
        self.assertEqual((consumer.got, other.got), ([], []))
        self.assertEqual(sample(self.bus, "txthreatbus_snapshot_envelopes_routed_total"), 2)

    def test_unknown_envelope(self):
        """An envelope for an unknown id is dropped and counted."""
        self.bus.request_snapshot("threatbus", timedelta(days=1), self.requester)
        self.bus.publish(envelope("no-such-id"))
        self.assertEqual(self.requester.got, [])
        self.assertEqual(self.bus.metrics.dropped("unknown_snapshot"), 1)

    def test_expiry(self):
        """After snapshot_timeout the state is freed and the Deferred fires with the number routed."""
        snapshot_id, finished = self.bus.request_snapshot("threatbus", timedelta(days=1), self.requester)
        self.bus.publish(envelope(snapshot_id))
        self.bus.publish(envelope(snapshot_id, SIGHTING))
        self.clock.advance(99)
        self.assertNoResult(finished)
        self.assertEqual(self.bus.pending_snapshots(), 1)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(finished), 2)
        self.assertEqual(self.bus.pending_snapshots(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_envelope_after_expiry(self):
        """An envelope for an expired snapshot is dropped and counted."""
        snapshot_id, _ = self.bus.request_snapshot("threatbus", timedelta(days=1), self.requester)
        self.clock.advance(100)
        self.bus.publish(envelope(snapshot_id))
        self.assertEqual(self.requester.got, [])
        self.assertEqual(self.bus.metrics.dropped("unknown_snapshot"), 1)

    def test_pending_gauge(self):
        """The pending-snapshots gauge follows requests and their end."""
        a, _ = self.bus.request_snapshot("threatbus", timedelta(days=1), self.requester)
        self.bus.request_snapshot("threatbus", timedelta(days=1), self.requester)
        self.assertEqual((self.bus.pending_snapshots(), sample(self.bus, PENDING)), (2, 2))
        self.bus.finish_snapshot(a)
        self.assertEqual((self.bus.pending_snapshots(), sample(self.bus, PENDING)), (1, 1))

    def test_finish_twice(self):
        """finish_snapshot twice is harmless: the Deferred fires once, the timer is cancelled."""
        snapshot_id, finished = self.bus.request_snapshot("threatbus", timedelta(days=1), self.requester)
        self.bus.finish_snapshot(snapshot_id)
        self.bus.finish_snapshot(snapshot_id)
        self.assertEqual(self.successResultOf(finished), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(sample(self.bus, PENDING), 0)

    def test_finish_unknown(self):
        """Finishing a snapshot nobody asked for is harmless."""
        self.bus.finish_snapshot("no-such-id")
        self.assertEqual(self.bus.pending_snapshots(), 0)

    def test_stop_finishes_pending(self):
        """stopService finishes every pending snapshot and cancels its timer."""
        self.bus.startService()
        _, a = self.bus.request_snapshot("threatbus", timedelta(days=1), self.requester)
        _, b = self.bus.request_snapshot("threatbus/intel", timedelta(days=1), Recorder())
        self.bus.stopService()
        self.assertEqual((self.successResultOf(a), self.successResultOf(b)), (0, 0))
        self.assertEqual(self.bus.pending_snapshots(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.bus.running)

    def test_app_fails_synchronously(self):
        """An app whose snapshot() raises is logged; the other apps still get the request."""
        def boom():
            raise Boom()

        failing = FakeApp(result=boom)
        self.bus.add_app(failing)
        late = FakeApp()
        self.bus.add_app(late)
        self.bus.request_snapshot("threatbus/intel", timedelta(days=1), self.requester)
        self.assertEqual(len(failing.requests), 1)
        self.assertEqual(len(late.requests), 1)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        self.assertEqual(len(self.log.failures()), 1)

    def test_each_failing_app_logged(self):
        """Every failing app is logged, each with its own failure and name."""
        failing = [FakeApp(result=lambda: fail(Boom())) for _ in range(2)]
        for app in failing:
            self.bus.add_app(app)
        self.bus.request_snapshot("threatbus/sighting", timedelta(days=1), self.requester)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 2)
        self.assertEqual([e["app"] for e in self.log.failures()], failing)

    def test_app_fails_asynchronously(self):
        """An app whose snapshot() Deferred fails is logged, not raised."""
        self.bus.add_app(FakeApp(result=lambda: fail(Boom())))
        snapshot_id, _ = self.bus.request_snapshot("threatbus", timedelta(days=1), self.requester)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 2)
        self.assertEqual(len(self.log.failures()), 2)
        self.assertEqual(self.bus.pending_snapshots(), 1)
        self.bus.publish(envelope(snapshot_id))
        self.assertEqual(self.requester.got, [INTEL])

    def test_failing_requester(self):
        """A requester that fails on an envelope is logged; later envelopes still count."""

        def failing(message):
            raise Boom()

        snapshot_id, finished = self.bus.request_snapshot("threatbus", timedelta(days=1), failing)
        self.bus.publish(envelope(snapshot_id))
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 1)
        self.bus.finish_snapshot(snapshot_id)
        self.assertEqual(self.successResultOf(finished), 1)

    def test_bad_request_leaves_no_state(self):
        """A snapshot of nothing, or of a topic with no message types, is refused without state."""
        for topic, snapshot in (("threatbus", timedelta(0)), ("threatbus/intelX", timedelta(days=1))):
            self.assertRaises(ValueError, self.bus.request_snapshot, topic, snapshot, self.requester)
        self.assertEqual(self.bus.pending_snapshots(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.backbone.published, [])
        self.assertEqual(sample(self.bus, PENDING), 0)
