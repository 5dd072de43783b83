"""
The client library: unit tests on a Clock with fake sockets, then the real
thing against a running bus (and a Threat Bus 2020.11.26-style REP server).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import attrs
import zmq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from txthreatbus import codec, logs, stix
from txthreatbus.client import (
    RETRY_INTERVAL,
    Client,
    ClientStopped,
    Endpoints,
    IManageSocket,
    IPublisherSocket,
    ISubscriberSocket,
    ITransport,
    ProtocolError,
    RequestFailed,
    RequestTimeout,
    SubscriberConnection,
    ZmqTransport,
    parse_endpoint,
    parse_subscribe_reply,
)
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
from txthreatbus.testing import (
    FakeManage,
    FakePublisher,
    FakeSubscriber,
    FakeTransport,
    subscribe_reply as reply_for,
)
from tests.support import App, Context, free_ports, publish_until_seen, start_bus, wait_for, zmq_app_of

INTEL = Intel(
    ts=datetime(2020, 11, 26, 14, 46, 52, 123456),
    id="intel-1",
    data=IntelData(indicator=("example.com",), intel_type=IntelType.DOMAIN),
    operation=Operation.ADD,
)
SIGHTING = Sighting(
    ts=datetime(2020, 11, 26, 14, 47, 0),
    intel="intel-1",
    context={"source": "zeek"},
    ioc=("example.com",),
)
INDICATOR = stix.Indicator(
    id="indicator--6911104f-c504-4086-a15b-05e28cf73435",
    pattern="[ipv4-addr:value = '203.0.113.1']",
    pattern_type="stix",
    created="2022-05-16T10:00:00.000Z",
    modified="2022-05-16T10:00:00.000Z",
    valid_from="2022-05-16T10:00:00Z",
)
P2P = "a" * 32
P2P_2 = "b" * 32


class ClientTests(SynchronousTestCase):
    """The client's logic, on a Clock with fake sockets."""

    def setUp(self):
        self.clock = Clock()
        self.transport = FakeTransport()
        self.client = Client(
            "127.0.0.1:13370",
            clock=self.clock,
            transport=self.transport,
            heartbeat_interval=5.0,
            request_timeout=3.0,
            backoff_initial=1.0,
            backoff_max=4.0,
        )
        self.client.startService()
        self.received = []

    def subscribe(self, topic="threatbus/intel", days=0, reply=None):
        d = self.client.subscribe(topic, days, self.received.append)
        self.transport.manage_socket.answer(reply or reply_for())
        return self.successResultOf(d)

    def test_fakes_provide_the_interfaces(self):
        """The fakes provide the socket and transport interfaces."""
        verifyObject(ITransport, self.transport)
        verifyObject(IManageSocket, FakeManage("x:1"))
        verifyObject(ISubscriberSocket, FakeSubscriber("x:1", None))
        verifyObject(IPublisherSocket, FakePublisher("x:1", None))

    def test_subscribe_request(self):
        """subscribe sends the protocol's subscribe request to the management endpoint."""
        self.client.subscribe("threatbus/sighting", 3)
        self.assertEqual(self.transport.manage_socket.endpoint, "127.0.0.1:13370")
        self.assertEqual(
            self.transport.manage_socket.open(),
            [{"action": "subscribe", "topic": "threatbus/sighting", "snapshot": 3}],
        )

    def test_subscribe_opens_sockets(self):
        """A subscription's SUB socket listens on its P2P topic, its PUB socket goes to the bus's SUB."""
        sub = self.subscribe()
        self.assertEqual(sub.p2p, P2P)
        (subscriber,) = self.transport.subscribers
        self.assertEqual(
            (subscriber.endpoint, subscriber.prefixes), ("127.0.0.1:13371", {P2P.encode()})
        )
        (publisher,) = self.transport.publishers
        self.assertEqual(publisher.endpoint, "127.0.0.1:13372")
        self.assertEqual(self.client.subscriptions, [sub])

    def test_subscribe_refused(self):
        """A subscribe answered with error fails with RequestFailed."""
        d = self.client.subscribe("threatbus/intel")
        self.transport.manage_socket.answer({"status": "error"})
        self.assertEqual(self.failureResultOf(d, RequestFailed).value.status, "error")
        self.assertEqual(self.client.subscriptions, [])

    def test_subscribe_bad_snapshot(self):
        """A snapshot that is not a whole number of days >= 0 is refused at once."""
        for days in (-1, 1.5, "3", True):
            self.assertRaises(ValueError, self.client.subscribe, "threatbus/intel", days)

    def test_reply_not_json(self):
        """A reply that is not a JSON object fails with ProtocolError."""
        d = self.client.request({"action": "heartbeat", "topic": P2P})
        self.transport.manage_socket.requests[0][1].callback([b"nope"])
        self.failureResultOf(d, ProtocolError)

    def test_request_timeout_makes_new_socket(self):
        """An unanswered request fails after the timeout, and the next one goes over a new socket."""
        d = self.client.subscribe("threatbus/intel")
        first = self.transport.manage_socket
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, RequestTimeout)
        self.assertTrue(first.closed)
        self.client.subscribe("threatbus/intel")
        self.assertEqual(len(self.transport.manages), 2)
        self.assertEqual(len(self.transport.manage_socket.open()), 1)

    def test_heartbeat_every_interval(self):
        """A subscription heartbeats its P2P topic every heartbeat_interval seconds."""
        self.subscribe()
        manage = self.transport.manage_socket
        self.clock.advance(4.9)
        self.assertEqual(manage.open(), [])
        self.clock.advance(0.1)
        self.assertEqual(
            manage.answer({"status": "success"}), {"action": "heartbeat", "topic": P2P}
        )
        self.clock.advance(5)
        self.assertEqual(
            manage.answer({"status": "success"}), {"action": "heartbeat", "topic": P2P}
        )
        self.assertEqual(manage.open(), [])

    def test_heartbeat_error_resubscribes(self):
        """A heartbeat answered with error (the bus restarted) subscribes again and moves the SUB socket."""
        sub = self.subscribe()
        manage = self.transport.manage_socket
        self.clock.advance(5)
        manage.answer({"status": "error"})
        self.assertEqual(
            manage.answer(reply_for(P2P_2)),
            {"action": "subscribe", "topic": "threatbus/intel", "snapshot": 0},
        )
        self.assertEqual((sub.p2p, sub.resubscriptions), (P2P_2, 1))
        (subscriber,) = self.transport.subscribers
        self.assertEqual(subscriber.prefixes, {P2P_2.encode()})
        self.assertEqual(len(self.transport.publishers), 1)
        self.clock.advance(5)
        self.assertEqual(manage.open(), [{"action": "heartbeat", "topic": P2P_2}])

    def test_heartbeat_timeout_resubscribes(self):
        """An unanswered heartbeat subscribes again over a new management socket."""
        sub = self.subscribe()
        first = self.transport.manage_socket
        self.clock.advance(5)
        self.clock.advance(3)
        self.assertTrue(first.closed)
        second = self.transport.manage_socket
        self.assertIsNot(second, first)
        second.answer(reply_for(P2P_2))
        self.assertEqual(sub.p2p, P2P_2)

    def test_resubscribe_backs_off(self):
        """Failed tries to subscribe again wait 1, 2, 4, 4 s (doubling, capped) before the next."""
        sub = self.subscribe()
        manage = self.transport.manage_socket
        self.clock.advance(5)
        manage.answer({"status": "error"})
        for delay in (1, 2, 4, 4):
            manage.answer({"status": "error"})
            self.clock.advance(delay - 0.01)
            self.assertEqual(manage.open(), [])
            self.clock.advance(0.01)
            self.assertEqual(len(manage.open()), 1)
        manage.answer(reply_for(P2P_2))
        self.assertEqual(sub.p2p, P2P_2)
        self.clock.advance(5)
        self.assertEqual(manage.open(), [{"action": "heartbeat", "topic": P2P_2}])

    def test_resubscribe_logs(self):
        """Losing the bus and subscribing again are logged as structured events."""
        events = []
        logs.publisher.addObserver(events.append)
        self.addCleanup(logs.publisher.removeObserver, events.append)
        self.subscribe()
        self.clock.advance(5)
        self.transport.manage_socket.answer({"status": "error"})
        self.transport.manage_socket.answer({"status": "error"})
        self.clock.advance(1)
        self.transport.manage_socket.answer(reply_for(P2P_2))
        formats = [e["log_format"] for e in events]
        self.assertIn(
            "Threat Bus did not take the heartbeat of {p2p} ({problem}): subscribing to {topic} again",
            formats,
        )
        self.assertIn(
            "Could not subscribe to {topic} again ({error}); trying again in {delay} s", formats
        )
        again = [e for e in events if e["log_format"].startswith("Subscribed to {topic} again")]
        self.assertEqual((again[0]["p2p"], again[0]["old"]), (P2P_2, P2P))

    def test_resubscribe_to_new_endpoints(self):
        """Subscribing again to a bus on other ports moves both SUB and PUB sockets there."""
        sub = self.subscribe()
        self.clock.advance(5)
        self.transport.manage_socket.answer({"status": "error"})
        self.transport.manage_socket.answer(reply_for(P2P_2, pub="10.0.0.1:1", sub="10.0.0.1:2"))
        old_sub, new_sub = self.transport.subscribers
        old_pub, new_pub = self.transport.publishers
        self.assertTrue(old_sub.closed and old_pub.closed)
        self.assertEqual((new_sub.endpoint, new_sub.prefixes), ("10.0.0.1:1", {P2P_2.encode()}))
        self.assertEqual(new_pub.endpoint, "10.0.0.1:2")
        self.assertEqual(sub.endpoints, Endpoints(P2P_2, "10.0.0.1:1", "10.0.0.1:2"))

    def test_bus_without_heartbeats(self):
        """A bus that answers 'unknown request' to heartbeats is not heartbeated again."""
        self.subscribe()
        manage = self.transport.manage_socket
        self.clock.advance(5)
        manage.answer({"status": "unknown request"})
        self.clock.advance(60)
        self.assertEqual(manage.open(), [])

    def test_stop_unsubscribes(self):
        """Stopping the client unsubscribes, closes the sockets and the transport."""
        self.subscribe()
        d = self.client.stopService()
        self.assertNoResult(d)
        self.assertEqual(
            self.transport.manage_socket.answer({"status": "success"}),
            {"action": "unsubscribe", "topic": P2P},
        )
        self.successResultOf(d)
        self.assertTrue(self.transport.subscribers[0].closed)
        self.assertTrue(self.transport.publishers[0].closed)
        self.assertTrue(self.transport.manage_socket.closed)
        self.assertTrue(self.transport.closed)
        self.clock.advance(60)
        self.assertEqual(self.transport.manage_socket.open(), [])

    def test_stop_twice(self):
        """stopService is safe to call twice, and both Deferreds fire."""
        self.subscribe()
        first, second = self.client.stopService(), self.client.stopService()
        self.transport.manage_socket.answer({"status": "success"})
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.transport.manage_socket.open(), [])

    def test_stop_while_backing_off(self):
        """Stopping while waiting to subscribe again stops at once and unsubscribes the last topic."""
        self.subscribe()
        self.clock.advance(5)
        self.transport.manage_socket.answer({"status": "error"})
        self.transport.manage_socket.answer({"status": "error"})
        d = self.client.stopService()
        self.assertEqual(
            self.transport.manage_socket.answer({"status": "error"}),
            {"action": "unsubscribe", "topic": P2P},
        )
        self.successResultOf(d)

    def test_stop_after_unanswered_unsubscribe(self):
        """Stopping finishes even when the bus does not answer the unsubscribe."""
        self.subscribe()
        d = self.client.stopService()
        self.clock.advance(3)
        self.successResultOf(d)
        self.assertTrue(self.transport.closed)

    def test_subscribe_in_flight_at_stop(self):
        """A subscribe answered while the client stops becomes a subscription that is unsubscribed."""
        d = self.client.subscribe("threatbus/intel")
        stopped = self.client.stopService()
        self.transport.manage_socket.answer(reply_for())
        sub = self.successResultOf(d)
        self.assertEqual(
            self.transport.manage_socket.answer({"status": "success"}),
            {"action": "unsubscribe", "topic": sub.p2p},
        )
        self.successResultOf(stopped)

    def test_subscribe_after_stop(self):
        """Subscribing on a stopped client fails with ClientStopped; it does not start again."""
        self.successResultOf(self.client.stopService())
        self.failureResultOf(self.client.subscribe("threatbus/intel"), ClientStopped)
        self.assertRaises(ClientStopped, self.client.startService)

    def test_waiters_fail_on_stop(self):
        """Waiting for a connection that never comes fails with ClientStopped when the subscription stops."""
        sub = self.subscribe()
        connected = sub.connected()
        d = sub.unsubscribe()
        self.transport.manage_socket.answer({"status": "success"})
        self.successResultOf(d)
        self.failureResultOf(connected, ClientStopped)

    def test_bad_settings(self):
        """Intervals and timeouts must be > 0."""
        for name in ("heartbeat_interval", "request_timeout", "backoff_initial", "backoff_max"):
            self.assertRaises(
                ValueError, Client, clock=self.clock, transport=self.transport, **{name: 0}
            )

    def test_unsubscribe_one(self):
        """unsubscribe stops one subscription and removes it from the client."""
        sub = self.subscribe()
        d = sub.unsubscribe()
        self.transport.manage_socket.answer({"status": "success"})
        self.successResultOf(d)
        self.assertEqual(self.client.subscriptions, [])
        self.assertRaises(ClientStopped, sub.publish_intel, INTEL)

    def test_messages_reach_callback(self):
        """Frames on the P2P topic reach the callback as model objects."""
        self.subscribe()
        receive = self.transport.subscribers[0].receive
        request = SnapshotRequest(MessageType.INTEL, "id-1", timedelta(days=1))
        for suffix, message in (
            (b"intel", INTEL),
            (b"sighting", SIGHTING),
            (b"snapshotrequest", request),
        ):
            receive(P2P.encode() + suffix + b" " + codec.encode(message))
        self.assertEqual(self.received, [INTEL, SIGHTING, request])

    def test_bad_frames_ignored(self):
        """Malformed frames, unknown types and other topics are ignored and the next message arrives."""
        self.subscribe()
        receive = self.transport.subscribers[0].receive
        for frame in (
            P2P.encode() + b"intel {not json",
            P2P.encode() + b"intel",
            P2P.encode() + b"snapshotenvelope {}",
            P2P_2.encode() + b"intel " + codec.encode(INTEL),
        ):
            receive(frame)
        receive(P2P.encode() + b"intel " + codec.encode(INTEL))
        self.assertEqual(self.received, [INTEL])

    def test_failing_callback_logged(self):
        """A callback that raises is logged, and the next message still arrives."""
        calls = []

        def callback(message):
            calls.append(message)
            raise RuntimeError("boom")

        d = self.client.subscribe("threatbus/intel", 0, callback)
        self.transport.manage_socket.answer(reply_for())
        self.successResultOf(d)
        receive = self.transport.subscribers[0].receive
        receive(P2P.encode() + b"intel " + codec.encode(INTEL))
        receive(P2P.encode() + b"intel " + codec.encode(INTEL))
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_publish_waits_for_the_bus(self):
        """Published messages wait until the bus's SUB socket subscribed, then go out in order."""
        sub = self.subscribe()
        publisher = self.transport.publishers[0]
        connected, sent = sub.connected("threatbus/intel"), sub.sent()
        sub.publish_intel(INTEL)
        sub.publish_sighting(SIGHTING)
        self.assertEqual((publisher.sent, sub.pending), ([], 2))
        self.assertNoResult(connected)
        publisher.notify(True, b"threatbus/")
        self.successResultOf(connected)
        self.successResultOf(sent)
        self.assertEqual(
            publisher.sent,
            [
                b"threatbus/intel " + codec.encode(INTEL),
                b"threatbus/sighting " + codec.encode(SIGHTING),
            ],
        )

    def test_publish_per_topic(self):
        """A message waits until the bus subscribed to its topic, and later ones wait behind it."""
        sub = self.subscribe()
        publisher = self.transport.publishers[0]
        publisher.notify(True, b"threatbus/intel")
        sub.publish_sighting(SIGHTING)
        sub.publish_intel(INTEL)
        self.assertEqual(publisher.sent, [])
        publisher.notify(True, b"threatbus/sighting")
        self.assertEqual(len(publisher.sent), 2)
        publisher.notify(False, b"threatbus/intel")
        sub.publish_intel(INTEL)
        self.assertEqual((len(publisher.sent), sub.pending), (2, 1))

    def test_publish_full_queue_retried(self):
        """When ZeroMQ's queue is full, the outbox tries again shortly, in order."""
        sub = self.subscribe()
        publisher = self.transport.publishers[0]
        publisher.notify(True, b"threatbus/")
        publisher.full = True
        sub.publish_intel(INTEL)
        sub.publish_sighting(SIGHTING)
        sent = sub.sent()
        self.assertNoResult(sent)
        publisher.full = False
        self.clock.advance(RETRY_INTERVAL)
        self.successResultOf(sent)
        self.assertEqual(
            [f.split(b" ")[0] for f in publisher.sent], [b"threatbus/intel", b"threatbus/sighting"]
        )

    def test_publish_type_checked(self):
        """publish_intel and publish_sighting refuse other types; publish refuses requests."""
        sub = self.subscribe()
        self.assertRaises(TypeError, sub.publish_intel, SIGHTING)
        self.assertRaises(TypeError, sub.publish_sighting, INTEL)
        self.assertRaises(
            TypeError, sub.publish, SnapshotRequest(MessageType.INTEL, "x", timedelta(1))
        )

    def test_answer_snapshot(self):
        """answer_snapshot wraps each item in a SnapshotEnvelope on threatbus/snapshotenvelope."""
        sub = self.subscribe()
        publisher = self.transport.publishers[0]
        publisher.notify(True, b"threatbus/")
        request = SnapshotRequest(MessageType.INTEL, "snap-1", timedelta(days=1))
        self.assertEqual(sub.answer_snapshot(request, [INTEL, INTEL]), 2)
        envelope = SnapshotEnvelope(MessageType.INTEL, "snap-1", INTEL)
        self.assertEqual(
            publisher.sent, [b"threatbus/snapshotenvelope " + codec.encode(envelope)] * 2
        )

    def test_answer_snapshot_wrong_type(self):
        """answer_snapshot with an item of the wrong type raises and sends nothing."""
        sub = self.subscribe()
        publisher = self.transport.publishers[0]
        publisher.notify(True, b"threatbus/")
        request = SnapshotRequest(MessageType.INTEL, "snap-1", timedelta(days=1))
        self.assertRaises(ValueError, sub.answer_snapshot, request, [INTEL, SIGHTING])
        self.assertEqual(publisher.sent, [])

    def test_stop_waits_for_outbox(self):
        """Stopping waits up to the linger time for queued messages before unsubscribing."""
        sub = self.subscribe()
        publisher = self.transport.publishers[0]
        sub.publish_intel(INTEL)
        d = self.client.stopService()
        self.assertEqual(self.transport.manage_socket.open(), [])
        publisher.notify(True, b"threatbus/")
        self.assertEqual(len(publisher.sent), 1)
        self.transport.manage_socket.answer({"status": "success"})
        self.successResultOf(d)

    def test_stop_gives_up_on_outbox(self):
        """Messages the bus never takes are given up after the linger time."""
        sub = self.subscribe()
        sub.publish_intel(INTEL)
        d = self.client.stopService()
        self.clock.advance(self.transport.linger)
        self.transport.manage_socket.answer({"status": "success"})
        self.successResultOf(d)


class ParseTests(SynchronousTestCase):
    """Endpoints and subscribe replies of both server generations."""

    def test_endpoint(self):
        """Endpoints are host:port, optionally with tcp:// or a bracketed IPv6 address."""
        self.assertEqual(parse_endpoint("localhost:13370"), "localhost:13370")
        self.assertEqual(parse_endpoint("tcp://10.0.0.1:1"), "10.0.0.1:1")
        self.assertEqual(parse_endpoint("[::1]:13370"), "[::1]:13370")
        for bad in ("localhost", ":1", "host:0", "host:65536", "host:x", "::1:13370"):
            self.assertRaises(ValueError, parse_endpoint, bad)

    def test_reply_endpoints(self):
        """A reply's pub_endpoint and sub_endpoint are used as given."""
        reply = {
            "topic": P2P,
            "pub_endpoint": "bus:1",
            "sub_endpoint": "bus:2",
            "pub_port": 7,
            "sub_port": 8,
            "status": "success",
        }
        self.assertEqual(
            parse_subscribe_reply(reply, "other:13370"), Endpoints(P2P, "bus:1", "bus:2")
        )

    def test_reply_ports(self):
        """Without endpoints, pub_port and sub_port are used on the management host."""
        reply = {"topic": P2P, "pub_port": 7, "sub_port": 8, "status": "success"}
        self.assertEqual(
            parse_subscribe_reply(reply, "bus:13370"), Endpoints(P2P, "bus:7", "bus:8")
        )

    def test_reply_wildcard(self):
        """An advertised wildcard host is replaced by the management host."""
        reply = {
            "topic": P2P,
            "pub_endpoint": "0.0.0.0:7",
            "sub_endpoint": "*:8",
            "status": "success",
        }
        self.assertEqual(
            parse_subscribe_reply(reply, "bus:13370"), Endpoints(P2P, "bus:7", "bus:8")
        )

    def test_reply_without_status(self):
        """The oldest servers' subscribe reply, without status, is a success."""
        reply = {"topic": P2P, "pub_endpoint": "bus:1", "sub_endpoint": "bus:2"}
        self.assertEqual(parse_subscribe_reply(reply, "bus:13370").p2p, P2P)

    def test_reply_errors(self):
        """Unsuccessful or incomplete replies raise ClientError subclasses."""
        self.assertRaises(RequestFailed, parse_subscribe_reply, {"status": "error"}, "bus:1")
        self.assertRaises(RequestFailed, parse_subscribe_reply, {}, "bus:1")
        self.assertRaises(ProtocolError, parse_subscribe_reply, {"status": "success"}, "bus:1")
        self.assertRaises(
            ProtocolError, parse_subscribe_reply, {"topic": P2P, "pub_port": 1}, "bus:1"
        )


# --- against a running bus


class LiveClientTests(TestCase):
    """The client with real ZeroMQ sockets against a running bus."""

    def make_client(self, port: int, **options) -> Client:
        settings = dict(
            heartbeat_interval=0.1,
            request_timeout=0.5,
            backoff_initial=0.05,
            backoff_max=0.2,
            linger=0.5,
        )
        settings.update(options)
        client = Client(f"127.0.0.1:{port}", **settings)
        client.startService()
        self.addCleanup(client.stopService)
        return client

    async def app(self, top, topic="threatbus/intel", snapshot=0):
        """A plain pyzmq app on the bus, subscribed and connected."""
        ctx = Context(self)
        app = App.on(ctx, top)
        await app.subscribe(ctx, topic, snapshot)
        await app.wait_connected(top)
        return app

    async def client_subscription(self, top, consumer):
        """A client's subscription to threatbus/intel, once the bus sees its SUB socket."""
        client = self.make_client(zmq_app_of(top).ports["manage"])
        sub = await client.subscribe("threatbus/intel", 0, consumer)
        subscriptions = zmq_app_of(top).subscriptions
        await wait_for(lambda: subscriptions.get(sub.p2p).ready, what="the client's SUB socket")
        return sub

    async def test_transport_provides_interfaces(self):
        """ZmqTransport and its sockets provide the client's interfaces."""
        transport = ZmqTransport(linger=0)
        self.addCleanup(transport.close)
        verifyObject(ITransport, transport)
        verifyObject(IManageSocket, transport.manage("127.0.0.1:1"))
        verifyObject(ISubscriberSocket, transport.subscriber("127.0.0.1:1", lambda f: None))
        verifyObject(IPublisherSocket, transport.publisher("127.0.0.1:1", lambda s, p: None))

    async def test_subscribe_and_receive(self):
        """A subscription receives what another app publishes, as model objects."""
        top = start_bus(self)
        received = []
        await self.client_subscription(top, received.append)
        app = await self.app(top)
        await publish_until_seen(app, "threatbus/intel", codec.encode(INTEL), [app])
        await wait_for(lambda: received, what="the client to receive")
        self.assertEqual(received[0], INTEL)

    async def test_flood_read_in_batches(self):
        """A flood on the SUB socket is read a batch per reactor turn, and all of it arrives in order."""
        self.patch(SubscriberConnection, "batch", 10)
        top = start_bus(self)
        received = []
        await self.client_subscription(top, received.append)
        app = await self.app(top)
        await publish_until_seen(app, "threatbus/intel", codec.encode(INTEL), [app])
        ids = [f"flood-{i}" for i in range(500)]
        for i in ids:
            app.publish("threatbus/intel", codec.encode(attrs.evolve(INTEL, id=i)))
        await wait_for(lambda: received and received[-1].id == ids[-1], what="the flood")
        self.assertEqual([m.id for m in received if m.id.startswith("flood-")], ids)

    async def test_publish(self):
        """What the client publishes reaches other apps, without probes (it waits for the bus)."""
        top = start_bus(self)
        app = await self.app(top)
        client = self.make_client(zmq_app_of(top).ports["manage"])
        sub = await client.subscribe("threatbus/sighting")
        await sub.connected("threatbus/intel")
        sub.publish_intel(INTEL)
        ((suffix, body),) = await app.receive(1)
        self.assertEqual((suffix, codec.structure(Intel, body)), ("intel", INTEL))
        metrics = top.getServiceNamed("bus").metrics
        self.assertEqual(
            metrics.registry.get_sample_value(
                "txthreatbus_messages_received_total", {"type": "intel"}
            ),
            1,
        )

    async def test_answer_snapshot(self):
        """A client answers another app's snapshot request; only that app gets the items."""
        top = start_bus(self)
        subs = []

        def serve(message):
            if isinstance(message, SnapshotRequest) and message.snapshot_type is MessageType.INTEL:
                subs[0].answer_snapshot(message, [INTEL])

        subs.append(await self.client_subscription(top, serve))
        requester = await self.app(top, "threatbus/intel", snapshot=1)
        ((suffix, body),) = await requester.receive(1)
        self.assertEqual((suffix, codec.structure(Intel, body)), ("intel", INTEL))

    async def test_stix_generation(self):
        """A client subscribed to stix2 gets STIX objects (Intel translated), publishes them, and answers snapshots with them."""
        top = start_bus(self)
        received, subs = [], []

        def consume(message):
            received.append(message)
            if isinstance(message, SnapshotRequest) and message.snapshot_type is MessageType.INTEL:
                subs[0].answer_snapshot(message, [INDICATOR])

        client = self.make_client(zmq_app_of(top).ports["manage"])
        subs.append(await client.subscribe(["stix2/indicator", "stix2/sighting"], 0, consume))
        await wait_for(lambda: zmq_app_of(top).subscriptions.get(subs[0].p2p).ready, what="the client's SUB socket")
        old = await self.app(top, "threatbus/intel")
        await publish_until_seen(old, "threatbus/intel", codec.encode(INTEL), [old])
        await wait_for(lambda: received, what="the translated Intel")
        self.assertIsInstance(received[0], stix.Indicator)
        self.assertEqual(received[0].properties["x_threatbus_intel_id"], INTEL.id)
        await subs[0].connected("stix2/indicator")
        subs[0].publish(INDICATOR)
        ((suffix, body),) = await old.receive(1)
        self.assertEqual((suffix, body["id"]), ("intel", INDICATOR.id))
        requester = await self.app(top, "threatbus/intel", snapshot=1)
        ((suffix, body),) = await requester.receive(1)
        self.assertEqual((suffix, body["data"]["indicator"]), ("intel", ["203.0.113.1"]))

    async def test_unsubscribe_on_stop(self):
        """Stopping the client unsubscribes at the bus."""
        top = start_bus(self)
        client = self.make_client(zmq_app_of(top).ports["manage"])
        await client.subscribe("threatbus/intel")
        await client.subscribe("threatbus")
        self.assertEqual(len(zmq_app_of(top).subscriptions), 2)
        await client.stopService()
        self.assertEqual(len(zmq_app_of(top).subscriptions), 0)

    async def resubscribed_receives(self, top, sub, received):
        await wait_for(lambda: sub.resubscriptions >= 1, what="the client to subscribe again")
        subscriptions = zmq_app_of(top).subscriptions
        await wait_for(
            lambda: subscriptions.get(sub.p2p) is not None and subscriptions.get(sub.p2p).ready,
            what="the new SUB subscription",
        )
        ctx = Context(self)
        app = App.on(ctx, top)
        await app.subscribe(ctx, "threatbus/intel")
        await publish_until_seen(app, "threatbus/intel", codec.encode(INTEL), [app])
        await wait_for(lambda: received, what="a message after the restart")
        await sub.connected("threatbus/intel")
        sub.publish_intel(INTEL)
        ((suffix, body),) = await app.receive(1)
        self.assertEqual((suffix, codec.structure(Intel, body)), ("intel", INTEL))

    async def test_resubscribe_after_restart(self):
        """After the bus service is stopped and started again, the client subscribes again and receives."""
        manage, pub, sub_port = free_ports(3)
        top = start_bus(self, manage=manage, pub=pub, sub=sub_port)
        received = []
        client = self.make_client(manage)
        sub = await client.subscribe("threatbus/intel", 0, received.append)
        old = sub.p2p
        await top.stopService()
        top.startService()
        await self.resubscribed_receives(top, sub, received)
        self.assertNotEqual(sub.p2p, old)
        self.assertEqual(received[0], INTEL)
        await client.stopService()
        self.assertIsNone(zmq_app_of(top).subscriptions.get(sub.p2p))

    async def test_resubscribe_after_outage(self):
        """While the bus is down the client keeps trying (logged); a new bus on the same ports gets it back."""
        events = []
        logs.publisher.addObserver(events.append)
        self.addCleanup(logs.publisher.removeObserver, events.append)
        manage, pub, sub_port = free_ports(3)
        top = start_bus(self, manage=manage, pub=pub, sub=sub_port)
        received = []
        client = self.make_client(manage)
        sub = await client.subscribe("threatbus/intel", 0, received.append)
        await top.stopService()

        def failures():
            return [e for e in events if e.get("log_format", "").startswith("Could not subscribe")]

        await wait_for(lambda: len(failures()) >= 2, what="failed tries to subscribe again")
        self.assertIn("no answer", failures()[0]["error"])
        top = start_bus(self, manage=manage, pub=pub, sub=sub_port)
        await self.resubscribed_receives(top, sub, received)
        self.assertEqual(received[0], INTEL)
        await client.stopService()
        self.assertIsNone(zmq_app_of(top).subscriptions.get(sub.p2p))


class OldServerTests(TestCase):
    """The client against a Threat Bus 2020.11.26-style server: a plain REP socket."""

    async def test_rep_server(self):
        """A REP server's reply (no status, wildcard host) gives a subscription on the reached host."""
        ctx = Context(self)
        rep = ctx.socket(zmq.REP)
        rep.bind("tcp://127.0.0.1:*")
        port = int(rep.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        client = Client(f"127.0.0.1:{port}", request_timeout=5, linger=0)
        client.startService()
        self.addCleanup(client.stopService)
        d = client.subscribe("threatbus/intel", 2)

        def request():
            try:
                return json.loads(rep.recv(zmq.NOBLOCK))
            except zmq.Again:
                return None

        self.assertEqual(
            await wait_for(request, what="the subscribe request"),
            {"action": "subscribe", "topic": "threatbus/intel", "snapshot": 2},
        )
        pub, sub_port = free_ports(2)
        rep.send_json(
            {
                "topic": "threatbus/intelabcdefghij",
                "pub_endpoint": f"0.0.0.0:{pub}",
                "sub_endpoint": f"0.0.0.0:{sub_port}",
            }
        )
        sub = await d
        self.assertEqual(
            sub.endpoints,
            Endpoints("threatbus/intelabcdefghij", f"127.0.0.1:{pub}", f"127.0.0.1:{sub_port}"),
        )
        stopped = client.stopService()
        self.assertEqual(
            await wait_for(request, what="the unsubscribe request"),
            {"action": "unsubscribe", "topic": "threatbus/intelabcdefghij"},
        )
        rep.send_json({"status": "success"})
        await stopped
