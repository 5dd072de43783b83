"""
``txthreatbus``: the command line for the people who run Threat Bus.

    txthreatbus subscribe TOPIC [--snapshot DAYS] [--json]
    txthreatbus publish intel|sighting [FILE|-]
    txthreatbus ping
    txthreatbus check-config FILE

The network commands take ``--endpoint HOST:PORT`` (the zmq-app management
endpoint, default 127.0.0.1:13370) and ``--timeout SECONDS``. Each runs the
reactor with ``twisted.internet.task.react`` and talks to the bus through
``txthreatbus.client``. Data goes to stdout; messages for people (logs,
errors, the progress bar) go to stderr.

Exit codes: 0 success; 1 the bus cannot be reached (or stopped taking
messages), a bad config, an unreadable file; 2 wrong usage; 130 a publish
cut short by Ctrl-C or SIGTERM (it says how far it got).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import stat
import sys
import time
from typing import List, Optional

from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeoutError, fail, succeed
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    PredicateResult,
    eventAsText,
    globalLogBeginner,
)

from txthreatbus import __version__, codec, config as configuration, logs, stix
from txthreatbus.apps.zmq_app.curve import load_keys
from txthreatbus.client import (
    DEFAULT_ENDPOINT,
    Client,
    CurveKeyError,
    CurveKeys,
    ClientError,
    RequestFailed,
    RequestTimeout,
    parse_endpoint,
    parse_subscribe_reply,
)
from txthreatbus.model import Intel, MessageType, Sighting, SnapshotRequest

# named: run as ``python -m txthreatbus.cli`` this module is ``__main__``
log = Logger(namespace="txthreatbus.cli", observer=logs.publisher)

#: What ``publish`` reads, by its first argument.
KINDS = {"intel": Intel, "sighting": Sighting, "indicator": stix.Indicator, "stix-sighting": stix.Sighting}
#: What ``publish`` subscribes to for each kind: never what it publishes,
#: which the bus would send back, in either generation.
_QUIET_TOPICS = {
    "intel": "threatbus/sighting",
    "sighting": "threatbus/intel",
    "indicator": "stix2/sighting",
    "stix-sighting": "stix2/indicator",
}

#: Input files at least this large get a progress bar (on a terminal).
PROGRESS_MIN_BYTES = 1 << 20

#: Seconds ``publish`` waits for the bus to take what it sent before giving up.
STALL_TIMEOUT = 30.0

#: Seconds the sockets of ``publish`` may spend, at exit, sending what they hold.
PUBLISH_LINGER = 10.0


# --- arguments


def _endpoint(text: str) -> str:
    try:
        return parse_endpoint(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def _days(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days >= 0")
    return int(text)


def _bytes(text: str) -> int:
    if not text.isdigit() or not text.isascii() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes > 0")
    return int(text)


def _common(hide_endpoint: bool = False) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint",
        type=_endpoint,
        default=DEFAULT_ENDPOINT,
        metavar="HOST:PORT",
        help=(
            argparse.SUPPRESS
            if hide_endpoint
            else "the zmq-app management endpoint of Threat Bus (default: %(default)s)"
        ),
    )
    if not hide_endpoint:
        common.add_argument(
            "--timeout",
            type=_seconds,
            default=3.0,
            metavar="SECONDS",
            help="how long to wait for the bus to answer (default: %(default)s)",
        )
        common.add_argument(
            "--curve-server-key",
            metavar="FILE",
            help="for a bus with CurveZMQ on: the bus's public key (its .key certificate file)",
        )
        common.add_argument(
            "--curve-secret-key",
            metavar="FILE",
            help="for a bus with CurveZMQ on: this client's secret key (its .key_secret file)",
        )
    verbosity = common.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings and errors only"
    )
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    return common


_EXAMPLES = {
    "subscribe": """examples:
  txthreatbus subscribe threatbus/intel
  txthreatbus subscribe threatbus --snapshot 30 --json > everything.jsonl
  txthreatbus subscribe threatbus/sighting --endpoint bus.example.org:13370
  txthreatbus subscribe stix2/indicator --json

Prints each message as it arrives until Ctrl-C, which unsubscribes. The
topic tells the generation: threatbus/... gives Threat Bus 2020 Intel and
Sightings, stix2/... STIX 2.1 Indicators and Sightings (the bus translates
between them). With --json each line is the message's JSON (as in the
Threat Bus protocol); a 2020 message gets an extra "type" key: "intel",
"sighting" or "snapshotrequest" (STIX objects have their own). Heartbeats
every 5 s; when the bus restarts, subscribes again by itself.""",
    "publish": """examples:
  txthreatbus publish intel indicators.jsonl
  zcat sightings.jsonl.gz | txthreatbus publish sighting -
  txthreatbus subscribe threatbus/intel --json | txthreatbus publish intel --endpoint other-bus:13370
  txthreatbus publish indicator stix-indicators.jsonl

Each line is one JSON object in the shape of the Threat Bus protocol: for
intel and sighting as Threat Bus 2020 has them, e.g.
  {"ts": "2020-11-26 14:46:52", "id": "42", "data": {"indicator": ["example.com"], "intel_type": 11}, "operation": "ADD"}
  {"ts": "2020-11-26 14:47:00", "intel": "42", "context": {"source": "zeek"}, "ioc": ["example.com"]}
for indicator and stix-sighting one STIX 2.1 object, e.g.
  {"type": "indicator", "spec_version": "2.1", "id": "indicator--6911104f-c504-4086-a15b-05e28cf73435", "created": "2022-05-16T10:00:00.000Z", "modified": "2022-05-16T10:00:00.000Z", "pattern": "[domain-name:value = 'example.com']", "pattern_type": "stix", "valid_from": "2022-05-16T10:00:00Z"}
Blank lines are skipped. Invalid lines are reported with their number and
skipped; the exit code stays 0. A "type" key, as `subscribe --json` writes
it, must match the kind. Exits 1 when the bus cannot be reached.""",
    "ping": """examples:
  txthreatbus ping
  txthreatbus ping --endpoint bus.example.org:13370 --timeout 1

Subscribes, heartbeats and unsubscribes, and prints how long each took.
Exits 1 when the bus does not answer.""",
    "check-config": """examples:
  txthreatbus check-config config.yaml && twistd -n zmq-app --config config.yaml""",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``txthreatbus`` command."""
    parser = argparse.ArgumentParser(
        prog="txthreatbus",
        description="Talk to a running Threat Bus (txthreatbus or Threat Bus 2020.11.26 and later).",
        epilog="Run 'txthreatbus COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, help, run, hide_endpoint=False):
        sub = commands.add_parser(
            name,
            parents=[_common(hide_endpoint)],
            help=help,
            description=help,
            epilog=_EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=run)
        return sub

    subscribe = command(
        "subscribe", "print the messages of a topic as they arrive", subscribe_command
    )
    subscribe.add_argument(
        "topic",
        metavar="TOPIC",
        help="threatbus/intel, threatbus/sighting, threatbus (both); or stix2/indicator, "
        "stix2/sighting, stix2 (both)",
    )
    subscribe.add_argument(
        "--snapshot",
        type=_days,
        default=0,
        metavar="DAYS",
        help="first ask the other apps for their items of the last DAYS days",
    )
    subscribe.add_argument("--json", action="store_true", help="print JSON lines")
    subscribe.add_argument(
        "--heartbeat",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="seconds between heartbeats, which notice a restarted bus (default: %(default)s)",
    )

    publish = command(
        "publish", "publish Intel, Sightings or STIX Indicators and Sightings from JSON lines", publish_command
    )
    publish.add_argument("kind", choices=sorted(KINDS), help="what the lines are")
    publish.add_argument(
        "file",
        nargs="?",
        default="-",
        metavar="FILE",
        help="JSON lines to publish (default: -, stdin)",
    )
    publish.add_argument(
        "--max-size",
        type=_bytes,
        default=1 << 20,
        metavar="BYTES",
        help="skip messages larger than this: the bus disconnects apps that send more than "
        "its max_message_size (default: %(default)s)",
    )
    publish.add_argument("--no-progress", action="store_true", help="no progress bar")

    command("ping", "check that the bus answers, and how fast", ping_command)

    check = command("check-config", "validate a Threat Bus config file", check_config_command, True)
    check.add_argument("config_file", metavar="FILE", help="a Threat Bus config.yaml")
    return parser


#: The exit status of a command that Ctrl-C or SIGTERM cut short (128 + SIGINT).
EXIT_INTERRUPTED = 130

#: The topics a subscription may name.
TOPICS = ("threatbus/intel", "threatbus/sighting", "threatbus", "stix2/indicator", "stix2/sighting", "stix2")


def parse_command_line(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """
    ``argv`` parsed with options anywhere after the command, even between
    its arguments (``publish intel --no-progress FILE``), which argparse's
    subcommands alone do not allow.
    """
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not argv or argv[0] not in commands.choices:
        return parser.parse_args(argv)  # --help, --version, or an error naming the commands
    args = commands.choices[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


# --- logging for people


class _LevelPredicate:
    """txthreatbus's own events from ``level`` up, everyone else's from warn up."""

    def __init__(self, level: LogLevel):
        self.level = level

    def __call__(self, event) -> PredicateResult:
        level = event.get("log_level", LogLevel.info)
        ours = str(event.get("log_namespace", "")).startswith("txthreatbus")
        return (
            PredicateResult.yes
            if level >= (self.level if ours else LogLevel.warn)
            else PredicateResult.no
        )


def _format(event) -> Optional[str]:
    text = eventAsText(event, includeTraceback=True, includeTimestamp=False, includeSystem=False)
    level = event.get("log_level")
    if level in (LogLevel.error, LogLevel.critical):
        text = "error: " + text
    elif level is LogLevel.warn:
        text = "warning: " + text
    return f"txthreatbus: {text}\n"


def _log_to_stderr(level: LogLevel) -> None:
    observer = FilteringLogObserver(FileLogObserver(sys.stderr, _format), [_LevelPredicate(level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _curve_keys(parser, args) -> Optional[CurveKeys]:
    """The CurveZMQ keys the options name, or None; a bad key file ends the command."""
    if args.curve_server_key is None and args.curve_secret_key is None:
        return None
    if args.curve_server_key is None or args.curve_secret_key is None:
        parser.error("--curve-server-key and --curve-secret-key go together")
    try:
        return CurveKeys.from_files(args.curve_server_key, args.curve_secret_key)
    except CurveKeyError as e:
        _error(args.command, f"cannot use a CurveZMQ key: {e}")
        raise SystemExit(1) from None


def _error(command: str, text: str) -> None:
    sys.stderr.write(f"txthreatbus {command}: {text}\n")
    sys.stderr.flush()


# --- subscribe


def describe(message) -> str:
    """One line for people about ``message``."""
    if isinstance(message, Intel):
        data = message.data
        extra = f"  {json.dumps(data.extra, sort_keys=True)}" if data.extra else ""
        return (
            f"{message.ts}  intel     {message.operation.value:<6} {data.intel_type.name} "
            f"{' '.join(data.indicator)}  (id {message.id}){extra}"
        )
    if isinstance(message, Sighting):
        ioc = " ".join(message.ioc) if message.ioc else "-"
        context = f"  {json.dumps(message.context, sort_keys=True)}" if message.context else ""
        return f"{message.ts}  sighting  {ioc}  (intel {message.intel}){context}"
    if isinstance(message, stix.Indicator):
        remove = "  REMOVE" if message.removes else ""
        when = message.created or message.valid_from or "-"
        return f"{when}  indicator  {message.pattern_type}: {message.pattern}  ({message.id}){remove}"
    if isinstance(message, stix.Sighting):
        when = message.last_seen or message.created or "-"
        value = message.properties.get("x_threatbus_indicator_value", "-")
        return f"{when}  sighting  {value}  (of {message.sighting_of_ref})"
    if isinstance(message, SnapshotRequest):
        seconds = int(message.snapshot.total_seconds())
        span = f"{seconds // 86400} days" if seconds % 86400 == 0 else f"{seconds} s"
        return (
            f"snapshot request: {MessageType(message.snapshot_type).name} items of the last {span}"
            f"  (snapshot {message.snapshot_id})"
        )
    return repr(message)


def as_json(message) -> str:
    """``message`` as one JSON line: its protocol JSON, with its type (a STIX object has its own)."""
    if isinstance(message, stix.StixObject):
        return codec.encode(message).decode("utf-8")
    return json.dumps({"type": message.kind, **codec.unstructure(message)})


async def subscribe_command(reactor, args) -> int:
    client = Client(
        args.endpoint, request_timeout=args.timeout, heartbeat_interval=args.heartbeat, curve=args.curve
    )
    client.startService()
    # Ctrl-C (SIGINT) or SIGTERM stop the reactor; before it stops, unsubscribe
    reactor.addSystemEventTrigger("before", "shutdown", client.stopService)
    render = as_json if args.json else describe

    def show(message):
        try:
            sys.stdout.write(render(message) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # whoever read our output is gone (| head): stop as on Ctrl-C
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            if reactor.running:
                reactor.stop()

    try:
        await client.subscribe(args.topic, args.snapshot, show)
    except RequestTimeout:
        _error("subscribe", _unreachable(args))
        return 1
    except ClientError as e:
        hint = ""
        if isinstance(e, RequestFailed) and args.topic not in TOPICS:
            hint = f" (the topics are {', '.join(TOPICS)})"
        _error("subscribe", f"cannot subscribe to {args.topic!r} at {args.endpoint}: {e}{hint}")
        return 1
    log.info(
        "Receiving {topic} from {endpoint}; Ctrl-C to stop",
        topic=args.topic,
        endpoint=args.endpoint,
    )
    await Deferred()  # until the reactor stops
    return 0


def _unreachable(args) -> str:
    return (
        f"no answer from Threat Bus at {args.endpoint} within {args.timeout:g} s (is it running?)"
    )


# --- publish


class ChunkReader:
    """
    Reads a binary stream a chunk each time it is asked, without a thread:
    a regular file directly (reading it never waits), anything else (a pipe,
    a terminal) in non-blocking mode when the reactor says its descriptor is
    readable. Neither the reactor nor the interpreter's exit ever waits for
    a read; ``close`` puts the descriptor back as it was.
    """

    def __init__(self, stream, reactor, size: int = 1 << 16):
        self._fd = stream.fileno()
        self._reactor = reactor
        self._size = size
        self._waiting: Optional[Deferred] = None
        self._blocking = os.get_blocking(self._fd)
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        if not self._regular:
            os.set_blocking(self._fd, False)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "ChunkReader"

    def read(self) -> Deferred:
        """A Deferred of the next chunk of bytes; ``b""`` at the end."""
        try:
            return succeed(os.read(self._fd, self._size))
        except BlockingIOError:
            self._waiting = Deferred()
            self._reactor.addReader(self)
            return self._waiting
        except OSError as e:
            return fail(e)

    def doRead(self) -> None:
        """The reactor's call: the descriptor is readable."""
        self._reactor.removeReader(self)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self.read().chainDeferred(waiting)

    def connectionLost(self, reason) -> None:
        self.doRead()

    def close(self) -> None:
        if self._waiting is not None:
            self._reactor.removeReader(self)
            self._waiting = None
        if not self._regular:
            os.set_blocking(self._fd, self._blocking)


class LineReader:
    """The lines of a ``ChunkReader``, a batch at a time."""

    def __init__(self, chunks: ChunkReader):
        self._chunks = chunks
        self._tail = b""
        self._ended = False
        self.position = 0

    async def lines(self) -> Optional[List[bytes]]:
        """The next complete lines; None at the end."""
        while not self._ended:
            data = await self._chunks.read()
            if not data:
                self._ended = True
                tail, self._tail = self._tail, b""
                return [tail] if tail else None
            self.position += len(data)
            lines = (self._tail + data).split(b"\n")
            self._tail = lines.pop()
            if lines:
                return lines
        return None


class Progress:
    """A one-line progress bar on a terminal, redrawn at most every 0.1 s."""

    WIDTH = 30

    def __init__(self, stream, total: int, now=time.monotonic):
        self._stream = stream
        self._total = total
        self._now = now
        self._last = 0.0

    def update(self, done: int, published: int, skipped: int, force: bool = False) -> None:
        if not force and self._now() - self._last < 0.1:
            return
        self._last = self._now()
        fraction = min(1.0, done / self._total) if self._total else 1.0
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self._stream.write(f"\r[{bar}] {fraction:4.0%}  {published} published, {skipped} skipped")
        self._stream.flush()

    def clear(self) -> None:
        self._stream.write("\r\x1b[K")
        self._stream.flush()


class _Silent:
    def update(self, *args, **kwargs):
        pass

    def clear(self):
        pass


def parse_line(kind: str, line: bytes):
    """The message of ``kind`` on one JSON line; raises ``codec.DecodeError``."""
    value = codec.loads(line)
    cls = KINDS[kind]
    if cls in stix.StixObject:
        message = codec.structure_stix(value)
        if type(message) is not cls:
            raise codec.DecodeError(f"a STIX {message.stix_type}, not {cls.stix_type}")
        return message
    if isinstance(value, dict) and "type" in value:
        value = dict(value)
        said = value.pop("type")
        if said != kind:
            raise codec.DecodeError(f"a line of type {said!r}, not {kind}")
    return codec.structure(KINDS[kind], value)


def _open_input(path: str):
    if path == "-":
        return sys.stdin.buffer, "stdin"
    return open(path, "rb"), path


async def publish_command(reactor, args) -> int:
    try:
        stream, name = _open_input(args.file)
    except OSError as e:
        _error("publish", f"cannot read {args.file}: {e.strerror}")
        return 1
    topic = KINDS[args.kind].topic
    client = Client(args.endpoint, request_timeout=args.timeout, linger=PUBLISH_LINGER, curve=args.curve)
    client.startService()
    reactor.addSystemEventTrigger("before", "shutdown", client.stopService)
    try:
        # Publishing needs the bus's SUB endpoint, which a subscription
        # names. Subscribe to the other kind, not to what we publish: the
        # bus would send all of it back to us.
        sub = await client.subscribe(_QUIET_TOPICS[args.kind])
        # ZeroMQ's slow joiner: a PUB socket drops what it sends until the
        # bus's SUB socket has subscribed to it. Our PUB socket is an XPUB
        # and sees that subscription arrive: from then on nothing is lost.
        await sub.connected(topic).addTimeout(args.timeout, reactor)
    except RequestTimeout:
        _error("publish", _unreachable(args))
        return 1
    except DeferredTimeoutError:
        _error(
            "publish",
            f"Threat Bus at {args.endpoint} answered, but its sub endpoint {sub.endpoints.sub} "
            f"did not take a connection within {args.timeout:g} s",
        )
        return 1
    except ClientError as e:
        _error("publish", f"cannot publish to Threat Bus at {args.endpoint}: {e}")
        return 1

    progress = _Silent()
    size = _regular_file_size(stream)
    if not (args.quiet or args.no_progress) and sys.stderr.isatty() and size >= PROGRESS_MIN_BYTES:
        progress = Progress(sys.stderr, size)
    chunks = ChunkReader(stream, reactor)
    reader = LineReader(chunks)
    number = published = skipped = 0
    done = False

    def interrupted():
        # Ctrl-C or SIGTERM before the end: say how far we got (main exits 130)
        if not done:
            progress.clear()
            sys.stderr.write(f"interrupted: published {published}, skipped {skipped}\n")
            sys.stderr.flush()
            args.interrupted = True

    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    try:
        while True:
            lines = await reader.lines()
            if lines is None:
                break
            for line in lines:
                number += 1
                if not line.strip():
                    continue
                try:
                    message = parse_line(args.kind, line)
                    size_on_wire = len(topic) + 1 + len(codec.encode(message))
                    if size_on_wire > args.max_size:
                        raise codec.DecodeError(
                            f"the message is {size_on_wire} bytes, more than --max-size {args.max_size}"
                        )
                except codec.DecodeError as e:
                    progress.clear()
                    _error("publish", f"{name} line {number}: {e} (skipped)")
                    skipped += 1
                    continue
                sub.publish(message)
                published += 1
            # flow control: what we read is handed to ZeroMQ before we read on
            await sub.sent().addTimeout(STALL_TIMEOUT, reactor)
            progress.update(reader.position, published, skipped)
    except DeferredTimeoutError:
        progress.clear()
        _error(
            "publish",
            f"Threat Bus at {args.endpoint} took nothing for {STALL_TIMEOUT:g} s; "
            f"stopped after line {number} ({published - sub.pending} published)",
        )
        return 1
    except OSError as e:
        progress.clear()
        _error("publish", f"cannot read {name}: {e}")
        return 1
    finally:
        done = True
        chunks.close()
    progress.clear()
    # Unsubscribe, and let the sockets send what they still hold (linger).
    await client.stopService()
    sys.stdout.write(f"published {published}, skipped {skipped}\n")
    sys.stdout.flush()
    return 0


def _regular_file_size(stream) -> int:
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


# --- ping


async def ping_command(reactor, args) -> int:
    client = Client(args.endpoint, request_timeout=args.timeout, linger=0, curve=args.curve)
    timings = []

    async def timed(payload):
        start = time.perf_counter()
        reply = await client.request(payload)
        timings.append((payload["action"], (time.perf_counter() - start) * 1000))
        return reply

    try:
        endpoints = parse_subscribe_reply(
            await timed({"action": "subscribe", "topic": "threatbus/intel", "snapshot": 0}),
            client.endpoint,
        )
        heartbeat = await timed({"action": "heartbeat", "topic": endpoints.p2p})
        await timed({"action": "unsubscribe", "topic": endpoints.p2p})
    except RequestTimeout:
        _error("ping", _unreachable(args))
        return 1
    except ClientError as e:
        _error("ping", f"Threat Bus at {args.endpoint} answered, but not as it should: {e}")
        return 1
    finally:
        await client.stopService()
    status = heartbeat.get("status")
    if status not in ("success", "unknown request"):
        _error(
            "ping",
            f"Threat Bus at {args.endpoint} refused the heartbeat of a new subscription: {status!r}",
        )
        return 1
    steps = ", ".join(f"{action} {ms:.1f} ms" for action, ms in timings)
    if status == "unknown request":
        steps += " (this bus does not know heartbeats)"
    sys.stdout.write(f"Threat Bus at {args.endpoint} is up: {steps}\n")
    sys.stdout.write(f"  pub endpoint {endpoints.pub}, sub endpoint {endpoints.sub}\n")
    return 0


# --- check-config


def summarize(config: configuration.Config) -> List[str]:
    """What a config sets up, in a few lines for people."""
    backbone = config.backbone
    if isinstance(backbone, configuration.RabbitMQConfig):
        backbone_text = (
            f"rabbitmq {backbone.username}@{backbone.host}:{backbone.port} vhost {backbone.vhost}"
        )
    else:
        backbone_text = "inmem (in-memory, one instance)"
    if config.metrics is None:
        metrics = "off"
    else:
        host = config.metrics.host
        host = f"[{host}]" if ":" in host else host
        metrics = f"http://{host}:{config.metrics.port}/metrics"
    logging = config.logging
    log_file = f"{logging.filename} at {logging.file_verbosity}" if logging.file else "off"
    console = logging.console_verbosity if logging.console else "off"
    lines = [f"  backbone: {backbone_text}"]
    for name, app in config.apps.items():
        advertised = f", advertised as {app.advertise_host}" if app.advertise_host else ""
        expiry = (
            f"after {app.subscription_timeout:g} s without heartbeat"
            if app.subscription_timeout
            else "never"
        )
        lines += [
            f"  {name + ':':<9} {app.host}{advertised}: manage {app.manage}, pub {app.pub}, sub {app.sub}"
            + ("" if app.curve is None else ", CURVE encryption"),
            f"            subscriptions expire {expiry}; snapshots time out after {app.snapshot_timeout:g} s",
        ]
    if config.store is None:
        store = "off (snapshots are answered by apps only)"
    else:
        kept = f"{config.store.retention_days:g} days" if config.store.retention_days else "everything"
        store = f"{configuration.safe_url(config.store.url)}, keeping {kept}"
    return lines + [
        f"  store:    {store}",
        f"  metrics:  {metrics}",
        f"  logging:  console {console}, file {log_file}",
    ]


async def check_config_command(reactor, args) -> int:
    try:
        config = configuration.load(args.config_file, os.environ)
        for app in config.apps.values():
            if app.curve is not None:
                # as start-up will: a missing or bad key file is an error now
                load_keys(app.curve)
    except (configuration.ConfigError, CurveKeyError) as e:
        _error("check-config", str(e))
        return 1
    sys.stdout.write(f"config OK: {args.config_file}\n" + "\n".join(summarize(config)) + "\n")
    return 0


# --- main


async def _unresolvable(reactor, endpoint: str) -> Optional[str]:
    """Why the host of ``endpoint`` cannot be reached by name, or None."""
    host = endpoint.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
        return None  # an address needs no resolving
    except ValueError:
        pass
    try:
        await reactor.resolve(host)
    except Exception as e:  # DNSLookupError, and whatever a resolver raises
        return f"cannot resolve {host!r} (the host of {endpoint}): {e.__class__.__name__}"
    return None


async def _main(reactor, args):
    if hasattr(args, "timeout"):  # a network command: a name that does not resolve says so
        problem = await _unresolvable(reactor, args.endpoint)
        if problem is not None:
            _error(args.command, problem)
            raise SystemExit(1)
    code = await args.run(reactor, args)
    if code:
        raise SystemExit(code)


def main(argv=None):
    """The ``txthreatbus`` console script."""
    from twisted.internet.task import react

    parser = build_parser()
    args = parse_command_line(parser, sys.argv[1:] if argv is None else list(argv))
    if hasattr(args, "curve_server_key"):
        args.curve = _curve_keys(parser, args)
    _log_to_stderr(
        LogLevel.warn if args.quiet else LogLevel.debug if args.verbose else LogLevel.info
    )
    try:
        react(_main, (args,))
    except SystemExit:
        if getattr(args, "interrupted", False):
            raise SystemExit(EXIT_INTERRUPTED) from None
        raise


if __name__ == "__main__":
    main()
