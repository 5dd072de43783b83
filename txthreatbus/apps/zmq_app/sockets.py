"""
The zmq-app's sockets, behind a narrow seam.

``IServerSockets`` (in ``txthreatbus.interfaces``) opens the three
endpoints for the pure parts of the plugin (publisher, receiver, management
handler): ``ZmqSockets`` as ZeroMQ sockets (txZMQ connections, CurveZMQ if
configured, monitors), and ``txthreatbus.apps.zmq_app.memory.MemorySockets``
in memory, for tests on a ``Clock``. ``SocketService`` runs one endpoint as a service: it opens and
binds it in ``privilegedStartService`` (so that a port in use aborts
start-up, as twistd starts services synchronously) and closes it in
``stopService``.
"""

from __future__ import annotations

from typing import Callable, Optional

import zmq
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import LogLevel
from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory
from zope.interface import implementer

from txthreatbus.apps.zmq_app.curve import ZapHandler, load_keys, secure
from txthreatbus.apps.zmq_app.manage import ManageConnection
from txthreatbus.apps.zmq_app.monitor import DisconnectMonitor
from txthreatbus.apps.zmq_app.publisher import FLUSH_FRAMES, PublisherConnection
from txthreatbus.apps.zmq_app.receiver import ReceiverConnection
from txthreatbus.config import ZmqAppConfig
from txthreatbus.interfaces import IServerSockets

#: Milliseconds a closing socket may spend sending what it still holds.
LINGER_MS = 100
#: Frames ZeroMQ queues per app SUB connection before it refuses
#: (XPUB_NODROP): two reactor turns' worth (publisher.FLUSH_FRAMES), so that
#: an app that keeps up takes a turn's frames at once even while the last
#: turn's are still going out (10,000 cost the 10-subscriber benchmark a
#: tenth; 100,000 allowed gigabytes per connection).
SEND_HWM = 2 * FLUSH_FRAMES
#: Messages ZeroMQ queues per publishing app at most; fewer, so that they
#: hold at most ``max_buffered_bytes`` of the largest messages allowed.
RECEIVE_HWM = 1000
MIN_RECEIVE_HWM = 16


def receive_hwm(config: ZmqAppConfig) -> int:
    """The receiving socket's high-water mark per app: bounded in bytes too."""
    return max(MIN_RECEIVE_HWM, min(RECEIVE_HWM, config.max_buffered_bytes // config.max_message_size))


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


@implementer(IServerSockets)
class ZmqSockets:
    """
    ZeroMQ sockets in one context of their own, made when the first one
    opens; ``close`` terminates the context in a thread (it waits up to
    ``LINGER_MS`` for what the sockets still send).
    """

    def __init__(self, config: ZmqAppConfig, metrics, reactor):
        self._config = config
        self._metrics = metrics
        self._reactor = reactor
        self._factory = None
        self._keys = None

    @property
    def curve(self) -> bool:
        return self._config.curve is not None

    def _zmq(self) -> ZmqFactory:
        if self._factory is None:
            keys = load_keys(self._config.curve) if self.curve else None
            factory = ZmqFactory()
            factory.reactor = self._reactor
            factory.lingerPeriod = LINGER_MS
            if keys is not None:
                # first: the sockets that follow need it to admit anyone
                ZapHandler(factory, keys, self._metrics, self._reactor)
            self._factory, self._keys = factory, keys
        return self._factory

    def _bind(self, connection, port: int, what: str) -> int:
        if self._keys is not None:
            secure(connection, self._keys)
        return bind(connection, tcp_address(self._config.host, port), what)

    def publisher(self, notify, port):
        connection = PublisherConnection(self._zmq(), notify, SEND_HWM)
        return connection, self._bind(connection, port, "pub")

    def receiver(self, receive, port):
        connection = ReceiverConnection(
            self._zmq(), receive, receive_hwm(self._config), self._config.max_message_size
        )
        port = self._bind(connection, port, "sub")
        DisconnectMonitor(self._zmq(), connection, "sub", self._metrics, self._reactor, LogLevel.info)
        return connection, port

    def manage(self, answer, port):
        connection = ManageConnection(self._zmq(), answer, self._config.max_message_size)
        port = self._bind(connection, port, "manage")
        # request-reply clients come and go: their leaving is no news
        DisconnectMonitor(self._zmq(), connection, "manage", self._metrics, self._reactor, LogLevel.debug)
        return connection, port

    def close(self) -> Deferred:
        factory, self._factory = self._factory, None
        if factory is None:
            return succeed(None)
        for connection in list(factory.connections):
            connection.shutdown()
        context, factory.context, factory.connections = factory.context, None, None
        # term() blocks until the sockets' linger has passed: not in the reactor
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), context.term)


class SocketService(Service):
    """
    A service running one bound endpoint.

    @param open: opens the endpoint and returns its connection and port.
    """

    def __init__(self, name: str, open: Callable[[], tuple]):
        self.name = name
        self._open = open
        self.connection = None
        self.port: Optional[int] = None

    def privilegedStartService(self):
        if self.connection is None:
            self.connection, self.port = self._open()
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
