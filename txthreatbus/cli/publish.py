"""
``txthreatbus publish KIND [FILE|-]``: publish the messages on JSON lines,
as fast as the bus takes them, with a progress bar for a large file.
"""

from __future__ import annotations

import sys

from twisted.internet.defer import TimeoutError as DeferredTimeoutError

from txthreatbus import codec, stix
from txthreatbus.cli.readers import ChunkReader, LineReader, open_input, regular_file_size
from txthreatbus.cli.rendering import Progress, Silent, error, unreachable
from txthreatbus.client import Client, ClientError, RequestTimeout
from txthreatbus.model import Intel, Sighting

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


async def publish_command(reactor, args) -> int:
    try:
        stream, name = open_input(args.file)
    except OSError as e:
        error("publish", f"cannot read {args.file}: {e.strerror}")
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
        error("publish", unreachable(args))
        return 1
    except DeferredTimeoutError:
        error(
            "publish",
            f"Threat Bus at {args.endpoint} answered, but its sub endpoint {sub.endpoints.sub} "
            f"did not take a connection within {args.timeout:g} s",
        )
        return 1
    except ClientError as e:
        error("publish", f"cannot publish to Threat Bus at {args.endpoint}: {e}")
        return 1

    progress = Silent()
    size = regular_file_size(stream)
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
                    error("publish", f"{name} line {number}: {e} (skipped)")
                    skipped += 1
                    continue
                sub.publish(message)
                published += 1
            # flow control: what we read is handed to ZeroMQ before we read on
            await sub.sent().addTimeout(STALL_TIMEOUT, reactor)
            progress.update(reader.position, published, skipped)
    except DeferredTimeoutError:
        progress.clear()
        error(
            "publish",
            f"Threat Bus at {args.endpoint} took nothing for {STALL_TIMEOUT:g} s; "
            f"stopped after line {number} ({published - sub.pending} published)",
        )
        return 1
    except OSError as e:
        progress.clear()
        error("publish", f"cannot read {name}: {e}")
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
