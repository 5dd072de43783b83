"""
The ``txthreatbus`` command line, run for real in subprocesses against a bus
running in the test's reactor (spawnProcess: the reactor never blocks).
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig

import txthreatbus
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from txthreatbus import codec
from txthreatbus.cli import LineReader, build_parser, describe, parse_command_line, parse_line
from txthreatbus.model import Intel
from tests.support import DEADLINE, free_ports, start_bus, wait_for, zmq_app_of
from tests.test_client import INTEL, SIGHTING

INTEL_LINE = json.dumps(codec.unstructure(INTEL))
INDICATOR_LINE = json.dumps(
    {
        "type": "indicator",
        "spec_version": "2.1",
        "id": "indicator--6911104f-c504-4086-a15b-05e28cf73435",
        "created": "2022-05-16T10:00:00.000Z",
        "modified": "2022-05-16T10:00:00.000Z",
        "pattern": "[domain-name:value = 'evil.example.com']",
        "pattern_type": "stix",
        "valid_from": "2022-05-16T10:00:00Z",
    }
)
STIX_SIGHTING = {
    "type": "sighting",
    "spec_version": "2.1",
    "id": "sighting--4a9e2a33-7bd4-4a16-8f5e-5b2c3d1a0f77",
    "created": "2022-05-16T10:05:00.000Z",
    "modified": "2022-05-16T10:05:00.000Z",
    "sighting_of_ref": "indicator--6911104f-c504-4086-a15b-05e28cf73435",
    "last_seen": "2022-05-16T10:04:59Z",
    "x_threatbus_indicator_value": "evil.example.com",
}
SIGHTING_LINE = json.dumps(codec.unstructure(SIGHTING))


def command() -> list:
    """
    The installed ``txthreatbus`` console script of this Python, if there is
    one, else ``python -m txthreatbus.cli``.
    """
    script = os.path.join(sysconfig.get_path("scripts"), "txthreatbus")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "txthreatbus.cli"]


def environment() -> dict:
    """Our environment, with the txthreatbus under test first on the path."""
    env = dict(os.environ)
    source = os.path.dirname(os.path.dirname(os.path.abspath(txthreatbus.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([source] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class Process(ProcessProtocol):
    """A running ``txthreatbus`` command: its output so far, and its end."""

    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = Deferred()
        self.code = None

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        # exitCode is None when a signal ended the process
        self.code = reason.value.exitCode
        self.ended.callback(self.code)

    def kill(self):
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass


def spawn(testcase, *args: str, stdin: bytes = None) -> Process:
    """Start ``txthreatbus ARGS``; it is killed at the end of the test if still running."""
    process = Process()
    argv = command() + list(args)
    reactor.spawnProcess(process, argv[0], argv, env=environment())

    def cleanup():
        if process.code is None:
            process.kill()
        return process.ended

    testcase.addCleanup(cleanup)
    if stdin is not None:
        process.transport.write(stdin)
    process.transport.closeStdin()
    return process


async def run(testcase, *args: str, stdin: bytes = None, timeout: float = DEADLINE):
    """Run ``txthreatbus ARGS`` to its end: (exit code, stdout, stderr)."""
    process = spawn(testcase, *args, stdin=stdin)
    await wait_for(
        lambda: process.code is not None, timeout, f"txthreatbus {' '.join(args)} to end"
    )
    return process.code, process.out.decode(), process.err.decode()


def manage_endpoint(top) -> str:
    return f"127.0.0.1:{zmq_app_of(top).ports['manage']}"


class CommandTests(TestCase):
    """The commands against a running bus (or none)."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    async def subscriber(self, top, *options, topic="threatbus"):
        """A running ``txthreatbus subscribe``, once the bus sees its SUB socket."""
        process = spawn(
            self, "subscribe", topic, "--endpoint", manage_endpoint(top), *options
        )
        subscriptions = zmq_app_of(top).subscriptions
        await wait_for(
            lambda: process.code is not None or any(s.ready for s in subscriptions),
            what="the subscriber to connect",
        )
        self.assertIsNone(process.code, process.err)
        return process

    async def test_subscribe_prints_what_publish_sent(self):
        """subscribe --json prints what publish sent; Ctrl-C unsubscribes and exits 0."""
        top = start_bus(self)
        subscriber = await self.subscriber(top, "--json")
        path = self.write(INTEL_LINE + "\n")
        code, out, err = await run(
            self, "publish", "intel", path, "--endpoint", manage_endpoint(top)
        )
        self.assertEqual((code, out), (0, "published 1, skipped 0\n"), err)
        self.assertNotIn("Subscribed to", err)  # publish's subscription is its own business
        await wait_for(lambda: subscriber.out.endswith(b"\n"), what="the subscriber to print")
        (line,) = subscriber.out.decode().splitlines()
        printed = json.loads(line)
        self.assertEqual(printed.pop("type"), "intel")
        self.assertEqual(codec.structure(Intel, printed), INTEL)
        subscriber.transport.signalProcess("INT")
        self.assertEqual(await subscriber.ended, 0, subscriber.err)
        self.assertEqual(len(zmq_app_of(top).subscriptions), 0)
        self.assertIn(b"Unsubscribed", subscriber.err)

    async def test_stix_publish_and_subscribe(self):
        """publish indicator sends STIX lines; subscribe stix2 --json prints them as sent, and Intel translated."""
        top = start_bus(self)
        subscriber = await self.subscriber(top, "--json", topic="stix2")
        path = self.write(INDICATOR_LINE + "\n" + json.dumps({"type": "malware"}) + "\n")
        code, out, err = await run(self, "publish", "indicator", path, "--endpoint", manage_endpoint(top))
        self.assertEqual((code, out), (0, "published 1, skipped 1\n"), err)
        self.assertIn("line 2", err)
        code, out, err = await run(self, "publish", "intel", self.write(INTEL_LINE), "--endpoint", manage_endpoint(top))
        self.assertEqual(code, 0, err)
        await wait_for(lambda: subscriber.out.count(b"\n") == 2, what="the subscriber to print")
        first, second = subscriber.out.decode().splitlines()
        self.assertEqual(first, INDICATOR_LINE)
        self.assertEqual(json.loads(second)["x_threatbus_intel_id"], INTEL.id)

    async def test_stix_sighting_human_readable(self):
        """subscribe stix2/sighting prints a readable line for a STIX Sighting that publish stix-sighting sent."""
        top = start_bus(self)
        subscriber = await self.subscriber(top, topic="stix2/sighting")
        line = json.dumps(STIX_SIGHTING)
        code, out, err = await run(self, "publish", "stix-sighting", "-", "--endpoint", manage_endpoint(top), stdin=line.encode())
        self.assertEqual(code, 0, err)
        await wait_for(lambda: subscriber.out.endswith(b"\n"), what="the subscriber to print")
        self.assertEqual(
            subscriber.out.decode(),
            "2022-05-16T10:04:59Z  sighting  evil.example.com  (of indicator--6911104f-c504-4086-a15b-05e28cf73435)\n",
        )

    async def test_subscribe_human_readable(self):
        """subscribe prints one readable line per message; publish reads stdin with '-'."""
        top = start_bus(self)
        subscriber = await self.subscriber(top)
        code, out, err = await run(
            self,
            "publish",
            "sighting",
            "-",
            "--endpoint",
            manage_endpoint(top),
            stdin=SIGHTING_LINE.encode() + b"\n",
        )
        self.assertEqual(code, 0, err)
        await wait_for(lambda: subscriber.out.endswith(b"\n"), what="the subscriber to print")
        self.assertEqual(subscriber.out.decode(), describe(SIGHTING) + "\n")
        self.assertIn("sighting  example.com  (intel intel-1)", describe(SIGHTING))

    async def test_subscribe_after_restart(self):
        """subscribe subscribes again after the bus restarts and prints what comes then."""
        manage, pub, sub = free_ports(3)
        top = start_bus(self, manage=manage, pub=pub, sub=sub)
        subscriber = await self.subscriber(top, "--json", "--heartbeat", "0.1", "--timeout", "0.5")
        await top.stopService()
        top.startService()
        await self.subscriber_back(top, subscriber)
        code, out, err = await run(
            self, "publish", "intel", self.write(INTEL_LINE), "--endpoint", manage_endpoint(top)
        )
        self.assertEqual(code, 0, err)
        await wait_for(lambda: subscriber.out.endswith(b"\n"), what="the subscriber to print")
        self.assertIn(b"again", subscriber.err)

    async def subscriber_back(self, top, subscriber):
        subscriptions = zmq_app_of(top).subscriptions
        await wait_for(
            lambda: any(s.ready for s in subscriptions), what="the subscriber to come back"
        )

    async def test_subscribe_unreachable(self):
        """subscribe exits 1 with a clear message when nothing listens."""
        (port,) = free_ports(1)
        code, out, err = await run(
            self, "subscribe", "threatbus", "--endpoint", f"127.0.0.1:{port}", "--timeout", "0.3"
        )
        self.assertEqual(code, 1)
        self.assertIn(f"no answer from Threat Bus at 127.0.0.1:{port} within 0.3 s", err)
        self.assertNotIn("Traceback", err)

    async def interrupt_publish(self, signal_name: str, stdin_tty: bool = False):
        """A publish reading an open stdin, sent ``signal_name`` after two lines: (code, stderr)."""
        top = start_bus(self)
        metrics = top.getServiceNamed("bus").metrics
        process = Process()
        argv = command() + ["publish", "intel", "-", "--endpoint", manage_endpoint(top)]
        if stdin_tty:
            import pty

            leader, follower = pty.openpty()
            self.addCleanup(os.close, leader)
            reactor.spawnProcess(process, argv[0], argv, env=environment(), childFDs={0: follower, 1: "r", 2: "r"})
            os.close(follower)
            write = lambda data: os.write(leader, data)  # noqa: E731
        else:
            reactor.spawnProcess(process, argv[0], argv, env=environment())
            write = process.transport.write
        self.addCleanup(lambda: process.code is None and process.kill())
        for i in range(2):
            write((json.dumps({**json.loads(INTEL_LINE), "id": f"i{i}"}) + "\n").encode())
        await wait_for(lambda: metrics.received["intel"].value == 2 or process.code is not None, what="2 intel")
        process.transport.signalProcess(signal_name)
        await wait_for(lambda: process.code is not None, what="the publish to end")
        return process.code, process.err.decode()

    async def test_interrupt_publish_from_pipe(self):
        """Ctrl-C on publish from a pipe says how far it got and exits 130, with no traceback or fatal error."""
        for signal_name in ("INT", "TERM"):
            code, err = await self.interrupt_publish(signal_name)
            self.assertEqual(code, 130, err)
            self.assertIn("interrupted: published 2, skipped 0", err)
            self.assertNotIn("Traceback", err)
            self.assertNotIn("Fatal Python error", err)

    async def test_interrupt_publish_from_terminal(self):
        """The same with stdin a terminal (a pty)."""
        code, err = await self.interrupt_publish("INT", stdin_tty=True)
        self.assertEqual(code, 130, err)
        self.assertIn("interrupted: published 2, skipped 0", err)
        self.assertNotIn("Fatal Python error", err)

    async def test_unresolvable_host(self):
        """A host name that does not resolve is said so, not 'no answer'."""
        for command in (["ping"], ["subscribe", "threatbus"], ["publish", "intel", "-"]):
            code, out, err = await run(self, *command, "--endpoint", "no-such-host.invalid:13370", stdin=b"")
            self.assertEqual(code, 1, err)
            self.assertIn(
                f"txthreatbus {command[0]}: cannot resolve 'no-such-host.invalid' (the host of "
                "no-such-host.invalid:13370)",
                err,
            )
            self.assertNotIn("no answer", err)

    async def test_subscribe_unknown_topic(self):
        """A subscribe the bus refuses for its topic names the topics there are."""
        top = start_bus(self)
        code, out, err = await run(self, "subscribe", "intel", "--endpoint", manage_endpoint(top))
        self.assertEqual(code, 1)
        self.assertIn(
            "cannot subscribe to 'intel' at " + manage_endpoint(top) + ": Threat Bus answered 'error' "
            "to subscribe (the topics are threatbus/intel, threatbus/sighting, threatbus, stix2/indicator, stix2/sighting, stix2)",
            err,
        )

    async def test_publish_reports_bad_lines(self):
        """publish reports each invalid line by number on stderr, skips it, and sums up."""
        top = start_bus(self)
        path = self.write(
            "\n".join(
                [INTEL_LINE, "{not json", "", json.dumps({"id": 1}), SIGHTING_LINE, INTEL_LINE]
            )
        )
        code, out, err = await run(
            self, "publish", "intel", path, "--endpoint", manage_endpoint(top)
        )
        self.assertEqual((code, out), (0, "published 2, skipped 3\n"), err)
        self.assertIn(f"{path} line 2: invalid JSON", err)
        self.assertIn(f"{path} line 4: Intel", err)
        self.assertIn(f"{path} line 5: Intel: Object missing required field", err)
        self.assertNotIn("line 3", err)
        metrics = top.getServiceNamed("bus").metrics
        await wait_for(
            lambda: metrics.registry.get_sample_value(
                "txthreatbus_messages_received_total", {"type": "intel"}
            )
            == 2,
            what="the bus to receive both",
        )

    async def test_publish_unreachable(self):
        """publish exits 1 with a clear message when the bus cannot be reached."""
        (port,) = free_ports(1)
        path = self.write(INTEL_LINE + "\n")
        code, out, err = await run(
            self, "publish", "intel", path, "--endpoint", f"127.0.0.1:{port}", "--timeout", "0.3"
        )
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no answer from Threat Bus", err)

    async def test_publish_missing_file(self):
        """publish exits 1 when its file cannot be read."""
        code, out, err = await run(self, "publish", "intel", self.mktemp())
        self.assertEqual(code, 1)
        self.assertIn("cannot read", err)

    async def test_ping(self):
        """ping reports the round trip and the bus's endpoints."""
        top = start_bus(self)
        code, out, err = await run(self, "ping", "--endpoint", manage_endpoint(top))
        self.assertEqual(code, 0, err)
        self.assertRegex(
            out, r"is up: subscribe [\d.]+ ms, heartbeat [\d.]+ ms, unsubscribe [\d.]+ ms"
        )
        self.assertIn(f"sub endpoint 127.0.0.1:{zmq_app_of(top).ports['sub']}", out)
        self.assertEqual(len(zmq_app_of(top).subscriptions), 0)

    async def test_ping_nothing_listens(self):
        """ping fails cleanly (exit 1, one line, no traceback) when nothing listens."""
        (port,) = free_ports(1)
        code, out, err = await run(
            self, "ping", "--endpoint", f"127.0.0.1:{port}", "--timeout", "0.3"
        )
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            err,
            f"txthreatbus ping: no answer from Threat Bus at 127.0.0.1:{port} within 0.3 s (is it running?)\n",
        )

    async def test_check_config(self):
        """check-config says 'config OK' with a summary, or exits 1 with the ConfigError line."""
        good = self.write(
            "plugins:\n  apps:\n    zmq-app: {manage: 14000}\nmetrics: {port: 9200}\n"
        )
        code, out, err = await run(self, "check-config", good)
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(f"config OK: {good}\n"))
        self.assertIn("manage 14000, pub 13371, sub 13372", out)
        self.assertIn("http://127.0.0.1:9200/metrics", out)
        self.assertIn("  store:    sqlite:///txthreatbus.sqlite, keeping everything\n", out)
        both = self.write("plugins:\n  apps:\n    zmq: {manage: 14000, pub: 14001, sub: 14002}\n    zmq-app: {}\n")
        code, out, err = await run(self, "check-config", both)
        self.assertEqual(code, 0, err)
        self.assertIn("  zmq:      127.0.0.1: manage 14000, pub 14001, sub 14002\n", out)
        self.assertIn("  zmq-app:  127.0.0.1: manage 13370, pub 13371, sub 13372\n", out)
        bad = self.write("plugins:\n  apps:\n    zmq-app: {manage: 70000}\n")
        code, out, err = await run(self, "check-config", bad)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            err,
            f"txthreatbus check-config: {bad}: plugins.apps.zmq-app.manage: must be a port number "
            "from 1 to 65535 (0: any free port), not 70000\n",
        )

    async def test_help(self):
        """--help works for the command and every subcommand, and names --endpoint."""
        for args in ([], ["subscribe"], ["publish"], ["ping"]):
            code, out, err = await run(self, *args, "--help")
            self.assertEqual(code, 0, err)
            self.assertIn("usage: txthreatbus", out)
            if args:
                self.assertIn("--endpoint HOST:PORT", out)

    async def test_usage_errors(self):
        """A bad endpoint or a missing argument is a usage error (exit 2)."""
        for args in (["ping", "--endpoint", "nohost"], ["publish", "ioc"], ["subscribe"]):
            code, out, err = await run(self, *args)
            self.assertEqual(code, 2, args)
            self.assertIn("usage:", err)


class HelperTests(SynchronousTestCase):
    """The CLI's pure parts."""

    def test_parse_line_type(self):
        """A line's optional "type" key must match the kind, and is not part of the message."""
        self.assertEqual(
            parse_line("intel", json.dumps({"type": "intel", **json.loads(INTEL_LINE)}).encode()),
            INTEL,
        )
        self.assertEqual(parse_line("sighting", SIGHTING_LINE.encode()), SIGHTING)
        with self.assertRaises(codec.DecodeError) as e:
            parse_line(
                "intel", json.dumps({"type": "sighting", **json.loads(SIGHTING_LINE)}).encode()
            )
        self.assertIn("type 'sighting', not intel", str(e.exception))

    def test_line_reader(self):
        """LineReader splits chunks into lines across chunk borders, and keeps a last line without newline."""

        class Chunks:
            def __init__(self, chunks):
                self.chunks = list(chunks)

            def read(self):
                d = Deferred()
                d.callback(self.chunks.pop(0) if self.chunks else b"")
                return d

        reader = LineReader(Chunks([b"a\nb", b"c", b"\nd"]))
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(reader.lines())), [b"a"])
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(reader.lines())), [b"bc"])
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(reader.lines())), [b"d"])
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(reader.lines())))
        self.assertEqual(reader.position, 6)

    def test_options_anywhere(self):
        """Options may stand between a command's arguments; errors and --help still work."""
        parser = build_parser()
        args = parse_command_line(parser, ["publish", "intel", "--no-progress", "big.jsonl"])
        self.assertEqual((args.command, args.kind, args.file, args.no_progress), ("publish", "intel", "big.jsonl", True))
        args = parse_command_line(parser, ["subscribe", "--json", "threatbus", "--snapshot", "3"])
        self.assertEqual((args.topic, args.json, args.snapshot), ("threatbus", True, 3))
        self.assertEqual(parse_command_line(parser, ["ping"]).run.__name__, "ping_command")
        for argv in ([], ["dance"], ["publish", "intel", "a", "b"], ["ping", "--nope"]):
            self.assertRaises(SystemExit, parse_command_line, parser, argv)

    def test_parser_defaults(self):
        """Every network command defaults to 127.0.0.1:13370 and a 3 s timeout."""
        parser = build_parser()
        for argv in (["ping"], ["subscribe", "threatbus"], ["publish", "intel"]):
            args = parser.parse_args(argv)
            self.assertEqual((args.endpoint, args.timeout), ("127.0.0.1:13370", 3.0))
        self.assertEqual(
            parser.parse_args(["subscribe", "threatbus/intel", "--snapshot", "30"]).snapshot, 30
        )
