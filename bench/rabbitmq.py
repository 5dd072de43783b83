#!/usr/bin/env python3
"""
Two instances on one RabbitMQ broker: txthreatbus against Threat Bus
2020.11.26 (issue 14, point 1).

Each run starts two instances of one system, A and B, both with the
rabbitmq backbone on one broker and a zmq-app each (A on --ports-a, B on
--ports-b), subscribes one app to threatbus/intel at A and one at B,
publishes N Intel items (Threat Bus 2020.11.26 encoding, e2e.py's) at A's
sub endpoint as fast as it can, and counts what each subscriber receives:
received (distinct), missing, duplicated. The figure is deliveries/s: the
distinct Intel both subscribers received, over the time from the first send
to the last delivery at either.

txthreatbus runs as ``twistd -n zmq-app`` of the Python running this script
(``store: false``, ``resubscribe_grace: 0``); the reference is Threat Bus
2020.11.26 (threatbus, threatbus-zmq-app, threatbus-inmem,
threatbus-rabbitmq 2020.11.26, with ``pluggy<1`` and ``confuse<2``),
installed on first use into a venv of its own, by default under
~/.cache/txthreatbus-bench. The two alternate, run after run (the order
swapped every run), and the table gives the median of --runs runs of each
and the ratio txthreatbus/reference.

Both use the same queue settings (--queue: durable lazy queues that outlive
their instance, as the README's example, or transient auto-deleted ones).
Every run has names of its own on the broker: a naming_join_pattern with a
random tag (exchanges ``threatbus.<tag>.intel``, ...) and name_suffix values
with it, so runs never share exchanges or queues with each other or with
anything else on the broker; the run deletes its queues and exchanges
afterwards (and says if any is left).

    python bench/rabbitmq.py [-n 10000] [--runs 3] [--skip-reference]
                             [--amqp-host 127.0.0.1] [--amqp-port 5672]
                             [--ports-a 13370] [--ports-b 13380]
                             [--queue durable|transient] [--reference-venv DIR]

Run it with a txthreatbus installed non-editable (pip install .), e.g.
``python3 -m venv /tmp/rb && /tmp/rb/bin/pip install . &&
/tmp/rb/bin/python bench/rabbitmq.py``. Exits non-zero if a subscriber
missed or got twice any Intel item.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import endpoints, intel_json, manage, port_open, wait_port  # noqa: E402
from run import default_reference_venv, reference_threatbus  # noqa: E402

REFERENCE_PACKAGES = ["threatbus==2020.11.26", "threatbus-zmq-app==2020.11.26",
                      "threatbus-inmem==2020.11.26", "threatbus-rabbitmq==2020.11.26",
                      "pluggy<1", "confuse<2"]

#: the message types either system may declare exchanges and queues for
KINDS = ["intel", "sighting", "snapshotrequest", "snapshotenvelope", "indicator", "stix_sighting"]

TOPIC = "threatbus/intel"

# One config for both systems (Threat Bus 2020's layout); txthreatbus gets
# store: false on top and resubscribe_grace: 0 in the backbone.
CONFIG = """\
logging:
  console: true
  console_verbosity: WARNING
  file: false
plugins:
  backbones:
    rabbitmq:
      host: {host}
      port: {port}
      username: {username}
      password: {password}
      vhost: {vhost}
      naming_join_pattern: {join}
      queue:
        name_suffix: {suffix}
        durable: {durable}
        auto_delete: {auto_delete}
        lazy: {lazy}
        exclusive: false
        max_items: 0
{extra}  apps:
    zmq-app:
      host: 127.0.0.1
      manage: {manage}
      pub: {pub}
      sub: {sub}
"""

QUEUES = {
    "durable": {"durable": "true", "auto_delete": "false", "lazy": "true"},
    "transient": {"durable": "false", "auto_delete": "true", "lazy": "false"},
}


# --- the broker: names and clean-up


def names(join: str, suffixes) -> tuple[list, list]:
    """The exchanges and queues a run may have made (as both systems name them)."""
    exchanges = [join.join(("threatbus", k)) for k in KINDS]
    queues = [join.join(("threatbus", k, s)) for k in KINDS for s in suffixes]
    return exchanges, queues


def amqp_connection(args):
    import pika

    return pika.BlockingConnection(pika.ConnectionParameters(
        args.amqp_host, args.amqp_port, args.amqp_vhost,
        pika.PlainCredentials(args.amqp_user, args.amqp_password)))


def exists(conn, kind: str, name: str) -> bool:
    """Whether exchange or queue ``name`` exists (a passive declare on a channel of its own)."""
    import pika.exceptions

    ch = conn.channel()
    try:
        if kind == "queue":
            ch.queue_declare(name, passive=True)
        else:
            ch.exchange_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            return False
        raise
    ch.close()
    return True


def clean_up(args, join: str, suffixes) -> list:
    """Delete the run's queues and exchanges; the names of those still there afterwards."""
    exchanges, queues = names(join, suffixes)
    conn = amqp_connection(args)
    try:
        left = []
        for kind, group in (("queue", queues), ("exchange", exchanges)):
            for name in group:
                if not exists(conn, kind, name):
                    continue
                ch = conn.channel()
                (ch.queue_delete if kind == "queue" else ch.exchange_delete)(name)
                ch.close()
                if exists(conn, kind, name):
                    left.append(name)
        return left
    finally:
        conn.close()


# --- the apps


def receiver(pub_ep, topic, n, ready, out, idle_s, settle_s):
    """One subscriber: every Intel item's sequence number, once; duplicates counted.

    Ends ``settle_s`` after it has all ``n`` (to see duplicates that come
    late), or ``idle_s`` after the last delivery."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(pub_ep)
    sub.setsockopt_string(zmq.SUBSCRIBE, topic)
    k1, k2 = b'"id": "', b'"id":"'
    seen = bytearray(n)
    got = dup = other = 0
    first = last = None
    ready_sent = False
    deadline = None
    while True:
        if not sub.poll(100):
            if deadline and time.time() > deadline:
                break
            continue
        while True:
            try:
                raw = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            k = raw.find(k1)
            if k < 0:
                k = raw.find(k2)
                k = k + len(k2) if k >= 0 else -1
            else:
                k += len(k1)
            if k < 0:
                other += 1
                continue
            seq = raw[k:raw.index(b'"', k)].split(b":")[0]
            if seq.startswith(b"probe"):
                if not ready_sent:
                    ready.set()
                    ready_sent = True
                    deadline = time.time() + idle_s + 60  # the sending starts after every probe is back
                continue
            i = int(seq)
            if not 0 <= i < n:
                other += 1
                continue
            t = time.time()
            if seen[i]:
                dup += 1
                continue
            seen[i] = 1
            got += 1
            if first is None:
                first = t
            last = t
            deadline = t + (settle_s if got == n else idle_s)
    out.put({"received": got, "missing": n - got, "duplicated": dup, "other": other,
             "first": first, "last": last})


def subscribe(ctx, manage_port):
    r = manage(ctx, f"tcp://127.0.0.1:{manage_port}", {"action": "subscribe", "topic": TOPIC, "snapshot": 0},
               timeout=20.0)
    if not r or r.get("status") != "success":
        raise RuntimeError(f"subscribe at {manage_port} failed: {r}")
    pub_ep, sub_ep = endpoints(r, "127.0.0.1")
    return r["topic"], pub_ep, sub_ep


def measure(args, a, b) -> dict:
    """Subscribe at A and at B, publish N Intel at A, count at both subscribers."""
    ctx = zmq.Context()
    topic_a, pub_a, sub_a = subscribe(ctx, a)
    topic_b, pub_b, _ = subscribe(ctx, b)
    out_a, out_b = mp.Queue(), mp.Queue()
    ready_a, ready_b = mp.Event(), mp.Event()
    procs = [mp.Process(target=receiver, args=(pub_a, topic_a, args.n, ready_a, out_a, args.idle, args.settle)),
             mp.Process(target=receiver, args=(pub_b, topic_b, args.n, ready_b, out_b, args.idle, args.settle))]
    for p in procs:
        p.start()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.connect(sub_a)
    # probe until both subscribers see traffic through the broker (slow
    # joiners, queues being bound)
    k = 0
    end = time.time() + args.start_timeout
    while not (ready_a.is_set() and ready_b.is_set()):
        if time.time() > end:
            for p in procs:
                p.kill()
            raise RuntimeError(f"no probe came back at {'A' if not ready_a.is_set() else 'B'} "
                               f"within {args.start_timeout} s")
        pub.send_string(f"{TOPIC} {intel_json('probe%d' % k, time.time())}")
        k += 1
        time.sleep(0.2)
    time.sleep(1.0)  # let late probes drain
    t0 = time.time()
    for i in range(args.n):
        pub.send_string(f"{TOPIC} {intel_json(i, time.time())}")
    t_sent = time.time()
    res_a = out_a.get(timeout=args.idle + 900)
    res_b = out_b.get(timeout=args.idle + 900)
    for p in procs:
        p.join()
    pub.close(linger=0)
    ctx.term()
    lasts = [r["last"] for r in (res_a, res_b) if r["last"]]
    span = max(lasts) - t0 if lasts else None
    received = res_a["received"] + res_b["received"]
    per = lambda r: {k: r[k] for k in ("received", "missing", "duplicated")}  # noqa: E731
    return {"sent": args.n, "send_s": round(t_sent - t0, 3), "span_s": span and round(span, 3),
            "deliveries_per_s": round(received / span, 1) if span else 0.0,
            "a_per_s": round(res_a["received"] / (res_a["last"] - t0), 1) if res_a["last"] else 0.0,
            "b_per_s": round(res_b["received"] / (res_b["last"] - t0), 1) if res_b["last"] else 0.0,
            "A": per(res_a), "B": per(res_b)}


# --- one run of one system


def start(cmd: list, cwd: str, log: str) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        print(f"pid {proc.pid} still running 10 s after signal {sig}: killed", file=sys.stderr)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(path: str, n: int = 2000) -> str:
    with open(path, "rb") as f:
        return f.read()[-n:].decode(errors="replace")


def run_once(args, system: str, scratch: str, threatbus: str | None) -> dict:
    tag = f"rb{secrets.token_hex(4)}"
    join = f".{tag}."
    suffixes = [f"{tag}-a", f"{tag}-b"]
    ports = [args.ports_a, args.ports_b]
    for base in ports:
        for p in (base, base + 1, base + 2):
            if port_open("127.0.0.1", p):
                raise SystemExit(f"port {p} is already taken by another process")
    procs = []
    try:
        for name, suffix, base in zip("ab", suffixes, ports):
            d = os.path.join(scratch, f"{system}-{tag}-{name}")
            os.mkdir(d)  # a folder each: Threat Bus also reads config files where it runs
            extra = "      resubscribe_grace: 0\n" if system == "txthreatbus" else ""
            config = CONFIG.format(host=args.amqp_host, port=args.amqp_port, username=args.amqp_user,
                                   password=json.dumps(args.amqp_password), vhost=json.dumps(args.amqp_vhost),
                                   join=json.dumps(join), suffix=suffix, extra=extra,
                                   manage=base, pub=base + 1, sub=base + 2, **QUEUES[args.queue])
            if system == "txthreatbus":
                config = "store: false\n" + config
                cmd = [os.path.join(os.path.dirname(sys.executable), "twistd"), "--pidfile", "twistd.pid",
                       "-n", "zmq-app", "--config", "config.yaml"]
            else:
                cmd = [threatbus, "-c", "config.yaml"]
            with open(os.path.join(d, "config.yaml"), "w") as f:
                f.write(config)
            log = os.path.join(d, "log")
            procs.append((start(cmd, d, log), log))
        for (proc, log), base in zip(procs, ports):
            if not wait_port("127.0.0.1", base, timeout=30):
                raise RuntimeError(f"{system} did not open port {base}: {tail(log)}")
        time.sleep(0.5)
        for proc, log in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{system} exited with {proc.returncode}: {tail(log)}")
        return measure(args, args.ports_a, args.ports_b)
    finally:
        # txthreatbus stops on SIGTERM; Threat Bus 2020 only handles SIGINT
        for proc, log in procs:
            stop(proc, signal.SIGTERM if system == "txthreatbus" else signal.SIGINT)
        left = clean_up(args, join, suffixes)
        if left:
            print(f"left on the broker (delete them by hand): {', '.join(left)}", file=sys.stderr)


# --- the table


def summary(results: dict) -> dict:
    out = {}
    for system, runs in results.items():
        ok = [r for r in runs if r]
        if not ok:
            continue
        total = lambda s, k: sum(r[s][k] for r in ok)  # noqa: E731
        out[system] = {
            "runs": len(ok), "failed_runs": len(runs) - len(ok),
            "deliveries_per_s": statistics.median(r["deliveries_per_s"] for r in ok),
            **{s: {k: total(s, k) for k in ("received", "missing", "duplicated")} for s in "AB"},
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="Intel items published at A per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-reference", action="store_true", help="run txthreatbus alone")
    ap.add_argument("--reference-venv", default=default_reference_venv("threatbus-2020.11.26"),
                    help="the reference's venv, made on first use (default: %(default)s)")
    ap.add_argument("--amqp-host", default="127.0.0.1")
    ap.add_argument("--amqp-port", type=int, default=5672)
    ap.add_argument("--amqp-user", default="guest")
    ap.add_argument("--amqp-password", default="guest")
    ap.add_argument("--amqp-vhost", default="/")
    ap.add_argument("--ports-a", type=int, default=13370, help="A's manage port (pub, sub: the next two)")
    ap.add_argument("--ports-b", type=int, default=13380, help="B's manage port (pub, sub: the next two)")
    ap.add_argument("--queue", choices=sorted(QUEUES), default="durable",
                    help="durable: durable lazy queues that outlive their instance (the README's example); "
                         "transient: non-durable, auto-deleted")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds without a delivery that end a run")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds a subscriber listens on for duplicates once it has all N")
    ap.add_argument("--start-timeout", type=float, default=60.0,
                    help="seconds for the first probe to come back at both subscribers")
    ap.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    args = ap.parse_args()

    threatbus = None if args.skip_reference else reference_threatbus(args.reference_venv, REFERENCE_PACKAGES)
    systems = ["txthreatbus"] + ([] if args.skip_reference else ["reference"])
    results = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="txthreatbus-bench-rabbitmq-") as scratch:
        for i in range(args.runs):
            order = systems if i % 2 == 0 else systems[::-1]
            for system in order:
                try:
                    r = run_once(args, system, scratch, threatbus)
                except (RuntimeError, zmq.ZMQError) as e:
                    print(f"run {i + 1} {system}: failed: {e}", file=sys.stderr)
                    r = None
                results[system].append(r)
                if r:
                    print(f"run {i + 1} {system:11s} {r['deliveries_per_s']:9.1f} deliveries/s "
                          f"(A {r['a_per_s']:.1f}/s, B {r['b_per_s']:.1f}/s; span {r['span_s']} s, "
                          f"sent in {r['send_s']} s)  "
                          f"A: {r['A']['received']} received, {r['A']['missing']} missing, "
                          f"{r['A']['duplicated']} duplicated; "
                          f"B: {r['B']['received']} received, {r['B']['missing']} missing, "
                          f"{r['B']['duplicated']} duplicated", flush=True)
    table = summary(results)
    print()
    print(f"N={args.n}, {args.runs} runs, {args.queue} queues, broker {args.amqp_host}:{args.amqp_port}")
    print(f"{'system':12s} {'deliveries/s':>13s}  {'subscriber at A (recv/miss/dup)':>32s}  "
          f"{'subscriber at B (recv/miss/dup)':>32s}")
    for system, s in table.items():
        cells = ["/".join(str(s[x][k]) for k in ("received", "missing", "duplicated")) for x in "AB"]
        print(f"{system:12s} {s['deliveries_per_s']:13.1f}  {cells[0]:>32s}  {cells[1]:>32s}"
              + (f"  ({s['failed_runs']} runs failed)" if s["failed_runs"] else ""))
    if "txthreatbus" in table and "reference" in table:
        ratio = table["txthreatbus"]["deliveries_per_s"] / table["reference"]["deliveries_per_s"]
        table["ratio"] = round(ratio, 2)
        print(f"ratio txthreatbus/reference: {ratio:.2f}x (issue 14's target: >= 5x)")
    if args.json:
        print(json.dumps(table))
    exactly_once = all(s[x]["missing"] == 0 and s[x]["duplicated"] == 0 and not s["failed_runs"]
                       for name, s in table.items() if name != "ratio" for x in "AB")
    sys.exit(0 if exactly_once and len(table) >= len(systems) else 1)


if __name__ == "__main__":
    main()
