"""
The SUB side: what apps publish, one frame ``<topic> <json>`` each.

Every frame is decoded and validated before it reaches the bus. Anything
malformed is dropped, counted by reason and logged, and the receiver goes on.
"""

from __future__ import annotations

import zmq
from twisted.logger import Logger
from txzmq import ZmqConnection

from txthreatbus import codec, logs
from txthreatbus.model import Intel, Sighting, SnapshotEnvelope

log = Logger(observer=logs.publisher)

#: What apps may publish: wire topic -> metric label.
TOPICS = {cls.topic.encode(): cls.topic.rsplit("/", 1)[1] for cls in (Intel, Sighting, SnapshotEnvelope)}


class ReceiverConnection(ZmqConnection):
    """A receive-only SUB socket subscribed to ``threatbus/``."""

    socketType = zmq.SUB
    #: Messages read in one turn of the reactor, so that a flood from the
    #: apps cannot starve the management socket.
    batch = 500

    def __init__(self, factory, publish, metrics, receive_hwm: int, max_message_size: int):
        self._publish = publish
        self._metrics = metrics
        ZmqConnection.__init__(self, factory)
        self.socket.setsockopt(zmq.RCVHWM, receive_hwm)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"threatbus/")

    def doRead(self):
        # The socket only receives: reading until EAGAIN re-arms ZeroMQ's
        # edge-triggered descriptor, so txZMQ's per-message ZMQ_EVENTS check
        # and logging context are not needed.
        if self.read_scheduled is not None:
            if not self.read_scheduled.called:
                self.read_scheduled.cancel()
            self.read_scheduled = None
        for _ in range(self.batch):
            if self.factory is None:  # shut down meanwhile
                return
            try:
                message = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.messageReceived(message)
            except Exception:
                log.failure("The bus failed to take a message from an app")
        self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)

    def messageReceived(self, message):
        if len(message) != 1:
            return self._drop("multipart", "a message of {n} frames", n=len(message))
        topic, space, body = message[0].partition(b" ")
        if not space:
            return self._drop("no_space", "a frame without a space after the topic")
        kind = TOPICS.get(topic)
        if kind is None:
            return self._drop("unknown_topic", "a message on unknown topic {topic!r}", topic=topic)
        try:
            item = codec.decode(topic.decode(), body)
        except codec.DecodeError as e:
            return self._drop("malformed", "a malformed {kind}: {error}", kind=kind, error=str(e))
        self._metrics.received[kind].inc()
        self._publish(item)

    def _drop(self, reason: str, what: str, **fields):
        self._metrics.drop(reason)
        log.warn("Dropped " + what + " from an app", **fields)
