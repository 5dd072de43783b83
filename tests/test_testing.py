"""
txthreatbus.testing: its fakes behave as the real transport does, for what
apps use. The same scenarios (subscribe, receive, publish, unsubscribe) run
twice: a client on ``FakeTransport`` with the test playing the bus through
the fakes, and a client on ``ZmqTransport`` with the test playing the bus
through pyzmq sockets of its own. Both must see the same.
"""

from __future__ import annotations

import json
from datetime import timedelta

import zmq
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from txthreatbus import codec
from txthreatbus.apps.zmq_app import publisher as bus_publisher
from txthreatbus.client import (
    Client,
    Endpoints,
    IManageSocket,
    IPublisherSocket,
    ISubscriberSocket,
    ITransport,
)
from txthreatbus.model import MessageType, SnapshotRequest
from txthreatbus.testing import FakeTransport, frame_for, subscribe_reply
from tests.support import Context, receive, settle, wait_for
from tests.test_client import INDICATOR, INTEL, SIGHTING

P2P = "c" * 32
OTHER_P2P = "d" * 32
REQUEST = SnapshotRequest(MessageType.INTEL, "snap-1", timedelta(days=1))


class FakeBus:
    """The bus, played through a ``FakeTransport``'s sockets."""

    def __init__(self, testcase):
        self.transport = FakeTransport()
        self.manage_endpoint = "127.0.0.1:13370"

    def client(self, **options) -> Client:
        return Client(self.manage_endpoint, transport=self.transport, **options)

    def reply_for(self, p2p: str) -> dict:
        return subscribe_reply(p2p)

    async def request(self) -> dict:
        return self.transport.manage_socket.open()[0]

    async def reply(self, reply: dict) -> None:
        self.transport.manage_socket.answer(reply)

    async def receiving(self, p2p: str) -> None:
        assert p2p.encode() in self.transport.subscribers[-1].prefixes

    async def send(self, frame: bytes) -> None:
        self.transport.subscribers[-1].deliver_frame(frame)

    async def accept(self, prefix: bytes) -> None:
        self.transport.publishers[-1].accept(prefix)

    async def published(self, n: int) -> list:
        return list(self.transport.publishers[-1].sent)

    async def quiet(self) -> None:
        pass


class ZmqBus:
    """
    The bus, played through pyzmq sockets: a REP socket for management
    requests, an XPUB socket as its PUB (it tells when the client's SUB
    socket subscribed), a SUB socket.
    """

    def __init__(self, testcase):
        ctx = Context(testcase)
        self.rep, self.pub, self.sub = (ctx.socket(kind) for kind in (zmq.REP, zmq.XPUB, zmq.SUB))
        self.endpoints = []
        for sock in (self.rep, self.pub, self.sub):
            sock.bind("tcp://127.0.0.1:*")
            self.endpoints.append(sock.getsockopt(zmq.LAST_ENDPOINT).decode()[len("tcp://") :])
        self.manage_endpoint = self.endpoints[0]
        self.subscribed = set()
        # ZeroMQ attaches a new connection to a socket, and sends it the
        # socket's subscriptions, only when the socket is used: use the SUB
        # socket, as a bus's reactor would
        self._use = LoopingCall(self.sub.getsockopt, zmq.EVENTS)
        self._use.start(0.005)
        testcase.addCleanup(self._use.stop)

    def client(self, **options) -> Client:
        return Client(self.manage_endpoint, linger=0, **options)

    def reply_for(self, p2p: str) -> dict:
        return subscribe_reply(p2p, pub=self.endpoints[1], sub=self.endpoints[2])

    async def request(self) -> dict:
        def received():
            try:
                return json.loads(self.rep.recv(zmq.NOBLOCK))
            except zmq.Again:
                return None

        return await wait_for(received, what="a management request")

    async def reply(self, reply: dict) -> None:
        self.rep.send_json(reply)

    async def receiving(self, p2p: str) -> None:
        def subscribed():
            while True:
                try:
                    notice = self.pub.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return p2p.encode() in self.subscribed
                (self.subscribed.add if notice[:1] == b"\x01" else self.subscribed.discard)(notice[1:])

        await wait_for(subscribed, what="the client's SUB socket")

    async def send(self, frame: bytes) -> None:
        self.pub.send(frame)

    async def accept(self, prefix: bytes) -> None:
        self.sub.setsockopt(zmq.SUBSCRIBE, prefix)

    async def published(self, n: int) -> list:
        return await receive(self.sub, n)

    async def quiet(self) -> None:
        await settle(0.2)


class TransportContract:
    """What a client does on ``self.bus``; the same on either."""

    def make_bus(self):
        raise NotImplementedError()

    def setUp(self):
        self.bus = self.make_bus()
        self.client = self.bus.client(heartbeat_interval=60, request_timeout=0.5)
        self.client.startService()
        self.addCleanup(self.client.stopService)
        self.received = []

    async def subscribed(self, topic="threatbus/intel", days=0):
        d = self.client.subscribe(topic, days, self.received.append)
        await self.bus.request()
        await self.bus.reply(self.bus.reply_for(P2P))
        return await d

    async def test_subscribe(self):
        """subscribe asks the bus, and the subscription lives where the bus says."""
        d = self.client.subscribe("threatbus/sighting", 2, self.received.append)
        self.assertEqual(
            await self.bus.request(),
            {"action": "subscribe", "topic": "threatbus/sighting", "snapshot": 2},
        )
        reply = self.bus.reply_for(P2P)
        await self.bus.reply(reply)
        sub = await d
        self.assertEqual(
            sub.endpoints, Endpoints(P2P, reply["pub_endpoint"], reply["sub_endpoint"])
        )
        self.assertEqual(self.client.subscriptions, [sub])

    async def test_receive(self):
        """What the bus sends on the P2P topic reaches the callback, in order; other topics do not."""
        await self.subscribed()
        await self.bus.receiving(P2P)
        for message in (INTEL, SIGHTING):
            await self.bus.send(frame_for(OTHER_P2P.encode(), message))
        for message in (INTEL, REQUEST, SIGHTING):
            await self.bus.send(frame_for(P2P.encode(), message))
        await wait_for(lambda: len(self.received) >= 3, what="three messages")
        await self.bus.quiet()
        self.assertEqual(self.received, [INTEL, REQUEST, SIGHTING])

    async def test_receive_stix(self):
        """A subscription to a stix2 topic receives STIX objects."""
        await self.subscribed("stix2/indicator")
        await self.bus.receiving(P2P)
        await self.bus.send(frame_for(P2P.encode(), INDICATOR))
        await wait_for(lambda: self.received, what="the indicator")
        self.assertEqual(self.received, [INDICATOR])

    async def test_publish(self):
        """What is published waits until the bus takes its topic, then goes out in order."""
        sub = await self.subscribed()
        sub.publish_intel(INTEL)
        sub.publish_sighting(SIGHTING)
        self.assertEqual(sub.pending, 2)
        await self.bus.accept(b"threatbus/")
        await sub.connected("threatbus/intel")
        await sub.sent()
        self.assertEqual(
            await self.bus.published(2),
            [
                b"threatbus/intel " + codec.encode(INTEL),
                b"threatbus/sighting " + codec.encode(SIGHTING),
            ],
        )

    async def test_unsubscribe(self):
        """unsubscribe tells the bus, leaves the client, and nothing arrives any more."""
        sub = await self.subscribed()
        await self.bus.receiving(P2P)
        d = sub.unsubscribe()
        self.assertEqual(await self.bus.request(), {"action": "unsubscribe", "topic": P2P})
        await self.bus.reply({"status": "success"})
        await d
        self.assertEqual(self.client.subscriptions, [])
        await self.bus.send(frame_for(P2P.encode(), INTEL))
        await self.bus.quiet()
        self.assertEqual(self.received, [])


class FakeTransportContractTests(TransportContract, TestCase):
    """The scenarios on ``FakeTransport``."""

    def make_bus(self):
        return FakeBus(self)


class ZmqTransportContractTests(TransportContract, TestCase):
    """The scenarios on ``ZmqTransport``, real ZeroMQ sockets."""

    def make_bus(self):
        return ZmqBus(self)


class FakeTests(SynchronousTestCase):
    """The fakes' own helpers."""

    def test_interfaces(self):
        """The fake transport and its sockets provide the client's interfaces."""
        transport = FakeTransport()
        verifyObject(ITransport, transport)
        verifyObject(IManageSocket, transport.manage("x:1"))
        verifyObject(ISubscriberSocket, transport.subscriber("x:1", None))
        verifyObject(IPublisherSocket, transport.publisher("x:1", None))

    def test_frames_as_the_bus_frames_them(self):
        """frame_for frames each message as the bus's zmq-app does."""
        for message in (INTEL, SIGHTING, INDICATOR, REQUEST):
            self.assertEqual(
                frame_for(b"p2p", message),
                b"p2p" + bus_publisher._SUFFIXES[type(message)] + codec.encode(message),
            )

    def test_deliver(self):
        """deliver hands a message to the client on its P2P topic, and nothing once closed."""
        frames = []
        subscriber = FakeTransport().subscriber("x:1", frames.append)
        self.assertFalse(subscriber.deliver(INTEL))
        subscriber.subscribe(P2P.encode())
        self.assertTrue(subscriber.deliver(INTEL))
        self.assertEqual(frames, [frame_for(P2P.encode(), INTEL)])
        subscriber.close()
        self.assertFalse(subscriber.deliver(INTEL))
        self.assertEqual(len(frames), 1)

    def test_published(self):
        """published decodes what the client sent."""
        publisher = FakeTransport().publisher("x:1", None)
        publisher.send(b"threatbus/intel " + codec.encode(INTEL))
        publisher.send(b"stix2/indicator " + codec.encode(INDICATOR))
        self.assertEqual(publisher.published(), [INTEL, INDICATOR])
