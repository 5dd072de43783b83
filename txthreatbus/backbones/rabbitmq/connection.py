"""
Reaching the broker: the endpoint (TCP, or TLS for amqps), pika's Twisted
protocol telling why a connection failed, and the gate that lets Twisted's
``ClientService`` drive it.
"""

from __future__ import annotations

import socket
from typing import Callable, List, Optional

import attrs
import pika
from pika import exceptions as amqp
from pika import spec
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from txthreatbus.config import ConfigError, RabbitMQConfig

#: Seconds a connection attempt (TCP, TLS, AMQP handshake, declarations) may take.
CONNECT_TIMEOUT = 15.0


class TlsError(Exception):
    """The TLS handshake with the broker failed (its certificate, ours)."""


class Connection(TwistedProtocolConnection):
    """
    pika's Twisted protocol, also telling why the broker refused to open the
    connection (credentials, vhost, TLS), and when the TCP connection is gone.
    """

    def __init__(self, parameters: pika.ConnectionParameters, clock):
        super().__init__(parameters, custom_reactor=clock)
        self.is_lost = False
        self.refusal: Optional[Exception] = None
        self._lost_reason: Optional[BaseException] = None
        #: Deferreds waiting for connectionLost; None once it happened.
        self._lost_waiters: Optional[List[Deferred]] = []
        # The broker says why it refuses a connection (credentials, vhost) in
        # Connection.Close; pika 1.x reports only that the connection is done.
        self._impl.callbacks.add(0, spec.Connection.Close, self._on_close_frame, one_shot=True)

    def _on_close_frame(self, frame):
        method = frame.method
        self.refusal = amqp.ConnectionClosedByBroker(method.reply_code, method.reply_text)

    def _on_connection_failed(self, _connection, error=None):
        d, self.ready = self.ready, None
        if d is not None:
            if self.refusal is not None:
                error = self.refusal
            elif not isinstance(error, Exception):
                error = amqp.AMQPConnectionError(error)
            d.errback(error)

    def connectionLost(self, reason=connectionDone):
        self.is_lost = True
        self._lost_reason = reason.value
        if self.refusal is None and _is_tls_error(reason):
            self.refusal = TlsError(_tls_reason(reason.value))
        try:
            super().connectionLost(reason)
        finally:
            waiters, self._lost_waiters = self._lost_waiters, None
            for d in waiters:
                d.callback(self._lost_reason)

    def when_lost(self) -> Deferred:
        """A new Deferred that fires with the reason when the connection is gone."""
        if self._lost_waiters is None:
            return succeed(self._lost_reason)
        d = Deferred()
        self._lost_waiters.append(d)
        return d

    def abort(self) -> None:
        """Drop the TCP connection at once (connectionLost follows)."""
        if not self.is_lost and self.transport is not None:
            self.transport.abortConnection()


def _is_tls_error(reason: Failure) -> bool:
    from OpenSSL import SSL
    from service_identity import VerificationError

    return reason.check(SSL.Error, VerificationError) is not None


def _tls_reason(e: BaseException) -> str:
    """
    Why TLS failed, from OpenSSL's reasons (``certificate verify failed``)
    or service_identity's mismatches (the certificate is for another host).
    """
    from service_identity import VerificationError

    if isinstance(e, VerificationError):
        ids = [getattr(error, "mismatched_id", None) for error in e.errors]
        names = sorted({str(getattr(i, "ip", None) or _text(getattr(i, "hostname", i))) for i in ids})
        return "the broker's certificate is not for " + ", ".join(names)
    reasons = [part[2] for part in (e.args[0] if e.args and isinstance(e.args[0], list) else ()) if len(part) > 2]
    return ", ".join(r for r in reasons if r) or str(e) or type(e).__name__


def _text(value) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


@attrs.frozen
class Connector:
    """How the backbone reaches the broker: an endpoint, and the protocol spoken over it."""

    endpoint: IStreamClientEndpoint
    #: Makes one new connection protocol (pika's, or a test's fake).
    protocol: Callable[[], IProtocol]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"plugins.backbones.rabbitmq.ssl.{what}: cannot read {path}: {e.strerror}") from None


def tls_options(config: RabbitMQConfig):
    """The TLS client options of ``config.ssl``; ConfigError if a file cannot be used."""
    tls = config.ssl
    kwargs = {}
    try:
        if tls.ca_file is not None:
            kwargs["trustRoot"] = ssl.Certificate.loadPEM(_read(tls.ca_file, "ca_file"))
        if tls.cert_file is not None:
            kwargs["clientCertificate"] = ssl.PrivateCertificate.loadPEM(
                _read(tls.cert_file, "cert_file") + b"\n" + _read(tls.key_file, "key_file")
            )
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"plugins.backbones.rabbitmq.ssl: not a PEM certificate or key: {e}") from None
    return ssl.optionsForClientTLS(config.host, **kwargs)


def connector(config: RabbitMQConfig, clock) -> Connector:
    """The broker of ``config``, over TCP or (with ``ssl``) TLS."""
    parameters = pika.ConnectionParameters(
        host=config.host,
        port=config.port,
        virtual_host=config.vhost,
        credentials=pika.PlainCredentials(config.username, config.password),
        client_properties={"connection_name": "txthreatbus " + (config.queue.name_suffix or socket.gethostname())},
    )
    endpoint = HostnameEndpoint(clock, config.host, config.port, timeout=CONNECT_TIMEOUT)
    if config.ssl is not None:
        endpoint = wrapClientTLS(tls_options(config), endpoint)
    return Connector(endpoint, lambda: Connection(parameters, clock))


@implementer(IProtocol)
class _Gate:
    """
    What the transport talks to in front of ClientService's protocol proxy:
    it holds a lost connection back from ClientService until the
    connection was prepared. ClientService (Twisted 26.10) has no
    transition for a connection lost while ``prepareConnection`` runs or
    after it failed (``NoTransition`` in the reactor); that attempt counts
    as failed through ``prepareConnection`` anyway, so then only the
    protocol hears of it.
    """

    def __init__(self, proxy, forget: Callable[[], None]):
        self.proxy = proxy
        self.prepared = False
        self._forget = forget

    def makeConnection(self, transport):
        self.proxy.makeConnection(transport)

    def connectionMade(self):
        pass  # makeConnection told the protocol

    def dataReceived(self, data):
        self.proxy.dataReceived(data)

    def connectionLost(self, reason):
        self._forget()
        if self.prepared:
            self.proxy.connectionLost(reason)
        else:
            # the protocol the proxy wraps: Twisted's name for it
            self.proxy._protocol.connectionLost(reason)


class _GatedFactory(Factory):
    noisy = False

    def __init__(self, factory, gates: dict):
        self._factory = factory
        self._gates = gates

    def buildProtocol(self, addr):
        proxy = self._factory.buildProtocol(addr)
        if proxy is None:
            return None
        gate = self._gates[proxy] = _Gate(proxy, lambda: self._gates.pop(proxy, None))
        return gate


@implementer(IStreamClientEndpoint)
class GatedEndpoint:
    """
    ``endpoint``, for ClientService: it connects ClientService's proxies
    through a ``_Gate``, opened by ``prepared(proxy)``; ``on_failure``
    hears why an attempt could not connect.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, on_failure: Callable[[Failure], None]):
        self._endpoint = endpoint
        self._on_failure = on_failure
        self._gates: dict = {}

    def connect(self, factory):
        d = self._endpoint.connect(_GatedFactory(factory, self._gates))

        def failed(failure):
            self._on_failure(failure)
            return failure

        return d.addCallbacks(lambda gate: gate.proxy, failed)

    def prepared(self, proxy) -> None:
        """ClientService may hear when the connection of ``proxy`` is lost."""
        gate = self._gates.get(proxy)
        if gate is not None:
            gate.prepared = True
