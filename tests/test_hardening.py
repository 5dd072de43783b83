"""
The zmq-app holds where Threat Bus 2020.11.26 failed: slow joiners, bad input
on every socket, thousands of subscribers, restarts, CurveZMQ.
"""

from __future__ import annotations

import json
import socket

import zmq
import zmq.auth
from twisted.internet import reactor
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from tests.support import (
    App,
    Context,
    drain,
    publish_until_seen,
    receive,
    request,
    settle,
    start_bus,
    wait_for,
    zmq_app_of,
)
from tests.test_zmq_app import INTEL, SIGHTING, intel
from txthreatbus import logs
from txthreatbus.config import Config, CurveConfig, ZmqAppConfig
from txthreatbus.tap import bus_service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def assert_healthy(testcase, top, ctx):
    """A valid subscribe and a valid intel both succeed."""
    receiver, publisher = App.on(ctx, top), App.on(ctx, top)
    await receiver.subscribe(ctx, "threatbus/intel")
    await publisher.subscribe(ctx, "threatbus/sighting")
    await receiver.wait_connected(top)
    await publish_until_seen(publisher, "threatbus/intel", INTEL, [receiver])
    publisher.publish("threatbus/intel", intel(42))
    testcase.assertEqual(await receiver.receive(1), [("intel", intel(42))])


class SlowJoinerTests(TestCase):
    """Nothing is lost to an app whose SUB connects late."""

    async def test_late_sub(self):
        """An app that connects its SUB 2 s after subscribing gets everything, in order, snapshot included."""
        top = start_bus(self)
        ctx = Context(self)
        responder = App.on(ctx, top)
        await responder.subscribe(ctx, "threatbus")
        await responder.wait_connected(top)
        late = App.on(ctx, top)
        await late.subscribe(ctx, "threatbus", snapshot=10, connect_sub=False)
        requests = [body for _, body in await responder.receive(2)]
        snapshot_id = requests[0]["snapshot_id"]
        # make sure the responder's PUB is connected: probe through a watcher
        watcher = App.on(ctx, top)
        await watcher.subscribe(ctx, "threatbus/sighting")
        await watcher.wait_connected(top)
        await publish_until_seen(responder, "threatbus/sighting", SIGHTING, [watcher])
        sent = []
        for i in range(20):
            envelope = {"snapshot_type": 1, "snapshot_id": snapshot_id, "body": intel(f"old-{i}")}
            responder.publish("threatbus/snapshotenvelope", envelope)
            responder.publish("threatbus/intel", intel(i))
            sent += [f"intel-old-{i}", f"intel-{i}"]
        await settle(2.0)
        late.connect_sub(ctx)
        got = []

        def all_intel():
            # the probe sightings published above come first, as many as it took
            got.extend(late.parse(f) for f in drain(late.sub))
            return len([s for s, _ in got if s == "intel"]) >= len(sent)

        await wait_for(all_intel, what="everything held for the late app")
        await settle(0.1)
        got.extend(late.parse(f) for f in drain(late.sub))
        self.assertEqual([body.get("id") for s, body in got if s == "intel"], sent)
        self.assertEqual(top.getServiceNamed("bus").metrics.dropped("buffer_overflow"), 0)


    async def test_sub_to_everything(self):
        """An app whose SUB socket subscribes to everything (b"") gets its messages."""
        top = start_bus(self)
        ctx = Context(self)
        app = App.on(ctx, top)
        await app.subscribe(ctx, "threatbus/intel", connect_sub=False)
        app.sub = ctx.socket(zmq.SUB, "tcp://" + app.reply["pub_endpoint"])
        app.sub.setsockopt(zmq.SUBSCRIBE, b"")
        publisher = App.on(ctx, top)
        await publisher.subscribe(ctx, "threatbus/sighting")
        await publish_until_seen(publisher, "threatbus/intel", INTEL, [app])
        publisher.publish("threatbus/intel", intel(7))
        self.assertEqual(await app.receive(1), [("intel", intel(7))])


class BadInputTests(TestCase):
    """Bad input on any socket gets an error or a counted drop; the bus goes on."""

    def setUp(self):
        self.top = start_bus(self, max_message_size=1 << 20)
        self.ctx = Context(self)
        self.ports = zmq_app_of(self.top).ports
        self.metrics = self.top.getServiceNamed("bus").metrics

    def manage(self, kind=zmq.REQ):
        return self.ctx.socket(kind, f"tcp://127.0.0.1:{self.ports['manage']}")

    async def test_dealer_without_delimiter(self):
        """A raw DEALER's frames without an empty delimiter are dropped and counted."""
        dealer = self.manage(zmq.DEALER)
        dealer.send(json.dumps({"action": "subscribe", "topic": "threatbus"}).encode())
        await wait_for(lambda: self.metrics.dropped("manage_no_delimiter") == 1)
        await assert_healthy(self, self.top, self.ctx)

    async def test_flood_logged_once(self):
        """A flood of malformed messages is counted in full and logged once, not once a message."""
        events = []
        logs.publisher.addObserver(events.append)
        self.addCleanup(logs.publisher.removeObserver, events.append)
        app = App.on(self.ctx, self.top)
        await app.subscribe(self.ctx, "threatbus/intel")
        await app.wait_connected(self.top)
        await publish_until_seen(app, "threatbus/intel", INTEL, [app])
        for _ in range(500):
            app.publish("threatbus/intel", b'{"ts": 1}')
        await wait_for(lambda: self.metrics.dropped("malformed") == 500, what="500 drops counted")
        dropped = [e for e in events if e.get("log_format", "").startswith("Dropped a malformed")]
        self.assertEqual(len(dropped), 1)
        await assert_healthy(self, self.top, self.ctx)

    async def test_requests_in_flight(self):
        """Many requests in flight at once, from several DEALERs, are each answered once."""
        dealers = [self.manage(zmq.DEALER) for _ in range(3)]
        for dealer in dealers:
            for i in range(200):
                action = "subscribe" if i % 2 else "heartbeat"
                dealer.send_multipart([b"", json.dumps({"action": action, "topic": "threatbus"}).encode()])
        for dealer in dealers:
            replies = [json.loads(frames[1]) for frames in await receive(dealer, 200)]
            self.assertEqual([r["status"] for r in replies], ["error", "success"] * 100)
            self.assertEqual(drain(dealer), [])
        self.assertEqual(len(zmq_app_of(self.top).subscriptions), 300)

    async def test_many_frames(self):
        """A request of many frames is an error."""
        reply = await request(self.manage(), [b"{}"] * 50)
        self.assertEqual(reply, {"status": "error"})
        await assert_healthy(self, self.top, self.ctx)

    async def test_empty_frames(self):
        """Empty frames are an error."""
        self.assertEqual(await request(self.manage(), [b"", b""]), {"status": "error"})
        self.assertEqual(await request(self.manage(), b""), {"status": "error"})
        await assert_healthy(self, self.top, self.ctx)

    def disconnects(self, endpoint):
        return self.metrics.registry.get_sample_value(
            "txthreatbus_disconnects_total", {"endpoint": endpoint}
        )

    async def test_huge_request(self):
        """A 10 MB request is refused by ZMQ_MAXMSGSIZE, counted; the next requests are served."""
        self.manage().send(b"{" + b" " * (10 << 20) + b"}")
        await wait_for(lambda: self.disconnects("manage") == 1, what="the refusal to be counted")
        await assert_healthy(self, self.top, self.ctx)

    async def test_deeply_nested(self):
        """Deeply nested JSON is an error, not a crash."""
        reply = await request(self.manage(), b"[" * 100_000 + b"]" * 100_000)
        self.assertEqual(reply, {"status": "error"})
        reply = await request(self.manage(), b'{"action": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        self.assertEqual(reply, {"status": "error"})
        await assert_healthy(self, self.top, self.ctx)

    async def test_not_utf8(self):
        """Bytes that are not UTF-8 are an error."""
        self.assertEqual(await request(self.manage(), b'{"action": "\xff\xfe"}'), {"status": "error"})
        await assert_healthy(self, self.top, self.ctx)

    async def test_oversize_on_sub(self):
        """An oversize message on the sub endpoint is refused and counted; later valid messages pass."""
        pub = self.ctx.socket(zmq.PUB, f"tcp://127.0.0.1:{self.ports['sub']}")
        await settle(0.1)
        self.assertEqual(self.disconnects("sub"), 0)
        pub.send(b"threatbus/intel " + b" " * (2 << 20))
        await wait_for(lambda: self.disconnects("sub") == 1, what="the refusal to be counted")
        deep = b"threatbus/intel " + b"[" * 100_000 + b"]" * 100_000
        pub.send(deep)
        await assert_healthy(self, self.top, self.ctx)


class ScaleTests(TestCase):
    """Thousands of subscribers in one process."""

    async def test_2000_subscribers(self):
        """2,000 subscriptions all receive a published intel item."""
        top = start_bus(self)
        ctx = Context(self)
        manage = ctx.socket(zmq.REQ, f"tcp://127.0.0.1:{zmq_app_of(top).ports['manage']}")
        topics = []
        for _ in range(2000):
            reply = await request(manage, {"action": "subscribe", "topic": "threatbus/intel"})
            topics.append(reply["topic"])
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SNDHWM, 0)  # let all 2,000 subscriptions out
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.connect("tcp://" + reply["pub_endpoint"])
        for topic in topics:
            sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        subscriptions = zmq_app_of(top).subscriptions
        await wait_for(lambda: all(s.ready for s in subscriptions), what="2,000 SUB subscriptions")
        pub = ctx.socket(zmq.PUB, "tcp://" + reply["sub_endpoint"])
        await settle(0.2)
        pub.send(b"threatbus/intel " + json.dumps(INTEL).encode())
        frames = await receive(sub, 2000)
        self.assertEqual(sorted(f[:32].decode() for f in frames), sorted(topics))
        await settle(0.1)
        self.assertEqual(drain(sub), [])


class LifecycleTests(TestCase):
    """Start, stop, start again."""

    async def test_start_stop_start(self):
        """The same ports can be bound again after a stop, in one process."""
        ports = {"manage": free_port(), "pub": free_port(), "sub": free_port()}
        config = Config(zmq_app=ZmqAppConfig(**ports))
        first = bus_service(config, reactor)
        first.startService()
        await first.stopService()
        second = start_bus(self, config)
        self.assertEqual(zmq_app_of(second).ports, ports)
        await assert_healthy(self, second, Context(self))

    async def test_stop_frees_everything(self):
        """stopService ends pending snapshots, cancels timers, and is harmless twice."""
        top = start_bus(self, subscription_timeout=60)
        ctx = Context(self)
        app = App.on(ctx, top)
        await settle(0.01)
        before = set(reactor.getDelayedCalls())
        await app.subscribe(ctx, "threatbus", snapshot=1)
        bus = top.getServiceNamed("bus")
        ours = {
            c for c in set(reactor.getDelayedCalls()) - before if c.getTime() - reactor.seconds() > 30
        }
        self.assertEqual(len(ours), 2)  # liveness (60 s) and snapshot expiry (1 h)
        self.assertEqual(bus.pending_snapshots(), 1)
        await top.stopService()
        await top.stopService()
        self.assertEqual(bus.pending_snapshots(), 0)
        self.assertEqual(len(zmq_app_of(top).subscriptions), 0)
        self.assertEqual([c for c in ours if c.active()], [])


class CurveTests(TestCase):
    """Optional CurveZMQ: only listed client keys get in."""

    def setUp(self):
        base = FilePath(self.mktemp())
        keys, authorized, other = base.child("keys"), base.child("authorized"), base.child("other")
        for d in (keys, authorized, other):
            d.makedirs()
        _, server_secret = zmq.auth.create_certificates(keys.path, "server")
        _, self.client_secret = zmq.auth.create_certificates(authorized.path, "client")
        _, self.stranger_secret = zmq.auth.create_certificates(other.path, "stranger")
        self.server_public, _ = zmq.auth.load_certificate(server_secret)
        curve = CurveConfig(server_secret_key_file=server_secret, authorized_clients_dir=authorized.path)
        self.top = start_bus(self, curve=curve)
        self.ctx = Context(self)

    def socket(self, kind, secret_file, connect):
        public, secret = zmq.auth.load_certificate(secret_file)
        s = self.ctx.socket(kind)
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, self.server_public
        s.connect(connect)
        return s

    async def test_authorized(self):
        """An authorized client subscribes, publishes and receives, all encrypted."""
        port = zmq_app_of(self.top).ports["manage"]
        manage = self.socket(zmq.REQ, self.client_secret, f"tcp://127.0.0.1:{port}")
        reply = await request(manage, {"action": "subscribe", "topic": "threatbus/intel"})
        self.assertEqual(reply["status"], "success")
        sub = self.socket(zmq.SUB, self.client_secret, "tcp://" + reply["pub_endpoint"])
        sub.setsockopt_string(zmq.SUBSCRIBE, reply["topic"])
        pub = self.socket(zmq.PUB, self.client_secret, "tcp://" + reply["sub_endpoint"])
        app = App(manage=manage, sub=sub, pub=pub, p2p=reply["topic"], reply=reply)
        await app.wait_connected(self.top)

        def heard():
            app.publish("threatbus/intel", INTEL)
            return drain(sub)

        frames = await wait_for(heard, what="an encrypted round trip")
        self.assertEqual(app.parse(frames[0]), ("intel", INTEL))

    async def test_unknown_key(self):
        """A client with an unknown key gets nothing, not even a management reply."""
        port = zmq_app_of(self.top).ports["manage"]
        manage = self.socket(zmq.REQ, self.stranger_secret, f"tcp://127.0.0.1:{port}")
        manage.send(json.dumps({"action": "subscribe", "topic": "threatbus"}).encode())
        await settle(1.0)
        self.assertEqual(manage.poll(0), 0)
        self.assertEqual(len(zmq_app_of(self.top).subscriptions), 0)
        metrics = self.top.getServiceNamed("bus").metrics
        self.assertGreaterEqual(metrics.dropped("curve_unauthorized"), 1)

    async def test_plain_client_refused(self):
        """A client without CURVE gets no reply either."""
        port = zmq_app_of(self.top).ports["manage"]
        manage = self.ctx.socket(zmq.REQ, f"tcp://127.0.0.1:{port}")
        manage.send(json.dumps({"action": "subscribe", "topic": "threatbus"}).encode())
        await settle(1.0)
        self.assertEqual(manage.poll(0), 0)
