"""
The PUB side: each message to each app as one frame ``<P2P><suffix> <json>``.

The socket is an XPUB (apps see a PUB): it tells us when an app's SUB socket
subscribes to its P2P topic. Until then, and while the app reads too slowly
for ZeroMQ's high-water mark (``XPUB_NODROP`` makes libzmq refuse instead of
dropping), frames wait in the subscription's bounded buffer and go out in
order as soon as they can. A full buffer drops its oldest frame, counted.
"""

from __future__ import annotations

from collections import deque

import zmq
from twisted.logger import Logger
from txthreatbus import codec, logs
from txthreatbus.connections import XPubConnection
from txthreatbus.model import Intel, Sighting, SnapshotRequest

log = Logger(observer=logs.publisher)

_SUFFIXES = {
    cls: cls.topic.rsplit("/", 1)[1].encode() + b" " for cls in (Intel, Sighting, SnapshotRequest)
}
_TYPE_NAMES = {cls: cls.topic.rsplit("/", 1)[1] for cls in _SUFFIXES}

#: Seconds between tries to send to an app whose socket was full.
RETRY_INTERVAL = 0.005


class PublisherConnection(XPubConnection):
    """The bus's XPUB, told of every app subscription, repeats included."""

    def __init__(self, factory, notify, send_hwm: int):
        XPubConnection.__init__(self, factory, notify, send_hwm)
        self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)


class Publisher:
    """Sends messages to app subscriptions, buffering what cannot go yet."""

    def __init__(self, clock, metrics, buffer_size: int):
        self._clock = clock
        self._metrics = metrics
        self._buffer_size = buffer_size
        self._blocked = {}  # subscriptions with frames waiting, in order of arrival
        self._overflowing = set()  # subscriptions warned of since their last flush
        self._retry = None
        #: Topics shorter than a P2P topic that some app's SUB socket
        #: subscribed to (b"": everything); they cover every P2P topic they
        #: begin. Threat Bus apps subscribe to their own P2P topic instead.
        self._prefixes = set()
        self.connection = None

    def send(self, sub, message) -> None:
        """Send ``message`` to the app of ``sub``."""
        cls = type(message)
        self._metrics.published[_TYPE_NAMES[cls]].inc()
        frame = sub.prefix + _SUFFIXES[cls] + codec.encode(message)
        if sub.pending is None and self.connection is not None and (sub.ready or self._covered(sub)):
            try:
                self.connection.send(frame)
                return
            except zmq.Again:
                self._schedule_retry()
        self._hold(sub, frame)

    def _hold(self, sub, frame: bytes) -> None:
        if sub.pending is None:
            sub.pending = deque()
            self._blocked[sub] = None
        elif len(sub.pending) >= self._buffer_size:
            sub.pending.popleft()
            self._metrics.drop("buffer_overflow")
            if sub not in self._overflowing:
                self._overflowing.add(sub)
                log.warn("Buffer of {p2p} is full: dropping its oldest messages", p2p=sub.p2p)
        sub.pending.append(frame)

    def _covered(self, sub) -> bool:
        """Whether a SUB socket subscribed to a short prefix of ``sub``'s topic."""
        return bool(self._prefixes) and any(sub.prefix.startswith(p) for p in self._prefixes)

    def subscribed(self, sub, ready: bool) -> None:
        """The app's SUB socket has subscribed (or unsubscribed) to its topic."""
        sub.ready = ready
        if ready and sub.pending is not None:
            self._flush(sub)

    def prefix_subscribed(self, prefix: bytes, subscribed: bool) -> None:
        """A SUB socket has subscribed (or unsubscribed) to a short ``prefix``."""
        if not subscribed:
            self._prefixes.discard(prefix)
            return
        self._prefixes.add(prefix)
        for sub in list(self._blocked):
            if sub.prefix.startswith(prefix):
                self._flush(sub)

    def discard(self, sub) -> None:
        """Forget ``sub`` and what it holds (it unsubscribed)."""
        self._blocked.pop(sub, None)
        self._overflowing.discard(sub)
        if sub.pending:
            self._metrics.drop("unsubscribed", len(sub.pending))
        sub.pending = None
        sub.ready = False

    def _flush(self, sub) -> bool:
        """Send what ``sub`` holds, in order; False if its socket is full again."""
        pending = sub.pending
        connection = self.connection
        while pending:
            if connection is None:
                return False
            try:
                connection.send(pending[0])
            except zmq.Again:
                self._schedule_retry()
                return False
            pending.popleft()
        sub.pending = None
        del self._blocked[sub]
        self._overflowing.discard(sub)
        return True

    def _schedule_retry(self) -> None:
        if self._retry is None:
            self._retry = self._clock.callLater(RETRY_INTERVAL, self._retry_blocked)

    def _retry_blocked(self) -> None:
        self._retry = None
        for sub in list(self._blocked):
            if sub.ready or self._covered(sub):
                self._flush(sub)

    def stop(self) -> None:
        """Cancel the retry timer (the socket is closing)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
