"""
The SUB side: what apps publish, one frame ``<topic> <json>`` each.

``Receiver`` decodes and validates every frame before it reaches the bus.
Anything malformed is dropped, counted by reason and logged (a flood of it
at most once every 10 s a reason), and the receiver goes on.
``ReceiverConnection`` is the receive-only SUB socket that feeds it.
"""

from __future__ import annotations

import zmq
from twisted.logger import Logger
from txthreatbus import codec, logs
from txthreatbus.connections import BatchedReadConnection
from txthreatbus.model import Intel, Sighting, SnapshotEnvelope

log = Logger(observer=logs.publisher)

#: What apps may publish: wire topic -> metric label.
TOPICS = {cls.topic.encode(): cls.topic.rsplit("/", 1)[1] for cls in (Intel, Sighting, SnapshotEnvelope)}
#: The prefix the SUB socket subscribes to.
PREFIX = b"threatbus/"


class Receiver:
    """Hands each well-formed message that apps publish to ``publish``."""

    def __init__(self, publish, metrics, clock):
        self._publish = publish
        self._metrics = metrics
        self._throttle = logs.Throttle(clock)

    def __call__(self, message) -> None:
        """Take one message (a list of frames) from an app."""
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
            return self._drop(e.reason, "a malformed {kind}: {error}", kind=kind, error=str(e))
        self._metrics.received[kind].inc()
        self._publish(item)

    def _drop(self, reason: str, what: str, **fields):
        self._metrics.drop(reason)
        self._throttle(reason, log.warn, "Dropped " + what + " from an app", **fields)


class ReceiverConnection(BatchedReadConnection):
    """A receive-only SUB socket subscribed to ``threatbus/``, read by ``receive``."""

    socketType = zmq.SUB

    def __init__(self, factory, receive, receive_hwm: int, max_message_size: int):
        self.messageReceived = receive
        BatchedReadConnection.__init__(self, factory)
        self.socket.setsockopt(zmq.RCVHWM, receive_hwm)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        self.socket.setsockopt(zmq.SUBSCRIBE, PREFIX)
