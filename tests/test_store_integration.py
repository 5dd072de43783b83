"""
The store with real components: a real ``twistd zmq-app`` process whose
SQLite store keeps what it routed across a restart and a SIGKILL, and two
instances on RabbitMQ, sharing one PostgreSQL database (each message recorded
once, each snapshot answered once) or each with a SQLite file of its own.

The PostgreSQL server is the one on 127.0.0.1:5432 (trust auth, database
``test``); each test works in a schema of its own, dropped at the end.
Without it (or without the RabbitMQ broker) those tests are skipped, except
in CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from datetime import datetime

import attrs
import zmq
from twisted.internet import reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import (
    DEADLINE,
    App,
    Context,
    Timeout,
    connected_apps,
    drain,
    free_ports,
    postgresql_schema,
    publish_until_seen,
    settle,
    start_bus,
    wait_for,
)
from tests.test_rabbitmq import BrokerTestCase, intel_json
from tests.test_rabbitmq import intel as intel_item
from tests.test_tap import PROCESS_DEADLINE, REPO_ROOT, TWISTD, ProcessOutput, write_config
from txthreatbus import codec
from txthreatbus.config import Config, StoreConfig, ZmqAppConfig
from txthreatbus.model import Operation, Sighting



# --- helpers


def remove_json(id: str) -> dict:
    """The 2020 JSON of an Intel REMOVE of ``id``."""
    return codec.unstructure(attrs.evolve(intel_item(id), operation=Operation.REMOVE))


def sighting_json(intel_id: str, uid: str) -> dict:
    """The 2020 JSON of a Sighting of ``intel_id``, told apart by ``uid``."""
    return codec.unstructure(
        Sighting(datetime(2020, 11, 26, 15, 0, 0, 123456), intel_id, {"source": "test", "uid": uid}, ("example.com",))
    )


def postgres_rows(engine, schema: str) -> dict:
    """The store's rows in ``schema``: intel (kind, item_id) pairs and sighting bodies."""
    import sqlalchemy as sa

    with engine.connect() as connection:
        intel = [tuple(r) for r in connection.execute(sa.text(f'SELECT kind, item_id FROM "{schema}".txthreatbus_intel'))]
        sightings = [bytes(r[0]) for r in connection.execute(sa.text(f'SELECT body FROM "{schema}".txthreatbus_sightings'))]
    return {"intel": intel, "sightings": sightings}


def sqlite_rows(path: str) -> dict:
    """The store's rows in the SQLite file ``path`` (empty before it has its tables)."""
    connection = sqlite3.connect(path, timeout=5)
    try:
        intel = [tuple(r) for r in connection.execute("SELECT kind, item_id FROM txthreatbus_intel")]
        sightings = [bytes(r[0]) for r in connection.execute("SELECT body FROM txthreatbus_sightings")]
    except sqlite3.OperationalError:  # no tables yet
        return {"intel": [], "sightings": []}
    finally:
        connection.close()
    return {"intel": intel, "sightings": sightings}


async def poll_rows(read, predicate, what: str, timeout: float = DEADLINE) -> dict:
    """Read the rows (``read``, blocking, in a thread) until ``predicate`` holds of them."""
    end = time.monotonic() + timeout
    while True:
        rows = await deferToThread(read)
        if predicate(rows):
            return rows
        if time.monotonic() > end:
            raise Timeout(f"timed out after {timeout} s waiting for {what}: rows are {rows}")
        await deferLater(reactor, 0.05, lambda: None)


class Collector:
    """What an app has received, parsed, kept across polls."""

    def __init__(self, app: App):
        self.app = app
        self.got = []

    def poll(self) -> list:
        self.got.extend(self.app.parse(f) for f in drain(self.app.sub))
        return self.got

    def intel_ids(self) -> list:
        return sorted(body["id"] for suffix, body in self.poll() if suffix == "intel")

    def of(self, suffix: str) -> list:
        return [body for s, body in self.poll() if s == suffix]


# --- a real twistd process


class TwistdStoreTests(TestCase):
    """A real ``twistd -n zmq-app`` with a SQLite store: killed or stopped, then started again."""

    timeout = 2 * PROCESS_DEADLINE + 60

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.database = os.path.join(self.workdir, "intel.sqlite")
        self.manage, self.pub, self.sub = free_ports(3)
        self.config = write_config(
            self,
            f"""\
logging: {{console: true, console_verbosity: INFO}}
store: {{url: "sqlite:///{self.database}", retention_days: 0}}
plugins:
  backbones:
    inmem: {{}}
  apps:
    zmq-app: {{host: 127.0.0.1, manage: {self.manage}, pub: {self.pub}, sub: {self.sub}}}
""",
        )

    async def start(self) -> ProcessOutput:
        """A twistd of the test's config, serving, with its store open."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        process = ProcessOutput()
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile", os.path.join(self.workdir, "twistd.pid")]
        reactor.spawnProcess(process, sys.executable, argv + ["zmq-app", "--config", self.config], env=env, path=self.workdir)
        self.addCleanup(process.kill)
        await wait_for(
            lambda: (
                f"manage endpoint listening on 127.0.0.1:{self.manage}" in process.text() and "Store open" in process.text()
            )
            or process.done,
            PROCESS_DEADLINE,
            "twistd to bind its manage port and open its store",
        )
        self.assertFalse(process.done, process.text())
        return process

    def app(self, ctx: Context) -> App:
        return App(manage=ctx.socket(zmq.REQ, f"tcp://127.0.0.1:{self.manage}"))

    async def publish_and_stop(self, signal: str, wait: float) -> ProcessOutput:
        """
        Publish ADD i1, ADD i2, REMOVE i1 and a Sighting at a fresh twistd
        (after probes: ADD probe), see them routed, wait ``wait`` seconds and
        send the process ``signal``. Returns the ended process.
        """
        process = await self.start()
        ctx = Context(self)
        watcher = self.app(ctx)
        await watcher.subscribe(ctx, "threatbus")
        publisher = self.app(ctx)
        await publisher.subscribe(ctx, "threatbus/sighting", connect_sub=False)
        await publish_until_seen(publisher, "threatbus/intel", intel_json("probe"), [watcher])

        sent = [
            ("threatbus/intel", intel_json("i1")),
            ("threatbus/intel", intel_json("i2")),
            ("threatbus/intel", remove_json("i1")),
            ("threatbus/sighting", sighting_json("i2", "seen-once")),
        ]
        for topic, body in sent:
            publisher.publish(topic, body)
        seen = Collector(watcher)
        expected = [(topic.rpartition("/")[2], body) for topic, body in sent]
        await wait_for(
            lambda: [got for got in seen.poll() if got != ("intel", intel_json("probe"))] == expected,
            what="the bus to route all four",
        )
        if wait:
            await settle(wait)  # polling shows nothing here: the guarantee is about time
        process.transport.signalProcess(signal)
        reason = await process.finished()
        ctx.ctx.destroy(0)
        return reason, process

    async def assert_remembered(self):
        """A new twistd on the same config answers a snapshot with i2, the probe and the Sighting, not i1."""
        process = await self.start()
        ctx = Context(self)
        requester = self.app(ctx)
        await requester.subscribe(ctx, "threatbus", snapshot=1)
        answers = Collector(requester)
        await wait_for(
            lambda: "i2" in answers.intel_ids() and answers.of("sighting"),
            what="the store's answer",
        )
        await settle(0.5)  # nothing more comes
        self.assertEqual(answers.intel_ids(), ["i2", "probe"], process.text())
        self.assertIn(("intel", intel_json("i2")), answers.got)
        self.assertEqual(answers.of("sighting"), [sighting_json("i2", "seen-once")])
        self.assertEqual([s for s, _ in answers.got if s not in ("intel", "sighting")], [])
        self.assertNotIn("Traceback", process.text())

    async def test_sigkill_keeps_records(self):
        """What was routed more than 1 s before a SIGKILL is answered from the store by the next process."""
        reason, process = await self.publish_and_stop("KILL", 1.5)
        self.assertIsInstance(reason, ProcessTerminated, process.text())
        self.assertEqual(reason.signal, 9, process.text())
        await self.assert_remembered()

    async def test_restart_keeps_records(self):
        """What was routed before a SIGTERM (at once, no waiting) is answered from the store after a restart."""
        reason, process = await self.publish_and_stop("TERM", 0)
        output = process.text()
        if isinstance(reason, ProcessTerminated) and reason.signal is not None:
            self.assertEqual(reason.signal, 15, output)
        else:
            self.assertIsInstance(reason, ProcessDone, output)
        self.assertIn("Server Shut Down.", output)
        self.assertNotIn("Traceback", output)
        await self.assert_remembered()


# --- two instances on RabbitMQ


class StoreBrokerTests(BrokerTestCase):
    """Two whole buses on RabbitMQ in one process, with stores."""

    async def start_two(self, urls):
        zmq_app = ZmqAppConfig(manage=0, pub=0, sub=0)
        tops = [
            start_bus(self, Config(backbone=self.config(name), apps={"zmq-app": zmq_app}, store=StoreConfig(url=url)))
            for name, url in zip(("one", "two"), urls)
        ]
        backbones = [top.getServiceNamed("backbone") for top in tops]
        await wait_for(lambda: all(b.connected for b in backbones), what="the backbones")
        return tops

    async def route_at_one(self, one, two):
        """
        Publish a probe, Intel ``the-one`` and a Sighting at instance one,
        and see them routed at both instances. Returns the app context.
        """
        ctx = Context(self)
        publisher = App.on(ctx, one)
        await publisher.subscribe(ctx, "threatbus/sighting", connect_sub=False)
        watchers = [(await connected_apps(ctx, top, "threatbus"))[0] for top in (one, two)]
        await publish_until_seen(publisher, "threatbus/intel", intel_json("probe"), watchers)
        publisher.publish("threatbus/intel", intel_json("the-one"))
        publisher.publish("threatbus/sighting", sighting_json("the-one", "seen-once"))
        for app in watchers:
            seen = Collector(app)
            await wait_for(
                lambda: "the-one" in seen.intel_ids() and seen.of("sighting"),
                what="the intel and the sighting at both instances",
            )
        return ctx

    async def snapshot_at(self, ctx, top, bystanders):
        """A requester at ``top`` subscribes with snapshot 1; what it and the bystanders then got."""
        for app in bystanders:
            drain(app.sub)
        requester = App.on(ctx, top)
        await requester.subscribe(ctx, "threatbus", snapshot=1)
        answers = Collector(requester)
        await wait_for(
            lambda: "the-one" in answers.intel_ids() and answers.of("sighting"),
            what="the store's answer",
        )
        await settle(0.5)  # a second answer would come within this
        others = [[f for f in drain(app.sub) if b"the-one" in f] for app in bystanders]
        return answers, others

    def assertAnswered(self, answers, others):
        ids = answers.intel_ids()
        self.assertEqual(ids.count("the-one"), 1, answers.got)
        self.assertEqual(ids.count("probe"), 1, answers.got)
        self.assertEqual(answers.of("sighting"), [sighting_json("the-one", "seen-once")])
        self.assertEqual(others, [[] for _ in others])

    async def test_shared_postgresql_records_once_answers_once(self):
        """With one PostgreSQL, what both instances route is one row each, and a snapshot is answered once, to its requester only."""
        url, schema, engine = postgresql_schema(self)
        one, two = await self.start_two([url, url])
        ctx = await self.route_at_one(one, two)

        def recorded(rows):
            return ("intel", "the-one") in rows["intel"] and rows["sightings"]

        rows = await poll_rows(lambda: postgres_rows(engine, schema), recorded, "the records in PostgreSQL")
        await settle(1.0)  # both stores have flushed (every 0.2 s)
        rows = await deferToThread(postgres_rows, engine, schema)
        self.assertEqual(sorted(rows["intel"]), [("intel", "probe"), ("intel", "the-one")])
        self.assertEqual(len(rows["sightings"]), 1, rows["sightings"])
        # ... though both wrote what they routed
        writes = [
            top.getServiceNamed("bus").metrics.registry.get_sample_value("txthreatbus_store_writes_total")
            for top in (one, two)
        ]
        self.assertTrue(all(writes), writes)

        bystanders = []
        for top in (one, two):
            app = App.on(ctx, top)
            await app.subscribe(ctx, "threatbus")
            await app.wait_connected(top)
            bystanders.append(app)
        answers, others = await self.snapshot_at(ctx, two, bystanders)
        self.assertAnswered(answers, others)

    async def test_sqlite_per_instance(self):
        """With a SQLite file per instance, each records everything routed and answers its own requesters once."""
        paths = [os.path.abspath(self.mktemp()) for _ in range(2)]
        one, two = await self.start_two([f"sqlite:///{path}" for path in paths])
        ctx = await self.route_at_one(one, two)

        def recorded(rows):
            return ("intel", "the-one") in rows["intel"] and rows["sightings"]

        for path in paths:
            rows = await poll_rows(lambda: sqlite_rows(path), recorded, f"the records in {path}")
            self.assertEqual(sorted(rows["intel"]), [("intel", "probe"), ("intel", "the-one")])
            self.assertEqual(len(rows["sightings"]), 1, rows["sightings"])

        for top in (one, two):
            bystanders = []
            for other in (one, two):
                app = App.on(ctx, other)
                await app.subscribe(ctx, "threatbus")
                await app.wait_connected(other)
                bystanders.append(app)
            answers, elsewhere = await self.snapshot_at(ctx, top, bystanders)
            self.assertAnswered(answers, elsewhere)
