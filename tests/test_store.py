"""
The intel store: its database (SQLite, and the PostgreSQL server on
127.0.0.1:5432 where there is one), and the store as a service of a running
bus: what it records, and what it answers to whom.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import sqlalchemy as sa
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from tests.support import (
    App,
    Context,
    connected_apps,
    drain,
    postgresql_schema,
    publish_until_seen,
    settle,
    start_bus,
    wait_for,
)
from tests.test_bus import LogCapture
from tests.test_zmq_app import INTEL, SIGHTING
from txthreatbus import codec
from txthreatbus.config import Config, StoreConfig, ZmqAppConfig
from txthreatbus.metrics import Metrics
from txthreatbus.model import Intel, MessageType, SnapshotRequest
from txthreatbus.store import database as db
from txthreatbus.store import service
from txthreatbus.store.database import Database, Record, SchemaError


def intel(i, operation="ADD", **fields) -> dict:
    return {**INTEL, "id": f"intel-{i}", "operation": operation, **fields}


class DatabaseTestsMixin:
    """The database layer, on a fresh database."""

    def open(self) -> Database:
        database = Database(self.url())
        database.open()
        self.addCleanup(database.close)
        return database

    def test_live_set(self):
        """The live set holds each id's latest record, without ids whose latest is a REMOVE."""
        d = self.open()
        now = time.time()
        d.record([Record("intel", now, b"a1", "i1"), Record("intel", now + 1, b"a2", "i2")])
        d.record([Record("intel", now + 2, b"r1", "i1", removes=True), Record("indicator", now + 3, b"x", "i1")])
        self.assertEqual([(k, b) for _, k, b in d.live_intel(now - 10, None, 10)], [("intel", b"a2"), ("indicator", b"x")])
        d.record([Record("intel", now + 4, b"a1 again", "i1")])
        self.assertEqual([b for _, _, b in d.live_intel(now - 10, None, 10)], [b"a2", b"x", b"a1 again"])

    def test_window(self):
        """Only what was received at the window's start or later is read."""
        d = self.open()
        now = time.time()
        d.record([Record("intel", now - 172800, b"old", "i1"), Record("intel", now, b"new", "i2")])
        d.record([Record("sighting", now - 172800, b"old s"), Record("sighting", now, b"new s")])
        self.assertEqual([b for _, _, b in d.live_intel(now - 86400, None, 10)], [b"new"])
        self.assertEqual([b for _, _, b in d.sightings_since(now - 86400, None, 10)], [b"new s"])

    def test_pages_in_receipt_order(self):
        """Pages after the last key give every row once, in receipt order."""
        d = self.open()
        now = time.time()
        d.record([Record("intel", now + i, f"{i}".encode(), f"i{4 - i}") for i in range(5)])
        d.record([Record("sighting", now + i, f"s{i}".encode()) for i in range(5)])
        for read in (d.live_intel, d.sightings_since):
            got, after = [], None
            while True:
                page = read(now - 1, after, 2)
                got += [b for _, _, b in page]
                if len(page) < 2:
                    break
                after = page[-1][0]
            self.assertEqual(got, [f"{i}".encode() if read == d.live_intel else f"s{i}".encode() for i in range(5)])

    def test_sighting_once(self):
        """A Sighting recorded twice (as instances sharing the database do) is one row."""
        d = self.open()
        now = time.time()
        d.record([Record("sighting", now, b"s"), Record("sighting", now + 1, b"s")])
        d.record([Record("sighting", now + 2, b"s"), Record("stix_sighting", now + 2, b"s")])
        self.assertEqual(d.counts(), {"sighting": 1, "stix_sighting": 1})

    def test_prune(self):
        """prune deletes what was received before the cut, of both tables."""
        d = self.open()
        now = time.time()
        d.record([Record("intel", now - 10, b"a", "i1"), Record("intel", now, b"b", "i2"), Record("sighting", now - 10, b"s")])
        self.assertEqual(d.prune(now - 5), 2)
        self.assertEqual(d.counts(), {"intel": 1})

    def test_schema_versioned(self):
        """Opening creates the current schema version; opening again keeps the data; a newer schema is refused."""
        d = self.open()
        d.record([Record("intel", time.time(), b"a", "i1")])
        self.assertEqual(d.migrate(), db.SCHEMA_VERSION)
        again = self.open()
        self.assertEqual(again.counts(), {"intel": 1})
        with again._engine.begin() as connection:
            connection.execute(db.schema_version.update().values(version=db.SCHEMA_VERSION + 1))
        error = self.assertRaises(SchemaError, self.open)
        self.assertIn("newer than this txthreatbus knows", str(error))


class SQLiteDatabaseTests(DatabaseTestsMixin, TestCase):
    def url(self) -> str:
        if not hasattr(self, "_path"):
            self._path = os.path.abspath(self.mktemp())
        return f"sqlite:///{self._path}"


class PostgreSQLDatabaseTests(DatabaseTestsMixin, TestCase):
    def url(self) -> str:
        if not hasattr(self, "_url"):
            self._url = postgresql_schema(self)[0]
        return self._url


def store_bus(testcase, url: str = None):
    """A running bus on ephemeral ports with a store on SQLite (or ``url``)."""
    if url is None:
        url = f"sqlite:///{os.path.abspath(testcase.mktemp())}"
    config = Config(apps={"zmq-app": ZmqAppConfig(manage=0, pub=0, sub=0)}, store=StoreConfig(url=url))
    return start_bus(testcase, config)


async def counts(top) -> dict:
    store = top.getServiceNamed("store")
    return await store._in_thread(store.database.counts)


async def recorded(top, expected: dict) -> None:
    """Wait until the store holds ``expected`` records by kind."""
    got = {}
    end = time.monotonic() + 10

    while got != expected:
        if time.monotonic() > end:
            raise AssertionError(f"the store holds {got}, not {expected}")
        try:
            got = await counts(top)
        except sa.exc.SQLAlchemyError as e:  # not open yet
            got = e
        await deferLater(reactor, 0.05, lambda: None)


class StoreServiceTests(TestCase):
    """A bus with its store: what it records, and what it answers."""

    async def apps(self, top, *topics):
        ctx = Context(self)
        return ctx, await connected_apps(ctx, top, *topics)

    async def test_records_originals_of_both_generations(self):
        """Intel, Sightings and STIX objects are recorded as published, never their translations; the writer says nothing."""
        log = LogCapture(self)
        top = store_bus(self)
        ctx, (old, new) = await self.apps(top, "threatbus", "stix2")
        indicator = {
            "type": "indicator",
            "spec_version": "2.1",
            "id": "indicator--6911104f-c504-4086-a15b-05e28cf73435",
            "pattern": "[ipv4-addr:value = '203.0.113.1']",
            "pattern_type": "stix",
        }
        await publish_until_seen(old, "threatbus/intel", intel("probe"), [new])
        await publish_until_seen(new, "stix2/indicator", indicator, [old])
        old.publish("threatbus/sighting", SIGHTING)
        await recorded(top, {"intel": 1, "indicator": 1, "sighting": 1})
        await settle(0.3)
        self.assertEqual(await counts(top), {"intel": 1, "indicator": 1, "sighting": 1})
        self.assertEqual([e for e in log.events if e["log_level"] >= LogLevel.warn], [])

    async def test_snapshot_from_store(self):
        """A snapshot gets the live set and the sightings, to the requester only, in its generation."""
        top = store_bus(self)
        ctx, (publisher, bystander) = await self.apps(top, "threatbus/sighting", "threatbus")
        await publish_until_seen(publisher, "threatbus/intel", intel(2), [bystander])
        for message in (intel(1), intel(2, ts="2000-01-01 00:00:00"), intel(1, "REMOVE")):
            publisher.publish("threatbus/intel", message)
        publisher.publish("threatbus/sighting", SIGHTING)
        await recorded(top, {"intel": 2, "sighting": 1})
        drain(bystander.sub)

        requester = App.on(ctx, top)
        await requester.subscribe(ctx, "threatbus", snapshot=1)
        got = await requester.receive(2)
        # intel-2 as last published (its old ts does not matter: the window is by receipt)
        self.assertEqual(got, [("intel", intel(2, ts="2000-01-01 00:00:00")), ("sighting", SIGHTING)])
        stix_requester = App.on(ctx, top)
        await stix_requester.subscribe(ctx, "stix2/indicator", snapshot=1)
        ((suffix, indicator),) = await stix_requester.receive(1)
        self.assertEqual((suffix, indicator["x_threatbus_intel_id"]), ("indicator", "intel-2"))
        await settle(0.2)
        # nothing more, but the requests of the later requester
        for app in (bystander, requester, stix_requester):
            self.assertEqual([f for f in drain(app.sub) if b"snapshotrequest" not in f], [])

    async def test_database_unavailable_at_start(self):
        """A database that cannot be opened is counted and retried; routing goes on, and nothing is lost."""
        self.patch(service, "MAX_RETRY_DELAY", 0.1)
        directory = os.path.abspath(self.mktemp())  # not there yet: SQLite cannot create the file
        top = store_bus(self, f"sqlite:///{directory}/intel.sqlite")
        ctx, (publisher, receiver) = await self.apps(top, "threatbus/sighting", "threatbus/intel")
        await publish_until_seen(publisher, "threatbus/intel", intel(1), [receiver])
        publisher.publish("threatbus/intel", intel(2))
        self.assertEqual([body["id"] for _, body in await receiver.receive(1)], ["intel-2"])
        metrics = top.getServiceNamed("bus").metrics
        failures = lambda: metrics.registry.get_sample_value("txthreatbus_store_failures_total", {"operation": "open"})
        await wait_for(lambda: (failures() or 0) >= 2, what="failed opens, retried")
        os.makedirs(directory)
        await recorded(top, {"intel": 2})

    async def test_writer_dies(self):
        """A writer process that dies is started anew; what it was sent is written again, nothing lost."""
        top = store_bus(self)
        store = top.getServiceNamed("store")
        ctx, (publisher, receiver) = await self.apps(top, "threatbus/sighting", "threatbus/intel")
        await publish_until_seen(publisher, "threatbus/intel", intel(1), [receiver])
        await recorded(top, {"intel": 1})
        first = store._writer
        with open(f"/proc/{first.transport.pid}/cmdline", "rb") as f:
            self.assertNotIn(b"sqlite", f.read())  # the URL (and any password) is not in ps
        first.transport.signalProcess("KILL")
        await first.ended
        for i in range(2, 50):
            publisher.publish("threatbus/intel", intel(i))
        await recorded(top, {"intel": 49})
        self.assertIsNot(store._writer, first)
        self.assertGreaterEqual(top.getServiceNamed("bus").metrics.registry.get_sample_value("txthreatbus_store_writes_total"), 2)


class FakeBus:
    """What the store needs of a bus to answer: snapshot_open and deliver."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.open = True
        self.delivered = []

    def snapshot_open(self, snapshot_id):
        return self.open

    def deliver(self, envelope):
        self.delivered.append(envelope.body.id)


class PagedDatabase:
    """Pages of Intel, read as the store reads them."""

    def __init__(self, n):
        self.items = [codec.encode(codec.structure(Intel, intel(i))) for i in range(n)]
        self.reads = 0

    def live_intel(self, since, after, limit):
        self.reads += 1
        start = 0 if after is None else after[0] + 1
        return [((i,), "intel", self.items[i]) for i in range(start, min(start + limit, len(self.items)))]


class PacingTests(TestCase):
    """The store reads the next page only once the requester has taken most of the last."""

    async def test_paced_by_requester(self):
        """While the requester holds more than PACE_BYTES unsent, no further page is read; then the rest comes."""
        self.patch(service, "PAGE", 3)
        bus = FakeBus(Metrics())
        database = PagedDatabase(7)
        store = service.StoreService(database, bus, reactor)
        store._pool.start()
        self.addCleanup(store._pool.stop)
        store._opened = Deferred()
        store._opened.callback(None)
        store.running = True

        class Requester:
            pending_bytes = service.PACE_BYTES + 1

        requester = Requester()
        request = SnapshotRequest(MessageType.INTEL, "s-1", timedelta(days=1))
        store.snapshot(request, requester)
        await wait_for(lambda: len(bus.delivered) == 3, what="the first page")
        await settle(0.1)
        self.assertEqual((len(bus.delivered), database.reads), (3, 1))
        requester.pending_bytes = 0
        await wait_for(lambda: len(bus.delivered) == 7, what="the rest")
        self.assertEqual(bus.delivered, [f"intel-{i}" for i in range(7)])

    async def test_not_for_other_instances(self):
        """A request of another instance's app (no requester here) is left to that instance's store."""
        bus = FakeBus(Metrics())
        database = PagedDatabase(2)
        store = service.StoreService(database, bus, reactor)
        store.running = True
        store.snapshot(SnapshotRequest(MessageType.INTEL, "s-1", timedelta(days=1)), None)
        await settle(0.05)
        self.assertEqual((bus.delivered, database.reads), ([], 0))
