"""
The incoming side: what the broker delivers from this instance's queues,
handed to the bus, then acknowledged.

Each AMQP message (one bus message, or a batch of them) is acked once the
bus has taken all it carries: what was not acked when the connection
dropped, the broker gives again. A message that comes again (a re-send after
a lost confirm, a redelivery after a lost ack) is recognised by its
``message_id`` within the last ``dedup_window`` ids, acked and dropped.
Handling yields to the reactor after ``batch_seconds`` of work, however
costly the messages are to check, within a batch too.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from twisted.internet.task import deferLater
from twisted.logger import Logger

from txthreatbus import codec, logs
from txthreatbus.backbones.rabbitmq import batches
from txthreatbus.backbones.rabbitmq.diagnosis import describe
from txthreatbus.backbones.rabbitmq.topology import TOPICS

log = Logger(observer=logs.publisher)


class DedupWindow:
    """The last ``size`` message ids seen, least recently seen first."""

    def __init__(self, size: int):
        self.size = size
        self._ids: "OrderedDict[str, None]" = OrderedDict()

    def __len__(self):
        return len(self._ids)

    def seen(self, message_id: str) -> bool:
        """Whether ``message_id`` was seen within the window; remembers it."""
        ids = self._ids
        if message_id in ids:
            ids.move_to_end(message_id)
            return True
        ids[message_id] = None
        if len(ids) > self.size:
            ids.popitem(last=False)
        return False


class Inbox:
    """
    Takes deliveries from the broker to the bus.

    @param deliver: the bus's ``deliver(message)``.
    @param queues: the queue of each type name, for log lines.
    @param dedup_window: how many message ids are remembered.
    @param metrics: the bus's Metrics.
    @param counter: the ``backbone_consumed`` counter of this backbone.
    @param throttle: a ``logs.Throttle`` for lines that repeat.
    @param clock: IReactorTime, for yielding.
    """

    #: Seconds of handling messages after which consuming lets the reactor
    #: run: what pika hands over in one read (up to ``prefetch`` messages)
    #: cannot hold it.
    batch_seconds = 0.02
    #: The clock of ``batch_seconds``.
    now = staticmethod(time.monotonic)

    def __init__(self, deliver: Callable, queues: dict, dedup_window: int, metrics, counter,
                 throttle, clock):
        self._deliver = deliver
        self._queues = queues
        self._dedup = DedupWindow(dedup_window)
        self._metrics = metrics
        self._consumed = counter
        self._throttle = throttle
        self._clock = clock
        #: Seconds of handling since the reactor last ran, across every queue.
        self._spent = 0.0

    async def consume(self, kind: str, messages, alive: Callable[[], bool]) -> None:
        """
        Hand what arrives in ``messages`` (pika's queue of one consumer) to
        the bus while ``alive()``; ends when pika closes the queue.
        """
        while True:
            received = await messages.get()
            if not alive():
                return  # not acked: the broker gives it to us again, or to the next run
            await self.received(kind, received)

    async def received(self, kind: str, received) -> None:
        """
        Hand one AMQP message to the bus, then ack it. A batch is handed on
        whole, across reactor turns if it takes long, even if the connection
        drops meanwhile: its id is remembered, so the broker's repeat of it
        is dropped.
        """
        for body in self._bodies(kind, received):
            started = self.now()
            self._take(kind, body)
            self._spent += self.now() - started
            if self._spent > self.batch_seconds:
                self._spent = 0.0
                await deferLater(self._clock, 0, lambda: None)
        try:
            received.channel.basic_ack(delivery_tag=received.method.delivery_tag)
        except Exception as e:
            # The channel closed under us: the broker redelivers, dedup drops it.
            self._throttle("ack", log.debug, "Could not ack a message: {e}", e=describe(e))

    def _bodies(self, kind: str, received) -> list:
        """The messages that ``received`` carries, none if it is a repeat or malformed."""
        properties = received.properties
        message_id = properties.message_id
        if message_id is not None and self._dedup.seen(message_id):
            self._metrics.drop("backbone_duplicate")
            self._throttle(
                "duplicate", log.debug, "Dropped a repeat of message {id} from RabbitMQ", id=message_id
            )
            return []
        try:
            return batches.unpack(properties.content_type, received.body)
        except batches.BatchError as e:
            self._malformed(kind, "backbone_malformed", e)
            return []

    def _take(self, kind: str, body: bytes) -> None:
        try:
            message = codec.decode(TOPICS[kind], body)
        except codec.DecodeError as e:
            # backbone_malformed, backbone_duplicate_key, backbone_too_deep
            self._malformed(kind, "backbone_" + (getattr(e, "reason", None) or "malformed"), e)
            return
        self._consumed.inc()
        try:
            self._deliver(message)
        except Exception:
            self._throttle(
                "bus_failure", log.failure, "The bus failed to take a {kind} from RabbitMQ", kind=kind
            )

    def _malformed(self, kind: str, reason: str, e: Exception) -> None:
        self._metrics.drop(reason)
        self._throttle(
            reason,
            log.warn,
            "Dropped a malformed {kind} from RabbitMQ queue {queue}: {error}",
            kind=kind,
            queue=self._queues[kind],
            error=str(e)[:200],  # it may quote the input
        )
