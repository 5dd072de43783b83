"""
BatchedReadConnection's bounds per reactor turn, on a real in-process
ZeroMQ socket pair.
"""

from __future__ import annotations

import itertools
import uuid

import zmq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory

from txthreatbus.connections import BatchedReadConnection


class Reactor(Clock):
    """A clock that takes readers: the tests call ``read`` themselves."""

    def addReader(self, reader):
        pass

    def removeReader(self, reader):
        pass


class Pull(BatchedReadConnection):
    socketType = zmq.PULL

    def __init__(self, factory, handle):
        self.messageReceived = handle
        BatchedReadConnection.__init__(self, factory)


class BatchTests(SynchronousTestCase):
    """A turn reads at most a batch of messages, bytes or seconds; the next turn reads on."""

    def setUp(self):
        self.factory = ZmqFactory()
        self.factory.reactor = self.clock = Reactor()
        self.addCleanup(self.factory.shutdown)
        address = f"inproc://{uuid.uuid4()}"
        self.received = []
        self.pull = Pull(self.factory, self.received.append)
        self.pull.addEndpoints([ZmqEndpoint(ZmqEndpointType.bind, address)])
        self.push = self.factory.context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.addCleanup(self.push.close)
        self.push.connect(address)

    def send(self, n: int, size: int = 1) -> None:
        for i in range(n):
            self.push.send(b"x" * size)

    def turns(self) -> list:
        """How many messages each reactor turn read, until the socket is empty."""
        counts = []
        read = self.pull.read

        def counted():
            before = len(self.received)
            read()
            counts.append(len(self.received) - before)

        self.pull.read = counted  # what each turn's callLater(0, self.read) calls
        counted()
        self.clock.advance(0)
        return counts

    def test_messages(self):
        """At most ``batch`` messages a turn."""
        self.patch(Pull, "batch", 4)
        self.send(10)
        self.assertEqual(self.turns(), [4, 4, 2])

    def test_bytes(self):
        """A turn ends once ``batch_bytes`` are read."""
        self.patch(Pull, "batch_bytes", 250)
        self.send(6, size=100)
        self.assertEqual(self.turns(), [3, 3, 0])

    def test_seconds(self):
        """A turn ends once handling its messages took ``batch_seconds``: slow messages cannot hold the reactor."""
        ticks = itertools.count()
        self.patch(Pull, "now", staticmethod(lambda: next(ticks) * 0.015))  # each message "takes" 15 ms
        self.send(5)
        self.assertEqual(self.turns(), [2, 2, 1])
