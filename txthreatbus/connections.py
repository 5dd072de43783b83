"""
txZMQ connections that the bus and the client both use.

``BatchedReadConnection`` reads a socket a bounded batch per reactor turn,
so that a flood on it cannot starve the other sockets (a receive-only SUB,
or a ROUTER that answers each request as it reads it).
``XPubConnection`` is a PUB socket to its peers that reports their
subscriptions and refuses (``zmq.Again``) instead of dropping when full.
"""

from __future__ import annotations

import zmq
from twisted.logger import Logger
from txzmq import ZmqConnection

from txthreatbus import logs

log = Logger(observer=logs.publisher)


class BatchedReadConnection(ZmqConnection):
    """
    A socket read at most ``batch`` messages a reactor turn; it sends only
    from ``messageReceived``, if at all.
    """

    batch = 500

    def doRead(self):
        # Reading until EAGAIN re-arms ZeroMQ's edge-triggered descriptor,
        # whatever messageReceived sent meanwhile, so txZMQ's per-message
        # ZMQ_EVENTS check and logging context are not needed. After
        # ``batch`` messages the rest is read on the next turn, which we
        # schedule ourselves.
        if self.read_scheduled is not None:
            if self.read_scheduled.active():
                self.read_scheduled.cancel()
            self.read_scheduled = None
        recv = self.socket.recv
        for _ in range(self.batch):
            if self.factory is None:  # shut down meanwhile
                return
            try:
                # recv_multipart asks ZMQ_RCVMORE with getsockopt, which
                # costs more than the frame itself: a Frame knows it
                frame = recv(zmq.NOBLOCK, copy=False)
                message = [frame.bytes]
                while frame.more:
                    frame = recv(zmq.NOBLOCK, copy=False)
                    message.append(frame.bytes)
            except zmq.Again:
                return
            try:
                self.messageReceived(message)
            except Exception:
                log.failure("Handling a message on {connection!r} failed", connection=self)
        self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)


class XPubConnection(ZmqConnection):
    """An XPUB socket reporting each (un)subscription to ``notify(subscribed, topic)``."""

    socketType = zmq.XPUB

    def __init__(self, factory, notify, send_hwm: int):
        self._notify = notify
        ZmqConnection.__init__(self, factory)
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        self.socket.setsockopt(zmq.SNDHWM, send_hwm)

    def send_from(self, frames) -> bool:
        """
        Send the single-frame messages of the deque ``frames`` from its left,
        removing each one sent; False if the socket refused one (full).
        """
        send = self.socket.send
        try:
            while frames:
                send(frames[0], zmq.NOBLOCK)
                frames.popleft()
            return True
        except zmq.Again:
            return False
        finally:
            # As txZMQ's send does: ZeroMQ may not signal what arrived
            # (subscriptions) after we touched the socket.
            if self.read_scheduled is None:
                self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)

    def messageReceived(self, message):
        for frame in message:
            if frame[:1] in (b"\x01", b"\x00"):
                self._notify(frame[:1] == b"\x01", frame[1:])
