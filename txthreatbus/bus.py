"""
The bus core: topic routing to in-process consumers, and snapshots.

Everything published goes through the backbone (``IBackbone``), which hands
it back to ``Bus.deliver`` on every instance: Intel, Sightings and STIX
objects go to the consumers of matching topics, SnapshotRequests to the app
plugins (``IApp``), and SnapshotEnvelopes to the consumer that asked for
that snapshot, and to no one else.

Two generations of apps share the bus: 2020 ones under ``threatbus/``, STIX
ones under ``stix2/``. Each consumer gets the messages of its own generation
as they were published, and those of the other generation translated by the
``Bridge``: once per message, only if someone of the other generation
listens, and never translated back.

A consumer is any callable taking one message.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Callable, Dict, List, Tuple

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from txthreatbus import logs, stix
from txthreatbus.bridge import Bridge
from txthreatbus.interfaces import IApp, IBackbone
from txthreatbus.metrics import Metrics
from txthreatbus.model import (
    MESSAGE_TYPES,
    Intel,
    MessageType,
    Sighting,
    SnapshotEnvelope,
    SnapshotRequest,
    is_stix_topic,
)

log = Logger(observer=logs.publisher)

Consumer = Callable[[object], None]


def topic_chain(topic: str) -> Tuple[str, ...]:
    """``topic`` and its ancestors, root first: ``a/b`` gives ``a``, ``a/b``."""
    parts = topic.split("/")
    return tuple("/".join(parts[: i + 1]) for i in range(len(parts)))


def matches(subscribed: str, topic: str) -> bool:
    """Whether a subscription to ``subscribed`` receives messages on ``topic``."""
    return topic == subscribed or topic.startswith(subscribed + "/")


def snapshot_types(topic: str) -> Tuple[MessageType, ...]:
    """The message types that a subscription to ``topic`` receives."""
    return tuple(sorted({t for bus_topic, t in MESSAGE_TYPES.items() if matches(topic, bus_topic)}))


_ITEMS = (Intel, Sighting, stix.Indicator, stix.Sighting)
_CHAINS = {cls: topic_chain(cls.topic) for cls in _ITEMS}
#: Where the translation of each item class goes.
_COUNTERPARTS = {
    Intel: _CHAINS[stix.Indicator],
    Sighting: _CHAINS[stix.Sighting],
    stix.Indicator: _CHAINS[Intel],
    stix.Sighting: _CHAINS[Sighting],
}


def _provides(interface):
    """An attrs validator: the value provides ``interface``."""

    def validate(instance, attribute, value):
        if not interface.providedBy(value):
            raise TypeError(f"{attribute.name}: not an {interface.__name__}: {value!r}")

    return validate


@attrs.define(eq=False)
class _PendingSnapshot:
    requester: Consumer
    finished: Deferred
    timer: object
    #: Whether the requester is of the STIX generation.
    stix: bool
    routed: int = 0


@attrs.define(eq=False)
class Bus(Service):
    """
    The bus core of one instance. Building it has no side effects: the
    service tree wires it to its backbone (``backbone.attach(bus.deliver)``)
    and its apps (``add_app``).

    @ivar snapshot_timeout: seconds after which a snapshot is over and
        envelopes for it are dropped.
    """

    backbone: IBackbone = attrs.field(validator=_provides(IBackbone))
    clock: object
    metrics: Metrics = attrs.field(factory=Metrics)
    snapshot_timeout: float = 3600.0
    bridge: Bridge = attrs.field()
    _consumers: Dict[str, Dict[Consumer, None]] = attrs.field(init=False, factory=dict)
    #: Who gets an item of each class: its consumers, and those of its
    #: translation; made when first needed after a (un)subscription.
    _plans: Dict[type, Tuple[List[Consumer], List[Consumer]]] = attrs.field(init=False, factory=dict)
    _apps: List[IApp] = attrs.field(init=False, factory=list)
    _snapshots: Dict[str, _PendingSnapshot] = attrs.field(init=False, factory=dict)
    _watchers: List[Consumer] = attrs.field(init=False, factory=list)
    #: Apps ask for snapshots at will: their log lines are throttled.
    _throttle: logs.Throttle = attrs.field(init=False)

    @_throttle.default
    def _new_throttle(self):
        return logs.Throttle(self.clock)

    @bridge.default
    def _new_bridge(self):
        return Bridge(self.metrics, self.clock)

    # --- plugins and consumers

    def add_app(self, app: IApp) -> None:
        """Let ``app`` receive the snapshot requests of every instance."""
        self._apps.append(app)

    def subscribe(self, topic: str, consumer: Consumer) -> None:
        """Give ``consumer`` every Intel and Sighting on ``topic`` or below."""
        self._consumers.setdefault(topic, {})[consumer] = None
        self._plans.clear()

    def unsubscribe(self, topic: str, consumer: Consumer) -> None:
        """Stop giving ``consumer`` the messages of ``topic``; harmless if it got none."""
        consumers = self._consumers.get(topic)
        if consumers is not None:
            consumers.pop(consumer, None)
            if not consumers:
                del self._consumers[topic]
            self._plans.clear()

    def watch(self, watcher: Consumer) -> None:
        """
        Show ``watcher`` every Intel, Sighting and STIX object this instance
        routes, as it was published (never a translation), before anyone
        gets it.
        """
        self._watchers.append(watcher)

    def unwatch(self, watcher: Consumer) -> None:
        """Stop showing ``watcher`` what is routed; harmless if it saw nothing."""
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    def publish(self, message) -> None:
        """Publish ``message`` to every instance of the bus."""
        self.backbone.publish(message)

    # --- what the backbone hands over

    def deliver(self, message) -> None:
        """Route one message that the backbone carried to this instance."""
        if type(message) in _CHAINS:
            self._route(message)
        elif isinstance(message, SnapshotEnvelope):
            self._route_envelope(message)
        elif isinstance(message, SnapshotRequest):
            self._fan_out(message)
        else:
            log.error("Dropped a message the bus does not route: {message!r}", message=message)
            self.metrics.drop("unroutable")

    def _route(self, message) -> None:
        for watcher in self._watchers:
            try:
                watcher(message)
            except Exception:
                log.failure("Watcher {watcher!r} failed", watcher=watcher)
        cls = type(message)
        consumers, others = self._plans.get(cls) or self._plan(cls)
        reached = self._hand(message, consumers)
        if others:
            translated = self.bridge.translate(message)
            if translated is not None:
                reached += self._hand(translated, others)
        if not reached:
            self.metrics.unrouted[message.kind].inc()

    def _plan(self, cls: type) -> Tuple[List[Consumer], List[Consumer]]:
        """The consumers of items of ``cls``, and of their translations."""
        consumers = self._consumers

        def of(chain):
            return [c for topic in chain for c in consumers.get(topic, ())]

        plan = self._plans[cls] = (of(_CHAINS[cls]), of(_COUNTERPARTS[cls]))
        return plan

    @staticmethod
    def _hand(message, consumers) -> int:
        """Give ``message`` to ``consumers``; how many there were."""
        for consumer in consumers:
            try:
                consumer(message)
            except Exception:
                log.failure("Consumer {consumer!r} failed", consumer=consumer)
        return len(consumers)

    def _fan_out(self, request: SnapshotRequest) -> None:
        pending = self._snapshots.get(request.snapshot_id)
        requester = pending.requester if pending is not None else None
        # Each app's failure is logged on its own, with its own traceback
        # (gatherResults would log only the first, wrapped in a FirstError).
        for app in self._apps:
            maybeDeferred(app.snapshot, request, requester).addErrback(
                lambda f, app=app: log.failure(
                    "App {app!r} failed to pass on snapshot request {id}",
                    f,
                    app=app,
                    id=request.snapshot_id,
                )
            )

    def _route_envelope(self, envelope: SnapshotEnvelope) -> None:
        pending = self._snapshots.get(envelope.snapshot_id)
        if pending is None:
            self._throttle(
                "unknown_snapshot",
                log.debug,
                "Dropped an envelope for unknown snapshot {id}",
                id=envelope.snapshot_id[:64],
            )
            self.metrics.drop("unknown_snapshot")
            return
        body = envelope.body
        if isinstance(body, stix.StixObject) is not pending.stix:
            body = self.bridge.translate(body)
            if body is None:
                return
        pending.routed += 1
        self.metrics.envelopes_routed.inc()
        try:
            pending.requester(body)
        except Exception:
            log.failure("Snapshot requester {r!r} failed", r=pending.requester)

    # --- snapshots

    def request_snapshot(
        self, topics, snapshot: timedelta, requester: Consumer
    ) -> Tuple[str, Deferred]:
        """
        Ask every app of every instance for the items of ``topics`` (a topic,
        or a tuple of topics of one generation) of the last ``snapshot``, and
        have their answers handed to ``requester`` only, in its generation.

        Returns the snapshot id and a Deferred that fires with the number of
        items handed over, when the snapshot expires or is cancelled.
        """
        topics = (topics,) if isinstance(topics, str) else tuple(topics)
        topic = ", ".join(topics)
        snapshot_id = str(uuid.uuid4())
        # Built (and so validated) first: a bad request leaves no state behind.
        types = sorted({t for each in topics for t in snapshot_types(each)})
        requests = [SnapshotRequest(t, snapshot_id, snapshot) for t in types]
        if not requests:
            raise ValueError(f"no message types under topic {topic!r} to snapshot")
        pending = _PendingSnapshot(
            requester=requester,
            finished=Deferred(),
            timer=self.clock.callLater(self.snapshot_timeout, self.finish_snapshot, snapshot_id),
            stix=is_stix_topic(topics[0]),
        )
        self._snapshots[snapshot_id] = pending
        self.metrics.snapshots_pending.inc()
        self._throttle(
            "requested",
            log.info,
            "Snapshot {id} of {topic} over {snapshot} requested",
            id=snapshot_id,
            topic=topic,
            snapshot=snapshot,
        )
        for request in requests:
            self.publish(request)
        return snapshot_id, pending.finished

    def finish_snapshot(self, snapshot_id: str) -> None:
        """End a snapshot: drop later envelopes for it and free its state."""
        pending = self._snapshots.pop(snapshot_id, None)
        if pending is None:
            return
        if pending.timer.active():
            pending.timer.cancel()
        self.metrics.snapshots_pending.dec()
        self._throttle("over", log.info, "Snapshot {id} over: {n} items routed", id=snapshot_id, n=pending.routed)
        pending.finished.callback(pending.routed)

    def snapshot_open(self, snapshot_id: str) -> bool:
        """Whether the snapshot ``snapshot_id`` of this instance still takes answers."""
        return snapshot_id in self._snapshots

    def pending_snapshots(self) -> int:
        """How many snapshots are waiting for answers."""
        return len(self._snapshots)

    def status(self) -> dict:
        """What the status page shows of the bus core."""
        return {"snapshots_pending": len(self._snapshots)}

    def stopService(self):
        for snapshot_id in list(self._snapshots):
            self.finish_snapshot(snapshot_id)
        return super().stopService()
