"""
txZMQ connections that the bus and the client both use.

``BatchedReadConnection`` reads a socket a bounded batch per reactor turn,
in messages, bytes and time, so that a flood on it cannot starve the other
sockets (a receive-only SUB, a REP that answers each request as it reads
it, an XPUB's subscription notices).
``XPubConnection`` is a PUB socket to its peers that reports their
subscriptions and refuses (``zmq.Again``) instead of dropping when full.
"""

from __future__ import annotations

import time

import zmq
import zmq.backend
from twisted.logger import Logger
from txzmq import ZmqConnection

from txthreatbus import logs

log = Logger(observer=logs.publisher)

#: pyzmq's compiled send, without the Python layer of zmq.Socket.send
#: (which only adds routing ids and groups): half the cost of a frame.
_send = zmq.backend.Socket.send
_NOBLOCK = int(zmq.NOBLOCK)


class BatchedReadConnection(ZmqConnection):
    """
    A socket read at most ``batch`` messages, ``batch_bytes`` bytes or
    ``batch_seconds`` of handling them a reactor turn (messages that are
    expensive to check, such as STIX patterns for the full parser, cannot
    hold the reactor); it sends only from ``messageReceived``, or schedules a
    read after it sends (``XPubConnection.send_from``).

    ``frame`` is the last frame of the message being handled: its
    properties (``frame.get("Peer-Address")``) say who sent it.
    """

    batch = 500
    batch_bytes = 4 << 20
    batch_seconds = 0.02
    #: The clock of ``batch_seconds``.
    now = staticmethod(time.monotonic)
    frame = None
    #: Whether each frame is a message of its own, as Threat Bus reads
    #: what apps publish: ZeroMQ is not asked whether more frames follow,
    #: which costs more than a small frame itself (``frame`` stays None).
    frame_by_frame = False

    def doRead(self):
        """The reactor's call: the socket's descriptor is readable (ZeroMQ has news)."""
        self.read()

    def read(self):
        """Read a batch, and schedule the next one if there may be more."""
        # Reading until EAGAIN re-arms ZeroMQ's edge-triggered descriptor,
        # whatever messageReceived sent meanwhile, so txZMQ's per-message
        # ZMQ_EVENTS check and logging context are not needed. After a
        # batch the rest is read on the next turn, which we schedule
        # ourselves: a flood on one socket cannot starve the others.
        if self.read_scheduled is not None:
            if self.read_scheduled.active():
                self.read_scheduled.cancel()
            self.read_scheduled = None
        recv = self.socket.recv
        whole = not self.frame_by_frame
        size = 0
        deadline = self.now() + self.batch_seconds
        for _ in range(self.batch):
            if self.factory is None:  # shut down meanwhile
                return
            try:
                if whole:
                    # recv_multipart asks ZMQ_RCVMORE with getsockopt, which
                    # costs more than the frame itself: a Frame knows it
                    frame = recv(_NOBLOCK, copy=False)
                    data = frame.bytes
                    message = [data]
                    size += len(data)
                    while frame.more:
                        frame = recv(_NOBLOCK, copy=False)
                        data = frame.bytes
                        message.append(data)
                        size += len(data)
                    self.frame = frame
                else:
                    data = recv(_NOBLOCK)
                    message = [data]
                    size += len(data)
            except zmq.Again:
                return
            try:
                self.messageReceived(message)
            except Exception:
                log.failure("Handling a message on {connection!r} failed", connection=self)
            if size >= self.batch_bytes or self.now() > deadline:
                break
        if self.factory is not None:
            self.read_scheduled = self.factory.reactor.callLater(0, self.read)


class XPubConnection(BatchedReadConnection):
    """
    An XPUB socket reporting each (un)subscription to ``notify(subscribed,
    topic)``; it refuses (``send_from`` returns False) instead of dropping
    what a full peer cannot take.
    """

    socketType = zmq.XPUB
    frame_by_frame = True  # (subscription notices are single frames)

    def __init__(self, factory, notify, send_hwm: int):
        self._notify = notify
        BatchedReadConnection.__init__(self, factory)
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        self.socket.setsockopt(zmq.SNDHWM, send_hwm)

    def send_from(self, frames) -> bool:
        """
        Send the single-frame messages of the deque ``frames`` from its left,
        removing each one sent; False if the socket refused one (full).
        """
        socket, sent = self.socket, 0
        try:
            for frame in frames:
                _send(socket, frame, _NOBLOCK)
                sent += 1
            frames.clear()
            return True
        except zmq.Again:
            for _ in range(sent):
                frames.popleft()
            return False
        finally:
            # As txZMQ's send does: ZeroMQ may not signal what arrived
            # (subscriptions) after we touched the socket.
            if self.read_scheduled is None:
                self.read_scheduled = self.factory.reactor.callLater(0, self.read)

    def messageReceived(self, message):
        frame = message[0]
        if frame[:1] in (b"\x01", b"\x00"):
            self._notify(frame[:1] == b"\x01", frame[1:])
