"""
What a hostile or careless peer can do to the zmq-app, on memory sockets and
a Clock: read nothing of others, blind or stall no one, and cost the bus
bounded memory and log lines.
"""

from __future__ import annotations

import json
from datetime import timedelta

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_bus import LogCapture
from tests.test_subscriptions import FRAME, World, intel
from txthreatbus.model import MessageType, SnapshotRequest


class SubscriptionControlTests(SynchronousTestCase):
    """Only a SUB subscription that begins with a live P2P topic takes effect."""

    def test_watcher_gets_nothing(self):
        """A b"" watcher gets nothing while two apps get theirs."""
        world = World()
        watcher = world.xpub.connect()
        watcher.subscribe(b"")
        a, b = world.app("threatbus"), world.app("threatbus/intel")
        world.bus.subscribe("threatbus", lambda m: None)
        world.publish(*(intel(i) for i in range(3)))
        world.bus.request_snapshot("threatbus", timedelta(days=1), a)
        world.clock.advance(0)
        self.assertEqual(watcher.receive(), [])
        got_a, got_b = world.peers[a].receive(), world.peers[b].receive()
        self.assertEqual(world.ids(got_a), ["intel-0", "intel-1", "intel-2"])
        self.assertEqual(world.ids(got_b[:3]), ["intel-0", "intel-1", "intel-2"])
        self.assertEqual([f[32:49] for f in got_b[3:]], [b"snapshotrequest {"] * 2)
        self.assertTrue(all(f.startswith(a.prefix) for f in got_a))
        self.assertTrue(all(f.startswith(b.prefix) for f in got_b))

    def test_late_app_not_ready_through_watcher(self):
        """A late SUB with a b"" watcher present gets all 20 messages, in order."""
        world = World()
        watcher = world.xpub.connect()
        watcher.subscribe(b"")
        late = world.app(connected=False)
        world.publish(*(intel(i) for i in range(20)))
        self.assertFalse(late.ready)
        self.assertEqual(world.sent, [])  # nothing went out early, to be lost
        world.connect(late)
        self.assertEqual(world.ids(world.peers[late].receive()), [f"intel-{i}" for i in range(20)])

    def test_ready_only_by_own_topic(self):
        """An app is ready once its own topic is subscribed, not before, and not after it leaves."""
        world = World()
        sub = world.app(connected=False)
        other = world.app(connected=False)
        peer = world.xpub.connect()
        peer.subscribe(other.prefix)
        self.assertFalse(sub.ready)
        self.assertTrue(other.ready)
        peer.subscribe(sub.prefix + b"intel")  # a longer prefix is its topic too
        self.assertTrue(sub.ready)
        peer.disconnect()
        self.assertFalse(sub.ready)
        self.assertFalse(other.ready)

    def test_dead_topic(self):
        """Unsubscribing (or reaping) a subscription makes its topic dead: nobody gets it again."""
        world = World(subscription_timeout=10)
        gone, reaped, live = world.app(connected=False), world.app(connected=False), world.app()
        world.subscriptions.unsubscribe(gone.p2p)
        world.clock.advance(10)  # reaps both unconnected... and the live one, which heartbeats not
        self.assertEqual(len(world.subscriptions), 0)
        late = world.xpub.connect()
        for sub in (gone, reaped, live):
            late.subscribe(sub.prefix)
        self.assertEqual(late.applied, set())


class NoBlockingTests(SynchronousTestCase):
    """A peer that does not read loses only its own messages."""

    def test_slow_peer_blocks_no_one(self):
        """An app whose socket is full loses its oldest, counted and logged once; the other gets all."""
        world = World(buffer_bytes=100 * FRAME)
        log = LogCapture(self)
        slow, healthy = world.app(), world.app()
        world.peers[slow].hwm = 10  # it never reads
        for i in range(5000):
            world.publish(intel(i % 10))
            world.clock.advance(0.005)  # the retries
            world.peers[healthy].receive()
            self.assertIsNone(healthy.pending)
        self.assertEqual(world.metrics.dropped("buffer_overflow"), 5000 - 10 - 100)
        self.assertEqual(len(world.peers[slow].queue), 10)
        self.assertLessEqual(slow.pending_bytes, 100 * FRAME)
        warnings = [e for e in log.events if "buffer_overflow" == e.get("reason")]
        self.assertEqual(len(warnings), 3)  # 25 s of the clock: once every 10 s


    def test_retry_when_drained(self):
        """What a full socket refused goes out when ZeroMQ says it drained, without waiting for the timer."""
        world = World()
        sub = world.app()
        peer = world.peers[sub]
        peer.hwm = 2
        world.publish(*(intel(i) for i in range(5)))
        self.assertEqual(len(sub.pending), 3)
        self.assertEqual(world.ids(peer.receive()), ["intel-0", "intel-1"])  # drained: the next two go
        self.assertEqual(world.ids(peer.receive()), ["intel-2", "intel-3"])
        self.assertEqual(world.ids(peer.receive()), ["intel-4"])
        self.assertIsNone(sub.pending)
        self.assertEqual(world.publisher.held_bytes, 0)
        self.assertEqual(world.clock.getDelayedCalls(), [])


class MemoryBoundTests(SynchronousTestCase):
    """Buffers are bounded in bytes, per app and in all."""

    def test_per_app(self):
        """An app's buffer keeps its newest buffer_bytes, dropping the oldest, counted."""
        world = World(buffer_bytes=3 * FRAME)
        sub = world.app(connected=False)
        world.publish(*(intel(i) for i in range(5)))
        self.assertEqual(sub.pending_bytes, 3 * FRAME)
        world.connect(sub)
        self.assertEqual(world.ids(), ["intel-2", "intel-3", "intel-4"])
        self.assertEqual(world.metrics.dropped("buffer_overflow"), 2)

    def test_in_all(self):
        """All buffers together keep max_buffered_bytes, dropping the oldest frames of all."""
        world = World(buffer_bytes=100 * FRAME, max_buffered_bytes=5 * FRAME)
        first, second = world.app(connected=False), world.app(connected=False)
        world.publish(*(intel(i) for i in range(4)))  # 8 frames: 3 of first's dropped
        self.assertEqual(world.publisher.held_bytes, 5 * FRAME)
        self.assertEqual(world.metrics.dropped("max_buffered_bytes"), 3)
        world.connect(first)
        world.connect(second)
        self.assertEqual(world.ids(world.peers[first].receive()), ["intel-3"])
        self.assertEqual(world.ids(world.peers[second].receive()), [f"intel-{i}" for i in range(4)])
        self.assertEqual(world.publisher.held_bytes, 0)

    def test_large_messages(self):
        """900 KB messages for never-connected apps hold at most max_buffered_bytes in all."""
        world = World(buffer_bytes=8 << 20, max_buffered_bytes=32 << 20)
        subs = [world.app(connected=False) for _ in range(5)]
        big = intel(0)
        big = type(big)(big.ts, "x" * 900_000, big.data, big.operation)
        for _ in range(40):
            world.publish(big)
        self.assertLessEqual(world.publisher.held_bytes, 32 << 20)
        self.assertLessEqual(max(s.pending_bytes for s in subs), 8 << 20)
        self.assertEqual(sum(len(s.pending or ()) for s in subs), (32 << 20) // (900_000 + 100))


class SnapshotRequestTests(SynchronousTestCase):
    """Snapshot requests cost the requester, not the bus."""

    def test_held_once(self):
        """2,000 snapshot subscribes of apps that never connect buffer nothing."""
        world = World()
        for _ in range(2000):
            world.app("threatbus", connected=False, snapshot=timedelta(days=1))
        world.clock.advance(0)
        self.assertEqual(world.publisher.held_bytes, 0)
        self.assertEqual(world.subscriptions.held_requests(), 2 * 2000 - 2)  # the last had none to wait for

    def test_late_app_gets_others_requests(self):
        """An app that connects late gets the requests still held, never its own."""
        world = World()
        late = world.app("threatbus", connected=False)
        asker = world.app("threatbus", connected=False, snapshot=timedelta(days=1))
        self.assertEqual(world.publisher.held_bytes, 0)
        peer = world.connect(late)
        requests = [json.loads(f.partition(b" ")[2]) for f in peer.receive()]
        self.assertEqual([r["snapshot_id"] for r in requests], [asker.snapshot_id] * 2)
        self.assertEqual([r["snapshot_type"] for r in requests], [1, 2])
        world.connect(asker)
        self.assertEqual(world.peers[asker].receive(), [])
        # a reconnect is not owed them again
        world.disconnect(late)
        self.assertEqual(world.connect(late).receive(), [])

    def test_released_when_over(self):
        """A request leaves when its snapshot ends: the requester leaves, or it expires."""
        world = World(snapshot_timeout=100)
        world.app("threatbus", connected=False)
        gone = world.app("threatbus/intel", connected=False, snapshot=timedelta(days=1))
        world.app("threatbus/intel", connected=False, snapshot=timedelta(days=1))
        self.assertEqual(world.subscriptions.held_requests(), 2)
        world.subscriptions.unsubscribe(gone.p2p)
        self.assertEqual(world.subscriptions.held_requests(), 1)
        world.clock.advance(100)
        self.assertEqual(world.subscriptions.held_requests(), 0)
        remote = SnapshotRequest(MessageType.INTEL, "remote", timedelta(days=1))
        world.zmq_app.snapshot(remote, None)
        self.assertEqual(world.subscriptions.held_requests(), 1)
        world.clock.advance(100)
        self.assertEqual(world.subscriptions.held_requests(), 0)
        self.assertEqual(world.clock.getDelayedCalls(), [])


def subscribe(world, peer="10.0.0.1", topic="threatbus", snapshot=0):
    return world.sockets.router.request(
        {"action": "subscribe", "topic": topic, "snapshot": snapshot}, peer
    )


class SubscriptionTableTests(SynchronousTestCase):
    """One peer can never take the subscription table from the others."""

    def test_per_peer_cap(self):
        """A peer past max_subscriptions_per_peer is refused, counted; other peers still get in."""
        world = World(max_subscriptions=8)  # a quarter each: 2
        log = LogCapture(self)
        replies = [subscribe(world, "10.0.0.1") for _ in range(5)]
        self.assertEqual([r["status"] for r in replies], ["success"] * 2 + ["error"] * 3)
        self.assertEqual(world.metrics.dropped("max_subscriptions_per_peer"), 3)
        self.assertEqual(len([e for e in log.events if e.get("limit") == "max_subscriptions_per_peer"]), 1)
        self.assertEqual(subscribe(world, "10.0.0.2")["status"], "success")
        world.sockets.router.request({"action": "unsubscribe", "topic": replies[0]["topic"]}, "10.0.0.1")
        self.assertEqual(subscribe(world, "10.0.0.1")["status"], "success")

    def test_configured_cap(self):
        """max_subscriptions_per_peer sets the cap; the table's limit still holds for all."""
        world = World(max_subscriptions=3, max_subscriptions_per_peer=3)
        self.assertEqual([subscribe(world, str(i))["status"] for i in range(4)], ["success"] * 3 + ["error"])
        self.assertEqual(world.metrics.dropped("max_subscriptions"), 1)


class BadRequestTests(SynchronousTestCase):
    """Every malformed request gets an error reply, and the bus goes on."""

    def test_huge_snapshot_digits(self):
        """A snapshot of 5,000 digits (past Python's int conversion limit) is answered error."""
        world = World()
        log = LogCapture(self)
        for _ in range(100):
            self.assertEqual(subscribe(world, snapshot="9" * 5000), {"status": "error"})
        number = b'{"action": "subscribe", "topic": "threatbus", "snapshot": ' + b"9" * 5000 + b"}"
        self.assertEqual(world.sockets.router.request(number), {"status": "error"})
        for snapshot in (1.5, -1, True, [1], {"days": 1}, "1e3", "\uff11"):
            self.assertEqual(subscribe(world, snapshot=snapshot), {"status": "error"}, snapshot)
        self.assertEqual(log.failures(), [])
        self.assertEqual(len([e for e in log.events if "a snapshot that" in e["log_format"]]), 1)
        self.assertEqual(subscribe(world, snapshot="30")["status"], "success")

    def test_subscribe_flood_logged_throttled(self):
        """Subscribes and unsubscribes in a flood log once every 10 s a kind, with a count."""
        world = World()
        log = LogCapture(self)
        for _ in range(1000):
            topic = subscribe(world)["topic"]
            world.sockets.router.request({"action": "unsubscribe", "topic": topic})
        world.clock.advance(10)
        subscribe(world)
        lines = [e for e in log.events if e["log_format"].startswith(("Subscribed", "Unsubscribed"))]
        self.assertEqual(len(lines), 3)
        self.assertEqual(lines[-1]["held"], 999)


class StopTests(SynchronousTestCase):
    """Stopping flushes what is due, then closes the sockets, then frees them."""

    def test_stop_in_delivery_turn(self):
        """A stop in the same reactor turn as a delivery loses nothing and logs no failure."""
        world = World()
        log = LogCapture(self)
        sub = world.app()
        world.bus.publish(intel(0))  # due at the end of this turn
        closed = []
        world.sockets.xpub.shutdown = lambda: closed.append(list(world.sent))
        d = world.zmq_app.stopService()
        self.successResultOf(d)
        self.assertEqual(world.ids(closed[0]), ["intel-0"])  # sent before the socket closed
        self.assertEqual(world.ids(world.peers[sub].receive()), ["intel-0"])
        self.assertTrue(world.sockets.closed)
        self.assertEqual(world.clock.getDelayedCalls(), [])
        self.assertEqual(log.failures(), [])
        self.successResultOf(world.zmq_app.stopService())  # harmless twice

    def test_start_guarded(self):
        """Starting twice opens each endpoint once."""
        world = World()
        xpub = world.sockets.xpub
        world.zmq_app.privilegedStartService()
        world.zmq_app.startService()
        self.assertIs(world.sockets.xpub, xpub)


class FairOverflowTests(SynchronousTestCase):
    """Apps that keep up lose nothing to the total bound."""

    def test_ready_app_keeps_its_frames(self):
        """Past max_buffered_bytes the frames of apps that cannot take them go first."""
        world = World(buffer_bytes=100 * FRAME, max_buffered_bytes=6 * FRAME)
        ready = world.app()
        unready = world.app(connected=False)
        world.bus.publish(intel(0))  # ready's frame waits for the end of the turn...
        for i in range(1, 5):
            world.bus.publish(intel(i))  # ...while both buffers pass the bound together
        world.clock.advance(0)
        self.assertEqual(world.ids(world.peers[ready].receive()), [f"intel-{i}" for i in range(5)])
        self.assertEqual(world.metrics.dropped("max_buffered_bytes"), 4)
        self.assertEqual(len(unready.pending), 1)


class SayWhereTests(SynchronousTestCase):
    """Start-up says where each endpoint listens, and warns of a wildcard that advertises loopback."""

    def listening(self, log):
        return [e for e in log.events if "listening on" in e["log_format"]]

    def test_one_line_per_endpoint(self):
        """One line per endpoint: host and port, the advertised host, CURVE on or off."""
        log = LogCapture(self)
        world = World(host="127.0.0.1", manage=13370, pub=13371, sub=13372)
        lines = self.listening(log)
        self.assertEqual([(e["endpoint"], e["port"]) for e in lines], [("manage", 13370), ("pub", 13371), ("sub", 13372)])
        self.assertEqual({(e["host"], e["advertised"], e["curve"]) for e in lines}, {("127.0.0.1", "127.0.0.1", "off")})
        self.assertEqual(world.zmq_app.ports, {"manage": 13370, "pub": 13371, "sub": 13372})

    def test_wildcard_advertising_loopback(self):
        """A wildcard bind whose machine name is localhost warns, naming advertise_host."""
        from txthreatbus.apps.zmq_app import service

        self.patch(service.socket, "getfqdn", lambda: "localhost")
        log = LogCapture(self)
        World(host="0.0.0.0")
        warnings = [e for e in log.events if "advertise_host" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["advertised"], "localhost")
        self.assertEqual({e["advertised"] for e in self.listening(log)}, {"localhost"})

    def test_wildcard_advertising_address(self):
        """A wildcard bind with a reachable advertise_host does not warn."""
        log = LogCapture(self)
        World(host="0.0.0.0", advertise_host="192.0.2.7")
        self.assertEqual([e for e in log.events if "advertise_host" in e["log_format"]], [])

    def test_lines_in_file_log(self):
        """The listening lines reach the file log too: logging starts before the endpoints."""
        from txthreatbus.apps.zmq_app.memory import MemorySockets
        from txthreatbus.config import Config, LoggingConfig, ZmqAppConfig
        from txthreatbus.tap import bus_service

        path = self.mktemp()
        config = Config(logging=LoggingConfig(console=False, file=True, filename=path), apps={"zmq-app": ZmqAppConfig()}, store=None)
        top = bus_service(config, Clock(), sockets=MemorySockets)
        top.privilegedStartService()
        top.startService()
        self.successResultOf(top.stopService())
        with open(path) as f:
            text = f.read()
        for endpoint in ("manage", "pub", "sub"):
            self.assertIn(f"zmq-app {endpoint} endpoint listening on 127.0.0.1:", text)


class SeamTests(SynchronousTestCase):
    """The real and the in-memory sockets provide the same narrow interfaces."""

    def test_interfaces(self):
        """ZmqSockets and MemorySockets provide IServerSockets; their publishers IPublisherSocket."""
        from zope.interface.verify import verifyClass, verifyObject

        from txthreatbus.apps.zmq_app.memory import MemorySockets
        from txthreatbus.apps.zmq_app.publisher import PublisherConnection
        from txthreatbus.apps.zmq_app.sockets import ZmqSockets
        from txthreatbus.config import ZmqAppConfig
        from txthreatbus.interfaces import IConnection, IPublisherSocket, IServerSockets
        from txthreatbus.metrics import Metrics

        real = ZmqSockets(ZmqAppConfig(pub=0), Metrics(), Clock())
        self.assertTrue(verifyObject(IServerSockets, real))
        self.assertTrue(verifyObject(IServerSockets, MemorySockets()))
        self.assertTrue(verifyClass(IPublisherSocket, PublisherConnection))
        world = World()
        self.assertTrue(verifyObject(IPublisherSocket, world.sockets.xpub))
        self.assertTrue(verifyObject(IConnection, world.sockets.receiver_socket))
        self.assertTrue(verifyObject(IConnection, world.sockets.router))


class TreeStopTests(SynchronousTestCase):
    """The bus's service tree stops every child and loses no error."""

    def test_failing_child(self):
        """A child that fails to stop is logged, by name; the others stop, and so does the tree."""
        from twisted.application.service import Service
        from twisted.internet.defer import fail

        from txthreatbus.services import BusService

        class Broken(Service):
            def stopService(self):
                Service.stopService(self)
                return fail(RuntimeError("boom"))

        log = LogCapture(self)
        top = BusService()
        first, broken, last = Service(), Broken(), Service()
        for name, child in (("first", first), ("broken", broken), ("last", last)):
            child.setName(name)
            child.setServiceParent(top)
        top.startService()
        self.successResultOf(top.stopService())
        self.assertEqual([c.running for c in (first, broken, last)], [0, 0, 0])
        self.assertEqual([e["service"] for e in log.failures()], ["broken"])
        self.flushLoggedErrors(RuntimeError)
