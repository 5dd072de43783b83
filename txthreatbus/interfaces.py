"""
The two kinds of plugin the bus core talks to.

A backbone carries messages between the instances of the bus (or within one);
an app connects the bus to outside tools. Both are also ``IService``s, so
that they start and stop with the bus.
"""

from zope.interface import Interface


class IBackbone(Interface):
    """Carries every published message to the bus of every instance."""

    def attach(deliver):
        """
        Hand each message that arrives to ``deliver(message)``, once.

        Called by the bus core before the backbone starts.
        """

    def publish(message):
        """
        Carry ``message`` to every instance's ``deliver``, this one's included.
        """


class IApp(Interface):
    """An app plugin: it joins outside tools to the bus."""

    def snapshot(request, requester):
        """
        Pass the ``SnapshotRequest`` on to the tools that can serve it, except
        ``requester``: the bus consumer that asked for the snapshot on this
        instance, or C{None} if it was asked for on another instance.

        Returns a Deferred that fires when the request has been handed on.
        The tools answer later by publishing ``SnapshotEnvelope``s.
        """
