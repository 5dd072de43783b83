"""
Stopping a service tree without losing an error: each child's failure to
stop is logged on its own, and the parent's stop fires once all are done.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
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
    """The bus's service tree: it stops every child, whatever one of them raises."""

    def stopService(self):
        Service.stopService(self)
        return stop_children(self)
