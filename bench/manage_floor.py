#!/usr/bin/env python3
"""
How fast can a management endpoint on Twisted answer at all?

Runs e2e.py's manage workload (subscribe, heartbeat, unsubscribe round trips
from one REQ socket) against three servers, alternating, and prints the
medians of --runs runs as ratios to the yardstick:

- the yardstick, limit_server.py (pyzmq's REP on zmq_poll, no reactor);
- the floor: a REP socket on Twisted's reactor, read as txthreatbus reads
  its management endpoint (txthreatbus.connections.BatchedReadConnection),
  answering each request with a constant reply and doing nothing else;
- txthreatbus itself (``twistd zmq-app``).

The floor bounds what any handler on Twisted can reach: the difference
between it and txthreatbus is what the handling costs.

    python bench/manage_floor.py [--runs 5] [-n 2000]

The servers use ports 13370-13372 on 127.0.0.1: run nothing else there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

#: The floor server: run as ``python manage_floor.py --serve-floor``.
FLOOR_REPLIES = {
    b"subscribe": b'{"topic": "abcdefghijklmnopqrstuvwxyzabcdef", "pub_endpoint": "127.0.0.1:13371", '
    b'"sub_endpoint": "127.0.0.1:13372", "status": "success"}',
    b"other": b'{"status": "success"}',
}


def serve_floor(port: int = 13370) -> None:
    import zmq
    from twisted.internet import reactor
    from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory

    from txthreatbus.connections import BatchedReadConnection

    class Floor(BatchedReadConnection):
        socketType = zmq.REP

        def messageReceived(self, message):
            subscribe = b'"subscribe"' in message[-1]
            self.socket.send(FLOOR_REPLIES[b"subscribe" if subscribe else b"other"], zmq.NOBLOCK)

    Floor(ZmqFactory(), ZmqEndpoint(ZmqEndpointType.bind, f"tcp://127.0.0.1:{port}"))
    reactor.run()


CONFIG = """\
store: false
logging: {console: true, console_verbosity: WARNING}
plugins:
  backbones: {inmem: {}}
  apps:
    zmq-app: {host: 127.0.0.1, manage: 13370, pub: 13371, sub: 13372}
"""


def rpc_per_s(e2e: str, n: int, server: str) -> float:
    out = subprocess.run(
        [sys.executable, e2e, "manage", "-n", str(n), "--server", server],
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"e2e.py failed against {server}:\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1])["rpc_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("-n", type=int, default=2000, help="subscribe+heartbeat+unsubscribe rounds a run")
    ap.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_floor:
        return serve_floor()
    bindir = os.path.dirname(sys.executable)
    with tempfile.TemporaryDirectory(prefix="txthreatbus-floor-") as scratch:
        config = os.path.join(scratch, "config.yaml")
        with open(config, "w") as f:
            f.write(CONFIG)
        servers = {
            "yardstick": f"{sys.executable} {os.path.join(HERE, 'limit_server.py')}",
            "twisted floor": f"{sys.executable} {os.path.abspath(__file__)} --serve-floor",
            "txthreatbus": f"{os.path.join(bindir, 'twistd')} --pidfile {scratch}/twistd.pid -n zmq-app "
            f"--config {config}",
        }
        results = {name: [] for name in servers}
        for _ in range(args.runs):
            for name, server in servers.items():
                results[name].append(rpc_per_s(os.path.join(HERE, "e2e.py"), args.n, server))
                print(f"  {name:14} {results[name][-1]:,.1f} rpc/s", file=sys.stderr)
    yardstick = statistics.median(results["yardstick"])
    print("| server | rpc/s (median) | ratio to the yardstick |")
    print("|---|---:|---:|")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"| {name} | {median:,.1f} | {median / yardstick:.2f} |")


if __name__ == "__main__":
    main()
