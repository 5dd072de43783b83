"""
ZeroMQ sockets as services.

``SocketService`` owns one txZMQ connection: it creates and binds it in
``privilegedStartService`` (so that a port in use aborts start-up, as
twistd starts services synchronously) and shuts it down in ``stopService``.
"""

from __future__ import annotations

from typing import Callable, Optional

import zmq
from twisted.application.service import Service
from twisted.logger import Logger
from txzmq import ZmqEndpoint, ZmqEndpointType

from txthreatbus import logs

log = Logger(observer=logs.publisher)


class BindError(Exception):
    """A socket could not be bound; the text says which and why."""


def tcp_address(host: str, port: int) -> str:
    """The ZeroMQ address to bind ``host``:``port`` (port 0: any free port)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port or '*'}"


def bind(connection, address: str, what: str) -> int:
    """Bind ``connection`` to ``address`` and return the port it got."""
    try:
        connection.addEndpoints([ZmqEndpoint(ZmqEndpointType.bind, address)])
    except zmq.ZMQError as e:
        connection.shutdown()
        raise BindError(f"zmq-app cannot bind its {what} endpoint {address}: {e}") from None
    endpoint = connection.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
    return int(endpoint.rsplit(":", 1)[1])


class SocketService(Service):
    """
    A service running one bound txZMQ connection.

    @param open: makes the connection, binds it and returns it with its port.
    """

    def __init__(self, name: str, open: Callable[[], tuple]):
        self.name = name
        self._open = open
        self.connection = None
        self.port: Optional[int] = None

    def privilegedStartService(self):
        if self.connection is None:
            self.connection, self.port = self._open()
            if self.port is not None:
                log.info("zmq-app {name} endpoint bound on port {port}", name=self.name, port=self.port)
        super().privilegedStartService()

    def startService(self):
        self.privilegedStartService()
        super().startService()

    def stopService(self):
        self.close()
        return super().stopService()

    def close(self):
        """Close the socket; harmless if it is closed."""
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.shutdown()
