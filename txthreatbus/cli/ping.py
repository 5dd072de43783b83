"""
``txthreatbus ping``: subscribe, heartbeat and unsubscribe, timing each.
"""

from __future__ import annotations

import sys
import time

from txthreatbus.cli.rendering import error, unreachable
from txthreatbus.client import Client, ClientError, RequestTimeout, parse_subscribe_reply


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
        error("ping", unreachable(args))
        return 1
    except ClientError as e:
        error("ping", f"Threat Bus at {args.endpoint} answered, but not as it should: {e}")
        return 1
    finally:
        await client.stopService()
    status = heartbeat.get("status")
    if status not in ("success", "unknown request"):
        error(
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
