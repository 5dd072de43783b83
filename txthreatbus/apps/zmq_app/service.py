"""
The zmq-app plugin: apps join the bus over ZeroMQ.

``ZmqAppService`` wires the plugin's pure parts (the publisher and its
buffers, the subscriptions, the receiver, the management handler) to three
endpoints that ``IServerSockets`` opens: ZeroMQ sockets, or memory fakes in
tests. The endpoints are socket services, started in the order publisher,
receiver, manage, so that the endpoints a subscribe reply names exist before
anyone can subscribe. It is also the ``IApp`` that passes snapshot requests
on to every app but the one that asked.
"""

from __future__ import annotations

import ipaddress
import socket

from twisted.application.service import MultiService, Service
from twisted.internet.defer import succeed
from twisted.logger import Logger
from zope.interface import implementer

from txthreatbus import logs
from txthreatbus.apps.zmq_app.manage import ManagementHandler
from txthreatbus.apps.zmq_app.publisher import Publisher
from txthreatbus.apps.zmq_app.receiver import Receiver
from txthreatbus.apps.zmq_app.sockets import SocketService, ZmqSockets
from txthreatbus.apps.zmq_app.subscriptions import Subscriptions
from txthreatbus.config import WILDCARD_HOSTS, ZmqAppConfig
from txthreatbus.interfaces import IApp
from txthreatbus.services import stop_children

log = Logger(observer=logs.publisher)

ENDPOINTS = ("manage", "pub", "sub")


def advertised_host(config: ZmqAppConfig) -> str:
    """The host that subscribe replies name: never a wildcard."""
    if config.advertise_host:
        return config.advertise_host
    if config.host in WILDCARD_HOSTS:
        return socket.getfqdn()
    return config.host


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (it resolves to a loopback address)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if host == "localhost" or host.startswith("localhost."):
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


@implementer(IApp)
class ZmqAppService(MultiService):
    """
    The zmq-app plugin of one bus.

    @param sockets: the ``IServerSockets`` to open; ZeroMQ's by default.
    """

    name = "zmq-app"

    def __init__(self, config: ZmqAppConfig, bus, clock, sockets=None):
        super().__init__()
        self.config = config
        self._bus = bus
        self._metrics = bus.metrics
        self._clock = clock
        self._opened = False
        self.sockets = ZmqSockets(config, bus.metrics, clock) if sockets is None else sockets
        self.publisher = Publisher(clock, bus.metrics, config.buffer_bytes, config.max_buffered_bytes)
        peer_limit = config.max_subscriptions_per_peer or max(1, config.max_subscriptions // 4)
        self.subscriptions = Subscriptions(
            bus,
            self.publisher,
            clock,
            timeout=config.subscription_timeout,
            limit=config.max_subscriptions,
            peer_limit=peer_limit,
            snapshot_timeout=config.snapshot_timeout,
        )
        self.receiver = Receiver(bus.publish, bus.metrics, clock)
        self._endpoints = {
            "pub": SocketService("pub", self._open_publisher),
            "sub": SocketService("sub", self._open_receiver),
            "manage": SocketService("manage", self._open_manage),
        }
        for child in self._endpoints.values():
            child.setServiceParent(self)

    @property
    def ports(self) -> dict:
        """The bound ports by config key (``manage``, ``pub``, ``sub``)."""
        return {key: self._endpoints[key].port for key in ENDPOINTS}

    def status(self, limit: int) -> dict:
        """
        What the status page shows of this plugin: where it listens, and its
        first ``limit`` subscriptions (``Subscriptions.status``).
        """
        return {
            "name": self.name,
            "host": self.config.host,
            "advertised_host": advertised_host(self.config),
            "ports": self.ports,
            "curve": bool(self.sockets.curve),
            "subscription_count": len(self.subscriptions),
            "held_snapshot_requests": self.subscriptions.held_requests(),
            "buffered_bytes": self.publisher.held_bytes,
            "subscriptions": self.subscriptions.status(limit),
        }

    # --- endpoints

    def _open_publisher(self):
        connection, port = self.sockets.publisher(self.subscriptions.notice, self.config.pub)
        connection.drained = self.publisher.drained
        self.publisher.connection = connection
        return connection, port

    def _open_receiver(self):
        return self.sockets.receiver(self.receiver, self.config.sub)

    def _open_manage(self):
        host = advertised_host(self.config)
        pub, sub = self._endpoints["pub"].port, self._endpoints["sub"].port
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
        return self.sockets.manage(handler.answer, self.config.manage)

    def _say_where(self) -> None:
        host, advertised = self.config.host, advertised_host(self.config)
        for key in ENDPOINTS:
            log.info(
                "{plugin} {endpoint} endpoint listening on {host}:{port}, advertised to apps as "
                "{advertised}:{port}, CURVE {curve}",
                plugin=self.name,
                endpoint=key,
                host=host,
                port=self._endpoints[key].port,
                advertised=advertised,
                curve="on" if self.sockets.curve else "off",
            )
        if host in WILDCARD_HOSTS and is_loopback(advertised):
            log.warn(
                "{plugin} listens on all interfaces ({host}) but tells apps to connect to "
                "{advertised}, which is this machine only: set advertise_host to a name or "
                "address that apps elsewhere can reach",
                plugin=self.name,
                host=host,
                advertised=advertised,
            )

    # --- IApp

    def snapshot(self, request, requester):
        self.subscriptions.pass_on(request, requester)
        return succeed(None)

    # --- lifecycle

    def privilegedStartService(self):
        if self._opened:
            return
        self._opened = True
        try:
            super().privilegedStartService()
        except Exception:
            self._flush()
            for child in self:
                child.close()
            self.sockets.close().addErrback(
                lambda f: log.failure("Closing the zmq-app after a failed start failed", f)
            )
            raise
        self._say_where()

    def startService(self):
        self.privilegedStartService()
        super().startService()

    def stopService(self):
        """Send what is due, close the endpoints, then free the sockets."""
        if not self._opened:
            return succeed(None)
        Service.stopService(self)
        self._flush()
        stopped = stop_children(self)
        stopped.addCallback(lambda _: self.sockets.close())
        return stopped.addErrback(lambda f: log.failure("Stopping the zmq-app failed", f))

    def _flush(self) -> None:
        self._opened = False
        self.publisher.stop()
        self.publisher.connection = None
        self.subscriptions.clear()
