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

``main``, here, is the console script. The modules, one idea each:
``arguments`` (the argument parser), a module per command (``subscribe``,
``publish``, ``ping``, ``check_config``), ``readers`` (the input of
``publish``: a file or stdin, in lines) and ``rendering`` (messages as
lines, the progress bar, what people read on stderr).
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Optional

from twisted.logger import LogLevel

from txthreatbus.cli.arguments import build_parser, curve_keys, parse_command_line
from txthreatbus.cli.check_config import check_config_command, summarize
from txthreatbus.cli.ping import ping_command
from txthreatbus.cli.publish import (
    KINDS,
    PROGRESS_MIN_BYTES,
    PUBLISH_LINGER,
    STALL_TIMEOUT,
    parse_line,
    publish_command,
)
from txthreatbus.cli.readers import ChunkReader, LineReader
from txthreatbus.cli.rendering import Progress, as_json, describe, error, log_to_stderr
from txthreatbus.cli.subscribe import TOPICS, subscribe_command

__all__ = [
    "EXIT_INTERRUPTED",
    "KINDS",
    "PROGRESS_MIN_BYTES",
    "PUBLISH_LINGER",
    "STALL_TIMEOUT",
    "TOPICS",
    "ChunkReader",
    "LineReader",
    "Progress",
    "as_json",
    "build_parser",
    "check_config_command",
    "describe",
    "main",
    "parse_command_line",
    "parse_line",
    "ping_command",
    "publish_command",
    "subscribe_command",
    "summarize",
]

#: The exit status of a command that Ctrl-C or SIGTERM cut short (128 + SIGINT).
EXIT_INTERRUPTED = 130


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
            error(args.command, problem)
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
        args.curve = curve_keys(parser, args)
    log_to_stderr(
        LogLevel.warn if args.quiet else LogLevel.debug if args.verbose else LogLevel.info
    )
    try:
        react(_main, (args,))
    except SystemExit:
        if getattr(args, "interrupted", False):
            raise SystemExit(EXIT_INTERRUPTED) from None
        raise
