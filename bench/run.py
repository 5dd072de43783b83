#!/usr/bin/env python3
"""
Benchmark txthreatbus against the yardstick, back to back.

Runs each workload of e2e.py (beside this script) against txthreatbus
(``twistd -n zmq-app``) and against limit_server.py, alternating, takes the
median of --runs runs of each, and prints a table of ratios against the
targets. Also measures the resident memory an idle subscription costs.

    python bench/run.py [--limit-server PATH] [--e2e PATH] [--runs 3]

Both servers use ports 13370-13372 on 127.0.0.1: run nothing else there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# name, e2e.py arguments, figure, target ratio, better when
WORKLOADS = [
    ("1 subscriber", "throughput -n 20000 --subscribers 1", "deliveries_per_s", 0.35, "higher"),
    ("10 subscribers", "throughput -n 2000 --subscribers 10", "deliveries_per_s", 0.5, "higher"),
    ("2000 subscribers", "throughput -n 100 --subscribers 2000", "deliveries_per_s", 0.3, "higher"),
    ("manage", "manage -n 2000", "rpc_per_s", 0.5, "higher"),
    ("p99 at 1000/s", "throughput -n 3000 --rate 1000 --rate-batch 10", "lat_p99_ms", 2.0, "lower"),
]

#: Bench config: the defaults, but the log only at warnings, as in production.
CONFIG = """\
logging:
  console: true
  console_verbosity: WARNING
plugins:
  backbones:
    inmem: {}
  apps:
    zmq-app: {host: 127.0.0.1, manage: 13370, pub: 13371, sub: 13372,
              max_subscriptions_per_peer: 10000}  # the memory row's 10,000 from one host
"""


def run_e2e(e2e: str, args: str, server: str) -> dict:
    cmd = [sys.executable, e2e, *shlex.split(args), "--server", server]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"e2e.py failed ({' '.join(cmd)}):\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def idle_subscription_memory(server: str, n: int = 10_000) -> float:
    """Bytes of resident memory each of ``n`` idle subscriptions costs."""
    import zmq

    proc = subprocess.Popen(shlex.split(server), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ctx = zmq.Context()
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.setsockopt(zmq.RCVTIMEO, 20_000)
        req.connect("tcp://127.0.0.1:13370")
        req.send_json({"action": "heartbeat", "topic": "x"})  # waits until it is up
        req.recv_json()
        for _ in range(200):  # warm up allocators and caches
            req.send_json({"action": "subscribe", "topic": "threatbus/intel"})
            p2p = req.recv_json()["topic"]
            req.send_json({"action": "unsubscribe", "topic": p2p})
            req.recv_json()
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        for _ in range(n):
            req.send_json({"action": "subscribe", "topic": "threatbus/intel"})
            reply = req.recv_json()
            if reply.get("status") != "success":
                raise SystemExit(f"idle subscriptions: a subscribe was answered {reply}")
        time.sleep(0.5)
        after = rss_kib(proc.pid)
        ctx.destroy(0)
        return (after - before) * 1024 / n
    finally:
        proc.terminate()
        proc.wait(10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit-server", default=os.path.join(HERE, "limit_server.py"))
    ap.add_argument("--e2e", default=os.path.join(HERE, "e2e.py"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", help="run only workloads whose name contains this")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="txthreatbus-bench-") as scratch:
        config = os.path.join(scratch, "config.yaml")
        with open(config, "w") as f:
            f.write(CONFIG)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        ours = f"{twistd} --pidfile {os.path.join(scratch, 'twistd.pid')} -n zmq-app --config {config}"
        ok = run(args, ours, f"{sys.executable} {args.limit_server}")
    sys.exit(0 if ok else 1)


def run(args, ours: str, limit: str) -> bool:
    """Run the workloads against ``ours`` and ``limit``, print the table; whether every target was met."""

    rows = []
    ok = True
    for name, wargs, figure, target, better in WORKLOADS:
        if args.only and args.only not in name:
            continue
        results = {"ours": [], "limit": []}
        for _ in range(args.runs):
            for who, server in (("ours", ours), ("limit", limit)):
                r = run_e2e(args.e2e, wargs, server)
                results[who].append(r)
                print(f"  {name:16} {who:5} {json.dumps(r)}", file=sys.stderr)
        ours_v = statistics.median(r[figure] for r in results["ours"])
        limit_v = statistics.median(r[figure] for r in results["limit"])
        loss = max(r.get("loss", 0) for r in results["ours"])
        ratio = ours_v / limit_v if limit_v else float("inf")
        met = (ratio >= target if better == "higher" else ratio <= target) and loss == 0
        ok &= met
        rows.append((name, figure, ours_v, limit_v, ratio, target, better, loss, met))

    print()
    print("| workload | figure | txthreatbus | limit_server | ratio | target | loss | met |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, figure, o, l, ratio, target, better, loss, met in rows:
        sign = ">=" if better == "higher" else "<="
        print(
            f"| {name} | {figure} | {o:,.1f} | {l:,.1f} | {ratio:.2f} | {sign} {target} | {loss} | "
            f"{'yes' if met else 'NO'} |"
        )
    if not args.only or "memory" in args.only:
        per_sub = idle_subscription_memory(ours)
        met = per_sub <= 4096
        ok &= met
        print(f"| memory | RSS per idle subscription (10,000) | {per_sub:,.0f} B | | | <= 4096 B | | "
              f"{'yes' if met else 'NO'} |")
    return ok


if __name__ == "__main__":
    main()
