"""
The RabbitMQ backbone against a real broker on 127.0.0.1:5672 (guest/guest). Without a broker those are skipped, except in
CI (CI=true), where they fail.

Every broker test names its exchanges and queues with a unique tag (through
``naming_join_pattern``) and deletes them at the end.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import uuid
from datetime import datetime

import attrs
import pika
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, formatEvent
from twisted.protocols import portforward
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import (
    App,
    Context,
    drain,
    publish_until_seen,
    require_service,
    settle,
    start_bus,
    wait_for,
)
from txthreatbus import codec, logs
from txthreatbus.backbones.rabbitmq import RabbitMQBackbone
from txthreatbus.backbones.rabbitmq.outgoing import MESSAGE_OVERHEAD
from txthreatbus.backbones.rabbitmq.topology import TYPES
from txthreatbus.config import Config, QueueConfig, RabbitMQConfig, ZmqAppConfig
from txthreatbus.metrics import Metrics
from txthreatbus.model import Intel, IntelData, IntelType, Operation

BROKER = ("127.0.0.1", 5672)
KINDS = tuple(TYPES.values())


# --- helpers


def intel(id: str) -> Intel:
    return Intel(
        ts=datetime(2020, 11, 26, 14, 46, 52, 123456),
        id=id,
        data=IntelData(indicator=("example.com",), intel_type=IntelType.DOMAIN),
        operation=Operation.ADD,
    )


def big_intel(id: str, size: int = 1 << 20) -> Intel:
    """Intel whose encoding is a little over ``size`` bytes."""
    return Intel(
        ts=datetime(2020, 11, 26, 14, 46, 52, 123456),
        id=id,
        data=IntelData(indicator=("x" * size + ".example",), intel_type=IntelType.DOMAIN),
        operation=Operation.ADD,
    )


def held(message) -> int:
    """What holding ``message`` counts against buffer_bytes."""
    return len(codec.encode(message)) + MESSAGE_OVERHEAD


def intel_json(id: str) -> dict:
    return codec.unstructure(intel(id))


def capture_logs(testcase) -> list:
    """The events that txthreatbus logs during the test."""
    events = []
    logs.publisher.addObserver(events.append)
    testcase.addCleanup(logs.publisher.removeObserver, events.append)
    return events


def logged(events, level) -> list:
    return [formatEvent(e) for e in events if e.get("log_level") == level]


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0


def backbone_sample(metrics: Metrics, what: str) -> float:
    return sample(metrics, f"txthreatbus_backbone_{what}_total", backbone="rabbitmq")


# --- against a real broker


def require_broker(testcase) -> None:
    """Skip (fail in CI) unless the broker is reachable."""
    require_service(testcase, BROKER, "RabbitMQ broker (guest/guest)")


async def broker_connection() -> TwistedProtocolConnection:
    """A plain pika connection to the test broker."""
    connection = TwistedProtocolConnection(
        pika.ConnectionParameters(credentials=pika.PlainCredentials("guest", "guest"))
    )
    await connectProtocol(TCP4ClientEndpoint(reactor, *BROKER), connection)
    await connection.ready
    return connection


async def next_message(channel, queue: str, timeout: float = 10.0):
    """The next message on ``queue``, polled with basic_get."""
    found = []

    async def poll():
        message = await channel.basic_get(queue=queue, auto_ack=True)
        if message is not None:
            found.append(message)
        return found

    end = reactor.seconds() + timeout
    while not await poll():
        if reactor.seconds() > end:
            raise AssertionError(f"no message on {queue} within {timeout} s")
        await settle(0.01)
    return found[0]


def publish_many(backbone, ids) -> None:
    for i in ids:
        backbone.publish(intel(i))


def exactly_once(testcase, delivered, ids) -> None:
    counts = collections.Counter(m.id for m in delivered)
    testcase.assertEqual(set(counts), set(ids), "items lost, or foreign items delivered")
    repeated = {i: n for i, n in counts.items() if n != 1}
    testcase.assertEqual(repeated, {}, "items delivered more than once")


class _ProxyServer(portforward.ProxyServer):
    def connectionMade(self):
        self.factory.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.factory.connections.discard(self)
        super().connectionLost(reason)


class _ProxyClient(portforward.ProxyClient):
    def connectionMade(self):
        self.peer.factory.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.peer.factory.connections.discard(self)
        super().connectionLost(reason)


class _ProxyClientFactory(portforward.ProxyClientFactory):
    protocol = _ProxyClient


_ProxyServer.clientProtocolFactory = _ProxyClientFactory


class Proxy:
    """A TCP proxy on 127.0.0.1 to the broker, that can be cut and restored."""

    def __init__(self, target_port: int):
        self.factory = portforward.ProxyFactory(BROKER[0], target_port)
        self.factory.protocol = _ProxyServer
        self.factory.connections = set()
        self.port = 0
        self._listening = None

    def start(self):
        """Listen (again, on the same port once it has one)."""
        self._listening = reactor.listenTCP(self.port, self.factory, interface=BROKER[0])
        self.port = self._listening.getHost().port

    def cut(self):
        """Stop listening and abort every connection, both sides."""
        listening, self._listening = self._listening, None
        listening.stopListening()
        for connection in list(self.factory.connections):
            connection.transport.abortConnection()

    async def close(self):
        if self._listening is not None:
            await self._listening.stopListening()
            self._listening = None
        for connection in list(self.factory.connections):
            connection.transport.loseConnection()
        await wait_for(lambda: not self.factory.connections, what="the proxy to close")


class BrokerTestCase(TestCase):
    """A test against the broker, with exchanges and queues of its own."""

    timeout = 120

    def setUp(self):
        require_broker(self)
        self.tag = "t" + uuid.uuid4().hex[:10]
        self.queues_to_delete = []
        # registered first, so it runs last: after the backbones stopped
        self.addCleanup(lambda: defer.ensureDeferred(self._delete_broker_objects()))

    async def _delete_broker_objects(self):
        connection = await broker_connection()
        channel = await connection.channel()
        for queue in self.queues_to_delete:
            await channel.queue_delete(queue=queue)
        for kind in KINDS:
            await channel.exchange_delete(exchange=f"threatbus.{self.tag}.{kind}")
        await connection.close()

    async def channel(self):
        """A plain pika channel on the broker, closed at the end of the test."""
        connection = await broker_connection()
        self.addCleanup(connection.close)
        return await connection.channel()

    def config(self, suffix: str, port: int = BROKER[1], keep: bool = False, **options):
        """
        A backbone config of this test for instance ``suffix``: its queues
        vanish when unused or, with ``keep``, survive a lost connection and
        are deleted at the end of the test.
        """
        queue = QueueConfig(name_suffix=f"{self.tag}-{suffix}", durable=False, auto_delete=not keep)
        config = RabbitMQConfig(
            host=BROKER[0],
            port=port,
            naming_join_pattern=f".{self.tag}.",
            queue=queue,
            reconnect_max_delay=0.5,
            **{"resubscribe_grace": 0, **options},
        )
        if keep:
            self.queues_to_delete.extend(
                f"threatbus.{self.tag}.{kind}.{self.tag}.{queue.name_suffix}" for kind in KINDS
            )
        return config

    def backbone(self, config: RabbitMQConfig, on_fatal=None):
        """A started backbone, stopped at the end of the test, and the list it delivers to."""
        delivered = []
        backbone = RabbitMQBackbone(config, Metrics(), reactor, on_fatal=on_fatal or self._fatal)
        backbone.attach(delivered.append)
        backbone.startService()
        self.addCleanup(backbone.stopService)
        return backbone, delivered

    def _fatal(self, failure):
        self.fail(f"the backbone could not connect: {failure.value!r}")

    async def start_failure(self, config: RabbitMQConfig) -> str:
        """The critical line logged when a backbone of ``config`` fails to start."""
        events = capture_logs(self)
        fatal = []
        self.backbone(config, on_fatal=fatal.append)
        await wait_for(lambda: fatal, what="the start-up failure")
        [critical] = logged(events, LogLevel.critical)
        return critical


class BackboneBrokerTests(BrokerTestCase):
    """Backbones talking through a real broker."""

    async def test_ten_thousand_items(self):
        """10,000 items published at one instance reach both instances, none lost, none twice."""
        b1, got1 = self.backbone(self.config("a"))
        b2, got2 = self.backbone(self.config("b"))
        await wait_for(lambda: b1.connected and b2.connected, what="both backbones to connect")
        ids = [f"i-{n}" for n in range(10_000)]
        publish_many(b1, ids)
        await wait_for(lambda: min(len(got1), len(got2)) >= len(ids), 60, "10,000 items at both")
        await wait_for(lambda: b1.pending == 0, what="every confirm")
        await settle(0.2)
        exactly_once(self, got1, ids)
        exactly_once(self, got2, ids)
        self.assertEqual(backbone_sample(b1.metrics, "published"), 10_000)
        self.assertEqual(backbone_sample(b2.metrics, "consumed"), 10_000)
        await defer.gatherResults([b1.stopService(), b1.stopService(), b2.stopService()])
        self.assertFalse(b1.connected)

    async def test_survives_a_cut_connection(self):
        """Connections cut and restored mid-stream: afterwards every item arrived exactly once."""
        proxy = Proxy(BROKER[1])
        proxy.start()
        self.addCleanup(proxy.close)
        b1, got1 = self.backbone(self.config("a", port=proxy.port, keep=True))
        b2, got2 = self.backbone(self.config("b", port=proxy.port, keep=True))
        await wait_for(lambda: b1.connected and b2.connected, what="both backbones to connect")
        batches = [[f"i-{b}-{n}" for n in range(1000)] for b in range(4)]
        publish_many(b1, batches[0])
        await wait_for(lambda: len(got2) >= 300, what="the stream to flow")
        publish_many(b1, batches[1])
        self.assertGreater(b1.pending, 0)
        proxy.cut()  # the second batch is on its way, not yet confirmed
        await wait_for(lambda: not (b1.connected or b2.connected), what="the cut to be noticed")
        publish_many(b1, batches[2])  # waits in the buffer
        await settle(0.3)  # reconnection attempts fail
        proxy.start()
        publish_many(b1, batches[3])
        everything = [i for batch in batches for i in batch]
        await wait_for(
            lambda: min(len(got1), len(got2)) >= len(everything), 30, "every item at both"
        )
        await wait_for(lambda: b1.pending == 0, what="every confirm")
        await settle(0.3)
        exactly_once(self, got1, everything)
        exactly_once(self, got2, everything)
        self.assertGreaterEqual(backbone_sample(b1.metrics, "reconnects"), 1)
        self.assertGreaterEqual(backbone_sample(b2.metrics, "reconnects"), 1)

    async def test_threat_bus_interoperates(self):
        """We publish persistent protocol JSON with ids; Threat Bus's id-less messages arrive."""
        backbone, got = self.backbone(self.config("a"))
        await wait_for(lambda: backbone.connected, what="the backbone to connect")
        channel = await self.channel()
        frame = await channel.queue_declare(queue="", exclusive=True)
        queue = frame.method.queue
        await channel.queue_bind(queue=queue, exchange=backbone.topology.exchanges["intel"])
        message = intel("from-us")
        backbone.publish(message)
        received = await next_message(channel, queue)
        self.assertEqual(json.loads(received.body), codec.unstructure(message))
        self.assertEqual(received.properties.delivery_mode, 2)
        self.assertIsNotNone(received.properties.message_id)
        # as Threat Bus 2020.11.26 publishes: the JSON body, no properties
        exchange = backbone.topology.exchanges["intel"]
        body = json.dumps(intel_json("from-threat-bus")).encode()
        channel.basic_publish(exchange=exchange, routing_key="", body=body)
        channel.basic_publish(exchange=exchange, routing_key="", body=b"{oops")
        await wait_for(lambda: any(m.id == "from-threat-bus" for m in got), what="the intel")
        await wait_for(
            lambda: backbone.metrics.dropped("backbone_malformed") == 1, what="the malformed count"
        )

    async def test_queue_options_on_broker(self):
        """Every queue option shows on the broker: durable, auto_delete, exclusive, mode, length."""
        rabbitmqctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
        if not os.path.exists(rabbitmqctl):
            if os.environ.get("CI") == "true":
                self.fail("rabbitmqctl is not installed, and CI=true")
            raise SkipTest("rabbitmqctl is not installed")
        kept = self.config("kept", keep=True)
        kept = attrs.evolve(
            kept, queue=attrs.evolve(kept.queue, durable=True, lazy=True, max_items=1234)
        )
        other = self.config("other")
        other = attrs.evolve(
            other, queue=attrs.evolve(other.queue, exclusive=True, lazy=False, max_items=0)
        )
        b1, _ = self.backbone(kept)
        b2, _ = self.backbone(other)
        await wait_for(lambda: b1.connected and b2.connected, what="both backbones to connect")

        async def rabbitmqctl_json(*args):
            out, err, code = await getProcessOutputAndValue(
                rabbitmqctl, [*args, "--formatter", "json", "-q"], env=os.environ
            )
            self.assertEqual(code, 0, err)
            return json.loads(out)

        listed = await rabbitmqctl_json(
            "list_queues", "name", "durable", "auto_delete", "exclusive", "arguments"
        )
        queues = {}
        for q in listed:  # arguments: [[key, type, value], ...]
            arguments = {key: value for key, _type, value in q["arguments"]}
            queues[q["name"]] = (q["durable"], q["auto_delete"], q["exclusive"], arguments)
        for kind in KINDS:
            self.assertEqual(
                queues[b1.topology.queues[kind]],
                (True, False, False, {"x-queue-mode": "lazy", "x-max-length": 1234}),
            )
            self.assertEqual(
                queues[b2.topology.queues[kind]], (False, True, True, {"x-queue-mode": "default"})
            )
        listed = await rabbitmqctl_json("list_exchanges", "name", "type", "durable")
        exchanges = {e["name"]: e for e in listed}
        for kind in KINDS:
            exchange = exchanges[b1.topology.exchanges[kind]]
            self.assertEqual((exchange["type"], exchange["durable"]), ("fanout", True))

    async def test_wrong_credentials(self):
        """Refused credentials: one clear critical line, and on_fatal; no silent hang."""
        critical = await self.start_failure(self.config("a", password="wrong-" + self.tag))
        self.assertIn("RabbitMQ at 127.0.0.1:5672 refused the credentials for user 'guest'",
                      critical)

    async def test_unknown_vhost(self):
        """A vhost the user may not use: one clear critical line naming it."""
        critical = await self.start_failure(self.config("a", vhost="/nope-" + self.tag))
        self.assertIn(f"refused user 'guest' access to vhost '/nope-{self.tag}'", critical)

    async def test_changed_queue_options(self):
        """Options that differ from the existing queues': one critical line naming the conflict."""
        config = self.config("a", keep=True)
        backbone, _ = self.backbone(config)
        await wait_for(lambda: backbone.connected, what="the backbone to connect")
        await backbone.stopService()
        changed = attrs.evolve(config, queue=attrs.evolve(config.queue, lazy=False))
        critical = await self.start_failure(changed)
        self.assertIn("refused to set up the exchanges and queues: 406 PRECONDITION_FAILED", critical)
        self.assertIn("x-queue-mode", critical)

    async def test_transient_exchanges_of_threat_bus(self):
        """Exchanges declared transient (as Threat Bus does): refused with what to do; durable_exchanges: false joins them."""
        channel = await self.channel()
        for kind in KINDS:  # deleted at the end of the test, as every test's
            await channel.exchange_declare(exchange=f"threatbus.{self.tag}.{kind}", exchange_type="fanout")
        critical = await self.start_failure(self.config("a"))
        self.assertIn("inequivalent arg 'durable' for exchange", critical)
        self.assertIn("set durable_exchanges as they are", critical)
        backbone, _ = self.backbone(self.config("b", durable_exchanges=False))
        await wait_for(lambda: backbone.connected, what="the backbone to connect")


class UnreachableBrokerTests(TestCase):
    """Start-up against a port where no broker listens (needs no broker)."""

    async def test_unreachable(self):
        """No broker at host:port: one clear critical line, and on_fatal; it stops cleanly."""
        events = capture_logs(self)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        fatal = []
        config = RabbitMQConfig(host="127.0.0.1", port=port)
        backbone = RabbitMQBackbone(config, Metrics(), reactor, on_fatal=fatal.append)
        backbone.attach(lambda message: None)
        backbone.startService()
        await wait_for(lambda: fatal, what="the start-up failure")
        [critical] = logged(events, LogLevel.critical)
        self.assertIn(f"cannot reach RabbitMQ at 127.0.0.1:{port}", critical)
        await backbone.stopService()


class BusBrokerTests(BrokerTestCase):
    """Whole buses (zmq-app, bus core, RabbitMQ backbone): two instances in one process."""

    async def start_two(self, **options):
        zmq_app = ZmqAppConfig(manage=0, pub=0, sub=0)
        tops = [
            start_bus(self, Config(backbone=self.config(name, **options), apps={"zmq-app": zmq_app}, store=None))
            for name in ("one", "two")
        ]
        backbones = [top.getServiceNamed("backbone") for top in tops]
        await wait_for(lambda: all(b.connected for b in backbones), what="the backbones")
        return tops

    async def test_intel_reaches_both_instances_once(self):
        """Intel published at instance 1 reaches a subscriber at each instance exactly once."""
        one, two = await self.start_two()
        ctx = Context(self)
        publisher = App.on(ctx, one)
        await publisher.subscribe(ctx, "threatbus/sighting")
        receivers = []
        for top in (one, two):
            app = App.on(ctx, top)
            await app.subscribe(ctx, "threatbus/intel")
            await app.wait_connected(top)
            receivers.append(app)
        await publish_until_seen(publisher, "threatbus/intel", intel_json("probe"), receivers)
        publisher.publish("threatbus/intel", intel_json("the-one"))
        seen = [[], []]

        def count(i):
            seen[i].extend(receivers[i].parse(f) for f in drain(receivers[i].sub))
            return sum(1 for suffix, body in seen[i] if body["id"] == "the-one")

        await wait_for(lambda: count(0) and count(1), what="the intel at both instances")
        await settle(0.3)
        self.assertEqual((count(0), count(1)), (1, 1))
        self.assertIn(("intel", intel_json("the-one")), seen[1])

    async def test_snapshot_crosses_instances(self):
        """A snapshot request reaches the other instance; the answer reaches the requester only."""
        one, two = await self.start_two()
        ctx = Context(self)
        server = App.on(ctx, two)
        await server.subscribe(ctx, "threatbus/intel")
        await server.wait_connected(two)
        bystander = App.on(ctx, one)
        await bystander.subscribe(ctx, "threatbus/intel")
        await bystander.wait_connected(one)
        probe = intel_json("probe")
        await publish_until_seen(server, "threatbus/intel", probe, [server, bystander])

        requester = App.on(ctx, one)
        await requester.subscribe(ctx, "threatbus/intel", snapshot=1)
        await requester.wait_connected(one)
        [(suffix, request)] = await server.receive(1)
        while (suffix, request) == ("intel", probe):  # a late copy, still crossing the broker
            [(suffix, request)] = await server.receive(1)
        self.assertEqual(suffix, "snapshotrequest")
        self.assertEqual((request["snapshot_type"], request["snapshot"]), (1, 86400))

        body = intel_json("from-the-past")
        envelope = {"snapshot_type": 1, "snapshot_id": request["snapshot_id"], "body": body}
        server.publish("threatbus/snapshotenvelope", envelope)
        [got] = await requester.receive(1)
        while got == ("intel", probe):  # a late copy reaches the requester too
            [got] = await requester.receive(1)
        self.assertEqual(got, ("intel", body))
        await settle(0.3)
        for app in (bystander, server):
            self.assertEqual([f for f in drain(app.sub) if b"from-the-past" in f], [])
        self.assertEqual([f for f in drain(requester.sub) if b"probe" not in f], [])

    async def test_stix_crosses_instances(self):
        """A STIX Indicator published at instance 1 reaches STIX apps at instance 2 as sent, and 2020 apps there as Intel."""
        one, two = await self.start_two()
        ctx = Context(self)
        publisher = App.on(ctx, one)
        await publisher.subscribe(ctx, "stix2/sighting")
        receivers = []
        for topic in ("stix2/indicator", "threatbus/intel"):
            app = App.on(ctx, two)
            await app.subscribe(ctx, topic)
            await app.wait_connected(two)
            receivers.append(app)
        indicator = {
            "type": "indicator",
            "spec_version": "2.1",
            "id": "indicator--6911104f-c504-4086-a15b-05e28cf73435",
            "pattern": "[domain-name:value = 'evil.example.com']",
            "pattern_type": "stix",
        }
        await publish_until_seen(publisher, "stix2/indicator", indicator, receivers)
        sent = json.dumps({**indicator, "name": "the-one"}).encode()
        publisher.pub.send(b"stix2/indicator " + sent)
        stix_app, old_app = receivers
        frames = await wait_for(
            lambda: [f for f in drain(stix_app.sub) if b"the-one" in f], what="the Indicator at instance 2"
        )
        self.assertEqual(frames, [stix_app.p2p.encode() + b"indicator " + sent])
        ((suffix, intel),) = await old_app.receive(1)  # the probes' Intel is the same
        self.assertEqual((suffix, intel["id"]), ("intel", indicator["id"]))
        self.assertEqual(intel["data"], {"indicator": ["evil.example.com"], "intel_type": 11})

    async def restart_two_while_publishing(self, grace: float) -> tuple:
        """
        Instance two stops while 100 intel are published at one, starts
        again, and an app subscribes there anew (as apps do when their
        heartbeat fails): what that app receives, and the instance's metrics.
        """
        one, two = await self.start_two(keep=True, resubscribe_grace=grace)
        ctx = Context(self)
        publisher, receiver = App.on(ctx, one), App.on(ctx, two)
        await publisher.subscribe(ctx, "threatbus/sighting")
        await receiver.subscribe(ctx, "threatbus/intel")
        await receiver.wait_connected(two)
        await publish_until_seen(publisher, "threatbus/intel", intel_json("probe"), [receiver])
        await two.stopService()
        for i in range(100):
            publisher.publish("threatbus/intel", intel_json(f"away-{i}"))
        await settle(0.3)  # at the broker, in two's queue
        two.startService()
        backbone = two.getServiceNamed("backbone")
        await wait_for(lambda: backbone.connected, what="two's backbone")
        await settle(0.5)  # apps notice a restart only at their next heartbeat
        again = App.on(ctx, two)
        await again.subscribe(ctx, "threatbus/intel")
        await again.wait_connected(two)
        got = set()

        def collect():
            # and perhaps probes that reached two while it was stopping:
            # not taken, not acked, so the broker gives them again
            ids = (again.parse(f)[1]["id"] for f in drain(again.sub))
            got.update(i for i in ids if i.startswith("away-"))
            return len(got) >= 100

        try:
            await wait_for(collect, timeout=grace + 5, what="the intel published while away")
        except AssertionError:
            pass
        await settle(0.3)
        collect()
        return got, two.getServiceNamed("bus").metrics

    async def test_restarted_instance_loses_nothing(self):
        """What reached a restarted instance's queue while it was away reaches its apps once they subscribe again."""
        got, metrics = await self.restart_two_while_publishing(grace=2)
        self.assertEqual(got, {f"away-{i}" for i in range(100)})
        self.assertEqual(metrics.unrouted["intel"].value, 0)

    async def test_without_grace_counted(self):
        """Without the grace, the queue is consumed before apps are back: what no app got is counted, not silent."""
        got, metrics = await self.restart_two_while_publishing(grace=0)
        self.assertEqual((len(got), metrics.unrouted["intel"].value), (0, 100))
