"""
Optional CurveZMQ security for the zmq-app sockets.

With ``curve: {server_secret_key_file, authorized_clients_dir}`` configured,
all three sockets encrypt with the server's key pair, and a ZAP handler, a
txZMQ connection in the reactor, admits only clients whose public key has a
certificate in ``authorized_clients_dir``. Keys are ZeroMQ certificate files
as ``zmq.auth.create_certificates`` writes them (see the README).
"""

from __future__ import annotations

import os

import attrs
import zmq
import zmq.auth
from zmq.utils import z85
from twisted.logger import Logger
from txzmq import ZmqEndpoint, ZmqEndpointType

from txthreatbus import logs
from txthreatbus.config import CurveConfig
from txthreatbus.connections import BatchedReadConnection

log = Logger(observer=logs.publisher)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
DOMAIN = b"txthreatbus"


class CurveKeyError(ValueError):
    """A key file or folder that cannot be used; the text says which."""


@attrs.frozen
class ServerKeys:
    public: bytes  # Z85, as sockets take it
    secret: bytes
    authorized: frozenset  # raw 32-byte client keys, as ZAP hands them over


def load_keys(config: CurveConfig) -> ServerKeys:
    """The server's key pair and the authorized client public keys."""
    try:
        public, secret = zmq.auth.load_certificate(config.server_secret_key_file)
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"curve.server_secret_key_file {config.server_secret_key_file}: {e}") from None
    if secret is None:
        raise CurveKeyError(
            f"curve.server_secret_key_file {config.server_secret_key_file}: holds no secret key"
        )
    if not os.path.isdir(config.authorized_clients_dir):
        raise CurveKeyError(f"curve.authorized_clients_dir {config.authorized_clients_dir}: not a folder")
    try:
        authorized = frozenset(
            z85.decode(key) for key in zmq.auth.load_certificates(config.authorized_clients_dir)
        )
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"curve.authorized_clients_dir {config.authorized_clients_dir}: {e}") from None
    return ServerKeys(public, secret, authorized)


def secure(connection, keys: ServerKeys) -> None:
    """Make ``connection``'s socket a CURVE server (before it binds)."""
    sock = connection.socket
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    sock.zap_domain = DOMAIN


class ZapHandler(BatchedReadConnection):
    """
    Answers ZeroMQ's authentication requests: listed client keys only. A
    ROUTER read in batches (apps see a REP), as a flood of handshakes makes
    a flood of requests.
    """

    socketType = zmq.ROUTER

    def __init__(self, factory, keys: ServerKeys, metrics, clock):
        self._keys = keys
        self._metrics = metrics
        self._throttle = logs.Throttle(clock)
        BatchedReadConnection.__init__(self, factory)
        self.addEndpoints([ZmqEndpoint(ZmqEndpointType.bind, ZAP_ENDPOINT)])

    def messageReceived(self, message):
        # [routing id, b"", version, request id, domain, address, identity, mechanism, credentials...]
        if len(message) < 8 or message[1] != b"":
            return
        envelope, frames = message[:2], message[2:]
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        allowed = mechanism == b"CURVE" and credentials and credentials[0] in self._keys.authorized
        if allowed:
            status = (b"200", b"OK")
        else:
            status = (b"400", b"not authorized")
            self._metrics.drop("curve_unauthorized")
            self._throttle(
                "curve_unauthorized",
                log.warn,
                "Refused an unauthorized CurveZMQ client from {address}",
                address=address.decode(errors="replace"),
            )
        self.socket.send_multipart([*envelope, version, request_id, *status, b"", b""], zmq.NOBLOCK)
