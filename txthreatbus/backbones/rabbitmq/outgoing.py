"""
The outgoing side: what this instance publishes, held until the broker
confirms it.

Messages of one type published in one reactor turn go out together, as one
AMQP message (``batches``), up to ``batch_bytes`` each; every AMQP message is
persistent (delivery mode 2) with a uuid4 ``message_id``, sent on a channel
in confirm mode, and stays ours until the broker confirms it: what was sent
but not confirmed when the connection dropped is sent again on the next one,
and what the broker refused (nack) goes again after ``NACK_RETRY_DELAY``.
What is held (waiting, in flight, refused) is bounded by ``buffer_bytes``:
each AMQP message counts its body plus ``MESSAGE_OVERHEAD``; past the bound
the oldest not yet sent are dropped, counted per bus message. At most
``MAX_IN_FLIGHT`` AMQP messages are unconfirmed at a time.

It knows nothing of connections: the service hands it a channel when one is
up (``connected``) and tells it when it is gone (``disconnected``); tests
drive it with a fake channel on a ``Clock``.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Callable, Dict, List

import attrs
import pika
from pika import exceptions as amqp
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txthreatbus import logs
from txthreatbus.backbones.rabbitmq import batches

log = Logger(observer=logs.publisher)

#: AMQP messages sent but not yet confirmed, at most.
MAX_IN_FLIGHT = 1000
#: Bytes a held AMQP message takes besides its body, as ``buffer_bytes``
#: counts: its properties, uuid and bookkeeping (measured: about 420 bytes).
MESSAGE_OVERHEAD = 512
#: Seconds before re-sending messages that the broker refused (nack).
NACK_RETRY_DELAY = 1.0

_GONE = object()


@attrs.define(eq=False)
class Outgoing:
    """An AMQP message on its way to the broker: ``count`` bus messages."""

    exchange: str
    body: bytes
    count: int
    properties: pika.BasicProperties

    @property
    def size(self) -> int:
        """The bytes that holding it counts against ``buffer_bytes``."""
        return len(self.body) + MESSAGE_OVERHEAD


def _outgoing(exchange: str, bodies: List[bytes]) -> Outgoing:
    content_type, body = batches.pack(bodies)
    properties = pika.BasicProperties(
        content_type=content_type, delivery_mode=2, message_id=str(uuid.uuid4())
    )
    return Outgoing(exchange, body, len(bodies), properties)


class Outbox:
    """
    Messages for the broker, batched per turn, held until confirmed.

    @param clock: IReactorTime.
    @param buffer_bytes: what may be held at most.
    @param batch_bytes: the bodies one AMQP message carries at most; 0:
        one message each.
    @param metrics: the bus's Metrics (drops).
    @param throttle: a ``logs.Throttle`` for lines that repeat.
    @param broken: called with the reason when the channel failed under a
        publish (the service drops the connection).
    @param address: the broker, for log lines.
    """

    def __init__(self, clock, buffer_bytes: int, batch_bytes: int, metrics, throttle,
                 broken: Callable[[BaseException], None], address: str):
        self._clock = clock
        self._limit = buffer_bytes
        self._batch_bytes = batch_bytes
        self._metrics = metrics
        self._throttle = throttle
        self._broken = broken
        self._address = address
        #: This turn's bodies, by exchange, and their sizes.
        self._open: Dict[str, List[bytes]] = {}
        self._open_bytes: Dict[str, int] = {}
        self._seal_call = None
        #: AMQP messages not yet sent on the current channel, oldest first.
        self._waiting: deque = deque()
        #: Sent on the current channel and not yet confirmed, oldest first.
        self._unconfirmed: Dict[Outgoing, None] = {}
        #: Refused by the broker (nack), to be sent again after a pause.
        self._nacked: List[Outgoing] = []
        self._nack_retry = None
        #: The sizes of every AMQP message held (waiting, in flight, refused).
        self._held_bytes = 0
        self._channel = None
        self._drain_waiters: List[Deferred] = []

    # --- state

    @property
    def pending(self) -> int:
        """Bus messages not yet confirmed by the broker."""
        held = (self._waiting, self._unconfirmed, self._nacked)
        return sum(item.count for group in held for item in group) + sum(
            len(bodies) for bodies in self._open.values()
        )

    @property
    def pending_bytes(self) -> int:
        """What the messages counted by ``pending`` count against ``buffer_bytes``."""
        return self._held_bytes + sum(self._open_bytes.values())

    @property
    def empty(self) -> bool:
        return not (self._open or self._waiting or self._unconfirmed or self._nacked)

    # --- the service's side

    def add(self, exchange: str, body: bytes) -> None:
        """Send ``body`` to ``exchange``, with what else this turn sends there."""
        if not self._batch_bytes:
            self._hold(_outgoing(exchange, [body]))
            self._pump()
            return
        size = len(body)
        if exchange in self._open and self._open_bytes[exchange] + size > self._batch_bytes:
            self._seal(exchange)
        self._open.setdefault(exchange, []).append(body)
        self._open_bytes[exchange] = self._open_bytes.get(exchange, 0) + size
        if self._seal_call is None:
            self._seal_call = self._clock.callLater(0, self._end_of_turn)

    def connected(self, channel) -> None:
        """``channel`` (in confirm mode) is up: send what waits."""
        self._channel = channel
        self._unconfirmed = {}
        self._pump()

    def disconnected(self) -> None:
        """The channel is gone: what it did not confirm goes again on the next."""
        self._channel = None
        unconfirmed, self._unconfirmed = list(self._unconfirmed), {}
        self._waiting.extendleft(reversed(unconfirmed))
        self._check_drained()

    def drained(self) -> Deferred:
        """A Deferred that fires once the broker has confirmed all that is held."""
        d = Deferred()
        self._drain_waiters.append(d)
        self._end_of_turn()
        self._check_drained()
        return d

    def stop(self) -> int:
        """Forget what is held; the number of bus messages that were."""
        for call in (self._seal_call, self._nack_retry):
            if call is not None and call.active():
                call.cancel()
        self._seal_call = self._nack_retry = None
        lost = self.pending
        self._open, self._open_bytes = {}, {}
        self._waiting.clear()
        self._unconfirmed = {}
        self._nacked = []
        self._held_bytes = 0
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.callback(None)
        return lost

    # --- holding

    def _end_of_turn(self) -> None:
        if self._seal_call is not None and self._seal_call.active():
            self._seal_call.cancel()
        self._seal_call = None
        for exchange in list(self._open):
            self._seal(exchange)
        self._pump()

    def _seal(self, exchange: str) -> None:
        bodies = self._open.pop(exchange)
        del self._open_bytes[exchange]
        self._hold(_outgoing(exchange, bodies))

    def _hold(self, item: Outgoing) -> None:
        self._waiting.append(item)
        self._held_bytes += item.size
        if self._held_bytes > self._limit:
            self._overflow()

    def _overflow(self) -> None:
        """Drop the oldest messages not yet sent until what is held fits."""
        waiting = self._waiting
        dropped = 0
        # messages in flight stay (the broker has them): at worst the new one goes
        while self._held_bytes > self._limit and waiting:
            item = waiting.popleft()
            self._held_bytes -= item.size
            dropped += item.count
        self._metrics.drop("backbone_buffer_overflow", dropped)
        self._throttle(
            "buffer_overflow",
            log.warn,
            "The RabbitMQ backbone's buffer is full ({limit} bytes of messages that RabbitMQ at "
            "{address} has not confirmed): dropped the oldest {n}",
            limit=self._limit,
            address=self._address,
            n=dropped,
        )

    # --- sending and confirms

    def _pump(self) -> None:
        """Send what waits, as far as the window of unconfirmed messages allows."""
        channel = self._channel
        waiting, unconfirmed = self._waiting, self._unconfirmed
        while channel is not None and waiting and len(unconfirmed) < MAX_IN_FLIGHT:
            item = waiting.popleft()
            unconfirmed[item] = None
            try:
                d = channel.basic_publish(item.exchange, "", item.body, item.properties)
            except Exception as e:
                self._broken(e)  # calls disconnected(): item goes back first
                return
            d.addCallbacks(
                self._confirmed,
                self._not_confirmed,
                callbackArgs=(unconfirmed, item),
                errbackArgs=(unconfirmed, item),
            )
            d.addErrback(lambda f: log.failure("Handling a publisher confirm failed", f))
            channel = self._channel

    def _confirmed(self, _result, unconfirmed: dict, item: Outgoing) -> None:
        if unconfirmed.pop(item, _GONE) is _GONE:
            return  # of a channel gone: sent again already
        self._held_bytes -= item.size
        self._pump()
        self._check_drained()

    def _not_confirmed(self, failure, unconfirmed: dict, item: Outgoing) -> None:
        if not failure.check(amqp.NackError):
            if unconfirmed is self._unconfirmed:
                self._broken(failure.value)  # the channel is gone
            return
        if unconfirmed.pop(item, _GONE) is _GONE:
            return
        self._throttle(
            "nack", log.debug, "RabbitMQ refused (nack) message {id}", id=item.properties.message_id
        )
        self._nacked.append(item)
        if self._nack_retry is None:
            self._nack_retry = self._clock.callLater(NACK_RETRY_DELAY, self._resend_nacked)

    def _resend_nacked(self) -> None:
        self._nack_retry = None
        nacked, self._nacked = self._nacked, []
        self._throttle(
            "nack_resend",
            log.warn,
            "RabbitMQ at {address} refused {n} messages (nack): sending them again",
            address=self._address,
            n=sum(item.count for item in nacked),
        )
        self._waiting.extendleft(reversed(nacked))
        self._pump()

    def _check_drained(self) -> None:
        if self._drain_waiters and self.empty:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)
