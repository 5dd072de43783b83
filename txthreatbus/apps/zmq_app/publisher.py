"""
The PUB side: each message to each app as one frame ``<P2P><suffix> <json>``,
the suffix being the message's type (``intel``, ``indicator``, ``sighting``,
``snapshotrequest``) and the JSON its generation's (a snapshot request, the
one message both generations get, in the shape of the app's).

Every frame goes into its app's buffer, and the buffers go out together at
the end of the reactor turn (or once ``FLUSH_FRAMES`` are held): ZeroMQ's
I/O thread then wakes once for a batch of frames instead of once per frame,
and spends a fifth of the CPU on each.

The socket is an XPUB in manual mode (apps see a PUB): a SUB socket's
subscription takes effect only if it begins with a live P2P topic (see
``Subscriptions.notice``), so no peer can read another app's stream, and an
app is ready once its own SUB socket subscribed. Until then, and while the
app reads too slowly for ZeroMQ's high-water mark (``XPUB_NODROP`` makes
libzmq refuse instead of dropping), its frames stay in its buffer and go out
in order as soon as they can. Buffers are bounded in bytes, per app
(``buffer_bytes``) and in all (``max_buffered_bytes``); past a bound the
oldest frames are dropped, counted by reason.
"""

from __future__ import annotations

from collections import deque

import zmq
from twisted.logger import Logger
from zope.interface import implementer

from txthreatbus import codec, logs, stix
from txthreatbus.connections import XPubConnection
from txthreatbus.interfaces import IPublisherSocket
from txthreatbus.model import Intel, Sighting, SnapshotRequest

log = Logger(observer=logs.publisher)

# The suffix of each message type's frames: its name in Threat Bus, which
# is the last part of its topic (both generations' sightings are "sighting").
_SUFFIXES = {
    cls: cls.topic.rsplit("/", 1)[1].encode() + b" "
    for cls in (Intel, Sighting, stix.Indicator, stix.Sighting, SnapshotRequest)
}

#: Seconds between tries to send to an app whose socket was full, unless
#: ZeroMQ says sooner that it drained.
RETRY_INTERVAL = 0.005
#: Frames a reactor turn may hold before they go out anyway: a turn that
#: routes many messages to many apps would otherwise hold them all at once.
FLUSH_FRAMES = 10_000
#: Subscription notices ZeroMQ queues per app SUB socket.
NOTICE_HWM = 100
#: Bytes a subscription notice may have.
NOTICE_MAX_SIZE = 1024
#: Bytes a held frame costs beyond its own length (its bytes object and its
#: place in a deque), so that a bound in bytes also bounds tiny frames.
FRAME_OVERHEAD = 64


@implementer(IPublisherSocket)
class PublisherConnection(XPubConnection):
    """
    The bus's XPUB in manual mode: a SUB socket's (un)subscription takes
    effect only where ``notify(subscribed, topic)`` returns True.
    """

    def __init__(self, factory, notify, send_hwm: int):
        XPubConnection.__init__(self, factory, notify, send_hwm)
        self.socket.setsockopt(zmq.XPUB_MANUAL, 1)
        # ZeroMQ takes in all that a peer's pipe holds at the first read:
        # a short pipe bounds that work under a flood of subscriptions.
        self.socket.setsockopt(zmq.RCVHWM, NOTICE_HWM)
        # A subscription is a P2P topic and maybe a suffix: ZeroMQ closes the
        # connection of a peer that sends more than this in one message.
        self.socket.setsockopt(zmq.MAXMSGSIZE, NOTICE_MAX_SIZE)

    #: Called when ZeroMQ may take frames it refused: set by the publisher.
    drained = None

    def doRead(self):
        # ZeroMQ wakes the descriptor when a peer's full queue has drained
        # (among other news): the time to retry what the socket refused.
        XPubConnection.doRead(self)
        if self.drained is not None and self.factory is not None:
            self.drained()

    def messageReceived(self, message):
        # ZeroMQ applies a setsockopt to the peer of the notice read last:
        # decide now, before the next read.
        frame = message[0]
        kind, topic = frame[:1], frame[1:]
        if kind == b"\x01":
            if self._notify(True, topic):
                self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        elif kind == b"\x00":
            self._notify(False, topic)
            self.socket.setsockopt(zmq.UNSUBSCRIBE, topic)


class Publisher:
    """
    Sends messages to app subscriptions, buffering what cannot go yet.

    @param connection: set once the socket is open: an ``IPublisherSocket``.
    """

    def __init__(self, clock, metrics, buffer_bytes: int, max_buffered_bytes: int):
        self._clock = clock
        self._metrics = metrics
        self._buffer_bytes = buffer_bytes
        self._max_buffered_bytes = max_buffered_bytes
        self._throttle = logs.Throttle(clock)
        #: Subscriptions holding frames, in the order their buffers began:
        #: the first holds the oldest frame.
        self._waiting = {}
        self._due = {}  # those of them to flush at the end of this reactor turn
        self._refused = set()  # those whose socket was full, until the retry
        self._due_frames = 0  # frames held since _due was last flushed
        self._turn = None  # the call that flushes _due
        self._retry = None  # the call that flushes _refused
        #: Bytes held in all buffers, overhead included.
        self.held_bytes = 0
        self.connection = None

    def send(self, sub, message) -> None:
        """Send ``message`` to the app of ``sub``, at the end of this reactor turn."""
        self.send_all((sub,), message)

    def send_all(self, subs, message) -> None:
        """
        Send ``message`` to the apps of ``subs``, at the end of this reactor
        turn: encoded once, each app's frame its P2P topic before that.
        """
        cls = type(message)
        self._metrics.published[cls.kind].inc(len(subs))
        tail = _SUFFIXES[cls] + codec.encode(message)
        # the one message both generations get, each in its own shape
        tail_2022 = _SUFFIXES[cls] + codec.encode_2022_request(message) if cls is SnapshotRequest else tail
        limit = self._buffer_bytes
        due = self._due
        for sub in subs:
            frame = sub.prefix + (tail_2022 if sub.stix else tail)
            size = len(frame) + FRAME_OVERHEAD
            if sub.pending_bytes + size > limit and self._can_send(sub):
                self._flush(sub)  # full: send it all now if the app can take it
            pending = sub.pending
            if pending is None:
                pending = sub.pending = deque()
                self._waiting[sub] = None
            pending.append(frame)
            sub.pending_bytes += size
            self.held_bytes += size
            if sub.pending_bytes > limit or self.held_bytes > self._max_buffered_bytes:
                self._bound(sub)
            if sub.readers and sub.pending is not None:
                due[sub] = None
        self._due_frames += len(subs)
        if self._due_frames >= FLUSH_FRAMES:
            self._flush_due()
        elif self._turn is None and due:
            self._turn = self._clock.callLater(0, self._end_turn)

    def _make_due(self, sub) -> None:
        self._due[sub] = None
        if self._due_frames >= FLUSH_FRAMES:
            self._flush_due()
        elif self._turn is None:
            self._turn = self._clock.callLater(0, self._end_turn)

    def _bound(self, sub) -> None:
        """Drop the oldest frames past ``buffer_bytes`` for ``sub``, and past ``max_buffered_bytes`` in all."""
        if sub.pending_bytes > self._buffer_bytes:
            # its newest frame stays, however large: the bound is on what waits
            self._drop_oldest(sub, "buffer_overflow", lambda: sub.pending_bytes > self._buffer_bytes, keep=1)
        while self.held_bytes > self._max_buffered_bytes:
            self._drop_oldest(
                self._overflowing(), "max_buffered_bytes", lambda: self.held_bytes > self._max_buffered_bytes
            )

    def _overflowing(self):
        """
        Whose frames to drop when all buffers hold too much: the oldest of an
        app that cannot take them now, so that apps keeping up lose nothing.
        """
        for sub in self._waiting:
            if not sub.readers or sub in self._refused:
                return sub
        return next(iter(self._waiting))

    def _drop_oldest(self, sub, reason: str, over, keep: int = 0) -> None:
        """Drop ``sub``'s oldest frames while ``over()``, keeping at least ``keep``."""
        pending, dropped = sub.pending, 0
        while over() and len(pending) > keep:
            size = len(pending.popleft()) + FRAME_OVERHEAD
            sub.pending_bytes -= size
            self.held_bytes -= size
            dropped += 1
            if not pending:
                self._forget(sub)
                break
        self._metrics.drop(reason, dropped)
        self._throttle(
            reason,
            log.warn,
            "Dropped the oldest messages of {p2p}: its buffer is over {reason} "
            "(the app reads too slowly, or never connected)",
            p2p=sub.p2p,
            reason=reason,
        )

    def ready(self, sub) -> None:
        """
        The app's SUB socket has subscribed to its topic: send what it holds
        at the end of this reactor turn (the subscription takes effect once
        the notice has been handled).
        """
        if sub.pending is not None:
            self._make_due(sub)

    def discard(self, sub) -> None:
        """Forget ``sub`` and what it holds (it unsubscribed)."""
        if sub.pending:
            self._metrics.drop("unsubscribed", len(sub.pending))
        self._forget(sub)

    def _forget(self, sub) -> None:
        self._waiting.pop(sub, None)
        self._due.pop(sub, None)
        self._refused.discard(sub)
        self.held_bytes -= sub.pending_bytes
        sub.pending = None
        sub.pending_bytes = 0

    def _flush(self, sub) -> bool:
        """Send what ``sub`` holds, in order; False if its socket is full again."""
        if self.connection is None:  # not started, or stopped
            return False
        pending = sub.pending
        if self.connection.send_from(pending):
            self._forget(sub)
            return True
        # Refused part way: count what is left (rare, and in C).
        left = sum(map(len, pending)) + FRAME_OVERHEAD * len(pending)
        self.held_bytes -= sub.pending_bytes - left
        sub.pending_bytes = left
        self._refused.add(sub)
        if self._retry is None:
            self._retry = self._clock.callLater(RETRY_INTERVAL, self._retry_refused)
        return False

    def _can_send(self, sub) -> bool:
        """Whether ``sub`` holds frames its app can take now, as far as we know."""
        return sub.pending is not None and sub.readers and sub not in self._refused

    def _end_turn(self) -> None:
        self._turn = None
        self._flush_due()

    def _flush_due(self) -> None:
        due, self._due = self._due, {}
        self._due_frames = 0
        for sub in due:
            if self._can_send(sub):
                self._flush(sub)

    def drained(self) -> None:
        """The socket may take frames it refused: send them now."""
        if self._refused:
            self._retry_refused()

    def _retry_refused(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
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
