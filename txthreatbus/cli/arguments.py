"""
The ``txthreatbus`` command's grammar: its commands, their options and
examples (argparse), and the CurveZMQ keys the options name.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from txthreatbus import __version__
from txthreatbus.cli.check_config import check_config_command
from txthreatbus.cli.ping import ping_command
from txthreatbus.cli.publish import KINDS, publish_command
from txthreatbus.cli.rendering import error
from txthreatbus.cli.subscribe import subscribe_command
from txthreatbus.client import DEFAULT_ENDPOINT, CurveKeyError, CurveKeys, parse_endpoint


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


def curve_keys(parser, args) -> Optional[CurveKeys]:
    """The CurveZMQ keys the options name, or None; a bad key file ends the command."""
    if args.curve_server_key is None and args.curve_secret_key is None:
        return None
    if args.curve_server_key is None or args.curve_secret_key is None:
        parser.error("--curve-server-key and --curve-secret-key go together")
    try:
        return CurveKeys.from_files(args.curve_server_key, args.curve_secret_key)
    except CurveKeyError as e:
        error(args.command, f"cannot use a CurveZMQ key: {e}")
        raise SystemExit(1) from None
