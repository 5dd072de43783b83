"""
Where the bus is: management endpoints (``host:port``) checked, and the
subscribe reply read for a subscription's P2P topic and the bus's PUB and
SUB endpoints, as both server generations write it.
"""

from __future__ import annotations

import attrs

from txthreatbus.client.errors import ProtocolError, RequestFailed
from txthreatbus.config import WILDCARD_HOSTS

#: Where Threat Bus's zmq-app listens for management requests by default.
DEFAULT_ENDPOINT = "127.0.0.1:13370"

#: Hosts a server may advertise that no client can connect to.
_WILDCARD_HOSTS = (*WILDCARD_HOSTS, "")


def parse_endpoint(text: str) -> str:
    """
    ``host:port`` (also ``tcp://host:port``, ``[v6 address]:port``) checked
    and normalised; raises ``ValueError`` with a message for people.
    """
    value = text.strip()
    if value.startswith("tcp://"):
        value = value[len("tcp://") :]
    host, colon, port = value.rpartition(":")
    if not colon or not host or not port.isdigit() or not port.isascii():
        raise ValueError(f"{text!r} is not host:port")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, like [::1]:13370")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be from 1 to 65535")
    return f"{host}:{int(port)}"


def host_of(endpoint: str) -> str:
    """The host of ``host:port`` (an IPv6 address in its brackets)."""
    return endpoint.rpartition(":")[0]


@attrs.frozen
class Endpoints:
    """Where one subscription lives: its P2P topic and the bus's PUB and SUB endpoints."""

    p2p: str = attrs.field(validator=attrs.validators.instance_of(str))
    #: ``host:port`` of the bus's PUB socket (our SUB socket connects to it).
    pub: str = attrs.field(validator=attrs.validators.instance_of(str))
    #: ``host:port`` of the bus's SUB socket (our PUB socket connects to it).
    sub: str = attrs.field(validator=attrs.validators.instance_of(str))


def parse_subscribe_reply(reply: dict, manage_endpoint: str) -> Endpoints:
    """
    The endpoints in the reply to a subscribe request; raises ``ClientError``.

    Reads ``pub_endpoint``/``sub_endpoint``, falls back to ``pub_port``/
    ``sub_port`` on the host of ``manage_endpoint``, and replaces an
    advertised wildcard host (``0.0.0.0``) by that host too. The oldest
    servers send no ``status`` with a successful subscribe reply.
    """
    status = reply.get("status", "success" if "topic" in reply else None)
    if status != "success":
        raise RequestFailed("subscribe", status)
    p2p = reply.get("topic")
    if not isinstance(p2p, str) or not p2p:
        raise ProtocolError(f"a subscribe reply without a topic: {reply!r}")
    host = host_of(manage_endpoint)
    return Endpoints(
        p2p=p2p, pub=_advertised(reply, "pub", host), sub=_advertised(reply, "sub", host)
    )


def _advertised(reply: dict, which: str, manage_host: str) -> str:
    advertised = reply.get(f"{which}_endpoint")
    if isinstance(advertised, str):
        try:
            endpoint = parse_endpoint(advertised)
        except ValueError:
            pass
        else:
            host, _, port = endpoint.rpartition(":")
            return f"{manage_host}:{port}" if host in _WILDCARD_HOSTS else endpoint
    port = reply.get(f"{which}_port")
    if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
        return f"{manage_host}:{port}"
    raise ProtocolError(
        f"a subscribe reply without a usable {which}_endpoint or {which}_port: {reply!r}"
    )
