"""
The bus's service tree: stopping it without losing an error (each child's
failure to stop is logged on its own, and the parent's stop fires once all
are done), and telling an embedding application whether the bus came up.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger

from txthreatbus import logs

log = Logger(observer=logs.publisher)


def stop_children(parent: MultiService) -> Deferred:
    """Stop ``parent``'s children, last started first; fires when all have stopped."""
    stopping = []
    for child in reversed(list(parent)):
        d = maybeDeferred(child.stopService)
        d.addErrback(lambda f, child=child: log.failure("Stopping {service} failed", f, service=child.name))
        stopping.append(d)
    return gatherResults(stopping, consumeErrors=True)


class BusService(MultiService):
    """
    The bus's service tree: it stops every child, whatever one of them
    raises, and stops itself when it cannot work (``fatal``).
    """

    def whenReady(self) -> Deferred:
        """
        Fires once the bus carries messages (its backbone is connected);
        fails with the reason if it never will: an application that embeds
        the bus waits on it instead of having its reactor stopped.
        """
        try:
            backbone = self.getServiceNamed("backbone")
        except KeyError:
            return succeed(None)
        ready = getattr(backbone, "whenReady", None)
        return ready() if ready is not None else succeed(None)

    def fatal(self, failure) -> None:
        """The bus cannot work (its broker was never reached): stop it."""
        if self.running:
            d = self.stopService()
            d.addErrback(lambda f: log.failure("Stopping the bus failed", f))

    def stopService(self):
        Service.stopService(self)
        return stop_children(self)
