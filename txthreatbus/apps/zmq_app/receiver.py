"""
The SUB side: what apps publish, one frame ``<topic> <json>`` each: 2020
messages on their ``threatbus/`` topics, STIX Indicators and Sightings on
any topic under ``stix2/`` (read by their ``type``, as Threat Bus 2022 does),
and snapshot envelopes of both generations on ``threatbus/snapshotenvelope``.

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

#: The 2020 topics apps may publish on, and their messages' classes.
TOPICS = {cls.topic.encode(): cls for cls in (Intel, Sighting, SnapshotEnvelope)}
#: The prefix of the STIX topics apps may publish on.
STIX_PREFIX = b"stix2/"
#: The prefixes the SUB socket subscribes to.
PREFIXES = (b"threatbus/", STIX_PREFIX)


class Receiver:
    """Hands each well-formed message that apps publish to ``publish``."""

    def __init__(self, publish, metrics, clock):
        self._publish = publish
        self._metrics = metrics
        self._throttle = logs.Throttle(clock)

    def __call__(self, message) -> None:
        """Take one message (a list of one frame) from an app."""
        topic, space, body = message[0].partition(b" ")
        if not space:
            return self._drop("no_space", "a frame without a space after the topic")
        cls = TOPICS.get(topic)
        try:
            if cls is not None:
                item = codec.decode_message(cls, body)
            elif topic.startswith(STIX_PREFIX):
                item = codec.decode_stix(body)
            else:
                return self._drop("unknown_topic", "a message on unknown topic {topic!r}", topic=topic)
        except codec.DecodeError as e:
            return self._drop(
                e.reason, "a malformed message on {topic}: {error}", topic=topic.decode("utf-8", "replace"), error=str(e)
            )
        self._metrics.received[item.kind].inc()
        self._publish(item)

    def _drop(self, reason: str, what: str, **fields):
        self._metrics.drop(reason)
        self._throttle(reason, log.warn, "Dropped " + what + " from an app", **fields)


class ReceiverConnection(BatchedReadConnection):
    """
    A receive-only SUB socket subscribed to ``PREFIXES``, read by
    ``receive`` a frame at a time (the frames of a multipart message are
    messages of their own, as Threat Bus reads them).
    """

    socketType = zmq.SUB
    frame_by_frame = True

    def __init__(self, factory, receive, receive_hwm: int, max_message_size: int):
        self.messageReceived = receive
        BatchedReadConnection.__init__(self, factory)
        self.socket.setsockopt(zmq.RCVHWM, receive_hwm)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        for prefix in PREFIXES:
            self.socket.setsockopt(zmq.SUBSCRIBE, prefix)
