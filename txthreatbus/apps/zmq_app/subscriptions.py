"""
The apps subscribed through the zmq-app plugin, and what each one holds.

Each subscription is a bus consumer with its own point-to-point (P2P) topic.
What the bus hands it is framed for the app and given to the publisher; the
subscription keeps the frames that cannot be sent yet (the app's SUB socket
has not subscribed, or it reads too slowly) in a bounded buffer. A
subscription also owns its liveness timer and its pending snapshot: removing
it frees both.
"""

from __future__ import annotations

import secrets
import string
from collections import deque
from datetime import timedelta
from typing import Dict, Optional

from twisted.logger import Logger

from txthreatbus import logs
from txthreatbus.bus import Bus

log = Logger(observer=logs.publisher)

#: Letters in a point-to-point topic.
P2P_LENGTH = 32

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


class AppSubscription:
    """One app's subscription: its topics, its unsent frames, its timers."""

    __slots__ = (
        "p2p", "prefix", "topic", "publisher", "ready", "pending", "timer", "snapshot_id",
        "__weakref__",
    )

    def __init__(self, p2p: str, topic: str, publisher):
        self.p2p = p2p
        self.prefix = p2p.encode("ascii")
        self.topic = topic
        self.publisher = publisher
        #: Whether the app's SUB socket has subscribed to our P2P topic.
        self.ready = False
        #: Frames waiting to be sent, oldest first; None while there are none.
        self.pending: Optional[deque] = None
        self.timer = None
        self.snapshot_id: Optional[str] = None

    def __call__(self, message) -> None:
        """Send ``message`` to this app (the bus consumer interface)."""
        self.publisher.send(self, message)

    def __repr__(self):
        return f"<AppSubscription {self.p2p} to {self.topic}>"


class Subscriptions:
    """
    The subscriptions of one zmq-app plugin, by P2P topic.

    @param timeout: seconds without heartbeat after which a subscription is
        removed; 0 keeps subscriptions until they unsubscribe.
    """

    def __init__(self, bus: Bus, publisher, clock, timeout: float = 0.0, limit: int = 10_000):
        self._bus = bus
        self._publisher = publisher
        self._clock = clock
        self._timeout = timeout
        self._limit = limit
        self._by_p2p: Dict[str, AppSubscription] = {}

    def __len__(self):
        return len(self._by_p2p)

    def __iter__(self):
        return iter(list(self._by_p2p.values()))

    def get(self, p2p: str) -> Optional[AppSubscription]:
        return self._by_p2p.get(p2p)

    def full(self) -> bool:
        """Whether another subscription would pass the limit."""
        return len(self._by_p2p) >= self._limit

    def subscribe(self, topic: str, snapshot: timedelta) -> AppSubscription:
        """Subscribe a new app to ``topic``, asking for ``snapshot`` if > 0."""
        p2p = new_p2p_topic()
        while p2p in self._by_p2p:  # pragma: no cover - 26**32 topics
            p2p = new_p2p_topic()
        sub = AppSubscription(p2p, topic, self._publisher)
        self._by_p2p[p2p] = sub
        if self._timeout:
            sub.timer = self._clock.callLater(self._timeout, self._expire, p2p)
        self._bus.subscribe(topic, sub)
        self._bus.metrics.subscriptions.inc()
        log.info("Subscribed {p2p} to {topic}", p2p=p2p, topic=topic)
        if snapshot > timedelta(0):
            sub.snapshot_id, finished = self._bus.request_snapshot(topic, snapshot, sub)
            finished.addCallback(self._snapshot_finished, sub).addErrback(
                lambda f: log.failure("Snapshot for {p2p} failed", f, p2p=p2p)
            )
        return sub

    def _snapshot_finished(self, routed, sub):
        if sub.snapshot_id is not None:
            log.info("Snapshot for {p2p} done: {n} items", p2p=sub.p2p, n=routed)
            sub.snapshot_id = None

    def heartbeat(self, p2p: str) -> bool:
        """Note that ``p2p`` is alive; False if it is not subscribed."""
        sub = self._by_p2p.get(p2p)
        if sub is None:
            return False
        if sub.timer is not None:
            sub.timer.reset(self._timeout)
        return True

    def unsubscribe(self, p2p: str) -> bool:
        """Remove ``p2p`` and free all it holds; False if it is not subscribed."""
        sub = self._by_p2p.pop(p2p, None)
        if sub is None:
            return False
        self._bus.unsubscribe(sub.topic, sub)
        self._bus.metrics.subscriptions.dec()
        if sub.timer is not None and sub.timer.active():
            sub.timer.cancel()
        sub.timer = None
        if sub.snapshot_id is not None:
            snapshot_id, sub.snapshot_id = sub.snapshot_id, None
            self._bus.finish_snapshot(snapshot_id)
        self._publisher.discard(sub)
        log.info("Unsubscribed {p2p} from {topic}", p2p=p2p, topic=sub.topic)
        return True

    def _expire(self, p2p: str) -> None:
        sub = self._by_p2p.get(p2p)
        if sub is not None:
            sub.timer = None
            log.info(
                "Removed {p2p}: no heartbeat for {timeout} s", p2p=p2p, timeout=self._timeout
            )
            self._bus.metrics.drop("subscription_expired")
            self.unsubscribe(p2p)

    def clear(self) -> None:
        """Remove every subscription (the plugin stops)."""
        for p2p in list(self._by_p2p):
            self.unsubscribe(p2p)
