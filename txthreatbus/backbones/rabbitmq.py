"""
The RabbitMQ backbone: several txthreatbus instances share one bus through a
RabbitMQ broker, in the layout of Threat Bus 2020.11.26's RabbitMQ backbone.

Layout: one fanout exchange per message type (``threatbus.intel``,
``threatbus.sighting``, ``threatbus.snapshotrequest``,
``threatbus.snapshotenvelope``), declared as Threat Bus declares them
(transient, redeclared on every connect), and one queue per instance and
type, ``threatbus.<type>.<name_suffix or hostname>``, bound to its exchange;
names are joined with ``naming_join_pattern``. Bodies are the JSON of
docs/protocol.md. Every instance, this one included, takes what it publishes back
from its own queues: local traffic goes through the broker, never also
straight to the local bus.

Durability: messages are persistent (delivery mode 2), each with a uuid4
``message_id``, published on a channel in confirm mode. A message stays ours
until the broker confirms it, and what was sent but not confirmed when the
connection dropped is sent again after reconnecting. What we hold (waiting
for a connection, in flight, refused and waiting to go again) is bounded in
bytes, ``buffer_bytes``: each message counts its JSON body plus
``MESSAGE_OVERHEAD``; past the bound the oldest messages not yet sent are
dropped, counted.
The consumer takes at most ``prefetch`` messages at a time and acks each one
after the bus has taken it (``deliver(message)`` returned). A message that
comes again (a re-send after a lost confirm, a redelivery after a lost ack)
is recognised by its ``message_id`` within the last ``dedup_window`` ids,
acked and dropped.

Logs: every line that the broker or a peer publishing through it can repeat
at will (a bad message, a lost connection, a refusal) goes through a
``logs.Throttle``: one line per kind every 10 s, the next one counting the
rest.

Start-up: if the very first connection fails (broker unreachable, refused
credentials or vhost, queues declared with other options), the backbone logs
one critical line saying why and calls ``on_fatal`` (by default: stop the
reactor, so that ``twistd`` exits instead of running a bus that carries
nothing). Once it has been up, losing the broker means reconnecting with
exponential backoff (up to ``reconnect_max_delay``) for as long as it runs.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections import OrderedDict, deque
from typing import Callable, Dict, List, Optional, Tuple

import attrs
import pika
from pika import exceptions as amqp
from pika import spec
from pika.adapters.twisted_connection import TwistedProtocolConnection
from pika.exchange_type import ExchangeType
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txthreatbus import codec, logs
from txthreatbus.config import QueueConfig, RabbitMQConfig
from txthreatbus.interfaces import IBackbone
from txthreatbus.model import CLASSES

log = Logger(observer=logs.publisher)

#: The type name of each message class: each type has its exchange and queue.
TYPES = {cls: cls.kind for cls in CLASSES}
#: The bus topic of each type name.
TOPICS = {kind: cls.topic for cls, kind in TYPES.items()}

#: The ``backbone`` label of our metrics.
LABEL = "rabbitmq"
#: Seconds a connection attempt (TCP, AMQP handshake, declarations) may take.
CONNECT_TIMEOUT = 15.0
#: Seconds before the first reconnection attempt; each next one waits twice
#: as long, up to ``reconnect_max_delay``.
FIRST_RETRY_DELAY = 0.25
#: Messages sent but not yet confirmed, at most (their bytes count against
#: ``buffer_bytes`` like the rest).
MAX_IN_FLIGHT = 1000
#: Bytes a held message takes besides its body, as ``buffer_bytes`` counts:
#: its properties, uuid and bookkeeping (measured: about 420 bytes).
MESSAGE_OVERHEAD = 512
#: Seconds before re-sending messages that the broker refused (nack).
NACK_RETRY_DELAY = 1.0
#: Seconds that stopping waits for the broker to confirm what we hold.
DRAIN_TIMEOUT = 5.0
#: Seconds that stopping waits for the connection to close cleanly.
CLOSE_TIMEOUT = 5.0

_GONE = object()


# --- names, as Threat Bus 2020.11.26 makes them


def exchange_name(join: str, kind: str) -> str:
    """The fanout exchange of message type ``kind`` (``intel``, ...)."""
    return join.join(("threatbus", kind))


def queue_name(join: str, kind: str, suffix: str) -> str:
    """The queue of one instance (``suffix``) for message type ``kind``."""
    return join.join(("threatbus", kind, suffix))


def queue_arguments(queue: QueueConfig) -> dict:
    """The ``x-`` arguments that declare a queue with the options of ``queue``."""
    arguments = {"x-queue-mode": "lazy" if queue.lazy else "default"}
    if queue.max_items > 0:
        arguments["x-max-length"] = queue.max_items
    return arguments


def address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- parts


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


@attrs.define(eq=False)
class _Outgoing:
    """A message on its way to the broker."""

    exchange: str
    body: bytes
    properties: pika.BasicProperties

    @property
    def size(self) -> int:
        """The bytes that holding it counts against ``buffer_bytes``."""
        return len(self.body) + MESSAGE_OVERHEAD


@attrs.define(eq=False)
class _Session:
    """One open connection: its channels, consumers and unconfirmed messages."""

    connection: object  # _Connection
    publisher: object  # TwistedChannel in confirm mode
    channels: Tuple[object, ...]  # every channel, watched for closing
    consumers: List[Tuple[str, object]]  # (type name, ClosableDeferredQueue)
    #: Sent and not yet confirmed, oldest first.
    unconfirmed: Dict[_Outgoing, None] = attrs.field(factory=dict)
    lost: bool = False


class _Connection(TwistedProtocolConnection):
    """
    pika's Twisted protocol, also telling why the broker refused to open the
    connection, and when the TCP connection is gone.
    """

    def __init__(self, parameters, clock):
        super().__init__(parameters, custom_reactor=clock)
        self.is_lost = False
        self.refusal: Optional[Exception] = None
        self._lost_reason: Optional[Exception] = None
        #: Deferreds waiting for connectionLost; None once it happened.
        self._lost_waiters: Optional[List[Deferred]] = []
        # The broker says why it refuses a connection (credentials, vhost) in
        # Connection.Close; pika 1.x reports only that the connection is done.
        self._impl.callbacks.add(0, spec.Connection.Close, self._on_close_frame, one_shot=True)

    def _on_close_frame(self, frame):
        method = frame.method
        self.refusal = amqp.ConnectionClosedByBroker(method.reply_code, method.reply_text)

    def _on_connection_failed(self, _connection, error=None):
        d, self.ready = self.ready, None
        if d is not None:
            if self.refusal is not None:
                error = self.refusal
            elif not isinstance(error, Exception):
                error = amqp.AMQPConnectionError(error)
            d.errback(error)

    def connectionLost(self, reason=connectionDone):
        self.is_lost = True
        self._lost_reason = reason.value
        try:
            super().connectionLost(reason)
        finally:
            waiters, self._lost_waiters = self._lost_waiters, None
            for d in waiters:
                d.callback(self._lost_reason)

    def when_lost(self) -> Deferred:
        """A new Deferred that fires with the reason when the connection is gone."""
        if self._lost_waiters is None:
            return succeed(self._lost_reason)
        d = Deferred()
        self._lost_waiters.append(d)
        return d


def _describe(e: BaseException) -> str:
    """A short account of exception ``e``."""
    if isinstance(e, (amqp.ConnectionClosed, amqp.ChannelClosed)):
        return f"{e.reply_code} {e.reply_text}"
    text = str(e).strip().rstrip(".")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def diagnose(failure: Failure, config: RabbitMQConfig) -> str:
    """Why connecting to the broker of ``config`` failed, in one line."""
    e = failure.value
    where = address(config.host, config.port)
    if isinstance(e, amqp.ConnectionClosedByBroker):
        if e.reply_code == 403:
            return f"RabbitMQ at {where} refused the credentials for user {config.username!r}"
        if e.reply_code == 530:
            return (
                f"RabbitMQ at {where} refused user {config.username!r} access to vhost "
                f"{config.vhost!r} ({e.reply_text})"
            )
        return f"RabbitMQ at {where} closed the connection: {_describe(e)}"
    if isinstance(e, amqp.ChannelClosedByBroker):
        return f"RabbitMQ at {where} refused to set up the exchanges and queues: {_describe(e)}"
    if isinstance(e, defer.TimeoutError):
        return f"RabbitMQ at {where} did not answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(e, neterror.ConnectError):
        return f"cannot reach RabbitMQ at {where}: " + str(e).strip().rstrip(".")
    if isinstance(e, (neterror.ConnectionDone, neterror.ConnectionLost, amqp.AMQPConnectionError)):
        return f"RabbitMQ at {where} closed the connection while opening it ({_describe(e)})"
    return f"cannot connect to RabbitMQ at {where}: {_describe(e)}"


def _follow(source: Deferred) -> Deferred:
    """A new Deferred that fires with None when ``source`` fires."""
    d = Deferred()

    def fire(result):
        d.callback(None)
        return result

    source.addBoth(fire)
    return d


# --- the backbone


@implementer(IBackbone)
class RabbitMQBackbone(Service):
    """
    Carries messages between instances through RabbitMQ.

    @param config: the ``plugins.backbones.rabbitmq`` section.
    @param metrics: the bus's ``Metrics``.
    @param clock: the reactor (TCP and time).
    @param on_fatal: called with the Failure if the very first connection
        fails; by default stops the reactor.
    """

    name = "backbone"
    #: Seconds of handling messages after which consuming lets the reactor
    #: run: what pika hands over in one read (up to ``prefetch`` messages)
    #: cannot hold it, however costly the messages are to check.
    batch_seconds = 0.02
    #: The clock of ``batch_seconds``.
    now = staticmethod(time.monotonic)

    def __init__(
        self,
        config: RabbitMQConfig,
        metrics,
        clock,
        on_fatal: Optional[Callable[[Failure], None]] = None,
    ):
        self.config = config
        self.metrics = metrics
        self._clock = clock
        self._on_fatal = on_fatal if on_fatal is not None else self._stop_reactor
        join = config.naming_join_pattern
        suffix = config.queue.name_suffix or socket.gethostname()
        self.exchanges = {kind: exchange_name(join, kind) for kind in TYPES.values()}
        self.queues = {kind: queue_name(join, kind, suffix) for kind in TYPES.values()}
        self.queue_arguments = queue_arguments(config.queue)
        self.address = address(config.host, config.port)
        self._parameters = pika.ConnectionParameters(
            host=config.host,
            port=config.port,
            virtual_host=config.vhost,
            credentials=pika.PlainCredentials(config.username, config.password),
            client_properties={"connection_name": f"txthreatbus {suffix}"},
        )
        self._published = metrics.backbone_published.labels(LABEL)
        self._consumed = metrics.backbone_consumed.labels(LABEL)
        self._reconnects = metrics.backbone_reconnects.labels(LABEL)
        self._first_delay = min(FIRST_RETRY_DELAY, config.reconnect_max_delay)
        self._dedup = DedupWindow(config.dedup_window)
        self._deliver = None
        self._throttle = logs.Throttle(clock)
        #: Messages not yet sent on the current connection, oldest first.
        self._waiting: deque = deque()
        #: The sizes of every message held (waiting, in flight, nacked).
        self._held_bytes = 0
        self._pumping = False
        #: Messages the broker refused (nack), to be sent again after a pause.
        self._nacked: List[_Outgoing] = []
        self._session: Optional[_Session] = None
        self._attempt: Optional[Deferred] = None
        self._retry = None
        self._nack_retry = None
        self._drain_waiters: List[Deferred] = []
        self._delay = self._first_delay
        self._was_up = False
        self._stopping = False
        self._stopped: Optional[Deferred] = None
        #: When consuming may begin (``resubscribe_grace`` after start).
        self._consume_from = 0.0

    # --- state, for operators and tests

    @property
    def connected(self) -> bool:
        """Whether a connection to the broker is open and set up."""
        return self._session is not None

    @property
    def pending(self) -> int:
        """Messages published here that the broker has not confirmed yet."""
        session = self._session
        unconfirmed = len(session.unconfirmed) if session is not None else 0
        return len(self._waiting) + len(self._nacked) + unconfirmed

    @property
    def pending_bytes(self) -> int:
        """What the messages counted by ``pending`` count against ``buffer_bytes``."""
        return self._held_bytes

    # --- IBackbone

    def attach(self, deliver) -> None:
        self._deliver = deliver

    def publish(self, message) -> None:
        kind = TYPES.get(type(message))
        if kind is None:
            raise TypeError(f"not a message: {message!r}")
        if self._stopping:
            self.metrics.drop("backbone_stopped")
            self._throttle(
                "stopped",
                log.debug,
                "Dropped a {kind} published after the RabbitMQ backbone stopped",
                kind=kind,
            )
            return
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=str(uuid.uuid4()),
        )
        self._hold(_Outgoing(self.exchanges[kind], codec.encode(message), properties))
        self._published.inc()
        self._pump()

    # --- outgoing

    def _hold(self, item: _Outgoing) -> None:
        """Keep ``item`` until the broker confirms it, within ``buffer_bytes``."""
        self._waiting.append(item)
        self._held_bytes += item.size
        if self._held_bytes > self.config.buffer_bytes:
            self._overflow()

    def _requeue(self, items: List[_Outgoing]) -> None:
        """Put ``items`` (oldest first, already held) back before everything waiting."""
        self._waiting.extendleft(reversed(items))

    def _overflow(self) -> None:
        """Drop the oldest messages not yet sent until what we hold fits ``buffer_bytes``."""
        waiting, limit = self._waiting, self.config.buffer_bytes
        dropped = 0
        # messages in flight stay (the broker has them): at worst the new one goes
        while self._held_bytes > limit and waiting:
            self._held_bytes -= waiting.popleft().size
            dropped += 1
        self.metrics.drop("backbone_buffer_overflow", dropped)
        self._throttle(
            "buffer_overflow",
            log.warn,
            "The RabbitMQ backbone's buffer is full ({limit} bytes of messages that RabbitMQ at "
            "{address} has not confirmed): dropped the oldest {n}",
            limit=limit,
            address=self.address,
            n=dropped,
        )

    def _pump(self) -> None:
        """Send what waits, as far as the window of unconfirmed messages allows."""
        session = self._session
        if session is None or self._pumping:
            return
        self._pumping = True
        try:
            waiting, unconfirmed = self._waiting, session.unconfirmed
            while waiting and len(unconfirmed) < MAX_IN_FLIGHT and not session.lost:
                item = waiting.popleft()
                unconfirmed[item] = None
                try:
                    d = session.publisher.basic_publish(
                        item.exchange, "", item.body, item.properties
                    )
                except Exception as e:
                    self._lose(session, e)
                    break
                d.addCallbacks(
                    self._confirmed,
                    self._not_confirmed,
                    callbackArgs=(session, item),
                    errbackArgs=(session, item),
                )
                d.addErrback(self._bug, "handling a publisher confirm")
        finally:
            self._pumping = False

    def _confirmed(self, _result, session: _Session, item: _Outgoing) -> None:
        if session.unconfirmed.pop(item, _GONE) is _GONE:
            return
        self._held_bytes -= item.size
        if self._waiting:
            self._pump()
        self._check_drained()

    def _not_confirmed(self, failure: Failure, session: _Session, item: _Outgoing) -> None:
        if not failure.check(amqp.NackError):
            # the channel or connection is gone: everything unconfirmed goes again
            self._lose(session, failure.value)
            return
        if session.unconfirmed.pop(item, _GONE) is _GONE:
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
            address=self.address,
            n=len(nacked),
        )
        self._requeue(nacked)
        self._pump()

    def _check_drained(self) -> None:
        if not self._drain_waiters:
            return
        session = self._session
        if session is None or not (self._waiting or self._nacked or session.unconfirmed):
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    # --- incoming

    async def _consume(self, session: _Session, kind: str, queue) -> None:
        topic = TOPICS[kind]
        # What pika holds meanwhile stays unacknowledged: the broker's to
        # give again if the connection drops.
        grace = self._consume_from - self._clock.seconds()
        if grace > 0:
            await deferLater(self._clock, grace, lambda: None)
            if session.lost or self._stopping:
                return
        spent = 0.0
        while True:
            received = await queue.get()
            started = self.now()
            self._received(session, topic, kind, received)
            spent += self.now() - started
            if spent > self.batch_seconds:
                spent = 0.0
                await deferLater(self._clock, 0, lambda: None)

    def _received(self, session: _Session, topic: str, kind: str, received) -> None:
        """Hand one message from the broker to the bus, then ack it."""
        if session.lost or self._stopping:
            return  # not acked: the broker gives it to us again, or to the next run
        message_id = received.properties.message_id
        if message_id is not None and self._dedup.seen(message_id):
            self.metrics.drop("backbone_duplicate")
            self._throttle(
                "duplicate",
                log.debug,
                "Dropped a repeat of message {id} from RabbitMQ",
                id=message_id,
            )
        else:
            try:
                message = codec.decode(topic, received.body)
            except codec.DecodeError as e:
                # backbone_malformed, backbone_duplicate_key, backbone_too_deep
                reason = "backbone_" + (getattr(e, "reason", None) or "malformed")
                self.metrics.drop(reason)
                self._throttle(
                    reason,
                    log.warn,
                    "Dropped a malformed {kind} from RabbitMQ queue {queue}: {error}",
                    kind=kind,
                    queue=self.queues[kind],
                    error=str(e)[:200],  # it may quote the input
                )
            else:
                self._consumed.inc()
                try:
                    self._deliver(message)
                except Exception:
                    self._throttle(
                        "bus_failure",
                        log.failure,
                        "The bus failed to take a {kind} from RabbitMQ",
                        kind=kind,
                    )
        try:
            received.channel.basic_ack(delivery_tag=received.method.delivery_tag)
        except Exception as e:
            # The channel closed under us: the broker redelivers, dedup drops it.
            self._throttle("ack", log.debug, "Could not ack a message: {e}", e=_describe(e))

    def _consumer_ended(self, failure: Failure, session: _Session) -> None:
        if not (session.lost or self._stopping):
            self._lose(session, failure.value)

    # --- connecting

    def _connect(self) -> None:
        self._retry = None
        attempt = self._attempt = ensureDeferred(self._open())
        attempt.addTimeout(CONNECT_TIMEOUT, self._clock)
        attempt.addCallbacks(self._opened, self._open_failed)
        attempt.addErrback(self._bug, "connecting")

    async def _open(self) -> _Session:
        """Connect, declare the exchanges and queues, and start consuming."""
        config = self.config
        connection = _Connection(self._parameters, self._clock)
        endpoint = HostnameEndpoint(self._clock, config.host, config.port, timeout=CONNECT_TIMEOUT)
        await connectProtocol(endpoint, connection)
        try:
            await connection.ready
            publisher = await connection.channel()
            await publisher.confirm_delivery()
            consumer = await connection.channel()
            await consumer.basic_qos(prefetch_count=config.prefetch)
            queue = config.queue
            for kind in TYPES.values():
                # transient, as Threat Bus declares them: both can share them
                await consumer.exchange_declare(
                    exchange=self.exchanges[kind], exchange_type=ExchangeType.fanout, durable=False
                )
                await consumer.queue_declare(
                    queue=self.queues[kind],
                    durable=queue.durable,
                    exclusive=queue.exclusive,
                    auto_delete=queue.auto_delete,
                    arguments=self.queue_arguments,
                )
                await consumer.queue_bind(queue=self.queues[kind], exchange=self.exchanges[kind])
            consumers = []
            for kind in TYPES.values():
                messages, _tag = await consumer.basic_consume(queue=self.queues[kind])
                consumers.append((kind, messages))
        except Exception:
            if not connection.is_lost:
                connection.transport.abortConnection()
            await connection.when_lost()
            raise
        return _Session(connection, publisher, (publisher, consumer), consumers)

    def _opened(self, session: _Session):
        self._attempt = None
        if self._stopping:
            return ensureDeferred(self._close(session))
        self._session = session
        self._delay = self._first_delay
        if self._was_up:
            self._reconnects.inc()
            self._throttle(
                "reconnected",
                log.info,
                "Reconnected to RabbitMQ at {address}; sending {n} waiting messages",
                address=self.address,
                n=len(self._waiting),
            )
        else:
            self._was_up = True
            log.info(
                "Connected to RabbitMQ at {address} (vhost {vhost}); consuming from {queues}"
                "{grace}",
                address=self.address,
                vhost=self.config.vhost,
                queues=", ".join(self.queues.values()),
                grace=(
                    f" in {self.config.resubscribe_grace:g} s, once apps have had the time to subscribe again"
                    if self.config.resubscribe_grace
                    else ""
                ),
            )
        watched = [session.connection.when_lost()] + [c.on_closed for c in session.channels]
        for d in watched:
            d.addCallback(lambda reason: self._lose(session, reason))
            d.addErrback(self._bug, "handling a lost connection")
        for kind, messages in session.consumers:
            d = ensureDeferred(self._consume(session, kind, messages))
            d.addErrback(self._consumer_ended, session)
            d.addErrback(self._bug, "consuming")
        self._pump()
        return None

    def _open_failed(self, failure: Failure) -> None:
        self._attempt = None
        if self._stopping:
            log.debug("Connecting to RabbitMQ ended by stopping: {e}", e=_describe(failure.value))
            return
        reason = diagnose(failure, self.config)
        if not self._was_up and self.config.wait_for_broker:
            # each try logged: nothing works until the broker is there
            log.warn(
                "{reason}; waiting for the broker (wait_for_broker), next try in {delay:g} s",
                reason=reason,
                delay=self._schedule_reconnect(),
            )
            return
        if not self._was_up:
            log.critical(
                "{reason}; stopping, as the RabbitMQ backbone cannot work without its broker "
                "(see plugins.backbones.rabbitmq)",
                reason=reason,
            )
            try:
                self._on_fatal(failure)
            except Exception:
                log.failure("Stopping after a failed start of the RabbitMQ backbone failed")
            return
        delay = self._schedule_reconnect()
        self._throttle(
            "reconnect_failed",
            log.warn,
            "{reason}; next try in {delay:g} s",
            reason=reason,
            delay=delay,
        )

    def _schedule_reconnect(self) -> float:
        delay = self._delay
        self._delay = min(delay * 2, self.config.reconnect_max_delay)
        if self._retry is None and self._attempt is None:
            self._retry = self._clock.callLater(delay, self._connect)
        return delay

    def _lose(self, session: _Session, reason) -> None:
        """``session`` is gone or broken: keep its messages, and reconnect."""
        if session.lost:
            return
        session.lost = True
        if self._session is session:
            self._session = None
        unconfirmed = list(session.unconfirmed)
        session.unconfirmed.clear()
        self._requeue(unconfirmed)
        connection = session.connection
        if not connection.is_lost:
            connection.transport.abortConnection()
        if self._stopping:
            self._check_drained()
            return
        delay = self._schedule_reconnect()
        self._throttle(
            "lost",
            log.warn,
            "Lost the connection to RabbitMQ at {address} ({reason}); {n} outgoing messages "
            "wait in the buffer; reconnecting in {delay:g} s",
            address=self.address,
            reason=_describe(reason) if isinstance(reason, BaseException) else reason,
            n=len(self._waiting),
            delay=delay,
        )

    async def _close(self, session: _Session) -> None:
        session.lost = True
        if self._session is session:
            self._session = None
        self._requeue(list(session.unconfirmed))
        session.unconfirmed.clear()
        connection = session.connection
        if connection.is_lost:
            return
        try:
            connection.close()
        except Exception:
            connection.transport.abortConnection()
        closed = connection.when_lost()
        closed.addTimeout(CLOSE_TIMEOUT, self._clock)
        try:
            await closed
        except defer.TimeoutError:
            log.warn(
                "RabbitMQ at {address} did not close the connection in time: aborting it",
                address=self.address,
            )
            connection.transport.abortConnection()
            await connection.when_lost()

    def _stop_reactor(self, failure: Failure) -> None:
        try:
            self._clock.stop()
        except neterror.ReactorNotRunning:
            pass

    def _bug(self, failure: Failure, what: str) -> None:
        self._throttle(
            ("bug", what),
            log.failure,
            "RabbitMQ backbone: unexpected error {what}",
            failure=failure,
            what=what,
        )

    # --- lifecycle

    def startService(self):
        if self.running:  # started already: one connection
            return
        if self._deliver is None:
            raise RuntimeError("the RabbitMQ backbone needs attach(deliver) before it starts")
        super().startService()
        self._stopping = False
        self._stopped = None
        self._was_up = False
        self._consume_from = self._clock.seconds() + self.config.resubscribe_grace
        self._delay = self._first_delay
        log.info(
            "Connecting to RabbitMQ at {address} (vhost {vhost}) as {username}",
            address=self.address,
            vhost=self.config.vhost,
            username=self.config.username,
        )
        self._connect()

    def stopService(self):
        """Send what waits (for a few seconds), close the connection; safe to call twice."""
        if self._stopped is None:
            super().stopService()
            self._stopping = True
            self._stopped = ensureDeferred(self._shutdown())
            self._stopped.addErrback(self._bug, "stopping")
        return _follow(self._stopped)

    def _cancel_timers(self) -> None:
        for timer in (self._retry, self._nack_retry):
            if timer is not None and timer.active():
                timer.cancel()
        self._retry = self._nack_retry = None
        nacked, self._nacked = self._nacked, []
        self._requeue(nacked)

    async def _shutdown(self) -> None:
        self._cancel_timers()
        attempt = self._attempt
        if attempt is not None:
            attempt.cancel()
            await _follow(attempt)
        session = self._session
        if session is not None:
            if self._waiting or session.unconfirmed:
                waiter = Deferred()
                self._drain_waiters.append(waiter)
                self._pump()
                self._check_drained()
                waiter.addTimeout(DRAIN_TIMEOUT, self._clock)
                try:
                    await waiter
                except defer.TimeoutError:
                    pass
                self._drain_waiters = []
            await self._close(session)
        self._cancel_timers()  # a nack while draining
        unsent = len(self._waiting)
        self._waiting.clear()
        self._held_bytes = 0
        if unsent:
            self.metrics.drop("backbone_unsent", unsent)
            log.warn(
                "The RabbitMQ backbone stopped with {n} messages that RabbitMQ at {address} "
                "has not confirmed: they are lost",
                n=unsent,
                address=self.address,
            )
        log.info("RabbitMQ backbone stopped")
