"""
What the bus counts, as Prometheus metrics, and the optional HTTP endpoint
that serves them.

Each bus has its own ``Metrics`` (and registry), so that several buses in one
process, as in the tests, count apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.twisted import MetricsResource
from twisted.application import strports
from twisted.web.resource import Resource
from twisted.web.server import Site

_TYPES = ("intel", "sighting", "snapshotrequest", "snapshotenvelope")


class Metrics:
    """The counters and gauges of one bus."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        received = Counter(
            "txthreatbus_messages_received",
            "Messages received from apps, by type",
            ["type"],
            registry=registry,
        )
        published = Counter(
            "txthreatbus_messages_published",
            "Messages sent to apps, by type (one per receiving app)",
            ["type"],
            registry=registry,
        )
        # Children are bound once: the hot path only increments.
        self.received = {t: received.labels(t) for t in _TYPES}
        self.published = {t: published.labels(t) for t in _TYPES}
        self._dropped = Counter(
            "txthreatbus_dropped",
            "Messages or requests dropped, by reason",
            ["reason"],
            registry=registry,
        )
        self.subscriptions = Gauge(
            "txthreatbus_subscriptions", "Active app subscriptions", registry=registry
        )
        self.snapshots_pending = Gauge(
            "txthreatbus_snapshots_pending", "Snapshots waiting for answers", registry=registry
        )
        self.envelopes_routed = Counter(
            "txthreatbus_snapshot_envelopes_routed",
            "Snapshot envelopes routed to the app that asked",
            registry=registry,
        )
        backbone = ["backbone"]
        self.backbone_published = Counter(
            "txthreatbus_backbone_published",
            "Messages handed to the backbone",
            backbone,
            registry=registry,
        )
        self.backbone_consumed = Counter(
            "txthreatbus_backbone_consumed",
            "Messages taken from the backbone",
            backbone,
            registry=registry,
        )
        self.backbone_reconnects = Counter(
            "txthreatbus_backbone_reconnects",
            "Times the backbone connected again after losing its connection",
            backbone,
            registry=registry,
        )

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` things dropped for ``reason``."""
        self._dropped.labels(reason).inc(count)

    def dropped(self, reason: str) -> float:
        """How many things were dropped for ``reason``."""
        return self.registry.get_sample_value("txthreatbus_dropped_total", {"reason": reason}) or 0


def metrics_service(metrics: Metrics, host: str, port: int, reactor=None):
    """A service serving ``metrics`` in Prometheus text format on ``/metrics``."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=metrics.registry))
    description = f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"
    return strports.service(description, Site(root), reactor=reactor)
