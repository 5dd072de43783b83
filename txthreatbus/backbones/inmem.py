"""The in-memory backbone: one instance, messages handed straight over."""

from __future__ import annotations

from twisted.application.service import Service
from zope.interface import implementer

from txthreatbus.interfaces import IBackbone


@implementer(IBackbone)
class InMemoryBackbone(Service):
    """Delivers each published message to this instance's bus at once."""

    name = "backbone"
    _deliver = None

    def attach(self, deliver):
        self._deliver = deliver

    def publish(self, message):
        self._deliver(message)

    def status(self) -> dict:
        """What the status page shows of the backbone."""
        return {"kind": "inmem"}
