"""
The client library: an app's side of the zmq-app protocol (docs/protocol.md), on
Twisted and txZMQ. It talks to txthreatbus and to Threat Bus 2020.11.26 alike.

A ``Client`` is a ``MultiService``; each ``Subscription`` is one of its
children. Every ``heartbeat_interval`` seconds a subscription heartbeats.
When the bus answers ``error`` (it restarted and forgot us) or does not
answer at all, the subscription subscribes again, backing off while the bus
stays away, and moves its SUB socket to the new P2P topic. What it publishes
waits, in order, in its outbox until the bus takes it;
``Subscription.connected()`` says when. ``stopService`` unsubscribes.

The modules, one idea each:

- ``client``: the ``Client`` (management requests, subscribing, stopping);
- ``subscription``: a ``Subscription`` (receiving, publishing, heartbeats);
- ``outbox``: the ``Outbox``, publishing in order as the bus takes it;
- ``transport``: the sockets seam (``ITransport`` and its sockets) and
  ZeroMQ's implementation (``ZmqTransport``);
- ``endpoints``: bus addresses, and the endpoints of a subscribe reply;
- ``curve``: ``CurveKeys`` for a bus with CurveZMQ on;
- ``errors``: ``ClientError`` and its kinds;
- ``deferreds``: small Deferred helpers.

Everything an app uses is importable from ``txthreatbus.client`` itself;
``txthreatbus.testing`` has fakes of the transport, to test an app without
sockets.
"""

from txthreatbus.apps.zmq_app.curve import CurveKeyError
from txthreatbus.client.client import Client
from txthreatbus.client.curve import CurveKeys
from txthreatbus.client.endpoints import (
    DEFAULT_ENDPOINT,
    Endpoints,
    parse_endpoint,
    parse_subscribe_reply,
)
from txthreatbus.client.errors import (
    ClientError,
    ClientStopped,
    ProtocolError,
    RequestFailed,
    RequestTimeout,
)
from txthreatbus.client.outbox import RETRY_INTERVAL, Outbox
from txthreatbus.client.subscription import Subscription
from txthreatbus.client.transport import (
    IManageSocket,
    IPublisherSocket,
    ISubscriberSocket,
    ITransport,
    ManageConnection,
    PublisherConnection,
    SubscriberConnection,
    ZmqTransport,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "RETRY_INTERVAL",
    "Client",
    "ClientError",
    "ClientStopped",
    "CurveKeyError",
    "CurveKeys",
    "Endpoints",
    "IManageSocket",
    "IPublisherSocket",
    "ISubscriberSocket",
    "ITransport",
    "ManageConnection",
    "Outbox",
    "ProtocolError",
    "PublisherConnection",
    "RequestFailed",
    "RequestTimeout",
    "Subscription",
    "SubscriberConnection",
    "ZmqTransport",
    "parse_endpoint",
    "parse_subscribe_reply",
]
