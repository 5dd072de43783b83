"""
The apps subscribed through the zmq-app plugin, and what each one holds.

Each subscription has its own point-to-point (P2P) topic. The bus consumer
of a topic is a ``Fanout`` of every subscription to it, which hands each
message to the publisher once for all of them (it is encoded once, and
framed for each app); a subscription keeps the frames that cannot be sent
yet (the app's SUB socket has not subscribed, or it reads too slowly) in a
buffer bounded in bytes. A subscription also owns its liveness timer and its
pending snapshot: removing it frees both.

Only a SUB subscription that begins with a live P2P topic takes effect
(``notice``): an app is ready once its own SUB socket subscribed, and no
socket can read the streams of others. Snapshot requests for other apps are
held once, here, not copied into every buffer: an app that is not ready yet
gets those still held when its SUB socket connects.
"""

from __future__ import annotations

import secrets
import string
from collections import deque
from datetime import timedelta
from itertools import islice
from typing import Dict, Optional, Tuple

import attrs
from twisted.logger import Logger

from txthreatbus import logs
from txthreatbus.bus import Bus, matches
from txthreatbus.model import MessageType, SnapshotRequest, is_stix_topic

log = Logger(observer=logs.publisher)

#: Letters in a point-to-point topic.
P2P_LENGTH = 32
#: Letters of a point-to-point topic that the status page shows.
P2P_SHOWN = 4

# Random bytes become letters: byte b is letter b % 26, and bytes of 234 and
# above (26 * 9) are dropped, so that every letter is equally likely.
_TO_LETTER = bytes(string.ascii_lowercase[b % 26].encode()[0] for b in range(256))
_UNEVEN = bytes(range(26 * 9, 256))


def new_p2p_topic() -> str:
    """32 random lowercase letters, from a cryptographically secure source."""
    letters = b""
    while len(letters) < P2P_LENGTH:
        letters += secrets.token_bytes(P2P_LENGTH + 8).translate(_TO_LETTER, _UNEVEN)
    return letters[:P2P_LENGTH].decode("ascii")


def _outermost(topics: Tuple[str, ...]) -> Tuple[str, ...]:
    """``topics`` without repeats and those under another of them: each message comes once."""
    if len(topics) == 1:
        return topics
    topics = tuple(dict.fromkeys(topics))
    return tuple(t for t in topics if not any(o != t and matches(o, t) for o in topics))


class AppSubscription:
    """One app's subscription: its topics, its unsent frames, its timers."""

    __slots__ = (
        "p2p", "prefix", "topics", "stix", "peer", "publisher", "readers", "pending",
        "pending_bytes", "timer", "snapshot_id", "requests_seen", "since", "heartbeat_at",
        "__weakref__",
    )

    def __init__(self, p2p: str, topics: Tuple[str, ...], peer: str, publisher):
        self.p2p = p2p
        self.prefix = p2p.encode("ascii")
        #: The bus topics, all of one generation.
        self.topics = topics
        #: Whether the app is of the STIX generation (Threat Bus 2021 and later).
        self.stix = is_stix_topic(topics[0])
        #: The network address the subscription came from.
        self.peer = peer
        self.publisher = publisher
        #: SUB sockets subscribed to our P2P topic: the app is ready while > 0.
        self.readers = 0
        #: Frames waiting to be sent, oldest first; None while there are none.
        self.pending: Optional[deque] = None
        self.pending_bytes = 0
        self.timer = None
        self.snapshot_id: Optional[str] = None
        #: The snapshot requests up to this number were sent, or not owed.
        self.requests_seen = 0
        #: When it subscribed, and when its last heartbeat came (None: none yet).
        self.since = 0.0
        self.heartbeat_at: Optional[float] = None

    @property
    def ready(self) -> bool:
        """Whether the app's SUB socket subscribed to our P2P topic."""
        return self.readers > 0

    def __call__(self, message) -> None:
        """Send ``message`` to this app (the bus consumer interface)."""
        self.publisher.send(self, message)

    def __repr__(self):
        return f"<AppSubscription {self.p2p} to {', '.join(self.topics)}>"


class Fanout:
    """The bus consumer of one topic: its messages go to the apps of ``subs``."""

    __slots__ = ("subs", "_send_all")

    def __init__(self, send_all):
        #: The subscriptions to the topic, in the order they came.
        self.subs: Dict[AppSubscription, None] = {}
        self._send_all = send_all

    def __call__(self, message) -> None:
        self._send_all(self.subs, message)


@attrs.frozen(eq=False)
class _HeldRequest:
    number: int
    request: SnapshotRequest
    requester: object
    timer: object


class Subscriptions:
    """
    The subscriptions of one zmq-app plugin, by P2P topic.

    @param timeout: seconds without heartbeat after which a subscription is
        removed; 0 keeps subscriptions until they unsubscribe.
    @param limit: subscriptions at most; ``peer_limit`` of them from one
        network address.
    @param snapshot_timeout: seconds a snapshot request is held for apps
        whose SUB socket has not connected yet.
    """

    def __init__(
        self,
        bus: Bus,
        publisher,
        clock,
        timeout: float = 0.0,
        limit: int = 10_000,
        peer_limit: int = 2_500,
        snapshot_timeout: float = 3600.0,
    ):
        self._bus = bus
        self._publisher = publisher
        self._clock = clock
        self._timeout = timeout
        self._limit = limit
        self._peer_limit = peer_limit
        self._snapshot_timeout = snapshot_timeout
        self._throttle = logs.Throttle(clock)
        self._by_p2p: Dict[str, AppSubscription] = {}
        self._by_peer: Dict[str, int] = {}
        self._fanouts: Dict[str, Fanout] = {}
        #: Snapshot requests from other apps, each held once, in arrival order.
        self._requests: Dict[tuple, _HeldRequest] = {}
        self._request_number = 0

    def __len__(self):
        return len(self._by_p2p)

    def __iter__(self):
        return iter(list(self._by_p2p.values()))

    def get(self, p2p: str) -> Optional[AppSubscription]:
        return self._by_p2p.get(p2p)

    def refusal(self, peer: str) -> Optional[str]:
        """Why a new subscription from ``peer`` would pass a limit, or None."""
        if len(self._by_p2p) >= self._limit:
            return "max_subscriptions"
        if self._by_peer.get(peer, 0) >= self._peer_limit:
            return "max_subscriptions_per_peer"
        return None

    def subscribe(self, topics, snapshot: timedelta, peer: str = "") -> AppSubscription:
        """
        Subscribe a new app to ``topics`` (a topic, or a tuple of topics of
        one generation), asking for ``snapshot`` if > 0.
        """
        topics = (topics,) if isinstance(topics, str) else tuple(topics)
        p2p = new_p2p_topic()
        while p2p in self._by_p2p:  # pragma: no cover - 26**32 topics
            p2p = new_p2p_topic()
        sub = AppSubscription(p2p, topics, peer, self._publisher)
        sub.requests_seen = self._request_number
        sub.since = self._clock.seconds()
        self._by_p2p[p2p] = sub
        self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
        if self._timeout:
            sub.timer = self._clock.callLater(self._timeout, self._expire, p2p)
        for topic in _outermost(topics):
            fanout = self._fanouts.get(topic)
            if fanout is None:
                fanout = self._fanouts[topic] = Fanout(self._publisher.send_all)
                self._bus.subscribe(topic, fanout)
            fanout.subs[sub] = None
        self._bus.metrics.subscriptions.inc()
        self._throttle(
            "subscribed", log.info, "Subscribed {p2p} to {topic}", p2p=p2p, topic=", ".join(topics)
        )
        if snapshot > timedelta(0):
            sub.snapshot_id, finished = self._bus.request_snapshot(topics, snapshot, sub)
            finished.addCallback(self._snapshot_finished, sub).addErrback(
                lambda f: log.failure("Snapshot for {p2p} failed", f, p2p=p2p)
            )
        return sub

    def _snapshot_finished(self, routed, sub):
        if sub.snapshot_id is not None:
            self._throttle(
                "snapshot_done", log.info, "Snapshot for {p2p} done: {n} items", p2p=sub.p2p, n=routed
            )
            self._release(sub.snapshot_id)
            sub.snapshot_id = None

    # --- the apps' SUB sockets

    def notice(self, subscribed: bool, topic: bytes) -> bool:
        """
        An app's SUB socket (un)subscribed to ``topic``. Returns whether the
        subscription may take effect: only if it begins with a live P2P topic.
        """
        # latin-1 maps every byte to one character: only ASCII letters match
        sub = self._by_p2p.get(topic[:P2P_LENGTH].decode("latin-1"))
        if sub is None:
            if subscribed:
                self._bus.metrics.drop("foreign_subscription")
                self._throttle(
                    "foreign_subscription",
                    log.info,
                    "Ignored a SUB socket's subscription to {topic!r}: it does not begin with "
                    "a live P2P topic",
                    topic=topic[:P2P_LENGTH + 16],
                )
            return False
        if subscribed:
            sub.readers += 1
            if sub.readers == 1:
                self._catch_up(sub)
                self._publisher.ready(sub)
        elif sub.readers:
            sub.readers -= 1
            if not sub.readers:
                sub.requests_seen = self._request_number
        return True

    # --- snapshot requests of other apps

    def pass_on(self, request: SnapshotRequest, requester) -> None:
        """
        Send ``request`` to every app but ``requester``: now to the apps that
        are ready, and to the others once their SUB socket connects, while
        the request is held (its snapshot is not over).
        """
        key = (request.snapshot_id, request.snapshot_type)
        if key in self._requests:
            return
        self._request_number += 1
        owed = False
        for sub in self._by_p2p.values():
            if sub is not requester:
                if sub.readers:
                    sub(request)
                else:
                    owed = True
        if not owed:  # every other app has it
            return
        if len(self._requests) >= 2 * self._limit:  # two (intel, sightings) per subscription
            self._bus.metrics.drop("snapshot_requests_held")
            self._forget(next(iter(self._requests)))
        self._requests[key] = _HeldRequest(
            self._request_number,
            request,
            requester,
            self._clock.callLater(self._snapshot_timeout, self._forget, key),
        )

    def _catch_up(self, sub) -> None:
        """Send ``sub`` the held requests that came while it was not ready."""
        for held in self._requests.values():
            if held.number > sub.requests_seen and held.requester is not sub:
                sub(held.request)
        sub.requests_seen = self._request_number

    def _release(self, snapshot_id: str) -> None:
        """A snapshot of this instance is over: stop holding its requests."""
        for snapshot_type in MessageType:
            self._forget((snapshot_id, snapshot_type))

    def _forget(self, key) -> None:
        held = self._requests.pop(key, None)
        if held is not None and held.timer.active():
            held.timer.cancel()

    def status(self, limit: int) -> list:
        """
        The first ``limit`` subscriptions, for the status page, as plain
        dicts: no more is read than shown, however many there are. A P2P
        topic lets whoever knows it read the app's stream: only its first
        ``P2P_SHOWN`` letters are given.
        """
        now = self._clock.seconds()
        return [
            {
                "generation": "stix" if sub.stix else "2020",
                "topics": list(sub.topics),
                "p2p": sub.p2p[:P2P_SHOWN] + "\u2026",
                "peer": sub.peer,
                "age_seconds": now - sub.since,
                "last_heartbeat_seconds_ago": None if sub.heartbeat_at is None else now - sub.heartbeat_at,
                "ready": sub.ready,
                "snapshot": sub.snapshot_id is not None,
                "buffered_frames": len(sub.pending) if sub.pending is not None else 0,
                "buffered_bytes": sub.pending_bytes,
            }
            for sub in islice(self._by_p2p.values(), max(0, limit))
        ]

    def held_requests(self) -> int:
        """How many snapshot requests are held."""
        return len(self._requests)

    # --- liveness

    def heartbeat(self, p2p: str) -> bool:
        """Note that ``p2p`` is alive; False if it is not subscribed."""
        sub = self._by_p2p.get(p2p)
        if sub is None:
            return False
        sub.heartbeat_at = self._clock.seconds()
        if sub.timer is not None:
            sub.timer.reset(self._timeout)
        return True

    def unsubscribe(self, p2p: str) -> bool:
        """Remove ``p2p`` and free all it holds; False if it is not subscribed."""
        sub = self._by_p2p.pop(p2p, None)
        if sub is None:
            return False
        count = self._by_peer.pop(sub.peer) - 1
        if count:
            self._by_peer[sub.peer] = count
        for topic in _outermost(sub.topics):
            fanout = self._fanouts[topic]
            del fanout.subs[sub]
            if not fanout.subs:
                del self._fanouts[topic]
                self._bus.unsubscribe(topic, fanout)
        self._bus.metrics.subscriptions.dec()
        if sub.timer is not None and sub.timer.active():
            sub.timer.cancel()
        sub.timer = None
        if sub.snapshot_id is not None:
            snapshot_id, sub.snapshot_id = sub.snapshot_id, None
            self._release(snapshot_id)
            self._bus.finish_snapshot(snapshot_id)
        self._publisher.discard(sub)
        sub.readers = 0
        self._throttle(
            "unsubscribed",
            log.info,
            "Unsubscribed {p2p} from {topic}",
            p2p=p2p,
            topic=", ".join(sub.topics),
        )
        return True

    def _expire(self, p2p: str) -> None:
        sub = self._by_p2p.get(p2p)
        if sub is not None:
            sub.timer = None
            self._throttle(
                "expired",
                log.info,
                "Removed {p2p}: no heartbeat for {timeout} s",
                p2p=p2p,
                timeout=self._timeout,
            )
            self._bus.metrics.drop("subscription_expired")
            self.unsubscribe(p2p)

    def clear(self) -> None:
        """Remove every subscription and held request (the plugin stops)."""
        for p2p in list(self._by_p2p):
            self.unsubscribe(p2p)
        for key in list(self._requests):
            self._forget(key)
