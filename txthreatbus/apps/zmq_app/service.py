"""
The zmq-app plugin: apps join the bus over ZeroMQ.

``ZmqAppService`` is a ``MultiService`` of three socket services (publisher,
receiver, manage, started in that order so that the endpoints a subscribe
reply names exist before anyone can subscribe). It owns the ZeroMQ context
and the app subscriptions, and it is the ``IApp`` that passes snapshot
requests on to every app but the one that asked.
"""

from __future__ import annotations

import socket

from twisted.application.service import MultiService
from twisted.internet.defer import succeed
from twisted.logger import Logger, LogLevel
from txzmq import ZmqFactory
from zope.interface import implementer

from txthreatbus import logs
from txthreatbus.apps.zmq_app.curve import ZapHandler, load_keys, secure
from txthreatbus.apps.zmq_app.manage import ManageConnection, ManagementHandler
from txthreatbus.apps.zmq_app.monitor import DisconnectMonitor
from txthreatbus.apps.zmq_app.publisher import Publisher, PublisherConnection
from txthreatbus.apps.zmq_app.receiver import ReceiverConnection
from txthreatbus.apps.zmq_app.sockets import SocketService, bind, tcp_address
from txthreatbus.apps.zmq_app.subscriptions import P2P_LENGTH, Subscriptions
from txthreatbus.config import ZmqAppConfig
from txthreatbus.interfaces import IApp

log = Logger(observer=logs.publisher)

#: Milliseconds a closing socket may spend sending what it still holds.
LINGER_MS = 100
#: ZeroMQ's per-peer queue bounds, in messages.
SEND_HWM = 100_000
RECEIVE_HWM = 100_000

WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]")


def advertised_host(config: ZmqAppConfig) -> str:
    """The host that subscribe replies name: never a wildcard."""
    if config.advertise_host:
        return config.advertise_host
    if config.host in WILDCARD_HOSTS:
        return socket.getfqdn()
    return config.host


@implementer(IApp)
class ZmqAppService(MultiService):
    """The zmq-app plugin of one bus."""

    name = "zmq-app"

    def __init__(self, config: ZmqAppConfig, bus, clock):
        super().__init__()
        self.config = config
        self._bus = bus
        self._metrics = bus.metrics
        self._clock = clock
        self._factory = None
        self.publisher = Publisher(clock, bus.metrics, config.buffer_size)
        self.subscriptions = Subscriptions(
            bus,
            self.publisher,
            clock,
            timeout=config.subscription_timeout,
            limit=config.max_subscriptions,
        )
        self._keys = None
        if config.curve is not None:
            # first: the sockets that follow need it to admit anyone
            SocketService("zap", self._open_zap).setServiceParent(self)
        self._publisher_socket = SocketService("pub", self._open_publisher)
        self._receiver_socket = SocketService("sub", self._open_receiver)
        self._manage_socket = SocketService("manage", self._open_manage)
        for child in (self._publisher_socket, self._receiver_socket, self._manage_socket):
            child.setServiceParent(self)
        bus.add_app(self)

    # --- ports, known once bound

    @property
    def ports(self) -> dict:
        """The bound ports by config key (``manage``, ``pub``, ``sub``)."""
        return {
            "manage": self._manage_socket.port,
            "pub": self._publisher_socket.port,
            "sub": self._receiver_socket.port,
        }

    # --- sockets

    def _zmq(self) -> ZmqFactory:
        if self._factory is None:
            self._factory = ZmqFactory()
            self._factory.lingerPeriod = LINGER_MS
        return self._factory

    def _bind(self, connection, key: str) -> int:
        if self._keys is not None:
            secure(connection, self._keys)
        return bind(connection, tcp_address(self.config.host, getattr(self.config, key)), key)

    def _open_zap(self):
        self._keys = load_keys(self.config.curve)
        return ZapHandler(self._zmq(), self._keys, self._metrics), None

    def _open_publisher(self):
        connection = PublisherConnection(self._zmq(), self._subscription_changed, SEND_HWM)
        port = self._bind(connection, "pub")
        self.publisher.connection = connection
        return connection, port

    def _open_receiver(self):
        connection = ReceiverConnection(
            self._zmq(),
            self._bus.publish,
            self._metrics,
            self._clock,
            RECEIVE_HWM,
            self.config.max_message_size,
        )
        port = self._bind(connection, "sub")
        DisconnectMonitor(self._zmq(), connection, "sub", self._metrics, LogLevel.info)
        return connection, port

    def _open_manage(self):
        host = advertised_host(self.config)
        pub, sub = self._publisher_socket.port, self._receiver_socket.port
        handler = ManagementHandler(
            self.subscriptions,
            {
                "pub_endpoint": f"{host}:{pub}",
                "sub_endpoint": f"{host}:{sub}",
                "pub_port": pub,
                "sub_port": sub,
            },
            self._metrics,
            self._clock,
        )
        connection = ManageConnection(
            self._zmq(), handler.handle, self._metrics, self._clock, self.config.max_message_size
        )
        port = self._bind(connection, "manage")
        # request-reply clients come and go: their leaving is no news
        DisconnectMonitor(self._zmq(), connection, "manage", self._metrics, LogLevel.debug)
        return connection, port

    def _subscription_changed(self, subscribed: bool, topic: bytes) -> None:
        if len(topic) < P2P_LENGTH:
            self.publisher.prefix_subscribed(topic, subscribed)
            return
        sub = self.subscriptions.get(topic[:P2P_LENGTH].decode("ascii", "replace"))
        if sub is not None:
            self.publisher.subscribed(sub, subscribed)

    # --- IApp

    def snapshot(self, request, requester):
        for sub in self.subscriptions:
            if sub is not requester:
                sub(request)
        return succeed(None)

    # --- lifecycle

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except Exception:
            self._close()
            raise

    def startService(self):
        self.privilegedStartService()
        super().startService()

    def stopService(self):
        d = super().stopService()
        d.addCallback(lambda _: self._close())
        return d

    def _close(self):
        self.publisher.stop()
        self.publisher.connection = None
        self.subscriptions.clear()
        for child in self:
            child.close()
        factory, self._factory = self._factory, None
        if factory is not None:
            factory.shutdown()
