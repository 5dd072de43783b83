"""Why a connection to the broker failed, in one line an operator can act on."""

from __future__ import annotations

from pika import exceptions as amqp
from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.python.failure import Failure

from txthreatbus.backbones.rabbitmq.connection import CONNECT_TIMEOUT, TlsError
from txthreatbus.config import RabbitMQConfig


def address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(e: BaseException) -> str:
    """A short account of exception ``e``."""
    if isinstance(e, (amqp.ConnectionClosed, amqp.ChannelClosed)):
        return f"{e.reply_code} {e.reply_text}"
    text = str(e).strip().rstrip(".")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def diagnose(failure: Failure, config: RabbitMQConfig) -> str:
    """Why connecting to the broker of ``config`` failed, in one line."""
    e = failure.value
    where = address(config.host, config.port)
    if isinstance(e, TlsError):
        if "certificate required" in str(e):
            hint = "the broker asks for a client certificate: set cert_file and key_file"
        else:
            hint = f"ca_file must hold the CA of the broker's certificate, issued for {config.host!r}"
        return f"TLS with RabbitMQ at {where} failed: {e} (see plugins.backbones.rabbitmq.ssl: {hint})"
    if isinstance(e, amqp.ConnectionClosedByBroker):
        if e.reply_code == 403:
            return f"RabbitMQ at {where} refused the credentials for user {config.username!r}"
        if e.reply_code == 530:
            return (
                f"RabbitMQ at {where} refused user {config.username!r} access to vhost "
                f"{config.vhost!r} ({e.reply_text})"
            )
        return f"RabbitMQ at {where} closed the connection: {describe(e)}"
    if isinstance(e, amqp.ChannelClosedByBroker):
        line = f"RabbitMQ at {where} refused to set up the exchanges and queues: {describe(e)}"
        if "'durable' for exchange" in str(e.reply_text):
            line += (
                " (the exchange exists with the other durability: declared by Threat Bus or "
                "an earlier txthreatbus; set durable_exchanges as they are, or delete them)"
            )
        return line
    if isinstance(e, defer.TimeoutError):
        return f"RabbitMQ at {where} did not answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(e, (neterror.ConnectError, neterror.DNSLookupError)):
        return f"cannot reach RabbitMQ at {where}: " + str(e).strip().rstrip(".")
    if isinstance(e, (neterror.ConnectionDone, neterror.ConnectionLost, amqp.AMQPConnectionError)):
        return f"RabbitMQ at {where} closed the connection while opening it ({describe(e)})"
    return f"cannot connect to RabbitMQ at {where}: {describe(e)}"
