"""
Watching the receiving sockets for closed connections.

ZeroMQ refuses a message larger than ``max_message_size`` by closing the
sender's connection, and says so to nobody but a socket monitor. So each
receiving socket gets a monitor: every closed app connection is counted
(``txthreatbus_disconnects_total{endpoint=...}``) and logged (a flood of
them once every 10 s), whether the app left or was refused.
"""

from __future__ import annotations

import itertools

import zmq
from twisted.logger import Logger
from txzmq import ZmqEndpoint, ZmqEndpointType
from zmq.utils.monitor import parse_monitor_message

from txthreatbus import logs
from txthreatbus.connections import BatchedReadConnection

log = Logger(observer=logs.publisher)

_numbers = itertools.count()


class DisconnectMonitor(BatchedReadConnection):
    """Reports each connection that ``watched``'s socket loses (read in batches: peers can flood it)."""

    socketType = zmq.PAIR

    def __init__(self, factory, watched, endpoint: str, metrics, clock, level):
        self._watched = watched.socket
        self._throttle = logs.Throttle(clock)
        self._endpoint = endpoint
        self._counter = metrics.disconnects.labels(endpoint)
        self._level = level
        address = f"inproc://txthreatbus-monitor-{endpoint}-{next(_numbers)}"
        self._watched.monitor(address, zmq.EVENT_DISCONNECTED)
        BatchedReadConnection.__init__(self, factory, ZmqEndpoint(ZmqEndpointType.connect, address))

    def messageReceived(self, message):
        event = parse_monitor_message(message)
        if event["event"] == zmq.EVENT_DISCONNECTED:
            self._counter.inc()
            self._throttle(
                "disconnected",
                lambda format, **fields: log.emit(self._level, format, **fields),
                "An app's connection to the {endpoint} endpoint closed: the app left, or "
                "sent a message larger than max_message_size",
                endpoint=self._endpoint,
            )

    def shutdown(self):
        if self._watched is not None and not self._watched.closed:
            self._watched.disable_monitor()
        self._watched = None
        BatchedReadConnection.shutdown(self)
