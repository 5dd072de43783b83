"""
The two kinds of plugin the bus core talks to, and the socket seam of the
zmq-app plugin.

A backbone carries messages between the instances of the bus (or within one);
an app connects the bus to outside tools. Both are also ``IService``s, so
that they start and stop with the bus.
"""

from twisted.application.service import IService
from zope.interface import Attribute, Interface


class IBackbone(IService):
    """Carries every published message to the bus of every instance."""

    def attach(deliver):
        """
        Hand each message that arrives to ``deliver(message)``, once.

        Called when the service tree is built, before the backbone starts.
        """

    def publish(message):
        """
        Carry ``message`` to every instance's ``deliver``, this one's included.
        """


class IApp(IService):
    """An app plugin: it joins outside tools to the bus."""

    def snapshot(request, requester):
        """
        Pass the ``SnapshotRequest`` on to the tools that can serve it, except
        ``requester``: the bus consumer that asked for the snapshot on this
        instance, or C{None} if it was asked for on another instance.

        Returns a Deferred that fires when the request has been handed on.
        The tools answer later by publishing ``SnapshotEnvelope``s.
        """


class IConnection(Interface):
    """One of an app plugin's sockets."""

    def shutdown():
        """Close the socket at once."""


class IPublisherSocket(IConnection):
    """The socket that sends apps their messages."""

    drained = Attribute(
        "None, or a callable that the socket calls when it may take frames it refused"
    )

    def send_from(frames):
        """
        Send single-frame messages from the left of the deque ``frames``,
        removing each one sent; False if the socket refused one (an app's
        queue is full), True if it took them all.
        """


class IServerSockets(Interface):
    """Opens the endpoints of one zmq-app; each open returns ``(connection, port)``."""

    curve = Attribute("Whether the sockets encrypt and authenticate with CurveZMQ")

    def publisher(notify, port):
        """
        The PUB endpoint (an ``IPublisherSocket``): ``notify(subscribed,
        topic)`` is told of each SUB socket's (un)subscription and returns
        whether it takes effect.
        """

    def receiver(receive, port):
        """The SUB endpoint: ``receive(frames)`` for each message apps publish."""

    def manage(answer, port):
        """
        The management endpoint: ``answer(frames, peer)`` gives each
        request's reply, as JSON bytes; ``peer`` is a callable that gives
        the network address the request came from.
        """

    def close():
        """A Deferred that fires once every socket is closed and all is freed."""
