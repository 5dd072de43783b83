"""
Unit tests of the zmq-app's subscriptions, publisher buffers and management
handler, with task.Clock and a fake socket.
"""

from __future__ import annotations

import gc
import json
import weakref
from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from txthreatbus import codec
from txthreatbus.apps.zmq_app.manage import ManagementHandler, encode
from txthreatbus.apps.zmq_app import publisher
from txthreatbus.apps.zmq_app.memory import MemorySockets
from txthreatbus.apps.zmq_app.publisher import FRAME_OVERHEAD, RETRY_INTERVAL
from txthreatbus.apps.zmq_app.service import ZmqAppService
from txthreatbus.apps.zmq_app.subscriptions import P2P_LENGTH
from txthreatbus.backbones.inmem import InMemoryBackbone
from txthreatbus.bus import Bus
from txthreatbus.config import ZmqAppConfig
from txthreatbus.model import Intel, IntelData, IntelType, Operation


def intel(i: int) -> Intel:
    return Intel(
        ts=datetime(2020, 11, 26, 14, 46, 52),
        id=f"intel-{i}",
        data=IntelData(indicator=(f"evil{i}.example.com",), intel_type=IntelType.DOMAIN),
        operation=Operation.ADD,
    )


class World:
    """
    A bus (in-memory backbone) and its zmq-app on memory sockets and a Clock;
    each connected app has a SUB socket of its own.
    """

    def __init__(self, **zmq_app):
        config = ZmqAppConfig(**zmq_app)
        self.clock = Clock()
        self.bus = Bus(InMemoryBackbone(), self.clock, snapshot_timeout=config.snapshot_timeout)
        self.bus.backbone.attach(self.bus.deliver)
        self.metrics = self.bus.metrics
        self.sockets = MemorySockets()
        self.zmq_app = ZmqAppService(config, self.bus, self.clock, self.sockets)
        self.bus.add_app(self.zmq_app)
        self.zmq_app.startService()
        self.publisher = self.zmq_app.publisher
        self.subscriptions = self.zmq_app.subscriptions
        self.xpub = self.sockets.xpub
        self.peers = {}

    def app(self, topic="threatbus/intel", connected=True, snapshot=timedelta(0)):
        """A new subscription to ``topic``, its app's SUB socket subscribed if ``connected``."""
        sub = self.subscriptions.subscribe(topic, snapshot)
        if connected:
            self.connect(sub)
        return sub

    def connect(self, sub):
        """``sub``'s app connects its SUB socket, subscribed to its topic; the turn ends."""
        peer = self.peers[sub] = self.xpub.connect()
        peer.subscribe(sub.prefix)
        self.clock.advance(0)
        return peer

    def disconnect(self, sub):
        self.peers.pop(sub).disconnect()

    def full(self, full: bool):
        """Make every app's SUB socket full (it reads nothing more), or not."""
        for peer in self.peers.values():
            peer.hwm = 0 if full else 1000

    def publish(self, *messages):
        """Publish ``messages`` in one reactor turn, and end the turn."""
        for message in messages:
            self.bus.publish(message)
        self.clock.advance(0)

    @property
    def sent(self):
        return self.xpub.sent

    def ids(self, frames=None):
        frames = self.sent if frames is None else frames
        return [json.loads(f.partition(b" ")[2])["id"] for f in frames]


#: What one intel(i) frame for i < 10 costs in a buffer.
FRAME = P2P_LENGTH + len(b"intel ") + len(codec.encode(intel(0))) + FRAME_OVERHEAD


class LivenessTests(SynchronousTestCase):
    """subscription_timeout removes apps that stopped heartbeating."""

    def test_expires(self):
        """Without heartbeat, a subscription is gone after the timeout, and freed."""
        world = World(subscription_timeout=60)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        sub = world.subscriptions.subscribe("threatbus", timedelta(0))
        ref = weakref.ref(sub)
        p2p = sub.p2p
        del sub
        world.clock.advance(59)
        self.assertIsNotNone(world.subscriptions.get(p2p))
        world.clock.advance(1)
        self.assertIsNone(world.subscriptions.get(p2p))
        self.assertEqual(world.clock.getDelayedCalls(), [])
        gc.collect()
        self.assertIsNone(ref(), "a reference to the expired subscription is left")
        self.assertTrue(any(e.get("p2p") == p2p and "no heartbeat" in e["log_format"] for e in events))

    def test_heartbeat_keeps_alive(self):
        """Each heartbeat restarts the timeout."""
        world = World(subscription_timeout=60)
        sub = world.subscriptions.subscribe("threatbus", timedelta(0))
        for _ in range(5):
            world.clock.advance(50)
            self.assertTrue(world.subscriptions.heartbeat(sub.p2p))
        world.clock.advance(59)
        self.assertIs(world.subscriptions.get(sub.p2p), sub)
        world.clock.advance(1)
        self.assertIsNone(world.subscriptions.get(sub.p2p))

    def test_off_by_default(self):
        """With timeout 0 a subscription stays until it unsubscribes, with no timer."""
        world = World(subscription_timeout=0)
        sub = world.subscriptions.subscribe("threatbus", timedelta(0))
        self.assertEqual(world.clock.getDelayedCalls(), [])
        world.clock.advance(10**9)
        self.assertIs(world.subscriptions.get(sub.p2p), sub)

    def test_expiry_frees_snapshot_and_buffer(self):
        """An expired app's pending snapshot ends and its buffered frames are dropped, counted."""
        world = World(subscription_timeout=60)
        sub = world.subscriptions.subscribe("threatbus", timedelta(days=1))
        self.assertEqual(world.bus.pending_snapshots(), 1)
        world.publish(intel(1))
        self.assertEqual(len(sub.pending), 1)  # its SUB never connected
        world.clock.advance(60)
        self.assertEqual(world.bus.pending_snapshots(), 0)
        self.assertIsNone(sub.pending)
        self.assertEqual(world.metrics.dropped("unsubscribed"), 1)
        self.assertEqual(world.clock.getDelayedCalls(), [])

    def test_limit(self):
        """refusal() says when max_subscriptions is reached."""
        world = World(max_subscriptions=2, max_subscriptions_per_peer=2)
        world.subscriptions.subscribe("threatbus", timedelta(0))
        self.assertIsNone(world.subscriptions.refusal(""))
        world.subscriptions.subscribe("threatbus", timedelta(0))
        self.assertEqual(world.subscriptions.refusal(""), "max_subscriptions")


class BufferTests(SynchronousTestCase):
    """Frames wait, bounded and in order, until the app can take them."""

    def test_held_until_subscribed(self):
        """Frames for an app whose SUB has not subscribed go out in order when it does."""
        world = World()
        sub = world.app(connected=False)
        for i in range(5):
            world.publish(intel(i))
        self.assertEqual(world.sent, [])
        world.connect(sub)
        self.assertEqual(world.ids(), [f"intel-{i}" for i in range(5)])
        self.assertTrue(all(f.startswith(sub.p2p.encode() + b"intel ") for f in world.sent))
        world.publish(intel(5))
        self.assertEqual(world.ids()[-1], "intel-5")
        self.assertIsNone(sub.pending)

    def test_sent_at_end_of_turn(self):
        """What one reactor turn publishes goes out when the turn ends, each app's in one batch."""
        world = World()
        subs = [world.app() for _ in range(2)]
        for i in range(3):
            world.bus.publish(intel(i))
        self.assertEqual(world.sent, [])
        world.clock.advance(0)
        self.assertEqual(world.xpub.calls, 2)
        for sub in subs:
            mine = [f for f in world.sent if f.startswith(sub.prefix)]
            self.assertEqual(world.ids(mine), ["intel-0", "intel-1", "intel-2"])
        self.assertEqual(world.clock.getDelayedCalls(), [])

    def test_long_turn_flushes(self):
        """A turn that holds FLUSH_FRAMES frames sends them without waiting for its end."""
        self.patch(publisher, "FLUSH_FRAMES", 4)
        world = World()
        for _ in range(2):
            world.app()
        for i in range(3):
            world.bus.publish(intel(i))
        self.assertEqual(world.ids(), ["intel-0", "intel-1"] * 2)
        world.clock.advance(0)
        self.assertEqual(sorted(world.ids()), sorted(["intel-0", "intel-1", "intel-2"] * 2))

    def test_turn_longer_than_buffer(self):
        """A turn that routes more than buffer_bytes of messages to an app that can take them drops none."""
        world = World(buffer_bytes=3 * FRAME)
        world.app()
        world.publish(*(intel(i) for i in range(8)))
        self.assertEqual(world.ids(), [f"intel-{i}" for i in range(8)])
        self.assertEqual(world.metrics.dropped("buffer_overflow"), 0)

    def test_unsubscribed_before_turn_ends(self):
        """An app that unsubscribes before the turn ends is sent nothing more; its frames are counted."""
        world = World()
        sub = world.app()
        world.bus.publish(intel(0))
        world.subscriptions.unsubscribe(sub.p2p)
        world.clock.advance(0)
        self.assertEqual(world.sent, [])
        self.assertEqual(world.metrics.dropped("unsubscribed"), 1)

    def test_stop(self):
        """Stopping the publisher sends what is due and leaves no call behind."""
        world = World()
        world.app()
        world.bus.publish(intel(0))
        world.publisher.stop()
        self.assertEqual(world.ids(), ["intel-0"])
        self.assertEqual(world.clock.getDelayedCalls(), [])

    def test_stop_while_refused(self):
        """Stopping while the socket refuses leaves no call behind either."""
        world = World()
        world.app()
        world.full(True)
        world.publish(intel(0))
        world.bus.publish(intel(1))
        self.assertEqual(len(world.clock.getDelayedCalls()), 2)
        world.publisher.stop()
        self.assertEqual(world.clock.getDelayedCalls(), [])
        self.assertEqual(world.sent, [])

    def test_overflow_drops_oldest(self):
        """A full buffer drops its oldest frames, counted."""
        world = World(buffer_bytes=3 * FRAME)
        sub = world.app(connected=False)
        for i in range(5):
            world.publish(intel(i))
        world.connect(sub)
        self.assertEqual(world.ids(), ["intel-2", "intel-3", "intel-4"])
        self.assertEqual(world.metrics.dropped("buffer_overflow"), 2)

    def test_full_socket_retries(self):
        """When ZeroMQ refuses (XPUB_NODROP at the high-water mark), frames wait and retry in order."""
        world = World()
        world.app()
        world.publish(intel(0))
        world.full(True)
        world.publish(intel(1))
        world.publish(intel(2))
        self.assertEqual(world.ids(), ["intel-0"])
        world.clock.advance(RETRY_INTERVAL)
        self.assertEqual(world.ids(), ["intel-0"])
        world.full(False)
        world.publish(intel(3))  # queued behind the others, not sent ahead
        self.assertEqual(world.ids(), ["intel-0"])
        world.clock.advance(RETRY_INTERVAL)
        self.assertEqual(world.ids(), [f"intel-{i}" for i in range(4)])
        self.assertEqual(world.clock.getDelayedCalls(), [])

    def test_unsubscribed_on_socket(self):
        """When the app's SUB goes away, frames wait again."""
        world = World()
        sub = world.app()
        world.disconnect(sub)
        world.publish(intel(0))
        self.assertEqual(world.sent, [])
        world.connect(sub)
        self.assertEqual(world.ids(), ["intel-0"])

    def test_foreign_subscription(self):
        """A SUB socket subscribed to a short prefix (b"": everything) gets nothing, counted."""
        world = World()
        sub = world.app()
        for prefix in (b"", b"{", sub.prefix[:5], sub.prefix[:31]):
            watcher = world.xpub.connect()
            watcher.subscribe(prefix)
            self.assertEqual(watcher.applied, set())
        world.publish(intel(0))
        self.assertEqual(world.ids(world.peers[sub].receive()), ["intel-0"])
        self.assertEqual([p.receive() for p in world.xpub.peers if p is not world.peers[sub]], [[]] * 4)
        self.assertEqual(world.metrics.dropped("foreign_subscription"), 4)

    def test_encoded_once(self):
        """One message sent to many apps is encoded once: every frame shares the body."""
        world = World()
        for _ in range(3):
            world.app("threatbus")
        calls = []
        real = codec.unstructure
        self.patch(codec, "unstructure", lambda m: calls.append(m) or real(m))
        world.publish(intel(0))
        bodies = {f.partition(b" ")[2] for f in world.sent}
        self.assertEqual(len(world.sent), 3)
        self.assertEqual(len(bodies), 1)
        self.assertEqual(calls, [intel(0)])


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
_requests = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(["subscribe", "unsubscribe", "heartbeat", "dance"]) | _json,
        "topic": st.sampled_from(["threatbus", "threatbus/intel", "threatbus/sighting"]) | _json,
        "snapshot": st.integers(-5, 400) | st.text() | _json,
    },
)


class HandlerTests(SynchronousTestCase):
    """The management handler answers anything with one of the three statuses."""

    def setUp(self):
        self.world = World(max_subscriptions=50_000, max_subscriptions_per_peer=50_000)
        self.handler = ManagementHandler(
            self.world.subscriptions, {"pub_port": 1}, self.world.metrics, self.world.clock
        )

    def status(self, frames):
        reply = self.handler.handle(frames)
        self.assertIn(reply["status"], ("success", "error", "unknown request"))
        return reply

    @settings(max_examples=300, deadline=None)
    @given(_json | _requests)
    def test_reply_encoding(self, value):
        """Every answer is the JSON of a reply, as json.dumps writes it (the constant ones encoded once)."""
        answer = self.handler.answer([json.dumps(value).encode()])
        reply = json.loads(answer)
        self.assertIn(reply["status"], ("success", "error", "unknown request"))
        self.assertEqual(answer, json.dumps(reply).encode())
        self.assertEqual(encode(reply), answer)

    def test_made_up_topics_not_kept(self):
        """Subscriptions to topics a peer makes up are refused, and none is kept to answer faster."""
        from txthreatbus.apps.zmq_app import manage

        for i in range(1000):
            request = json.dumps({"action": "subscribe", "topic": f"threatbus/x{i}" + "y" * 1000})
            self.assertEqual(self.status([request.encode()]), {"status": "error"})
        self.assertEqual(self.status([b'{"action": "subscribe", "topic": "threatbus/intel"}'])["status"], "success")
        self.assertLessEqual(set(manage._SERVED), {
            prefix + slash
            for prefix in ("threatbus", "threatbus/intel", "threatbus/sighting", "stix2", "stix2/indicator", "stix2/sighting")
            for slash in ("", "/")
        })
        self.assertIn("threatbus/intel", manage._SERVED)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=200), max_size=4))
    def test_any_bytes(self, frames):
        """Arbitrary frames never raise out of the handler."""
        self.status(frames)

    @settings(max_examples=300, deadline=None)
    @given(_json | _requests)
    def test_any_json(self, value):
        """Arbitrary JSON never raises out of the handler."""
        self.status([json.dumps(value).encode()])

    @settings(max_examples=100, deadline=None)
    @given(st.sampled_from(["threatbus", "threatbus/intel", "threatbus/sighting"]), st.integers(0, 10_000))
    def test_valid_subscribe(self, topic, days):
        """A valid subscribe succeeds, and its topic then heartbeats and unsubscribes."""
        reply = self.status([json.dumps({"action": "subscribe", "topic": topic, "snapshot": days}).encode()])
        self.assertEqual(reply["status"], "success")
        for action in ("heartbeat", "unsubscribe"):
            request = json.dumps({"action": action, "topic": reply["topic"]}).encode()
            self.assertEqual(self.status([request]), {"status": "success"})

    def test_max_subscriptions(self):
        """Past max_subscriptions, subscribe answers error and counts why."""
        world = World(max_subscriptions=1)
        handler = ManagementHandler(world.subscriptions, {}, world.metrics, world.clock)
        request = [json.dumps({"action": "subscribe", "topic": "threatbus"}).encode()]
        self.assertEqual(handler.handle(request)["status"], "success")
        self.assertEqual(handler.handle(request), {"status": "error"})
        self.assertEqual(world.metrics.dropped("max_subscriptions"), 1)
        self.assertEqual(len(world.subscriptions), 1)


class TopicTests(SynchronousTestCase):
    """P2P topics: 32 lowercase letters, drawn from ``secrets``."""

    def test_from_secrets(self):
        """The topic spells bytes drawn from secrets, modulo 26, skipping bytes of 234 and above."""
        from txthreatbus.apps.zmq_app import subscriptions

        draws = [bytes([0, 25, 26, 233, 234, 255] + [1] * 34), bytes([2] * 40)]
        self.patch(subscriptions.secrets, "token_bytes", lambda n: draws.pop(0)[:n])
        self.assertEqual(subscriptions.new_p2p_topic(), "azaz" + "b" * 28)
        self.assertEqual(len(draws), 1)
        self.patch(subscriptions.secrets, "token_bytes", lambda n: bytes([255] * 20 + [3] * (n - 20)))
        self.assertEqual(subscriptions.new_p2p_topic(), "d" * 32)  # 20 + 20 letters, two draws

    def test_uniform(self):
        """Every letter is about equally likely in every position."""
        from collections import Counter

        from txthreatbus.apps.zmq_app.subscriptions import new_p2p_topic

        counts = Counter("".join(new_p2p_topic() for _ in range(2000)))
        expected = 2000 * 32 / 26
        self.assertEqual(len(counts), 26)
        self.assertTrue(all(abs(n - expected) < 0.1 * expected for n in counts.values()), counts)

    def test_shape(self):
        """Topics are 32 lowercase letters and differ."""
        from txthreatbus.apps.zmq_app.subscriptions import new_p2p_topic

        topics = {new_p2p_topic() for _ in range(1000)}
        self.assertEqual(len(topics), 1000)
        self.assertTrue(all(len(t) == 32 and t.isalpha() and t.islower() for t in topics))
