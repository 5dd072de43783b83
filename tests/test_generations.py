"""
Both generations of Threat Bus apps on one bus, over real sockets: 2020
apps (``threatbus/...``) and STIX-2 apps (``stix2/...``, Threat Bus 2021 and
later), each served in its own protocol, and the bridge between them.
"""

from __future__ import annotations

import json
import uuid

import zmq
from twisted.trial.unittest import TestCase

from tests.support import (
    App,
    Context,
    connected_apps,
    drain,
    publish_until_seen,
    receive,
    request,
    settle,
    start_bus,
    wait_for,
    zmq_app_of,
)
from tests.test_zmq_app import INTEL
from txthreatbus import bridge
from txthreatbus.config import Config, ZmqAppConfig

INDICATOR = {
    "type": "indicator",
    "spec_version": "2.1",
    "id": "indicator--6911104f-c504-4086-a15b-05e28cf73435",
    "created": "2022-05-16T10:00:00.123Z",
    "modified": "2022-05-16T10:00:00.123Z",
    "pattern": "[ipv4-addr:value = '203.0.113.1']",
    "pattern_type": "stix",
    "pattern_version": "2.1",
    "valid_from": "2022-05-16T10:00:00Z",
}
SURICATA = {
    **INDICATOR,
    "id": "indicator--7a2e9c1d-0b3f-4e5a-9c8d-1f2e3d4c5b6a",
    "pattern": 'alert http any any -> any any (msg:"evil"; sid:1000001;)',
    "pattern_type": "suricata",
}
del SURICATA["pattern_version"]


def stix_sighting(of: str, **properties) -> dict:
    return {
        "type": "sighting",
        "spec_version": "2.1",
        "id": f"sighting--{uuid.uuid4()}",
        "created": "2022-05-16T10:05:00.000Z",
        "modified": "2022-05-16T10:05:00.000Z",
        "sighting_of_ref": of,
        "last_seen": "2022-05-16T10:04:59Z",
        **properties,
    }


def dumps(value) -> bytes:
    return json.dumps(value).encode()


def untranslatable(top, direction: str, reason: str) -> float:
    metrics = top.getServiceNamed("bus").metrics
    value = metrics.registry.get_sample_value(
        "txthreatbus_untranslatable_total", {"direction": direction, "reason": reason}
    )
    return value or 0


class ManagementTests(TestCase):
    """What a STIX-2 app sees of the management endpoint."""

    def setUp(self):
        self.top = start_bus(self)
        self.ctx = Context(self)
        port = zmq_app_of(self.top).ports["manage"]
        self.ask = lambda payload: request(self.ctx.socket(zmq.REQ, f"tcp://127.0.0.1:{port}"), payload)

    async def test_reply_has_ports(self):
        """A 2022 subscribe reply has the ports 2022 apps read, and the 2020 endpoints too."""
        reply = await self.ask({"action": "subscribe", "topic": "stix2/indicator", "snapshot": 0})
        ports = zmq_app_of(self.top).ports
        self.assertEqual(list(reply), ["topic", "pub_endpoint", "sub_endpoint", "pub_port", "sub_port", "status"])
        self.assertEqual((reply["pub_port"], reply["sub_port"]), (ports["pub"], ports["sub"]))
        self.assertEqual(reply["status"], "success")
        self.assertRegex(reply["topic"], "^[a-z]{32}$")

    async def test_topics(self):
        """stix2, stix2/, stix2/indicator, stix2/sighting and lists of them subscribe."""
        for topic in ("stix2", "stix2/", "stix2/indicator", "stix2/sighting", ["stix2/indicator", "stix2/sighting"]):
            reply = await self.ask({"action": "subscribe", "topic": topic, "snapshot": "2"})
            self.assertEqual(reply["status"], "success", topic)

    async def test_failed_subscribe_leaves_nothing(self):
        """A list with a bad element is an error and leaves no subscription (unlike Threat Bus 2022)."""
        subscriptions = zmq_app_of(self.top).subscriptions
        for topic in (["stix2/indicator", 5], ["stix2/indicator", "threatbus/intel"], ["stix2/indicatorX"], ["x"] * 17):
            self.assertEqual(await self.ask({"action": "subscribe", "topic": topic}), {"status": "error"}, topic)
        self.assertEqual(len(subscriptions), 0)

    async def test_heartbeat_and_unsubscribe(self):
        """Heartbeats and unsubscribes of a 2022 subscription, and of a list topic (an error)."""
        reply = await self.ask({"action": "subscribe", "topic": ["stix2/indicator"]})
        p2p = reply["topic"]
        self.assertEqual(await self.ask({"action": "heartbeat", "topic": p2p}), {"status": "success"})
        self.assertEqual(await self.ask({"action": "heartbeat", "topic": [p2p]}), {"status": "error"})
        self.assertEqual(await self.ask({"action": "unsubscribe", "topic": p2p}), {"status": "success"})
        self.assertEqual(await self.ask({"action": "heartbeat", "topic": p2p}), {"status": "error"})


class SameGenerationTests(TestCase):
    """STIX-2 apps among themselves, as Threat Bus 2022 serves them, but byte-faithful."""

    async def test_indicator_forwarded_as_sent(self):
        """An Indicator reaches subscribers of stix2, stix2/indicator and both, once each, as its bytes."""
        top = start_bus(self)
        ctx = Context(self)
        publisher, one, root, both = await connected_apps(
            ctx, top, "stix2/sighting", "stix2/indicator", "stix2", ["stix2", "stix2/indicator"]
        )
        await publish_until_seen(publisher, "stix2/indicator", INDICATOR, [one, root, both])
        body = b'{"spec_version":"2.1",  "type":"indicator",' + dumps(INDICATOR)[1:].replace(b'"type": "indicator", "spec_version": "2.1", ', b"")
        publisher.pub.send(b"stix2/indicator " + body)
        for app in (one, root, both):
            (frame,) = await receive(app.sub, 1)
            self.assertEqual(frame, app.p2p.encode() + b"indicator " + body)
        await settle(0.1)
        self.assertEqual(drain(both.sub), [])
        self.assertEqual(drain(publisher.sub), [])

    async def test_routed_by_type(self):
        """A Sighting reaches stix2/sighting subscribers whatever stix2/ topic it came on."""
        top = start_bus(self)
        ctx = Context(self)
        publisher, sightings = await connected_apps(ctx, top, "stix2/indicator", "stix2/sighting")
        probe = stix_sighting(INDICATOR["id"])
        await publish_until_seen(publisher, "stix2/anything", probe, [sightings])
        publisher.publish("stix2/indicator", probe)
        self.assertEqual(await sightings.receive(1), [("sighting", probe)])

    async def test_bad_stix_dropped_and_counted(self):
        """Bundles, wrong spec_version, other types, bad patterns and fake envelopes are dropped, counted; the bus serves on."""
        top = start_bus(self)
        ctx = Context(self)
        publisher, receiver = await connected_apps(ctx, top, "stix2/sighting", "stix2/indicator")
        await publish_until_seen(publisher, "stix2/indicator", INDICATOR, [receiver])
        bad = {
            "stix_bundle": {"type": "bundle", "id": f"bundle--{uuid.uuid4()}", "objects": [INDICATOR]},
            "stix_spec_version": {**INDICATOR, "spec_version": "2.0"},
            "stix_unknown_type": {**INDICATOR, "type": "malware"},
            "stix_invalid_pattern": {**INDICATOR, "pattern": "[ipv4-addr:value = ]"},
            "stix_malformed": {**INDICATOR, "id": "indicator--00000000-0000-0000-0000-000000000000"},
        }
        for value in bad.values():
            publisher.publish("stix2/indicator", value)
        publisher.publish("threatbus/snapshotenvelopeX", {"type": "snapshotenvelope"})
        publisher.publish("stix2/indicator", INDICATOR)
        self.assertEqual(await receiver.receive(1), [("indicator", INDICATOR)])
        metrics = top.getServiceNamed("bus").metrics
        for reason in bad:
            self.assertEqual(metrics.dropped(reason), 1, reason)
        self.assertEqual(metrics.dropped("unknown_topic"), 1)


class BridgeTests(TestCase):
    """A 2020 app and a 2022 app exchange intel and sightings through the bridge."""

    async def test_intel_to_indicator(self):
        """A 2020 Intel reaches 2022 apps as an Indicator, and 2020 apps as it was sent."""
        top = start_bus(self)
        ctx = Context(self)
        old, new, publisher = await connected_apps(ctx, top, "threatbus/intel", "stix2/indicator", "threatbus/sighting")
        await publish_until_seen(publisher, "threatbus/intel", INTEL, [old, new])
        sent = dumps({**INTEL, "id": "intel-7", "operation": "REMOVE"})
        publisher.pub.send(b"threatbus/intel " + sent)
        (frame,) = await receive(old.sub, 1)
        self.assertEqual(frame, old.p2p.encode() + b"intel " + sent)
        ((suffix, indicator),) = await new.receive(1)
        self.assertEqual(suffix, "indicator")
        self.assertEqual(indicator["id"], bridge.indicator_id("intel-7"))
        self.assertEqual(indicator["pattern"], "[domain-name:value = 'evil.example.com']")
        self.assertEqual(indicator["created"], "2020-11-26T14:46:52.123Z")
        self.assertEqual(
            (indicator["x_threatbus_update"], indicator["x_threatbus_intel_id"], indicator["x_threatbus_intel_data"]),
            ("REMOVE", "intel-7", {"source": "MISP"}),
        )

    async def test_indicator_to_intel(self):
        """A point-equality Indicator reaches 2020 apps as Intel; a Suricata rule is counted, not sent."""
        top = start_bus(self)
        ctx = Context(self)
        old, new, publisher = await connected_apps(ctx, top, "threatbus", "stix2/indicator", "stix2/sighting")
        await publish_until_seen(publisher, "stix2/indicator", INDICATOR, [old, new])
        publisher.publish("stix2/indicator", SURICATA)
        publisher.publish("stix2/indicator", {**INDICATOR, "x_threatbus_update": "REMOVE"})
        self.assertEqual([s for s, _ in await new.receive(2)], ["indicator", "indicator"])
        ((suffix, intel),) = await old.receive(1)
        self.assertEqual(suffix, "intel")
        self.assertEqual(
            intel,
            {
                "ts": "2022-05-16 10:00:00.123000+00:00",
                "id": INDICATOR["id"],
                "data": {"indicator": ["203.0.113.1"], "intel_type": 1},
                "operation": "REMOVE",
            },
        )
        self.assertEqual(untranslatable(top, "2022_to_2020", "pattern_type"), 1)
        self.assertEqual(drain(old.sub), [])

    async def test_sighting_keeps_intel_id(self):
        """A 2022 Sighting of an Indicator derived from Intel reaches 2020 apps with the Intel's id."""
        top = start_bus(self)
        ctx = Context(self)
        old_publisher, old, new = await connected_apps(ctx, top, "threatbus/intel", "threatbus/sighting", "stix2")
        await publish_until_seen(old_publisher, "threatbus/intel", INTEL, [new])
        derived = bridge.indicator_id(INTEL["id"])
        sighting = stix_sighting(
            derived,
            x_threatbus_sighting_context={"event": 1},
            x_threatbus_source="VAST",
            x_threatbus_indicator_value="evil.example.com",
        )
        await publish_until_seen(new, "stix2/sighting", sighting, [old])
        new.publish("stix2/sighting", sighting)
        ((suffix, got),) = await old.receive(1)
        self.assertEqual(
            (suffix, got),
            (
                "sighting",
                {
                    "ts": "2022-05-16 10:04:59+00:00",
                    "intel": "intel-1",
                    "context": {"event": 1, "source": "VAST"},
                    "ioc": ["evil.example.com"],
                },
            ),
        )

    async def test_2020_sighting_to_stix(self):
        """A 2020 Sighting reaches 2022 apps as a STIX Sighting of the derived Indicator."""
        top = start_bus(self)
        ctx = Context(self)
        old, new = await connected_apps(ctx, top, "threatbus/intel", "stix2/sighting")
        sighting = {"ts": "2020-11-26 14:46:53", "intel": "intel-1", "context": {"source": "VAST"}, "ioc": ["x.org"]}
        await publish_until_seen(old, "threatbus/sighting", sighting, [new])
        old.publish("threatbus/sighting", sighting)
        ((suffix, got),) = await new.receive(1)
        self.assertEqual(suffix, "sighting")
        self.assertEqual(got["sighting_of_ref"], bridge.indicator_id("intel-1"))
        self.assertEqual(got["last_seen"], "2020-11-26T14:46:53.000Z")
        self.assertEqual(
            (got["x_threatbus_source"], got["x_threatbus_indicator_value"], got["x_threatbus_sighting_context"]),
            ("VAST", "x.org", {"source": "VAST"}),
        )


class SnapshotTests(TestCase):
    """Snapshot requests reach both generations in their own shapes; answers come back translated."""

    async def test_2022_requester(self):
        """A 2022 app's snapshot: 2020 apps answer in 2020 shape, the requester gets Indicators."""
        top = start_bus(self)
        ctx = Context(self)
        old, new_bystander = await connected_apps(ctx, top, "threatbus/intel", "stix2/sighting")
        requester = App.on(ctx, top)
        await requester.subscribe(ctx, ["stix2/indicator", "stix2/sighting"], snapshot=3)
        await requester.wait_connected(top)
        old_requests = [body for _, body in await old.receive(2)]
        new_requests = [body for _, body in await new_bystander.receive(2)]
        self.assertEqual({r["snapshot_type"] for r in old_requests}, {1, 2})
        self.assertNotIn("type", old_requests[0])
        self.assertEqual([r["type"] for r in new_requests], ["snapshotrequest"] * 2)
        self.assertEqual({r["snapshot"] for r in new_requests}, {3 * 86400})
        snapshot_id = old_requests[0]["snapshot_id"]
        envelope = {"snapshot_type": 1, "snapshot_id": snapshot_id, "body": INTEL}
        got = await wait_for(
            lambda: old.publish("threatbus/snapshotenvelope", envelope) or drain(requester.sub),
            what="the translated snapshot item",
        )
        suffix, indicator = requester.parse(got[0])
        self.assertEqual((suffix, indicator["id"]), ("indicator", bridge.indicator_id("intel-1")))
        self.assertEqual(drain(new_bystander.sub), [])
        self.assertEqual(drain(old.sub), [])

    async def test_2020_requester(self):
        """A 2020 app's snapshot: a 2022 envelope's Indicator reaches it as Intel."""
        top = start_bus(self)
        ctx = Context(self)
        (new,) = await connected_apps(ctx, top, "stix2/indicator")
        requester = App.on(ctx, top)
        await requester.subscribe(ctx, "threatbus/intel", snapshot=1)
        await requester.wait_connected(top)
        ((suffix, snapshot_request),) = await new.receive(1)
        self.assertEqual((suffix, snapshot_request["type"]), ("snapshotrequest", "snapshotrequest"))
        envelope = {
            "type": "snapshotenvelope",
            "snapshot_type": 1,
            "snapshot_id": snapshot_request["snapshot_id"],
            "body": INDICATOR,
        }
        got = await wait_for(
            lambda: new.publish("threatbus/snapshotenvelope", envelope) or drain(requester.sub),
            what="the translated snapshot item",
        )
        suffix, intel = requester.parse(got[0])
        self.assertEqual((suffix, intel["id"], intel["data"]["indicator"]), ("intel", INDICATOR["id"], ["203.0.113.1"]))


class TwoPluginTests(TestCase):
    """A config with both zmq-app and zmq runs two plugins, on their own ports, on one bus."""

    async def test_apps_on_both_plugins_meet(self):
        """A 2020 app on zmq-app and a 2022 app on zmq exchange intel."""
        ports = {"manage": 0, "pub": 0, "sub": 0}
        top = start_bus(self, Config(apps={"zmq-app": ZmqAppConfig(**ports), "zmq": ZmqAppConfig(**ports)}, store=None))
        ctx = Context(self)
        old, new = App.on(ctx, top), App(manage=ctx.socket(zmq.REQ, f"tcp://127.0.0.1:{top.getServiceNamed('zmq').ports['manage']}"))
        await old.subscribe(ctx, "threatbus/intel")
        await new.subscribe(ctx, "stix2/indicator")
        await wait_for(lambda: top.getServiceNamed("zmq").subscriptions.get(new.p2p).ready)
        self.assertNotEqual(zmq_app_of(top).ports, top.getServiceNamed("zmq").ports)
        await publish_until_seen(new, "stix2/indicator", INDICATOR, [old])
        new.publish("stix2/indicator", INDICATOR)
        ((suffix, intel),) = await old.receive(1)
        self.assertEqual((suffix, intel["id"]), ("intel", INDICATOR["id"]))
