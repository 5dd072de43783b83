"""
The PUB side: each message to each app as one frame ``<P2P><suffix> <json>``.

Every frame goes into its app's bounded buffer, and the buffers go out
together at the end of the reactor turn (or once ``FLUSH_FRAMES`` are held):
ZeroMQ's I/O thread then wakes once for a batch of frames instead of once
per frame, and spends a fifth of the CPU on each. The socket is an XPUB (apps see a PUB): it tells us when an
app's SUB socket subscribes to its P2P topic. Until then, and while the app
reads too slowly for ZeroMQ's high-water mark (``XPUB_NODROP`` makes libzmq
refuse instead of dropping), its frames stay in its buffer and go out in
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
#: Frames a reactor turn may hold before they go out anyway: a turn that
#: routes many messages to many apps would otherwise hold them all at once.
FLUSH_FRAMES = 10_000


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
        self._waiting = {}  # subscriptions holding frames, in order of arrival
        self._due = {}  # those of them to flush at the end of this reactor turn
        self._refused = set()  # those whose socket was full, until the retry
        self._overflowing = set()  # those warned of since their last flush
        self._due_frames = 0  # frames held since _due was last flushed
        self._turn = None  # the call that flushes _due
        self._retry = None  # the call that flushes _refused
        #: Topics shorter than a P2P topic that some app's SUB socket
        #: subscribed to (b"": everything); they cover every P2P topic they
        #: begin. Threat Bus apps subscribe to their own P2P topic instead.
        self._prefixes = set()
        self.connection = None

    def send(self, sub, message) -> None:
        """Send ``message`` to the app of ``sub``, at the end of this reactor turn."""
        cls = type(message)
        self._metrics.published[_TYPE_NAMES[cls]].inc()
        self._hold(sub, sub.prefix + _SUFFIXES[cls] + codec.encode(message))
        if sub.ready or self._covered(sub):
            self._due[sub] = None
            self._due_frames += 1
            if self._due_frames >= FLUSH_FRAMES:
                self._flush_due()
            elif self._turn is None:
                self._turn = self._clock.callLater(0, self._end_turn)

    def _hold(self, sub, frame: bytes) -> None:
        if sub.pending is not None and len(sub.pending) >= self._buffer_size:
            # Full: send it all now if the app can take it, else drop the oldest.
            if not (self._can_send(sub) and self._flush(sub)):
                sub.pending.popleft()
                self._metrics.drop("buffer_overflow")
                if sub not in self._overflowing:
                    self._overflowing.add(sub)
                    log.warn("Buffer of {p2p} is full: dropping its oldest messages", p2p=sub.p2p)
        if sub.pending is None:
            sub.pending = deque()
            self._waiting[sub] = None
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
        for sub in list(self._waiting):
            if sub.prefix.startswith(prefix):
                self._flush(sub)

    def discard(self, sub) -> None:
        """Forget ``sub`` and what it holds (it unsubscribed)."""
        self._waiting.pop(sub, None)
        self._due.pop(sub, None)
        self._refused.discard(sub)
        self._overflowing.discard(sub)
        if sub.pending:
            self._metrics.drop("unsubscribed", len(sub.pending))
        sub.pending = None
        sub.ready = False

    def _flush(self, sub) -> bool:
        """Send what ``sub`` holds, in order; False if its socket is full again."""
        if self.connection is None:  # not started, or stopped
            return False
        if not self.connection.send_from(sub.pending):
            self._refused.add(sub)
            if self._retry is None:
                self._retry = self._clock.callLater(RETRY_INTERVAL, self._retry_refused)
            return False
        sub.pending = None
        del self._waiting[sub]
        self._refused.discard(sub)
        self._overflowing.discard(sub)
        return True

    def _can_send(self, sub) -> bool:
        """Whether ``sub`` holds frames its app can take now, as far as we know."""
        return (
            sub.pending is not None
            and sub not in self._refused
            and (sub.ready or self._covered(sub))
        )

    def _end_turn(self) -> None:
        self._turn = None
        self._flush_due()

    def _flush_due(self) -> None:
        due, self._due = self._due, {}
        self._due_frames = 0
        for sub in due:
            if self._can_send(sub):
                self._flush(sub)

    def _retry_refused(self) -> None:
        self._retry = None
        refused, self._refused = self._refused, set()
        for sub in refused:
            if self._can_send(sub):
                self._flush(sub)

    def stop(self) -> None:
        """Send what is due now and cancel the timers (the socket is closing)."""
        self._flush_due()
        for call in (self._turn, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._turn = self._retry = None
