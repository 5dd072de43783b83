"""
``txthreatbus subscribe TOPIC``: print the messages of a topic as they
arrive, until Ctrl-C, which unsubscribes.
"""

from __future__ import annotations

import os
import sys

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txthreatbus import logs
from txthreatbus.cli.rendering import as_json, describe, error, unreachable
from txthreatbus.client import Client, ClientError, RequestFailed, RequestTimeout

# one namespace for the command line's events, as when it was one module
log = Logger(namespace="txthreatbus.cli", observer=logs.publisher)

#: The topics a subscription may name.
TOPICS = ("threatbus/intel", "threatbus/sighting", "threatbus", "stix2/indicator", "stix2/sighting", "stix2")


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
        error("subscribe", unreachable(args))
        return 1
    except ClientError as e:
        hint = ""
        if isinstance(e, RequestFailed) and args.topic not in TOPICS:
            hint = f" (the topics are {', '.join(TOPICS)})"
        error("subscribe", f"cannot subscribe to {args.topic!r} at {args.endpoint}: {e}{hint}")
        return 1
    log.info(
        "Receiving {topic} from {endpoint}; Ctrl-C to stop",
        topic=args.topic,
        endpoint=args.endpoint,
    )
    await Deferred()  # until the reactor stops
    return 0
