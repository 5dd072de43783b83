"""
The status page: ``/status.json`` and ``/`` on the metrics endpoint of a
bus built by ``tap.bus_service`` (real sockets on ephemeral ports), the
parts on a Clock with fakes, and what headless Chromium shows once the
page has refreshed itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from datetime import timedelta
from html.parser import HTMLParser

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

import txthreatbus
from txthreatbus import status as status_module
from txthreatbus.backbones.inmem import InMemoryBackbone
from txthreatbus.bus import Bus
from txthreatbus.config import Config, MetricsConfig, StoreConfig, ZmqAppConfig
from txthreatbus.status import MAX_LISTED, Rates, Status, duration, render_page, to_json
from txthreatbus.store import Database, StoreService
from tests.support import DEADLINE, App, Context, Timeout, connected_apps, publish_until_seen, start_bus, zmq_app_of
from tests.test_subscriptions import World, intel

VERSION = txthreatbus.__version__
PORTS = {"manage": 0, "pub": 0, "sub": 0}
#: What a peer might send to make the page run its script.
HOSTILE_TOPIC = "threatbus/<script>alert('topic')</script>"
HOSTILE_PEER = "\"><script>document.title='pwned'</script><img src=x onerror=alert(1)>"
#: Seconds Chromium may take to load the page and let it refresh.
CHROMIUM_DEADLINE = 60.0


def status_bus(testcase, apps=("zmq-app",), **config):
    """A running bus whose metrics endpoint (and status page) listens on a free port of 127.0.0.1."""
    config = Config(
        apps={name: ZmqAppConfig(**PORTS) for name in apps},
        metrics=MetricsConfig(host="127.0.0.1", port=0),
        **{"store": None, **config},
    )
    return start_bus(testcase, config)


async def get(top, path: bytes):
    """The response to GET ``path`` on ``top``'s metrics endpoint, and its body."""
    port = top.getServiceNamed("metrics").port
    response = await Agent(reactor).request(b"GET", b"http://127.0.0.1:%d%s" % (port, path))
    return response, await readBody(response)


async def report(top) -> dict:
    response, body = await get(top, b"/status.json")
    assert response.code == 200, response.code
    return json.loads(body)


async def report_until(top, predicate, what: str) -> dict:
    """Fetch /status.json until ``predicate(report)`` holds; the report then."""
    end = time.monotonic() + DEADLINE
    while True:
        got = await report(top)
        if predicate(got):
            return got
        if time.monotonic() > end:
            raise Timeout(f"timed out waiting for {what}; last report: {got}")
        await deferLater(reactor, 0.02, lambda: None)


def hostile_subscription(top, app: str = "zmq-app"):
    """A subscription whose topic and peer address are markup (only a broken peer could send them)."""
    return zmq_app_of(top).subscriptions.subscribe((HOSTILE_TOPIC,), timedelta(0), peer=HOSTILE_PEER)


class Page(HTMLParser):
    """
    What a person sees of a status page (as served, or as a browser's DOM):
    the title, the text and attributes of the elements ``#title`` and
    ``#updated``, each table's rows of cell texts by table id, and every
    script element's text.
    """

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.text = {}
        self.attributes = {}
        self.heads = {}
        self.tables = {}
        self.scripts = []
        self._capture = None
        self._rows = None
        self._row = None
        self._table = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts.append("")
            self._capture = "script"
        elif tag == "title":
            self._capture = "title"
        elif attrs.get("id") in ("title", "updated"):
            key = self._capture = "#" + attrs["id"]
            self.text[key] = ""
            self.attributes[key] = attrs
        elif tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
            self._rows = self.tables[self._table]
        elif tag == "thead" and self._table is not None:
            self._rows = self.heads.setdefault(self._table, [])
        elif tag == "tbody" and self._table is not None:
            self._rows = self.tables[self._table]
        elif tag == "tr" and self._rows is not None:
            self._row = []
            self._rows.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("")
            self._capture = "cell"

    def handle_endtag(self, tag):
        if tag in ("script", "title", "td", "th", "h1", "p"):
            self._capture = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = self._rows = None

    def handle_data(self, data):
        if self._capture == "script":
            self.scripts[-1] += data
        elif self._capture == "title":
            self.title += data
        elif self._capture == "cell":
            self._row[-1] += data
        elif self._capture is not None:
            self.text[self._capture] += data

    def rows(self, table: str) -> list:
        """The rows of ``table`` as dicts by column name (its head row)."""
        (head,) = self.heads[table]
        return [dict(zip(head, row)) for row in self.tables[table]]

    def overview(self) -> dict:
        return dict(self.tables["overview"])


def assert_inert(testcase, page: Page) -> None:
    """The page runs no script but its own."""
    testcase.assertEqual(page.scripts, [status_module.SCRIPT])


class StatusJSONTests(TestCase):
    """/status.json of a running bus."""

    async def test_fields(self):
        """Version, uptime, endpoints, backbone, store, snapshots, and each subscription of each generation."""
        top = status_bus(self)
        ctx = Context(self)
        app, stix_app = await connected_apps(ctx, top, "threatbus/intel", ["stix2/indicator", "stix2/sighting"])
        self.assertEqual((await app.heartbeat())["status"], "success")
        got = await report(top)
        self.assertEqual(got["version"], VERSION)
        self.assertGreaterEqual(got["uptime_seconds"], 0)
        self.assertLess(got["uptime_seconds"], 60)
        (plugin,) = got["apps"]
        self.assertEqual(
            plugin,
            {
                "name": "zmq-app",
                "host": "127.0.0.1",
                "advertised_host": "127.0.0.1",
                "ports": zmq_app_of(top).ports,
                "curve": False,
                "subscription_count": 2,
                "held_snapshot_requests": 0,
                "buffered_bytes": 0,
            },
        )
        self.assertEqual(got["backbone"], {"kind": "inmem"})
        self.assertIsNone(got["store"])
        self.assertEqual(got["snapshots_pending"], 0)
        subscriptions = got["subscriptions"]
        self.assertEqual(
            (subscriptions["total"], subscriptions["listed"], subscriptions["limit"]), (2, 2, MAX_LISTED)
        )
        first, second = subscriptions["items"]
        self.assertEqual(
            {key: first[key] for key in first if key not in ("age_seconds", "last_heartbeat_seconds_ago")},
            {
                "app": "zmq-app",
                "generation": "2020",
                "topics": ["threatbus/intel"],
                "p2p": app.p2p[:4] + "\u2026",
                "peer": "127.0.0.1",
                "ready": True,
                "snapshot": False,
                "buffered_frames": 0,
                "buffered_bytes": 0,
            },
        )
        self.assertGreaterEqual(first["age_seconds"], first["last_heartbeat_seconds_ago"])
        self.assertGreaterEqual(first["last_heartbeat_seconds_ago"], 0)
        self.assertEqual(
            (second["generation"], second["topics"], second["p2p"], second["last_heartbeat_seconds_ago"]),
            ("stix", ["stix2/indicator", "stix2/sighting"], stix_app.p2p[:4] + "\u2026", None),
        )

    async def test_p2p_topics_never_shown(self):
        """No full P2P topic appears in the JSON or the HTML: only their first four letters."""
        top = status_bus(self)
        ctx = Context(self)
        apps = await connected_apps(ctx, top, "threatbus", "stix2")
        _, body = await get(top, b"/status.json")
        _, page = await get(top, b"/")
        for app in apps:
            for text in (body, page):
                self.assertNotIn(app.p2p.encode(), text)
                self.assertNotIn(app.p2p[:5].encode(), text)
            self.assertIn(app.p2p[:4].encode() + b"\\u2026", body)
            self.assertIn((app.p2p[:4] + "\u2026").encode(), page)

    async def test_buffered_and_snapshot(self):
        """An app that has not connected its SUB socket: its buffered frames, and its pending snapshot."""
        top = status_bus(self)
        ctx = Context(self)
        (publisher,) = await connected_apps(ctx, top, "threatbus/intel")
        late = App.on(ctx, top)
        await late.subscribe(ctx, "threatbus/intel", snapshot=1, connect_sub=False)
        # the snapshot request goes to the other app, which is ready
        ((suffix, _),) = await publisher.receive(1)
        self.assertEqual(suffix, "snapshotrequest")
        await publish_until_seen(publisher, "threatbus/intel", _intel_json(0), [publisher])
        got = await report_until(
            top,
            lambda r: r["subscriptions"]["items"][-1]["buffered_frames"] >= 1,
            "the frames held for the app that has not connected",
        )
        held = got["subscriptions"]["items"][-1]
        self.assertEqual((held["ready"], held["snapshot"]), (False, True))
        self.assertGreater(held["buffered_bytes"], 0)
        self.assertEqual(
            got["apps"][0]["buffered_bytes"], sum(i["buffered_bytes"] for i in got["subscriptions"]["items"])
        )
        self.assertEqual(got["snapshots_pending"], 1)

    async def test_rates(self):
        """What apps publish shows as rates received and published, and in the totals."""
        top = status_bus(self)
        ctx = Context(self)
        publisher, receiver = await connected_apps(ctx, top, "threatbus/intel", "threatbus/intel")
        await publish_until_seen(publisher, "threatbus/intel", _intel_json(0), [receiver])
        got = await report(top)
        rates, totals = got["rates"], got["totals"]
        self.assertGreater(rates["seconds"], 0)
        self.assertGreaterEqual(totals["received"], 1)
        self.assertGreaterEqual(totals["published"], 2)
        self.assertGreater(rates["received"], 0)
        self.assertGreater(rates["published"], 0)
        # (rounded to 3 decimals)
        self.assertLessEqual(abs(rates["received"] - totals["received"] / rates["seconds"]), 0.001)

    async def test_at_most_1000_listed(self):
        """Of 1,600 subscriptions over two plugins, 1,000 are listed, in order, with the total."""
        top = status_bus(self, apps=("zmq-app", "zmq"))
        for name in ("zmq-app", "zmq"):
            subscriptions = top.getServiceNamed(name).subscriptions
            for i in range(800):
                subscriptions.subscribe("threatbus/intel", timedelta(0), peer=f"10.0.{i // 256}.{i % 256}")
        got = await report(top)
        subscriptions = got["subscriptions"]
        self.assertEqual((subscriptions["total"], subscriptions["listed"]), (1600, 1000))
        self.assertEqual([i["app"] for i in subscriptions["items"]], ["zmq-app"] * 800 + ["zmq"] * 200)
        self.assertEqual([a["subscription_count"] for a in got["apps"]], [800, 800])
        _, body = await get(top, b"/status.json")
        self.assertLess(len(body), 400 * MAX_LISTED)
        _, html = await get(top, b"/")
        page = Page(html.decode())
        self.assertEqual(len(page.rows("subscriptions")), 1000)
        self.assertIn(b"1000 of 1600 shown", html)

    async def test_store(self):
        """A store: its URL, its state once open, its records counted, its queue."""
        path = os.path.abspath(self.mktemp())
        top = status_bus(self, store=StoreConfig(url=f"sqlite:///{path}"))
        got = await report_until(top, lambda r: r["store"]["records"] is not None, "the store to count")
        self.assertEqual(
            got["store"],
            {
                "url": f"sqlite:///{path}",
                "state": "open",
                "records": {"intel": 0, "sighting": 0, "indicator": 0, "stix_sighting": 0},
                "queue": {"records": 0, "bytes": 0},
            },
        )

    async def test_store_that_cannot_open(self):
        """A store whose database cannot be opened says so."""
        path = os.path.join(os.path.abspath(self.mktemp()), "missing", "intel.sqlite")
        top = status_bus(self, store=StoreConfig(url=f"sqlite:///{path}"))
        got = await report_until(top, lambda r: r["store"]["state"] != "opening", "the store to fail to open")
        self.assertEqual((got["store"]["state"], got["store"]["records"]), ("cannot open, retrying", None))

    async def test_escaped(self):
        """A topic and a peer address made of markup are data in the JSON, never markup."""
        top = status_bus(self)
        hostile_subscription(top)
        response, body = await get(top, b"/status.json")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(response.headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        self.assertNotIn(b"<", body)
        self.assertNotIn(b">", body)
        (item,) = json.loads(body)["subscriptions"]["items"]
        self.assertEqual((item["topics"], item["peer"]), ([HOSTILE_TOPIC], HOSTILE_PEER))


class StatusPageTests(TestCase):
    """The HTML page, /, of a running bus."""

    async def test_shows_the_status(self):
        """Title with version, uptime, endpoints, backbone, store, rates, a row per subscription."""
        top = status_bus(self)
        ctx = Context(self)
        (app,) = await connected_apps(ctx, top, "threatbus/intel")
        response, body = await get(top, b"/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        page = Page(body.decode())
        self.assertEqual(page.title, f"txthreatbus {VERSION} status")
        self.assertEqual(page.text["#title"], f"txthreatbus {VERSION}")
        overview = page.overview()
        self.assertEqual(overview["Version"], VERSION)
        self.assertRegex(overview["Uptime"], r"^\d+s$")
        self.assertEqual(overview["Backbone"], "in-memory (this instance only)")
        self.assertEqual(overview["Store"], "none")
        self.assertEqual(overview["Snapshots pending"], "0")
        ports = zmq_app_of(top).ports
        (endpoints,) = page.rows("endpoints")
        self.assertEqual(
            endpoints,
            {
                "Plugin": "zmq-app", "Host": "127.0.0.1", "Advertised host": "127.0.0.1",
                "Manage": str(ports["manage"]), "Pub": str(ports["pub"]), "Sub": str(ports["sub"]),
                "CURVE": "off", "Subscriptions": "1", "Buffered bytes": "0", "Held snapshot requests": "0",
            },
        )
        rates = {row["Messages"]: row for row in page.rows("rates")}
        self.assertEqual(
            set(rates), {"received from apps", "published to apps", "reached no subscriber", "dropped"}
        )
        self.assertRegex(rates["received from apps"]["Rate"], r"^\d+\.\d\d/s$")
        (row,) = page.rows("subscriptions")
        self.assertEqual(
            {key: row[key] for key in row if key != "Age"},
            {
                "Plugin": "zmq-app", "Generation": "2020", "Topics": "threatbus/intel",
                "P2P topic": app.p2p[:4] + "\u2026", "Peer": "127.0.0.1", "Last heartbeat": "never",
                "Ready": "yes", "Snapshot": "no", "Buffered frames": "0", "Buffered bytes": "0",
            },
        )
        assert_inert(self, page)

    async def test_escaped(self):
        """A topic and a peer address made of markup show as text: the page is no XSS vector."""
        top = status_bus(self)
        hostile_subscription(top)
        _, body = await get(top, b"/")
        self.assertNotIn(b"<script>alert", body)
        self.assertNotIn(b"<script>document", body)
        self.assertNotIn(b"<img", body)
        page = Page(body.decode())
        assert_inert(self, page)
        (row,) = page.rows("subscriptions")
        self.assertEqual((row["Topics"], row["Peer"]), (HOSTILE_TOPIC, HOSTILE_PEER))

    async def test_content_security_policy(self):
        """The page may run its own script and style only, and fetch only from where it came from."""
        top = status_bus(self)
        response, body = await get(top, b"/")
        (policy,) = response.headers.getRawHeaders(b"content-security-policy")
        directives = dict(d.strip().split(" ", 1) for d in policy.decode().split(";"))
        self.assertEqual(directives["default-src"], "'none'")
        self.assertEqual(directives["connect-src"], "'self'")
        self.assertEqual(directives["script-src"].count("'sha256-"), 1)
        self.assertNotIn("unsafe", policy.decode())
        self.assertIn(status_module.SCRIPT.encode(), body)

    async def test_paths(self):
        """/, /status.json and /metrics answer; other paths are not found."""
        top = status_bus(self)
        for path, code in ((b"/", 200), (b"/status.json", 200), (b"/metrics", 200), (b"/other", 404), (b"/x/", 404)):
            response, _ = await get(top, path)
            self.assertEqual((path, response.code), (path, code))

    def test_needs_metrics(self):
        """Without a metrics section there is no status page either (no port opens)."""
        top = start_bus(self)
        self.assertRaises(KeyError, top.getServiceNamed, "metrics")


def _intel_json(i: int) -> dict:
    return {
        "ts": "2020-11-26 14:46:52",
        "id": f"intel-{i}",
        "data": {"indicator": [f"evil{i}.example.com"], "intel_type": 11},
        "operation": "ADD",
    }


def advance(clock: Clock, seconds: int, step: int = 5) -> None:
    """Let ``seconds`` pass a ``step`` at a time, as a running reactor would."""
    for _ in range(seconds // step):
        clock.advance(step)


class StatusClockTests(SynchronousTestCase):
    """Status, Rates and the services' status() on a Clock, with memory sockets and fakes."""

    def test_times(self):
        """Uptime counts from start; a subscription's age and last heartbeat from the clock."""
        world = World()
        status = Status(world.clock, world.bus, world.bus.backbone, [world.zmq_app])
        world.clock.advance(100)
        self.assertEqual(status.report()["uptime_seconds"], 0)
        status.start()
        self.addCleanup(status.stop)
        sub = world.app("threatbus/intel")
        world.clock.advance(30)
        self.assertTrue(world.subscriptions.heartbeat(sub.p2p))
        world.clock.advance(7)
        got = status.report()
        self.assertEqual(got["uptime_seconds"], 37)
        (item,) = got["subscriptions"]["items"]
        self.assertEqual((item["age_seconds"], item["last_heartbeat_seconds_ago"]), (37, 7))
        self.assertEqual(item["peer"], "")
        page = Page(render_page(got))
        self.assertEqual(page.overview()["Uptime"], "37s")
        self.assertEqual(page.rows("subscriptions")[0]["Last heartbeat"], "7s ago")

    def test_buffered(self):
        """Frames held for an app whose socket is full: per subscription, and for the plugin."""
        world = World()
        status = Status(world.clock, world.bus, world.bus.backbone, [world.zmq_app])
        world.app("threatbus/intel")
        world.full(True)
        world.publish(intel(1), intel(2))
        got = status.report()
        (item,) = got["subscriptions"]["items"]
        self.assertEqual(item["buffered_frames"], 2)
        self.assertGreater(item["buffered_bytes"], 0)
        self.assertEqual(got["apps"][0]["buffered_bytes"], item["buffered_bytes"])

    def test_rates(self):
        """Rates are the change of the counters from the oldest sample within the window to now."""
        world = World()
        metrics = world.metrics
        status = Status(world.clock, world.bus, world.bus.backbone, [world.zmq_app], interval=5, window=60)
        calls = set(world.clock.getDelayedCalls())
        self.assertEqual(status.report()["rates"]["seconds"], 0)
        status.start()
        self.assertEqual(status.report()["rates"]["received"], 0)
        advance(world.clock, 10)
        metrics.received["intel"].inc(50)
        metrics.published["sighting"].inc(20)
        metrics.drop("buffer_overflow", 30)
        rates = status.report()["rates"]
        self.assertEqual(
            rates,
            {
                "seconds": 10, "received": 5.0, "published": 2.0, "unrouted": 0.0, "dropped": 3.0,
                "dropped_by_reason": {"buffer_overflow": 3.0},
            },
        )
        advance(world.clock, 50)
        self.assertAlmostEqual(status.report()["rates"]["received"], round(50 / 60, 3))
        advance(world.clock, 5)  # the sample at 0 is forgotten; the one at 5 is before the counts
        rates = status.report()["rates"]
        self.assertEqual((rates["seconds"], rates["received"]), (60, round(50 / 60, 3)))
        advance(world.clock, 10)  # the samples before the counts are forgotten
        rates = status.report()["rates"]
        self.assertEqual((rates["seconds"], rates["received"], rates["dropped"]), (60, 0.0, 0.0))
        self.assertEqual(status.report()["totals"], {"received": 50, "published": 20, "unrouted": 0, "dropped": 30})
        page = Page(render_page(status.report()))
        self.assertEqual(
            {row["Messages"]: (row["Rate"], row["In all"]) for row in page.rows("rates")},
            {
                "received from apps": ("0.00/s", "50"), "published to apps": ("0.00/s", "20"),
                "reached no subscriber": ("0.00/s", "0"), "dropped": ("0.00/s", "30"),
                "dropped: buffer_overflow": ("0.00/s", ""),
            },
        )
        status.stop()
        self.assertEqual(set(world.clock.getDelayedCalls()), calls)

    def test_rates_sampler_alone(self):
        """Rates samples every interval, and only while started."""
        clock = Clock()
        counts = {"n": 0}
        rates = Rates(clock, lambda: dict(counts), interval=1, window=3)
        rates.start()
        for _ in range(10):
            counts["n"] += 2
            clock.advance(1)
        self.assertEqual(rates.rates(), {"seconds": 3, "per_second": {"n": 2.0}})
        rates.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(rates.rates(), {"seconds": 0.0, "per_second": {"n": 0.0}})

    def test_limit(self):
        """The limit bounds the list, not the total."""
        world = World()
        status = Status(world.clock, world.bus, world.bus.backbone, [world.zmq_app], limit=3)
        subs = [world.subscriptions.subscribe("threatbus", timedelta(0)) for _ in range(5)]
        got = status.report()["subscriptions"]
        self.assertEqual((got["total"], got["listed"], got["limit"]), (5, 3, 3))
        self.assertEqual([i["p2p"] for i in got["items"]], [s.p2p[:4] + "\u2026" for s in subs[:3]])

    def test_store_url_without_password(self):
        """A store's status names its database without the password."""
        clock = Clock()
        bus = Bus(InMemoryBackbone(), clock)
        store = StoreService(Database("postgresql://alice:s3cret@db.example/intel"), bus, clock)
        status = Status(clock, bus, bus.backbone, [], store)
        got = status.report()
        self.assertEqual(
            got["store"],
            {
                "url": "postgresql://alice:***@db.example/intel",
                "state": "stopped",
                "records": None,
                "queue": {"records": 0, "bytes": 0},
            },
        )
        self.assertNotIn(b"s3cret", to_json(got))
        self.assertNotIn("s3cret", render_page(got))
        self.assertEqual(
            Page(render_page(got)).overview()["Store"],
            "postgresql://alice:***@db.example/intel: stopped; records: not counted yet; "
            "waiting to be written: 0 (0 bytes)",
        )

    def test_rabbitmq_backbone(self):
        """The RabbitMQ backbone's state: connected or not, address, messages not yet confirmed."""
        from tests.rabbitmq_fakes import Harness

        h = Harness(self, wait_for_broker=True)
        bus = Bus(h.backbone, h.clock, h.metrics)
        status = Status(h.clock, bus, h.backbone)
        self.assertEqual(
            status.report()["backbone"],
            {
                "kind": "rabbitmq", "connected": False, "address": "localhost:5672", "vhost": "/",
                "pending_messages": 0, "pending_bytes": 0,
            },
        )
        h.backbone.startService()
        h.backbone.publish(intel(1))
        backbone = status.report()["backbone"]
        self.assertEqual((backbone["connected"], backbone["pending_messages"]), (False, 1))
        self.assertGreater(backbone["pending_bytes"], 0)
        self.assertIn(
            "RabbitMQ at localhost:5672 (vhost /): NOT connected; 1 messages",
            Page(render_page(status.report())).overview()["Backbone"],
        )
        h.up()
        self.assertTrue(status.report()["backbone"]["connected"])
        self.assertIn("): connected;", Page(render_page(status.report())).overview()["Backbone"])

    def test_duration(self):
        self.assertEqual(
            [duration(s) for s in (None, 0, 59.9, 60, 3661, 90061, -1)],
            ["-", "0s", "59s", "1m 0s", "1h 1m 1s", "1d 1h 1m 1s", "0s"],
        )


# --- a browser


def chromium(testcase) -> str:
    """Chromium's path; SkipTest without it (a failure with CI=true: CI must run the browser test)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    reason = "no chromium on PATH (Debian: apt-get install -y chromium)"
    if os.environ.get("CI") == "true":
        testcase.fail(reason + ", and CI=true: CI must run the browser test")
    raise SkipTest(reason)


class _Output(ProcessProtocol):
    def __init__(self):
        self.out = []
        self.err = []
        self.ended = Deferred()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        if sum(map(len, self.err)) < 1 << 16:
            self.err.append(data)

    def processEnded(self, reason):
        self.ended.callback(reason.value)


async def dump_dom(testcase, url: str, budget_ms: int = 5000) -> str:
    """
    The DOM of ``url`` after ``budget_ms`` of the page's (virtual) time, as
    headless Chromium serializes it. Chromium runs in a process group of its
    own, killed afterwards, and at the deadline.
    """
    path = chromium(testcase)
    profile = os.path.abspath(testcase.mktemp())
    os.makedirs(profile)
    args = [
        path, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--dump-dom", f"--virtual-time-budget={budget_ms}", url,
    ]
    # a new session, so that its whole process group can be killed
    launcher = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"
    output = _Output()
    process = reactor.spawnProcess(output, sys.executable, [sys.executable, "-c", launcher, *args], env=os.environ)
    group = process.pid
    timed_out = []

    def kill():
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass

    def deadline():
        timed_out.append(True)
        kill()

    testcase.addCleanup(kill)
    timer = reactor.callLater(CHROMIUM_DEADLINE, deadline)
    await output.ended
    if timer.active():
        timer.cancel()
    kill()  # what it may have left behind
    stderr = b"".join(output.err).decode(errors="replace")[-2000:]
    if timed_out:
        testcase.fail(f"chromium did not finish within {CHROMIUM_DEADLINE} s; its stderr ends: {stderr}")
    dom = b"".join(output.out).decode()
    if "<html" not in dom:
        testcase.fail(f"chromium printed no DOM; its stderr ends: {stderr}")
    return dom


class BrowserTests(TestCase):
    """What a person sees: headless Chromium loads / and lets the page refresh itself."""

    async def test_page_refreshes(self):
        """
        After the page's own refreshes from /status.json: the version, the
        backbone state, a row for the connected app, and a row for a
        subscription made only after the page was served, its markup shown
        as text.
        """
        chromium(self)
        top = status_bus(self)
        ctx = Context(self)
        (app,) = await connected_apps(ctx, top, "threatbus/intel")
        self.assertEqual((await app.heartbeat())["status"], "success")
        page_resource = top.getServiceNamed("metrics").factory.resource.children[b""]
        render = page_resource.render_GET
        served = []

        def render_then_subscribe(request):
            body = render(request)
            if not served:  # only a refresh can show it
                served.append(body)
                hostile_subscription(top)
            return body

        self.patch(page_resource, "render_GET", render_then_subscribe)
        port = top.getServiceNamed("metrics").port
        dom = await dump_dom(self, f"http://127.0.0.1:{port}/")
        self.assertEqual(len(served), 1)
        self.assertEqual(len(Page(served[0].decode()).rows("subscriptions")), 1)
        page = Page(dom)
        self.assertGreaterEqual(int(page.attributes["#updated"]["data-refreshes"]), 1, page.text["#updated"])
        self.assertTrue(page.text["#updated"].startswith("Updated "), page.text["#updated"])
        self.assertEqual(page.title, f"txthreatbus {VERSION} status")  # not "pwned"
        self.assertEqual(page.text["#title"], f"txthreatbus {VERSION}")
        overview = page.overview()
        self.assertEqual(overview["Version"], VERSION)
        self.assertEqual(overview["Backbone"], "in-memory (this instance only)")
        self.assertEqual(page.rows("endpoints")[0]["Manage"], str(zmq_app_of(top).ports["manage"]))
        first, second = page.rows("subscriptions")
        self.assertEqual(
            (first["Topics"], first["P2P topic"], first["Peer"], first["Ready"], first["Generation"]),
            ("threatbus/intel", app.p2p[:4] + "\u2026", "127.0.0.1", "yes", "2020"),
        )
        self.assertRegex(first["Last heartbeat"], r"^\d+s ago$")
        self.assertEqual(
            (second["Topics"], second["Peer"], second["Last heartbeat"]), (HOSTILE_TOPIC, HOSTILE_PEER, "never")
        )
        self.assertNotIn(app.p2p, dom)
        assert_inert(self, page)
