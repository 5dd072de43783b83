#!/usr/bin/env python3
"""
Snapshot benchmark: how fast the bus's intel store answers a snapshot of
many live Intel items, and what answering costs the bus in memory.

Starts ``twistd -n zmq-app`` with the SQLite store in a temporary directory
(or the store --store-url names), publishes N distinct live Intel items
(Threat Bus 2020 Intel, operation ADD, each with an id of its own, as
e2e.py sends them) while a live subscriber checks that the bus routed them
all, waits until the store has written them (a settle of --settle seconds,
then until the database files stop changing), and then measures: a new app
subscribes to ``threatbus/intel`` with ``snapshot: 1`` (a day) and counts the
``intel`` frames that reach it, until all N distinct items arrived.

Prints one JSON line:

    snapshot_s       seconds from the subscribe request to the last of the N
    first_item_s     seconds from the subscribe request to the first item
    received         distinct benchmark items the requester got (N if all)
    duplicates       items it got more than once
    other            other intel frames it got (the probes, live too)
    rss_before_mib   the bus's VmRSS before the subscribe
    rss_end_mib      ... when the last item arrived
    rss_growth_mib   rss_end_mib - rss_before_mib
    rss_peak_growth_mib  the highest VmRSS sampled in between, less before
    rss_later_growth_mib VmRSS --after seconds later, less before

    python bench/snapshot.py [-n 100000] [--twistd PATH] [--store-url URL]

Uses ports 13370-13372 on 127.0.0.1: run nothing else there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from run import rss_kib

import zmq

HOST = "127.0.0.1"
MANAGE, PUB, SUB = 13370, 13371, 13372

CONFIG = """\
logging:
  console: true
  console_verbosity: WARNING
{store}plugins:
  backbones:
    inmem: {{}}
  apps:
    zmq-app: {{host: 127.0.0.1, manage: 13370, pub: 13371, sub: 13372}}
"""

# Threat Bus 2020.11.26 Intel, as e2e.py sends it; the id is "<run>-<seq>"
_INTEL = ('{"ts": "2020-11-26 14:46:52.123456", "id": "%s", '
          '"data": {"indicator": ["evil%s.snapshot.example.com"], "intel_type": 11}, '
          '"operation": "ADD"}')


def wait_port(port: int, timeout: float = 30.0) -> bool:
    import socket

    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def request(ctx, msg: dict, timeout: float = 10.0) -> dict:
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{HOST}:{MANAGE}")
    try:
        s.send_json(msg)
        if not s.poll(int(timeout * 1000)):
            raise SystemExit(f"no answer to {msg}")
        return s.recv_json()
    finally:
        s.close()


def subscribe(ctx, snapshot: int) -> tuple:
    """A new subscription to threatbus/intel: its P2P topic and a SUB socket reading it."""
    reply = request(ctx, {"action": "subscribe", "topic": "threatbus/intel", "snapshot": snapshot})
    if reply.get("status") != "success":
        raise SystemExit(f"subscribe failed: {reply}")
    p2p = reply["topic"]
    pub_ep = ("tcp://" + reply["pub_endpoint"]) if "pub_endpoint" in reply else \
        f"tcp://{HOST}:{reply['pub_port']}"
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(pub_ep)
    sub.setsockopt_string(zmq.SUBSCRIBE, p2p)
    return p2p, sub


def intel_ids(sub, p2p: str, timeout_ms: int):
    """The ids of the intel frames ``sub`` holds (waiting up to ``timeout_ms`` for the first)."""
    prefix = p2p.encode() + b"intel "
    ids = []
    if not sub.poll(timeout_ms):
        return ids
    while True:
        try:
            raw = sub.recv(zmq.NOBLOCK)
        except zmq.Again:
            return ids
        if not raw.startswith(prefix):
            continue
        k = raw.find(b'"id": "')
        if k < 0:
            k = raw.find(b'"id":"')
            k = k + 6 if k >= 0 else -1
        else:
            k += 7
        if k >= 0:
            ids.append(raw[k:raw.index(b'"', k)])


def db_state(path: str):
    """Sizes and modification times of a SQLite database and its journal files."""
    state = []
    for suffix in ("", "-wal", "-journal", "-shm"):
        try:
            st = os.stat(path + suffix)
            state.append((suffix, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            pass
    return state


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="live Intel items (default %(default)s)")
    ap.add_argument("--twistd", default=os.path.join(os.path.dirname(sys.executable), "twistd"))
    ap.add_argument("--store-url", help="default: sqlite:////<a temporary directory>/intel.sqlite")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds to wait after the bus routed the last item (default %(default)s)")
    ap.add_argument("--quiet", type=float, default=1.0,
                    help="then wait until the SQLite files did not change for this long (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds the snapshot may take before giving up (default %(default)s)")
    ap.add_argument("--after", type=float, default=2.0,
                    help="read VmRSS again this long after the last item (default %(default)s)")
    ap.add_argument("--no-store-key", action="store_true",
                    help="leave the store key out of the config (a bus before the store: tests this script)")
    args = ap.parse_args()

    run_id = os.urandom(4).hex()
    with tempfile.TemporaryDirectory(prefix="txthreatbus-snapshot-") as tmp:
        db = os.path.join(tmp, "intel.sqlite")
        url = args.store_url or f"sqlite:///{db}"
        config = os.path.join(tmp, "config.yaml")
        with open(config, "w") as f:
            store = "" if args.no_store_key else f'store:\n  url: "{url}"\n'
            f.write(CONFIG.format(store=store))
        pidfile = os.path.join(tmp, "twistd.pid")
        log = open(os.path.join(tmp, "twistd.log"), "w+")
        proc = subprocess.Popen([args.twistd, "--pidfile", pidfile, "-n", "zmq-app", "--config", config],
                                cwd=tmp, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        ctx = zmq.Context()
        try:
            figures = measure(args, ctx, proc, pidfile, db if not args.store_url else None, run_id)
        except BaseException:
            log.seek(0)
            sys.stderr.write("the bus's output:\n" + log.read()[-4000:])
            raise
        finally:
            ctx.destroy(0)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(json.dumps(figures))


def measure(args, ctx, proc, pidfile: str, db, run_id: str) -> dict:
    if not wait_port(MANAGE):
        raise SystemExit("the bus did not open its manage port")
    time.sleep(0.3)
    if proc.poll() is not None:
        raise SystemExit(f"the bus exited with {proc.returncode}")
    with open(pidfile) as f:
        pid = int(f.read().strip())
    n = args.n

    # 1. publish n distinct live Intel items; a live subscriber sees them routed
    p2p, sink = subscribe(ctx, 0)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(f"tcp://{HOST}:{SUB}")
    probes = 0
    while True:  # the slow joiner: until the sink sees a probe
        pub.send_string("threatbus/intel " + _INTEL % (f"probe-{run_id}-{probes}", probes))
        probes += 1
        if intel_ids(sink, p2p, 200):
            break
        if probes > 150:
            raise SystemExit("no probe came back: the bus does not route")
    ids = [f"{run_id}-{i}" for i in range(n)]
    t0 = time.time()
    for i, id_ in enumerate(ids):
        pub.send_string("threatbus/intel " + _INTEL % (id_, i))
    routed = 0
    idle_until = time.time() + 20
    bench_prefix = run_id.encode() + b"-"
    while routed < n and time.time() < idle_until:
        got = intel_ids(sink, p2p, 200)
        if got:
            routed += sum(1 for i in got if i.startswith(bench_prefix))
            idle_until = time.time() + 20
    publish_s = time.time() - t0
    if routed < n:
        raise SystemExit(f"the bus routed {routed} of {n} published items")
    request(ctx, {"action": "unsubscribe", "topic": p2p})
    sink.close()
    pub.close()

    # 2. the store writes them: a settle, then until its files stop changing
    t1 = time.time()
    time.sleep(args.settle)
    if db is not None:
        state, since = db_state(db), time.time()
        while time.time() - since < args.quiet and time.time() - t1 < 120:
            time.sleep(0.1)
            now = db_state(db)
            if now != state:
                state, since = now, time.time()
    settle_s = time.time() - t1
    db_bytes = sum(size for _, size, _ in db_state(db)) if db is not None else None

    # 3. the snapshot: a new app asks for a day of intel
    rss_before = rss_kib(pid)
    peak = [rss_before]
    sampling = True

    def sample():
        while sampling:
            try:
                peak[0] = max(peak[0], rss_kib(pid))
            except (OSError, RuntimeError):
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seen = set()
    duplicates = other = 0
    first = last = None
    t2 = time.time()
    p2p, sub = subscribe(ctx, 1)
    deadline = t2 + args.timeout
    idle_until = time.time() + 15
    while len(seen) < n and time.time() < deadline and time.time() < idle_until:
        got = intel_ids(sub, p2p, 200)
        if not got:
            continue
        now = time.time()
        idle_until = now + 15
        if first is None:
            first = now
        for id_ in got:
            if id_.startswith(bench_prefix):
                if id_ in seen:
                    duplicates += 1
                else:
                    seen.add(id_)
                    last = now
            else:
                other += 1
    rss_end = rss_kib(pid)
    sampling = False
    sampler.join()
    peak_kib = max(peak[0], rss_end)
    # anything that comes in a little later (duplicates, the probes)
    end = time.time() + args.after
    while time.time() < end:
        for id_ in intel_ids(sub, p2p, 100):
            if id_.startswith(bench_prefix):
                duplicates += id_ in seen
                seen.add(id_)
            else:
                other += 1
    rss_later = rss_kib(pid)
    sub.close()
    mib = 1 / 1024
    return {
        "mode": "snapshot", "items": n, "probes": probes,
        "publish_s": round(publish_s, 3), "settle_s": round(settle_s, 3),
        "db_bytes": db_bytes,
        "received": len(seen), "duplicates": duplicates, "other": other,
        "complete": len(seen) >= n,
        "first_item_s": round(first - t2, 4) if first else None,
        "snapshot_s": round(last - t2, 4) if last and len(seen) >= n else None,
        "items_per_s": round(len(seen) / (last - t2), 1) if last else 0,
        "rss_before_mib": round(rss_before * mib, 1),
        "rss_end_mib": round(rss_end * mib, 1),
        "rss_growth_mib": round((rss_end - rss_before) * mib, 1),
        "rss_peak_growth_mib": round((peak_kib - rss_before) * mib, 1),
        "rss_later_growth_mib": round((rss_later - rss_before) * mib, 1),
    }


if __name__ == "__main__":
    main()
