"""
The zmq-app plugin over real sockets: pyzmq clients act as Threat Bus apps
against a whole bus on ephemeral ports.
"""

from __future__ import annotations

import json

import zmq
from twisted.trial.unittest import TestCase
from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory, ZmqREQConnection

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
from txthreatbus.apps.zmq_app.sockets import BindError
from txthreatbus.config import Config, ZmqAppConfig
from txthreatbus.tap import bus_service

INTEL = {
    "ts": "2020-11-26 14:46:52.123456",
    "id": "intel-1",
    "data": {"indicator": ["evil.example.com"], "intel_type": 11, "source": "MISP"},
    "operation": "ADD",
}
SIGHTING = {
    "ts": "2020-11-26 14:46:53",
    "intel": "intel-1",
    "context": {"source": "VAST"},
    "ioc": ["evil.example.com"],
}


def intel(i) -> dict:
    return {**INTEL, "id": f"intel-{i}"}


class ManagementTests(TestCase):
    """Every row of docs/protocol.md's management table."""

    def setUp(self):
        self.top = start_bus(self)
        self.ctx = Context(self)
        port = zmq_app_of(self.top).ports["manage"]
        self.req = lambda: self.ctx.socket(zmq.REQ, f"tcp://127.0.0.1:{port}")

    async def ask(self, payload):
        return await request(self.req(), payload)

    async def test_subscribe_reply(self):
        """A subscribe gets a 32-letter P2P topic and both generations' endpoint fields."""
        ports = zmq_app_of(self.top).ports
        reply = await self.ask({"action": "subscribe", "topic": "threatbus/intel", "snapshot": 0})
        self.assertEqual(reply["status"], "success")
        self.assertRegex(reply["topic"], r"^[a-z]{32}$")
        self.assertEqual(reply["pub_endpoint"], f"127.0.0.1:{ports['pub']}")
        self.assertEqual(reply["sub_endpoint"], f"127.0.0.1:{ports['sub']}")
        self.assertEqual((reply["pub_port"], reply["sub_port"]), (ports["pub"], ports["sub"]))

    async def test_topics_differ(self):
        """Every subscription gets its own P2P topic."""
        replies = [await self.ask({"action": "subscribe", "topic": "threatbus"}) for _ in range(20)]
        self.assertEqual(len({r["topic"] for r in replies}), 20)

    async def test_snapshot_forms(self):
        """snapshot may be missing, an integer, or an integer string."""
        for snapshot in (None, 0, 3, "30"):
            payload = {"action": "subscribe", "topic": "threatbus/sighting"}
            if snapshot is not None:
                payload["snapshot"] = snapshot
            reply = await self.ask(payload)
            self.assertEqual(reply["status"], "success", snapshot)

    async def test_bad_snapshot(self):
        """A snapshot that is not a whole number of days >= 0 is an error."""
        for snapshot in ("FOO", -1, "-1", 1.5, True, [], {}):
            reply = await self.ask({"action": "subscribe", "topic": "threatbus", "snapshot": snapshot})
            self.assertEqual(reply, {"status": "error"}, snapshot)

    async def test_unknown_topic(self):
        """A subscription to a topic that carries nothing is an error."""
        for topic in ("threatbus/intelX", "foo", 42, "/", ["threatbus/intel"], ["stix2", 5]):
            reply = await self.ask({"action": "subscribe", "topic": topic})
            self.assertEqual(reply, {"status": "error"}, topic)

    async def test_unknown_requests(self):
        """An unknown action, or a known one without topic or with an empty one, is an unknown request."""
        for payload in (
            {"action": "dance", "topic": "threatbus"},
            {"topic": "threatbus"},
            {"action": "subscribe"},
            {"action": "subscribe", "topic": ""},
            {"action": "subscribe", "topic": []},
            {"action": "heartbeat", "topic": ""},
            {"action": "heartbeat"},
            {"action": "unsubscribe"},
            {},
        ):
            self.assertEqual(await self.ask(payload), {"status": "unknown request"}, payload)

    async def test_not_json(self):
        """Not JSON, or JSON that is not an object, is an error, and the socket goes on."""
        sock = self.req()
        for payload in (b"garbage", b"", b"[1, 2]", b'"subscribe"', b"\xff\xfe{", b"null"):
            self.assertEqual(await request(sock, payload), {"status": "error"}, payload)
        reply = await request(sock, {"action": "subscribe", "topic": "threatbus"})
        self.assertEqual(reply["status"], "success")

    async def test_lifecycle(self):
        """subscribe, heartbeat, unsubscribe; then heartbeat and unsubscribe are errors."""
        reply = await self.ask({"action": "subscribe", "topic": "threatbus"})
        p2p = reply["topic"]
        self.assertEqual(await self.ask({"action": "heartbeat", "topic": p2p}), {"status": "success"})
        self.assertEqual(await self.ask({"action": "unsubscribe", "topic": p2p}), {"status": "success"})
        self.assertEqual(await self.ask({"action": "heartbeat", "topic": p2p}), {"status": "error"})
        self.assertEqual(await self.ask({"action": "unsubscribe", "topic": p2p}), {"status": "error"})

    async def test_txzmq_client(self):
        """A txZMQ REQ client (a DEALER with its own ids) works against manage too."""
        factory = ZmqFactory()
        self.addCleanup(factory.shutdown)
        port = zmq_app_of(self.top).ports["manage"]
        client = ZmqREQConnection(factory, ZmqEndpoint(ZmqEndpointType.connect, f"tcp://127.0.0.1:{port}"))
        reply = await client.sendMsg(json.dumps({"action": "subscribe", "topic": "threatbus"}).encode(), timeout=10)
        reply = json.loads(reply[0])
        self.assertEqual(reply["status"], "success")
        beat = await client.sendMsg(json.dumps({"action": "heartbeat", "topic": reply["topic"]}).encode(), timeout=10)
        self.assertEqual(json.loads(beat[0]), {"status": "success"})


class AdvertiseTests(TestCase):
    """Subscribe replies never advertise a wildcard host."""

    async def advertised(self, **config):
        top = start_bus(self, **config)
        ctx = Context(self)
        reply = await request(
            ctx.socket(zmq.REQ, f"tcp://127.0.0.1:{zmq_app_of(top).ports['manage']}"),
            {"action": "subscribe", "topic": "threatbus"},
        )
        return reply["pub_endpoint"].rsplit(":", 1)[0], reply["sub_endpoint"].rsplit(":", 1)[0]

    async def test_advertise_host(self):
        """With a wildcard host, the configured advertise_host is named."""
        hosts = await self.advertised(host="0.0.0.0", advertise_host="bus.example.org")
        self.assertEqual(hosts, ("bus.example.org", "bus.example.org"))

    async def test_no_wildcard(self):
        """With a wildcard host and no advertise_host, the machine's name is named."""
        hosts = await self.advertised(host="0.0.0.0")
        self.assertNotIn(hosts[0], ("0.0.0.0", "*", ""))
        self.assertEqual(hosts[0], hosts[1])


class RoutingTests(TestCase):
    """Intel and Sightings go to every subscriber of a matching topic."""

    async def setUp(self):
        self.top = start_bus(self)
        self.ctx = Context(self)
        self.apps = {}
        for name, topic in (("intel", "threatbus/intel"), ("sighting", "threatbus/sighting"), ("all", "threatbus")):
            app = self.apps[name] = App.on(self.ctx, self.top)
            await app.subscribe(self.ctx, topic)
            await app.wait_connected(self.top)
        self.publisher = App.on(self.ctx, self.top)
        await self.publisher.subscribe(self.ctx, "threatbus/sighting")
        await publish_until_seen(self.publisher, "threatbus/intel", INTEL, [self.apps["intel"], self.apps["all"]])
        await settle(0.05)
        for app in self.apps.values():
            drain(app.sub)

    def published(self, kind):
        return self.top.getServiceNamed("bus").metrics.published[kind].value

    async def test_intel(self):
        """Intel reaches threatbus/intel and threatbus subscribers, on their P2P topics."""
        before = self.published("intel")
        self.publisher.publish("threatbus/intel", INTEL)
        self.assertEqual(await self.apps["intel"].receive(1), [("intel", INTEL)])
        self.assertEqual(await self.apps["all"].receive(1), [("intel", INTEL)])
        self.assertEqual(self.published("intel") - before, 2)  # none for the sighting app

    async def test_sighting(self):
        """A Sighting reaches threatbus/sighting and threatbus subscribers, not intel ones."""
        before = self.published("sighting")
        self.publisher.publish("threatbus/sighting", SIGHTING)
        self.assertEqual(await self.apps["sighting"].receive(1), [("sighting", SIGHTING)])
        self.assertEqual(await self.apps["all"].receive(1), [("sighting", SIGHTING)])
        self.assertEqual(await self.publisher.receive(1), [("sighting", SIGHTING)])
        self.assertEqual(self.published("sighting") - before, 3)  # none for the intel app

    async def test_publisher_receives_own(self):
        """An app subscribed to what it publishes receives it too, as in Threat Bus."""
        self.publisher.publish("threatbus/sighting", SIGHTING)
        self.assertEqual(await self.publisher.receive(1), [("sighting", SIGHTING)])

    async def test_unsubscribe(self):
        """Nothing arrives after unsubscribe."""
        app = self.apps["intel"]
        self.assertEqual(await app.unsubscribe(), {"status": "success"})
        before = self.published("intel")
        self.publisher.publish("threatbus/intel", INTEL)
        await self.apps["all"].receive(1)
        self.assertEqual(self.published("intel") - before, 1)  # none for the app that left

    async def test_burst(self):
        """A 1,000-item burst reaches a subscriber complete and in order."""
        for i in range(1000):
            self.publisher.publish("threatbus/intel", intel(i))
        got = await self.apps["intel"].receive(1000)
        self.assertEqual([body["id"] for _, body in got], [f"intel-{i}" for i in range(1000)])

    async def test_bad_frames(self):
        """Bad frames on the sub endpoint are dropped, counted, and do not stop later ones."""
        bad = [
            b"garbage",
            b"threatbus/intel",
            b"threatbus/intel {not json",
            b"threatbus/intel [1, 2]",
            b'threatbus/intel {"ts": "x"}',
            b"threatbus/intelX " + json.dumps(INTEL).encode(),
            b"threatbus/snapshotrequest " + json.dumps({"snapshot_type": 1, "snapshot_id": "x", "snapshot": 5}).encode(),
            b"threatbus/intel \xff\xfe",
        ]
        for frame in bad:
            self.publisher.pub.send(frame)
        self.publisher.pub.send_multipart([b"threatbus/intel", json.dumps(INTEL).encode()])
        self.publisher.publish("threatbus/intel", INTEL)
        self.assertEqual(await self.apps["intel"].receive(1), [("intel", INTEL)])
        metrics = self.top.getServiceNamed("bus").metrics
        counted = sum(metrics.dropped(reason) for reason in ("no_space", "unknown_topic", "malformed"))
        # "garbage" never reaches us (the SUB socket filters on threatbus/);
        # every other bad frame is counted, and each frame of the two-frame
        # message, read as a message of its own (no space; unknown topic)
        self.assertEqual(counted, len(bad) - 1 + 2)
        self.flushLoggedErrors()


class SnapshotTests(TestCase):
    """The snapshot flow, end to end, with a requester, a responder and a bystander."""

    async def test_snapshot(self):
        """Only the requester gets the data; it never sees its own request."""
        top = start_bus(self)
        ctx = Context(self)
        responder, bystander, requester = (App.on(ctx, top) for _ in range(3))
        await responder.subscribe(ctx, "threatbus/sighting")
        await bystander.subscribe(ctx, "threatbus")
        for app in (responder, bystander):
            await app.wait_connected(top)
        await requester.subscribe(ctx, "threatbus", snapshot=30)
        await requester.wait_connected(top)

        requests = [body for _, body in await responder.receive(2)]
        self.assertEqual({r["snapshot_type"] for r in requests}, {1, 2})
        self.assertEqual(len({r["snapshot_id"] for r in requests}), 1)
        self.assertEqual({r["snapshot"] for r in requests}, {30 * 86400})
        self.assertEqual([s for s, _ in await bystander.receive(2)], ["snapshotrequest"] * 2)

        snapshot_id = requests[0]["snapshot_id"]
        envelopes = [
            {"snapshot_type": 1, "snapshot_id": snapshot_id, "body": intel(7)},
            {"snapshot_type": 2, "snapshot_id": snapshot_id, "body": SIGHTING},
        ]

        def answer():
            for envelope in envelopes:
                responder.publish("threatbus/snapshotenvelope", envelope)
            return drain(requester.sub)

        # the responder's PUB may still be connecting: answer until heard
        first = await wait_for(answer, what="snapshot data at the requester")
        got = [requester.parse(f) for f in first]
        self.assertIn(("intel", intel(7)), got)
        metrics = top.getServiceNamed("bus").metrics
        # every envelope routed, and nothing else, reaches the requester
        routed = int(metrics.registry.get_sample_value("txthreatbus_snapshot_envelopes_routed_total"))
        got += [requester.parse(f) for f in await receive(requester.sub, routed - len(got))]
        self.assertEqual(metrics.published["intel"].value + metrics.published["sighting"].value, routed)
        self.assertEqual({s for s, _ in got}, {"intel", "sighting"})
        self.assertNotIn("snapshotrequest", {s for s, _ in got})
        self.assertEqual(drain(bystander.sub), [])
        self.assertEqual(drain(responder.sub), [])

    async def test_intel_topic_one_request(self):
        """A snapshot of threatbus/intel asks for intel only."""
        top = start_bus(self)
        ctx = Context(self)
        responder, requester = App.on(ctx, top), App.on(ctx, top)
        await responder.subscribe(ctx, "threatbus")
        await responder.wait_connected(top)
        await requester.subscribe(ctx, "threatbus/intel", snapshot="2")
        [(suffix, body)] = await responder.receive(1)
        self.assertEqual((suffix, body["snapshot_type"], body["snapshot"]), ("snapshotrequest", 1, 2 * 86400))
        self.assertEqual(top.getServiceNamed("bus").metrics.published["snapshotrequest"].value, 1)

    async def test_unsubscribe_frees_snapshot(self):
        """Unsubscribing the requester ends its snapshot and frees its state."""
        top = start_bus(self)
        ctx = Context(self)
        requester = App.on(ctx, top)
        await requester.subscribe(ctx, "threatbus", snapshot=1)
        bus = top.getServiceNamed("bus")
        self.assertEqual(bus.pending_snapshots(), 1)
        await requester.unsubscribe()
        self.assertEqual(bus.pending_snapshots(), 0)
        self.assertEqual(len(zmq_app_of(top).subscriptions), 0)


class StartupTests(TestCase):
    """Starting and stopping the plugin."""

    def test_port_taken(self):
        """Start-up fails with a message naming the endpoint when a port is taken."""
        ctx = zmq.Context()
        self.addCleanup(ctx.destroy, 0)
        squatter = ctx.socket(zmq.REP)
        port = squatter.bind_to_random_port("tcp://127.0.0.1")
        top = bus_service(Config(apps={"zmq-app": ZmqAppConfig(manage=port, pub=0, sub=0)}, store=None))
        error = self.assertRaises(BindError, top.privilegedStartService)
        self.assertIn(f"manage endpoint tcp://127.0.0.1:{port}", str(error))
        self.assertIn("in use", str(error))
        # nothing is left bound: the other ports can be had again
        self.assertIsNone(zmq_app_of(top).sockets._factory)
        self.assertFalse(zmq_app_of(top)._endpoints["pub"].connection)

    async def test_restart(self):
        """Stop then start in one process works: the ports are released and bound again."""
        top = start_bus(self)
        app = zmq_app_of(top)
        await top.stopService()
        await top.stopService()  # harmless twice
        self.assertFalse(app.running)
        top.startService()
        ctx = Context(self)
        client = App.on(ctx, top)
        reply = await client.subscribe(ctx, "threatbus")
        self.assertEqual(reply["status"], "success")
