"""
The ``Client``: a Threat Bus app's connection to one bus, a ``MultiService``
with a ``Subscription`` per topic as its children. It sends the management
requests (a request without an answer within ``request_timeout`` fails, and
the socket is made anew, dropping whatever stale request still waits in it)
and, on ``stopService``, unsubscribes everything and closes the transport.
"""

from __future__ import annotations

import json
from typing import List, Optional

import zmq
from twisted.application.service import MultiService
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError as DeferredTimeoutError,
    fail,
)
from twisted.logger import Logger

from txthreatbus import codec, logs
from txthreatbus.client.curve import CurveKeys
from txthreatbus.client.deferreds import follow
from txthreatbus.client.endpoints import DEFAULT_ENDPOINT, parse_endpoint, parse_subscribe_reply
from txthreatbus.client.errors import ClientError, ClientStopped, ProtocolError, RequestTimeout
from txthreatbus.client.subscription import Subscription
from txthreatbus.client.transport import IManageSocket, ZmqTransport

log = Logger(observer=logs.publisher)


class Client(MultiService):
    """
    A Threat Bus app: subscriptions to topics of one bus, as child services.

    Start it (``startService``, or make it a child of your application)
    before subscribing: a subscription opens its sockets and heartbeats only
    while the client runs. ``stopService`` unsubscribes everything, sends
    what is still queued (for up to ``linger`` seconds), and closes.

    @param endpoint: the bus's management endpoint, ``host:port``.
    @param clock: the ``IReactorTime`` for heartbeats, timeouts and backoff.
    @param transport: makes the sockets (default: ``ZmqTransport(linger, curve=curve)``).
    @param curve: ``CurveKeys`` for a bus with CurveZMQ on.
    @param heartbeat_interval: seconds between heartbeats.
    @param request_timeout: seconds to wait for a management reply.
    @param backoff_initial: seconds before the second try to subscribe
        again; doubled after every failure, up to ``backoff_max``.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        clock=None,
        transport=None,
        heartbeat_interval: float = 5.0,
        request_timeout: float = 3.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        linger: float = 2.0,
        curve: Optional[CurveKeys] = None,
    ):
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        for name, value in (
            ("heartbeat_interval", heartbeat_interval),
            ("request_timeout", request_timeout),
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value!r}")
        self.endpoint = parse_endpoint(endpoint)
        self.clock = clock
        self.transport = transport if transport is not None else ZmqTransport(linger=linger, curve=curve)
        self.heartbeat_interval = heartbeat_interval
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._manage: Optional[IManageSocket] = None
        self._requests: set = set()
        self._subscribing: set = set()
        self._stopping: Optional[Deferred] = None

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (from 0)."""
        return min(self.backoff_max, self.backoff_initial * 2 ** min(attempt, 32))

    # --- management requests

    def request(self, payload: dict) -> Deferred:
        """
        Send the management request ``payload``; a Deferred of the reply
        (a dict). Fails with ``RequestTimeout`` after ``request_timeout``
        seconds without answer, ``ProtocolError`` for a reply that is not a
        JSON object, ``ClientStopped`` once the client stops.
        """
        if self._stopping is not None and payload.get("action") != "unsubscribe":
            return fail(ClientStopped("the client is stopping"))
        try:
            if self._manage is None:
                self._manage = self.transport.manage(self.endpoint)
            manage = self._manage
            d = manage.request(json.dumps(payload).encode())
        except zmq.ZMQError as e:
            return fail(ClientError(f"cannot send to Threat Bus at {self.endpoint}: {e}"))
        except ClientStopped as e:
            return fail(e)
        d.addTimeout(self.request_timeout, self.clock)
        self._requests.add(d)

        def done(result):
            self._requests.discard(d)
            return result

        d.addBoth(done)
        d.addCallbacks(self._reply, self._no_reply, errbackArgs=(manage, payload.get("action")))
        return d

    def _reply(self, frames) -> dict:
        if len(frames) != 1:
            raise ProtocolError(f"a reply of {len(frames)} frames")
        try:
            reply = codec.loads(frames[0])
        except codec.DecodeError as e:
            raise ProtocolError(f"a reply that is not JSON: {e}") from None
        if not isinstance(reply, dict):
            raise ProtocolError(f"a reply that is not a JSON object: {reply!r}")
        return reply

    def _no_reply(self, failure, manage, action):
        if failure.check(DeferredTimeoutError):
            if manage is self._manage:
                # the request may still sit in the socket, to reach a
                # restarted bus out of place: start afresh
                self._manage = None
                manage.close()
            raise RequestTimeout(
                f"no answer from Threat Bus at {self.endpoint} to {action} "
                f"within {self.request_timeout:g} s"
            )
        if failure.check(CancelledError):
            raise ClientStopped("the client stopped")
        return failure

    def _subscribe_request(self, topic: str, snapshot_days: int) -> Deferred:
        d = self.request({"action": "subscribe", "topic": topic, "snapshot": snapshot_days})
        d.addCallback(parse_subscribe_reply, self.endpoint)
        return d

    # --- subscriptions

    def subscribe(self, topic, snapshot_days: int = 0, callback=None) -> Deferred:
        """
        Subscribe to ``topic``, asking for a snapshot of the last
        ``snapshot_days`` days if > 0. A Deferred of the ``Subscription``;
        ``callback(message)`` gets each message that arrives (it may return
        a Deferred).

        The topic tells the generation of what arrives: ``threatbus/intel``,
        ``threatbus/sighting`` or ``threatbus`` give ``txthreatbus.model``'s
        Intel and Sightings; ``stix2/indicator``, ``stix2/sighting``,
        ``stix2`` (or a list of them) give ``txthreatbus.stix``'s Indicators
        and Sightings. Either way snapshot requests come as
        ``SnapshotRequest``.
        """
        if (
            not isinstance(snapshot_days, int)
            or isinstance(snapshot_days, bool)
            or snapshot_days < 0
        ):
            raise ValueError(f"snapshot_days must be a whole number >= 0, not {snapshot_days!r}")
        if self._stopping is not None:
            return fail(ClientStopped("the client is stopping"))
        d = self._subscribe_request(topic, snapshot_days)
        self._subscribing.add(d)

        def subscribed(endpoints):
            self._subscribing.discard(d)
            sub = Subscription(self, topic, snapshot_days, callback, endpoints)
            sub.setServiceParent(self)
            log.debug("Subscribed to {topic} as {p2p}", topic=topic, p2p=endpoints.p2p)
            return sub

        def failed(failure):
            self._subscribing.discard(d)
            return failure

        return d.addCallbacks(subscribed, failed)

    @property
    def subscriptions(self) -> List[Subscription]:
        """The current subscriptions."""
        return [s for s in self if isinstance(s, Subscription)]

    # --- lifecycle

    def startService(self):
        if self._stopping is not None:
            raise ClientStopped("a stopped client does not start again: make a new one")
        super().startService()

    def stopService(self):
        """Unsubscribe everything and close; a Deferred that never fails. Safe to call twice."""
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
            self._stopping.addErrback(
                lambda f: log.failure("Stopping the Threat Bus client failed", f)
            )
        return follow(self._stopping)

    async def _stop(self):
        # subscribe requests in flight become subscriptions, unsubscribed below
        for d in list(self._subscribing):
            try:
                await follow(d)
            except Exception:
                pass
        await MultiService.stopService(self)
        for d in list(self._requests):
            d.cancel()
        if self._manage is not None:
            self._manage.close()
            self._manage = None
        await self.transport.close()
