#!/usr/bin/env python3
"""
Faults at full size (issue 14, point 3): what two instances on one RabbitMQ
broker lose or deliver twice when the broker or an instance fails.

On a RabbitMQ node of its own (tests/rabbitmq_node.py: its own name, ports
and data in a temporary directory, never the shared broker), with two
``twistd -n zmq-app`` instances A and B of the Python running this script,
durable queues (durable, not auto-deleted, lazy), a subscriber app to
threatbus/intel at A and one at B, and a publisher app at A sending N Intel
at a steady rate, it runs one scenario after another, each with fresh
instances and queue names; the fault comes once a quarter of N is sent,
the publishing going on meanwhile:

  broker-kill     the broker SIGKILLed, started again at once on its data
  broker-stop     the broker stopped (rabbitmqctl stop_app) --outage s, then started
  broker-pause    the broker SIGSTOPped --outage s, then SIGCONTinued
  instance-kill   instance B SIGKILLed and started again (resubscribe_grace --grace)
  instance-term   instance B SIGTERMed and, once ended, started again
  sigterm-hung    the broker SIGSTOPped with traffic flowing: how long SIGTERM takes
                  to end A (outgoing messages unconfirmed) and B

The apps (txthreatbus.client) heartbeat every 0.5 s and subscribe again when
the bus forgot them, as Threat Bus apps do. The table gives, per scenario
and subscriber, the Intel received (distinct), missing and duplicated; the
targets are 0 missing and 0 duplicated everywhere (duplicates at B after its
SIGKILL are tolerated, as the README says), and SIGTERM within 5 s. Exits
non-zero if a target is missed.

    python bench/faults.py [-n 20000] [--rate 250] [--outage 30] [--grace 5]
                           [--only SCENARIO[,SCENARIO]] [--reconnect-max-delay S]
                           [--logs DIR] [--json]

Each run's instance logs (and with --logs, kept in DIR) show the backbone's
view. Takes about 9 minutes with the defaults (84 s a scenario); ``-n 5000
--outage 10`` for a quick look.

Measured (RabbitMQ 3.10.8, 2 CPUs; the backbone of 8f76eed, durable
exchanges): 20,000 of 20,000 at both subscribers, 0 missing, 0 duplicated,
in every scenario; SIGTERM with the broker hung ended A in 4.04 s, B in
1.51 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from twisted.internet import defer, task  # noqa: E402

from tests import faults  # noqa: E402
from tests.rabbitmq_node import RabbitMQNode, rabbitmq_missing  # noqa: E402

ORDER = ["broker-kill", "broker-stop", "broker-pause", "instance-kill", "instance-term", "sigterm-hung"]


def table(results, hung) -> str:
    lines = [f"{'scenario':40s} {'subscriber':>10s} {'received':>9s} {'missing':>8s} {'duplicated':>10s}"]
    for r in results:
        for i, (name, c) in enumerate(r.counts.items()):
            title = r.scenario.title if i == 0 else ""
            lines.append(f"{title:40s} {name:>10s} {c.received:9d} {c.missing:8d} {c.duplicated:10d}")
    if hung is not None:
        for name, seconds in hung.items():
            took = f"{seconds:.2f} s" if seconds is not None else f"over {faults.INSTANCE_DEADLINE:g} s"
            what = "outgoing unconfirmed" if name == "A" else "nothing outgoing"
            lines.append(f"SIGTERM with the broker hung: instance {name} ({what}) ended in {took}")
    return "\n".join(lines)


async def main(reactor, args) -> int:
    reason = rabbitmq_missing()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    only = ORDER if not args.only else args.only.split(",")
    unknown = [s for s in only if s not in ORDER]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {', '.join(ORDER)}", file=sys.stderr)
        return 2
    backbone = {}
    if args.reconnect_max_delay is not None:
        backbone["reconnect_max_delay"] = args.reconnect_max_delay
    workdir = args.logs or tempfile.mkdtemp(prefix="txtb-bench-faults-")
    os.makedirs(workdir, exist_ok=True)
    node = RabbitMQNode()
    results, hung, errors = [], None, []
    try:
        took = await faults.in_thread(node.start)
        print(f"node {node.name} on 127.0.0.1:{node.amqp_port} started in {took:.1f} s "
              f"({node.directory}); logs in {workdir}", flush=True)
        print(f"N={args.n} at {args.rate:g}/s, outage {args.outage:g} s, B's resubscribe_grace "
              f"{args.grace:g} s, reconnect_max_delay "
              f"{args.reconnect_max_delay if args.reconnect_max_delay is not None else 'default'}", flush=True)
        for name in only:
            t0 = time.monotonic()
            if not node.running:
                await faults.in_thread(node.start)
            if name == "sigterm-hung":
                hung = await faults.sigterm_while_hung(node, workdir, args.rate, backbone=backbone)
                print(f"\nsigterm-hung: {hung} ({time.monotonic() - t0:.0f} s)", flush=True)
                continue
            try:
                r = await faults.run_scenario(
                    node, workdir, faults.SCENARIOS[name], args.n, args.rate, args.outage, args.grace,
                    idle=args.idle, backbone=backbone,
                )
            except faults.ScenarioError as e:
                errors.append(f"{name}: {e}")
                print(f"\n{name}: the set-up failed: {e}", flush=True)
                continue
            results.append(r)
            print(f"\n{r.report()}\n  ({r.seconds:.0f} s)", flush=True)
            for failure in r.failures():
                print(f"  target missed: {failure}", flush=True)
            if args.verbose:
                for instance, lines in r.logs.items():
                    print(f"  --- {instance}:\n    " + "\n    ".join(lines[-30:]))
    finally:
        if node.paused:
            node.resume()
        node.cleanup()
        if not args.logs:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(results, hung))
    failures = [f for r in results for f in r.failures()] + errors
    if hung is not None:
        failures += [f"sigterm-hung: instance {n} took {s if s is None else round(s, 2)} s"
                     for n, s in hung.items() if s is None or s > faults.TERM_TARGET]
    if args.json:
        print(json.dumps({
            "n": args.n, "rate": args.rate, "outage": args.outage, "grace": args.grace,
            "scenarios": {r.scenario.name: {k: {"received": c.received, "missing": c.missing,
                                                "duplicated": c.duplicated} for k, c in r.counts.items()}
                          for r in results},
            "sigterm_hung_s": hung, "failures": failures,
        }))
    if failures:
        print("\ntargets missed:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


def run():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20_000, help="Intel published at A per scenario")
    ap.add_argument("--rate", type=float, default=250.0, help="Intel per second")
    ap.add_argument("--outage", type=float, default=30.0,
                    help="seconds the broker stays stopped or SIGSTOPped (broker-kill restarts at once)")
    ap.add_argument("--grace", type=float, default=5.0, help="B's resubscribe_grace when it restarts")
    ap.add_argument("--only", help=f"comma-separated scenarios of {', '.join(ORDER)}")
    ap.add_argument("--reconnect-max-delay", type=float, default=None,
                    help="the backbone's reconnect_max_delay (default: its default, 30 s)")
    ap.add_argument("--idle", type=float, default=45.0,
                    help="seconds without a delivery after which a scenario's counting ends "
                         "(more than reconnect_max_delay)")
    ap.add_argument("--logs", help="keep the instances' logs and configs in this directory")
    ap.add_argument("--verbose", action="store_true", help="print each run's backbone log lines")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    async def go(reactor):
        code = await main(reactor, args)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    run()
