"""
LoggingService applies the ``logging:`` config to txthreatbus's events while
it runs, and restores plain forwarding when it stops.
"""

from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, LogPublisher, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from txthreatbus import logs
from txthreatbus.config import LoggingConfig
from txthreatbus.logs import LoggingService

LEVELS = ("debug", "info", "warn", "error", "critical")


class LoggingServiceTests(SynchronousTestCase):
    """Console and file filtering by verbosity, and a clean stop."""

    def setUp(self):
        self.events = []
        self.destination = self.events.append
        self.publisher = LogPublisher(self.destination)
        self.log = Logger(namespace="txthreatbus.test", observer=self.publisher)

    def service(self, **config) -> LoggingService:
        service = LoggingService(
            LoggingConfig(**config), publisher=self.publisher, destination=self.destination
        )
        self.assertTrue(verifyObject(IService, service))
        return service

    def emit_all(self):
        """Log one event at each level, its text naming the level."""
        for level in LEVELS:
            getattr(self.log, level)("event at " + level)

    def levels_seen(self):
        return [e["log_level"].name for e in self.events]

    def read(self, path):
        with open(path, encoding="utf-8") as f:
            return f.read()

    def test_name(self):
        """The service is named logging."""
        self.assertEqual(self.service().name, "logging")

    def test_forwards_before_start(self):
        """Until the service starts, every event is forwarded."""
        self.service(console_verbosity="ERROR")
        self.emit_all()
        self.assertEqual(self.levels_seen(), list(LEVELS))

    def test_default_publisher_forwards_to_global(self):
        """The module's publisher forwards to Twisted's global log."""
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        Logger(observer=logs.publisher).info("hello {who}", who="world")
        self.assertIn("world", [e.get("who") for e in seen])

    def test_console_verbosity(self):
        """Only events at or above console_verbosity reach the destination, once each."""
        for verbosity, expected in (
            ("DEBUG", LEVELS),
            ("INFO", LEVELS[1:]),
            ("WARNING", LEVELS[2:]),
            ("WARN", LEVELS[2:]),
            ("error", LEVELS[3:]),
            ("CRITICAL", LEVELS[4:]),
        ):
            del self.events[:]
            service = self.service(console_verbosity=verbosity)
            service.startService()
            self.emit_all()
            service.stopService()
            self.assertEqual(self.levels_seen(), list(expected), verbosity)

    def test_console_off(self):
        """With console: false nothing reaches the destination while running."""
        service = self.service(console=False)
        service.startService()
        self.emit_all()
        self.assertEqual(self.events, [])
        service.stopService()

    def test_file(self):
        """With file: true, events at or above file_verbosity are written to filename, not below."""
        path = self.mktemp()
        service = self.service(console=False, file=True, file_verbosity="WARNING", filename=path)
        service.startService()
        self.emit_all()
        service.stopService()
        text = self.read(path)
        for level in ("warn", "error", "critical"):
            self.assertIn("event at " + level, text)
        for level in ("debug", "info"):
            self.assertNotIn("event at " + level, text)
        self.assertEqual(len(text.splitlines()), 3)
        self.assertEqual(self.events, [])

    def test_file_and_console_apart(self):
        """File and console each apply their own verbosity."""
        path = self.mktemp()
        service = self.service(
            console_verbosity="ERROR", file=True, file_verbosity="DEBUG", filename=path
        )
        service.startService()
        self.emit_all()
        service.stopService()
        self.assertEqual(len(self.read(path).splitlines()), len(LEVELS))
        self.assertEqual(self.levels_seen(), ["error", "critical"])

    def test_file_appends(self):
        """A restart appends to the file rather than truncating it."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("earlier line\n")
        service = self.service(file=True, file_verbosity="INFO", filename=path)
        service.startService()
        self.log.info("later line")
        service.stopService()
        text = self.read(path)
        self.assertTrue(text.startswith("earlier line\n"))
        self.assertIn("later line", text)

    def test_file_written_at_once(self):
        """Events are in the file while the service runs, not only after it stops."""
        path = self.mktemp()
        service = self.service(file=True, file_verbosity="INFO", filename=path)
        service.startService()
        self.addCleanup(service.stopService)
        self.log.info("visible now")
        self.assertIn("visible now", self.read(path))

    def test_bad_filename(self):
        """A file that cannot be opened aborts start-up and leaves forwarding alone."""
        path = os.path.join(self.mktemp(), "missing-dir", "threatbus.log")
        service = self.service(console_verbosity="ERROR", file=True, filename=path)
        self.assertRaises(OSError, service.startService)
        self.assertFalse(service.running)
        self.log.debug("still forwarded")
        self.assertEqual(self.levels_seen(), ["debug"])

    def test_stop_restores_forwarding(self):
        """After stopService every event is forwarded again, once."""
        service = self.service(console_verbosity="CRITICAL")
        service.startService()
        self.log.info("filtered")
        service.stopService()
        self.assertFalse(service.running)
        self.emit_all()
        self.assertEqual(self.levels_seen(), list(LEVELS))

    def test_stop_twice(self):
        """stopService twice is harmless: forwarding is restored once, not twice."""
        path = self.mktemp()
        service = self.service(file=True, filename=path, console_verbosity="ERROR")
        service.startService()
        service.stopService()
        service.stopService()
        self.emit_all()
        self.assertEqual(self.levels_seen(), list(LEVELS))
        self.assertNotIn("event at", self.read(path))

    def test_restart(self):
        """A stopped service can start again and filters as before."""
        service = self.service(console_verbosity="ERROR")
        for _ in range(2):
            service.startService()
            del self.events[:]
            self.emit_all()
            self.assertEqual(self.levels_seen(), ["error", "critical"])
            service.stopService()

    def test_failure_event(self):
        """log.failure events (critical) pass a console_verbosity of ERROR."""
        service = self.service(console_verbosity="ERROR")
        service.startService()
        self.addCleanup(service.stopService)
        try:
            1 / 0
        except ZeroDivisionError:
            self.log.failure("it broke")
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.critical)
        self.assertTrue(event["log_failure"].check(ZeroDivisionError))


class ThrottleTests(SynchronousTestCase):
    """A flood of one kind of event is logged once an interval, with a count of the rest."""

    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.log = Logger(namespace="txthreatbus.test", observer=self.events.append)
        self.throttle = logs.Throttle(self.clock, interval=10)

    def texts(self):
        return [formatEvent(e) for e in self.events]

    def test_first_logged(self):
        """The first event of a key is logged as it is, with its fields."""
        self.throttle("malformed", self.log.warn, "Dropped {what}", what="x")
        self.assertEqual(self.texts(), ["Dropped x"])
        self.assertEqual(self.events[0]["log_level"], LogLevel.warn)

    def test_flood_counted(self):
        """Events within the interval are held back, and the next one logged counts them."""
        for i in range(1000):
            self.throttle("malformed", self.log.warn, "Dropped {i}", i=i)
        self.assertEqual(self.texts(), ["Dropped 0"])
        self.clock.advance(9.9)
        self.throttle("malformed", self.log.warn, "Dropped {i}", i=1000)
        self.assertEqual(len(self.events), 1)
        self.clock.advance(0.1)
        self.throttle("malformed", self.log.warn, "Dropped {i}", i=1001)
        self.assertEqual(
            self.texts()[1], "Dropped 1001 (1000 more like it in the last 10 s were counted, not logged)"
        )
        self.clock.advance(10)
        self.throttle("malformed", self.log.warn, "Dropped {i}", i=1002)
        self.assertEqual(self.texts()[2], "Dropped 1002")

    def test_keys_apart(self):
        """Each key has its own interval."""
        self.throttle("a", self.log.info, "event {k}", k="a")
        self.throttle("b", self.log.info, "event {k}", k="b")
        self.throttle("a", self.log.info, "event {k}", k="a")
        self.assertEqual(self.texts(), ["event a", "event b"])
