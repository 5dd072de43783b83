"""
A ``Subscription``: one topic of the bus, a child service of its ``Client``.
It receives on its P2P topic, publishes through its ``Outbox``, heartbeats,
and subscribes again when the bus forgets it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeoutError
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from txthreatbus import codec, logs, stix
from txthreatbus.client.deferreds import follow
from txthreatbus.client.endpoints import Endpoints
from txthreatbus.client.errors import ClientError, ClientStopped
from txthreatbus.client.outbox import Outbox
from txthreatbus.client.transport import ISubscriberSocket
from txthreatbus.model import Intel, Sighting, SnapshotEnvelope, SnapshotRequest, is_stix_topic

if TYPE_CHECKING:
    from txthreatbus.client.client import Client

log = Logger(observer=logs.publisher)

#: What a frame from the bus carries, by the suffix after the P2P topic, for
#: a subscription of each generation (False: 2020, True: STIX-2).
_SUFFIX_TOPICS = {
    False: {b"intel": Intel.topic, b"sighting": Sighting.topic, b"snapshotrequest": SnapshotRequest.topic},
    True: {
        b"indicator": stix.Indicator.topic,
        b"sighting": stix.Sighting.topic,
        b"snapshotrequest": SnapshotRequest.topic,
    },
}
#: What a subscription may publish.
_PUBLISHABLE = (Intel, Sighting, stix.Indicator, stix.Sighting, SnapshotEnvelope)


class Subscription(Service):
    """
    One subscription to a Threat Bus topic, a child service of its ``Client``.

    It receives on its P2P topic (each message, an ``Intel``, ``Sighting`` or
    ``SnapshotRequest``, goes to ``callback``), publishes, heartbeats, and
    subscribes again when the bus forgets it. ``stopService`` (or
    ``unsubscribe``) unsubscribes.

    @ivar endpoints: the current ``Endpoints`` (P2P topic, bus PUB and SUB).
    @ivar resubscriptions: how many times it has subscribed again.
    """

    def __init__(
        self, client: "Client", topic, snapshot_days: int, callback, endpoints: Endpoints
    ):
        self._client = client
        self.topic = topic
        first = topic if isinstance(topic, str) else topic[0]
        self._receives = _SUFFIX_TOPICS[is_stix_topic(first)]
        self.snapshot_days = snapshot_days
        self.endpoints = endpoints
        self.resubscriptions = 0
        self._prefix = endpoints.p2p.encode()
        self._callback = callback
        self._outbox = Outbox(client.clock)
        self._subscriber: Optional[ISubscriberSocket] = None
        self._loop: Optional[LoopingCall] = None
        self._loop_done: Optional[Deferred] = None
        self._pause_d: Optional[Deferred] = None
        self._stopping: Optional[Deferred] = None

    def __repr__(self):
        return f"<Subscription {self.p2p} to {self.topic}>"

    @property
    def p2p(self) -> str:
        """The current point-to-point topic (it changes when subscribing again)."""
        return self.endpoints.p2p

    @property
    def pending(self) -> int:
        """How many published messages are not yet handed to ZeroMQ."""
        return len(self._outbox)

    # --- lifecycle

    def startService(self):
        if self._stopping is not None:
            raise ClientStopped(f"{self!r} is unsubscribed")
        super().startService()
        transport = self._client.transport
        self._subscriber = transport.subscriber(self.endpoints.pub, self._received)
        self._subscriber.subscribe(self.p2p.encode())
        self._outbox.attach(transport.publisher(self.endpoints.sub, self._outbox.notify))
        self._loop = LoopingCall(self._beat)
        self._loop.clock = self._client.clock
        self._loop_done = self._loop.start(self._client.heartbeat_interval, now=False)
        self._loop_done.addErrback(
            lambda f: log.failure("The heartbeat loop of {p2p} failed", f, p2p=self.p2p)
        )

    def stopService(self):
        """Unsubscribe and close; a Deferred that never fails. Safe to call twice."""
        if self._stopping is None:
            super().stopService()
            self._stopping = Deferred.fromCoroutine(self._stop())
            self._stopping.addErrback(
                lambda f: log.failure("Unsubscribing {p2p} failed", f, p2p=self.p2p)
            )
        return follow(self._stopping)

    def unsubscribe(self) -> Deferred:
        """Unsubscribe and leave the client; a Deferred that fires when done."""
        if self.parent is not None:
            self.disownServiceParent()
        return self.stopService()

    async def _stop(self):
        started = self._loop is not None
        if started:
            if self._loop.running:
                self._loop.stop()
            if self._pause_d is not None:
                self._pause_d.cancel()
            # a heartbeat or re-subscription in progress finishes first: it
            # may hold a new P2P topic, the one to unsubscribe
            await self._loop_done
        linger = self._client.transport.linger
        if started and self._outbox:
            try:
                await self._outbox.drained().addTimeout(linger, self._client.clock)
            except DeferredTimeoutError:
                pass  # the outbox tells how many it drops
        try:
            reply = await self._client.request({"action": "unsubscribe", "topic": self.p2p})
        except ClientError as e:
            log.warn(
                "Could not unsubscribe {p2p} from {topic}: {error}",
                p2p=self.p2p,
                topic=self.topic,
                error=str(e),
            )
        else:
            if reply.get("status") == "success":
                log.info("Unsubscribed {p2p} from {topic}", p2p=self.p2p, topic=self.topic)
            else:
                log.info(
                    "Threat Bus did not know {p2p} any more: {reply!r}", p2p=self.p2p, reply=reply
                )
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None
        self._outbox.close()

    # --- heartbeats and subscribing again

    def _beat(self) -> Deferred:
        # the loop waits for this; it never fails, so the loop never stops on an error
        d = Deferred.fromCoroutine(self._heartbeat())
        d.addErrback(lambda f: log.failure("The heartbeat of {p2p} failed", f, p2p=self.p2p))
        return d

    async def _heartbeat(self):
        try:
            reply = await self._client.request({"action": "heartbeat", "topic": self.p2p})
        except ClientStopped:
            return
        except ClientError as e:
            problem = str(e)
        else:
            status = reply.get("status")
            if status == "success":
                return
            if status == "unknown request":
                # a bus without heartbeats: nothing tells us it restarted
                log.info(
                    "Threat Bus does not know heartbeats; {p2p} stops sending them", p2p=self.p2p
                )
                if self._loop.running:
                    self._loop.stop()
                return
            problem = f"it answered {status!r}"
        if not self.running:
            return
        log.warn(
            "Threat Bus did not take the heartbeat of {p2p} ({problem}): subscribing to {topic} again",
            p2p=self.p2p,
            problem=problem,
            topic=self.topic,
        )
        await self._resubscribe()

    async def _resubscribe(self):
        attempt = 0
        while self.running:
            try:
                endpoints = await self._client._subscribe_request(self.topic, 0)
            except ClientStopped:
                return
            except ClientError as e:
                delay = self._client.backoff(attempt)
                attempt += 1
                log.warn(
                    "Could not subscribe to {topic} again ({error}); trying again in {delay} s",
                    topic=self.topic,
                    error=str(e),
                    delay=round(delay, 3),
                )
                self._pause_d = deferLater(self._client.clock, delay, lambda: None)
                try:
                    await self._pause_d
                except CancelledError:
                    return
                finally:
                    self._pause_d = None
                continue
            old = self.endpoints
            self._switch(endpoints)
            self.resubscriptions += 1
            log.info(
                "Subscribed to {topic} again as {p2p} (was {old})",
                topic=self.topic,
                p2p=endpoints.p2p,
                old=old.p2p,
            )
            return

    def _switch(self, endpoints: Endpoints) -> None:
        old, self.endpoints = self.endpoints, endpoints
        self._prefix = endpoints.p2p.encode()
        if self._subscriber is None:
            return
        transport = self._client.transport
        if endpoints.pub != old.pub:
            self._subscriber.close()
            self._subscriber = transport.subscriber(endpoints.pub, self._received)
        else:
            self._subscriber.unsubscribe(old.p2p.encode())
        self._subscriber.subscribe(endpoints.p2p.encode())
        if endpoints.sub != old.sub:
            self._outbox.attach(transport.publisher(endpoints.sub, self._outbox.notify))

    # --- receiving

    def _received(self, frame: bytes) -> None:
        prefix = self._prefix
        head, space, body = frame.partition(b" ")
        if not space or not head.startswith(prefix):
            log.debug("Ignored a frame not for {p2p}: {head!r}", p2p=self.p2p, head=head[:64])
            return
        suffix = head[len(prefix) :]
        topic = self._receives.get(suffix)
        if topic is None:
            log.warn(
                "Ignored a message of unknown type {suffix!r} from Threat Bus", suffix=suffix[:64]
            )
            return
        try:
            message = codec.decode(topic, body)
        except codec.DecodeError as e:
            log.warn(
                "Ignored a malformed {kind} from Threat Bus: {error}",
                kind=suffix.decode(),
                error=str(e),
            )
            return
        if self._callback is None:
            return
        try:
            result = self._callback(message)
        except Exception:
            log.failure(
                "The callback of {p2p} failed on a {kind}", p2p=self.p2p, kind=suffix.decode()
            )
            return
        if isinstance(result, Deferred):
            result.addErrback(
                lambda f: log.failure(
                    "The callback of {p2p} failed on a {kind}",
                    f,
                    p2p=self.p2p,
                    kind=suffix.decode(),
                )
            )

    # --- publishing

    def publish(self, message) -> None:
        """
        Publish an ``Intel``, ``Sighting``, STIX ``Indicator`` or
        ``Sighting`` (``txthreatbus.stix``) or ``SnapshotEnvelope`` on its
        topic. It goes out as soon as the bus takes it, in order.
        """
        if not isinstance(message, _PUBLISHABLE):
            raise TypeError(f"cannot publish {type(message).__name__}: not a message for the bus")
        if self._stopping is not None:
            raise ClientStopped(f"{self!r} is unsubscribed")
        topic = message.topic.encode()
        self._outbox.put(topic, topic + b" " + codec.encode(message))

    def publish_intel(self, intel: Intel) -> None:
        """Publish ``intel`` on ``threatbus/intel``."""
        if not isinstance(intel, Intel):
            raise TypeError(f"not Intel: {intel!r}")
        self.publish(intel)

    def publish_sighting(self, sighting: Sighting) -> None:
        """Publish ``sighting`` on ``threatbus/sighting``."""
        if not isinstance(sighting, Sighting):
            raise TypeError(f"not a Sighting: {sighting!r}")
        self.publish(sighting)

    def answer_snapshot(self, request: SnapshotRequest, items: Iterable) -> int:
        """
        Answer ``request`` with ``items`` (Intel or STIX Indicators for an
        INTEL snapshot, Sightings of either generation for a SIGHTING one):
        each goes out in a ``SnapshotEnvelope``
        on ``threatbus/snapshotenvelope``. Raises ``ValueError`` before
        sending anything if an item has the wrong type. Returns the count.
        """
        envelopes = [
            SnapshotEnvelope(
                snapshot_type=request.snapshot_type, snapshot_id=request.snapshot_id, body=item
            )
            for item in items
        ]
        for envelope in envelopes:
            self.publish(envelope)
        return len(envelopes)

    def connected(self, topic: Optional[str] = None) -> Deferred:
        """
        A Deferred that fires once the bus takes what is published on
        ``topic`` (on any topic, if None): its SUB socket has subscribed to
        our PUB socket. Cancel it, or ``addTimeout``, to stop waiting.
        """
        return self._outbox.ready(None if topic is None else topic.encode())

    def sent(self) -> Deferred:
        """A Deferred that fires once everything published so far is handed to ZeroMQ."""
        return self._outbox.drained()
