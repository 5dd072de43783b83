"""
What the bus counts, as Prometheus metrics, and the optional HTTP endpoint
that serves them.

Each bus has its own ``Metrics`` (and registry), so that several buses in one
process, as in the tests, count apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.twisted import MetricsResource
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site

from txthreatbus.status import StatusJSON, StatusPage

_TYPES = ("intel", "sighting", "indicator", "stix_sighting", "snapshotrequest", "snapshotenvelope")


class _Value:
    """One time series: a plain number, cheap to change on the hot path."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class _Family:
    """A counter or gauge, by label values; read by ``Metrics.collect``."""

    def __init__(self, kind, name: str, documentation: str, labelnames=()):
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.children = {}
        if not labelnames:
            self.labels()  # an unlabelled series exists, at 0, from the start

    def labels(self, *values) -> _Value:
        key = tuple(str(v) for v in values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = _Value()
        return child

    def inc(self, amount: float = 1) -> None:
        self.children[()].value += amount

    def dec(self, amount: float = 1) -> None:
        self.children[()].value -= amount

    def collect(self):
        family = self.kind(self.name, self.documentation, labels=self.labelnames)
        for key, child in self.children.items():
            family.add_metric(list(key), child.value)
        return family


class Metrics:
    """
    The counters and gauges of one bus.

    They are plain numbers, collected into Prometheus metric families only
    when scraped (a custom collector): counting stays cheap for every message.
    """

    def __init__(self):
        self._families = []
        counter = lambda *a: self._family(CounterMetricFamily, *a)  # noqa: E731
        gauge = lambda *a: self._family(GaugeMetricFamily, *a)  # noqa: E731
        received = counter(
            "txthreatbus_messages_received", "Messages received from apps, by type", ["type"]
        )
        published = counter(
            "txthreatbus_messages_published",
            "Messages sent to apps, by type (one per receiving app)",
            ["type"],
        )
        # Children are bound once: the hot path only increments.
        self.received = {t: received.labels(t) for t in _TYPES}
        self.published = {t: published.labels(t) for t in _TYPES}
        self._dropped = counter(
            "txthreatbus_dropped", "Messages or requests dropped, by reason", ["reason"]
        )
        self.disconnects = counter(
            "txthreatbus_disconnects",
            "App connections closed at a receiving endpoint (the app left, or sent a "
            "message over max_message_size)",
            ["endpoint"],
        )
        unrouted = counter(
            "txthreatbus_unrouted",
            "Intel, Sightings and STIX objects that reached no subscriber at this instance, "
            "by type: none was subscribed to their topic (an app away, or not yet subscribed "
            "again after a restart), or none of the other generation could take a translation",
            ["type"],
        )
        self.unrouted = {t: unrouted.labels(t) for t in ("intel", "sighting", "indicator", "stix_sighting")}
        self.untranslatable = counter(
            "txthreatbus_untranslatable",
            "Messages with no counterpart in the other generation of apps, by direction "
            "(2020_to_2022, 2022_to_2020) and reason",
            ["direction", "reason"],
        )
        self.store_records = gauge(
            "txthreatbus_store_records", "Records the store holds, by kind (refreshed every 30 s)", ["kind"]
        )
        self.store_writes = counter("txthreatbus_store_writes", "Batches of records the store wrote")
        self.store_write_seconds = counter(
            "txthreatbus_store_write_seconds",
            "Seconds the store's writes took, in all (divided by txthreatbus_store_writes_total: "
            "the mean write latency)",
        )
        self.store_failures = counter(
            "txthreatbus_store_failures",
            "Store operations that failed, by operation (open, write, read, count, prune); each is retried",
            ["operation"],
        )
        self.subscriptions = gauge("txthreatbus_subscriptions", "Active app subscriptions")
        self.snapshots_pending = gauge(
            "txthreatbus_snapshots_pending", "Snapshots waiting for answers"
        )
        self.envelopes_routed = counter(
            "txthreatbus_snapshot_envelopes_routed",
            "Snapshot envelopes routed to the app that asked",
        )
        backbone = ["backbone"]
        self.backbone_published = counter(
            "txthreatbus_backbone_published", "Messages handed to the backbone", backbone
        )
        self.backbone_consumed = counter(
            "txthreatbus_backbone_consumed", "Messages taken from the backbone", backbone
        )
        self.backbone_reconnects = counter(
            "txthreatbus_backbone_reconnects",
            "Times the backbone connected again after losing its connection",
            backbone,
        )
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def _family(self, kind, name, documentation, labelnames=()):
        family = _Family(kind, name, documentation, labelnames)
        self._families.append(family)
        return family

    def collect(self):
        """The Prometheus collector interface: every family, as it stands."""
        return [family.collect() for family in self._families]

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` things dropped for ``reason``."""
        self._dropped.labels(reason).inc(count)

    def counts(self) -> dict:
        """
        The counters that the status page turns into rates, as plain
        numbers: messages received from and published to apps, unrouted,
        and dropped (in all, and as ``dropped:<reason>`` each).
        """
        dropped = {f"dropped:{key[0]}": child.value for key, child in self._dropped.children.items()}
        return {
            "received": sum(child.value for child in self.received.values()),
            "published": sum(child.value for child in self.published.values()),
            "unrouted": sum(child.value for child in self.unrouted.values()),
            "dropped": sum(dropped.values()),
            **dropped,
        }

    def dropped(self, reason: str) -> float:
        """How many things were dropped for ``reason``."""
        return self.registry.get_sample_value("txthreatbus_dropped_total", {"reason": reason}) or 0


class MetricsService(StreamServerEndpointService):
    """
    The metrics web service; ``port`` is the TCP port it listens on while it
    runs (what ``port: 0`` in the config got), else None. ``status``, if
    any, is the ``txthreatbus.status.Status`` it serves, started and stopped
    with it.
    """

    port = None
    status = None

    def startService(self):
        super().startService()
        if self.status is not None:
            self.status.start()

    def privilegedStartService(self):
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, listening):
        if listening is not None:
            self.port = listening.getHost().port
        return listening

    def stopService(self):
        self.port = None
        if self.status is not None:
            self.status.stop()
        return super().stopService()


class QuietSite(Site):
    """A site without an access log: whoever reaches the port could fill it, a line a request."""

    def log(self, request):
        pass


def metrics_service(metrics: Metrics, host: str, port: int, reactor=None, status=None):
    """
    A service serving ``metrics`` in Prometheus text format on ``/metrics``
    and, given a ``txthreatbus.status.Status``, the status page on ``/`` and
    ``/status.json``.
    """
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=metrics.registry))
    if status is not None:
        root.putChild(b"", StatusPage(status))
        root.putChild(b"status.json", StatusJSON(status))
    description = f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"
    if reactor is None:
        from twisted.internet import reactor
    service = MetricsService(serverFromString(reactor, description), QuietSite(root))
    service.status = status
    # as strports.service does: a port in use aborts start-up
    service._raiseSynchronously = True
    return service
