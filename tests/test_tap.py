"""
``twistd zmq-app``: the plugin is found, its options validate the config, it
wires the expected service tree, and a real twistd process starts, serves
and shuts down cleanly.
"""

from __future__ import annotations

import os
import signal
import sys

import zmq
from twisted.application.service import IService, IServiceMaker, MultiService
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support import Context, free_ports, request, wait_for
from txthreatbus import tap
from txthreatbus.apps.zmq_app import ZmqAppService
from txthreatbus.backbones.inmem import InMemoryBackbone
from txthreatbus.bus import Bus
from txthreatbus.config import Config, MetricsConfig, ZmqAppConfig
from txthreatbus.interfaces import IApp, IBackbone
from txthreatbus.logs import LoggingService

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: twistd, run by this interpreter (``python -m twisted`` is ``twist``, not twistd).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

#: Seconds a twistd process may take to start or to stop.
PROCESS_DEADLINE = 60.0


def zmq_app_plugin():
    return [p for p in getPlugins(IServiceMaker) if p.tapname == "zmq-app"]


def write_config(testcase, text: str) -> str:
    path = os.path.abspath(testcase.mktemp())
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class PluginTests(SynchronousTestCase):
    """twistd finds the zmq-app plugin."""

    def test_discoverable(self):
        """getPlugins(IServiceMaker) yields exactly one plugin with tapname zmq-app."""
        [maker] = zmq_app_plugin()
        self.assertTrue(verifyObject(IServiceMaker, maker))
        self.assertTrue(IPlugin.providedBy(maker))

    def test_points_at_tap(self):
        """The plugin's options and makeService are txthreatbus.tap's."""
        [maker] = zmq_app_plugin()
        self.assertIs(maker.options, tap.Options)
        self.assertIs(maker.makeService, tap.makeService)
        self.assertTrue(maker.description)


class OptionsTests(SynchronousTestCase):
    """The command line: --config FILE, or nothing."""

    def test_no_args(self):
        """Without arguments the config is all defaults."""
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["config"], Config())

    def test_config_file(self):
        """--config FILE (and -c FILE) loads that file."""
        path = write_config(self, "plugins: {apps: {zmq-app: {manage: 14000}}}\n")
        for args in (["--config", path], ["-c", path], [f"--config={path}"]):
            options = tap.Options()
            options.parseOptions(args)
            self.assertEqual(options["config"].zmq_app.manage, 14000)

    def test_bad_config(self):
        """A bad config is a UsageError naming the key."""
        path = write_config(self, "plugins: {apps: {zmq-app: {pub: 70000}}}\n")
        e = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--config", path])
        self.assertIn("plugins.apps.zmq-app.pub", str(e))
        self.assertIn(path, str(e))

    def test_missing_config(self):
        """A config file that does not exist is a UsageError naming it."""
        path = os.path.abspath(self.mktemp())
        e = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--config", path])
        self.assertIn(path, str(e))

    def test_unknown_option(self):
        """An unknown option is a UsageError."""
        self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--port", "1"])


class ServiceTreeTests(SynchronousTestCase):
    """makeService and bus_service wire the bus as one tree (nothing starts)."""

    def names(self, parent):
        return [s.name for s in parent]

    def assertTree(self, top, metrics: bool, store: bool = True):
        self.assertIsInstance(top, MultiService)
        self.assertTrue(verifyObject(IService, top))
        expected = ["logging", "backbone", "bus"] + (["store"] if store else []) + ["zmq-app"]
        self.assertEqual(self.names(top), expected + (["metrics"] if metrics else []))
        self.assertIsInstance(top.getServiceNamed("logging"), LoggingService)
        backbone = top.getServiceNamed("backbone")
        self.assertIsInstance(backbone, InMemoryBackbone)
        self.assertTrue(verifyObject(IBackbone, backbone))
        bus = top.getServiceNamed("bus")
        self.assertIsInstance(bus, Bus)
        self.assertIs(bus.backbone, backbone)
        app = top.getServiceNamed("zmq-app")
        self.assertIsInstance(app, ZmqAppService)
        self.assertIsInstance(app, MultiService)
        self.assertTrue(verifyObject(IApp, app))
        self.assertEqual(sorted(self.names(app)), ["manage", "pub", "sub"])
        self.assertFalse(top.running)
        return bus

    def test_make_service_defaults(self):
        """makeService with no options builds logging, backbone, bus, store and zmq-app, no metrics."""
        options = tap.Options()
        options.parseOptions([])
        self.assertTree(tap.makeService(options), metrics=False)

    def test_make_service_config(self):
        """makeService applies the config file: snapshot_timeout reaches the bus."""
        path = write_config(self, "plugins: {apps: {zmq-app: {snapshot_timeout: 42}}}\n")
        options = tap.Options()
        options.parseOptions(["--config", path])
        bus = self.assertTree(tap.makeService(options), metrics=False)
        self.assertEqual(bus.snapshot_timeout, 42)

    def test_metrics_when_configured(self):
        """A metrics section adds a metrics service last."""
        config = Config(metrics=MetricsConfig(port=0), store=None)
        top = tap.bus_service(config, reactor)
        self.assertTree(top, metrics=True, store=False)

    def test_zmq_app_config(self):
        """The zmq-app service gets the zmq-app section."""
        config = Config(apps={"zmq-app": ZmqAppConfig(manage=0, pub=0, sub=0, host="127.0.0.1")}, store=None)
        top = tap.bus_service(config, reactor)
        self.assertIs(top.getServiceNamed("zmq-app").config, config.zmq_app)


class ProcessOutput(protocol.ProcessProtocol):
    """Collects a process's stdout and stderr, and fires ``ended`` with how it ended."""

    def __init__(self):
        self.output = []
        self.ended = Deferred()
        self.done = False

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.done = True
        self.ended.callback(reason.value)

    def text(self) -> str:
        return b"".join(self.output).decode("utf-8", "replace")

    async def kill(self) -> None:
        """SIGKILL the process if it still runs, and wait until it is gone."""
        if not self.done:
            self.transport.signalProcess("KILL")
            await self.ended

    async def finished(self):
        """How the process ended (a ProcessDone or ProcessTerminated), within PROCESS_DEADLINE."""
        self.ended.addTimeout(PROCESS_DEADLINE, reactor)
        return await self.ended


async def terminated_cleanly(testcase, process: ProcessOutput) -> None:
    """SIGTERM ``process`` (a running twistd): it shuts down cleanly."""
    process.transport.signalProcess("TERM")
    reason = await process.finished()
    output = process.text()
    # twistd shuts down, then (since Twisted 20.3) ends itself with the
    # signal it got, so that its parent sees why it stopped.
    if isinstance(reason, ProcessTerminated) and reason.signal is not None:
        testcase.assertEqual(reason.signal, signal.SIGTERM, output)
    else:
        testcase.assertIsInstance(reason, ProcessDone, output)
        testcase.assertEqual(reason.exitCode, 0, output)
    testcase.assertIn("Server Shut Down.", output)
    testcase.assertNotIn("Traceback", output)
    testcase.assertNotIn("Unhandled", output)


class TwistdTests(TestCase):
    """A real ``twistd -n zmq-app`` in a subprocess."""

    def spawn(self, *args) -> ProcessOutput:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
        )
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        process = ProcessOutput()
        process.pidfile = os.path.join(workdir, "twistd.pid")
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile", process.pidfile]
        reactor.spawnProcess(process, sys.executable, argv + list(args), env=env, path=workdir)
        self.addCleanup(process.kill)
        return process

    async def test_run_and_stop(self):
        """twistd serves a subscribe on the configured port and exits cleanly on SIGTERM."""
        manage, pub, sub = free_ports(3)
        path = write_config(
            self,
            f"""\
logging: {{console: true, console_verbosity: INFO}}
plugins:
  backbones:
    inmem: {{}}
  apps:
    zmq-app: {{host: 127.0.0.1, manage: {manage}, pub: {pub}, sub: {sub}}}
""",
        )
        process = self.spawn("zmq-app", "--config", path)
        await wait_for(
            lambda: f"manage endpoint listening on 127.0.0.1:{manage}" in process.text() or process.done,
            PROCESS_DEADLINE,
            "twistd to bind its manage port",
        )
        self.assertFalse(process.done, process.text())

        ctx = Context(self)
        req = ctx.socket(zmq.REQ, f"tcp://127.0.0.1:{manage}")
        reply = await request(req, {"action": "subscribe", "topic": "threatbus", "snapshot": 0})
        self.assertEqual(reply["status"], "success")
        self.assertEqual(reply["pub_endpoint"], f"127.0.0.1:{pub}")
        self.assertEqual(reply["sub_endpoint"], f"127.0.0.1:{sub}")

        await terminated_cleanly(self, process)

    async def test_bad_config(self):
        """twistd with a bad config exits non-zero, naming the key, without a traceback."""
        path = write_config(self, "plugins:\n  apps:\n    zeek:\n      port: 47761\n")
        process = self.spawn("zmq-app", "--config", path)
        reason = await process.finished()
        output = process.text()
        self.assertIsInstance(reason, ProcessTerminated, output)
        self.assertIsNone(reason.signal, output)
        self.assertNotEqual(reason.exitCode, 0, output)
        self.assertIn("plugins.apps.zeek: unknown app plugin", output)
        self.assertNotIn("Traceback", output)

    async def test_bad_port(self):
        """twistd with an out-of-range port exits non-zero, naming the key."""
        path = write_config(self, "plugins: {apps: {zmq-app: {manage: 70000}}}\n")
        process = self.spawn("zmq-app", "--config", path)
        reason = await process.finished()
        output = process.text()
        self.assertIsInstance(reason, ProcessTerminated, output)
        self.assertNotEqual(reason.exitCode, 0, output)
        self.assertIn("plugins.apps.zmq-app.manage", output)
        self.assertNotIn("Traceback", output)

    async def test_port_taken(self):
        """With the manage port in use, twistd exits 1 naming the endpoint."""
        ctx = Context(self)
        squatter = ctx.socket(zmq.REP)
        port = squatter.bind_to_random_port("tcp://127.0.0.1")
        path = write_config(self, f"plugins: {{apps: {{zmq-app: {{manage: {port}, pub: 0, sub: 0}}}}}}\n")
        process = self.spawn("zmq-app", "--config", path)
        reason = await process.finished()
        output = process.text()
        self.assertIsInstance(reason, ProcessTerminated, output)
        self.assertEqual(reason.exitCode, 1, output)
        self.assertIn(f"cannot bind its manage endpoint tcp://127.0.0.1:{port}", output)
        self.assertNotIn("Traceback", output)
        self.assertFalse(os.path.exists(process.pidfile), "twistd.pid is left behind")


    async def test_broker_missing_exits_1(self):
        """With the RabbitMQ broker missing at start, twistd logs why and exits 1, for a supervisor to restart it."""
        (port,) = free_ports(1)
        path = write_config(
            self,
            f"plugins: {{backbones: {{rabbitmq: {{host: 127.0.0.1, port: {port}}}}}, "
            f"apps: {{zmq-app: {{manage: 0, pub: 0, sub: 0}}}}}}\nstore: false\n",
        )
        process = self.spawn("zmq-app", "--config", path)
        reason = await process.finished()
        output = process.text()
        self.assertIsInstance(reason, ProcessTerminated, output)
        self.assertEqual(reason.exitCode, 1, output)
        self.assertIn(f"cannot reach RabbitMQ at 127.0.0.1:{port}", output)
        self.assertNotIn("Traceback", output)
        self.assertFalse(os.path.exists(process.pidfile), "twistd.pid is left behind")


class TwistdBusTests(TestCase):
    """What makeService's top service adds for twistd."""

    async def test_start_freezes_startup_objects(self):
        """Once started, what start-up made is out of the garbage collector's full passes."""
        import gc

        gc.unfreeze()
        self.addCleanup(gc.unfreeze)
        top = tap.bus_service(Config(apps={"zmq-app": ZmqAppConfig(manage=0, pub=0, sub=0)}, store=None), top=tap.TwistdBus())
        top.startService()
        self.addCleanup(top.stopService)
        self.assertGreater(gc.get_freeze_count(), 0)
