"""
The metrics endpoint: a running bus with ``metrics:`` configured serves
Prometheus text on ``/metrics``, and its counters move with the traffic.
"""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from txthreatbus.client import Client
from txthreatbus.config import Config, MetricsConfig, ZmqAppConfig
from tests.support import DEADLINE, Timeout, start_bus, zmq_app_of
from tests.test_client import INTEL

RECEIVED_INTEL = ("txthreatbus_messages_received_total", (("type", "intel"),))
PUBLISHED_INTEL = ("txthreatbus_messages_published_total", (("type", "intel"),))
SUBSCRIPTIONS = ("txthreatbus_subscriptions", ())


def metrics_bus(testcase):
    """A running bus whose metrics endpoint listens on a free port of 127.0.0.1."""
    config = Config(
        apps={"zmq-app": ZmqAppConfig(manage=0, pub=0, sub=0)},
        metrics=MetricsConfig(host="127.0.0.1", port=0),
        store=None,
    )
    return start_bus(testcase, config)


async def get(port: int, path: bytes = b"/metrics"):
    """The response to GET ``path`` on ``port``, and its body."""
    response = await Agent(reactor).request(b"GET", b"http://127.0.0.1:%d%s" % (port, path))
    return response, await readBody(response)


async def scrape(port: int) -> dict:
    """The samples the endpoint serves, by (name, sorted labels)."""
    response, body = await get(port)
    assert response.code == 200, response.code
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def scrape_until(port: int, predicate, what: str) -> dict:
    """Scrape until ``predicate(samples)`` holds; the samples then."""
    end = time.monotonic() + DEADLINE
    while True:
        samples = await scrape(port)
        if predicate(samples):
            return samples
        if time.monotonic() > end:
            raise Timeout(f"timed out waiting for {what}; last scrape: {samples}")
        await deferLater(reactor, 0.01, lambda: None)


class MetricsEndpointTests(TestCase):
    """The metrics HTTP endpoint of a running bus."""

    async def test_counters_move(self):
        """A scrape shows the intel counter go from 0 to 1 after one publish, and the subscriptions gauge."""
        top = metrics_bus(self)
        port = top.getServiceNamed("metrics").port
        before = await scrape(port)
        self.assertEqual((before[RECEIVED_INTEL], before[SUBSCRIPTIONS]), (0, 0))
        client = Client(f"127.0.0.1:{zmq_app_of(top).ports['manage']}", linger=0.5)
        client.startService()
        self.addCleanup(client.stopService)
        sub = await client.subscribe("threatbus/intel")
        await sub.connected("threatbus/intel")
        sub.publish_intel(INTEL)
        after = await scrape_until(
            port,
            lambda s: s[RECEIVED_INTEL] >= 1 and s[PUBLISHED_INTEL] >= 1,
            "the counters to move",
        )
        self.assertEqual(
            (after[RECEIVED_INTEL], after[PUBLISHED_INTEL], after[SUBSCRIPTIONS]), (1, 1, 1)
        )
        await client.stopService()
        self.assertEqual((await scrape(port))[SUBSCRIPTIONS], 0)

    async def test_prometheus_text_format(self):
        """/metrics answers in the Prometheus text format with HELP and TYPE lines."""
        top = metrics_bus(self)
        response, body = await get(top.getServiceNamed("metrics").port)
        self.assertEqual(response.code, 200)
        (content_type,) = response.headers.getRawHeaders(b"content-type")
        self.assertTrue(content_type.startswith(b"text/plain"), content_type)
        self.assertIn(b"# TYPE txthreatbus_messages_received_total counter", body)
        self.assertIn(b"# TYPE txthreatbus_subscriptions gauge", body)

    async def test_only_known_paths(self):
        """Other paths than /metrics and the status page's (/, /status.json) are not found."""
        top = metrics_bus(self)
        for path in (b"/other", b"/metrics.json", b"/x/"):
            response, _ = await get(top.getServiceNamed("metrics").port, path)
            self.assertEqual((path, response.code), (path, 404))

    async def test_no_access_log(self):
        """Requests leave no log line each: a peer cannot fill the log through the metrics port."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        top = metrics_bus(self)
        for _ in range(20):
            await get(top.getServiceNamed("metrics").port)
        self.assertEqual([e for e in events if "GET /metrics" in formatEvent(e)], [])

    async def test_port_while_running(self):
        """The metrics service knows its port while it runs, and forgets it when stopped."""
        top = metrics_bus(self)
        service = top.getServiceNamed("metrics")
        self.assertIsInstance(service.port, int)
        self.assertGreater(service.port, 0)
        await service.stopService()
        self.assertIsNone(service.port)

    def test_off_by_default(self):
        """Without a metrics section there is no metrics service."""
        top = start_bus(self)
        self.assertRaises(KeyError, top.getServiceNamed, "metrics")
