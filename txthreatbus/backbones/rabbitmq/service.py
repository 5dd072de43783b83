"""
The RabbitMQ backbone as a service: Twisted's ``ClientService`` keeps one
connection to the broker (reconnecting with ``backoffPolicy`` up to
``reconnect_max_delay``); ``prepareConnection`` opens the channels and
declares the topology, so an attempt counts as made only once all of it
worked; the outbox sends on the new connection, and the inbox consumes from
it once ``resubscribe_grace`` after start has passed.

Start-up: if the very first attempt fails (broker unreachable, refused
credentials, vhost or certificate, queues declared with other options), the
backbone logs one critical line saying why, fails ``whenReady()`` and calls
``on_fatal`` with the failure (twistd then exits with status 1; an embedding
application decides). With ``wait_for_broker``, it keeps trying instead,
each try logged. Once it has been up, losing the broker means reconnecting
for as long as it runs.

Logs: every line that the broker or a peer can repeat at will goes through
a ``logs.Throttle``: one line per kind every 10 s, the next one counting the
rest.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txthreatbus import codec, logs
from txthreatbus.backbones.rabbitmq.connection import (
    CONNECT_TIMEOUT,
    Connector,
    GatedEndpoint,
    connector as default_connector,
)
from txthreatbus.backbones.rabbitmq.diagnosis import address, describe, diagnose
from txthreatbus.backbones.rabbitmq.incoming import Inbox
from txthreatbus.backbones.rabbitmq.outgoing import Outbox
from txthreatbus.backbones.rabbitmq.topology import TYPES, Topology
from txthreatbus.config import RabbitMQConfig
from txthreatbus.interfaces import IBackbone

log = Logger(observer=logs.publisher)

#: The ``backbone`` label of our metrics.
LABEL = "rabbitmq"
#: Seconds before the first reconnection attempt; each next one waits twice
#: as long (plus up to a second of jitter), up to ``reconnect_max_delay``.
FIRST_RETRY_DELAY = 0.25
#: Seconds that stopping waits for the broker to confirm what is held, and
#: then for the connection to close: together within the 5 s that stopping
#: the bus may take, whatever the broker does.
DRAIN_TIMEOUT = 2.5
CLOSE_TIMEOUT = 1.5


@attrs.define(eq=False)
class _Session:
    """One prepared connection and its channels."""

    connection: object  # connection.Connection
    publisher: object  # TwistedChannel in confirm mode
    consumer: object  # TwistedChannel with the topology declared
    lost: bool = False
    #: The start of consuming, while it waits for the grace period to end.
    consuming: Optional[object] = None  # IDelayedCall


def _follow(source: Deferred) -> Deferred:
    """A new Deferred that fires with None when ``source`` fires."""
    d = Deferred()

    def fire(result):
        d.callback(None)
        return result

    source.addBoth(fire)
    return d


@implementer(IBackbone)
class RabbitMQBackbone(Service):
    """
    Carries messages between instances through RabbitMQ.

    @param config: the ``plugins.backbones.rabbitmq`` section.
    @param metrics: the bus's ``Metrics``.
    @param clock: the reactor (TCP and time).
    @param on_fatal: called with the Failure if the very first connection
        fails (not with ``wait_for_broker``).
    @param connector: how to reach the broker; by default as ``config``
        says (tests give a fake).
    """

    name = "backbone"

    def __init__(self, config: RabbitMQConfig, metrics, clock,
                 on_fatal: Optional[Callable[[Failure], None]] = None,
                 connector: Optional[Connector] = None):
        self.config = config
        self.metrics = metrics
        self._clock = clock
        self._on_fatal = on_fatal
        self.topology = Topology.of(config)
        self.address = address(config.host, config.port)
        self._throttle = logs.Throttle(clock)
        self._published = metrics.backbone_published.labels(LABEL)
        self._reconnects = metrics.backbone_reconnects.labels(LABEL)
        self._outbox = Outbox(
            clock, config.buffer_bytes, config.batch_bytes, metrics, self._throttle,
            self._broken, self.address,
        )
        self._inbox: Optional[Inbox] = None
        connector = connector or default_connector(config, clock)
        factory = _ProtocolFactory(connector.protocol)
        # ClientService counts from 1: the first retry waits initialDelay * factor
        self._backoff = backoffPolicy(
            initialDelay=min(FIRST_RETRY_DELAY, config.reconnect_max_delay) / 2,
            factor=2,
            maxDelay=config.reconnect_max_delay,
        )
        self._endpoint = GatedEndpoint(connector.endpoint, self._could_not_connect)
        self._client = ClientService(
            self._endpoint,
            factory,
            retryPolicy=self._retry_delay,
            clock=clock,
            prepareConnection=self._prepare,
        )
        self._session: Optional[_Session] = None
        #: Why the last attempt failed or the last connection ended.
        self._why: Optional[str] = None
        self._was_up = False
        self._failed: Optional[Failure] = None
        self._ready_waiters: List[Deferred] = []
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
        return self._outbox.pending

    @property
    def pending_bytes(self) -> int:
        """What the messages counted by ``pending`` count against ``buffer_bytes``."""
        return self._outbox.pending_bytes

    def status(self) -> dict:
        """What the status page shows of the backbone (nothing secret: no credentials)."""
        return {
            "kind": "rabbitmq",
            "connected": self.connected,
            "address": self.address,
            "vhost": self.config.vhost,
            "pending_messages": self.pending,
            "pending_bytes": self.pending_bytes,
        }

    def whenReady(self) -> Deferred:
        """Fires once the first connection is up; fails if it never will (see on_fatal)."""
        if self._failed is not None:
            return fail(self._failed)
        if self._was_up:
            return succeed(None)
        d = Deferred()
        self._ready_waiters.append(d)
        return d

    # --- IBackbone

    def attach(self, deliver) -> None:
        self._inbox = Inbox(
            deliver,
            self.topology.queues,
            self.config.dedup_window,
            self.metrics,
            self.metrics.backbone_consumed.labels(LABEL),
            self._throttle,
            self._clock,
        )

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
        self._outbox.add(self.topology.exchanges[kind], codec.encode(message))
        self._published.inc()

    # --- connecting (ClientService's prepareConnection)

    def _prepare(self, connection) -> Deferred:
        d = ensureDeferred(self._open(connection))
        d.addTimeout(CONNECT_TIMEOUT, self._clock)
        d.addCallbacks(
            self._up, self._attempt_failed, callbackArgs=(connection,), errbackArgs=(connection,)
        )
        return d

    async def _open(self, connection) -> _Session:
        """The AMQP handshake, the channels, the topology."""
        await connection.ready
        publisher = await connection.channel()
        await publisher.confirm_delivery()
        consumer = await connection.channel()
        await consumer.basic_qos(prefetch_count=self.config.prefetch)
        await self.topology.declare(consumer)
        return _Session(connection, publisher, consumer)

    def _attempt_failed(self, failure: Failure, connection) -> Failure:
        connection.abort()
        if not failure.check(CancelledError):
            self._why = diagnose(failure, self.config)
        return failure

    def _could_not_connect(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self._why = diagnose(failure, self.config)

    def _retry_delay(self, attempt: int) -> float:
        """ClientService's retry policy: the backoff, and a line saying why."""
        delay = self._backoff(attempt)
        if self._stopping or self._failed is not None:
            return delay
        if not self._was_up:
            # each try logged: nothing works until the broker is there
            log.warn(
                "{reason}; waiting for the broker (wait_for_broker), next try in {delay:.1f} s",
                reason=self._why,
                delay=delay,
            )
        else:
            self._throttle(
                "reconnect", log.warn, "{reason}; next try in {delay:.1f} s", reason=self._why, delay=delay
            )
        return delay

    def _up(self, session: _Session, connection) -> None:
        self._endpoint.prepared(connection)
        if self._stopping:
            return
        self._session = session
        self._why = None
        if self._was_up:
            self._reconnects.inc()
            self._throttle(
                "reconnected",
                log.info,
                "Reconnected to RabbitMQ at {address}; sending {n} waiting messages",
                address=self.address,
                n=self._outbox.pending,
            )
        else:
            self._was_up = True
            grace = self.config.resubscribe_grace
            log.info(
                "Connected to RabbitMQ at {address} (vhost {vhost}); consuming from {queues}{grace}",
                address=self.address,
                vhost=self.config.vhost,
                queues=", ".join(self.topology.queues.values()),
                grace=f" in {grace:g} s, once apps have had the time to subscribe again" if grace else "",
            )
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(None)
        watched = [session.connection.when_lost(), session.publisher.on_closed, session.consumer.on_closed]
        for d in watched:
            d.addCallback(lambda reason: self._down(session, reason))
            d.addErrback(self._bug, "handling a lost connection")
        self._outbox.connected(session.publisher)
        wait = max(0.0, self._consume_from - self._clock.seconds())
        session.consuming = self._clock.callLater(wait, self._consume, session)

    def _consume(self, session: _Session) -> None:
        """Consume from every queue (what waited meanwhile stayed the broker's)."""
        session.consuming = None
        self._watch(ensureDeferred(self._start_consumers(session)), session)

    async def _start_consumers(self, session: _Session) -> None:
        alive = lambda: not (session.lost or self._stopping)  # noqa: E731
        for kind, queue in self.topology.queues.items():
            if not alive():
                return
            messages, _tag = await session.consumer.basic_consume(queue=queue)
            self._watch(ensureDeferred(self._inbox.consume(kind, messages, alive)), session)

    def _watch(self, consuming: Deferred, session: _Session) -> None:
        """A failure of ``consuming`` breaks ``session`` (unless it is over anyway)."""
        consuming.addErrback(self._consuming_failed, session)
        consuming.addErrback(self._bug, "consuming")

    def _consuming_failed(self, failure: Failure, session: _Session) -> None:
        if not (session.lost or self._stopping):
            self._down(session, failure.value)

    def _broken(self, reason) -> None:
        """The channel failed under a publish: drop the connection."""
        if self._session is not None:
            self._down(self._session, reason)

    def _down(self, session: _Session, reason) -> None:
        """``session`` is gone or broken: its unconfirmed messages go again on the next."""
        if session.lost:
            return
        self._forget(session)
        session.connection.abort()  # ClientService reconnects once it is lost
        if not self._stopping:
            self._why = (
                f"Lost the connection to RabbitMQ at {self.address} "
                f"({describe(reason) if isinstance(reason, BaseException) else reason}); "
                f"{self._outbox.pending} outgoing messages wait in the buffer"
            )

    def _forget(self, session: _Session) -> None:
        session.lost = True
        if self._session is session:
            self._session = None
            self._outbox.disconnected()
        if session.consuming is not None and session.consuming.active():
            session.consuming.cancel()
        session.consuming = None

    # --- the first connection

    def _first_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or self._stopping:
            return  # stopped before it connected
        self._failed = failure
        log.critical(
            "{reason}; the RabbitMQ backbone cannot work without its broker "
            "(see plugins.backbones.rabbitmq; wait_for_broker: true waits for it)",
            reason=diagnose(failure, self.config),
        )
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(failure)
        # not from within ClientService's transition that reported it
        self._clock.callLater(0, self._give_up, failure)

    def _give_up(self, failure: Failure) -> None:
        d = self._client.stopService()
        d.addErrback(self._bug, "giving up")
        if self._on_fatal is not None:
            try:
                self._on_fatal(failure)
            except Exception:
                log.failure("Stopping after a failed start of the RabbitMQ backbone failed")

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
        if self._inbox is None:
            raise RuntimeError("the RabbitMQ backbone needs attach(deliver) before it starts")
        super().startService()
        self._stopping = False
        self._stopped = None
        self._consume_from = self._clock.seconds() + self.config.resubscribe_grace
        log.info(
            "Connecting to RabbitMQ at {address} (vhost {vhost}) as {username}{tls}",
            address=self.address,
            vhost=self.config.vhost,
            username=self.config.username,
            tls=" over TLS" if self.config.ssl is not None else "",
        )
        self._client.startService()
        if not self.config.wait_for_broker:
            d = self._client.whenConnected(failAfterFailures=1)
            d.addErrback(self._first_failed)
            d.addErrback(self._bug, "starting")

    def stopService(self):
        """Send what waits (for a few seconds), close the connection; safe to call twice."""
        if self._stopped is None:
            super().stopService()
            self._stopping = True
            self._stopped = ensureDeferred(self._shutdown())
            self._stopped.addErrback(self._bug, "stopping")
        return _follow(self._stopped)

    async def _shutdown(self) -> None:
        session = self._session
        if session is not None and not self._outbox.empty:
            drained = self._outbox.drained()
            drained.addTimeout(DRAIN_TIMEOUT, self._clock)
            try:
                await drained
            except defer.TimeoutError:
                pass
        session = self._session
        if session is not None:
            await self._close(session)
        if self._client.running:
            await self._client.stopService()
        unsent = self._outbox.stop()
        if unsent:
            self.metrics.drop("backbone_unsent", unsent)
            log.warn(
                "The RabbitMQ backbone stopped with {n} messages that RabbitMQ at {address} "
                "has not confirmed: they are lost",
                n=unsent,
                address=self.address,
            )
        log.info("RabbitMQ backbone stopped")

    async def _close(self, session: _Session) -> None:
        """Close the AMQP connection, or drop it if the broker does not answer in time."""
        self._forget(session)
        connection = session.connection
        closed = connection.when_lost()
        if connection.is_lost:
            return
        try:
            connection.close()
        except Exception:
            connection.abort()
        closed.addTimeout(CLOSE_TIMEOUT, self._clock)
        try:
            await closed
        except defer.TimeoutError:
            log.warn(
                "RabbitMQ at {address} did not close the connection in time: dropping it",
                address=self.address,
            )
            connection.abort()
            await connection.when_lost()


class _ProtocolFactory(Factory):
    """A protocol factory of ``make()``'s protocols."""

    noisy = False

    def __init__(self, make):
        self._make = make

    def buildProtocol(self, addr):
        return self._make()
