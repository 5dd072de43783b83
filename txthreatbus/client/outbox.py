"""
Publishing with bounds: a subscription's ``Outbox`` holds what it publishes,
in order, until the bus's SUB socket takes it (ZeroMQ's "slow joiner") and
while ZeroMQ's queue is full, retrying shortly.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import zmq
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txthreatbus import logs
from txthreatbus.client.deferreds import Waiters
from txthreatbus.client.errors import ClientStopped
from txthreatbus.client.transport import IPublisherSocket

log = Logger(observer=logs.publisher)

#: Seconds between tries to send when ZeroMQ's queue is full.
RETRY_INTERVAL = 0.005


class Outbox:
    """
    Frames on their way to the bus's SUB socket, in order.

    A frame goes out once the bus has subscribed to a prefix of its topic
    (before that, ZeroMQ would drop it), and while ZeroMQ's queue has room;
    otherwise it waits, and so do the frames after it.
    """

    def __init__(self, clock, retry_interval: float = RETRY_INTERVAL):
        self._clock = clock
        self._retry_interval = retry_interval
        self._frames: deque = deque()
        self._accepted: set = set()
        self._socket: Optional[IPublisherSocket] = None
        self._retry = None
        self._waiters = Waiters()

    def __len__(self):
        return len(self._frames)

    def attach(self, socket: IPublisherSocket) -> None:
        """Send through ``socket`` from now on; the previous one is closed."""
        previous, self._socket = self._socket, socket
        self._accepted = set()
        if previous is not None:
            previous.close()

    def close(self) -> None:
        """Close the socket; frames not handed to ZeroMQ are dropped, waiters fail."""
        self.attach(None)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._frames:
            log.warn(
                "{n} messages for Threat Bus were not sent: the bus did not take them in time",
                n=len(self._frames),
            )
            self._frames.clear()
        self._waiters.fail_all(ClientStopped("the subscription is closed"))

    def notify(self, subscribed: bool, prefix: bytes) -> None:
        """The bus's SUB socket (un)subscribed ``prefix``."""
        if subscribed:
            self._accepted.add(prefix)
        else:
            self._accepted.discard(prefix)
        log.debug(
            "Threat Bus {what} {prefix!r}",
            what="takes" if subscribed else "no longer takes",
            prefix=prefix,
        )
        self.flush()

    def accepts(self, topic: Optional[bytes] = None) -> bool:
        """Whether the bus takes ``topic`` now (any topic, if None)."""
        if topic is None:
            return bool(self._accepted)
        return any(topic.startswith(prefix) for prefix in self._accepted)

    def put(self, topic: bytes, frame: bytes) -> None:
        """Send ``frame`` on ``topic`` as soon as it can go."""
        self._frames.append((topic, frame))
        if len(self._frames) == 1:
            self.flush()

    def flush(self) -> None:
        """Hand ZeroMQ what can go now."""
        frames, socket = self._frames, self._socket
        while frames and socket is not None:
            topic, frame = frames[0]
            if not self.accepts(topic):
                break
            try:
                socket.send(frame)
            except zmq.Again:
                self._schedule_retry()
                break
            frames.popleft()
        self._waiters.check()

    def _schedule_retry(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self._clock.callLater(self._retry_interval, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        try:
            self.flush()
        except Exception:
            log.failure("Sending to Threat Bus failed")

    def ready(self, topic: Optional[bytes] = None) -> Deferred:
        """A Deferred that fires once the bus takes ``topic`` (any topic, if None)."""
        return self._waiters.wait(lambda: self.accepts(topic))

    def drained(self) -> Deferred:
        """A Deferred that fires once every frame put so far is handed to ZeroMQ."""
        return self._waiters.wait(lambda: not self._frames)
