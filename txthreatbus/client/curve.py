"""
The CurveZMQ keys a client needs for a bus with encryption on.
"""

from __future__ import annotations

import attrs
import zmq.auth

from txthreatbus.apps.zmq_app.curve import CurveKeyError


@attrs.frozen
class CurveKeys:
    """
    What a client needs to talk to a bus with CurveZMQ on: the bus's public
    key and the client's own key pair, Z85-encoded as ZeroMQ takes them.
    """

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_key_file: str, secret_key_file: str) -> "CurveKeys":
        """
        The keys in ZeroMQ certificate files, as ``zmq.auth.create_certificates``
        writes them: the bus's public ``.key`` and the client's ``.key_secret``.
        """
        server_public, _ = _certificate(server_key_file, "the bus's public key")
        public, secret = _certificate(secret_key_file, "the client's secret key")
        if secret is None:
            raise CurveKeyError(f"{secret_key_file}: holds no secret key (the .key_secret file has it)")
        return cls(server_public, public, secret)

    def secure(self, socket) -> None:
        """Make ``socket`` a CurveZMQ client of the bus (before it connects)."""
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def _certificate(path: str, what: str):
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"{path} ({what}): {getattr(e, 'strerror', None) or e}") from None
